//! Benchmark harness (filled by the harness issue).

//! Container runtime (filled by the runtime issue).

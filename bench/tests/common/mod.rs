//! Synthetic results for the report and compare tests.
#![allow(dead_code)]

use twinbox_bench::host::{Context, VirtKind, Virtualization};
use twinbox_bench::results::{BackendStatus, Better, Record, Results, Settings, SCHEMA};
use twinbox_bench::stats::Summary;

pub fn context() -> Context {
    Context {
        rev: "abc1234".into(),
        dirty: false,
        date: "2025-01-02T03:04:05+00:00".into(),
        host: "testhost".into(),
        kernel: "6.1.0-test".into(),
        cpus: 2,
        cpu_model: "Test CPU".into(),
        mem_total_kib: 4 << 20,
        cgroup_layout: "cgroup v1/v2 hybrid".into(),
        virtualization: Virtualization { kind: VirtKind::Pvm, detail: "/dev/kvm is PVM (kvm_pvm loaded)".into() },
        store_fs: None,
    }
}

/// A deterministic, noisy-looking series around `center` (±5%).
pub fn series(center: f64, n: usize, seed: u64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x % 10_000) as f64 / 10_000.0; // [0, 1)
            center * (0.95 + 0.1 * u)
        })
        .collect()
}

pub fn record(backend: &str, scenario: &str, metric: &str, unit: &str, better: Better, samples: Vec<f64>) -> Record {
    Record {
        backend: backend.into(),
        scenario: scenario.into(),
        metric: metric.into(),
        unit: unit.into(),
        better,
        description: format!("synthetic {metric}"),
        summary: Summary::of(&samples),
        samples,
        warmup_dropped: 2,
        failures: 0,
        context: context(),
    }
}

pub fn status(name: &str, isolation: &str, reason: Option<&str>) -> BackendStatus {
    BackendStatus {
        name: name.into(),
        isolation: isolation.into(),
        available: reason.is_none(),
        reason: reason.map(Into::into),
        version: None,
        note: None,
    }
}

/// Results with every scenario for three container-side backends; `slow` scales
/// twinbox-container's start figures (1.0: as the base).
pub fn results(seed: u64, slow: f64) -> Results {
    let mut records = Vec::new();
    for (i, (b, start)) in [("process", 0.5), ("twinbox-container", 12.0), ("runc", 20.0)].into_iter().enumerate() {
        let k = if b == "twinbox-container" { slow } else { 1.0 };
        let s = seed * 10 + i as u64;
        records.push(record(b, "start", "time_to_workload", "ms", Better::Lower, series(start * k, 30, s)));
        records.push(record(b, "start", "end_to_end", "ms", Better::Lower, series(start * 2.0 * k, 30, s + 100)));
        records.push(record(
            b,
            "memory",
            "pss_per_instance",
            "KiB",
            Better::Lower,
            series(300.0 + 500.0 * i as f64, 10, s + 200),
        ));
        records.push(record(b, "memory", "kernel_per_instance", "KiB", Better::Lower, vec![40.0 * i as f64]));
        records.push(record(b, "memory", "total_per_instance", "KiB", Better::Lower, vec![340.0 + 540.0 * i as f64]));
        let lat: Vec<f64> = (0..10).map(|n| start * 2.0 + n as f64 * 0.3).collect();
        records.push(record(b, "density", "launch_latency", "ms", Better::Lower, lat));
        let mem: Vec<f64> = (1..=10).map(|n| n as f64 * (0.3 + i as f64 * 0.5)).collect();
        records.push(record(b, "density", "host_memory", "MiB", Better::Lower, mem));
        records.push(record(b, "density", "launch_rate", "instances/s", Better::Higher, vec![1000.0 / (start * 2.0)]));
        records.push(record(b, "cpu", "compute_ratio", "ratio", Better::Lower, series(1.0, 5, s + 300)));
        records.push(record(
            b,
            "cpu",
            "syscalls_ratio",
            "ratio",
            Better::Lower,
            series(1.0 + 0.2 * i as f64, 5, s + 400),
        ));
    }
    Results {
        schema: SCHEMA.into(),
        context: context(),
        settings: Settings {
            image: "hello:latest".into(),
            scenarios: ["start", "memory", "density", "cpu"].map(String::from).to_vec(),
            backends: vec![],
            quick: true,
            lean: false,
            start_runs: 30,
            ready_runs: 0,
            ready: None,
            cpu_runs: 5,
            warmup: 2,
            instances: 10,
            memory_rounds: 1,
            max: 10,
            density_passes: 1,
            memory_budget_mib: None,
            cpu_target_ms: 150,
            disk_runs: 3,
            disk_mib: 32,
        },
        interrupted: false,
        backends: vec![
            status("process", "process", None),
            status("twinbox-container", "container", None),
            status("runc", "container", None),
            status("crun", "container", Some("crun not on PATH (apt-get install crun)")),
            status("twinbox-microvm", "microvm", Some("twinbox microVM cannot boot Linux guests yet")),
            status("firecracker", "microvm", Some("firecracker not on PATH")),
        ],
        records,
        notes: vec!["synthetic".into()],
        not_applicable: Vec::new(),
        nested: None,
    }
}

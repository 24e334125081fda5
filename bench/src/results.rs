//! `results.json`: every raw sample with its context. The schema (`"schema":
//! "twinbox-bench/1"`):
//!
//! ```text
//! {
//!   "schema": "twinbox-bench/1",
//!   "context":  Context,              // rev, dirty, date, host, kernel, cpus, cpu_model, mem_total_kib,
//!                                     // cgroup_layout, virtualization { kind, detail },
//!                                     // store_fs { path, fs_type, source, journal: bool | null } | null:
//!                                     //   the filesystem of the store's containers/ directory
//!                                     //   (absent in results from before it was recorded)
//!   "settings": Settings,             // what was asked: scenarios, backends, runs, warm-up, instances, max,
//!                                     // density_passes (absent: 1), image, ready (the user's own image's
//!                                     // readiness check, absent for hello), ready_runs, lean (a run in
//!                                     // the nested L1 with its fewer rounds; absent: false)
//!   "interrupted": bool,              // Ctrl-C: what is here is what was measured until then
//!   "backends": [ { "name", "isolation", "available", "reason"?, "version"?, "note"? } ],
//!   "records":  [ {
//!       "backend", "scenario", "metric", "unit", "better": "lower" | "higher",
//!       "description",                // what one sample is, in words
//!       "samples": [f64],             // raw, in the order taken (density: sample i is instance i+1, the mean over passes)
//!       "warmup_dropped", "failures",
//!       "summary": { n, min, max, mean, p50, p90, p99 } | null,   // p50/p90/p99 from an HDR histogram
//!       "context": Context            // a copy, so a record stands on its own
//!   } ],
//!   "notes": [string],
//!   "not_applicable": [ {             // what does not apply to the user's own image (absent: none)
//!       "scenario",                   // e.g. "cpu"; "*" for every scenario of one backend
//!       "metrics"?: [string],         // only these metrics of it (absent: the whole scenario)
//!       "backend"?: string,           // only this backend (absent: every one)
//!       "reason"
//!   } ]
//! }
//! ```
//!
//! Units: `ms`, `KiB`, `MiB`, `instances/s`, `ratio` (a backend's figure over the bare process's).

use std::path::Path;

use serde::{Deserialize, Serialize};
use twinbox_exit::ExitCode;

use crate::host::Context;
use crate::stats::Summary;

/// The schema identifier written into every results.json.
pub const SCHEMA: &str = "twinbox-bench/1";

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Results {
    pub schema: String,
    pub context: Context,
    pub settings: Settings,
    pub interrupted: bool,
    pub backends: Vec<BackendStatus>,
    pub records: Vec<Record>,
    pub notes: Vec<String>,
    /// What does not apply to the image measured (the user's own: what needs `hello`), and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_applicable: Vec<NotApplicable>,
    /// A run made elsewhere and shown beside this one, never mixed with it: the microVM
    /// backends measured in the nested L1 of scripts/nested-bench.sh on a host without
    /// hardware KVM (`twinbox bench --nested FILE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested: Option<Box<Results>>,
}

/// What the run was asked to do.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Settings {
    pub image: String,
    pub scenarios: Vec<String>,
    pub backends: Vec<String>,
    pub quick: bool,
    /// A run in the nested L1, where every microVM boot takes seconds under emulation: fewer
    /// rounds and instances (full: 10 starts, 5 instances, 5 per density pass); quick, a few of
    /// everything (3 starts without warm-up, 2 CPU rounds, 3 instances, one pass, one net round
    /// with one start pair), enough to show each figure's size, not to tell small differences
    /// apart.
    #[serde(default)]
    pub lean: bool,
    /// Measured rounds of the start scenario.
    pub start_runs: usize,
    /// Measured rounds of the start scenario's `time_to_ready` (the user's own image). Absent
    /// in older results: 0.
    #[serde(default)]
    pub ready_runs: usize,
    /// When an instance of the user's own image counts as ready (`--ready`); absent for hello.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Measured rounds of the CPU scenario.
    pub cpu_runs: usize,
    pub warmup: usize,
    /// Idle instances per backend in the memory scenario.
    pub instances: usize,
    /// Rounds of the memory scenario over every backend (order reversed on odd rounds); one
    /// kernel reading per backend and round. Absent in results of older runs: 1.
    #[serde(default = "one")]
    pub memory_rounds: usize,
    /// Instances per backend in the density scenario.
    pub max: usize,
    /// Passes of the density scenario over every backend (order reversed on odd passes); the
    /// curves are the means over passes. Absent in results of older runs: 1.
    #[serde(default = "one")]
    pub density_passes: usize,
    /// The density scenario also stops a backend once its instances hold this much host
    /// memory (MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_budget_mib: Option<u64>,
    /// Target duration of the bare process's compute and syscall loops, ms.
    pub cpu_target_ms: u64,
    /// Rounds of the disk scenario over every backend and place. Absent in older results: 0.
    #[serde(default)]
    pub disk_runs: usize,
    /// Size of the disk scenario's file, MiB.
    #[serde(default)]
    pub disk_mib: u32,
}

fn one() -> usize {
    1
}

/// A scenario, some of its metrics, or a backend that does not apply to the image measured.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NotApplicable {
    /// The scenario (`cpu`), or `*` for a backend that runs none of them.
    pub scenario: String,
    /// Only these of its metrics; empty: all of it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<String>,
    /// Only this backend; none: every backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for NotApplicable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match (&self.backend, self.scenario.as_str(), self.metrics.as_slice()) {
            (Some(b), "*", _) => format!("backend {b}"),
            (_, s, []) => format!("scenario {s}"),
            (_, s, m) => m.iter().map(|m| format!("{s}/{m}")).collect::<Vec<_>>().join(", "),
        };
        let whose = match (&self.backend, self.scenario.as_str()) {
            (Some(b), s) if s != "*" => format!(" ({b})"),
            _ => String::new(),
        };
        write!(f, "{what}{whose}: {}", self.reason)
    }
}

/// Whether a backend was measured, and if not why.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BackendStatus {
    pub name: String,
    /// "process", "container" or "microvm".
    pub isolation: String,
    pub available: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// How it was run, when that needs saying (crun's hidden cgroup2 mount).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Lower,
    Higher,
}

/// One metric of one backend in one scenario.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Record {
    pub backend: String,
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub better: Better,
    pub description: String,
    pub samples: Vec<f64>,
    pub warmup_dropped: usize,
    pub failures: usize,
    pub summary: Option<Summary>,
    pub context: Context,
}

impl Record {
    /// The key `compare` matches records by.
    pub fn key(&self) -> (String, String, String) {
        (self.backend.clone(), self.scenario.clone(), self.metric.clone())
    }
}

impl Results {
    pub fn record(&self, backend: &str, scenario: &str, metric: &str) -> Option<&Record> {
        self.records.iter().find(|r| r.backend == backend && r.scenario == scenario && r.metric == metric)
    }

    /// Read a results.json, checking its schema.
    pub fn load(path: &Path) -> Result<Results, ResultsError> {
        let bytes = std::fs::read(path).map_err(|source| ResultsError::Read { path: path.to_owned(), source })?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|source| ResultsError::Json { path: path.to_owned(), source })?;
        let schema = value.get("schema").and_then(|s| s.as_str()).unwrap_or("none").to_owned();
        if schema != SCHEMA {
            return Err(ResultsError::Schema { path: path.to_owned(), found: schema });
        }
        serde_json::from_value(value).map_err(|source| ResultsError::Json { path: path.to_owned(), source })
    }
}

impl Results {
    /// One run from parts of it made separately on one machine at one revision, each with
    /// its own scenarios (a long nested run split by scenario, as scripts/nested-bench.sh can
    /// stall on a long one). The per-scenario settings come from the part that ran that
    /// scenario; records never overlap.
    pub fn merge(parts: Vec<Results>) -> Result<Results, MergeError> {
        let mut parts = parts.into_iter();
        let mut out = parts.next().ok_or(MergeError::Empty)?;
        for p in parts {
            let (a, b) = (&out.context, &p.context);
            for (what, x, y) in [
                ("revision", a.rev.clone(), b.rev.clone()),
                ("host", a.host.clone(), b.host.clone()),
                ("kernel", a.kernel.clone(), b.kernel.clone()),
                ("virtualization", a.virtualization.kind.to_string(), b.virtualization.kind.to_string()),
                ("image", out.settings.image.clone(), p.settings.image.clone()),
                (
                    "readiness check",
                    out.settings.ready.clone().unwrap_or_default(),
                    p.settings.ready.clone().unwrap_or_default(),
                ),
            ] {
                if x != y {
                    return Err(MergeError::Differ { what, a: x, b: y });
                }
            }
            if out.settings.lean != p.settings.lean {
                return Err(MergeError::Differ {
                    what: "lean (nested L1) sizes",
                    a: out.settings.lean.to_string(),
                    b: p.settings.lean.to_string(),
                });
            }
            if a.dirty != b.dirty || out.settings.warmup != p.settings.warmup {
                return Err(MergeError::Differ {
                    what: "checkout state or warm-up rounds",
                    a: format!("dirty {}, warm-up {}", a.dirty, out.settings.warmup),
                    b: format!("dirty {}, warm-up {}", b.dirty, p.settings.warmup),
                });
            }
            if let Some(s) = p.settings.scenarios.iter().find(|s| out.settings.scenarios.contains(s)) {
                return Err(MergeError::Overlap(s.clone()));
            }
            let has = |s: &str| p.settings.scenarios.iter().any(|x| x == s);
            let (to, from) = (&mut out.settings, &p.settings);
            if has("start") {
                to.start_runs = from.start_runs;
                to.ready_runs = from.ready_runs;
            }
            if has("cpu") {
                to.cpu_runs = from.cpu_runs;
                to.cpu_target_ms = from.cpu_target_ms;
            }
            if has("memory") {
                to.instances = from.instances;
                to.memory_rounds = from.memory_rounds;
            }
            if has("density") {
                to.max = from.max;
                to.density_passes = from.density_passes;
                to.memory_budget_mib = from.memory_budget_mib;
            }
            to.scenarios.extend(from.scenarios.iter().cloned());
            to.quick &= from.quick;
            for b in p.backends {
                if !out.backends.iter().any(|x| x.name == b.name) {
                    out.backends.push(b);
                }
            }
            out.interrupted |= p.interrupted;
            out.records.extend(p.records);
            out.notes.extend(p.notes);
            for n in p.not_applicable {
                if !out.not_applicable.contains(&n) {
                    out.not_applicable.push(n);
                }
            }
        }
        // Scenarios in the order a full run takes them.
        let order = |s: &String| crate::scenario::Scenario::parse(s).map_or(usize::MAX, |x| x as usize);
        out.settings.scenarios.sort_by_key(order);
        Ok(out)
    }
}

/// Why parts of a run cannot be put together.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("no results to merge")]
    Empty,
    #[error(
        "the parts differ in {what} ({a} vs {b}); only parts of one run on one machine at one revision go together"
    )]
    Differ { what: &'static str, a: String, b: String },
    #[error("two parts both ran the {0} scenario; give each scenario once")]
    Overlap(String),
}

impl ExitCode for MergeError {
    fn exit_code(&self) -> i32 {
        match self {
            MergeError::Empty | MergeError::Differ { .. } | MergeError::Overlap(_) => twinbox_exit::USER_ERROR,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error("cannot read {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a twinbox bench results.json")]
    Json {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has schema {found:?}, expected {SCHEMA:?}")]
    Schema { path: std::path::PathBuf, found: String },
}

impl ExitCode for ResultsError {
    fn exit_code(&self) -> i32 {
        match self {
            // A results file the user named.
            ResultsError::Read { .. } | ResultsError::Json { .. } | ResultsError::Schema { .. } => {
                twinbox_exit::USER_ERROR
            }
        }
    }
}

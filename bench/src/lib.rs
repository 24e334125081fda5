//! The harness behind `twinbox bench`: one image run by every isolation model the host offers
//! (a bare process, twinbox containers, runc, crun; microVMs once they boot), measured side by
//! side, written up as `results.json`, `report.md`, `report.html` and charts.
//!
//! ```text
//! Options ─► run() ─► backend::Backend (prepare → launch → ready → measure → teardown)
//!                       × scenario::{start, memory, density, cpu, net, disk}, interleaved round by round
//!         ─► results::Results { context, backends (with reasons), records (raw samples) }
//!         ─► report::write() (md, html, PNG + SVG charts)     compare::compare(base, new)
//! ```
//!
//! The image is the default `hello` (whose modes are the workloads), or the user's own with
//! `--ready SPEC` ([`ready`]): then each instance runs the image's own entrypoint and cmd and is
//! measured until ready, and what needs `hello` is listed as not applicable
//! ([`scenario::not_applicable`]).

pub mod backend;
pub mod compare;
pub mod host;
pub mod ready;
pub mod report;
pub mod results;
pub mod scenario;
pub mod signal;
pub mod spread;
pub mod stats;

use std::path::{Path, PathBuf};

use backend::{Backend, PreparedImage};
use results::{BackendStatus, Results, Settings};
pub use scenario::Scenario;
use twinbox_exit::ExitCode;

/// The image every backend runs unless told otherwise.
pub const DEFAULT_IMAGE: &str = "hello:latest";

/// What to run; `None` means the default (or the `--quick` one).
#[derive(Debug, Clone)]
pub struct Options {
    pub store_root: PathBuf,
    pub image: String,
    /// The `twinbox` binary measured by the twinbox-container backend.
    pub twinbox: PathBuf,
    pub scenarios: Vec<Scenario>,
    pub backends: Vec<String>,
    pub quick: bool,
    pub runs: Option<usize>,
    pub instances: Option<usize>,
    pub max: Option<usize>,
    /// Density: stop a backend once its instances hold this much host memory (MiB).
    pub memory_budget_mib: Option<u64>,
    /// When an instance of the image is ready: given for an image other than hello, whose
    /// own entrypoint and cmd then run.
    pub ready: Option<ready::ReadySpec>,
}

impl Options {
    pub fn new(store_root: &Path, twinbox: &Path) -> Options {
        Options {
            store_root: store_root.to_owned(),
            image: DEFAULT_IMAGE.into(),
            twinbox: twinbox.to_owned(),
            scenarios: Scenario::ALL.to_vec(),
            backends: backend::ALL.iter().map(|s| s.to_string()).collect(),
            quick: false,
            runs: None,
            instances: None,
            max: None,
            memory_budget_mib: None,
            ready: None,
        }
    }

    /// The numbers a run uses. `emulated`: the run is in the nested L1 (QEMU TCG), where a
    /// microVM takes seconds to boot: there a run is lean (see [`Settings::lean`]).
    pub fn settings(&self, emulated: bool) -> Settings {
        let q = self.quick;
        let lean = emulated;
        // The count for this run: emulated quick, emulated full, quick, full.
        let pick = |lean_quick: usize, lean_full: usize, quick: usize, full: usize| match (lean, q) {
            (true, true) => lean_quick,
            (true, false) => lean_full,
            (false, true) => quick,
            (false, false) => full,
        };
        Settings {
            image: self.image.clone(),
            scenarios: self.scenarios.iter().map(|s| s.as_str().to_owned()).collect(),
            backends: self.backends.clone(),
            quick: q,
            lean,
            // Start rounds are cheap (≈ 0.1 s for all container backends): enough of them that
            // a run's median does not hinge on a few slow samples.
            start_runs: self.runs.unwrap_or(pick(3, 10, 60, 100)).max(1),
            // A service takes longer to be ready than `hello` to start, and each round keeps an
            // instance until it is.
            ready_runs: self.runs.unwrap_or(pick(3, 5, 10, 30)).max(1),
            ready: self.ready.as_ref().map(ToString::to_string),
            cpu_runs: self.runs.map(|r| r.clamp(1, 30)).unwrap_or(pick(2, 4, 15, 20)),
            // In the L1 everything runs from its tmpfs root: no cold disk for a warm-up to hide.
            warmup: pick(0, 1, 2, 5),
            instances: self.instances.unwrap_or(pick(3, 5, 10, 20)).max(1),
            // The kernel's growth over a backend's instances moves by ±15 KiB per instance from
            // one reading to the next: several interleaved readings (a quick run's two give
            // their mean, a full run's five their median).
            memory_rounds: pick(1, 2, 2, 5),
            // Ten microVMs at once in the L1 (3 GiB, 2 emulated CPUs) slowed its clock to a
            // crawl (30 s of L1 time in 8 minutes): five there.
            max: self.max.unwrap_or(pick(3, 5, 10, 50)).max(1),
            // A memory budget asks how many instances fit: one pass, so the curve ends where
            // that pass hit the budget.
            density_passes: if self.memory_budget_mib.is_some() { 1 } else { pick(1, 2, 3, 6) },
            memory_budget_mib: self.memory_budget_mib,
            cpu_target_ms: if q { 50 } else { 200 },
            disk_runs: self.runs.map(|r| r.clamp(1, 10)).unwrap_or(pick(1, 2, 3, 5)),
            // A microVM's root is a tmpfs of half its 128 MiB: the file must fit there, and in
            // the guest's page cache for the read figures to mean the same as elsewhere.
            disk_mib: if lean { 16 } else { 32 },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("image {image} is not in the store at {root}; build the default images with scripts/default-images.sh (TWINBOX_ROOT={root})")]
    NoImage { image: String, root: PathBuf },
    #[error("cannot open the image store")]
    Store(#[source] twinbox_image::StoreError),
    #[error("unknown backend {0:?}; backends: {list}", list = backend::ALL.join(", "))]
    UnknownBackend(String),
    #[error("cannot flatten {image} for the bundles")]
    Flatten {
        image: String,
        #[source]
        source: twinbox_image::StoreError,
    },
    #[error(
        "image {image} is not the hello image (it runs {command:?}, not hello's modes); give --ready \
         http://:PORT/PATH, tcp:PORT or log:TEXT to say when an instance of it is ready, and it is measured \
         running its own command"
    )]
    NeedsReady { image: String, command: Vec<String> },
    #[error("cannot tell what image {image} runs")]
    Launch {
        image: String,
        #[source]
        source: twinbox_image::launch::LaunchError,
    },
    #[error("cannot make a scratch directory")]
    Scratch(#[source] std::io::Error),
}

impl ExitCode for BenchError {
    fn exit_code(&self) -> i32 {
        match self {
            BenchError::NoImage { .. } | BenchError::UnknownBackend(_) | BenchError::NeedsReady { .. } => {
                twinbox_exit::USER_ERROR
            }
            BenchError::Launch { source, .. } => source.exit_code(),
            BenchError::Store(e) | BenchError::Flatten { source: e, .. } => e.exit_code(),
            BenchError::Scratch(_) => twinbox_exit::INTERNAL,
        }
    }
}

/// Measure. Backends that cannot run are listed with their reason; scenarios stop early
/// (results marked `interrupted`) after [`signal::interrupt`], with every instance torn down.
pub fn run(opts: &Options) -> Result<Results, BenchError> {
    let store = twinbox_image::Store::open(&opts.store_root).map_err(BenchError::Store)?;
    let image = match store.resolve(&opts.image) {
        Ok(i) => i,
        Err(twinbox_image::StoreError::NoSuchImage(_)) => {
            return Err(BenchError::NoImage { image: opts.image.clone(), root: opts.store_root.clone() })
        }
        Err(e) => return Err(BenchError::Store(e)),
    };
    let cfg = image.config.config().clone().unwrap_or_default();
    let entrypoint = cfg.entrypoint().clone().unwrap_or_default();
    if opts.ready.is_none() && !is_hello(&entrypoint) {
        let mut command = entrypoint;
        command.extend(cfg.cmd().clone().unwrap_or_default());
        return Err(BenchError::NeedsReady { image: opts.image.clone(), command });
    }
    let mut all: Vec<Box<dyn Backend>> = Vec::new();
    for name in &opts.backends {
        all.push(backend::by_name(name, &opts.twinbox).ok_or_else(|| BenchError::UnknownBackend(name.clone()))?);
    }
    // Where twinbox-container makes and removes each container's files (overlay upper and work
    // directories, bundle); the store's root before it has any.
    let containers = opts.store_root.join("containers");
    let store_fs = host::store_fs(if containers.is_dir() { &containers } else { &opts.store_root });
    let context = host::Context { store_fs, ..host::Context::detect(opts.twinbox.parent()) };
    tracing::info!(rev = %context.rev, host = %context.host, virt = %context.virtualization.kind, "bench starting");
    let settings = opts.settings(context.virtualization.kind == host::VirtKind::NestedTcg);

    let scratch = tempfile::Builder::new().prefix("twinbox-bench-").tempdir().map_err(BenchError::Scratch)?;
    let rootfs = scratch.path().join("rootfs");
    twinbox_image::rootfs::flatten(&store, &image, &rootfs)
        .map_err(|source| BenchError::Flatten { image: opts.image.clone(), source })?;
    let foreign = match &opts.ready {
        Some(ready) => {
            let process = twinbox_image::launch::resolve(
                &opts.image,
                &image.config,
                std::slice::from_ref(&rootfs),
                &Default::default(),
                "bench",
            )
            .map_err(|source| BenchError::Launch { image: opts.image.clone(), source })?;
            Some(backend::Foreign { ready: ready.clone(), process })
        }
        None => None,
    };
    let mut not_applicable = foreign.as_ref().map(|f| scenario::not_applicable(&f.ready)).unwrap_or_default();
    let prepared = PreparedImage {
        reference: opts.image.clone(),
        store_root: opts.store_root.clone(),
        rootfs,
        entrypoint,
        work: scratch.path().to_owned(),
        foreign,
    };

    let mut statuses = Vec::new();
    let mut ready: Vec<Box<dyn Backend>> = Vec::new();
    let mut notes = Vec::new();
    for mut b in all {
        let mut status = BackendStatus {
            name: b.name().to_owned(),
            isolation: b.isolation().as_str().to_owned(),
            available: false,
            reason: None,
            version: None,
            note: b.note(),
        };
        match (b.available(), b.not_applicable(&prepared)) {
            (Err(u), _) => status.reason = Some(u.reason),
            (Ok(()), Some(why)) => {
                status.reason = Some(format!("not applicable to {}: {why}", opts.image));
                not_applicable.push(results::NotApplicable {
                    scenario: "*".into(),
                    metrics: Vec::new(),
                    backend: Some(b.name().to_owned()),
                    reason: why,
                });
            }
            (Ok(()), None) => match b.prepare(&prepared) {
                Ok(()) => {
                    status.available = true;
                    status.version = b.version();
                    ready.push(b);
                }
                Err(e) => status.reason = Some(format!("prepare failed: {}", scenario::error_chain(&e))),
            },
        }
        statuses.push(status);
    }

    let tag = format!("tbb{}", std::process::id());
    let mut run = scenario::Run {
        backends: &ready,
        settings: &settings,
        context: &context,
        image: &prepared,
        records: Vec::new(),
        notes: Vec::new(),
        tag,
    };
    if !ready.is_empty() {
        for s in &opts.scenarios {
            if signal::interrupted() {
                break;
            }
            tracing::info!(scenario = s.as_str(), "scenario");
            if not_applicable.iter().any(|n| n.scenario == s.as_str() && n.metrics.is_empty()) {
                continue;
            }
            match s {
                Scenario::Start => scenario::start::run(&mut run),
                Scenario::Memory => scenario::memory::run(&mut run),
                Scenario::Density => scenario::density::run(&mut run),
                Scenario::Cpu => scenario::cpu::run(&mut run),
                Scenario::Net => scenario::net::run(&mut run),
                Scenario::Disk => scenario::disk::run(&mut run),
                Scenario::Isolation => scenario::isolation::run(&mut run),
            }
        }
    }
    let records = std::mem::take(&mut run.records);
    notes.append(&mut run.notes);
    drop(run);
    Ok(Results {
        schema: results::SCHEMA.into(),
        context,
        settings,
        interrupted: signal::interrupted(),
        backends: statuses,
        records,
        notes,
        not_applicable,
        nested: None,
    })
}

/// Whether an image whose entrypoint is `entrypoint` is a hello image, whose modes are the
/// workloads (`/hello`, or `hello` elsewhere).
fn is_hello(entrypoint: &[String]) -> bool {
    entrypoint.len() == 1 && Path::new(&entrypoint[0]).file_name().is_some_and(|n| n == "hello")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(BenchError::UnknownBackend("x".into()).exit_code(), 1);
        assert_eq!(BenchError::Store(twinbox_image::StoreError::NoSuchImage("x:1".into())).exit_code(), 1);
        assert_eq!(BenchError::Scratch(std::io::Error::other("disk full")).exit_code(), 125);
        let e = BenchError::NeedsReady { image: "web:latest".into(), command: vec!["httpd".into(), "-f".into()] };
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().contains("give --ready http://:PORT/PATH, tcp:PORT or log:TEXT"), "{e}");
    }

    #[test]
    fn a_run_in_the_nested_l1_is_lean_but_keeps_what_was_asked() {
        let mut o = Options::new(Path::new("/store"), Path::new("/twinbox"));
        o.quick = true;
        let host = o.settings(false);
        let l1 = o.settings(true);
        assert!(!host.lean && l1.lean);
        assert!(l1.start_runs < host.start_runs && l1.instances < host.instances && l1.max < host.max);
        assert_eq!((l1.warmup, l1.density_passes, l1.memory_rounds), (0, 1, 1));
        o.quick = false;
        let full = o.settings(true);
        assert!(full.start_runs > l1.start_runs && full.start_runs < o.settings(false).start_runs);
        // What the user set goes to the L1 as given.
        o.quick = true;
        (o.runs, o.instances, o.max) = (Some(7), Some(5), Some(9));
        let l1 = o.settings(true);
        assert_eq!((l1.start_runs, l1.cpu_runs, l1.instances, l1.max), (7, 7, 5, 9));
    }

    #[test]
    fn hello_images_by_their_entrypoint() {
        assert!(is_hello(&["/hello".into()]));
        assert!(is_hello(&["/usr/local/bin/hello".into()]));
        assert!(!is_hello(&[]), "busybox: a CMD and no entrypoint");
        assert!(!is_hello(&["/docker-entrypoint.sh".into()]));
        assert!(!is_hello(&["/hello".into(), "serve".into()]), "its modes are given as the workload's arguments");
    }
}

//! Scenarios: what is measured, over every available backend, interleaved round by round (the
//! order rotates each round, so no backend always runs right after the same other one).
//!
//! | scenario | metrics |
//! |---|---|
//! | [`start`] | `time_to_workload`, `end_to_end`, `launch_cpu` (ms); the user's own image: `time_to_ready` (ms) |
//! | [`memory`] | `pss_per_instance`, `kernel_per_instance`, `total_per_instance` (KiB), `processes_per_instance` |
//! | [`density`] | `launch_latency`, `launch_cpu` (ms) and `host_memory` (MiB) vs N, `launch_rate` (instances/s), `teardown` (ms) |
//! | [`cpu`] | `compute`, `syscalls` (ms of work), `compute_ratio`, `syscalls_ratio` (vs the bare process) |
//! | [`net`] | `time_to_ready` (ms), `latency_keepalive`, `latency_new_connection` (µs), `throughput` (MB/s) through a published port |
//! | [`disk`] | throughput, IOPS and p99 of sequential and random I/O in the root and in a volume |
//! | [`isolation`] | `syscalls`, `capabilities`, `device_nodes`, `proc_sys_files`, `sys_class_entries` reachable on the host; `host_kernel_shared`; a VM's `emulated_device_types` |
//!
//! The user's own image (`--ready SPEC`) is measured where that means something without
//! `hello`: time to ready, memory per ready instance, density, and request latency when SPEC is
//! HTTP; the rest is listed as [`not_applicable`] with the reason. Its instances are launched
//! and waited for by [`launch_ready`], and their processes found through the backend's own id
//! of them ([`crate::host::instance_trees`]).

pub mod cpu;
pub mod density;
pub mod disk;
pub mod isolation;
pub mod memory;
pub mod net;
pub mod net_client;
pub mod start;

use std::fs::File;
use std::io::{IsTerminal, Read};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::{kill_run, run_failed, Backend, BackendError, Instance, Publish, Watchdog, Workload};
use crate::host::Context;
use crate::ready::{ReadySpec, WaitEnd};
use crate::results::{Better, NotApplicable, Record, Settings};
use crate::stats::Summary;

/// A scenario's name as `--scenario` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Start,
    Memory,
    Density,
    Cpu,
    Net,
    Disk,
    Isolation,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::Start,
        Scenario::Memory,
        Scenario::Density,
        Scenario::Cpu,
        Scenario::Net,
        Scenario::Disk,
        Scenario::Isolation,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Start => "start",
            Scenario::Memory => "memory",
            Scenario::Density => "density",
            Scenario::Cpu => "cpu",
            Scenario::Net => "net",
            Scenario::Disk => "disk",
            Scenario::Isolation => "isolation",
        }
    }

    pub fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// What every scenario gets: the prepared backends and where to put what it finds.
pub struct Run<'a> {
    pub backends: &'a [Box<dyn Backend>],
    pub settings: &'a Settings,
    pub context: &'a Context,
    pub image: &'a crate::backend::PreparedImage,
    pub records: Vec<Record>,
    pub notes: Vec<String>,
    /// Prefix of instance ids, unique to this run.
    pub tag: String,
}

impl Run<'_> {
    /// Add a record; its summary is computed from the samples.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        backend: &str,
        scenario: Scenario,
        metric: &str,
        unit: &str,
        better: Better,
        description: &str,
        samples: Vec<f64>,
        warmup_dropped: usize,
        failures: usize,
    ) {
        self.records.push(Record {
            backend: backend.to_owned(),
            scenario: scenario.as_str().to_owned(),
            metric: metric.to_owned(),
            unit: unit.to_owned(),
            better,
            description: description.to_owned(),
            summary: Summary::of(&samples),
            samples,
            warmup_dropped,
            failures,
            context: self.context.clone(),
        });
    }

    pub fn note(&mut self, text: String) {
        tracing::warn!("{text}");
        self.notes.push(text);
    }

    /// A progress bar on stderr, hidden when stderr is not a terminal.
    pub fn progress(&self, len: u64, what: &str) -> ProgressBar {
        let bar = if std::io::stderr().is_terminal() { ProgressBar::new(len) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg} · about {eta} left")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(what.to_owned());
        bar
    }
}

/// Timings of one foreground run, stamped by the harness.
#[derive(Debug, Clone)]
pub struct RunTiming {
    /// Launch → first byte of the workload's stdout.
    pub first_byte: Option<Duration>,
    /// Launch → the launcher's exit (instance gone).
    pub exit: Duration,
    /// User + system CPU time of the launcher and everything it waited for.
    pub cpu: Duration,
    /// Everything the run wrote to stdout (for a VM: its console, kernel lines included).
    pub stdout: String,
}

/// How long a foreground run may take before it counts as hung (a guest that never exits, a
/// launcher waiting on something that never comes): it is then killed, its leftovers removed,
/// and the run reported as failed, so that one stuck instance cannot stall a whole bench.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Run `workload` once in the foreground on `backend`: spawn, stamp the first byte on the
/// workload's stdout and the exit. A run still going after [`RUN_TIMEOUT`] is killed (with
/// its process group, when it has its own) and fails.
pub fn run_once(
    backend: &dyn Backend,
    workload: &Workload,
    id: &str,
    scratch: &Path,
) -> Result<RunTiming, BackendError> {
    run_once_within(backend, workload, id, scratch, RUN_TIMEOUT)
}

fn run_once_within(
    backend: &dyn Backend,
    workload: &Workload,
    id: &str,
    scratch: &Path,
    timeout: Duration,
) -> Result<RunTiming, BackendError> {
    let spawn_err = |source| BackendError::Spawn { what: backend.name().to_owned(), source };
    let err_path = scratch.join("stderr.log");
    let err_file = File::create(&err_path).map_err(|source| BackendError::Write { path: err_path.clone(), source })?;
    let mut cmd = backend.run_command(workload, id)?;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(err_file);
    let cpu0 = children_cpu();
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let deadline = t0 + timeout;
    let mut out = child.stdout.take().expect("stdout is piped");
    // Read until end of file or the deadline. poll() returns as soon as the first byte is
    // there, so its stamp carries no polling delay.
    let mut stdout_bytes = Vec::new();
    let mut first_byte = None;
    let mut hung = false;
    let mut chunk = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [nix::poll::PollFd::new(out.as_fd(), nix::poll::PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
            Ok(0) if left.is_zero() => {
                hung = true;
                break;
            }
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => break,
        }
        match out.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                first_byte.get_or_insert_with(|| t0.elapsed());
                stdout_bytes.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    drop(out);
    // Output ended; the launcher may still be tearing down (or hang there). One that hung
    // before its output ended is killed now.
    let watchdog = (!hung).then(|| Watchdog::start(child.id(), deadline.saturating_duration_since(Instant::now())));
    let mut stall = hung.then(|| kill_run(child.id()));
    let status = child.wait().map_err(spawn_err)?;
    let exit = t0.elapsed();
    let cpu = children_cpu().saturating_sub(cpu0);
    let stdout = String::from_utf8_lossy(&stdout_bytes).into_owned();
    if let Some(w) = watchdog {
        stall = stall.or(w.stop());
    }
    if stall.is_some() || !status.success() {
        backend.cleanup_run(id);
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        let what = format!("{} {}", backend.name(), workload.args().join(" "));
        return Err(run_failed(what, status, stall, timeout, &stderr));
    }
    Ok(RunTiming { first_byte, exit, cpu, stdout })
}

/// What does not apply to the user's own image, ready by `spec`, and why: whatever needs the
/// hello image's modes, whether or not this run asked for it (a reader of the report should
/// know what an image of theirs cannot be measured by).
pub fn not_applicable(spec: &ReadySpec) -> Vec<NotApplicable> {
    let na = |scenario: &str, metrics: &[&str], reason: &str| NotApplicable {
        scenario: scenario.to_owned(),
        metrics: metrics.iter().map(|m| m.to_string()).collect(),
        backend: None,
        reason: reason.to_owned(),
    };
    let mut v = vec![
        na(
            "start",
            &["time_to_workload", "end_to_end", "launch_cpu"],
            "they time hello's `spin 0` (its first write marks the workload's start) and `true` (which exits at \
             once); a service does neither: its time to ready is measured instead",
        ),
        na("cpu", &[], "it times the hello image's own loops (`hello spin N timed`, `hello syscalls N timed`)"),
        na("disk", &[], "it runs the hello image's file I/O workload (`hello disk DIR MIB`) and reads its figures"),
        na("isolation", &[], "it runs the hello image's probe (`hello isolation`) inside each instance"),
    ];
    v.push(match spec {
        ReadySpec::Http { .. } => na(
            "net",
            &["throughput", "exec_latency", "start_without_network", "start_published", "network_start_cost"],
            "throughput asks `hello serve` for `GET /bytes/N`, exec_latency runs `/hello exit 0` in the instance, \
             and the start costs run `hello true` in the foreground",
        ),
        _ => na("net", &[], "it sends HTTP requests to the instance's port: give --ready http://:PORT/PATH"),
    });
    v
}

/// A free port on 127.0.0.1 now (bound and let go; the launch binds it right after).
pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// How long an instance of the user's own image may take from launch to ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// An instance of the user's own image, ready.
pub struct ReadyInstance {
    pub instance: Instance,
    /// Launch → ready.
    pub took: Duration,
    /// Where its port is published, when `--ready` names one.
    pub addr: Option<std::net::SocketAddr>,
}

/// Launches instance `id` of the image's own process on `b` (the port `spec` names published
/// on a free port of 127.0.0.1, as the net scenario publishes a server; with `log:`, loopback
/// only) and waits until `spec` holds, at most [`READY_TIMEOUT`] from the launch. On failure
/// the instance is torn down and the error says what was waited for and what the instance
/// wrote last.
pub fn launch_ready(b: &dyn Backend, spec: &ReadySpec, id: &str) -> Result<ReadyInstance, String> {
    let publish = match spec.port() {
        Some(port) => Some(Publish { host: free_port().map_err(|e| format!("no free port: {e}"))?, port }),
        None => None,
    };
    let addr = publish.map(|p| std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, p.host)));
    let t0 = Instant::now();
    let mut inst = match b.launch_image(id, publish) {
        Ok(Some(i)) => i,
        Ok(None) => return Err("cannot run the image's own command here".into()),
        Err(e) => return Err(error_chain(&e)),
    };
    let output = match spec {
        ReadySpec::Log { .. } => b.output_path(&inst),
        _ => None,
    };
    let waited = if matches!(spec, ReadySpec::Log { .. }) && output.is_none() {
        Err(None)
    } else {
        let left = READY_TIMEOUT.saturating_sub(t0.elapsed());
        crate::ready::wait(spec, addr, output.as_deref(), left, || b.instance_pids(&inst).is_empty()).map_err(Some)
    };
    let took = t0.elapsed();
    let end = match waited {
        Ok(_) => return Ok(ReadyInstance { instance: inst, took, addr }),
        Err(end) => end,
    };
    let said = b
        .output_path(&inst)
        .map(|p| crate::ready::tail(&p, 8))
        .filter(|t| !t.is_empty())
        .map_or_else(|| "it wrote nothing".to_owned(), |t| format!("its last output: {t}"));
    let _ = b.teardown(&mut inst);
    Err(match end {
        None => format!("instance {id}: the backend keeps no output to look for the text in"),
        Some(WaitEnd::Timeout) => format!(
            "instance {id} was not ready within {} s of its launch (waited for {}); {said}",
            READY_TIMEOUT.as_secs(),
            spec.describe(addr)
        ),
        Some(WaitEnd::Gone) => {
            format!(
                "instance {id} ended {:.1} s after its launch, before {}; {said}",
                took.as_secs_f64(),
                spec.describe(addr)
            )
        }
    })
}

/// CPU time of all waited-for children so far.
pub(super) fn children_cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let Ok(u) = getrusage(UsageWho::RUSAGE_CHILDREN) else { return Duration::ZERO };
    let tv = |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    tv(u.user_time()) + tv(u.system_time())
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Instances one backend started; torn down on drop, whatever happened in between.
pub struct Fleet<'b> {
    backend: &'b dyn Backend,
    pub instances: Vec<Instance>,
}

impl<'b> Fleet<'b> {
    pub fn new(backend: &'b dyn Backend) -> Self {
        Fleet { backend, instances: Vec::new() }
    }

    /// Tear everything down, one instance after the other; the time each took and the
    /// failures' messages.
    pub fn teardown(&mut self) -> (Vec<Duration>, Vec<String>) {
        let mut times = Vec::new();
        let mut errors = Vec::new();
        for mut inst in self.instances.drain(..) {
            let t = Instant::now();
            match self.backend.teardown(&mut inst) {
                Ok(()) => times.push(t.elapsed()),
                Err(e) => errors.push(format!("{} {}: {}", self.backend.name(), inst.id, error_chain(&e))),
            }
        }
        (times, errors)
    }
}

impl Drop for Fleet<'_> {
    fn drop(&mut self) {
        let (_, errors) = self.teardown();
        for e in errors {
            tracing::warn!("teardown: {e}");
        }
    }
}

/// An error with its sources, on one line.
pub use twinbox_runtime::container::error_chain;

/// Processes whose arguments include `marker` (instances left behind).
pub fn leftovers(markers: &[String]) -> usize {
    crate::host::scan().iter().filter(|p| p.args.iter().any(|a| markers.contains(a))).count()
}

/// A base for `hello sleep` markers no other process on the host has in its arguments.
pub fn marker_base() -> u64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    // Over 30 years of sleep, with room for 10 000 instances per base.
    1_000_000_000 + u64::from(nanos % 100_000) * 10_000 + u64::from(std::process::id() % 10) * 1_000_000_000
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::Duration;

    use super::run_once_within;
    use crate::backend::{
        own_process_group, Backend, BackendError, Instance, Isolation, PreparedImage, Unavailable, Workload,
    };

    /// A backend whose every run hangs: a shell in its own process group that prints a line and
    /// waits on a child that never ends.
    struct Hangs(std::path::PathBuf);

    impl Backend for Hangs {
        fn name(&self) -> &'static str {
            "hangs"
        }
        fn isolation(&self) -> Isolation {
            Isolation::Process
        }
        fn available(&self) -> Result<(), Unavailable> {
            Ok(())
        }
        fn prepare(&mut self, _: &PreparedImage) -> Result<(), BackendError> {
            Ok(())
        }
        fn run_command(&self, _: &Workload, id: &str) -> Result<Command, BackendError> {
            let mut cmd = Command::new("sh");
            // The inner shell, a child of the outer one, also carries the id: killing only
            // the outer one would leave it behind.
            cmd.args(["-c", "echo started; sh -c 'sleep 1000; : \"$0\"' \"$0\"", id]);
            own_process_group(&mut cmd);
            Ok(cmd)
        }
        fn cleanup_run(&self, id: &str) {
            std::fs::write(self.0.join("cleaned"), id).unwrap();
        }
        fn launch(&self, _: &Workload, _: &str) -> Result<Instance, BackendError> {
            unreachable!("not used here")
        }
        fn teardown(&self, _: &mut Instance) -> Result<(), BackendError> {
            Ok(())
        }
    }

    #[test]
    fn a_hung_run_is_killed_cleaned_up_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let b = Hangs(dir.path().to_path_buf());
        let id = format!("hung-run-{}", std::process::id());
        let t = std::time::Instant::now();
        let e = run_once_within(&b, &Workload::True, &id, dir.path(), Duration::from_millis(500)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(30));
        let msg = e.to_string();
        assert!(msg.contains("without exiting"), "{msg}");
        // Where the run stood when it was killed: the group's processes, the inner sleep too.
        let stood = msg.split_once("where it stood:\n").map(|(_, r)| r).unwrap_or_else(|| panic!("{msg}"));
        assert!(stood.lines().any(|l| l.contains(" sleep state S wchan ")), "{msg}");
        assert!(stood.lines().filter(|l| l.contains(" sh state ")).count() >= 2, "{msg}");
        assert_eq!(std::fs::read_to_string(dir.path().join("cleaned")).unwrap(), id);
        // The whole group went: no `sleep 1000 <id>` is left.
        std::thread::sleep(Duration::from_millis(100));
        assert!(!crate::host::scan().iter().any(|p| p.args.iter().any(|a| a == &id)), "the hung process is gone");
    }
}

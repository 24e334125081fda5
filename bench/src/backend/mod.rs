//! Backends: one way each of running the image's workload. Every backend has the same
//! lifecycle — prepare the image, launch an instance, wait until it is ready, measure, tear it
//! down — and says whether it can run here at all ([`Backend::available`]), with a reason a
//! reader can act on when it cannot.
//!
//! | backend | what runs `hello …` |
//! |---|---|
//! | `process` | the workload binary straight from the flattened image: no isolation, the floor |
//! | `twinbox-container` | `twinbox run --rm hello:latest …`, the CLI being measured |
//! | `runc`, `crun` | an OCI bundle (the flattened image + a default config.json) |
//! | `twinbox-microvm` | `twinbox run --isolation microvm hello:latest …` |
//! | `twinbox-microvm-snapshot` | the same with `--snapshot`: restored from the image's warm template |
//! | `qemu-microvm` | QEMU `-M microvm` with the same kernel, agent initramfs and root disk |
//! | `firecracker` | not yet: reported with the reason |
//!
//! The user's own image (`--image IMAGE --ready SPEC`) runs its own entrypoint and cmd
//! ([`Workload::Own`], [`Backend::launch_image`]) in every backend but the bare process, which
//! can only run the hello image's static binary ([`Backend::not_applicable`]).

pub mod cni;
mod microvm;
mod oci;
mod process;
mod twinbox;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use microvm::{Firecracker, QemuMicrovm, TwinboxMicrovm};
pub use oci::{Oci, OciRuntime};
pub use process::Process;
pub use twinbox::TwinboxContainer;

/// Names of every backend, in report order.
pub const ALL: [&str; 8] = [
    "process",
    "twinbox-container",
    "runc",
    "crun",
    "twinbox-microvm",
    "twinbox-microvm-snapshot",
    "qemu-microvm",
    "firecracker",
];

/// Why a backend cannot run on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    pub reason: String,
}

impl Unavailable {
    pub fn new(reason: impl Into<String>) -> Self {
        Unavailable { reason: reason.into() }
    }
}

/// The isolation model a backend stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    Process,
    Container,
    MicroVm,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Process => "process",
            Isolation::Container => "container",
            Isolation::MicroVm => "microvm",
        }
    }
}

/// What the instance runs: a mode of the default image's `hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// `hello true`: exit 0 at once.
    True,
    /// `hello spin 0`: its first action is to print one line, the time-to-workload marker.
    Marker,
    /// `hello sleep SECS`: idle. The number doubles as the instance's marker in /proc.
    Sleep(u64),
    /// `hello spin N timed`: N rounds of integer work, then `loop_ns=T`, the loop's own time.
    Spin(u64),
    /// `hello syscalls N timed`: N getppid() calls, then `loop_ns=T`.
    Syscalls(u64),
    /// `hello serve PORT`: an HTTP server.
    Serve(u16),
    /// `hello disk DIR MIB`: file I/O in the instance's writable root (`/`), or with `volume`
    /// in a volume the backend mounts at [`DISK_VOLUME_PATH`].
    Disk { volume: bool, mib: u32 },
    /// The image's own entrypoint and cmd, as a run that gives no command starts it (the
    /// user's own image: [`PreparedImage::foreign`]).
    Own,
    /// `hello isolation`: one JSON line of what it reaches of the kernel it runs on.
    Isolation,
}

/// Where a backend mounts its volume for the `disk` scenario.
pub const DISK_VOLUME_PATH: &str = "/vol";
/// The named volume the twinbox backends use for it (a local one for containers, a disk one
/// for microVMs), made when first used and removed by [`Backend::disk_cleanup`].
pub const DISK_VOLUME: &str = "twinbox-bench";
/// Its size for microVMs (a sparse file).
pub const DISK_VOLUME_SIZE: u64 = 1 << 30;

impl Workload {
    pub fn args(&self) -> Vec<String> {
        match self {
            Workload::True => vec!["true".into()],
            Workload::Marker => vec!["spin".into(), "0".into()],
            Workload::Sleep(n) => vec!["sleep".into(), n.to_string()],
            Workload::Spin(n) => vec!["spin".into(), n.to_string(), "timed".into()],
            Workload::Syscalls(n) => vec!["syscalls".into(), n.to_string(), "timed".into()],
            Workload::Serve(port) => vec!["serve".into(), port.to_string()],
            Workload::Disk { volume, mib } => {
                vec!["disk".into(), if *volume { DISK_VOLUME_PATH } else { "/" }.into(), mib.to_string()]
            }
            Workload::Own => Vec::new(),
            Workload::Isolation => vec!["isolation".into()],
        }
    }
}

/// The user's own image: how it starts and when an instance of it is ready.
#[derive(Debug, Clone)]
pub struct Foreign {
    pub ready: crate::ready::ReadySpec,
    /// The process a run of the image without a command starts (entrypoint + cmd, env,
    /// working directory, user), for the bundles of runc and crun.
    pub process: twinbox_image::launch::Launch,
}

/// The image, ready for every backend: flattened once into a scratch directory.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// As the user named it (`hello:latest`).
    pub reference: String,
    /// The image store it came from (what `twinbox --root` gets).
    pub store_root: PathBuf,
    /// The flattened root filesystem.
    pub rootfs: PathBuf,
    /// The image's entrypoint (`["/hello"]`; for a foreign image as it is, maybe empty).
    pub entrypoint: Vec<String>,
    /// Scratch space for bundles and runtime state.
    pub work: PathBuf,
    /// Set for an image other than hello (`--ready`): its own process and readiness.
    pub foreign: Option<Foreign>,
}

impl PreparedImage {
    /// The entrypoint as a host path inside the flattened rootfs.
    pub fn workload_on_host(&self) -> PathBuf {
        self.rootfs.join(self.entrypoint[0].trim_start_matches('/'))
    }

    /// Entrypoint followed by the workload's arguments; for [`Workload::Own`] the image's own
    /// argv.
    pub fn argv(&self, w: &Workload) -> Vec<String> {
        if let (Workload::Own, Some(f)) = (w, &self.foreign) {
            return f.process.args.clone();
        }
        let mut v = self.entrypoint.clone();
        v.extend(w.args());
        v
    }
}

/// A port published for an instance: `host` on 127.0.0.1 to the instance's `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish {
    pub host: u16,
    pub port: u16,
}

/// A running instance a backend started; give it back to [`Backend::teardown`].
#[derive(Debug)]
pub struct Instance {
    pub id: String,
    /// The workload process, when the backend owns it directly (the bare process).
    pub child: Option<Child>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot start {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed ({status}): {stderr}")]
    Failed { what: String, status: String, stderr: String },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One way of running the workload.
pub trait Backend {
    fn name(&self) -> &'static str;
    fn isolation(&self) -> Isolation;
    /// Whether it can run on this host; the reason when not.
    fn available(&self) -> Result<(), Unavailable>;
    /// The tool's version, for the report.
    fn version(&self) -> Option<String> {
        None
    }
    /// How it is run, when that needs saying in the report.
    fn note(&self) -> Option<String> {
        None
    }
    /// Get ready to run instances of `image` (bundles, state directories).
    fn prepare(&mut self, image: &PreparedImage) -> Result<(), BackendError>;
    /// A command that runs `workload` in a fresh instance in the foreground and removes the
    /// instance when it exits. The workload's stdout is the command's stdout.
    fn run_command(&self, workload: &Workload, id: &str) -> Result<Command, BackendError>;
    /// After a foreground run that did not end normally: remove whatever it left.
    fn cleanup_run(&self, _id: &str) {}
    /// Start `workload` in a new instance in the background; returns when the launcher says
    /// it is started.
    fn launch(&self, workload: &Workload, id: &str) -> Result<Instance, BackendError>;
    /// Stop and remove an instance. Idempotent.
    fn teardown(&self, instance: &mut Instance) -> Result<(), BackendError>;
    /// Whether it can run a server for the net scenario ([`launch_server`](Self::launch_server)).
    fn serves(&self) -> bool {
        false
    }
    /// `hello serve` in a new instance, reachable on 127.0.0.1:`host_port` the way this
    /// backend's users publish a port; None when it cannot have a network here.
    fn launch_server(&self, _id: &str, _host_port: u16) -> Result<Option<Instance>, BackendError> {
        Ok(None)
    }
    /// How the net scenario reaches its server, for the report.
    fn serve_note(&self) -> String {
        String::new()
    }
    /// A foreground `hello true` in a new instance with its network attached and
    /// 127.0.0.1:`host_port` published, timed from launch until the instance and its network
    /// are removed; None when the backend has no network to attach.
    fn run_published(&self, _id: &str, _host_port: u16) -> Result<Option<Duration>, BackendError> {
        Ok(None)
    }
    /// `/hello exit 0` run in the running server `id` (of [`launch_server`](Self::launch_server))
    /// the way this backend's users run a process in an instance; None when it has no way.
    fn exec_command(&self, _id: &str) -> Option<Command> {
        None
    }
    /// After the net scenario: remove what its instances shared (a network the next instance
    /// would have reused).
    fn net_cleanup(&self) {}

    /// Where the `disk` scenario's files lie for this backend: the writable root, then the
    /// volume.
    fn disk_note(&self) -> String {
        String::new()
    }

    /// Removes what the `disk` scenario's volume runs made (a named volume, a directory).
    fn disk_cleanup(&self) {}

    /// Why this backend cannot run `image` at all, when it cannot (then it is listed as not
    /// applicable with this reason, and not measured).
    fn not_applicable(&self, _image: &PreparedImage) -> Option<String> {
        None
    }

    /// The image's own process ([`Workload::Own`]) in a new detached instance, started the way
    /// [`launch_server`](Self::launch_server) starts a server: with `publish`, its port
    /// published on 127.0.0.1 as the net scenario publishes one; without, loopback only. Its
    /// stdout and stderr go where [`output_path`](Self::output_path) finds them. Returns once
    /// the launcher says it is started; None when the backend cannot run it.
    fn launch_image(&self, _id: &str, _publish: Option<Publish>) -> Result<Option<Instance>, BackendError> {
        Ok(None)
    }

    /// The file an instance of [`launch_image`](Self::launch_image) writes its output to.
    fn output_path(&self, _instance: &Instance) -> Option<PathBuf> {
        None
    }

    /// The host processes an instance stands on, found through the backend's own id of it:
    /// a container's init (and a process that serves its published port), a microVM's VMM.
    /// [`crate::host::instance_trees`] adds their descendants. Empty once the instance is gone.
    /// For the `isolation` scenario: a command printing what this backend's instances reach of
    /// the host kernel, when that is not the workload's own view (a VM's workload sees its
    /// guest kernel; what reaches the host is its VMM). `None`: run `hello isolation` in an
    /// instance.
    fn host_surface_probe(&self) -> Option<Result<Command, BackendError>> {
        None
    }

    /// The device models a VM backend's guest sees (none for the others).
    fn emulated_devices(&self) -> &'static [&'static str] {
        &[]
    }

    fn instance_pids(&self, instance: &Instance) -> Vec<u32> {
        instance.child.as_ref().map(|c| c.id()).filter(|&p| crate::host::running(p)).into_iter().collect()
    }
}

/// Runs `cmd` to completion with no stdio; how long it took. A failure is an error, with the
/// command's stderr.
pub(crate) fn timed(cmd: Command, what: &str) -> Result<Duration, BackendError> {
    let t0 = Instant::now();
    run_quiet(cmd, what)?;
    Ok(t0.elapsed())
}

/// The port `hello serve` listens on inside an instance.
pub const SERVER_PORT: u16 = 8080;

/// Make the backend named `name` (one of [`ALL`]); `twinbox` is the binary measured for
/// `twinbox-container` and `twinbox-microvm`.
pub fn by_name(name: &str, twinbox: &Path) -> Option<Box<dyn Backend>> {
    Some(match name {
        "process" => Box::new(Process::default()),
        "twinbox-container" => Box::new(TwinboxContainer::new(twinbox)),
        "runc" => Box::new(Oci::new(OciRuntime::Runc)),
        "crun" => Box::new(Oci::new(OciRuntime::Crun)),
        "twinbox-microvm" => Box::new(TwinboxMicrovm::new(twinbox)),
        "twinbox-microvm-snapshot" => Box::new(TwinboxMicrovm::snapshot(twinbox)),
        "qemu-microvm" => Box::new(QemuMicrovm::default()),
        "firecracker" => Box::new(Firecracker),
        _ => return None,
    })
}

/// Run a control command (launch -d, teardown, delete) to completion; its stderr on failure.
/// Stderr goes to an unnamed file, not a pipe: a detached instance inherits it and would
/// hold a pipe open for as long as it lives.
pub(crate) fn run_quiet(cmd: Command, what: &str) -> Result<(), BackendError> {
    let spawn_err = |source| BackendError::Spawn { what: what.to_owned(), source };
    let log = tempfile::tempfile().map_err(spawn_err)?;
    run_into(cmd, what, Stdio::null(), log)
}

/// [`run_quiet`] with stdout and stderr appended to `path` (made if missing): what a
/// detached instance that inherits them writes goes there too, for
/// [`Backend::output_path`]. On failure the error quotes what the file holds.
pub(crate) fn run_logged(cmd: Command, what: &str, path: &Path) -> Result<(), BackendError> {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .map_err(|source| BackendError::Write { path: path.to_owned(), source })?;
    let out = log.try_clone().map_err(|source| BackendError::Write { path: path.to_owned(), source })?;
    run_into(cmd, what, out.into(), log)
}

/// Runs `cmd` with no stdin, `stdout`, and stderr to `log`, which is read back for the error.
fn run_into(mut cmd: Command, what: &str, stdout: Stdio, mut log: std::fs::File) -> Result<(), BackendError> {
    use std::io::{Read, Seek};
    let spawn_err = |source| BackendError::Spawn { what: what.to_owned(), source };
    let err = log.try_clone().map_err(spawn_err)?;
    cmd.stdin(Stdio::null()).stdout(stdout).stderr(err);
    let mut child = cmd.spawn().map_err(spawn_err)?;
    // A launcher that never returns (a stuck teardown, a guest that never comes up) must not
    // stall the bench.
    let watchdog = Watchdog::start(child.id(), crate::scenario::RUN_TIMEOUT);
    let status = child.wait().map_err(spawn_err)?;
    let stall = watchdog.stop();
    if status.success() && stall.is_none() {
        return Ok(());
    }
    let mut stderr = String::new();
    let _ = log.rewind().and_then(|()| log.read_to_string(&mut stderr));
    Err(run_failed(what.to_owned(), status, stall, crate::scenario::RUN_TIMEOUT, &stderr))
}

/// The error of a run that failed, or that a [`Watchdog`] or [`kill_run`] killed after
/// `timeout` (`stall`: where it stood then). A kill is also logged as a warning at once: more
/// hung runs may follow before the scenario writes its notes, and in a nested L1 the log is
/// what reaches the host.
pub(crate) fn run_failed(
    what: String,
    status: std::process::ExitStatus,
    stall: Option<String>,
    timeout: Duration,
    stderr: &str,
) -> BackendError {
    let mut stderr = stderr.trim().to_owned();
    let status = match stall {
        Some(report) => {
            tracing::warn!("{what}: killed after {timeout:.0?} without exiting; where it stood:\n{report}");
            stderr.push_str(&format!("\nwhere it stood:\n{report}"));
            format!("killed after {timeout:.0?} without exiting")
        }
        None => status.to_string(),
    };
    BackendError::Failed { what, status, stderr }
}

/// Kills a run that outlives its deadline, from a thread of its own, while the caller blocks
/// in its wait (so the exit stamp carries no polling delay).
pub(crate) struct Watchdog {
    done: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<Option<String>>,
}

impl Watchdog {
    pub(crate) fn start(pid: u32, after: Duration) -> Watchdog {
        let (done, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            if rx.recv_timeout(after) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                return None;
            }
            // Still not reaped (the caller has not said done), so the pid is still the run's.
            Some(kill_run(pid))
        });
        Watchdog { done, thread }
    }

    /// The run ended (reaped): stop watching. When the watchdog had killed it: where the run
    /// stood (see [`stall_report`]).
    pub(crate) fn stop(self) -> Option<String> {
        let _ = self.done.send(());
        self.thread.join().unwrap_or(None)
    }
}

/// SIGKILL to a foreground run not yet reaped: to its whole process group when it leads one
/// (the backends that start helpers: a shell around QEMU, twinbox), else to the process.
/// Returns where the run's threads stood just before (see [`stall_report`]).
pub(crate) fn kill_run(pid: u32) -> String {
    let report = stall_report(pid);
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let _ = if nix::unistd::getpgid(Some(pid)).is_ok_and(|g| g == pid) {
        nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL)
    } else {
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)
    };
    report
}

/// Where a stuck run stands: for every thread of `pid` and of the processes in its process
/// group, its name, state, the kernel function it waits in (`wchan`) and the top of its kernel
/// stack (`/proc/…/stack`, root only). A run that never exits is otherwise a mystery (a VMM
/// stuck in `KVM_RUN`, a launcher blocked on a pipe); this goes into the failure's message.
pub(crate) fn stall_report(pid: u32) -> String {
    const STACK_LINES: usize = 6;
    const MAX_THREADS: usize = 16;
    // Field 5 of stat, the process group.
    let group = |p: u32| stat_fields(&format!("/proc/{p}/stat")).get(2)?.parse::<u32>().ok();
    let mut pids: Vec<u32> =
        crate::host::scan().into_iter().map(|p| p.pid).filter(|&p| p == pid || group(p) == Some(pid)).collect();
    pids.sort_unstable();
    let mut out = Vec::new();
    for p in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        let mut tids: Vec<u32> = tasks.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
        tids.sort_unstable();
        for tid in tids {
            if out.len() >= MAX_THREADS {
                out.push("…".to_owned());
                return out.join("\n");
            }
            let dir = format!("/proc/{p}/task/{tid}");
            let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).unwrap_or_default();
            let stat = stat_fields(&format!("{dir}/stat"));
            let state = stat.first().map_or("?", String::as_str);
            let mut line = format!("{p}/{tid} {} state {state} wchan {}", read("comm").trim(), read("wchan").trim());
            let stack: Vec<String> = read("stack")
                .lines()
                .take(STACK_LINES)
                .map(|l| l.split_whitespace().last().unwrap_or("").to_owned())
                .collect();
            if !stack.is_empty() {
                line.push_str(&format!(" stack {}", stack.join(" < ")));
            }
            out.push(line);
        }
    }
    out.join("\n")
}

/// The fields of a `/proc/…/stat` file after the parenthesised command name (which may hold
/// spaces and parentheses itself): state, ppid, pgrp, …; empty when the file is gone.
pub(crate) fn stat_fields(path: &str) -> Vec<String> {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().map(str::to_owned).collect()).unwrap_or_default()
}

/// Children go into their own process group, so a Ctrl-C at the terminal reaches only the
/// harness, which then tears down what it started.
pub(crate) fn own_process_group(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0)
}

/// Whether we are root (namespaces, cgroups and mounts need it).
pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Wait until a process whose arguments include `marker` shows in /proc (the workload has
/// exec'd), at most `timeout`.
pub fn wait_for_marker(marker: &str, timeout: Duration) -> bool {
    let t = Instant::now();
    loop {
        if crate::host::scan().iter().any(|p| p.args.iter().any(|a| a == marker)) {
            return true;
        }
        if t.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

//! A microVM's VMM as a process of its own, confined once its VM is built.
//!
//! ```text
//! twinbox run / microvm-launch (root: the instance's monitor: network, ports, records)
//!   └─ spawn `twinbox microvm-vmm` ── fd 3: request (JSON line, then the initramfs bytes)
//!        │                            fd 4: status (JSON lines; a forbidden call's report)
//!        │                            fd 5: the guest console (the monitor keeps its tail)
//!        │                            fd 6: the instance's log, when output also goes there
//!        └─ VmBuilder::build (as root: /dev/kvm, disks, taps, sockets opened)
//!           → jail (twinbox_microvm::jail) → `built` → run → `ended` / `failed` / …
//! ```
//!
//! The monitor forwards SIGINT, SIGTERM and SIGHUP to the VMM (which stops its guest on them)
//! and the VMM dies with its monitor (PR_SET_PDEATHSIG), so `twinbox kill` and a SIGKILLed
//! `twinbox run` leave no VMM behind.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use twinbox_microvm::jail::JailConfig;
use twinbox_microvm::vstate::vcpu::VcpuError;
use twinbox_microvm::{ExitReason, VmBuilder, VmConfig, VmError};

const REQUEST_FD: RawFd = 3;
const STATUS_FD: RawFd = 4;
const CONSOLE_FD: RawFd = 5;
const LOG_FD: RawFd = 6;

/// What the VMM process is asked to do. Plain data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// The VM.
    pub config: VmConfig,
    /// Length of the initramfs that follows the request's line (none when restoring).
    pub initrd_len: usize,
    /// A snapshot to restore instead of booting.
    pub restore: Option<PathBuf>,
    /// Bytes for the restored guest's mailbox, hex.
    pub mailbox: Option<String>,
    /// Pause when the guest agent is ready, and snapshot the VM into this new directory.
    pub snapshot_to: Option<PathBuf>,
    /// The instant the boot timer counts from, as CLOCK_MONOTONIC nanoseconds.
    pub start_monotonic_ns: u64,
    /// How to confine the VMM; none only for debugging (`--no-jail`).
    pub jail: Option<JailConfig>,
    /// The workload's output also goes to the log (descriptor 6), beside stdout and stderr.
    pub tee_log: bool,
    /// Only the log (descriptor 6) gets the workload's output.
    pub log_only: bool,
}

/// What the VMM process reports, one JSON line each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Status {
    /// Built and confined: the guest is about to run.
    Built,
    /// The guest stopped.
    Ended {
        /// How.
        reason: ExitReasonWire,
        /// Boot timer, nanoseconds.
        boot_time_ns: Option<u64>,
    },
    /// It ran past its timeout.
    Timeout {
        /// The timeout, milliseconds.
        ms: u64,
    },
    /// Stopped on a signal.
    Interrupted {
        /// Which.
        signal: i32,
    },
    /// Building or running failed.
    Failed {
        /// The exit code the failure maps to.
        code: i32,
        /// The error and its causes.
        message: String,
    },
}

/// [`ExitReason`] on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ExitReasonWire {
    Reset,
    Shutdown,
    Exited { code: i32 },
    Ready,
    Halted { rip: u64 },
}

impl From<ExitReason> for ExitReasonWire {
    fn from(r: ExitReason) -> Self {
        match r {
            ExitReason::Reset => ExitReasonWire::Reset,
            ExitReason::Shutdown => ExitReasonWire::Shutdown,
            ExitReason::Exited(code) => ExitReasonWire::Exited { code },
            ExitReason::Ready => ExitReasonWire::Ready,
            ExitReason::Halted { rip } => ExitReasonWire::Halted { rip },
        }
    }
}

impl From<ExitReasonWire> for ExitReason {
    fn from(r: ExitReasonWire) -> Self {
        match r {
            ExitReasonWire::Reset => ExitReason::Reset,
            ExitReasonWire::Shutdown => ExitReason::Shutdown,
            ExitReasonWire::Exited { code } => ExitReason::Exited(code),
            ExitReasonWire::Ready => ExitReason::Ready,
            ExitReasonWire::Halted { rip } => ExitReason::Halted { rip },
        }
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which lives across the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `start` as CLOCK_MONOTONIC nanoseconds (what [`Instant`] counts on Linux).
pub fn monotonic_of(start: Instant) -> u64 {
    monotonic_ns().saturating_sub(start.elapsed().as_nanos() as u64)
}

/// An error and its causes on one line, `: `-separated.
pub(crate) fn error_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// How to start an instance's VMM processes: the command (`twinbox microvm-vmm`) and their
/// jail.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The command.
    pub command: Vec<OsString>,
    /// The jail; none only with `--no-jail`.
    pub jail: Option<JailConfig>,
}

/// What a VMM may use beyond its guest's memory (its own code, heap, thread stacks, device
/// buffers, the page cache of a template it writes) before its cgroup's limit stops it.
pub const MEMORY_OVERHEAD_MIB: u64 = 64;

/// The cgroup of the VMM of instance `id`: `/twinbox/vmm/<id>` in every hierarchy. Its VMMs
/// join it as they enter their jail; [`VmmCgroup::drop`] removes it, and so does the next
/// command after a killed monitor (through the instance's removal or finish).
pub struct VmmCgroup(twinbox_runtime::cgroups::CgroupManager);

impl VmmCgroup {
    fn manager(id: &str) -> Result<twinbox_runtime::cgroups::CgroupManager, twinbox_runtime::cgroups::CgroupError> {
        twinbox_runtime::cgroups::CgroupManager::new(Some(std::path::Path::new(&format!("/twinbox/vmm/{id}"))), id)
    }

    /// Makes it (a leftover first removed), its memory limited to `memory_mib` plus
    /// [`MEMORY_OVERHEAD_MIB`], no device allowed.
    pub fn create(id: &str, memory_mib: u32) -> Result<Self, twinbox_runtime::cgroups::CgroupError> {
        use oci_spec::runtime::{LinuxMemoryBuilder, LinuxResourcesBuilder};
        let manager = Self::manager(id)?;
        let _ = manager.destroy();
        let limit = ((u64::from(memory_mib) + MEMORY_OVERHEAD_MIB) << 20) as i64;
        let memory = LinuxMemoryBuilder::default().limit(limit).swap(limit).build().expect("memory limits set");
        // It opens no device once confined (what it needs is open before): none may be opened.
        let deny_all = oci_spec::runtime::LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .typ(oci_spec::runtime::LinuxDeviceType::A)
            .access("rwm")
            .build()
            .expect("a device rule");
        let resources =
            LinuxResourcesBuilder::default().memory(memory).devices(vec![deny_all]).build().expect("resources set");
        manager.create(Some(&resources))?;
        Ok(VmmCgroup(manager))
    }

    /// The files a VMM writes `0` to, to join it: `tasks` in each v1 hierarchy (a
    /// single-threaded process moves itself there without a `cgroup.procs` write's RCU
    /// grace period), and on a pure cgroup v2 host `cgroup.procs`. (A hybrid host's cgroup2
    /// tree holds no controller the VMM is limited by.)
    pub fn join_files(&self) -> Vec<PathBuf> {
        use twinbox_runtime::cgroups::Layout;
        let mut files = self.0.v1_task_files();
        if self.0.layout() == Layout::Unified {
            files.extend(self.0.unified_dir().map(|d| d.join("cgroup.procs")));
        }
        files
    }

    /// Removes the cgroup of instance `id`'s VMM, if it is there.
    pub fn remove(id: &str) {
        if let Ok(m) = Self::manager(id) {
            if m.dirs().iter().any(|d| d.exists()) {
                if let Err(e) = m.destroy() {
                    tracing::warn!(error = %e, "cannot remove the cgroup of {id}'s VMM");
                }
            }
        }
    }
}

impl Drop for VmmCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.0.destroy() {
            tracing::warn!(error = %e, cgroup = ?self.0.dirs(), "cannot remove a VMM's cgroup");
        }
    }
}

/// Writes both of its writers; the second's errors are ignored (the log is a copy).
pub(crate) struct Tee<A, B>(pub A, pub B);

impl<A: Write, B: Write> Write for Tee<A, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = self.1.write_all(buf);
        self.0.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.1.flush();
        self.0.flush()
    }
}

/// The VMM process's side (`twinbox microvm-vmm`): reads its request, builds, confines
/// itself, runs, reports. Returns the process's exit code (0 once the report is written).
pub fn serve() -> i32 {
    // Run by hand, without `spawn`'s descriptors, it says so instead of taking over whatever
    // is (or is not) open there.
    // SAFETY: F_GETFD reads a descriptor's flags and changes nothing.
    let open = |fd: RawFd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
    if !(open(REQUEST_FD) && open(STATUS_FD) && open(CONSOLE_FD)) {
        eprintln!(
            "twinbox microvm-vmm: descriptors {REQUEST_FD} to {CONSOLE_FD} are not open: this command is started by a \
             microVM's monitor (twinbox run), not by hand"
        );
        return twinbox_exit::USER_ERROR;
    }
    // SAFETY: descriptors 3 to 5 are open (checked above): the pipes `spawn` put there, which
    // nothing else in this fresh process owns.
    let (request, mut status) = unsafe { (File::from_raw_fd(REQUEST_FD), File::from_raw_fd(STATUS_FD)) };
    let outcome = run_vm(request, status.as_raw_fd());
    let status_line = match outcome {
        Ok(s) => s,
        Err(e) => Status::Failed { code: twinbox_exit::ExitCode::exit_code(&e), message: error_text(&e) },
    };
    let mut line = serde_json::to_string(&status_line).unwrap_or_default();
    line.push('\n');
    match status.write_all(line.as_bytes()) {
        Ok(()) => 0,
        Err(_) => twinbox_exit::INTERNAL,
    }
}

#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("cannot read the VMM's request")]
    Request(#[source] io::Error),
    #[error("invalid VMM request: {0}")]
    Parse(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot report to the monitor")]
    Report(#[source] io::Error),
}

impl twinbox_exit::ExitCode for ServeError {
    fn exit_code(&self) -> i32 {
        match self {
            ServeError::Vm(e) => e.exit_code(),
            _ => twinbox_exit::INTERNAL,
        }
    }
}

fn run_vm(request: File, status_fd: RawFd) -> Result<Status, ServeError> {
    let mut reader = BufReader::new(request);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(ServeError::Request)?;
    let req: Request = serde_json::from_str(&line).map_err(|e| ServeError::Parse(e.to_string()))?;
    let mut initrd = vec![0; req.initrd_len];
    reader.read_exact(&mut initrd).map_err(ServeError::Request)?;
    drop(reader);
    let start = Instant::now()
        .checked_sub(Duration::from_nanos(monotonic_ns().saturating_sub(req.start_monotonic_ns)))
        .unwrap_or_else(Instant::now);
    twinbox_microvm::vstate::watchdog::stop_on_signals().map_err(|e| ServeError::Vm(VmError::EventFd(e)))?;
    let output: (Box<dyn Write + Send>, Box<dyn Write + Send>) = if req.log_only || req.tee_log {
        // SAFETY: descriptor 6 is the log `spawn` put there, owned by nothing else here.
        let log = unsafe { File::from_raw_fd(LOG_FD) };
        let log2 = log.try_clone().map_err(ServeError::Request)?;
        if req.log_only {
            (Box::new(log), Box::new(log2))
        } else {
            (Box::new(Tee(io::stdout(), log)), Box::new(Tee(io::stderr(), log2)))
        }
    } else {
        (Box::new(io::stdout()), Box::new(io::stderr()))
    };
    let mut builder = VmBuilder::new(req.config).start_time(start).output(output.0, output.1);
    builder = match (&req.restore, &req.mailbox) {
        (Some(dir), Some(hex)) => {
            builder.restore(dir).mailbox(hex::decode(hex).map_err(|e| ServeError::Parse(format!("mailbox: {e}")))?)
        }
        (Some(dir), None) => builder.restore(dir),
        (None, _) => builder.initrd_bytes(initrd),
    };
    let jail = req.jail.map(|mut j| {
        // Where the snapshot goes is written by the jailed VMM.
        if let Some(dir) = req.snapshot_to.as_ref().and_then(|d| d.parent()) {
            j.binds.push(dir.to_path_buf());
        }
        j
    });
    let mut vm = builder.pause_when_ready(req.snapshot_to.is_some()).jail_reporting(jail, status_fd).build()?;
    // SAFETY: descriptor 4 is the status pipe, owned by `serve`'s File; this borrows it for
    // one write.
    let mut status = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(status_fd) });
    status.write_all(b"{\"status\":\"built\"}\n").map_err(ServeError::Report)?;
    // SAFETY: descriptor 5 is the console pipe `spawn` put there, owned by nothing else here.
    let mut console = unsafe { File::from_raw_fd(CONSOLE_FD) };
    let result = vm.run(&mut console);
    let exit = match result {
        Ok(exit) => exit,
        Err(VmError::Vcpu(VcpuError::Timeout(t))) => return Ok(Status::Timeout { ms: t.as_millis() as u64 }),
        Err(VmError::Vcpu(VcpuError::Interrupted(signal))) => return Ok(Status::Interrupted { signal }),
        Err(e) => return Err(e.into()),
    };
    if exit.reason == ExitReason::Ready {
        if let Some(dir) = &req.snapshot_to {
            vm.snapshot(dir)?;
        }
    }
    Ok(Status::Ended { reason: exit.reason.into(), boot_time_ns: exit.boot_time.map(|d| d.as_nanos() as u64) })
}

/// `twinbox microvm-vmm --probe`: what a VMM jailed as the engine jails it (but in a new
/// network namespace and no cgroup, which change no figure here) reaches of the host kernel,
/// each thread kind's figures as one JSON object (`{"vmm": {...}, "vcpu": ...}`).
pub fn probe() -> Result<String, twinbox_microvm::jail::JailError> {
    let jail = JailConfig {
        uid: Some(twinbox_microvm::jail::VMM_ID_BASE + std::process::id()),
        // One of its own: a probe leaves no shared namespace pinned.
        netns: twinbox_microvm::jail::NetNs::New,
        ..JailConfig::default()
    };
    let kinds = jail.probe()?;
    let fields: Vec<String> = kinds.iter().map(|(kind, s)| format!("\"{}\":{}", kind.key(), s.to_json())).collect();
    Ok(format!("{{{}}}", fields.join(",")))
}

/// Where the workload's output goes.
pub enum Output {
    /// This process's stdout and stderr.
    Ours,
    /// Ours, and a copy to the log.
    OursAndLog(File),
    /// Only the log.
    Log(File),
}

/// A running VMM process, seen from its monitor.
pub struct Vmm {
    child: Child,
    status: BufReader<File>,
    console: Option<std::thread::JoinHandle<()>>,
    /// Lines of the status pipe that were not a status: a forbidden call's report.
    pub reports: Vec<String>,
}

/// Starts the VMM process `command` (`twinbox microvm-vmm`) on `request`, the guest console
/// going to `console`.
pub fn spawn(
    command: &[OsString],
    request: &Request,
    initrd: &[u8],
    output: Output,
    mut console: impl Write + Send + 'static,
) -> io::Result<Vmm> {
    let (program, args) = command.split_first().ok_or_else(|| io::Error::other("no VMM command configured"))?;
    // The request: a JSON line, then the initramfs. Made before anything starts.
    let mut line = serde_json::to_vec(request).map_err(|e| {
        io::Error::other(format!("the VM's request cannot be written as JSON (a path that is not UTF-8?): {e}"))
    })?;
    line.push(b'\n');
    let (request_rd, mut request_wr) = io::pipe()?;
    let (status_rd, status_wr) = io::pipe()?;
    let (mut console_rd, console_wr) = io::pipe()?;
    let log = match &output {
        Output::Ours => None,
        Output::OursAndLog(f) | Output::Log(f) => Some(f.try_clone()?),
    };
    // Each source at a number above the targets, so no dup2 below overwrites one still needed.
    let high = |fd: OwnedFd| -> io::Result<OwnedFd> {
        // SAFETY: F_DUPFD_CLOEXEC on an fd we own returns a new fd (or -1), which we then own.
        let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `n` is a fresh descriptor owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(n) })
    };
    let fds = [
        (high(request_rd.into())?, REQUEST_FD),
        (high(status_wr.into())?, STATUS_FD),
        (high(console_wr.into())?, CONSOLE_FD),
    ];
    let log = log.map(|f| high(f.into())).transpose()?;
    let raw: Vec<(RawFd, RawFd)> = fds
        .iter()
        .map(|(fd, to)| (fd.as_raw_fd(), *to))
        .chain(log.as_ref().map(|fd| (fd.as_raw_fd(), LOG_FD)))
        .collect();
    let parent = std::process::id() as libc::pid_t;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    if let Output::Log(f) = &output {
        cmd.stdout(f.try_clone()?).stderr(f.try_clone()?);
    }
    // SAFETY: the closure runs in the child between fork and exec and makes only
    // async-signal-safe calls (dup2, prctl, getppid, _exit) on descriptors that are open.
    unsafe {
        cmd.pre_exec(move || {
            for &(from, to) in &raw {
                if libc::dup2(from, to) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // It dies with its monitor; if the monitor is gone already, at once.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(fds);
    drop(log);
    let mut vmm =
        Vmm { child, status: BufReader::new(File::from(OwnedFd::from(status_rd))), console: None, reports: Vec::new() };
    let console = std::thread::Builder::new().name("vm-console".into()).spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match console_rd.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let _ = console.write_all(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    match console {
        Ok(t) => vmm.console = Some(t),
        Err(e) => {
            // Nothing would read its console: it is stopped before it has its request.
            drop(request_wr);
            vmm.kill();
            return Err(e);
        }
    }
    let written = request_wr.write_all(&line).and_then(|()| request_wr.write_all(initrd));
    drop(request_wr);
    twinbox_microvm::vstate::watchdog::forward_stops_to(Some(vmm.child.id() as i32));
    if let Err(e) = written {
        // It died before reading its request: its status says why, or its exit does.
        tracing::debug!(error = %e, "writing the VMM's request");
    }
    Ok(vmm)
}

/// `text` with control characters (a terminal's escapes among them) shown as `?`.
fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() && c != '\n' && c != '\t' { '?' } else { c }).collect()
}

impl Vmm {
    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next status; `None` once the VMM closed its end (it ended): then
    /// [`finish`](Self::finish) says how.
    pub fn next_status(&mut self) -> Option<Status> {
        // The VMM runs what the guest drives: what it sends is bounded (a line, the lines kept)
        // and shown without control characters.
        const LINE_LIMIT: u64 = 64 << 10;
        const REPORTS_KEPT: usize = 16;
        loop {
            let mut bytes = Vec::new();
            match (&mut self.status).take(LINE_LIMIT).read_until(b'\n', &mut bytes) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&bytes);
            match serde_json::from_str::<Status>(line.trim_end()) {
                Ok(Status::Failed { code, message }) => {
                    return Some(Status::Failed { code, message: printable(&message) })
                }
                Ok(s) => return Some(s),
                Err(_) if !line.trim().is_empty() && self.reports.len() < REPORTS_KEPT => {
                    self.reports.push(printable(line.trim_end()))
                }
                Err(_) => {}
            }
        }
    }

    /// Waits for the VMM to end (its console copied to the end); its exit status.
    pub fn finish(&mut self) -> io::Result<std::process::ExitStatus> {
        // No stop is forwarded once its pid may be reaped and reused; one that comes between
        // here and its end stops the monitor's own wait instead, which the VMM's death follows.
        twinbox_microvm::vstate::watchdog::forward_stops_to(None);
        let status = self.child.wait();
        if let Some(t) = self.console.take() {
            let _ = t.join();
        }
        status
    }

    /// Stops the VMM at once (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.finish();
    }

    /// Why the VMM ended without a status: its forbidden-call report, or its exit.
    pub fn silent_end(&mut self, exit: io::Result<std::process::ExitStatus>) -> String {
        use std::os::unix::process::ExitStatusExt;
        if !self.reports.is_empty() {
            return self.reports.join("; ");
        }
        match exit {
            Ok(s) => match (s.code(), s.signal()) {
                (_, Some(sig)) => format!("the VMM process was killed by signal {sig} before it reported"),
                (Some(code), _) => format!("the VMM process ended with status {code} before it reported"),
                _ => "the VMM process ended before it reported".into(),
            },
            Err(e) => format!("cannot wait for the VMM process: {e}"),
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.console.is_some() {
            self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_vmm_sends_is_shown_without_terminal_escapes() {
        assert_eq!(printable("a\u{1b}[2Jb\rc\u{7}"), "a?[2Jb?c?");
        assert_eq!(printable("line one\n\tline two"), "line one\n\tline two");
    }

    #[test]
    fn statuses_round_trip_as_json_lines() {
        for s in [
            Status::Built,
            Status::Ended { reason: ExitReasonWire::Exited { code: 3 }, boot_time_ns: Some(5) },
            Status::Ended { reason: ExitReasonWire::Halted { rip: 0x10 }, boot_time_ns: None },
            Status::Timeout { ms: 1000 },
            Status::Interrupted { signal: 15 },
            Status::Failed { code: 125, message: "a\nb".into() },
        ] {
            let line = serde_json::to_string(&s).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<Status>(&line).unwrap(), s);
        }
        assert_eq!(serde_json::to_string(&Status::Built).unwrap(), "{\"status\":\"built\"}");
    }
}

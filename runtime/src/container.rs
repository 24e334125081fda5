//! The [`Runtime`] facade: one method per lifecycle verb, each implemented in its own module
//! (`create.rs`, `start.rs`, `kill.rs`, `delete.rs`, `exec.rs`), over state kept in
//! `<root>/<id>/`.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxResources, Process};
use twinbox_exit::ExitCode;

use crate::cgroups::CgroupError;
use crate::hooks::HookError;
use crate::namespaces::NamespaceError;
use crate::process::ProcessError;
use crate::rootfs::RootfsError;
use crate::state::{State, StateError, Status, STATE_FILE};

/// Where state lives unless told otherwise (root; see [`default_root`]).
pub const DEFAULT_ROOT: &str = "/run/twinbox/runtime";

/// The state root when none is given: [`DEFAULT_ROOT`] for root, and for other users
/// `$XDG_RUNTIME_DIR/twinbox-runc` (as runc uses `$XDG_RUNTIME_DIR/runc`).
pub fn default_root() -> PathBuf {
    if !nix::unistd::geteuid().is_root() {
        if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir).join("twinbox-runc");
        }
    }
    PathBuf::from(DEFAULT_ROOT)
}

/// Rootless unless this is the host's real root: another user, or "root" only inside a user
/// namespace (rootless podman calls runtimes so).
pub fn rootless_by_default() -> bool {
    !nix::unistd::geteuid().is_root() || in_user_namespace()
}

/// Is this process in a user namespace other than the initial one? The initial namespace
/// maps every id to itself; any other map is narrower.
fn in_user_namespace() -> bool {
    std::fs::read_to_string("/proc/self/uid_map")
        .map(|m| m.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"])
        .unwrap_or(false)
}

/// Errors of the lifecycle verbs. Texts that runc users (and containerd) match on are runc's.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("container does not exist")]
    NotFound { id: String },
    #[error("container with id exists: {id}")]
    Exists { id: String },
    #[error("invalid container id {id:?}: {reason}")]
    InvalidId { id: String, reason: &'static str },
    #[error("bundle {path}")]
    Bundle {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading {path}")]
    Spec {
        path: PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("unsupported ociVersion {version:?}: this runtime supports 1.0.x to 1.3.x")]
    Version { version: String },
    #[error("invalid config.json: {reason}")]
    InvalidSpec { reason: &'static str },
    #[error("root.path {path}")]
    Rootfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("root.path {path} {why}")]
    RootPath { path: PathBuf, why: &'static str },
    #[error(transparent)]
    RootfsConfig(#[from] RootfsError),
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Sys {
        what: &'static str,
        #[source]
        source: Errno,
    },
    #[error("container init failed: {message}")]
    Init { message: String, code: i32 },
    #[error("container init exited before it was ready ({status})")]
    InitDied { status: String },
    #[error("exec failed: {message}")]
    ExecFailed { message: String, code: i32 },
    #[error("{}", cannot_start(*.status))]
    CannotStart { status: Status },
    #[error("container not running")]
    NotRunning { id: String },
    #[error("container not paused")]
    NotPaused { id: String },
    #[error("locking container {id}")]
    Lock {
        id: String,
        #[source]
        source: Errno,
    },
    #[error("cannot delete container {id} that is not stopped: {status}")]
    NotStopped { id: String, status: Status },
    #[error("cannot exec in a {status} container")]
    CannotExec { status: Status },
    #[error("process.terminal is set but no console socket was given")]
    NoConsoleSocket,
    #[error("connecting to console socket {path}")]
    ConsoleSocket {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("container {id} did not stop within {secs}s of SIGKILL")]
    KillTimeout { id: String, secs: u64 },
    #[error("invalid signal {0:?}")]
    Signal(String),
}

fn cannot_start(status: Status) -> &'static str {
    match status {
        Status::Stopped => "cannot start a container that has stopped",
        Status::Running => "cannot start an already running container",
        Status::Paused => "cannot start a paused container",
        _ => "cannot start a container that is not created",
    }
}

impl ExitCode for RuntimeError {
    /// The caller's ids, bundle, spec and requests are the "user's"; 126/127 when the
    /// container's program could not be executed/found.
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        match self {
            RuntimeError::NotFound { .. }
            | RuntimeError::Exists { .. }
            | RuntimeError::InvalidId { .. }
            | RuntimeError::Bundle { .. }
            | RuntimeError::Spec { .. }
            | RuntimeError::Version { .. }
            | RuntimeError::InvalidSpec { .. }
            | RuntimeError::Rootfs { .. }
            | RuntimeError::RootPath { .. }
            | RuntimeError::CannotStart { .. }
            | RuntimeError::NotRunning { .. }
            | RuntimeError::NotPaused { .. }
            | RuntimeError::NotStopped { .. }
            | RuntimeError::CannotExec { .. }
            | RuntimeError::NoConsoleSocket
            | RuntimeError::ConsoleSocket { .. }
            | RuntimeError::Signal(_) => USER_ERROR,
            RuntimeError::RootfsConfig(e) => e.exit_code(),
            RuntimeError::Namespace(e) => e.exit_code(),
            RuntimeError::Cgroup(e) => e.exit_code(),
            RuntimeError::Process(e) => e.exit_code(),
            RuntimeError::Hook(e) => e.exit_code(),
            RuntimeError::State(e) => e.exit_code(),
            // The init's or exec child's own error's code, sent over the sync socket.
            RuntimeError::Init { code, .. } | RuntimeError::ExecFailed { code, .. } => *code,
            RuntimeError::Io { .. }
            | RuntimeError::Sys { .. }
            | RuntimeError::InitDied { .. }
            | RuntimeError::Lock { .. }
            | RuntimeError::KillTimeout { .. } => INTERNAL,
        }
    }
}

/// An error and all its sources, joined with ": " (how the CLI and the init report errors).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let text = src.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = src.source();
    }
    s
}

/// How to create a container.
#[derive(Debug, Default)]
pub struct CreateOptions {
    /// Write the init's pid here (runc's `--pid-file`).
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the pty master when `process.terminal` is set.
    pub console_socket: Option<PathBuf>,
    /// The init's stdin, stdout, stderr; `None` inherits the caller's.
    pub stdio: Option<[OwnedFd; 3]>,
    /// Do not give the container its own session keyring.
    pub no_new_keyring: bool,
    /// Use MS_MOVE + chroot instead of pivot_root.
    pub no_pivot: bool,
    /// Pass descriptors 3 .. 3+N of the caller to the container process.
    pub preserve_fds: u32,
}

/// How to exec a process in a container.
#[derive(Debug, Default)]
pub struct ExecOptions {
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    pub stdio: Option<[OwnedFd; 3]>,
    pub preserve_fds: u32,
}

/// The runtime: a state directory and the lifecycle verbs.
#[derive(Debug, Clone)]
pub struct Runtime {
    root: PathBuf,
    /// `None`: decided when needed by [`rootless_by_default`] (which reads a /proc file, so not
    /// on every start).
    rootless: Option<bool>,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime::new(DEFAULT_ROOT)
    }
}

impl Runtime {
    /// A runtime keeping state under `root`; rootless when [`rootless_by_default`] says so.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Runtime { root: root.into(), rootless: None }
    }

    /// Force rootless mode on or off (runc's `--rootless true|false`). A rootless runtime runs
    /// a container that asks for no limits without a cgroup when the hierarchies are not
    /// writable for it.
    pub fn with_rootless(mut self, rootless: bool) -> Self {
        self.rootless = Some(rootless);
        self
    }

    /// Is this runtime in rootless mode?
    pub fn is_rootless(&self) -> bool {
        self.rootless.unwrap_or_else(rootless_by_default)
    }

    /// The state root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<id>`.
    pub fn state_dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Create a container from the bundle: returns once its init is set up and blocked on
    /// `exec.fifo`. The init is a child of the calling process.
    pub fn create(&self, id: &str, bundle: &Path, opts: CreateOptions) -> Result<State, RuntimeError> {
        crate::create::create(self, id, bundle, opts)
    }

    /// Let a created container's init exec the user's program; runs poststart hooks.
    pub fn start(&self, id: &str) -> Result<(), RuntimeError> {
        crate::start::start(self, id)
    }

    /// [`start`](Self::start) a container this process just created, with the state
    /// [`create`](Self::create) returned (no second read of the state file).
    pub fn start_created(&self, state: &mut State) -> Result<(), RuntimeError> {
        crate::start::start_created(self, state)
    }

    /// [`delete`](Self::delete) a container this process created, with the state it holds.
    pub fn delete_created(&self, state: State, force: bool) -> Result<(), RuntimeError> {
        crate::delete::delete_created(self, state, force)
    }

    /// The container's state, with its status derived now.
    pub fn state(&self, id: &str) -> Result<State, RuntimeError> {
        self.load(id)
    }

    /// Send `sig` to the init, or with `all` to every process in the container's cgroup.
    pub fn kill(&self, id: &str, sig: Signal, all: bool) -> Result<(), RuntimeError> {
        crate::kill::kill(self, id, sig, all)
    }

    /// Delete a stopped (or created) container; `force` kills a running one first.
    pub fn delete(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        crate::delete::delete(self, id, force)
    }

    /// Every container under the root, sorted by id.
    pub fn list(&self) -> Result<Vec<State>, RuntimeError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(RuntimeError::Io { what: "reading", path: self.root.clone(), source }),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let dir = e.path();
            // A directory without a state file is a create in progress (or a crashed one).
            if dir.join(STATE_FILE).exists() {
                match State::load(&dir) {
                    Ok(st) => out.push(st),
                    Err(err) => tracing::warn!(dir = %dir.display(), error = %err, "skipping unreadable state"),
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Freeze every process of a running container.
    pub fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        crate::control::pause(self, id)
    }

    /// Thaw a paused container.
    pub fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        crate::control::resume(self, id)
    }

    /// Apply new cgroup limits to a container that is not stopped (and record them).
    pub fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), RuntimeError> {
        crate::control::update(self, id, resources)
    }

    /// The container's counters as runc's stats event, and its OOM-kill count.
    pub fn stats(&self, id: &str) -> Result<(crate::control::Event, u64), RuntimeError> {
        crate::control::stats(self, id)
    }

    /// Holds an exclusive lock on the container (flock on its state directory) until dropped:
    /// commands that change a container take it, so they never interleave. Taken before the
    /// state is loaded: a command that waited behind a `delete` then finds the container gone.
    pub fn lock(&self, id: &str) -> Result<ContainerLock, RuntimeError> {
        validate_id(id)?;
        let dir = self.state_dir(id);
        let file = match std::fs::File::open(&dir) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RuntimeError::NotFound { id: id.to_string() })
            }
            Err(source) => return Err(RuntimeError::Io { what: "opening", path: dir, source }),
        };
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, source)| RuntimeError::Lock { id: id.to_string(), source })?;
        Ok(ContainerLock { _lock: lock })
    }

    /// The pids of every process in the container's cgroup.
    pub fn ps(&self, id: &str) -> Result<Vec<Pid>, RuntimeError> {
        let st = self.load(id)?;
        Ok(st.cgroup.pids()?)
    }

    /// Run `process` inside the container (its namespaces, cgroup and credentials). The new
    /// process is a child of the caller; its pid is returned once it has exec'd.
    pub fn exec(&self, id: &str, process: &Process, opts: ExecOptions) -> Result<Pid, RuntimeError> {
        crate::exec::exec(self, id, process, opts)
    }

    /// Load a container's state (status derived now).
    pub(crate) fn load(&self, id: &str) -> Result<State, RuntimeError> {
        validate_id(id)?;
        let dir = self.state_dir(id);
        if !dir.join(STATE_FILE).exists() {
            return Err(RuntimeError::NotFound { id: id.to_string() });
        }
        Ok(State::load(&dir)?)
    }
}

/// A container's lock, released on drop (see [`Runtime::lock`]).
#[derive(Debug)]
pub struct ContainerLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Container ids are single path components: non-empty, no '/', not "." or "..".
pub fn validate_id(id: &str) -> Result<(), RuntimeError> {
    let reason = if id.is_empty() {
        "empty"
    } else if id.contains('/') {
        "contains '/'"
    } else if id == "." || id == ".." {
        "not a name"
    } else if id.contains('\0') {
        "contains a NUL byte"
    } else if id.len() > 1024 {
        "too long"
    } else {
        return Ok(());
    };
    Err(RuntimeError::InvalidId { id: id.to_string(), reason })
}

/// Write a pid file atomically (runc writes the bare number).
pub(crate) fn write_pid_file(path: &Path, pid: Pid) -> Result<(), RuntimeError> {
    crate::state::write_atomic(path, pid.to_string().as_bytes(), 0o644).map_err(RuntimeError::State)
}

/// Connect to a console socket (a unix stream socket listening at `path`).
pub(crate) fn connect_console(path: &Path) -> Result<OwnedFd, RuntimeError> {
    crate::terminal::connect_socket(path)
        .map_err(|source| RuntimeError::ConsoleSocket { path: path.to_path_buf(), source })
}

/// Wait until `pid` (started at `start_time`) is gone or a zombie; false on timeout.
pub fn wait_gone(pid: i32, start_time: u64, timeout: std::time::Duration) -> bool {
    use crate::state::ProcStat;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match ProcStat::read(pid) {
            Some(st) if st.start_time == start_time && !matches!(st.state, 'Z' | 'X' | 'x') => {}
            _ => return true,
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("abc-1_2.x").is_ok());
        for bad in ["", "a/b", "..", "."] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chains_errors_once() {
        let e = RuntimeError::Sys { what: "pivot_root", source: Errno::EPERM };
        assert_eq!(error_chain(&e), "pivot_root: EPERM: Operation not permitted");
        assert_eq!(
            RuntimeError::CannotStart { status: Status::Stopped }.to_string(),
            "cannot start a container that has stopped"
        );
    }

    #[test]
    fn unknown_container() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Runtime::new(tmp.path());
        let e = rt.state("nope").unwrap_err();
        assert_eq!(e.to_string(), "container does not exist");
        assert!(rt.list().unwrap().is_empty());
    }

    #[test]
    fn exit_codes() {
        let io = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(RuntimeError::NotFound { id: "c".into() }.exit_code(), 1);
        assert_eq!(RuntimeError::Lock { id: "c".into(), source: Errno::ENOLCK }.exit_code(), 125);
        // The init's own code, sent with its message.
        let missing =
            RuntimeError::Init { message: "exec: \"x\": executable file not found in $PATH".into(), code: 127 };
        assert_eq!(missing.exit_code(), 127);
        assert_eq!(RuntimeError::Cgroup(CgroupError::SwapWithoutLimit { swap: 1 }).exit_code(), 1);
        assert_eq!(RuntimeError::Cgroup(CgroupError::Mkdir { path: "/c".into(), source: io() }).exit_code(), 125);
        assert_eq!(
            RuntimeError::State(StateError::Read { path: "/r/c/state.json".into(), source: io() }).exit_code(),
            125
        );
    }
}

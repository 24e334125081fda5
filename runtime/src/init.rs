//! The container's init, the child side of `create`.
//!
//! It waits for the parent's "go" (sent once the parent has put it into its cgroup and written
//! its uid/gid maps), joins the namespaces given by path, builds the root filesystem, asks the
//! parent to run the prestart/createRuntime hooks, runs createContainer hooks, pivots, sets
//! hostname, loopback, sysctls and the console, applies the process credentials, changes to
//! the working directory and reports "ready". Then it blocks opening `exec.fifo` for writing
//! until `start` opens it for reading, runs the startContainer hooks and execs the user's
//! program. Any error before "ready" is sent to the parent as a message; after it, to stderr.
//!
//! The [`SyncChannel`] protocol is shared with `exec`.

use std::convert::Infallible;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use twinbox_exit::ExitCode;

use crate::container::error_chain;
use crate::namespaces::{self, NamespaceError, Namespaces, OpenNamespaces};
use crate::network::{self, NetworkError};
use crate::process::{Prepared, ProcessError};
use crate::rootfs::{self, Overlay, RootfsConfig, RootfsError};
use crate::syscall::{self, LinuxSyscall, Syscall};
use crate::terminal;

/// The PATH used to find the program when the process environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Messages between the runtime and a child it is setting up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Parent → child: cgroup joined, id maps written; carries the OCI state JSON for hooks.
    Go(Vec<u8>),
    /// Child → parent: mounts done, run prestart + createRuntime hooks now.
    HooksRequest,
    /// Parent → child: hooks done.
    HooksDone,
    /// Child → parent: set up, about to block on exec.fifo.
    Ready,
    /// Child → parent: set-up failed; `code` is the exit code a CLI should use.
    Error { code: i32, message: String },
}

const TAG_GO: u8 = 1;
const TAG_HOOKS: u8 = 2;
const TAG_HOOKS_DONE: u8 = 3;
const TAG_READY: u8 = 4;
const TAG_ERROR: u8 = 5;

impl Msg {
    fn encode(&self) -> Vec<u8> {
        match self {
            Msg::Go(p) => [&[TAG_GO][..], p].concat(),
            Msg::HooksRequest => vec![TAG_HOOKS],
            Msg::HooksDone => vec![TAG_HOOKS_DONE],
            Msg::Ready => vec![TAG_READY],
            Msg::Error { code, message } => {
                let mut v = vec![TAG_ERROR];
                v.extend_from_slice(&code.to_le_bytes());
                v.extend_from_slice(message.as_bytes());
                v
            }
        }
    }

    fn decode(b: &[u8]) -> Option<Msg> {
        let (&tag, rest) = b.split_first()?;
        Some(match tag {
            TAG_GO => Msg::Go(rest.to_vec()),
            TAG_HOOKS => Msg::HooksRequest,
            TAG_HOOKS_DONE => Msg::HooksDone,
            TAG_READY => Msg::Ready,
            TAG_ERROR if rest.len() >= 4 => Msg::Error {
                code: i32::from_le_bytes(rest[..4].try_into().ok()?),
                message: String::from_utf8_lossy(&rest[4..]).into_owned(),
            },
            _ => return None,
        })
    }
}

/// One end of a SOCK_SEQPACKET socketpair (close-on-exec, so a successful execve closes it).
#[derive(Debug)]
pub struct SyncChannel(OwnedFd);

impl SyncChannel {
    pub fn pair() -> Result<(SyncChannel, SyncChannel), Errno> {
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        Ok((SyncChannel(a), SyncChannel(b)))
    }

    pub fn send(&self, msg: &Msg) -> Result<(), Errno> {
        let bytes = msg.encode();
        loop {
            match send(self.0.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL) {
                Err(Errno::EINTR) => continue,
                r => return r.map(drop),
            }
        }
    }

    /// The next message; `None` when the other end is closed (or sent garbage). Messages the
    /// other end sent before it closed are still delivered, also when it closed with one of
    /// ours unread (the kernel then reports `ECONNRESET` once before handing them over).
    pub fn recv(&self) -> Result<Option<Msg>, Errno> {
        let mut buf = vec![0u8; 1 << 16];
        let mut reset = false;
        loop {
            match recv(self.0.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Err(Errno::EINTR) => continue,
                Err(Errno::ECONNRESET) if !reset => reset = true,
                Err(e) => return Err(e),
                Ok(0) => return Ok(None),
                Ok(n) => return Ok(Msg::decode(&buf[..n])),
            }
        }
    }
}

/// Errors of the init (and of the exec child), reported to the parent as text.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("sync with the runtime")]
    Sync(#[source] Errno),
    #[error("the runtime went away during set-up")]
    SyncClosed,
    #[error("unexpected message from the runtime")]
    SyncProtocol,
    #[error("setting up stdio")]
    Stdio(#[source] Errno),
    #[error("moving the init into its cgroup ({path})")]
    CgroupJoin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error("becoming root in the new user namespace")]
    UserRoot(#[source] Errno),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error("setting hostname {0:?}")]
    Hostname(String, #[source] Errno),
    #[error("setting domainname {0:?}")]
    Domainname(String, #[source] Errno),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("writing sysctl {key}")]
    Sysctl {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sysctl {0:?} is not a valid key")]
    SysctlKey(String),
    #[error("setting up the console")]
    Console(#[source] Errno),
    #[error(transparent)]
    Hook(#[from] crate::hooks::HookError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("chdir to cwd ({cwd:?}) set in config.json failed")]
    Cwd {
        cwd: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("entering the container's root")]
    EnterRoot(#[source] Errno),
    #[error("exec: {0:?}: executable file not found in $PATH")]
    NotFound(String),
    #[error("exec: {0:?}: permission denied")]
    NotExecutable(String),
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    #[error("opening exec fifo")]
    Fifo(#[source] Errno),
    #[error("exec {path}")]
    Exec {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

impl ExitCode for InitError {
    /// 127 the program is not found, 126 it cannot be executed; 1 for what the spec asks.
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, NOT_EXECUTABLE, NOT_FOUND, USER_ERROR};
        match self {
            InitError::NotFound(_) | InitError::Exec { source: Errno::ENOENT, .. } => NOT_FOUND,
            InitError::NotExecutable(_) | InitError::Exec { .. } => NOT_EXECUTABLE,
            InitError::SysctlKey(_) | InitError::Cwd { .. } | InitError::Nul(_) => USER_ERROR,
            InitError::Namespace(e) => e.exit_code(),
            InitError::Rootfs(e) => e.exit_code(),
            InitError::Network(e) => e.exit_code(),
            InitError::Hook(e) => e.exit_code(),
            InitError::Process(e) => e.exit_code(),
            InitError::Sync(_)
            | InitError::SyncClosed
            | InitError::SyncProtocol
            | InitError::Stdio(_)
            | InitError::CgroupJoin { .. }
            | InitError::UserRoot(_)
            | InitError::Hostname(..)
            | InitError::Domainname(..)
            | InitError::Sysctl { .. }
            | InitError::Console(_)
            | InitError::EnterRoot(_)
            | InitError::Fifo(_) => INTERNAL,
        }
    }
}

/// What the init needs, prepared by the parent before the clone.
pub struct InitArgs<'a> {
    pub spec: &'a Spec,
    pub bundle: &'a Path,
    pub rootfs: &'a Path,
    pub overlay: Option<&'a Overlay>,
    pub ns: &'a Namespaces,
    pub prepared: &'a Prepared,
    /// The child's end of the sync channel.
    pub sync: &'a SyncChannel,
    /// The state directory (O_PATH), where exec.fifo is.
    pub state_dir: RawFd,
    /// Descriptors to make 0, 1, 2 (else inherited).
    pub stdio: Option<[RawFd; 3]>,
    /// A connected console socket, when process.terminal is set.
    pub console: Option<RawFd>,
    pub preserve_fds: u32,
    pub no_pivot: bool,
    /// Ask the parent to run prestart/createRuntime hooks.
    pub parent_hooks: bool,
    /// Join a new session keyring of this name (runc's `_ses.<id>`), unless `--no-new-keyring`.
    pub session_keyring: Option<CString>,
    /// cgroup v1 `tasks` files the init moves itself into (writing `0`) once the runtime says
    /// go, before anything else; empty when the runtime moves it (a new user namespace, whose
    /// root may not write the host's cgroup files).
    pub cgroup_tasks: &'a [PathBuf],
}

/// The init's body; returns the exit code if anything fails (success never returns).
pub fn run(args: &InitArgs<'_>) -> i32 {
    let mut ready = false;
    let err = match init(args, &mut ready) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let code = err.exit_code();
    let message = error_chain(&err);
    if ready {
        eprintln!("twinbox: {message}");
    } else {
        let _ = args.sync.send(&Msg::Error { code, message });
    }
    code
}

/// Waits for the parent's go-ahead, which carries the container's state document.
fn recv_go(a: &InitArgs<'_>) -> Result<Vec<u8>, InitError> {
    match a.sync.recv().map_err(InitError::Sync)? {
        Some(Msg::Go(s)) => Ok(s),
        None => Err(InitError::SyncClosed),
        Some(_) => Err(InitError::SyncProtocol),
    }
}

fn init(a: &InitArgs<'_>, ready: &mut bool) -> Result<Infallible, InitError> {
    syscall::reset_signals();
    if let Some(fds) = a.stdio {
        setup_stdio(fds, a.preserve_fds)?;
    }
    // "Go" says the parent has made the cgroups (and written the id maps). In a new user
    // namespace nothing can happen before the maps; otherwise the set-up up to the first cgroup
    // mount runs while the parent is still making the v1 cgroups, and waits only there.
    let mut go = None;
    if a.ns.is_new(LinuxNamespaceType::User) {
        go = Some(recv_go(a)?);
    }
    let spec = a.spec;
    let linux = spec.linux().clone().unwrap_or_default();
    let process = spec.process().clone().unwrap_or_default();
    let hooks = spec.hooks().clone().unwrap_or_default();

    OpenNamespaces::open(&a.ns.joins)?.join()?;
    if a.ns.is_new(LinuxNamespaceType::User) {
        become_ns_root(spec)?;
    }
    if let Some(name) = &a.session_keyring {
        // Not fatal where keyrings are unavailable (ENOSYS) or refused (a seccomp'd host).
        if let Err(e) = syscall::join_session_keyring(name) {
            tracing::debug!(error = %e, "joining a new session keyring");
        }
    }
    if let Some(h) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
        LinuxSyscall.sethostname(h).map_err(|e| InitError::Hostname(h.to_string(), e))?;
    }
    if let Some(d) = spec.domainname().as_deref().filter(|d| !d.is_empty()) {
        LinuxSyscall.setdomainname(d).map_err(|e| InitError::Domainname(d.to_string(), e))?;
    }
    if a.ns.is_new(LinuxNamespaceType::Network) {
        network::loopback_up()?;
    }

    // Device nodes get exactly the modes the spec asks for.
    nix::sys::stat::umask(Mode::empty());
    let mounts = spec.mounts().clone().unwrap_or_default();
    let devices = linux.devices().clone().unwrap_or_default();
    let masked = linux.masked_paths().clone().unwrap_or_default();
    let readonly = linux.readonly_paths().clone().unwrap_or_default();
    let cfg = RootfsConfig {
        rootfs: a.rootfs,
        bundle: a.bundle,
        mounts: &mounts,
        devices: &devices,
        propagation: linux.rootfs_propagation().as_deref(),
        overlay: a.overlay,
        readonly_root: spec.root().as_ref().and_then(|r| r.readonly()).unwrap_or(false),
        masked_paths: &masked,
        readonly_paths: &readonly,
        user_ns: a.ns.is_new(LinuxNamespaceType::User),
        host_mounts: !a.ns.contains(LinuxNamespaceType::Mount),
    };
    let mut state_json = Vec::new();
    rootfs::prepare(&LinuxSyscall, &cfg, || -> Result<_, InitError> {
        state_json = match go.take() {
            Some(s) => s,
            None => recv_go(a)?,
        };
        for path in a.cgroup_tasks {
            std::fs::write(path, "0").map_err(|source| InitError::CgroupJoin { path: path.clone(), source })?;
        }
        // Our cgroup directories are only visible as such before unsharing the cgroup namespace.
        let binds = rootfs::cgroup_binds();
        if a.ns.new_cgroup {
            namespaces::unshare(LinuxNamespaceType::Cgroup)?;
        }
        Ok(binds)
    })?;

    if a.parent_hooks {
        a.sync.send(&Msg::HooksRequest).map_err(InitError::Sync)?;
        match a.sync.recv().map_err(InitError::Sync)? {
            Some(Msg::HooksDone) => {}
            None => return Err(InitError::SyncClosed),
            Some(_) => return Err(InitError::SyncProtocol),
        }
    }
    if let Some(list) = hooks.create_container().as_deref() {
        crate::hooks::run("createContainer", list, &state_json)?;
    }

    if cfg.host_mounts {
        rootfs::chroot_into(&LinuxSyscall, a.rootfs)?;
    } else {
        rootfs::pivot(&LinuxSyscall, a.rootfs, a.no_pivot)?;
        rootfs::root_propagation(&LinuxSyscall, cfg.propagation)?;
    }
    // Like runc, make the working directory if the image lacks it (Docker's WORKDIR of a
    // directory no layer has). After pivot_root, so symlinks resolve inside the container; and
    // before finalize, which may make the root read-only.
    let cwd = if process.cwd().as_os_str().is_empty() { PathBuf::from("/") } else { process.cwd().clone() };
    if !cwd.is_dir() {
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(&cwd).map_err(|e| InitError::Cwd {
            cwd: cwd.clone(),
            source: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
    }
    if let Some(sysctl) = linux.sysctl() {
        write_sysctls(sysctl)?;
    }
    if process.terminal().unwrap_or(false) {
        if let Some(sock) = a.console {
            setup_console(sock, &process, true)?;
        }
    }
    rootfs::finalize(&LinuxSyscall, &cfg, Path::new("/"))?;

    let argv = cstrings(process.args().as_deref().unwrap_or(&[]))?;
    let envv = cstrings(process.env().as_deref().unwrap_or(&[]))?;
    nix::sys::stat::umask(Mode::from_bits_truncate(process.user().umask().unwrap_or(0o022)));
    a.prepared.apply()?;
    nix::unistd::chdir(&cwd).map_err(|source| InitError::Cwd { cwd, source })?;
    let program = process.args().as_deref().and_then(|a| a.first()).cloned().unwrap_or_default();
    let path = find_executable(&program, process.env().as_deref().unwrap_or(&[]))?;
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| InitError::Nul(path.display().to_string()))?;

    a.sync.send(&Msg::Ready).map_err(InitError::Sync)?;
    *ready = true;

    wait_for_start(a.state_dir)?;
    if let Some(list) = hooks.start_container().as_deref() {
        crate::hooks::run("startContainer", list, &state_json)?;
    }
    exec(&cpath, &argv, &envv, a.preserve_fds)
}

/// Make the given descriptors 0, 1, 2 (through high copies, so that any overlap between them
/// and 0..2 is harmless).
pub fn setup_stdio(fds: [RawFd; 3], preserve_fds: u32) -> Result<(), InitError> {
    let min = 3 + preserve_fds as RawFd + 3;
    let mut copies = [0; 3];
    for (c, fd) in copies.iter_mut().zip(fds) {
        *c = syscall::dup_above(fd, min).map_err(InitError::Stdio)?;
    }
    for (i, c) in copies.iter().enumerate() {
        syscall::dup2_raw(*c, i as RawFd).map_err(InitError::Stdio)?;
        // SAFETY: `c` is the copy made above, owned by nobody else; closing it once is sound.
        drop(unsafe { OwnedFd::from_raw_fd(*c) });
    }
    Ok(())
}

/// In a new user namespace, become its root (the uid/gid maps are written by now).
fn become_ns_root(spec: &Spec) -> Result<(), InitError> {
    let maps_root = |m: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| {
        m.as_deref().unwrap_or(&[]).iter().any(|m| m.container_id() == 0)
    };
    let linux = spec.linux().clone().unwrap_or_default();
    if maps_root(linux.gid_mappings()) {
        let g = Gid::from_raw(0);
        nix::unistd::setresgid(g, g, g).map_err(InitError::UserRoot)?;
    }
    if maps_root(linux.uid_mappings()) {
        let u = Uid::from_raw(0);
        nix::unistd::setresuid(u, u, u).map_err(InitError::UserRoot)?;
    }
    Ok(())
}

fn write_sysctls(sysctl: &std::collections::HashMap<String, String>) -> Result<(), InitError> {
    for (key, value) in sysctl {
        if key.is_empty() || key.starts_with('/') || key.contains("..") {
            return Err(InitError::SysctlKey(key.clone()));
        }
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        std::fs::write(&path, value).map_err(|source| InitError::Sysctl { key: key.clone(), source })?;
    }
    Ok(())
}

/// Allocate a pty in the container's devpts, send the master to the console socket, make the
/// slave the controlling terminal and stdio (and /dev/console).
pub fn setup_console(
    sock: RawFd,
    process: &oci_spec::runtime::Process,
    bind_dev_console: bool,
) -> Result<(), InitError> {
    let pty = terminal::open_pty().map_err(InitError::Console)?;
    let slave = terminal::open_slave(&pty.slave_path).map_err(InitError::Console)?;
    if let Some(size) = process.console_size() {
        terminal::set_size(pty.master.as_raw_fd(), size.height() as u16, size.width() as u16)
            .map_err(InitError::Console)?;
    }
    terminal::send_fd(sock, pty.master.as_raw_fd(), pty.slave_path.as_os_str().as_bytes())
        .map_err(InitError::Console)?;
    drop(pty.master);
    // /dev/console is the terminal, as in runc.
    let console = Path::new("/dev/console");
    if bind_dev_console && LinuxSyscall.create_file(console, Mode::from_bits_truncate(0o600)).is_ok() {
        let _ = LinuxSyscall.mount(Some(&pty.slave_path), console, None, MsFlags::MS_BIND, None);
    }
    nix::unistd::setsid().map_err(InitError::Console)?;
    terminal::make_controlling(slave.as_raw_fd()).map_err(InitError::Console)?;
    for i in 0..3 {
        syscall::dup2_raw(slave.as_raw_fd(), i).map_err(InitError::Console)?;
    }
    Ok(())
}

/// Block until `start` opens the fifo for reading, then write the byte it waits for.
fn wait_for_start(state_dir: RawFd) -> Result<(), InitError> {
    // SAFETY: `state_dir` is the O_PATH descriptor the parent opened for us and that lives until
    // execve; borrowing it for this call is sound.
    let dir = unsafe { std::os::fd::BorrowedFd::borrow_raw(state_dir) };
    let fifo = loop {
        match nix::fcntl::openat(
            dir.as_fd(),
            crate::state::EXEC_FIFO,
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Err(Errno::EINTR) => continue,
            r => break r.map_err(InitError::Fifo)?,
        }
    };
    nix::unistd::write(&fifo, b"0").map_err(InitError::Fifo)?;
    Ok(())
}

/// Make everything but stdio and the preserved descriptors close on exec, then execve.
pub fn exec(path: &CString, argv: &[CString], envv: &[CString], preserve_fds: u32) -> Result<Infallible, InitError> {
    let first_closed = 3 + preserve_fds as RawFd;
    let _ = syscall::cloexec_from(first_closed);
    for fd in 3..first_closed {
        let _ = syscall::clear_cloexec(fd);
    }
    let err = nix::unistd::execve(path, argv, envv).unwrap_err();
    Err(InitError::Exec { path: PathBuf::from(path.to_string_lossy().into_owned()), source: err })
}

pub fn cstrings(v: &[String]) -> Result<Vec<CString>, InitError> {
    v.iter().map(|s| CString::new(s.as_bytes()).map_err(|_| InitError::Nul(s.clone()))).collect()
}

/// Find `name` the way execvp would, in the PATH of the process environment `env`.
pub fn find_executable(name: &str, env: &[String]) -> Result<PathBuf, InitError> {
    use nix::unistd::{access, AccessFlags};
    if name.is_empty() {
        return Err(InitError::NotFound(name.to_string()));
    }
    let check = |p: &Path| -> Option<bool> {
        let meta = std::fs::metadata(p).ok()?;
        Some(meta.is_file() && access(p, AccessFlags::X_OK).is_ok())
    };
    if name.contains('/') {
        return match check(Path::new(name)) {
            Some(true) => Ok(PathBuf::from(name)),
            Some(false) => Err(InitError::NotExecutable(name.to_string())),
            None => Err(InitError::NotFound(name.to_string())),
        };
    }
    let path_var = env.iter().rev().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
    let mut denied = false;
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(name);
        match check(&candidate) {
            Some(true) => return Ok(candidate),
            Some(false) => denied = true,
            None => {}
        }
    }
    if denied {
        Err(InitError::NotExecutable(name.to_string()))
    } else {
        Err(InitError::NotFound(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for m in [
            Msg::Go(b"{}".to_vec()),
            Msg::HooksRequest,
            Msg::HooksDone,
            Msg::Ready,
            Msg::Error { code: 127, message: "exec: \"x\": not found".into() },
        ] {
            assert_eq!(Msg::decode(&m.encode()), Some(m));
        }
        assert_eq!(Msg::decode(&[]), None);
        assert_eq!(Msg::decode(&[9]), None);
    }

    #[test]
    fn channel_reports_eof() {
        let (a, b) = SyncChannel::pair().unwrap();
        a.send(&Msg::Ready).unwrap();
        assert_eq!(b.recv().unwrap(), Some(Msg::Ready));
        drop(a);
        assert_eq!(b.recv().unwrap(), None);
    }

    #[test]
    fn finds_executables_in_path() {
        let env = vec!["PATH=/nonexistent:/bin:/usr/bin".to_string()];
        assert!(find_executable("sh", &env).unwrap().ends_with("sh"));
        assert!(matches!(find_executable("no-such-program-x", &env), Err(InitError::NotFound(_))));
        let tmp = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(find_executable(tmp.path().to_str().unwrap(), &env), Err(InitError::NotExecutable(_))));
        assert_eq!(find_executable("no-such-program-x", &env).unwrap_err().exit_code(), 127);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(InitError::Exec { path: "/bin/x".into(), source: Errno::ENOENT }.exit_code(), 127);
        assert_eq!(InitError::Exec { path: "/etc/passwd".into(), source: Errno::EACCES }.exit_code(), 126);
        assert_eq!(InitError::Cwd { cwd: "/nope".into(), source: Errno::ENOENT }.exit_code(), 1);
        assert_eq!(InitError::SyncClosed.exit_code(), 125);
        assert_eq!(InitError::Rootfs(RootfsError::Relative { path: "x".into() }).exit_code(), 1);
    }
}

//! The VMM confined as Firecracker's jailer confines its own, after everything the VM needs is
//! open and before any guest code runs:
//!
//! ```text
//! VmBuilder::build (root: /dev/kvm, disks, taps, sockets, kernel, snapshot memory)
//!   └─ Jail::enter: cgroups joined → network namespace (by default the empty one jailed
//!        VMMs share, pinned at [`SHARED_NETNS`]; or a new one, or one given)
//!        → mount namespace: a private tmpfs (read-only, 64 KiB) as /, holding only the
//!          directories the VM still writes (`binds`), the host's tree unmounted
//!        → capabilities, groups and uid/gid dropped (an unprivileged uid of its own),
//!          no_new_privs, not dumpable
//!        → seccomp: the VMM thread's allowlist (seccomp::ThreadKind::Vmm)
//!   └─ Vm::run: each thread it starts narrows its allowlist to its kind (vCPU, I/O, watchdog)
//! ```
//!
//! A system call outside a thread's allowlist raises SIGSYS; the handler (installed here)
//! writes which call and which thread to the report fd (stderr by default) and ends the
//! process with [`FORBIDDEN_CALL_EXIT`].

pub mod seccomp;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub use seccomp::{ThreadKind, FORBIDDEN_CALL_EXIT};

/// Where a confined VMM's uid and gid come from by default: this base plus the VMM's pid, so
/// no two running VMMs share one (nor with a host account: system and user ids stay far below).
pub const VMM_ID_BASE: u32 = 2_100_000_000;

/// Where the network namespace jailed VMMs share by default is pinned (see [`NetNs::Shared`]).
pub const SHARED_NETNS: &str = "/run/twinbox/vmm-netns";

/// Which network namespace a jailed VMM is in. Its taps are open before it moves and keep
/// working in any of them; what a namespace of its own takes from it is the host's network
/// (no route, no interface but a loopback that is down) and the host's abstract UNIX sockets.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetNs {
    /// A new, empty one of its own (about 0.35 ms more per VMM here).
    New,
    /// The one pinned at this path (`/run/netns/NAME`, `/proc/PID/ns/net`).
    Join(PathBuf),
    /// An empty one all jailed VMMs share, pinned at this path: made by the first VMM that
    /// finds none there, and removed by `twinbox system prune` ([`remove_shared_netns`]).
    Shared(PathBuf),
}

/// The directory every jail's private tmpfs is mounted on (in the VMM's own mount namespace;
/// on the host it stays an empty directory).
pub const DEFAULT_ROOT: &str = "/run/twinbox/vmm-root";

/// How to confine a VMM. Plain data (the engine hands it to a VMM process as JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JailConfig {
    /// An empty directory the jail's tmpfs is mounted on, then made the root.
    pub root: PathBuf,
    /// The VMM's uid and gid after the drop (default: [`VMM_ID_BASE`] + pid).
    pub uid: Option<u32>,
    /// Directories kept at their own path inside the jail, writable (where a template's
    /// snapshot is written; for `twinbox vm`, the directory of a vsock's guest-initiated
    /// sockets; the engine binds none: its monitor removes the VM's socket).
    pub binds: Vec<PathBuf>,
    /// Its network namespace (default: the shared one at [`SHARED_NETNS`]).
    pub netns: NetNs,
    /// Files of cgroups to join by writing `0` (`tasks` in a v1 hierarchy, `cgroup.procs` in
    /// cgroup v2): made and sized by the caller.
    pub cgroups: Vec<PathBuf>,
    /// Files (in `binds`) handed to the VMM's uid before the drop, so it can still remove
    /// them when the VM ends: `twinbox vm`'s vsock listening socket.
    #[serde(default)]
    pub owned: Vec<PathBuf>,
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            root: PathBuf::from(DEFAULT_ROOT),
            uid: None,
            binds: Vec::new(),
            netns: NetNs::Shared(PathBuf::from(SHARED_NETNS)),
            cgroups: Vec::new(),
            owned: Vec::new(),
        }
    }
}

/// Errors of confining the VMM. Each names the step; they are twinbox's own failures (125):
/// a confinement that cannot be applied is refused, never skipped.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A step failed.
    #[error("cannot confine the VMM: {step}")]
    Step {
        /// What was being done.
        step: String,
        /// The system's answer.
        #[source]
        source: io::Error,
    },
    /// Other threads run already: they would stay unconfined.
    #[error("cannot confine the VMM: {0} threads run already (a jail is entered before the VM's threads start)")]
    Threads(usize),
    /// A seccomp filter could not be built or installed.
    #[error("cannot confine the VMM: seccomp filter for the {kind} thread")]
    Seccomp {
        /// The thread kind.
        kind: ThreadKind,
        /// What the compiler or the kernel said.
        #[source]
        source: twinbox_runtime::seccomp::SeccompError,
    },
}

impl twinbox_exit::ExitCode for JailError {
    fn exit_code(&self) -> i32 {
        twinbox_exit::INTERNAL
    }
}

fn step(step: impl Into<String>) -> impl FnOnce(io::Error) -> JailError {
    let step = step.into();
    move |source| JailError::Step { step, source }
}

fn errno_result(rc: libc::c_int, what: impl Into<String>) -> Result<(), JailError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(step(what)(io::Error::last_os_error()))
    }
}

fn cstring(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| step(format!("path {} has a NUL byte", path.display()))(io::ErrorKind::InvalidInput.into()))
}

fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let what = format!("mount {} on {}", source.or(fstype).unwrap_or("(remount)"), target.display());
    let c = |s: Option<&str>| {
        s.map(|s| {
            CString::new(s)
                .map_err(|_| step(format!("{what}: {s:?} has a NUL byte"))(io::ErrorKind::InvalidInput.into()))
        })
        .transpose()
    };
    let (source, fstype, data) = (c(source)?, c(fstype)?, c(data)?);
    let target = cstring(target)?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null where
    // mount(2) takes null.
    let rc = unsafe { libc::mount(ptr(&source), target.as_ptr(), ptr(&fstype), flags, ptr(&data).cast()) };
    errno_result(rc, what)
}

/// How many threads this process has (from /proc/self/task).
fn thread_count() -> Result<usize, JailError> {
    Ok(std::fs::read_dir("/proc/self/task").map_err(step("list /proc/self/task"))?.count())
}

/// The highest capability number this kernel knows.
fn last_cap() -> Result<u32, JailError> {
    let text = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").map_err(step("read cap_last_cap"))?;
    text.trim().parse().map_err(|_| step("parse cap_last_cap")(io::ErrorKind::InvalidData.into()))
}

impl JailConfig {
    /// The uid (and gid) the VMM drops to.
    pub fn vmm_id(&self) -> u32 {
        self.uid.unwrap_or_else(|| VMM_ID_BASE + std::process::id())
    }

    /// Confines this process (see the module documentation). Must run before the VM's
    /// threads start, as root; afterwards nothing of the host's file system is reachable but
    /// `binds`, and only the allowlisted system calls work. `report` is where a forbidden
    /// call is named (stderr by default).
    pub fn enter(&self, report: Option<RawFd>) -> Result<(), JailError> {
        let threads = thread_count()?;
        if threads > 1 {
            return Err(JailError::Threads(threads));
        }
        let filters = seccomp::Filters::compile()?;
        let last_cap = last_cap()?;
        let id = self.vmm_id();
        for path in &self.owned {
            std::os::unix::fs::lchown(path, Some(id), Some(id))
                .map_err(step(format!("hand {} to uid {id}", path.display())))?;
        }
        for file in &self.cgroups {
            std::fs::write(file, "0").map_err(step(format!("join the cgroup of {}", file.display())))?;
        }
        match &self.netns {
            NetNs::Join(path) => join_netns(path)?,
            NetNs::New => new_netns()?,
            NetNs::Shared(path) => join_shared_netns(path)?,
        }
        std::fs::create_dir_all(&self.root).map_err(step(format!("create {}", self.root.display())))?;
        // SAFETY: unshare takes flags only.
        errno_result(unsafe { libc::unshare(libc::CLONE_NEWNS) }, "make a mount namespace")?;
        mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)?;
        let hardened = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        mount(Some("tmpfs"), &self.root, Some("tmpfs"), hardened, Some("size=64k,nr_inodes=256,mode=0755"))?;
        for bind in &self.binds {
            let relative = bind.strip_prefix("/").unwrap_or(bind);
            let target = self.root.join(relative);
            std::fs::create_dir_all(&target).map_err(step(format!("create {}", target.display())))?;
            let source = bind.to_str().ok_or_else(|| {
                step(format!("bind {} (a path that is not UTF-8)", bind.display()))(io::ErrorKind::InvalidInput.into())
            })?;
            mount(Some(source), &target, None, libc::MS_BIND | libc::MS_REC, None)?;
            mount(None, &target, None, libc::MS_REMOUNT | libc::MS_BIND | hardened, None)?;
        }
        // pivot_root(".", "."): the old root ends up stacked on the new one, then unmounted.
        std::env::set_current_dir(&self.root).map_err(step(format!("enter {}", self.root.display())))?;
        let dot = CString::new(".").expect("no NUL");
        // SAFETY: both pointers are the same NUL-terminated string, alive for the call.
        let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } as libc::c_int;
        errno_result(rc, format!("make {} the root", self.root.display()))?;
        // SAFETY: the pointer is a NUL-terminated string alive for the call.
        errno_result(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) }, "unmount the host's tree")?;
        std::env::set_current_dir("/").map_err(step("enter the new root"))?;
        mount(None, Path::new("/"), None, libc::MS_REMOUNT | libc::MS_RDONLY | hardened, None)?;

        // A uid change clears the parent-death signal: armed again after it, and if the parent
        // died in between, the signal is due now.
        let mut death_signal: libc::c_int = 0;
        // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer, which lives across the call.
        let rc = unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut death_signal as *mut libc::c_int, 0, 0, 0) };
        errno_result(rc, "read the parent-death signal")?;
        // SAFETY: getppid takes nothing and cannot fail.
        let parent = unsafe { libc::getppid() };
        drop_privileges(id, last_cap)?;
        if death_signal != 0 {
            // SAFETY: prctl with integer arguments only.
            let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong, 0, 0, 0) };
            errno_result(rc, "set the parent-death signal again")?;
            // SAFETY: getppid and raise take no pointers.
            if unsafe { libc::getppid() } != parent {
                // SAFETY: raise takes an integer.
                unsafe { libc::raise(death_signal) };
            }
        }
        seccomp::install_handler(report)?;
        filters.install_process(ThreadKind::Vmm)?;
        Ok(())
    }
}

impl JailConfig {
    /// What a VMM jailed by `self` can reach of the host kernel, measured by probing from
    /// inside it as each thread kind (see `twinbox_probe`; a trapped call counts as
    /// unreachable): the `isolation` figures of `twinbox bench`. Enters the jail as a VMM
    /// would, so this process must be single-threaded and root, and stays confined.
    pub fn probe(&self) -> Result<Vec<(ThreadKind, twinbox_probe::Surface)>, JailError> {
        self.enter(None)?;
        seccomp::install_probe_handler()?;
        let mut out = Vec::new();
        for kind in ThreadKind::ALL {
            let measured = std::thread::spawn(move || {
                if kind != ThreadKind::Vmm {
                    seccomp::confine_thread(kind)?;
                }
                Ok(twinbox_probe::Surface::measure(&seccomp::take_trapped))
            })
            .join()
            .unwrap_or_else(|_| {
                Err(JailError::Step {
                    step: format!("probe the {kind} thread"),
                    source: io::Error::other("it panicked"),
                })
            })?;
            out.push((kind, measured));
        }
        Ok(out)
    }
}

fn new_netns() -> Result<(), JailError> {
    // SAFETY: unshare takes flags only.
    errno_result(unsafe { libc::unshare(libc::CLONE_NEWNET) }, "make a network namespace")
}

fn join_netns(path: &Path) -> Result<(), JailError> {
    let file = std::fs::File::open(path).map_err(step(format!("open {}", path.display())))?;
    join_netns_file(&file, path)
}

fn join_netns_file(file: &std::fs::File, path: &Path) -> Result<(), JailError> {
    // SAFETY: setns takes an fd that is open for the call and a flag.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    errno_result(rc, format!("join the network namespace {}", path.display()))
}

/// The namespace pinned at `path`, if a namespace is pinned there (an nsfs file).
fn pinned_netns(path: &Path) -> Option<std::fs::File> {
    const NSFS_MAGIC: libc::c_long = 0x6e73_6673;
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: statfs is plain data, written whole by fstatfs on success.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs through the pointer, which lives across the call.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    (rc == 0 && st.f_type as libc::c_long == NSFS_MAGIC).then_some(file)
}

/// Joins the shared namespace at `path`, made first (under a lock) when none is pinned there:
/// this process moves into a new one and bind-mounts it at `path`.
fn join_shared_netns(path: &Path) -> Result<(), JailError> {
    if let Some(file) = pinned_netns(path) {
        return join_netns_file(&file, path);
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(step(format!("create {}", dir.display())))?;
    let _lock = lock_shared_netns(path).map_err(step(format!("lock {}", path.with_extension("lock").display())))?;
    if let Some(file) = pinned_netns(path) {
        return join_netns_file(&file, path);
    }
    new_netns()?;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(step(format!("create {}", path.display())))?;
    mount(Some("/proc/self/ns/net"), path, None, libc::MS_BIND, None)
}

/// Unpins the shared network namespace at `path` (VMMs in it keep it as long as they run).
/// Returns whether one was pinned there.
pub fn remove_shared_netns(path: &Path) -> io::Result<bool> {
    if pinned_netns(path).is_none() && !path.with_extension("lock").exists() {
        return Ok(false);
    }
    // Under the lock, which goes with the pin (a VMM waiting for it sees that and retries).
    let _lock = lock_shared_netns(path)?;
    let _ = std::fs::remove_file(path.with_extension("lock"));
    if pinned_netns(path).is_none() {
        return Ok(false);
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the pointer is a NUL-terminated string alive for the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::fs::remove_file(path)?;
    Ok(true)
}

/// The lock beside the shared namespace's pin (`<path>.lock`), held exclusively; taken again
/// when the file was removed (by [`remove_shared_netns`]) while this process waited for it.
fn lock_shared_netns(path: &Path) -> io::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::MetadataExt;
    let lock_path = path.with_extension("lock");
    loop {
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path)?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io::Error::from_raw_os_error(e as i32))?;
        let held = lock.metadata()?;
        match std::fs::metadata(&lock_path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => return Ok(lock),
            Ok(_) | Err(_) => continue,
        }
    }
}

/// Every capability out of the bounding set, no supplementary groups, uid and gid `id`, no
/// capability left in any set, no_new_privs, not dumpable.
fn drop_privileges(id: u32, last_cap: u32) -> Result<(), JailError> {
    for cap in 0..=last_cap {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        errno_result(rc, format!("drop capability {cap} from the bounding set"))?;
    }
    // SAFETY: setgroups with a count of 0 reads no memory.
    errno_result(unsafe { libc::setgroups(0, std::ptr::null()) }, "drop supplementary groups")?;
    // SAFETY: integer arguments only.
    errno_result(unsafe { libc::setresgid(id, id, id) }, format!("set gid {id}"))?;
    // SAFETY: integer arguments only. With KEEPCAPS off (the default), the permitted,
    // effective and ambient sets empty as the uid leaves 0.
    errno_result(unsafe { libc::setresuid(id, id, id) }, format!("set uid {id}"))?;
    // The inheritable set is not emptied by setuid: clear every set explicitly.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [Data::default(); 2];
    // SAFETY: capset reads one header and two data structs (version 3), both alive and laid
    // out as linux/capability.h declares them.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) } as libc::c_int;
    errno_result(rc, "clear the capability sets")?;
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    errno_result(rc, "set no_new_privs")?;
    // SAFETY: prctl with integer arguments only.
    errno_result(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }, "make the VMM not dumpable")?;
    Ok(())
}

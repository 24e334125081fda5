//! The host syscalls the rootfs set-up needs, behind a narrow trait (STYLE habit 4).
//!
//! [`LinuxSyscall`] does them for real; [`RecordingSyscall`] records them so unit tests can
//! assert on the mounts, pivots and device nodes that were asked for, without root.
//!
//! A few raw helpers that the init and exec children need (dup2, close-on-exec sweeps) also live
//! here, so that `unsafe` stays in the modules that own kernel interfaces.

use std::cell::RefCell;
use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{Mode, SFlag};
use nix::sys::statvfs::FsFlags;

/// The syscalls used to build a container's root filesystem.
pub trait Syscall {
    /// mount(2). `None` source/fstype/data are passed as NULL.
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno>;
    /// umount2(2).
    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<(), Errno>;
    /// pivot_root(2).
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> Result<(), Errno>;
    /// chdir(2).
    fn chdir(&self, path: &Path) -> Result<(), Errno>;
    /// chroot(2).
    fn chroot(&self, path: &Path) -> Result<(), Errno>;
    /// mknod(2); `kind` is the file type (S_IFCHR, S_IFBLK, S_IFIFO).
    fn mknod(&self, path: &Path, kind: SFlag, perm: Mode, dev: u64) -> Result<(), Errno>;
    /// chown(2) (does not follow a final symlink: lchown).
    fn lchown(&self, path: &Path, uid: u32, gid: u32) -> Result<(), Errno>;
    /// symlink(2): a link at `link` pointing to `target`.
    fn symlink(&self, target: &Path, link: &Path) -> Result<(), Errno>;
    /// mkdir(2) of one directory.
    fn mkdir(&self, path: &Path, mode: Mode) -> Result<(), Errno>;
    /// Create an empty regular file (O_CREAT|O_EXCL is not required: an existing file is fine).
    fn create_file(&self, path: &Path, mode: Mode) -> Result<(), Errno>;
    /// sethostname(2).
    fn sethostname(&self, name: &str) -> Result<(), Errno>;
    /// setdomainname(2).
    fn setdomainname(&self, name: &str) -> Result<(), Errno>;
    /// The mount flags (nosuid, nodev, noexec, atime flags) of the mount holding `path`, which
    /// a bind remount must keep (the kernel refuses to clear locked flags in a user namespace).
    fn mount_flags_of(&self, path: &Path) -> Result<MsFlags, Errno>;
}

/// The real thing.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscall;

impl Syscall for LinuxSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno> {
        nix::mount::mount(source, target, fstype, flags, data)
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<(), Errno> {
        nix::mount::umount2(target, flags)
    }

    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> Result<(), Errno> {
        nix::unistd::pivot_root(new_root, put_old)
    }

    fn chdir(&self, path: &Path) -> Result<(), Errno> {
        nix::unistd::chdir(path)
    }

    fn chroot(&self, path: &Path) -> Result<(), Errno> {
        nix::unistd::chroot(path)
    }

    fn mknod(&self, path: &Path, kind: SFlag, perm: Mode, dev: u64) -> Result<(), Errno> {
        nix::sys::stat::mknod(path, kind, perm, dev)
    }

    fn lchown(&self, path: &Path, uid: u32, gid: u32) -> Result<(), Errno> {
        let c = cstring(path)?;
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
        Errno::result(unsafe { libc::lchown(c.as_ptr(), uid, gid) }).map(drop)
    }

    fn symlink(&self, target: &Path, link: &Path) -> Result<(), Errno> {
        std::os::unix::fs::symlink(target, link).map_err(io_errno)
    }

    fn mkdir(&self, path: &Path, mode: Mode) -> Result<(), Errno> {
        nix::unistd::mkdir(path, mode)
    }

    fn create_file(&self, path: &Path, mode: Mode) -> Result<(), Errno> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(mode.bits())
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map(drop)
            .map_err(io_errno)
    }

    fn sethostname(&self, name: &str) -> Result<(), Errno> {
        nix::unistd::sethostname(name)
    }

    fn setdomainname(&self, name: &str) -> Result<(), Errno> {
        // SAFETY: the pointer and length describe `name`'s bytes, valid for the call.
        Errno::result(unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) }).map(drop)
    }

    fn mount_flags_of(&self, path: &Path) -> Result<MsFlags, Errno> {
        let st = nix::sys::statvfs::statvfs(path)?;
        Ok(ms_flags_from_statvfs(st.flags()))
    }
}

/// Translate statvfs flags into the mount flags a bind remount must carry over.
pub fn ms_flags_from_statvfs(f: FsFlags) -> MsFlags {
    let mut out = MsFlags::empty();
    for (st, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(st) {
            out |= ms;
        }
    }
    out
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Mount { source: Option<PathBuf>, target: PathBuf, fstype: Option<String>, flags: MsFlags, data: Option<String> },
    Umount2 { target: PathBuf, flags: MntFlags },
    PivotRoot { new_root: PathBuf, put_old: PathBuf },
    Chdir(PathBuf),
    Chroot(PathBuf),
    Mknod { path: PathBuf, kind: SFlag, perm: Mode, dev: u64 },
    Lchown { path: PathBuf, uid: u32, gid: u32 },
    Symlink { target: PathBuf, link: PathBuf },
    Mkdir(PathBuf),
    CreateFile(PathBuf),
    Sethostname(String),
    Setdomainname(String),
}

/// Records every call and succeeds, unless told to fail a given mount target.
#[derive(Debug, Default)]
pub struct RecordingSyscall {
    calls: RefCell<Vec<Call>>,
    fail_mount_on: RefCell<Vec<(PathBuf, Errno)>>,
    fail_mknod: RefCell<Option<Errno>>,
}

impl RecordingSyscall {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    /// Only the mount calls, as `(source, target, fstype, flags, data)`.
    pub fn mounts(&self) -> Vec<Call> {
        self.calls.borrow().iter().filter(|c| matches!(c, Call::Mount { .. })).cloned().collect()
    }

    /// Make the next mounts onto `target` fail with `errno`.
    pub fn fail_mount_on(&self, target: impl Into<PathBuf>, errno: Errno) {
        self.fail_mount_on.borrow_mut().push((target.into(), errno));
    }

    /// Make every mknod fail (as in a user namespace).
    pub fn fail_mknod(&self, errno: Errno) {
        *self.fail_mknod.borrow_mut() = Some(errno);
    }

    fn push(&self, c: Call) {
        self.calls.borrow_mut().push(c);
    }
}

impl Syscall for RecordingSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno> {
        self.push(Call::Mount {
            source: source.map(Path::to_path_buf),
            target: target.to_path_buf(),
            fstype: fstype.map(str::to_string),
            flags,
            data: data.map(str::to_string),
        });
        if let Some((_, e)) = self.fail_mount_on.borrow().iter().find(|(t, _)| t == target) {
            return Err(*e);
        }
        Ok(())
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<(), Errno> {
        self.push(Call::Umount2 { target: target.to_path_buf(), flags });
        Ok(())
    }

    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> Result<(), Errno> {
        self.push(Call::PivotRoot { new_root: new_root.to_path_buf(), put_old: put_old.to_path_buf() });
        Ok(())
    }

    fn chdir(&self, path: &Path) -> Result<(), Errno> {
        self.push(Call::Chdir(path.to_path_buf()));
        Ok(())
    }

    fn chroot(&self, path: &Path) -> Result<(), Errno> {
        self.push(Call::Chroot(path.to_path_buf()));
        Ok(())
    }

    fn mknod(&self, path: &Path, kind: SFlag, perm: Mode, dev: u64) -> Result<(), Errno> {
        self.push(Call::Mknod { path: path.to_path_buf(), kind, perm, dev });
        match *self.fail_mknod.borrow() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn lchown(&self, path: &Path, uid: u32, gid: u32) -> Result<(), Errno> {
        self.push(Call::Lchown { path: path.to_path_buf(), uid, gid });
        Ok(())
    }

    fn symlink(&self, target: &Path, link: &Path) -> Result<(), Errno> {
        self.push(Call::Symlink { target: target.to_path_buf(), link: link.to_path_buf() });
        Ok(())
    }

    fn mkdir(&self, path: &Path, _mode: Mode) -> Result<(), Errno> {
        self.push(Call::Mkdir(path.to_path_buf()));
        Ok(())
    }

    fn create_file(&self, path: &Path, _mode: Mode) -> Result<(), Errno> {
        self.push(Call::CreateFile(path.to_path_buf()));
        Ok(())
    }

    fn sethostname(&self, name: &str) -> Result<(), Errno> {
        self.push(Call::Sethostname(name.to_string()));
        Ok(())
    }

    fn setdomainname(&self, name: &str) -> Result<(), Errno> {
        self.push(Call::Setdomainname(name.to_string()));
        Ok(())
    }

    fn mount_flags_of(&self, _path: &Path) -> Result<MsFlags, Errno> {
        Ok(MsFlags::empty())
    }
}

/// An io::Error's errno (EIO when it has none).
pub fn io_errno(e: std::io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO)
}

/// A path as a C string (EINVAL if it holds a NUL byte).
pub fn cstring(p: &Path) -> Result<CString, Errno> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)
}

// ---------------------------------------------------------------------------------------------
// Raw helpers for the init and exec children.

/// dup2(2) on raw descriptors: the child's stdio is set up before any Rust object owns it.
pub fn dup2_raw(old: RawFd, new: RawFd) -> Result<(), Errno> {
    // SAFETY: dup2 only manipulates the descriptor table; an invalid `old` fails with EBADF.
    Errno::result(unsafe { libc::dup2(old, new) }).map(drop)
}

/// fcntl(F_DUPFD_CLOEXEC): a copy of `fd` numbered at least `min`.
pub fn dup_above(fd: RawFd, min: RawFd) -> Result<RawFd, Errno> {
    // SAFETY: fcntl with F_DUPFD_CLOEXEC only creates a new descriptor.
    Errno::result(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) })
}

/// Mark every descriptor numbered `from` or above close-on-exec, so that nothing the runtime
/// (or a library caller) had open leaks into the container process.
pub fn cloexec_from(from: RawFd) -> Result<(), Errno> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on descriptors.
    let r = unsafe {
        libc::syscall(libc::SYS_close_range, from as libc::c_uint, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC)
    };
    if r == 0 {
        return Ok(());
    }
    // Older kernels: walk /proc/self/fd.
    let dir = std::fs::read_dir("/proc/self/fd").map_err(io_errno)?;
    let fds: Vec<RawFd> =
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).filter(|fd| *fd >= from).collect();
    for fd in fds {
        // SAFETY: setting FD_CLOEXEC on a descriptor number; a stale one fails with EBADF.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

/// Clear close-on-exec on `fd` (for descriptors that must survive execve).
pub fn clear_cloexec(fd: RawFd) -> Result<(), Errno> {
    // SAFETY: F_SETFD only changes a descriptor flag.
    Errno::result(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }).map(drop)
}

/// Exit immediately without running atexit handlers or flushing the parent's stdio buffers
/// (for forked children).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and is async-signal-safe.
    unsafe { libc::_exit(code) }
}

/// Reset every signal handler to its default and unblock all signals (a forked child inherits
/// the runtime's mask, e.g. `run` blocking the signals it forwards).
pub fn reset_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL cannot break memory safety.
        let _ = unsafe { sigaction(sig, &dfl) };
    }
    let _ = SigSet::empty().thread_set_mask();
}

/// keyctl(KEYCTL_JOIN_SESSION_KEYRING, name): give the process a new session keyring, so that
/// containers do not share the caller's.
pub fn join_session_keyring(name: &std::ffi::CStr) -> Result<(), Errno> {
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
    // SAFETY: keyctl reads the NUL-terminated name, valid for the duration of the call.
    let r = unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, name.as_ptr()) };
    Errno::result(r).map(drop)
}

//! The system calls the agent makes, as safe functions returning `io::Result`. With the port
//! I/O of `ports`, the only place with `unsafe`.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::ptr::NonNull;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The text of an errno, without std's " (os error N)" suffix: "No such file or directory".
pub fn errno_text(err: &io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(i) if err.raw_os_error().is_some() => text[..i].to_string(),
        _ => text,
    }
}

/// mount(2). `source` and `fstype` may be absent (remounts, propagation changes).
pub fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstring).transpose()?;
    let target = cstring(target)?;
    let fstype = fstype.map(cstring).transpose()?;
    let data = data.map(cstring).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call; the kernel
    // only reads them.
    check(unsafe { libc::mount(ptr(&source), target.as_ptr(), ptr(&fstype), flags, ptr(&data).cast()) })?;
    Ok(())
}

/// umount(2).
pub fn umount(target: &str) -> io::Result<()> {
    let target = cstring(target)?;
    // SAFETY: `target` is a NUL-terminated string that outlives the call.
    check(unsafe { libc::umount(target.as_ptr()) })?;
    Ok(())
}

/// mknod(2) of a character device.
pub fn mknod_char(path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let path = cstring(path)?;
    // SAFETY: `path` is a NUL-terminated string alive for the call.
    check(unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | mode, libc::makedev(major, minor)) })?;
    Ok(())
}

/// Sets the process's umask, returning the old one.
pub fn umask(mask: u32) -> u32 {
    // SAFETY: umask(2) cannot fail and touches no memory.
    unsafe { libc::umask(mask) }
}

/// sethostname(2).
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the kernel reads `name.len()` bytes from a live slice.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

/// ioperm(2): grants (`on`) or drops this process's access to ports `from..from + num`.
pub fn ioperm(from: u16, num: u16, on: bool) -> io::Result<()> {
    // SAFETY: ioperm only changes this task's I/O permission bitmap.
    check(unsafe { libc::ioperm(from.into(), num.into(), on.into()) })?;
    Ok(())
}

/// A pipe, both ends close-on-exec: (read, write).
pub fn pipe() -> io::Result<(File, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the two-element array.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors were just created by pipe2 and nothing else owns them.
    Ok(unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// unshare(2).
pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare changes this process's namespaces and touches no memory of ours.
    check(unsafe { libc::unshare(flags) })?;
    Ok(())
}

/// fork(2): `Some(pid)` in the parent, `None` in the child.
///
/// The agent is single-threaded, so the child may keep running Rust code (allocations
/// included) until it execs.
pub fn fork() -> io::Result<Option<libc::pid_t>> {
    // SAFETY: the agent has a single thread, so no lock is held by a thread the child would
    // lack; the child only runs the agent's own set-up code and then execs or _exits.
    let pid = check(unsafe { libc::fork() })?;
    Ok((pid != 0).then_some(pid))
}

/// waitpid(-1): the next child to end and its wait status. Retries on EINTR.
pub fn wait_any() -> io::Result<(libc::pid_t, i32)> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a live local.
        match check(unsafe { libc::waitpid(-1, &mut status, 0) }) {
            Ok(pid) => return Ok((pid, status)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// waitpid(pid): its wait status. Retries on EINTR.
pub fn wait_pid(pid: libc::pid_t) -> io::Result<i32> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a live local.
        match check(unsafe { libc::waitpid(pid, &mut status, 0) }) {
            Ok(_) => return Ok(status),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// poll(2) without a timeout. Retries on EINTR.
pub fn poll(fds: &mut [libc::pollfd]) -> io::Result<()> {
    loop {
        // SAFETY: the kernel reads and writes `fds.len()` pollfd entries of a live slice.
        match check(unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) }) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// dup2(2); the new descriptor is not close-on-exec.
pub fn dup2(old: &impl AsRawFd, new: RawFd) -> io::Result<()> {
    // SAFETY: dup2 only changes the descriptor table; `new` is one of the standard descriptors
    // the caller means to replace.
    check(unsafe { libc::dup2(old.as_raw_fd(), new) })?;
    Ok(())
}

/// Makes `slave` (a pty) the controlling terminal of a new session led by the caller.
pub fn controlling_terminal(slave: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: setsid takes no arguments.
    check(unsafe { libc::setsid() })?;
    // SAFETY: TIOCSCTTY takes an int argument by value (0: do not steal it from another session).
    check(unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) })?;
    Ok(())
}

/// A new pty of the devpts instance whose `ptmx` is at `ptmx`: its master (non-blocking,
/// close-on-exec, not a controlling terminal of the agent) and its number, the slave being
/// `pts/N` of that instance.
pub fn open_pty(ptmx: &str) -> io::Result<(File, u32)> {
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(ptmx)?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from a live local.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
    let mut number: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int into a live local.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut number) })?;
    Ok((master, number))
}

/// Flushes every file system's dirty data to its disk (the volumes, before the VM ends).
pub fn sync() {
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
}

/// Sets the window size of terminal `fd`.
pub fn set_window_size(fd: &impl AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from a live local.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) })?;
    Ok(())
}

/// Closes every descriptor from 3 up except those in `keep`: a forked child that never
/// execs (so close-on-exec does not apply) must not hold the agent's other descriptors, the
/// write end of another process's input among them.
pub fn close_all_but(keep: &[RawFd]) {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|fd| *fd >= 3).collect();
    keep.sort_unstable();
    let mut from: libc::c_uint = 3;
    for fd in keep {
        let fd = fd as libc::c_uint;
        if fd > from {
            // SAFETY: close_range takes plain integers; the caller owns no descriptor in it.
            unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0) };
        }
        from = from.max(fd + 1);
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, libc::c_uint::MAX, 0) };
}

/// A pidfd of child `pid`: readable once it has ended (it is not reaped by that).
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sets O_NONBLOCK on `fd`.
pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: F_SETFL takes the flags by value.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// waitpid(pid, WNOHANG): its wait status if it has ended.
pub fn try_wait_pid(pid: libc::pid_t) -> io::Result<Option<i32>> {
    let mut status = 0;
    // SAFETY: waitpid writes the status into a live local.
    let reaped = check(unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) })?;
    Ok((reaped == pid).then_some(status))
}

/// setgroups(2).
pub fn setgroups(gids: &[u32]) -> io::Result<()> {
    // SAFETY: the kernel reads `gids.len()` gid_t (u32) values from a live slice.
    check(unsafe { libc::setgroups(gids.len(), gids.as_ptr()) })?;
    Ok(())
}

/// setgid(2). The agent has one thread, so the raw system call is enough.
pub fn setgid(gid: u32) -> io::Result<()> {
    // SAFETY: setgid touches no memory of ours.
    check(unsafe { libc::setgid(gid) })?;
    Ok(())
}

/// setuid(2).
pub fn setuid(uid: u32) -> io::Result<()> {
    // SAFETY: setuid touches no memory of ours.
    check(unsafe { libc::setuid(uid) })?;
    Ok(())
}

/// Whether the caller may execute `path` (access(2) with X_OK, real ids).
pub fn may_execute(path: &CStr) -> bool {
    // SAFETY: `path` is NUL-terminated and alive for the call.
    unsafe { libc::access(path.as_ptr(), libc::X_OK) == 0 }
}

/// Unblocks every signal and puts every disposition back to the default, so the workload
/// starts as from a fresh init (Rust's runtime ignores SIGPIPE, which execve would keep).
pub fn reset_signals() -> io::Result<()> {
    // SAFETY: an all-zero sigset_t is valid storage that sigemptyset initialises.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is live storage for the whole call.
    check(unsafe { libc::sigemptyset(&mut set) })?;
    // SAFETY: `set` is initialised; the old mask is not asked for.
    check(unsafe { libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) })?;
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: SIG_DFL installs no handler; signals glibc reserves for itself refuse the
        // change with EINVAL, which is ignored.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    Ok(())
}

/// execve(2); returns only on failure.
pub fn execve(path: &CStr, argv: &[CString], envp: &[CString]) -> io::Error {
    let argv: Vec<*const libc::c_char> =
        argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let envp: Vec<*const libc::c_char> =
        envp.iter().map(|e| e.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    // SAFETY: `path` and every string pointer are NUL-terminated and alive for the call; both
    // arrays end with a null pointer.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}

/// _exit(2): ends the process at once, running no destructor or atexit handler (what a forked
/// child that failed to exec must do).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and needs no invariant.
    unsafe { libc::_exit(code) }
}

/// reboot(RB_AUTOBOOT): restarts the machine, which ends a twinbox VM. Returns on failure.
pub fn reboot() -> io::Error {
    // SAFETY: reboot with a valid command; it returns only on failure.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    io::Error::last_os_error()
}

/// `RNDADDENTROPY` of linux/random.h, `_IOW('R', 0x03, int[2])` (libc has no RND* constants).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` of linux/random.h, `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// A `struct rand_pool_info` holding `entropy`, in 32-bit words as the kernel lays it out:
/// `entropy_count` (the bits credited: all of them), `buf_size` (bytes), then the bytes.
pub fn rand_pool_info(entropy: &[u8]) -> io::Result<Vec<u32>> {
    let too_big = || io::Error::from_raw_os_error(libc::E2BIG);
    let bytes = i32::try_from(entropy.len()).map_err(|_| too_big())?;
    let bits = bytes.checked_mul(8).ok_or_else(too_big)?;
    let mut words = vec![bits as u32, bytes as u32];
    words.extend(entropy.chunks(4).map(|c| {
        let mut word = [0u8; 4];
        word[..c.len()].copy_from_slice(c);
        u32::from_ne_bytes(word)
    }));
    Ok(words)
}

/// Adds `entropy` to the kernel's random pool, credited in full (RNDADDENTROPY on
/// /dev/urandom), then makes the CRNG reseed from the pool at once (RNDRESEEDCRNG): what a
/// VM restored from a snapshot needs before anything draws random numbers.
pub fn add_entropy(entropy: &[u8]) -> io::Result<()> {
    let info = rand_pool_info(entropy)?;
    let urandom = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // SAFETY: RNDADDENTROPY reads one rand_pool_info: two ints and then `buf_size` bytes, all
    // within `info`, which is alive for the call and 4-byte aligned.
    check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) })?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) })?;
    Ok(())
}

/// The `timespec` of `ns` nanoseconds.
pub fn timespec(ns: u64) -> libc::timespec {
    const NS: u64 = 1_000_000_000;
    // Seconds of a u64 of nanoseconds (< 2^35) fit a time_t, and the rest is below 10^9.
    libc::timespec { tv_sec: (ns / NS) as libc::time_t, tv_nsec: (ns % NS) as libc::c_long }
}

/// Sets CLOCK_REALTIME to `ns` nanoseconds since the Unix epoch.
pub fn set_realtime(ns: u64) -> io::Result<()> {
    let ts = timespec(ns);
    // SAFETY: clock_settime reads one timespec from a live local.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })?;
    Ok(())
}

/// Milliseconds since boot (CLOCK_BOOTTIME).
pub fn ms_since_boot() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into a live timespec; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

const PAGE_SIZE: usize = 4096;

/// One page of physical memory mapped through `/dev/mem`, where the boot timer lives.
#[derive(Debug)]
pub struct PhysPage {
    page: NonNull<u8>,
}

impl PhysPage {
    /// Maps the page at physical address `addr` (page-aligned), shared and uncached (O_SYNC).
    pub fn map(addr: u64) -> io::Result<Self> {
        let mem = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_SYNC).open("/dev/mem")?;
        let offset = libc::off_t::try_from(addr).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a new shared mapping of one page of /dev/mem at a place of the kernel's
        // choosing; it aliases no Rust object. Closing `mem` afterwards keeps the mapping.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mem.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(ptr.cast()).map(|page| PhysPage { page }).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))
    }

    /// A volatile byte write at the start of the page: an MMIO write the VMM sees.
    pub fn write_byte(&self, value: u8) {
        // SAFETY: `page` is a live, writable mapping of PAGE_SIZE bytes owned by `self`; a
        // volatile write is what device memory needs.
        unsafe { std::ptr::write_volatile(self.page.as_ptr(), value) }
    }
}

impl Drop for PhysPage {
    fn drop(&mut self) {
        // SAFETY: `page` is the mapping `map` made, of PAGE_SIZE bytes, and nothing uses it
        // after `self`.
        unsafe { libc::munmap(self.page.as_ptr().cast(), PAGE_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_text_drops_the_os_error_suffix() {
        assert_eq!(errno_text(&io::Error::from_raw_os_error(libc::ENOENT)), "No such file or directory");
        assert_eq!(errno_text(&io::Error::other("plain")), "plain");
    }

    #[test]
    fn rand_pool_info_counts_bits_then_bytes_then_holds_them() {
        let entropy: Vec<u8> = (1..=6).collect();
        let info = rand_pool_info(&entropy).unwrap();
        let bytes: Vec<u8> = info.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(&bytes[..4], &48i32.to_ne_bytes(), "entropy_count: bits");
        assert_eq!(&bytes[4..8], &6i32.to_ne_bytes(), "buf_size: bytes");
        assert_eq!(&bytes[8..], &[1, 2, 3, 4, 5, 6, 0, 0], "the bytes, padded to a word");
        let info = rand_pool_info(&[0xab; 64]).unwrap();
        assert_eq!((info.len(), info[0], info[1]), (2 + 16, 512, 64), "what the host sends");
        assert_eq!(rand_pool_info(&[]).unwrap(), [0, 0]);
    }

    #[test]
    fn ioctl_numbers_are_linuxs() {
        // _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr; _IOC_WRITE = 1.
        let ioc = |dir: libc::c_ulong, nr: libc::c_ulong, size: libc::c_ulong| {
            dir << 30 | size << 16 | (b'R' as libc::c_ulong) << 8 | nr
        };
        assert_eq!(RNDADDENTROPY, ioc(1, 0x03, 2 * std::mem::size_of::<libc::c_int>() as libc::c_ulong));
        assert_eq!(RNDRESEEDCRNG, ioc(0, 0x07, 0));
    }

    #[test]
    fn nanoseconds_split_into_a_timespec() {
        let ts = timespec(1_700_000_000_123_456_789);
        assert_eq!((ts.tv_sec, ts.tv_nsec), (1_700_000_000, 123_456_789));
        let ts = timespec(u64::MAX);
        assert_eq!((ts.tv_sec, ts.tv_nsec), (18_446_744_073, 709_551_615));
    }

    #[test]
    fn pipes_close_on_exec_and_carry_bytes() {
        use std::io::{Read, Write};
        let (mut r, w) = pipe().unwrap();
        // SAFETY: F_GETFD on a descriptor we own.
        let flags = unsafe { libc::fcntl(r.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        File::from(w).write_all(b"abc").unwrap();
        let mut got = String::new();
        r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "abc");
    }
}

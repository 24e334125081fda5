//! Each VMM thread's system-call allowlist, installed per thread.
//!
//! The lists are written as OCI seccomp profiles (default action: trap) and compiled by the
//! runtime's compiler (`twinbox_runtime::seccomp`: argument comparisons by seccompiler, the
//! syscall number found by binary search). A linear chain of comparisons, as
//! `seccompiler::SeccompFilter` emits, cost 275 µs per install here against 75 µs: the kernel
//! runs every new filter once for every syscall number to cache the calls it always allows,
//! and two installs (the VMM's, the boot vCPU's) are on the way to the guest's first
//! instruction.
//!
//! The VMM thread's list (the main thread, once jailed) is the widest: threads inherit their
//! creator's filter, so it holds what starting a thread takes. Each thread [`Vm::run`] starts
//! then stacks the list of its kind on top; the kernel applies both, so a thread can only
//! narrow. Anything else raises SIGSYS, which [`install_handler`]'s handler reports by call
//! and thread before the process ends with [`FORBIDDEN_CALL_EXIT`].
//!
//! `ioctl` is filtered by request number: a vCPU thread may run its vCPU and read what an exit
//! report needs, route MSIs (the I/O APIC), set a tap's offloads (as the guest's driver takes
//! its features) and set a socket non-blocking; an I/O thread only the latter.
//!
//! [`Vm::run`]: crate::Vm::run

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use kvm_bindings::{kvm_irq_routing, kvm_mp_state, kvm_msi, kvm_regs};
use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};
use twinbox_runtime::seccomp::Filter;

use super::JailError;

/// The exit status of a VMM that made a forbidden system call (128 + SIGSYS, as a shell shows
/// a process killed by that signal).
pub const FORBIDDEN_CALL_EXIT: i32 = 128 + libc::SIGSYS;

/// The kinds of VMM thread, each with its allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum ThreadKind {
    /// The main thread: starts the others, waits for them, writes a template's snapshot.
    Vmm = 1,
    /// A vCPU's run loop, and the device emulation its exits reach.
    Vcpu = 2,
    /// A device's receive loop (network card, vsock).
    Io = 3,
    /// The watchdog that kicks vCPUs out of KVM_RUN.
    Watchdog = 4,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 4] = [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Io, ThreadKind::Watchdog];

    /// Its name in JSON: `vmm`, `vcpu`, `io`, `watchdog`.
    pub fn key(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Io => "io",
            ThreadKind::Watchdog => "watchdog",
        }
    }

    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "VMM",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Io => "I/O",
            ThreadKind::Watchdog => "watchdog",
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

const KVMIO: u32 = 0xAE;
vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
vmm_sys_util::ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
/// A tap's offloads, set as the guest's driver acknowledges its features.
const TUNSETOFFLOAD: u64 = libc::TUNSETOFFLOAD;

/// What every thread may call: memory, locks, time, signals' return, its own end, reads and
/// writes on descriptors it holds.
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// A disk's reads, writes and flushes (virtio-blk; a template's snapshot file).
const DISK_IO: &[libc::c_long] =
    &[libc::SYS_pread64, libc::SYS_pwrite64, libc::SYS_preadv, libc::SYS_pwritev, libc::SYS_fsync, libc::SYS_fdatasync];

/// Sockets and polling, for the vsock and network devices' data paths.
const SOCKETS: &[libc::c_long] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_fcntl,
    libc::SYS_accept4,
    libc::SYS_getsockopt,
];

/// A kind's list: syscall numbers allowed whatever their arguments, and numbers allowed when
/// one argument has one of some values (`(index, value, mask)`: `arg & mask == value`).
#[derive(Default)]
struct Allowlist {
    plain: Vec<libc::c_long>,
    with_arg: BTreeMap<libc::c_long, Vec<(u32, u64, u64)>>,
    /// Numbers that fail with an errno instead of trapping: what a caller falls back from.
    failing: Vec<(libc::c_long, i32)>,
}

impl Allowlist {
    fn allow(&mut self, calls: &[libc::c_long]) {
        self.plain.extend_from_slice(calls);
    }

    fn allow_if(&mut self, nr: libc::c_long, index: u32, values: &[u64]) {
        self.with_arg.entry(nr).or_default().extend(values.iter().map(|&v| (index, v, u64::MAX)));
    }

    fn allow_if_masked(&mut self, nr: libc::c_long, index: u32, mask: u64, value: u64) {
        self.with_arg.entry(nr).or_default().push((index, value, mask));
    }

    fn fail_with(&mut self, nr: libc::c_long, errno: i32) {
        self.failing.push((nr, errno));
    }

    /// The OCI profile: these allowed, anything else trapped.
    fn profile(&self) -> LinuxSeccomp {
        let name = |nr: libc::c_long| -> String {
            syscalls::Sysno::new(nr as usize).map_or_else(|| format!("unknown{nr}"), |s| s.name().to_owned())
        };
        let allow = |names: Vec<String>, args: Option<Vec<LinuxSeccompArg>>| -> LinuxSyscall {
            let mut b = LinuxSyscallBuilder::default().names(names).action(LinuxSeccompAction::ScmpActAllow);
            if let Some(args) = args {
                b = b.args(args);
            }
            b.build().expect("a syscall rule")
        };
        let mut rules = vec![allow(self.plain.iter().map(|&nr| name(nr)).collect(), None)];
        for (&nr, alternatives) in &self.with_arg {
            for &(index, value, mask) in alternatives {
                let b = LinuxSeccompArgBuilder::default().index(index as usize);
                let arg = if mask == u64::MAX {
                    b.value(value).op(LinuxSeccompOperator::ScmpCmpEq)
                } else {
                    b.value(mask).value_two(value).op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                };
                let arg = arg.build().expect("a syscall argument rule");
                rules.push(allow(vec![name(nr)], Some(vec![arg])));
            }
        }
        for &(nr, errno) in &self.failing {
            let rule = LinuxSyscallBuilder::default()
                .names(vec![name(nr)])
                .action(LinuxSeccompAction::ScmpActErrno)
                .errno_ret(errno as u32)
                .build()
                .expect("a syscall rule");
            rules.push(rule);
        }
        LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActTrap)
            .syscalls(rules)
            .build()
            .expect("a seccomp profile")
    }

    /// Every syscall number it names (with or without conditions).
    #[cfg(test)]
    fn numbers(&self) -> std::collections::BTreeSet<libc::c_long> {
        self.plain.iter().copied().chain(self.with_arg.keys().copied()).collect()
    }
}

fn allowlist(kind: ThreadKind) -> Allowlist {
    let mut list = Allowlist::default();
    list.allow(COMMON);
    let fionbio = libc::FIONBIO;
    match kind {
        ThreadKind::Vmm => {
            list.allow(SOCKETS);
            // Threads: their creation (clone with CLONE_THREAD only: no new process and no
            // namespace; clone3, whose flags sit in memory a filter cannot read, fails with
            // ENOSYS, and glibc's pthread_create falls back to clone), and what a new thread
            // does before it narrows its list.
            let thread = libc::CLONE_THREAD as u64;
            list.allow_if_masked(libc::SYS_clone, 0, thread, thread);
            list.fail_with(libc::SYS_clone3, libc::ENOSYS);
            list.allow(&[
                libc::SYS_set_robust_list,
                libc::SYS_rseq,
                libc::SYS_sched_getaffinity,
                libc::SYS_rt_sigaction,
                libc::SYS_tgkill,
                libc::SYS_eventfd2,
                libc::SYS_epoll_create1,
                libc::SYS_dup,
                libc::SYS_fstat,
                libc::SYS_newfstatat,
                libc::SYS_statx,
                libc::SYS_lseek,
                // A template's snapshot: files written in a bound directory.
                libc::SYS_openat,
                libc::SYS_mkdir,
                libc::SYS_mkdirat,
                libc::SYS_rename,
                libc::SYS_rmdir,
                libc::SYS_renameat,
                libc::SYS_renameat2,
                libc::SYS_unlinkat,
                // Its sockets removed as the VM ends.
                libc::SYS_unlink,
                libc::SYS_ftruncate,
                libc::SYS_fallocate,
                libc::SYS_fchmod,
                libc::SYS_getdents64,
                // What the vCPU threads stack on it (a stacked filter only narrows).
                libc::SYS_connect,
            ]);
            list.allow(DISK_IO);
            list.allow_if(libc::SYS_socket, 0, &[libc::AF_UNIX as u64]);
            // prctl: a new thread's name.
            list.allow_if(libc::SYS_prctl, 0, &[libc::PR_SET_NAME as u64]);
            // seccomp: only adding a filter (which can only narrow).
            list.allow_if(libc::SYS_seccomp, 0, &[u64::from(libc::SECCOMP_SET_MODE_FILTER)]);
            // KVM's vCPU and VM requests (type 0xAE: a template's snapshot reads every vCPU's
            // state), a tap's offloads, a socket set non-blocking.
            list.allow_if_masked(libc::SYS_ioctl, 1, 0xff00, u64::from(KVMIO) << 8);
            list.allow_if(libc::SYS_ioctl, 1, &[fionbio, TUNSETOFFLOAD]);
        }
        ThreadKind::Vcpu => {
            // Disks, vsock connections to host sockets (Firecracker's `PATH_PORT`), the data
            // paths of every device, kicks of the other vCPUs when the VM ends.
            list.allow(SOCKETS);
            list.allow(DISK_IO);
            list.allow(&[libc::SYS_connect, libc::SYS_tgkill]);
            list.allow_if(libc::SYS_socket, 0, &[libc::AF_UNIX as u64]);
            list.allow_if(
                libc::SYS_ioctl,
                1,
                &[
                    KVM_RUN(),
                    KVM_GET_REGS(),
                    KVM_GET_MP_STATE(),
                    KVM_SET_GSI_ROUTING(),
                    KVM_SIGNAL_MSI(),
                    TUNSETOFFLOAD,
                    fionbio,
                ],
            );
        }
        ThreadKind::Io => {
            list.allow(SOCKETS);
            list.allow_if(libc::SYS_ioctl, 1, &[fionbio]);
        }
        ThreadKind::Watchdog => list.allow(&[libc::SYS_tgkill]),
    }
    list
}

/// The compiled programs, one per kind.
pub(super) struct Filters(BTreeMap<ThreadKind, Filter>);

/// Set once this process is jailed: every thread it starts then confines itself.
static FILTERS: OnceLock<Filters> = OnceLock::new();

thread_local! {
    /// The kind this thread was confined as, for the SIGSYS report (const-initialised: safe
    /// to read in a signal handler).
    static KIND: Cell<u8> = const { Cell::new(0) };
}

impl Filters {
    /// Every kind's program, compiled (before the jail: this allocates).
    pub(super) fn compile() -> Result<Self, JailError> {
        let mut programs = BTreeMap::new();
        for kind in ThreadKind::ALL {
            let filter = twinbox_runtime::seccomp::compile(&allowlist(kind).profile())
                .map_err(|source| JailError::Seccomp { kind, source })?;
            programs.insert(kind, filter);
        }
        Ok(Filters(programs))
    }

    /// Installs `kind`'s program on this thread (no_new_privs is set already) and keeps every
    /// program for the threads to come (see [`confine_thread`]).
    pub(super) fn install_process(self, kind: ThreadKind) -> Result<(), JailError> {
        let filters = FILTERS.get_or_init(|| self);
        filters.install(kind)
    }

    fn install(&self, kind: ThreadKind) -> Result<(), JailError> {
        let filter = self.0.get(&kind).expect("a program for every kind");
        filter.install().map_err(|source| JailError::Seccomp { kind, source })?;
        KIND.with(|k| k.set(kind as u8));
        Ok(())
    }
}

/// Whether this process entered a jail (its threads then confine themselves).
pub fn jailed() -> bool {
    FILTERS.get().is_some()
}

/// In a jailed process, narrows this thread's allowlist to `kind`'s; elsewhere does nothing.
pub fn confine_thread(kind: ThreadKind) -> Result<(), JailError> {
    match FILTERS.get() {
        Some(filters) => filters.install(kind),
        None => Ok(()),
    }
}

thread_local! {
    /// Set by the probe's SIGSYS handler: the call just made was trapped.
    static TRAPPED: Cell<bool> = const { Cell::new(false) };
}

extern "C" fn probe_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A const-initialised thread local: safe to write in a signal handler. The trapped call
    // returns with its own number in rax, which the probe does not read.
    TRAPPED.with(|t| t.set(true));
}

/// For [`super::JailConfig::probe`]: a trapped call is noted (see [`take_trapped`]) instead of
/// ending the process.
pub(super) fn install_probe_handler() -> Result<(), JailError> {
    set_sigsys(probe_handler as *const () as usize)
}

/// Whether a call was trapped since the last look.
pub(super) fn take_trapped() -> bool {
    TRAPPED.with(|t| t.replace(false))
}

fn set_sigsys(handler: usize) -> Result<(), JailError> {
    // SAFETY: a zeroed sigaction is a valid starting value; the fields set are the handler
    // (an extern "C" fn of the SA_SIGINFO signature) and flags; sigaction copies the struct.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
    };
    super::errno_result(rc, "install the SIGSYS handler")
}

/// Where the SIGSYS handler writes.
static REPORT_FD: AtomicI32 = AtomicI32::new(libc::STDERR_FILENO);

/// Installs the SIGSYS handler that names a forbidden call; it writes to `report` (default
/// stderr).
pub(super) fn install_handler(report: Option<libc::c_int>) -> Result<(), JailError> {
    if let Some(fd) = report {
        REPORT_FD.store(fd, Ordering::SeqCst);
    }
    set_sigsys(sigsys_handler as *const () as usize)
}

/// A fixed buffer a signal handler can format into without allocating.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The report of a forbidden call, as the handler writes it.
fn report_line(kind: u8, nr: i64) -> Line {
    let mut line = Line { buf: [0; 256], len: 0 };
    line.push(b"twinbox VMM: the ");
    let kind =
        ThreadKind::ALL.into_iter().find(|k| *k as u8 == kind).map_or("VMM (not yet narrowed)", ThreadKind::name);
    line.push(kind.as_bytes());
    line.push(b" thread made system call ");
    line.push_number(nr as u64);
    let name = usize::try_from(nr).ok().and_then(syscalls::Sysno::new).map_or("unknown", |s| s.name());
    line.push(b" (");
    line.push(name.as_bytes());
    line.push(b"), which its seccomp filter forbids; the VMM stopped\n");
    line
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: for SIGSYS the kernel fills siginfo's `_sigsys` arm: the call's address at
    // offset 16, its number (an int) at offset 24 on 64-bit Linux; `info` points to it for
    // the handler's duration.
    let nr = unsafe { *(info as *const u8).add(24).cast::<libc::c_int>() };
    let kind = KIND.with(Cell::get);
    let line = report_line(kind, i64::from(nr));
    // SAFETY: write and exit_group are async-signal-safe system calls; the buffer lives
    // across the write. The process ends here: the forbidden call never returns.
    unsafe {
        libc::write(REPORT_FD.load(Ordering::SeqCst), line.buf.as_ptr().cast(), line.len);
        libc::syscall(libc::SYS_exit_group, FORBIDDEN_CALL_EXIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles() {
        let filters = Filters::compile().unwrap();
        for kind in ThreadKind::ALL {
            assert!(filters.0[&kind].program().len() > 10, "{kind}");
        }
    }

    #[test]
    fn the_report_names_the_call_and_the_thread() {
        let line = report_line(ThreadKind::Vcpu as u8, libc::SYS_openat);
        assert_eq!(
            std::str::from_utf8(&line.buf[..line.len]).unwrap(),
            "twinbox VMM: the vCPU thread made system call 257 (openat), which its seccomp filter forbids; \
             the VMM stopped\n"
        );
        let line = report_line(0, 100_000);
        assert!(std::str::from_utf8(&line.buf[..line.len])
            .unwrap()
            .contains("VMM (not yet narrowed) thread made system call 100000 (unknown)"));
    }

    #[test]
    fn every_list_is_within_the_vmm_list_it_stacks_on() {
        let vmm = allowlist(ThreadKind::Vmm).numbers();
        for kind in [ThreadKind::Vcpu, ThreadKind::Io, ThreadKind::Watchdog] {
            for nr in allowlist(kind).numbers() {
                assert!(vmm.contains(&nr), "{kind} allows {nr}, which the VMM thread's list does not");
            }
        }
    }
}

//! What of the host kernel a process can reach, measured from inside it: the `isolation`
//! figures of `twinbox bench` (issue 21). No dependencies beyond std, so the static `hello`
//! workload carries it into containers, and the jailed VMM's probe mode uses the same code.
//!
//! - **System calls**: every x86_64 number from 0 to [`LAST_PROBED`] is called with every
//!   argument −1 (an invalid pointer, descriptor, length and flag set, which makes almost every
//!   call fail early), except the few in [`SKIPPED`] that would end, fork or block the probe,
//!   and the few in [`special_args`] that need other arguments to fail harmlessly. A call
//!   counts as *reachable* unless the kernel never ran it: it failed with ENOSYS or EPERM (what
//!   a seccomp profile's errno action, an unknown number and a missing capability answer), or
//!   the caller's `blocked` check says so (a trap that a SIGSYS handler caught). Not all of
//!   them fail: `sync` takes no argument and flushes the host's dirty pages (a write-back, no
//!   change of state), and `setsid`, `umask` and the like change the probe process itself.
//! - **Capabilities**: the effective set (capget).
//! - **Device nodes**: character and block devices visible under /dev (stat only: opening a
//!   device such as a watchdog has effects).
//! - **/proc and /sys**: files under /proc/sys it can open for reading (the kernel's tunables),
//!   and entries under /sys/class/* (the host's devices by class).

/// The highest syscall number probed (x86_64 numbers stop at 334 and restart at 424).
pub const LAST_PROBED: u64 = 470;

/// Numbers never called: they end the probe (exit, exit_group, rt_sigreturn, uretprobe),
/// fork it (clone, fork, vfork, clone3), block it (pause, rt_sigsuspend), hang up its
/// terminal (vhangup), or change what its thread's end wakes (set_tid_address: a thread
/// that called it with −1 would never be joined).
pub const SKIPPED: [u64; 12] = [15, 34, 56, 57, 58, 60, 130, 153, 218, 231, 335, 435];

/// Numbers no x86_64 kernel assigns (between the classic table and the shared one at 424).
const UNASSIGNED: std::ops::Range<u64> = 336..424;

/// Arguments for the calls whose all −1 call would not fail harmlessly: futex (an op of −1
/// answers ENOSYS; a wait on an invalid address faults instead), modify_ldt (an unknown
/// function answers ENOSYS; reading 0 bytes does nothing), msgget (flags of −1 would create
/// a queue; without IPC_CREAT it looks one up).
pub fn special_args(nr: u64) -> Option<[u64; 6]> {
    const M: u64 = u64::MAX;
    match nr {
        202 => Some([M, 0, 0, 0, 0, 0]),
        154 => Some([0, M, 0, 0, 0, 0]),
        68 => Some([M, 0, 0, 0, 0, 0]),
        _ => None,
    }
}

/// One raw system call.
///
/// # Safety
/// The call may do anything the kernel lets it; the caller chooses numbers and arguments that
/// cannot harm the process (see [`SKIPPED`] and [`special_args`]).
#[cfg(target_arch = "x86_64")]
pub unsafe fn raw_syscall(nr: u64, a: [u64; 6]) -> i64 {
    let ret: i64;
    // SAFETY: the caller's contract; `syscall` clobbers rcx and r11, declared here.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as i64 => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2], in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

const EPERM: i64 = 1;
const ENOSYS: i64 = 38;

/// How many system calls run (see the module documentation), and how many were tried.
/// `blocked` is asked after each call, for a filter that traps instead of failing it.
#[cfg(target_arch = "x86_64")]
pub fn syscalls(blocked: &dyn Fn() -> bool) -> (u32, u32) {
    let (mut reachable, mut probed) = (0, 0);
    for nr in 0..=LAST_PROBED {
        if SKIPPED.contains(&nr) || UNASSIGNED.contains(&nr) {
            continue;
        }
        let args = special_args(nr).unwrap_or([u64::MAX; 6]);
        // SAFETY: the numbers that could harm the probe are skipped and the others get
        // arguments that make them fail or do nothing lasting (module documentation).
        let ret = unsafe { raw_syscall(nr, args) };
        probed += 1;
        if !blocked() && ret != -EPERM && ret != -ENOSYS {
            reachable += 1;
        }
    }
    (reachable, probed)
}

/// The effective capabilities' count.
#[cfg(target_arch = "x86_64")]
pub fn capabilities() -> u32 {
    // linux/capability.h, version 3: a header and two data structs.
    let header: [u32; 2] = [0x2008_0522, 0];
    let mut data = [0u32; 6];
    // SAFETY: capget reads the header and writes two 3-word structs, both alive here.
    let rc = unsafe { raw_syscall(125, [header.as_ptr() as u64, data.as_mut_ptr() as u64, 0, 0, 0, 0]) };
    if rc != 0 {
        return 0;
    }
    data[0].count_ones() + data[3].count_ones()
}

/// Character and block device nodes under `dir` (recursively, not following links).
pub fn device_nodes(dir: &std::path::Path) -> u32 {
    use std::os::unix::fs::FileTypeExt;
    let mut n = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(t) = entry.file_type() else { continue };
        if t.is_char_device() || t.is_block_device() {
            n += 1;
        } else if t.is_dir() {
            n += device_nodes(&entry.path());
        }
    }
    n
}

/// Files under `dir` that open for reading (recursively, not following links).
pub fn readable_files(dir: &std::path::Path) -> u32 {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(t) = entry.file_type() else { continue };
        if t.is_dir() {
            n += readable_files(&entry.path());
        } else if t.is_file() && std::fs::File::open(entry.path()).is_ok() {
            n += 1;
        }
    }
    n
}

/// Entries one level under each directory of `dir` (for /sys/class: the devices by class).
pub fn entries_below(dir: &std::path::Path) -> u32 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|class| std::fs::read_dir(class.path()).map_or(0, |d| d.count() as u32))
        .sum()
}

/// The figures of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Surface {
    /// System calls that ran.
    pub syscalls: u32,
    /// System calls tried.
    pub probed: u32,
    /// Effective capabilities.
    pub capabilities: u32,
    /// Device nodes visible.
    pub devices: u32,
    /// Files under /proc/sys that open.
    pub proc_sys: u32,
    /// Entries under /sys/class/*.
    pub sys_class: u32,
}

impl Surface {
    /// Measures this process (the system calls on the calling thread).
    #[cfg(target_arch = "x86_64")]
    pub fn measure(blocked: &dyn Fn() -> bool) -> Self {
        let (syscalls, probed) = syscalls(blocked);
        Surface {
            syscalls,
            probed,
            capabilities: capabilities(),
            devices: device_nodes(std::path::Path::new("/dev")),
            proc_sys: readable_files(std::path::Path::new("/proc/sys")),
            sys_class: entries_below(std::path::Path::new("/sys/class")),
        }
    }

    /// One JSON object.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"syscalls\":{},\"probed\":{},\"capabilities\":{},\"devices\":{},\"proc_sys\":{},\"sys_class\":{}}}",
            self.syscalls, self.probed, self.capabilities, self.devices, self.proc_sys, self.sys_class
        )
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn an_unconfined_process_reaches_most_calls_and_a_filtered_one_fewer() {
        let (open, probed) = syscalls(&|| false);
        assert!(probed > 350 && open > 250, "{open} of {probed}");
        // Run in a child thread under a filter answering EPERM to everything but what a thread
        // needs to end: the probe sees the difference.
        let (filtered, _) = std::thread::spawn(|| {
            // A classic BPF program: allow exit, exit_group, futex, munmap, madvise,
            // rt_sigprocmask, sched_yield; EPERM for the rest.
            let allowed: [u32; 7] = [60, 231, 202, 11, 28, 14, 24];
            let mut prog: Vec<[u8; 8]> = Vec::new();
            let ins = |code: u16, jt: u8, jf: u8, k: u32| {
                let mut b = [0u8; 8];
                b[..2].copy_from_slice(&code.to_ne_bytes());
                b[2] = jt;
                b[3] = jf;
                b[4..].copy_from_slice(&k.to_ne_bytes());
                b
            };
            prog.push(ins(0x20, 0, 0, 0)); // ld [nr]
            for (i, nr) in allowed.iter().enumerate() {
                let to_allow = (allowed.len() - i) as u8;
                prog.push(ins(0x15, to_allow, 0, *nr)); // jeq nr, allow
            }
            prog.push(ins(0x06, 0, 0, 0x0005_0000 | 1)); // ret ERRNO(EPERM)
            prog.push(ins(0x06, 0, 0, 0x7fff_0000)); // ret ALLOW
            let fprog: (u16, *const [u8; 8]) = (prog.len() as u16, prog.as_ptr());
            #[repr(C)]
            struct SockFprog {
                len: u16,
                filter: *const [u8; 8],
            }
            let f = SockFprog { len: fprog.0, filter: fprog.1 };
            // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) and seccomp(SET_MODE_FILTER) on this thread;
            // the program outlives the call.
            unsafe {
                assert_eq!(raw_syscall(157, [38, 1, 0, 0, 0, 0]), 0);
                assert_eq!(raw_syscall(317, [1, 0, &f as *const SockFprog as u64, 0, 0, 0]), 0);
            }
            syscalls(&|| false)
        })
        .join()
        .unwrap();
        assert!(filtered < 10, "a filter that refuses nearly everything: {filtered} reachable");
    }

    #[test]
    fn the_json_names_every_figure() {
        let s = Surface { syscalls: 1, probed: 2, capabilities: 3, devices: 4, proc_sys: 5, sys_class: 6 };
        assert_eq!(
            s.to_json(),
            "{\"syscalls\":1,\"probed\":2,\"capabilities\":3,\"devices\":4,\"proc_sys\":5,\"sys_class\":6}"
        );
    }
}

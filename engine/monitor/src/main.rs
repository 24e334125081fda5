//! `twinbox-monitor PID COMMAND [ARG…]` (COMMAND a path: no PATH search): the parent of a detached container's init for as long
//! as it runs. It waits for PID, then replaces itself with COMMAND, its arguments and the exit
//! code (the `twinbox` command that records the exit and removes what the container leaves).
//!
//! The engine starts it with `exec` in the process that created the container, so the init
//! stays its child. One stays in memory beside every detached container, so it is as small as
//! a process can be: no std, no libc, four system calls, one page of code and one of stack (a
//! fork of the `twinbox` binary used to stay instead, about 740 KiB of PSS each, and a std
//! program linked against glibc about 270 KiB). engine/build.rs builds it static and freestanding.
//!
//! Exit code as a shell reports it: the init's own code, or 128 + N when signal N killed it;
//! -1 when PID turns out not to be its child (the exit is still recorded, as unknown). Its own
//! failures (bad arguments, COMMAND cannot be run) exit 125 with a line on stderr.

#![no_std]
#![no_main]

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("twinbox-monitor is written for x86_64 Linux");

use core::arch::{asm, global_asm};
use core::mem::MaybeUninit;

const SYS_WRITE: usize = 1;
const SYS_WAIT4: usize = 61;
const SYS_EXECVE: usize = 59;
const SYS_EXIT_GROUP: usize = 231;
const EINTR: isize = 4;
/// The monitor's own failure, as `docker run` reports twinbox's.
const FAILED: i32 = 125;
/// The most arguments COMMAND may have (twinbox passes five).
const MAX_ARGS: usize = 64;

// The kernel starts a static executable at `_start` with the stack holding argc, the argument
// pointers, a null, the environment pointers and a null. Hand that to `start`, with the stack
// aligned as the C ABI wants it for the call.
global_asm!(
    ".globl _start",
    "_start:",
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {start}",
    "ud2",
    start = sym start,
);

/// # Safety
///
/// `stack` is the process's initial stack pointer, laid out by the kernel as above.
unsafe extern "C" fn start(stack: *const usize) -> ! {
    // SAFETY: the kernel's layout: argc, then argc + 1 argument pointers (the last null), then
    // the environment's pointers, null-terminated.
    let (args, envp) = unsafe {
        let argc = *stack;
        let argv = stack.add(1) as *const *const u8;
        (core::slice::from_raw_parts(argv, argc), argv.add(argc + 1))
    };
    exit(run(args, envp))
}

fn run(args: &[*const u8], envp: *const *const u8) -> i32 {
    if args.len() < 3 || args.len() - 2 > MAX_ARGS {
        fail(b"usage: twinbox-monitor PID COMMAND [ARG...] (started by `twinbox run -d`, not by hand)\n");
    }
    // SAFETY: every argument pointer the kernel gives points at a NUL-terminated string.
    let Some(pid) = parse_pid(unsafe { c_str(args[1]) }) else {
        fail(b"twinbox-monitor: the first argument is not a process id\n")
    };
    let code = wait_exit(pid);

    // COMMAND's arguments, then the code, then the null that ends them.
    let mut digits = [0u8; 12];
    let code_arg = format_code(code, &mut digits);
    let mut argv = [const { MaybeUninit::<*const u8>::uninit() }; MAX_ARGS + 2];
    let command = &args[2..];
    for (slot, arg) in argv.iter_mut().zip(command) {
        slot.write(*arg);
    }
    argv[command.len()].write(code_arg);
    argv[command.len() + 1].write(core::ptr::null());
    // SAFETY: execve reads the NUL-terminated path, the null-terminated argument array (every
    // entry written above and pointing at a NUL-terminated string: the kernel's or `digits`,
    // which lives until the call) and the environment the kernel gave us. It returns only on
    // failure.
    let err = unsafe { syscall3(SYS_EXECVE, command[0] as usize, argv.as_ptr() as usize, envp as usize) };
    let _ = err;
    fail(b"twinbox-monitor: cannot run the command given after the process id\n")
}

/// Waits for the child `pid` to end; its exit code as a shell reports it.
fn wait_exit(pid: i32) -> i32 {
    loop {
        let mut status: i32 = 0;
        // SAFETY: wait4 writes the status to `status`, a live i32, and nothing else (no rusage).
        let r = unsafe { syscall4(SYS_WAIT4, pid as usize, &mut status as *mut i32 as usize, 0, 0) };
        if r == -EINTR {
            continue;
        }
        if r < 0 {
            // Not a child (any more): say "unknown", so the exit is still recorded.
            let _ = write_err(b"twinbox-monitor: the process to wait for is not a child of this one\n");
            return -1;
        }
        let signal = status & 0x7f;
        if signal == 0 {
            return (status >> 8) & 0xff;
        }
        if signal != 0x7f {
            return 128 + signal;
        }
        // Stopped or continued: not an end.
    }
}

/// A positive decimal process id.
fn parse_pid(s: &[u8]) -> Option<i32> {
    if s.is_empty() || s.len() > 10 {
        return None;
    }
    let mut n: i64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(b - b'0');
    }
    i32::try_from(n).ok().filter(|p| *p > 0)
}

/// `code` in decimal, NUL-terminated in `buf`; the string's address.
fn format_code(code: i32, buf: &mut [u8; 12]) -> *const u8 {
    let mut n = code.unsigned_abs();
    let mut i = buf.len() - 1;
    buf[i] = 0;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if code < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    buf[i..].as_ptr()
}

/// # Safety
///
/// `p` points at a NUL-terminated string that outlives the returned slice.
unsafe fn c_str<'a>(p: *const u8) -> &'a [u8] {
    let mut len = 0;
    // SAFETY: the caller's promise: every byte up to the NUL is readable. (A volatile read,
    // so the loop is not turned into a call of a `strlen` that is not there.)
    unsafe {
        while core::ptr::read_volatile(p.add(len)) != 0 {
            len += 1;
        }
        core::slice::from_raw_parts(p, len)
    }
}

fn write_err(message: &[u8]) -> isize {
    // SAFETY: write reads `message.len()` bytes of a live slice.
    unsafe { syscall3(SYS_WRITE, 2, message.as_ptr() as usize, message.len()) }
}

fn fail(message: &[u8]) -> ! {
    let _ = write_err(message);
    exit(FAILED)
}

fn exit(code: i32) -> ! {
    // SAFETY: exit_group ends the process; it takes no memory.
    unsafe {
        asm!("syscall", in("rax") SYS_EXIT_GROUP, in("rdi") code as usize, options(noreturn, nostack));
    }
}

/// # Safety
///
/// The arguments are what system call `n` expects (valid pointers where it reads or writes).
unsafe fn syscall3(n: usize, a1: usize, a2: usize, a3: usize) -> isize {
    // SAFETY: the caller's promise; the kernel clobbers only rax (the result), rcx and r11.
    unsafe { syscall4(n, a1, a2, a3, 0) }
}

/// # Safety
///
/// As [`syscall3`].
unsafe fn syscall4(n: usize, a1: usize, a2: usize, a3: usize, a4: usize) -> isize {
    let ret: isize;
    // SAFETY: the caller's promise; `syscall` clobbers rcx and r11 and returns in rax.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a1,
            in("rsi") a2,
            in("rdx") a3,
            in("r10") a4,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Copies that the compiler emits calls for; with no libc, they are ours. Volatile accesses
/// keep it from turning these loops into calls of themselves.
///
/// # Safety
///
/// As C's `memcpy`: `n` bytes readable at `src`, writable at `dst`, not overlapping.
#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: the caller's promise, for every i < n.
        unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
    }
    dst
}

/// # Safety
///
/// As C's `memset`: `n` bytes writable at `dst`.
#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, byte: i32, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: the caller's promise, for every i < n.
        unsafe { core::ptr::write_volatile(dst.add(i), byte as u8) };
    }
    dst
}

/// The precompiled `core` names the unwinder's personality routine; with `panic = "abort"`
/// nothing unwinds, so it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    fail(b"twinbox-monitor: internal error\n")
}

//! `twinbox-monitor serve`: the one process that watches every detached container of a store.
//!
//! Started by the engine when a detached container needs it and none runs, with a listening
//! `SOCK_SEQPACKET` Unix socket as descriptor 3 (`<store>/twinbox-monitor-<hash>.sock`, named
//! after this build, so a twinbox with another monitor starts its own) and its own open file
//! description of the matching `.lock` file as descriptor 4; it closes every other descriptor
//! it inherited. It is a child subreaper (`PR_SET_CHILD_SUBREAPER`), so every process started
//! below it that loses its parent becomes its child. One request per connection, one datagram
//! each, within 10 s of connecting, from a process of its own effective user:
//!
//! - `R` + ARGV + ENV, with three descriptors (SCM_RIGHTS): start a launcher. It forks a child
//!   that takes the descriptors as its stdin, stdout and stderr, starts a new session and runs
//!   ARGV with ENV (`twinbox container-launch ID`, which creates and starts the container). The
//!   container's init is the launcher's child, so when the launcher exits the init becomes the
//!   monitor's. Reply `ok`.
//! - `W` + PID (4 bytes, little endian) + ARGV + ENV: watch PID. Once it has ended, run ARGV
//!   with its exit code appended (`twinbox container-exited ID PID CODE`, which records it and
//!   removes what the container leaves). Sent by the launcher before it exits, while PID is
//!   still the launcher's child, so the monitor cannot have reaped PID yet. Refused unless PID
//!   or the asker is the monitor's child: the end of anything else would never reach it (a
//!   launcher of a monitor that was killed meanwhile then watches its container itself). A
//!   newer watch of a pid replaces an older one. Reply `ok`.
//!
//! ARGV and ENV are NUL-terminated strings (ARGV's not empty), an empty string between them.
//! The exit code is as a shell reports it: the process's own code, or 128 + N when signal N
//! killed it. A command that cannot be started yet (fork fails) is tried again.
//!
//! When it has no child left and no connection open it exits, under the lock: it takes the
//! lock without waiting and exits only if no connection is pending, and the engine holds the
//! lock from before it connects until its connection is queued, so a request never meets a
//! monitor that is going away. A monitor that is killed leaves its containers to init; the
//! engine then shows them as exited with an unknown code, and starts a new monitor for the next.
//!
//! Its launchers run in its context (namespaces, cgroup, limits), which is that of the command
//! that started it, as a daemon's children run in the daemon's.
//!
//! It stays in memory beside the containers, one per store instead of one per container (each
//! of those cost about 55 KiB of kernel memory: page tables, a kernel stack, task structures),
//! so it is as small as a process can be: no std, no libc, two pages of code, and of its data
//! only what it holds. Its state (see [`State`]) starts with what every turn of its loop
//! touches, in one page, followed by the watch table and the commands' arena, whose pages are
//! touched only as they fill (and given back as they empty); a request is read into the
//! arena's free end instead of a buffer of its own; what the watches' commands share is kept
//! once; its stack is the page of the one the kernel gave it that holds its arguments (see
//! `start`), and its frames are small (the pointer arrays of a command are made in the forked
//! child). Its code and what it touches for a few thousand containers lie in one 2 MiB span,
//! which one page table maps. So with 30 containers it has five pages in memory. It is started
//! with no environment. engine/build.rs builds it static and freestanding.

#![no_std]
#![no_main]

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("twinbox-monitor is written for x86_64 Linux");

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;

mod sys {
    pub const READ: usize = 0;
    pub const WRITE: usize = 1;
    pub const CLOSE: usize = 3;
    pub const POLL: usize = 7;
    pub const RT_SIGACTION: usize = 13;
    pub const RT_SIGPROCMASK: usize = 14;
    pub const DUP2: usize = 33;
    pub const SENDTO: usize = 44;
    pub const RECVMSG: usize = 47;
    pub const GETSOCKOPT: usize = 55;
    pub const FORK: usize = 57;
    pub const EXECVE: usize = 59;
    pub const WAIT4: usize = 61;
    pub const FCNTL: usize = 72;
    pub const FLOCK: usize = 73;
    pub const MADVISE: usize = 28;
    pub const GETEUID: usize = 107;
    pub const CLOCK_GETTIME: usize = 228;
    pub const WAITID: usize = 247;
    pub const CLOSE_RANGE: usize = 436;
    pub const SETSID: usize = 112;
    pub const PRCTL: usize = 157;
    pub const EXIT_GROUP: usize = 231;
    pub const ACCEPT4: usize = 288;
    pub const SIGNALFD4: usize = 289;
}

const EINTR: isize = 4;
const ECHILD: isize = 10;
const SIGCHLD: usize = 17;
const LISTENER: usize = 3;
const LOCK: usize = 4;
/// The monitor's own failure, as `docker run` reports twinbox's.
const FAILED: i32 = 125;

/// Connections open at once; more wait in the listening socket's backlog.
const MAX_CONNECTIONS: usize = 32;
/// The largest request: the engine sends twinbox's arguments and a few environment variables.
const MAX_REQUEST: usize = 16 * 1024;
/// Strings of one request's ARGV, and of its ENV.
const MAX_STRINGS: usize = 128;
/// Containers watched at once, and the bytes of their commands (at most what they would take
/// in full: with the template, far more fit).
const MAX_WATCHES: usize = 16 * 1024;
const ARENA: usize = 4 << 20;
/// A watch's command is at most a request, and the template's users are watches.
const _: () = assert!(MAX_REQUEST <= u16::MAX as usize && MAX_WATCHES <= u16::MAX as usize);
const PAGE: usize = 4096;
/// More than the monitor's frames take at their deepest (about 600 bytes: no recursion, no
/// large local; a forked child's go deeper, into pages of its own).
const FRAMES: usize = 1024;

// The kernel starts a static executable at `_start` with the stack holding argc, the argument
// pointers, a null, the environment's pointers and a null. Hand that to `start`, with the
// stack aligned as the C ABI wants it for the call.
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

/// One watched process: its command (ARGV, an empty string, ENV), which is the template's
/// first `pre` bytes, then `arena[off..off + len]` (at 0 when empty), then the template's last
/// `suf` bytes (with `pre` and `suf` 0, it does not use the template); once it has ended, its
/// exit code, until the command could be started. Sixteen bytes, so that a couple of hundred
/// share the state's first page with the connections.
#[derive(Clone, Copy)]
struct Watch {
    pid: i32,
    off: u32,
    len: u16,
    pre: u16,
    suf: u16,
    /// A code as a shell reports it fits a byte: the status's exit byte, or 128 + a signal
    /// number below 128.
    ended: Option<u8>,
}

/// The command that the watches share all but a part of: those of one twinbox differ only in
/// a container's ID and its launcher's pid, and the rest, four fifths of their bytes
/// (twinbox's path, the store's, the environment), is kept once. It is the first command
/// watched while there was none, at `arena[off..off + len]`, kept while `users` watches use
/// it.
#[derive(Clone, Copy)]
struct Template {
    off: u32,
    len: u16,
    users: u16,
}

/// An open connection: its descriptor, the peer's pid, and when it is given up (ms, monotonic).
#[derive(Clone, Copy)]
struct Connection {
    fd: i32,
    peer: i32,
    deadline: u64,
}

/// How long a connection may take to send its request.
const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// The most descriptors a request may carry (a launch has three); more are closed.
const MAX_FDS: usize = 8;

/// The monitor's state, laid out (`repr(C)`, fields in this order, from a page boundary) in
/// the order its pages are touched: first what every turn of the loop uses, then the watch
/// table, whose first couple of hundred entries share that page, then the arena. The arena
/// holds the template and the parts of the watches' commands that differ from it, back to
/// back from its start, and after them the request being read or a command being put
/// together (hence MAX_REQUEST more bytes than the commands may take): a watch's command is
/// moved down onto the others, never copied from a buffer of its own. So with N containers
/// the monitor touches about one page plus N times a hundred bytes, and nothing far away: the
/// 4 MiB of the tables cost neither memory nor page tables until thousands of containers
/// fill them.
#[repr(C, align(4096))]
struct State {
    /// Connections open, watches, and bytes of the arena that the template and the watches'
    /// commands take.
    open: usize,
    count: usize,
    used: usize,
    template: Template,
    /// How far the watch table and the arena may have been written (their pages in memory):
    /// what [`trim`] gives back once their ends have moved down.
    watches_top: usize,
    arena_top: usize,
    connections: [Connection; MAX_CONNECTIONS],
    /// The loop's poll set: the signalfd, the listener, the connections.
    pollfds: [PollFd; MAX_CONNECTIONS + 2],
    watches: [Watch; MAX_WATCHES],
    arena: [u8; ARENA + MAX_REQUEST],
}

/// The monitor's state: all zeros, so that it lands in .bss, whose pages cost nothing until
/// they are written (a non-zero field would put all of it in the executable).
struct Global(UnsafeCell<State>);

// SAFETY: the monitor has one thread.
unsafe impl Sync for Global {}

static STATE: Global = Global(UnsafeCell::new(State {
    open: 0,
    count: 0,
    used: 0,
    template: Template { off: 0, len: 0, users: 0 },
    watches_top: 0,
    arena_top: 0,
    connections: [Connection { fd: 0, peer: 0, deadline: 0 }; MAX_CONNECTIONS],
    pollfds: [PollFd { fd: 0, events: 0, revents: 0 }; MAX_CONNECTIONS + 2],
    watches: [Watch { pid: 0, off: 0, len: 0, pre: 0, suf: 0, ended: None }; MAX_WATCHES],
    arena: [0; ARENA + MAX_REQUEST],
}));

/// # Safety
///
/// `stack` is the process's initial stack pointer, laid out by the kernel as above.
unsafe extern "C" fn start(stack: *const usize) -> ! {
    // SAFETY: the kernel's layout: argc, then argc + 1 argument pointers (the last null).
    let args = unsafe { core::slice::from_raw_parts(stack.add(1) as *const *const u8, *stack) };
    // SAFETY: every argument pointer the kernel gives points at a NUL-terminated string.
    if args.len() != 2 || unsafe { c_str(args[1]) } != b"serve" {
        fail(b"usage: twinbox-monitor serve (started by twinbox with its socket as descriptor 3, not by hand)\n");
    }
    // The kernel put the argument strings at the top of the stack, then (past a random gap of
    // up to 8 KiB) the argument pointers and the auxiliary vector, and below them is where this
    // frame is: two or three pages, which would stay in memory as long as the monitor runs.
    // Go on just below the strings instead, in the page that holds them (which stays: ps reads
    // them in /proc/PID/cmdline), and give back the pages below: with the short arguments
    // twinbox gives, only the strings' page stays.
    let strings = args[0] as usize;
    // SAFETY: below the strings, down to the argument pointers, is the kernel's stack, unused
    // (a gap, or what was read above). `resume` never returns: nothing of this frame is used
    // again. The new stack pointer is aligned as the C ABI wants it for the call.
    unsafe {
        asm!(
            "mov rsp, {sp}",
            "call {resume}",
            "ud2",
            sp = in(reg) strings & !15,
            resume = sym resume,
            in("rdi") stack as usize,
            in("rsi") strings,
            options(noreturn),
        );
    }
}

/// `start`'s sequel, on a stack just below the argument strings at `strings`; `stack` is the
/// process's initial stack pointer.
///
/// # Safety
///
/// Called by `start` only, once.
unsafe extern "C" fn resume(stack: usize, strings: usize) -> ! {
    // The pages from the initial stack pointer's up to the one the monitor's frames reach.
    let (start, end) = (stack & !(PAGE - 1), ((strings & !15) - FRAMES) & !(PAGE - 1));
    // SAFETY: they are the kernel's stack, below the strings, and hold only what was read
    // (the arguments, the auxiliary vector, of which the kernel keeps its own copy for
    // /proc/PID/auxv) and `start`'s frame, not used again; this frame is above them.
    unsafe { discard(start, end) };
    // SAFETY: the only reference to the state, taken once, on the only thread.
    let state = unsafe { &mut *STATE.0.get() };
    exit(serve(state))
}

fn serve(state: &mut State) -> i32 {
    // Nothing but the socket and the lock from whoever started us: a descriptor they leaked
    // (a build's jobserver, a shell's redirection) would stay open as long as we run, in
    // every launcher.
    // SAFETY: close_range with integer arguments only.
    unsafe { syscall4(sys::CLOSE_RANGE, LOCK + 1, u32::MAX as usize, 0, 0) };
    // Dispositions survive exec: what whoever started us ignored (twinbox ignores SIGPIPE)
    // must not be ignored by the launchers and by us.
    for signal in 1..=64usize {
        if signal != 9 && signal != 19 {
            let default = [0usize; 4];
            // SAFETY: rt_sigaction reads a kernel `struct sigaction` (handler SIG_DFL, no flags,
            // no restorer, empty mask) of four words; the old action is not asked for.
            let _ = unsafe { syscall4(sys::RT_SIGACTION, signal, default.as_ptr() as usize, 0, 8) };
        }
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        syscall4(sys::PRCTL, 36 /* PR_SET_CHILD_SUBREAPER */, 1, 0, 0)
    } < 0
    {
        fail(b"twinbox-monitor: cannot become a child subreaper\n");
    }
    for fd in [LISTENER, LOCK] {
        // SAFETY: fcntl(F_SETFD, FD_CLOEXEC) with integer arguments only.
        if unsafe { syscall4(sys::FCNTL, fd, 2, 1, 0) } < 0 {
            fail(b"twinbox-monitor: descriptors 3 and 4 must be the socket and the lock\n");
        }
    }
    // SIGCHLD blocked, and read from a signalfd instead of handled.
    let chld: u64 = 1 << (SIGCHLD - 1);
    // SAFETY: rt_sigprocmask reads an 8-byte mask that lives through the call.
    unsafe {
        syscall4(sys::RT_SIGPROCMASK, 0 /* SIG_BLOCK */, &chld as *const u64 as usize, 0, 8)
    };
    // SAFETY: signalfd4 reads the 8-byte mask.
    let sfd = unsafe { syscall4(sys::SIGNALFD4, usize::MAX, &chld as *const u64 as usize, 8, 0o2004000) };
    if sfd < 0 {
        fail(b"twinbox-monitor: cannot make a signalfd\n");
    }
    // Requests are taken from processes of our effective user only (SO_PEERCRED gives theirs).
    // SAFETY: geteuid takes nothing.
    let uid = unsafe { syscall4(sys::GETEUID, 0, 0, 0, 0) } as u32;

    let mut backoff = false;
    loop {
        let children = reap(state);
        let retrying = run_ended(state);
        let idle = !children && state.open == 0;
        if idle && may_leave() {
            return 0;
        }
        let now = now_ms();
        // Connections that sent nothing in time are given up.
        let mut i = state.open;
        while i > 0 {
            i -= 1;
            if state.connections[i].deadline <= now {
                close(state.connections[i].fd as usize);
                state.open -= 1;
                state.connections[i] = state.connections[state.open];
            }
        }
        let pollfds = &mut state.pollfds;
        pollfds[0] = PollFd { fd: sfd as i32, events: POLLIN, revents: 0 };
        let mut n = 1;
        let listening = state.open < MAX_CONNECTIONS && !backoff;
        if listening {
            pollfds[1] = PollFd { fd: LISTENER as i32, events: POLLIN, revents: 0 };
            n = 2;
        }
        let first = n;
        for c in &state.connections[..state.open] {
            pollfds[n] = PollFd { fd: c.fd, events: POLLIN, revents: 0 };
            n += 1;
        }
        // Soon when idle (the lock was taken), when a command waits to be started again or
        // accepting failed; else at the first connection's deadline, or never.
        let mut timeout: isize = if idle || retrying || backoff { 100 } else { -1 };
        for c in &state.connections[..state.open] {
            let left = c.deadline.saturating_sub(now) as isize;
            if timeout < 0 || left < timeout {
                timeout = left;
            }
        }
        backoff = false;
        // SAFETY: poll reads and writes `n` pollfds of a live array.
        let r = unsafe { syscall4(sys::POLL, pollfds.as_mut_ptr() as usize, n, timeout as usize, 0) };
        if r < 0 {
            continue;
        }
        if state.pollfds[0].revents != 0 {
            let mut info = [0u8; 128];
            // SAFETY: read writes at most 128 bytes into a live buffer; the fd is non-blocking.
            while unsafe { syscall4(sys::READ, sfd as usize, info.as_mut_ptr() as usize, info.len(), 0) } > 0 {}
        }
        // Requests first (their slots move when one closes), then new connections.
        let mut i = state.open;
        while i > 0 {
            i -= 1;
            if state.pollfds[first + i].revents != 0 {
                let c = state.connections[i];
                answer(state, c);
                close(c.fd as usize);
                state.open -= 1;
                state.connections[i] = state.connections[state.open];
            }
        }
        if listening && state.pollfds[1].revents != 0 {
            // SAFETY: accept4 with no peer address asked for; SOCK_CLOEXEC.
            let c = unsafe { syscall4(sys::ACCEPT4, LISTENER, 0, 0, 0o2000000) };
            if c < 0 {
                // Out of descriptors or memory: the listener stays readable; do not spin.
                backoff = true;
            } else {
                match peer(c as usize) {
                    Some((pid, peer_uid)) if peer_uid == uid => {
                        let deadline = now_ms() + REQUEST_TIMEOUT_MS;
                        state.connections[state.open] = Connection { fd: c as i32, peer: pid, deadline };
                        state.open += 1;
                    }
                    _ => close(c as usize),
                }
            }
        }
    }
}

/// Milliseconds of CLOCK_MONOTONIC.
fn now_ms() -> u64 {
    let mut ts = [0i64; 2];
    // SAFETY: clock_gettime writes a 16-byte struct timespec into `ts`.
    unsafe {
        syscall4(sys::CLOCK_GETTIME, 1 /* CLOCK_MONOTONIC */, ts.as_mut_ptr() as usize, 0, 0)
    };
    (ts[0] as u64) * 1000 + (ts[1] as u64) / 1_000_000
}

/// Whether `pid` is a child of this process (running, or ended and not reaped).
fn is_child(pid: i32) -> bool {
    let mut info = [0u64; 16];
    // SAFETY: waitid(P_PID, pid, WEXITED | WNOHANG | WNOWAIT) writes a 128-byte siginfo into
    // `info` and reaps nothing.
    let r = unsafe { syscall6(sys::WAITID, 1, pid as usize, info.as_mut_ptr() as usize, 4 | 1 | 0x0100_0000, 0, 0) };
    r == 0
}

/// Starts the commands of watched processes that have ended; whether some could not be
/// started (no memory to fork: they are tried again soon).
fn run_ended(state: &mut State) -> bool {
    let mut i = 0;
    let mut waiting = false;
    let mut forgot = false;
    while i < state.count {
        let w = state.watches[i];
        let Some(code) = w.ended else {
            i += 1;
            continue;
        };
        let mut digits = [0u8; 12];
        let code = format_code(i32::from(code), &mut digits);
        let (at, len) = command(state, w);
        // Its own stdio: /dev/null, as given to the monitor.
        if spawn(&state.arena[at..at + len], Some(code), None).is_ok() {
            // The last watch takes its place: the next to look at is at `i` again.
            forget(state, i);
            forgot = true;
        } else {
            waiting = true;
            i += 1;
        }
    }
    if forgot {
        trim(state);
    }
    waiting
}

/// Reaps every child that has ended, running the command of those watched. Whether any child
/// is left.
fn reap(state: &mut State) -> bool {
    loop {
        let mut status: i32 = 0;
        // SAFETY: wait4 writes the status to a live i32 and nothing else (no rusage); WNOHANG.
        let pid = unsafe { syscall4(sys::WAIT4, usize::MAX, &mut status as *mut i32 as usize, 1, 0) };
        if pid == -EINTR {
            continue;
        }
        if pid == -ECHILD {
            return false;
        }
        if pid <= 0 {
            return true;
        }
        let signal = (status & 0x7f) as u8;
        let code = if signal == 0 { (status >> 8) as u8 } else { 128 + signal };
        if let Some(w) = state.watches[..state.count].iter_mut().find(|w| w.pid == pid as i32 && w.ended.is_none()) {
            w.ended = Some(code);
        }
    }
}

/// Watch `w`'s whole command: where it is in the arena, put together past the commands when
/// it uses the template.
fn command(state: &mut State, w: Watch) -> (usize, usize) {
    let (pre, len, suf) = (w.pre as usize, w.len as usize, w.suf as usize);
    if pre + suf == 0 {
        return (w.off as usize, len);
    }
    let (t, at) = (state.template, state.used);
    let arena = &mut state.arena;
    move_within(arena, t.off as usize, at, pre);
    move_within(arena, w.off as usize, at + pre, len);
    move_within(arena, t.off as usize + t.len as usize - suf, at + pre + len, suf);
    state.arena_top = state.arena_top.max(at + pre + len + suf);
    (at, pre + len + suf)
}

/// Removes watch `i`: the last watch takes its place, and its part of the arena goes, and the
/// template's with its last user. What lies past the arena's `used` bytes (a request being
/// answered) stays where it is.
fn forget(state: &mut State, i: usize) {
    let w = state.watches[i];
    state.count -= 1;
    state.watches[i] = state.watches[state.count];
    cut(state, w.off as usize, w.len as usize);
    if w.pre + w.suf > 0 {
        state.template.users -= 1;
        if state.template.users == 0 {
            let t = state.template;
            cut(state, t.off as usize, t.len as usize);
        }
    }
}

/// Takes `arena[start..start + len]` out of the commands, moving those after it down.
fn cut(state: &mut State, start: usize, len: usize) {
    if len == 0 {
        return;
    }
    let end = start + len;
    move_within(&mut state.arena, end, start, state.used - end);
    state.used -= len;
    for w in &mut state.watches[..state.count] {
        if w.off as usize >= end {
            w.off -= len as u32;
        }
    }
    if state.template.off as usize >= end {
        state.template.off -= len as u32;
    }
}

/// How many bytes `a` and `b` have in common at their start, and then at their end.
fn shared(a: &[u8], b: &[u8]) -> (usize, usize) {
    let pre = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let rest = a.len().min(b.len()) - pre;
    let suf = a.iter().rev().zip(b.iter().rev()).take(rest).take_while(|(x, y)| x == y).count();
    (pre, suf)
}

/// Gives back the pages that the ends of the watch table and of the arena have left (as
/// containers ended), so that a burst of containers does not stay in memory as long as the
/// monitor runs. They read as zeros when next touched.
fn trim(state: &mut State) {
    let watches = state.watches.as_mut_ptr_range();
    release(
        watches.start.wrapping_add(state.count) as usize,
        watches.start.wrapping_add(state.watches_top) as usize,
        watches.end as usize,
    );
    state.watches_top = state.count;
    let arena = state.arena.as_mut_ptr_range();
    release(
        arena.start.wrapping_add(state.used) as usize,
        arena.start.wrapping_add(state.arena_top) as usize,
        arena.end as usize,
    );
    state.arena_top = state.used;
}

/// Releases the whole pages from the one after `from` to the one holding `to`, all of them
/// below `limit` (the end of the table they are in: a page of the next one is kept).
fn release(from: usize, to: usize, limit: usize) {
    let start = (from + PAGE - 1) & !(PAGE - 1);
    let end = ((to + PAGE - 1) & !(PAGE - 1)).min(limit & !(PAGE - 1));
    // SAFETY: whole pages of a table of the state past what it holds: zeros, what those
    // bytes were at the start, are as good as what they hold.
    unsafe { discard(start, end) };
}

/// Gives back the pages from `start` to `end` (page-aligned; none when `end` is not above
/// `start`): the kernel frees them, and they read as zeros when next touched, as private
/// anonymous memory does at first.
///
/// # Safety
///
/// They are private anonymous memory (the state's, or the stack's), and nothing uses what
/// they hold.
unsafe fn discard(start: usize, end: usize) {
    if start < end {
        // SAFETY: madvise(MADV_DONTNEED) on whole pages: the caller's promise.
        unsafe {
            syscall4(sys::MADVISE, start, end - start, 4 /* MADV_DONTNEED */, 0)
        };
    }
}

/// Whether to exit now: no child, no connection, and under the lock no connection pending.
fn may_leave() -> bool {
    // SAFETY: flock with integer arguments only.
    if unsafe {
        syscall4(sys::FLOCK, LOCK, 2 | 4 /* LOCK_EX | LOCK_NB */, 0, 0)
    } < 0
    {
        return false;
    }
    let mut p = PollFd { fd: LISTENER as i32, events: POLLIN, revents: 0 };
    // SAFETY: poll reads and writes one live pollfd; no wait.
    let pending = unsafe { syscall4(sys::POLL, &mut p as *mut PollFd as usize, 1, 0, 0) } != 0;
    if pending {
        // SAFETY: flock with integer arguments only.
        unsafe {
            syscall4(sys::FLOCK, LOCK, 8 /* LOCK_UN */, 0, 0)
        };
    }
    // Exiting releases the lock.
    !pending
}

/// Reads and answers the one request of connection `c`.
fn answer(state: &mut State, c: Connection) {
    let mut fds = [-1i32; MAX_FDS];
    // Into the arena past its commands, where a watch's command is to go.
    let at = state.used;
    let received = receive(c.fd as usize, &mut state.arena[at..at + MAX_REQUEST], &mut fds);
    let (len, nfds) = match received {
        Ok(got) => got,
        Err(message) => {
            // A request cut short may have filled the whole buffer: those pages are the
            // arena's to give back like any other.
            state.arena_top = state.arena_top.max(at + MAX_REQUEST);
            reply(c.fd, message);
            return;
        }
    };
    state.arena_top = state.arena_top.max(at + len);
    let message: &[u8] = match (&state.arena[at..at + len], nfds) {
        ([b'R', payload @ ..], 3) => match spawn(payload, None, Some(&[fds[0], fds[1], fds[2]])) {
            Ok(()) => b"ok",
            Err(e) => e,
        },
        ([b'R', ..], _) => b"a launch request needs three descriptors",
        ([b'W', a, b, c2, d, ..], 0) => {
            let pid = i32::from_le_bytes([*a, *b, *c2, *d]);
            watch(state, c.peer, pid, at + 5, len - 5)
        }
        _ => b"unknown request",
    };
    for &fd in &fds[..nfds] {
        close(fd as usize);
    }
    reply(c.fd, message);
}

/// Adds the watch of `pid` that `peer` asked for, its command the `len` bytes at `arena[at..]`,
/// past the arena's commands; the answer.
fn watch(state: &mut State, peer: i32, pid: i32, at: usize, len: usize) -> &'static [u8] {
    if parse(&state.arena[at..at + len], None).is_none() || pid <= 0 {
        return b"malformed watch request";
    }
    if !is_child(pid) && !is_child(peer) {
        // Neither ours nor a child of one of ours (a launcher): when the asker exits, its
        // children go to another reaper, and this monitor would never see the end.
        return b"the process to watch is not below this monitor";
    }
    // An older watch of the same pid (a reused pid whose end was missed) goes. That moves
    // the commands below `at` only.
    while let Some(i) = state.watches[..state.count].iter().position(|w| w.pid == pid) {
        forget(state, i);
    }
    // What it shares with the template; with none, it becomes the template, all shared.
    let t = state.template;
    let (pre, suf) = if t.users == 0 {
        (len, 0)
    } else {
        shared(&state.arena[t.off as usize..t.off as usize + t.len as usize], &state.arena[at..at + len])
    };
    let own = len - pre - suf;
    let stored = if t.users == 0 { len } else { own };
    if state.count == MAX_WATCHES || state.used + stored > ARENA {
        return b"the monitor watches as many containers as it can";
    }
    // Down onto the commands' end: past the request's header, and past the commands just
    // forgotten.
    if t.users == 0 {
        move_within(&mut state.arena, at, state.used, len);
        state.template = Template { off: state.used as u32, len: len as u16, users: 0 };
        state.used += len;
    }
    let off = if own == 0 { 0 } else { state.used };
    move_within(&mut state.arena, at + pre, off, own);
    state.used += own;
    if pre + suf > 0 {
        state.template.users += 1;
    }
    let (len, pre, suf) = (own as u16, pre as u16, suf as u16);
    state.watches[state.count] = Watch { pid, off: off as u32, len, pre, suf, ended: None };
    state.count += 1;
    state.watches_top = state.watches_top.max(state.count);
    b"ok"
}

/// Sends `message` on connection `c`; a peer that has gone away gets nothing (MSG_NOSIGNAL:
/// no SIGPIPE, which would end the monitor).
fn reply(c: i32, message: &[u8]) {
    // SAFETY: sendto reads `message.len()` bytes of a live slice; no address.
    let _ = unsafe { syscall6(sys::SENDTO, c as usize, message.as_ptr() as usize, message.len(), 0x4000, 0, 0) };
}

/// One datagram into `buf`, and the descriptors that came with it (close on exec). Its length
/// and the number of descriptors.
fn receive(c: usize, buf: &mut [u8], fds: &mut [i32; MAX_FDS]) -> Result<(usize, usize), &'static [u8]> {
    let mut iov = [buf.as_mut_ptr() as usize, buf.len()];
    // struct cmsghdr (len, level, type) and room for MAX_FDS ints, 8-byte aligned.
    let mut control = [0u64; 2 + MAX_FDS / 2];
    let mut msg = MsgHdr {
        name: 0,
        namelen: 0,
        iov: iov.as_mut_ptr() as usize,
        iovlen: 1,
        control: control.as_mut_ptr() as usize,
        controllen: core::mem::size_of_val(&control),
        flags: 0,
    };
    // SAFETY: recvmsg writes at most `buf.len()` bytes into `buf` and at most `controllen`
    // into `control`, both live, and updates `msg`.
    let n = unsafe {
        syscall4(sys::RECVMSG, c, &mut msg as *mut MsgHdr as usize, 0x4000_0000 /* MSG_CMSG_CLOEXEC */, 0)
    };
    if n < 0 {
        return Err(b"cannot read the request");
    }
    let mut nfds = 0;
    if msg.controllen >= 16 {
        let len = control[0] as usize;
        let (level, kind) = (control[1] as u32, (control[1] >> 32) as u32);
        if level == 1 && kind == 1 && len > 16 {
            // SOL_SOCKET, SCM_RIGHTS: the descriptors follow the 16-byte header.
            nfds = ((len - 16) / 4).min(MAX_FDS);
            for (i, fd) in fds.iter_mut().enumerate().take(nfds) {
                *fd = (control[2 + i / 2] >> (32 * (i % 2))) as u32 as i32;
            }
        }
    }
    if msg.flags & (0x20 | 0x8) != 0 {
        // MSG_TRUNC, MSG_CTRUNC.
        for &fd in &fds[..nfds] {
            close(fd as usize);
        }
        return Err(b"the request is too large");
    }
    Ok((n as usize, nfds))
}

/// The pid and uid of the process at the other end of connection `c`.
fn peer(c: usize) -> Option<(i32, u32)> {
    let mut cred = [0u32; 3];
    let mut len: u32 = 12;
    // SAFETY: getsockopt(SOL_SOCKET, SO_PEERCRED) writes a 12-byte struct ucred into `cred`
    // and its length into `len`.
    let r =
        unsafe { syscall6(sys::GETSOCKOPT, c, 1, 17, cred.as_mut_ptr() as usize, &mut len as *mut u32 as usize, 0) };
    (r == 0 && len == 12).then_some((cred[0] as i32, cred[1]))
}

/// ARGV and ENV of a request payload, as pointer arrays for execve (room for an extra argument
/// and the nulls that end them). 2 KiB: made only in the forked child, whose stack pages are
/// its own, and written only as far as they are used (zeroing them would be a call of
/// `memset`, see [`move_within`]).
struct Command {
    argv: [MaybeUninit<*const u8>; MAX_STRINGS + 2],
    envp: [MaybeUninit<*const u8>; MAX_STRINGS + 1],
}

/// How many strings ARGV and ENV of a request payload have, and their addresses into
/// `command` when given. None unless the payload is NUL-terminated strings with a non-empty
/// ARGV and one empty string after it.
fn parse(payload: &[u8], mut command: Option<&mut Command>) -> Option<(usize, usize)> {
    if payload.last() != Some(&0) {
        return None;
    }
    let mut in_env = false;
    let mut args = 0;
    let mut envs = 0;
    let mut start = 0;
    for (i, &b) in payload.iter().enumerate() {
        if b != 0 {
            continue;
        }
        let s = &payload[start..i];
        let p = s.as_ptr();
        start = i + 1;
        if !in_env {
            if s.is_empty() {
                in_env = true;
            } else if args == MAX_STRINGS {
                return None;
            } else {
                if let Some(command) = command.as_deref_mut() {
                    command.argv[args].write(p);
                }
                args += 1;
            }
        } else if !s.is_empty() {
            if envs == MAX_STRINGS {
                return None;
            }
            if let Some(command) = command.as_deref_mut() {
                command.envp[envs].write(p);
            }
            envs += 1;
        }
    }
    (in_env && args > 0).then_some((args, envs))
}

/// Forks a child that runs `payload`'s command, with `extra` appended to its arguments, and
/// `stdio` as its descriptors 0, 1 and 2 (the monitor's own when None) in a session of its own.
fn spawn(payload: &[u8], extra: Option<*const u8>, stdio: Option<&[i32; 3]>) -> Result<(), &'static [u8]> {
    if parse(payload, None).is_none() {
        return Err(b"malformed launch request");
    }
    // SAFETY: fork takes nothing; the child only makes system calls on memory it owns.
    let pid = unsafe { syscall4(sys::FORK, 0, 0, 0, 0) };
    if pid < 0 {
        return Err(b"the monitor cannot fork");
    }
    if pid > 0 {
        return Ok(());
    }
    exec(payload, extra, stdio)
}

/// The forked child of [`spawn`]. A function of its own, so that the monitor's stack frames
/// never include its pointer arrays.
#[inline(never)]
fn exec(payload: &[u8], extra: Option<*const u8>, stdio: Option<&[i32; 3]>) -> ! {
    let mut command = Command {
        argv: [const { MaybeUninit::uninit() }; MAX_STRINGS + 2],
        envp: [const { MaybeUninit::uninit() }; MAX_STRINGS + 1],
    };
    // Checked by `spawn`: at least one argument, at most MAX_STRINGS of each, so there is room
    // for the extra argument and the nulls.
    let Some((mut args, envs)) = parse(payload, Some(&mut command)) else { exit(127) };
    if let Some(arg) = extra {
        command.argv[args].write(arg);
        args += 1;
    }
    command.argv[args].write(core::ptr::null());
    command.envp[envs].write(core::ptr::null());
    // SAFETY: written by `parse`, as there is an argument.
    let path = unsafe { command.argv[0].assume_init() };
    if let Some(fds) = stdio {
        for (target, &fd) in fds.iter().enumerate() {
            // SAFETY: dup2 with integer arguments only. The received descriptors are above 4
            // (0 to 4 are the monitor's own), so none is overwritten before it is moved.
            unsafe { syscall4(sys::DUP2, fd as usize, target, 0, 0) };
        }
    }
    let none: u64 = 0;
    // SAFETY: setsid takes nothing; rt_sigprocmask(SIG_SETMASK) reads an 8-byte empty mask.
    unsafe {
        syscall4(sys::SETSID, 0, 0, 0, 0);
        syscall4(sys::RT_SIGPROCMASK, 2, &none as *const u64 as usize, 0, 8);
    }
    // SAFETY: execve reads the NUL-terminated path and the pointer arrays up to their nulls,
    // entries all written above, which point at NUL-terminated strings in the payload (or
    // `extra`'s digits), alive in this process until the call. It returns only on failure.
    unsafe { syscall4(sys::EXECVE, path as usize, command.argv.as_ptr() as usize, command.envp.as_ptr() as usize, 0) };
    let _ = write(1, b"twinbox-monitor: cannot run ");
    // SAFETY: the path is a NUL-terminated string of the payload.
    let _ = write(1, unsafe { c_str(path) });
    let _ = write(1, b"\n");
    exit(127)
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

const POLLIN: i16 = 1;

/// The kernel's `struct msghdr` on x86_64.
#[repr(C)]
struct MsgHdr {
    name: usize,
    namelen: u32,
    iov: usize,
    iovlen: usize,
    control: usize,
    controllen: usize,
    flags: i32,
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

fn write(fd: usize, message: &[u8]) -> isize {
    // SAFETY: write reads `message.len()` bytes of a live slice.
    unsafe { syscall4(sys::WRITE, fd, message.as_ptr() as usize, message.len(), 0) }
}

fn close(fd: usize) {
    // SAFETY: close with an integer argument; the descriptor is ours.
    unsafe { syscall4(sys::CLOSE, fd, 0, 0, 0) };
}

fn fail(message: &[u8]) -> ! {
    let _ = write(2, message);
    exit(FAILED)
}

fn exit(code: i32) -> ! {
    // SAFETY: exit_group ends the process; it takes no memory.
    unsafe {
        asm!("syscall", in("rax") sys::EXIT_GROUP, in("rdi") code as usize, options(noreturn, nostack));
    }
}

/// # Safety
///
/// The arguments are what system call `n` expects (valid pointers where it reads or writes).
unsafe fn syscall4(n: usize, a1: usize, a2: usize, a3: usize, a4: usize) -> isize {
    // SAFETY: the caller's promise.
    unsafe { syscall6(n, a1, a2, a3, a4, 0, 0) }
}

/// # Safety
///
/// As [`syscall4`].
unsafe fn syscall6(n: usize, a1: usize, a2: usize, a3: usize, a4: usize, a5: usize, a6: usize) -> isize {
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
            in("r8") a5,
            in("r9") a6,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// `buf[from..from + n]` copied to `buf[to..]` (they may overlap), as `copy_within` does, but
/// without a call of `memmove`. The compiler makes its calls of `memcpy`, `memmove` and
/// `memset` through a GOT (the precompiled `core` asks for that), data that the kernel writes
/// when it loads the executable, which then takes a page of memory more: the monitor has no
/// such call (check with `readelf -S`: no `.got`).
fn move_within(buf: &mut [u8], from: usize, to: usize, n: usize) {
    match from.max(to).checked_add(n) {
        Some(end) if end <= buf.len() => {}
        _ => fail(b"twinbox-monitor: internal error\n"),
    }
    // SAFETY: both ranges are within `buf`, checked above.
    unsafe { copy(buf.as_mut_ptr().add(to), buf.as_mut_ptr().add(from), n) };
}

/// Copies that the compiler emits calls for; with no libc, they are ours. Volatile accesses
/// keep it from turning these loops into calls of themselves.
///
/// # Safety
///
/// As C's `memcpy`: `n` bytes readable at `src`, writable at `dst`, not overlapping.
#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's promise; a correct memmove is a correct memcpy.
    unsafe { copy(dst, src, n) }
}

/// # Safety
///
/// As C's `memmove`: `n` bytes readable at `src`, writable at `dst`; they may overlap.
#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's promise.
    unsafe { copy(dst, src, n) }
}

/// What `memcpy` and `memmove` do, under a name that the compiler does not take for the C
/// function's: a call of `memmove` from Rust would be made through the GOT (see
/// [`move_within`]).
///
/// # Safety
///
/// As C's `memmove`.
unsafe fn copy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) {
        for i in 0..n {
            // SAFETY: the caller's promise, for every i < n; copying upwards never reads a
            // byte already overwritten when dst is below src.
            unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
        }
    } else {
        for i in (0..n).rev() {
            // SAFETY: as above, copying downwards when dst is above src.
            unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
        }
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

/// As C's `bcmp`/`memcmp`, which slice comparisons may call.
///
/// # Safety
///
/// `n` bytes readable at `a` and at `b`.
#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller's promise, for every i < n.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
///
/// As [`memcmp`].
#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the caller's promise.
    unsafe { memcmp(a, b, n) }
}

/// The precompiled `core` names the unwinder's personality routine; with `panic = "abort"`
/// nothing unwinds, so it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    fail(b"twinbox-monitor: internal error\n")
}

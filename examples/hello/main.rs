//! The workload of twinbox's built-in default image. Static, no dependencies, so the same
//! binary runs as a container's pid 1 on the host kernel and as a VM guest's workload.
//!
//! `hello` greets and says where it runs; `hello true` exits 0 at once; `hello exit N`
//! exits N; `hello sleep SECS` idles; `hello spin N` does N rounds of integer work and
//! prints a checksum; `hello syscalls N` makes N getppid() system calls (the syscall-heavy
//! loop of `twinbox bench`) and prints their sum; either loop followed by `timed` also prints
//! `loop_ns=T`, the loop's own time on the monotonic clock of the kernel it runs on (how
//! `twinbox bench` times the work without the start and exit around it); `hello crash` dies of SIGILL (exit 132), the
//! signal a kernel delivers even to a pid-namespace init.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("greet") => greet(),
        Some("true") => ExitCode::SUCCESS,
        Some("exit") => ExitCode::from(arg_num(&args, 0) as u8),
        Some("sleep") => {
            std::thread::sleep(std::time::Duration::from_secs(arg_num(&args, u64::MAX / 4)));
            ExitCode::SUCCESS
        }
        Some("spin") => timed(&args, spin),
        Some("syscalls") => timed(&args, syscalls),
        Some("crash") => crash(),
        Some(other) => {
            eprintln!(
                "hello: unknown mode {other:?}; use greet, true, exit N, sleep SECS, spin N, syscalls N or crash"
            );
            ExitCode::from(2)
        }
    }
}

/// Runs `work` with the round count in `args[1]`, prints its result, and with `timed` in
/// `args[2]` the loop's time in nanoseconds.
fn timed(args: &[String], work: fn(u64) -> u64) -> ExitCode {
    let timed = match args.get(2).map(String::as_str) {
        None => false,
        Some("timed") => true,
        Some(other) => {
            eprintln!("hello: unknown option {other:?}; use `timed`");
            return ExitCode::from(2);
        }
    };
    let rounds = arg_num(args, 1_000_000);
    let start = std::time::Instant::now();
    let result = std::hint::black_box(work(std::hint::black_box(rounds)));
    let ns = start.elapsed().as_nanos();
    println!("{result}");
    if timed {
        println!("loop_ns={ns}");
    }
    ExitCode::SUCCESS
}

fn arg_num(args: &[String], default: u64) -> u64 {
    args.get(1).and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn greet() -> ExitCode {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_else(|_| "unknown (no /proc)".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "unknown".into());
    println!("Hello from twinbox!");
    println!("pid {} on kernel {} as host {}", std::process::id(), kernel.trim(), host.trim());
    ExitCode::SUCCESS
}

/// Executes an invalid instruction. The kernel answers with a forced SIGILL, which kills even
/// pid 1 of a pid namespace (signals *sent* to such an init are ignored unless it handles
/// them), so the run reports 128 + 4.
fn crash() -> ExitCode {
    // SAFETY: `ud2` touches no memory and no register; it only raises #UD, which the kernel
    // turns into SIGILL with the default action (terminate), so execution never continues.
    unsafe { std::arch::asm!("ud2", options(nomem, nostack)) };
    ExitCode::FAILURE
}

/// A xorshift loop the optimiser cannot fold away.
fn spin(rounds: u64) -> u64 {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_add(i);
    }
    x
}

/// One getppid() system call per round (std does not cache it), summed so none is skipped.
fn syscalls(rounds: u64) -> u64 {
    (0..rounds).fold(0u64, |acc, _| acc.wrapping_add(u64::from(std::os::unix::process::parent_id())))
}

//! twinbox's container runtime: an OCI runtime in the runc mould (no daemon; `create` leaves
//! the container's init blocked on `exec.fifo` until `start`); its runc-compatible command
//! line is the `twinbox-runc` crate (runtime/runc).
//! See DESIGN.md for the module contracts; [`Runtime`] is the entry point.

pub mod caps;
pub mod cgroups;
pub mod container;
pub mod control;
pub mod create;
pub mod delete;
pub mod exec;
pub mod hooks;
pub mod init;
pub mod kill;
pub mod mountinfo;
pub mod namespaces;
pub mod network;
pub mod process;
pub mod rlimits;
pub mod rootfs;
pub mod seccomp;
pub mod start;
pub mod state;
pub mod syscall;
pub mod terminal;
pub mod user;

pub use container::{CreateOptions, ExecOptions, Runtime, RuntimeError};
pub use state::{State, Status};

/// The exit code a shell reports for a wait status: the process's own code, or 128 + N when
/// signal N killed it; `None` for a stop or a continue, which are not an end.
pub fn exit_code(status: nix::sys::wait::WaitStatus) -> Option<i32> {
    use nix::sys::wait::WaitStatus;
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Waits for `pid` (a child of ours) while passing every signal of `set` (blocked by the
/// caller) on to it, SIGCHLD aside; SIGWINCH resizes `console`'s pty instead. Its exit code
/// (128+N for signal N).
pub fn wait_forwarding(
    pid: nix::unistd::Pid,
    set: &nix::sys::signal::SigSet,
    console: Option<&terminal::ConsoleProxy>,
) -> nix::Result<i32> {
    use nix::sys::signal::Signal;
    use nix::sys::wait::{waitpid, WaitPidFlag};
    loop {
        // Reap first: the child may have ended before we started waiting for signals.
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(status) => {
                if let Some(code) = exit_code(status) {
                    return Ok(code);
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
        match (set.wait()?, console) {
            (Signal::SIGCHLD, _) => {}
            (Signal::SIGWINCH, Some(c)) => c.resize(),
            (sig, _) => {
                tracing::debug!(signal = %sig, pid = pid.as_raw(), "forwarding");
                let _ = nix::sys::signal::kill(pid, sig);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use nix::sys::signal::Signal;
    use nix::sys::wait::WaitStatus;
    use nix::unistd::Pid;

    #[test]
    fn exit_codes_are_a_shells() {
        let pid = Pid::from_raw(7);
        assert_eq!(super::exit_code(WaitStatus::Exited(pid, 3)), Some(3));
        assert_eq!(super::exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)), Some(137));
        assert_eq!(super::exit_code(WaitStatus::Stopped(pid, Signal::SIGSTOP)), None);
        assert_eq!(super::exit_code(WaitStatus::StillAlive), None);
    }
}

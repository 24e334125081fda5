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

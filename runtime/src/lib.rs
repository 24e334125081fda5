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
pub mod user;

pub use container::{CreateOptions, ExecOptions, Runtime, RuntimeError};
pub use state::{State, Status};

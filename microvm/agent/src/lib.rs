//! The protocol between twinbox's VMM and its guest agent.
//!
//! The agent is pid 1 of the microVM's initramfs. It reads [`GuestConfig`] from
//! [`CONFIG_PATH`], mounts the image's root disk under an overlay, starts the workload in its
//! own pid and mount namespaces, and hands everything back through I/O ports:
//!
//! ```text
//!  workload stdout ─pipe─► agent ─rep outsb (≤ 4096 B)─► STDOUT_PORT 0x510 ─► VMM
//!  workload stderr ─pipe─► agent ─rep outsb (≤ 4096 B)─► STDERR_PORT 0x511 ─► VMM
//!  just before execve:     workload ─byte 123─► MMIO BOOT_TIMER_ADDR (Firecracker's boot timer)
//!  at the end:             agent ─out (LE i32)─► EXIT_PORT 0x501 ─► VMM ends the VM
//!  a template, waiting:    agent ─out (1 B)─► READY_PORT 0x502 ─► VMM pauses and snapshots the VM
//!  a restored copy:        VMM ─start request─► guest RAM at MAILBOX_ADDR ─/dev/mem─► agent
//! ```
//!
//! While the workload runs, the agent also serves `exec` on vsock port 1024 ([`control`]).
//!
//! A warm *template* ([`GuestConfig::template`]) stops short of a workload: its agent mounts
//! /proc /sys /dev, listens on the control port, writes [`READY_PORT`] and waits; the VMM
//! snapshots the VM there. Every VM restored from that snapshot gets its workload in a `start`
//! request ([`control::StartRequest`]), with fresh entropy for the kernel's random pool and the
//! host's wall-clock time; it then goes on as a cold boot does, with its own hostname, address
//! and eth0 MAC address from the request's configuration. The VMM writes that request into the
//! copy's memory at [`MAILBOX_ADDR`] before it runs, so the agent has it the moment it resumes
//! (no vsock round trip, which costs a restore more than anything else); one that does not fit
//! comes on the control channel instead, as an `exec` request does.
//!
//! The exit status is the workload's exit code, 128 + N when signal N killed it,
//! [`EXIT_SETUP_FAILED`] (125) when the agent could not start it, [`EXIT_NOT_EXECUTABLE`] (126)
//! or [`EXIT_NOT_FOUND`] (127) when the program could not be run, as `twinbox run` reports for a
//! container.

pub mod config;
pub mod control;
pub mod path;
pub mod status;

pub use config::{GuestConfig, GuestConfigError, GuestNetwork, GuestVolume};
pub use path::{find_program, path_var, LookupError, Probe, DEFAULT_PATH};
pub use status::{exit_code, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, EXIT_SETUP_FAILED};

/// I/O port that receives the workload's standard output (`rep outsb`, up to
/// [`MAX_CHUNK`] bytes per instruction).
pub const STDOUT_PORT: u16 = 0x510;
/// I/O port that receives the workload's standard error and the agent's own messages.
pub const STDERR_PORT: u16 = 0x511;
/// Most bytes the agent sends in one `rep outsb`: one page, what KVM hands over in one exit.
pub const MAX_CHUNK: usize = 4096;
/// I/O port of the final status: one 32-bit `out` of a little-endian `i32`. The VMM ends the
/// VM on that write. QEMU's `isa-debug-exit` sits at the same port.
pub const EXIT_PORT: u16 = 0x501;
/// Ports decoded at [`EXIT_PORT`] (one 32-bit register).
pub const EXIT_PORT_LEN: u16 = 4;
/// I/O port of a template VM's readiness: its agent writes one byte (any value) here once it
/// listens on the control port and waits for its workload; the VMM then pauses and snapshots
/// the VM. It lies within the [`EXIT_PORT_LEN`] ports from [`EXIT_PORT`], where the exit port
/// itself takes only writes at offset 0.
pub const READY_PORT: u16 = 0x502;
/// Guest-physical address of the Firecracker-compatible boot timer.
pub const BOOT_TIMER_ADDR: u64 = 0xc000_0000;
/// The byte the workload's process writes there just before it execs the workload.
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// Guest-physical address of a restored template's mailbox: [`MAILBOX_MAGIC`], the length of
/// what follows (little-endian u32), then a `start` request line (see
/// [`control::mailbox`]). It lies in the legacy hole at 0xA0000–0xFFFFF, which is guest RAM
/// to KVM and in a snapshot's memory, but not RAM in the e820 map the VMM gives the kernel: the
/// guest never uses it, and `/dev/mem` may read it. Zero in a template, so a template that goes
/// on without a restore finds no request there.
pub const MAILBOX_ADDR: u64 = 0xd_0000;
/// The mailbox's size.
pub const MAILBOX_LEN: usize = 0x1_0000;
/// The first bytes of a filled mailbox.
pub const MAILBOX_MAGIC: [u8; 8] = *b"TBSTART1";
/// Where the initramfs holds the agent's configuration.
pub const CONFIG_PATH: &str = "/twinbox/config.json";
/// A word on the kernel command line that makes the agent copy everything it sends to the
/// ports to `/dev/console` as well, for debugging under a VMM that ignores the output ports
/// (QEMU). twinbox's VMM never sets it.
pub const CONSOLE_MIRROR_PARAM: &str = "twinbox.console";

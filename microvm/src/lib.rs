//! twinbox's KVM microVM: a small VMM on the rust-vmm crates.
//!
//! ```text
//! VmConfig (serde data) ─► VmBuilder / Vm::try_from ─► Vm { KvmVm, vCPUs, PIO bus, MMIO bus }
//!                                                          └─ run(console) ─► VmExit
//! ```
//!
//! Modules: `config` (the serde configuration), `builder` (configuration to a running `Vm`),
//! `vstate` (KVM: the VM, guest memory, the vCPU run loop and its watchdog), `arch::x86_64`
//! (a vCPU's CPUID, MSRs, LAPIC and boot registers; the boot GDT and page tables), `devices`,
//! `loader` (kernel, initrd, boot parameters), `mptable`, `initramfs`, `console`, `stub`.
//!
//! Devices: COM1 8250 console (0x3f8, GSI 4), i8042 reset (0x60..=0x64: reset ends the VM),
//! Firecracker-compatible boot timer (MMIO 0xc000_0000, magic byte 123), exit-status port
//! (I/O 0x501), workload-output ports (I/O 0x510 stdout, 0x511 stderr), virtio-blk disks
//! (MMIO 0xd000_0000 + i * 4K, GSI 5 + i), then virtio-net cards on taps in the slots after
//! them, then a virtio-vsock device whose host side is UNIX sockets (Firecracker's); an MP table describes the vCPUs and the I/O APIC.
//! The guest agent (`microvm/agent`) runs a workload in such a VM; turning an OCI image into
//! its configuration and disk is the engine's (`twinbox_engine::microvm`). Only `vstate` owns
//! KVM file descriptors and holds `unsafe`; `arch` sets a vCPU up through kvm-ioctls' safe
//! calls.

pub mod arch;
pub mod config;
pub mod console;
pub mod devices;
pub mod initramfs;
pub mod jail;
pub mod loader;
pub mod mptable;
pub mod snapshot;
pub mod stub;
pub mod vstate;

mod builder;

pub use builder::{Vm, VmBuilder};
pub use config::{ConfigError, IrqChip, NetConfig, VmConfig, VsockConfig};
/// The guest agent's protocol: ports, exit statuses, `GuestConfig`.
pub use twinbox_agent as agent;

use std::io::Write;
use std::time::Duration;

use twinbox_exit::ExitCode;

/// How a VM ended, when the guest ended it: what a vCPU's run loop returns
/// ([`vstate::vcpu::Vcpu::run`]) and a [`VmExit`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 0xFE, `reboot=k`, or KVM_SYSTEM_EVENT_RESET): a clean
    /// end for a microVM.
    Reset,
    /// The guest powered off (KVM_SYSTEM_EVENT_SHUTDOWN, e.g. ACPI power-off).
    Shutdown,
    /// The guest agent reported its workload's exit status on the exit port.
    Exited(i32),
    /// The guest agent of a template VM waits for its workload, and the VM was built to pause
    /// then ([`VmBuilder::pause_when_ready`]): every vCPU has stopped, and the VM can be
    /// snapshotted ([`Vm::snapshot`]).
    Ready,
    /// The boot vCPU halted with interrupts disabled (a `hlt` exit without an in-kernel LAPIC,
    /// or found halted when kicked): nothing can wake it again.
    Halted {
        /// Instruction pointer after the `hlt`.
        rip: u64,
    },
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Reset => write!(f, "guest reset (clean stop)"),
            ExitReason::Shutdown => write!(f, "guest powered off"),
            ExitReason::Exited(s) => write!(f, "guest reported exit status {s}"),
            ExitReason::Ready => write!(f, "paused: the guest agent waits for its workload"),
            ExitReason::Halted { rip } => {
                write!(f, "guest halted with interrupts disabled at rip {rip:#x}")
            }
        }
    }
}

/// The result of a VM run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmExit {
    /// How it ended.
    pub reason: ExitReason,
    /// VMM process start → the guest's first boot-timer signal, if it came.
    pub boot_time: Option<Duration>,
    /// How many boot-timer signals the guest sent.
    pub boot_signals: u32,
}

impl VmExit {
    /// The exit code a CLI should return: the guest's status, 0 for reset/power-off, 1 for a
    /// dead halt.
    pub fn exit_code(&self) -> i32 {
        match self.reason {
            ExitReason::Exited(s) => s,
            ExitReason::Reset | ExitReason::Shutdown | ExitReason::Ready => 0,
            ExitReason::Halted { .. } => 1,
        }
    }
}

/// Errors of building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error("invalid VM configuration")]
    Config(#[from] ConfigError),
    /// Guest memory could not be set up.
    #[error("cannot set up guest memory")]
    Memory(#[from] vstate::memory::MemoryError),
    /// KVM refused to create the VM.
    #[error("cannot create the VM")]
    Kvm(#[from] vstate::vm::KvmVmError),
    /// The kernel, initrd or command line could not be loaded.
    #[error("cannot load the guest")]
    Loader(#[from] loader::LoaderError),
    /// A stub does not fit guest memory.
    #[error("stub guest of {len} bytes does not fit guest memory")]
    StubTooLarge {
        /// Its size.
        len: usize,
    },
    /// A restored VM's mailbox bytes are more than it holds.
    #[error("a start request of {len} bytes does not fit the guest's mailbox ({} bytes)", twinbox_agent::MAILBOX_LEN)]
    MailboxTooLarge {
        /// Their size.
        len: usize,
    },
    /// Devices could not be placed on the buses.
    #[error("cannot place devices")]
    Bus(#[from] devices::BusError),
    /// The serial interrupt eventfd could not be created.
    #[error("cannot create the serial interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// A disk could not be attached.
    #[error("cannot attach disk {path}")]
    Disk {
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: devices::virtio::block::BlockError,
    },
    /// The socket device could not be made.
    #[error("cannot make the vsock device")]
    Vsock(#[from] devices::virtio::vsock::VsockError),
    /// A network card could not be attached.
    #[error("cannot attach a network card")]
    Net(#[from] devices::virtio::net::NetError),
    /// A virtio device's interrupt eventfd could not be created.
    #[error("cannot create the interrupt eventfd for GSI {gsi}")]
    InterruptEventFd {
        /// The interrupt line.
        gsi: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot could not be written or restored, or was refused.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// The KVM clock could not be saved or restored.
    #[error("cannot save or restore the VM's clock")]
    Clock(#[source] vstate::snapshot::StateError),
    /// A vCPU failed or the guest stopped abnormally.
    #[error("the guest did not stop cleanly")]
    Vcpu(#[from] vstate::vcpu::VcpuError),
    /// The console could not be written.
    #[error("cannot write the guest console")]
    Console(#[source] std::io::Error),
    /// The MP table could not be written.
    #[error("cannot describe the vCPUs to the guest")]
    MpTable(#[from] mptable::MpTableError),
    /// The VMM could not be confined, or a thread could not narrow its system calls.
    #[error(transparent)]
    Jail(#[from] jail::JailError),
}

impl ExitCode for VmError {
    fn exit_code(&self) -> i32 {
        match self {
            VmError::Config(e) => e.exit_code(),
            VmError::Memory(e) => e.exit_code(),
            VmError::Kvm(e) => e.exit_code(),
            VmError::Loader(e) => e.exit_code(),
            VmError::Bus(e) => e.exit_code(),
            VmError::Disk { source, .. } => source.exit_code(),
            VmError::Net(e) => e.exit_code(),
            VmError::Vsock(e) => e.exit_code(),
            VmError::Vcpu(e) => e.exit_code(),
            VmError::MpTable(e) => e.exit_code(),
            VmError::Snapshot(e) => e.exit_code(),
            VmError::Clock(_) => twinbox_exit::INTERNAL,
            VmError::Jail(e) => e.exit_code(),
            VmError::StubTooLarge { .. }
            | VmError::MailboxTooLarge { .. }
            | VmError::EventFd(_)
            | VmError::InterruptEventFd { .. }
            | VmError::Console(_) => twinbox_exit::INTERNAL,
        }
    }
}

/// Builds the VM described by `config` and runs it to the end, copying the guest console to
/// `console`. The boot timer counts from an estimate of this process's start (±10 ms); use
/// [`VmBuilder::start_time`] to pass an exact `Instant` taken first thing in `main`.
pub fn run(config: VmConfig, console: &mut (dyn Write + Send)) -> Result<VmExit, VmError> {
    Vm::try_from(config)?.run(console)
}

/// Runs a raw flat 32-bit stub (see [`stub`]) in a VM of `mem_mib` MiB, console to stdout.
pub fn run_stub(code: &[u8], mem_mib: u32) -> Result<VmExit, VmError> {
    let config = VmConfig { memory_mib: mem_mib, ..VmConfig::default() };
    VmBuilder::new(config).stub(code.to_vec()).build()?.run(&mut std::io::stdout())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstate::vcpu::VcpuError;
    use vstate::vm::KvmVmError;

    #[test]
    fn exit_codes() {
        assert_eq!(VmError::Config(ConfigError::NoMemory).exit_code(), 1);
        assert_eq!(VmError::Kvm(KvmVmError::NoKvm).exit_code(), 1);
        assert_eq!(VmError::Kvm(KvmVmError::ApiVersion(11)).exit_code(), 125);
        // Through the vCPU, the KVM error still decides.
        let vcpus = KvmVmError::TooManyVcpus { requested: 300, max: 255 };
        assert_eq!(VmError::Vcpu(VcpuError::Create(vcpus)).exit_code(), 1);
        assert_eq!(VmError::Vcpu(VcpuError::GuestCrash(0)).exit_code(), 125);
        assert_eq!(VmError::Vcpu(VcpuError::Interrupted(15)).exit_code(), 128 + 15);
    }
}

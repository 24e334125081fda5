//! Emulated devices and the buses that route guest port and MMIO accesses to them.
//!
//! Every device implements [`BusDevice`]; it is generic over how it raises an interrupt
//! (vm-superio's [`Trigger`](vm_superio::Trigger)) so it is tested without KVM.

pub mod bus;
pub mod legacy;
pub mod pseudo;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, BusRange};

/// Something a device asks of the VM as a whole, returned from a guest write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest asked for a reset (i8042 0xFE); for a microVM that means: stop.
    Reset,
    /// The guest reported its workload's exit status on the exit port.
    Exit(i32),
    /// The guest agent of a template VM waits for its workload (a write to the ready port).
    Ready,
}

//! The state KVM holds for the VM: the VM fd and its memory, and the vCPUs with their run loop
//! and the watchdog that stops them. This is the only module that owns KVM file descriptors and
//! the kernel interfaces around them (the KVM run area, thread signals), so all `unsafe` lives
//! here; the architecture set-up of a vCPU is in [`crate::arch::x86_64`].

pub mod memory;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod watchdog;

//! The state KVM holds for the VM: the VM fd and its memory, and the vCPUs. This is the only
//! module that talks to the kernel's KVM interfaces, so all `unsafe` lives here.

pub mod memory;
pub mod vcpu;
pub mod vm;

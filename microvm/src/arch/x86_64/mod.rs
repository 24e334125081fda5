//! x86_64 set-up of a vCPU and of the boot structures in guest memory, apart from the run loop
//! (`vstate::vcpu`), which only runs.
//!
//! | file            | what it sets up                                                         |
//! |-----------------|-------------------------------------------------------------------------|
//! | `gdt.rs`        | segment descriptors and the boot GDT/IDT at [`gdt::GDT_ADDR`]           |
//! | `regs.rs`       | general, segment and FPU registers per entry mode; the boot page tables |
//! | `cpuid.rs`      | the CPUID each vCPU sees (APIC id, count, hypervisor bit, LAPIC timer)  |
//! | `msr.rs`        | the MSRs a vCPU starts with                                             |
//! | `interrupts.rs` | the local APIC's LINT0/LINT1 delivery modes                             |
//!
//! Each step takes a [`kvm_ioctls::VcpuFd`] and does its ioctls through kvm-ioctls' safe calls;
//! the values it writes come from plain functions on `kvm_bindings` data (and guest memory),
//! which the unit tests check without KVM. Nothing here is `unsafe`.

use twinbox_exit::ExitCode;

pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod msr;
pub mod regs;

/// Errors of setting up a vCPU or the boot structures.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// A register-state ioctl failed.
    #[error("cannot {what}")]
    Ioctl {
        /// The operation, e.g. "set CPUID".
        what: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM's CPUID list is already at its size limit.
    #[error("cannot add CPUID leaf 6: the CPUID list is full")]
    CpuidFull,
    /// KVM accepted only part of the MSR list.
    #[error("KVM refused MSR {index:#x}")]
    Msr {
        /// The first MSR not set.
        index: u32,
    },
    /// Writing the GDT or page tables into guest memory failed.
    #[error("cannot write the boot page tables/GDT into guest memory")]
    BootTables(#[source] vm_memory::GuestMemoryError),
}

impl ExitCode for ArchError {
    fn exit_code(&self) -> i32 {
        match self {
            ArchError::Ioctl { .. } | ArchError::CpuidFull | ArchError::Msr { .. } | ArchError::BootTables(_) => {
                twinbox_exit::INTERNAL
            }
        }
    }
}

/// A closure for `map_err` that names the failed ioctl.
fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ArchError {
    move |source| ArchError::Ioctl { what, source }
}

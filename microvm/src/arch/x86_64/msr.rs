//! The MSRs a vCPU starts with: the SYSENTER/SYSCALL entry points cleared, the TSC at zero, and
//! fast string operations enabled.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use super::{ioctl, ArchError};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// The boot MSRs, in the order they are handed to KVM.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect()
}

/// Sets the [`boot_msr_entries`] on `fd`; KVM must take all of them.
pub fn setup_msrs(fd: &VcpuFd) -> Result<(), ArchError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).expect("the MSR list is far below the FAM limit");
    let set = fd.set_msrs(&msrs).map_err(ioctl("set MSRs"))?;
    if set != entries.len() {
        return Err(ArchError::Msr { index: entries[set].index });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_are_zero_but_fast_strings() {
        let entries = boot_msr_entries();
        assert_eq!(entries.len(), 10);
        for e in &entries {
            let want = if e.index == MSR_IA32_MISC_ENABLE { MSR_IA32_MISC_ENABLE_FAST_STRING } else { 0 };
            assert_eq!(e.data, want, "MSR {:#x}", e.index);
        }
        let mut indices: Vec<u32> = entries.iter().map(|e| e.index).collect();
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), entries.len(), "no MSR twice");
        assert!(Msrs::from_entries(&entries).is_ok());
    }
}

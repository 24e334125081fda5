//! The CPUID each vCPU sees: KVM's supported set with the vCPU's APIC id, the processor count,
//! the hypervisor bit and, with an in-kernel LAPIC, its timer's features.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use kvm_ioctls::VcpuFd;

use super::{ioctl, ArchError};

/// CPUID leaf 1 ECX: running under a hypervisor.
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 1 EDX: HTT, the logical processor count in EBX is valid.
const CPUID_1_EDX_HTT: u32 = 1 << 28;
/// CPUID leaf 1 ECX: the LAPIC timer has TSC-deadline mode.
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID leaf 6 EAX: the APIC timer always runs (also in deep C-states).
const CPUID_6_EAX_ARAT: u32 = 1 << 2;

/// Fills CPUID for vCPU `id` of `count` from KVM's supported set: APIC ids, logical processor
/// count, and the hypervisor bit.
pub fn filter_cpuid(cpuid: &mut CpuId, id: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count.max(1)) << 16);
                entry.ecx |= CPUID_1_ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= CPUID_1_EDX_HTT;
                }
            }
            0xb | 0x1f => entry.edx = u32::from(id), // x2APIC id
            _ => {}
        }
    }
}

/// Tells the guest its local APIC timer has TSC-deadline mode and always runs (KVM's LAPIC
/// does both; KVM_GET_SUPPORTED_CPUID leaves the TSC-deadline bit to the VMM). With both,
/// Linux needs no PIT: it neither calibrates against one nor keeps one as broadcast timer.
pub fn advertise_lapic_timer(cpuid: &mut CpuId) -> Result<(), ArchError> {
    let mut has_leaf6 = false;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => entry.ecx |= CPUID_1_ECX_TSC_DEADLINE,
            6 => {
                entry.eax |= CPUID_6_EAX_ARAT;
                has_leaf6 = true;
            }
            _ => {}
        }
    }
    let max_basic = cpuid.as_slice().iter().find(|e| e.function == 0).map_or(0, |e| e.eax);
    if !has_leaf6 && max_basic >= 6 {
        let leaf6 = kvm_cpuid_entry2 { function: 6, eax: CPUID_6_EAX_ARAT, ..Default::default() };
        cpuid.push(leaf6).map_err(|_| ArchError::CpuidFull)?;
    }
    Ok(())
}

/// Sets the CPUID of vCPU `id` of `count` on `fd`: `supported` filtered by [`filter_cpuid`],
/// and with `lapic_timer` (an in-kernel LAPIC with TSC-deadline mode) by
/// [`advertise_lapic_timer`].
pub fn setup_cpuid(fd: &VcpuFd, supported: &CpuId, id: u8, count: u8, lapic_timer: bool) -> Result<(), ArchError> {
    let mut cpuid = supported.clone();
    filter_cpuid(&mut cpuid, id, count);
    if lapic_timer {
        advertise_lapic_timer(&mut cpuid)?;
    }
    fd.set_cpuid2(&cpuid).map_err(ioctl("set CPUID"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapic_timer_bits_are_advertised_and_leaf_6_added_when_missing() {
        let mut cpuid = CpuId::new(2).unwrap();
        cpuid.as_mut_slice()[0].eax = 0xd; // max basic leaf
        cpuid.as_mut_slice()[1].function = 1;
        advertise_lapic_timer(&mut cpuid).unwrap();
        let leaf = |c: &CpuId, f: u32| *c.as_slice().iter().find(|e| e.function == f).unwrap();
        assert_eq!(leaf(&cpuid, 1).ecx & CPUID_1_ECX_TSC_DEADLINE, CPUID_1_ECX_TSC_DEADLINE);
        assert_eq!(leaf(&cpuid, 6).eax, CPUID_6_EAX_ARAT);
        // Present already: the bit is or-ed in, nothing added.
        cpuid.as_mut_slice()[2].eax = 0x1;
        advertise_lapic_timer(&mut cpuid).unwrap();
        assert_eq!(cpuid.as_slice().len(), 3);
        assert_eq!(leaf(&cpuid, 6).eax, 0x1 | CPUID_6_EAX_ARAT);
        // A CPU whose basic leaves stop below 6 gets no leaf 6.
        let mut old = CpuId::new(1).unwrap();
        old.as_mut_slice()[0].eax = 4;
        advertise_lapic_timer(&mut old).unwrap();
        assert_eq!(old.as_slice().len(), 1);
    }

    #[test]
    fn cpuid_gets_apic_id_count_and_hypervisor_bit() {
        let mut cpuid = CpuId::new(2).unwrap();
        cpuid.as_mut_slice()[0].function = 1;
        cpuid.as_mut_slice()[0].ebx = 0xffff_1234;
        cpuid.as_mut_slice()[1].function = 0xb;
        filter_cpuid(&mut cpuid, 3, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx, 0x0304_1234);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_ne!(e[0].edx & (1 << 28), 0);
        assert_eq!(e[1].edx, 3);
    }

    #[test]
    fn a_single_vcpu_gets_no_htt_bit() {
        let mut cpuid = CpuId::new(1).unwrap();
        cpuid.as_mut_slice()[0].function = 1;
        filter_cpuid(&mut cpuid, 0, 1);
        let e = cpuid.as_slice()[0];
        assert_eq!(e.ebx, 1 << 16, "APIC id 0, one logical processor");
        assert_eq!(e.edx & CPUID_1_EDX_HTT, 0);
    }
}

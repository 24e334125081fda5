//! A vCPU's state as a snapshot keeps it: everything KVM holds for one vCPU that a restored
//! copy needs to go on from the instruction it was stopped at — general and special registers,
//! the FPU/SSE/AVX state (XSAVE), the extended control registers, debug registers, the
//! MSRs, the local APIC, pending exceptions and interrupts (vCPU events) and the MP state.
//!
//! Saved from a stopped vCPU (between two KVM_RUNs) with [`VcpuState::save`] and put into a
//! new vCPU of a VM with the same CPUID and memory with [`VcpuState::restore`], in the order
//! KVM needs: the MP state first, then the registers, XSAVE and XCRs, the LAPIC (whose timer
//! depends on the MSRs set after it, TSC deadline among them), the MSRs, and last the pending
//! events, which must land on the final register state.
//!
//! Beside the vCPUs, KVM holds one thing of the VM: its clock ([`VmClock`]), set in the new
//! VM before any of its vCPUs runs.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// One vCPU's state (see the module's documentation). Serialized as part of a VM's state.
/// (Not `Clone` or `PartialEq`: KVM's XSAVE area has a trailing variable part that its
/// binding does not compare or copy; the serialized form compares.)
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// (index, value) of every MSR in [`SAVED_MSRS`] that KVM let us read.
    pub msrs: Vec<(u32, u64)>,
}

/// The MSRs a snapshot keeps: the SYSCALL/SYSENTER entry points and segments, the TSC and
/// its deadline and adjustment, the PAT, the KVM paravirtual clocks and features, the misc
/// enables, and the x2APIC-independent APIC base.
pub const SAVED_MSRS: [u32; 20] = [
    0x0000_001b, // IA32_APIC_BASE
    0x0000_0010, // IA32_TSC
    0x0000_003b, // IA32_TSC_ADJUST
    0x0000_06e0, // IA32_TSC_DEADLINE
    0x0000_0174, // IA32_SYSENTER_CS
    0x0000_0175, // IA32_SYSENTER_ESP
    0x0000_0176, // IA32_SYSENTER_EIP
    0x0000_0277, // IA32_PAT
    0x0000_01a0, // IA32_MISC_ENABLE
    0xc000_0080, // EFER (also in sregs; KVM accepts it twice)
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x4b56_4d00, // KVM wall clock (new)
    0x4b56_4d01, // KVM system time (new)
    0x4b56_4d02, // KVM async page fault
    0x4b56_4d04, // KVM PV EOI
];

/// A 64-bit TSS descriptor's type, busy and available.
const TSS_BUSY: u8 = 11;
const TSS_AVAILABLE: u8 = 9;

/// Saving or restoring a vCPU's state failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A vCPU ioctl failed.
    #[error("cannot {what} of the vCPU")]
    Ioctl {
        /// The operation, e.g. "get the special registers".
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM took the MSRs before this one and refused it (another CPU model or KVM).
    #[error("KVM refuses MSR {index:#x} of the saved state (another CPU model or KVM version?)")]
    MsrRefused {
        /// The MSR's index.
        index: u32,
    },
}

fn err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Ioctl { what, source }
}

impl VcpuState {
    /// The state of the stopped vCPU `fd`.
    pub fn save(fd: &VcpuFd) -> Result<VcpuState, StateError> {
        // The MP state and events first: reading them makes KVM settle what is pending.
        let mp_state = fd.get_mp_state().map_err(err("get the MP state"))?;
        let events = fd.get_vcpu_events().map_err(err("get the pending events"))?;
        let regs = fd.get_regs().map_err(err("get the registers"))?;
        let sregs = fd.get_sregs().map_err(err("get the special registers"))?;
        let xsave = fd.get_xsave().map_err(err("get the XSAVE state"))?;
        let xcrs = fd.get_xcrs().map_err(err("get the XCRs"))?;
        let debug_regs = fd.get_debug_regs().map_err(err("get the debug registers"))?;
        let lapic = fd.get_lapic().map_err(err("get the local APIC"))?;
        let msrs = read_msrs(fd)?;
        Ok(VcpuState { regs, sregs, xsave, xcrs, debug_regs, lapic, mp_state, events, msrs })
    }

    /// Puts this state into `fd`, a new vCPU (its CPUID already set) of a VM whose memory
    /// holds what the saved one's did.
    ///
    /// On an AMD host (`amd`) the task register goes back as an available TSS (type 9): KVM on
    /// SVM cannot tell a busy TSS from an available one and always reports it busy (11), which
    /// an AMD CPU ignores in long mode, but QEMU's emulation of SVM (the nested L1 where the
    /// Linux guests are tested) then refuses every I/O permission check against the TSS: the
    /// guest agent's first string write to a port after a restore faulted. Intel's VM entry
    /// needs the busy type, which stays.
    pub fn restore(&self, fd: &VcpuFd, amd: bool) -> Result<(), StateError> {
        fd.set_mp_state(self.mp_state).map_err(err("set the MP state"))?;
        fd.set_regs(&self.regs).map_err(err("set the registers"))?;
        let mut sregs = self.sregs;
        if amd && sregs.tr.type_ == TSS_BUSY {
            sregs.tr.type_ = TSS_AVAILABLE;
        }
        fd.set_sregs(&sregs).map_err(err("set the special registers"))?;
        // SAFETY: `xsave` was read from KVM by get_xsave (the legacy 4 KiB region, no
        // trailing dynamic part), so it is as large as KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(err("set the XSAVE state"))?;
        fd.set_xcrs(&self.xcrs).map_err(err("set the XCRs"))?;
        fd.set_debug_regs(&self.debug_regs).map_err(err("set the debug registers"))?;
        fd.set_lapic(&self.lapic).map_err(err("set the local APIC"))?;
        write_msrs(fd, &self.msrs)?;
        fd.set_vcpu_events(&self.events).map_err(err("set the pending events"))?;
        Ok(())
    }
}

/// The VM-wide state KVM holds beside its vCPUs': the KVM clock (the guest's kvmclock time).
/// The rest of the VM is the VMM's own (the split irqchip's IOAPIC, the devices).
#[derive(Debug, Serialize, Deserialize)]
pub struct VmClock {
    pub clock: kvm_clock_data,
}

impl VmClock {
    /// The clock of the paused VM `vm`.
    pub fn save(vm: &VmFd) -> Result<VmClock, StateError> {
        let mut clock = vm.get_clock().map_err(err("get the KVM clock"))?;
        // What KVM says about the host's TSC at the time is no instruction for another VM
        // (KVM_SET_CLOCK refuses flags it does not take): the guest's time goes on from the
        // saved value, the time it spent saved not counted, as Firecracker restores it.
        clock.flags = 0;
        Ok(VmClock { clock })
    }

    /// Sets the clock of the new VM `vm` (before its vCPUs run).
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        vm.set_clock(&self.clock).map_err(err("set the KVM clock"))
    }
}

/// Every MSR of [`SAVED_MSRS`] KVM reads for this vCPU, each asked alone: KVM ends a batch at
/// the first MSR it does not know, and an unknown one is left out, not fatal.
fn read_msrs(fd: &VcpuFd) -> Result<Vec<(u32, u64)>, StateError> {
    let mut out = Vec::with_capacity(SAVED_MSRS.len());
    for &index in &SAVED_MSRS {
        let mut one = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
            .expect("one entry fits a FamStructWrapper");
        if fd.get_msrs(&mut one).map_err(err("get the MSRs"))? == 1 {
            out.push((index, one.as_slice()[0].data));
        }
    }
    Ok(out)
}

fn write_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), StateError> {
    if msrs.is_empty() {
        return Ok(());
    }
    let entries: Vec<kvm_msr_entry> =
        msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    let wrapped = Msrs::from_entries(&entries)
        .map_err(|_| StateError::Ioctl { what: "set the MSRs", source: kvm_ioctls::Error::new(libc::E2BIG) })?;
    let written = fd.set_msrs(&wrapped).map_err(err("set the MSRs"))?;
    match entries.get(written) {
        Some(refused) => Err(StateError::MsrRefused { index: refused.index }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::VcpuExit;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    use super::VcpuState;
    use crate::config::IrqChip;
    use crate::stub::{STUB_LOAD_ADDR, STUB_STACK};
    use crate::vstate::memory::create_guest_memory;
    use crate::vstate::vcpu::Vcpu;
    use crate::vstate::vm::KvmVm;

    /// A port no device of these bare VMs claims: each write is an exit to the test.
    const PORT: u16 = 0x3f0;

    /// `xor ecx, ecx; again: inc ecx; mov eax, ecx; mov dx, PORT; out dx, eax; jmp again`: the
    /// guest counts 1, 2, 3, … and reports each number on PORT.
    fn counter() -> Vec<u8> {
        let [lo, hi] = PORT.to_le_bytes();
        // jmp rel8 at offset 10 (ends at 12) back to `inc ecx` at offset 2: -10.
        vec![0x31, 0xc9, 0x41, 0x89, 0xc8, 0x66, 0xba, lo, hi, 0xef, 0xeb, 0xf6]
    }

    /// A VM of 16 MiB with one vCPU (split irqchip, so KVM holds its LAPIC), the counter loaded
    /// and the vCPU at its entry, or None (skipped) without /dev/kvm.
    fn counting_vm(test: &str) -> Option<(KvmVm, Vcpu)> {
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            twinbox_testutil::require(false, test, &format!("/dev/kvm is not usable: {e}"));
            return None;
        }
        let vm = KvmVm::new(create_guest_memory(16).unwrap(), Some(IrqChip::Split)).unwrap();
        let supported = vm.supported_cpuid().unwrap();
        let vcpu = Vcpu::new(&vm, &supported, 0, 1).unwrap();
        vcpu.set_lint().unwrap();
        vm.memory().write_slice(&counter(), GuestAddress(STUB_LOAD_ADDR)).unwrap();
        vcpu.setup_flat_protected(STUB_LOAD_ADDR, STUB_STACK, 0).unwrap();
        Some((vm, vcpu))
    }

    /// Runs `vcpu` to its next write to PORT and returns the number written.
    fn next_count(vcpu: &mut Vcpu) -> u32 {
        loop {
            match vcpu.fd_mut().run() {
                Ok(VcpuExit::IoOut(port, data)) if port == PORT => {
                    return u32::from_le_bytes(data[..4].try_into().unwrap());
                }
                Ok(other) => panic!("unexpected exit of the counting guest: {other:?}"),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => panic!("KVM_RUN: {e}"),
            }
        }
    }

    #[test]
    fn a_counting_guest_goes_on_from_where_it_was_in_a_new_vm() {
        let Some((vm, mut vcpu)) = counting_vm("a_counting_guest_goes_on_from_where_it_was_in_a_new_vm") else {
            return;
        };
        let counted: Vec<u32> = (0..5).map(|_| next_count(&mut vcpu)).collect();
        assert_eq!(counted, [1, 2, 3, 4, 5]);
        // Stopped after its fifth report: its state, through JSON as a snapshot file keeps it,
        // and its memory.
        let state = vcpu.save_state().unwrap();
        let json = serde_json::to_vec(&state).unwrap();
        let state: VcpuState = serde_json::from_slice(&json).unwrap();
        // (Compared without printing: the XSAVE area alone is 4 KiB.)
        assert!(serde_json::to_vec(&state).unwrap() == json, "the state round-trips field by field");
        assert_eq!(state.regs.rcx, 5, "{:?}", state.regs);

        // A new VM, the memory copied into it, a new vCPU given the saved state.
        let (copy, mut restored) = counting_vm("restore").unwrap();
        for region in vm.memory().iter() {
            let mut bytes = vec![0u8; region.len() as usize];
            vm.memory().read_slice(&mut bytes, region.start_addr()).unwrap();
            copy.memory().write_slice(&bytes, region.start_addr()).unwrap();
        }
        restored.restore_state(&state, false).unwrap();
        let now = restored.save_state().unwrap();
        assert_eq!(now.regs, state.regs);
        assert_eq!(now.sregs, state.sregs);
        // Every MSR as saved; the TSC has run on since it was set, from the saved value.
        const TSC: u32 = 0x10;
        let without_tsc = |m: &[(u32, u64)]| m.iter().copied().filter(|e| e.0 != TSC).collect::<Vec<_>>();
        assert_eq!(without_tsc(&now.msrs), without_tsc(&state.msrs));
        let tsc = |m: &[(u32, u64)]| m.iter().find(|e| e.0 == TSC).map(|e| e.1);
        assert!(tsc(&now.msrs) >= tsc(&state.msrs), "{:?} < {:?}", tsc(&now.msrs), tsc(&state.msrs));
        let goes_on: Vec<u32> = (0..3).map(|_| next_count(&mut restored)).collect();
        assert_eq!(goes_on, [6, 7, 8], "the restored guest goes on counting where it was");
        // The original, untouched by the save, goes on too.
        assert_eq!(next_count(&mut vcpu), 6);
    }

    #[test]
    fn an_msr_this_kvm_refuses_is_named_not_skipped() {
        let Some((_vm, vcpu)) = counting_vm("an_msr_this_kvm_refuses_is_named_not_skipped") else { return };
        let mut state = vcpu.save_state().unwrap();
        state.msrs.push((0xdead_beef, 1));
        let e = vcpu.restore_state(&state, false).unwrap_err();
        let chain = format!("{e}: {}", std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default());
        assert!(chain.contains("MSR 0xdeadbeef"), "{chain}");
    }

    #[test]
    fn the_kvm_clock_goes_on_from_the_saved_value() {
        let Some((vm, _vcpu)) = counting_vm("the_kvm_clock_goes_on_from_the_saved_value") else { return };
        let mut saved = super::VmClock::save(vm.fd()).unwrap();
        // An hour ahead of anything a VM made just now reads, so the restored value shows.
        const HOUR_NS: u64 = 3_600_000_000_000;
        saved.clock.clock += HOUR_NS;
        let json = serde_json::to_vec(&saved).unwrap();
        let saved: super::VmClock = serde_json::from_slice(&json).unwrap();
        let (copy, _restored) = counting_vm("restore").unwrap();
        saved.restore(copy.fd()).unwrap();
        let now = copy.fd().get_clock().unwrap().clock;
        assert!(now >= saved.clock.clock && now < saved.clock.clock + 10_000_000_000, "{now} vs {}", saved.clock.clock);
    }
}

//! The local APIC's LVT set-up: LINT0 delivers ExtINT (the PIC's output) and LINT1 NMI, as a
//! PC's firmware leaves the local APIC. Needs KVM's LAPIC (either irqchip kind).

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

use super::{ioctl, ArchError};

/// Offset of the LVT LINT0 register in the LAPIC page.
const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register in the LAPIC page.
const APIC_LVT1: usize = 0x360;
/// LVT delivery mode NMI.
const APIC_MODE_NMI: u32 = 0x4;
/// LVT delivery mode ExtINT.
const APIC_MODE_EXTINT: u32 = 0x7;
/// The delivery mode bits (8..=10) of an LVT register.
const APIC_LVT_MODE_MASK: u32 = 0x700;

/// Sets the delivery mode (bits 8..=10) of the LVT register at `offset` in a LAPIC page.
fn set_lvt_mode(regs: &mut [libc::c_char; 1024], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !APIC_LVT_MODE_MASK) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as libc::c_char;
    }
}

/// LINT0 to ExtINT, LINT1 to NMI in a LAPIC state; the other bits are kept.
pub fn set_pc_lint_modes(lapic: &mut kvm_lapic_state) {
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
}

/// Reads the LAPIC of `fd`, applies [`set_pc_lint_modes`] and writes it back.
pub fn set_lint(fd: &VcpuFd) -> Result<(), ArchError> {
    let mut lapic = fd.get_lapic().map_err(ioctl("get LAPIC"))?;
    set_pc_lint_modes(&mut lapic);
    fd.set_lapic(&lapic).map_err(ioctl("set LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_delivery_mode_changes_only_its_bits() {
        let mut regs = [0 as libc::c_char; 1024];
        regs[APIC_LVT0 + 2] = 1; // bit 16: masked
        regs[APIC_LVT0 + 1] = 0x05u8 as libc::c_char; // an old mode, to be replaced
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut regs, APIC_LVT1, APIC_MODE_NMI);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2], 1, "the mask bit is kept");
        assert_eq!(regs[APIC_LVT1 + 1] as u8, 0x04);
    }

    #[test]
    fn pc_lint_modes_touch_only_lint0_and_lint1() {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs.fill(0x11);
        set_pc_lint_modes(&mut lapic);
        let word = |off: usize| u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[off + i] as u8));
        assert_eq!(word(APIC_LVT0), 0x1111_1711);
        assert_eq!(word(APIC_LVT1), 0x1111_1411);
        for (i, b) in lapic.regs.iter().enumerate() {
            if i != APIC_LVT0 + 1 && i != APIC_LVT1 + 1 {
                assert_eq!(*b, 0x11, "LAPIC byte {i:#x}");
            }
        }
    }
}

//! The register state a vCPU starts in, for each entry mode, and the page tables of the 64-bit
//! entry.
//!
//! - Flat 32-bit protected mode (stub guests, PVH kernels): paging off, every segment base 0
//!   limit 4 GiB, no GDT or IDT.
//! - 64-bit long mode (the Linux 64-bit boot protocol): the boot GDT ([`super::gdt`]), an
//!   identity map of the first GiB in 2 MiB pages at [`PML4_ADDR`], the stack at
//!   [`BOOT_STACK`].

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::gdt::{write_boot_tables, BootSegments, BOOT_GDT_ENTRIES, GDT_ADDR, IDT_ADDR};
use super::{ioctl, ArchError};

/// The four-level page tables: PML4, PDPT, PD (2 MiB pages identity-mapping the first GiB).
pub const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
/// Initial stack of the boot CPU.
pub const BOOT_STACK: u64 = 0x8ff0;
// The stack grows down, away from the page tables.
const _: () = assert!(BOOT_STACK < PML4_ADDR);

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1, always set.
const RFLAGS_RESERVED: u64 = 1 << 1;
/// RFLAGS.IF: maskable interrupts enabled.
pub const RFLAGS_IF: u64 = 1 << 9;

/// Page-table entry bits: present, writable, and (in a PD) a 2 MiB page.
const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_PAGE_SIZE: u64 = 1 << 7;
/// Entries of one page-table page.
const PT_ENTRIES: u64 = 512;

/// Writes the page tables that identity-map the first GiB: one PML4 and one PDPT entry, and
/// 512 PD entries of 2 MiB pages.
pub fn setup_page_tables(memory: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    memory.write_obj(PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE, GuestAddress(PML4_ADDR))?;
    memory.write_obj(PD_ADDR | PTE_PRESENT | PTE_WRITABLE, GuestAddress(PDPT_ADDR))?;
    for i in 0..PT_ENTRIES {
        let page = (i << 21) | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE;
        memory.write_obj(page, GuestAddress(PD_ADDR + i * 8))?;
    }
    Ok(())
}

/// Flat 32-bit protected mode: the segments of [`BootSegments::flat_protected`] without
/// descriptor tables, paging and long mode off.
pub fn flat_protected_sregs(sregs: &mut kvm_sregs) {
    BootSegments::flat_protected().load_into(sregs);
    sregs.gdt.base = 0;
    sregs.gdt.limit = 0;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

/// 64-bit long mode: the boot GDT and IDT, the segments of [`BootSegments::long_mode`], the
/// page tables of [`setup_page_tables`], PAE, paging and long mode on.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (BOOT_GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7; // one empty 8-byte entry
    BootSegments::long_mode().load_into(sregs);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// The FPU at reset: x87 control word 0x37f, all SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// Sets the FPU of `fd` to [`boot_fpu`].
pub fn setup_fpu(fd: &VcpuFd) -> Result<(), ArchError> {
    fd.set_fpu(&boot_fpu()).map_err(ioctl("set FPU"))
}

/// Starts `fd` in flat 32-bit protected mode at `entry` with `stack`; `rbx` is for the PVH
/// start_info.
pub fn setup_flat_protected(fd: &VcpuFd, entry: u64, stack: u64, rbx: u64) -> Result<(), ArchError> {
    let mut sregs = fd.get_sregs().map_err(ioctl("get sregs"))?;
    flat_protected_sregs(&mut sregs);
    fd.set_sregs(&sregs).map_err(ioctl("set sregs"))?;
    let regs = kvm_regs { rflags: RFLAGS_RESERVED, rip: entry, rsp: stack, rbx, ..Default::default() };
    fd.set_regs(&regs).map_err(ioctl("set regs"))?;
    setup_fpu(fd)
}

/// Starts `fd` in 64-bit long mode at `entry` with `rsi` = the zero page `boot_params`, after
/// writing the boot GDT, IDT and page tables into `memory`.
pub fn setup_long_mode(fd: &VcpuFd, memory: &GuestMemoryMmap, entry: u64, boot_params: u64) -> Result<(), ArchError> {
    write_boot_tables(memory, &BootSegments::long_mode().gdt()).map_err(ArchError::BootTables)?;
    setup_page_tables(memory).map_err(ArchError::BootTables)?;
    let mut sregs = fd.get_sregs().map_err(ioctl("get sregs"))?;
    long_mode_sregs(&mut sregs);
    fd.set_sregs(&sregs).map_err(ioctl("set sregs"))?;
    let regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: boot_params,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(ioctl("set regs"))?;
    setup_fpu(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::gdt::{CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        setup_page_tables(&memory).unwrap();
        let read = |addr: u64| memory.read_obj::<u64>(GuestAddress(addr)).unwrap();
        assert_eq!(read(PML4_ADDR), PDPT_ADDR | 0x3);
        assert_eq!(read(PML4_ADDR + 8), 0, "only the first 512 GiB slot is used");
        assert_eq!(read(PDPT_ADDR), PD_ADDR | 0x3);
        assert_eq!(read(PDPT_ADDR + 8), 0, "only the first GiB is mapped");
        for i in 0..PT_ENTRIES {
            assert_eq!(read(PD_ADDR + i * 8), (i << 21) | 0x83, "PD entry {i}");
        }
    }

    #[test]
    fn long_mode_sregs_turn_on_paging_and_64_bit_code() {
        let mut sregs = kvm_sregs { cr0: 0x6000_0010, ..Default::default() };
        long_mode_sregs(&mut sregs);
        assert_eq!(sregs.cr0, 0x6000_0010 | X86_CR0_PE | X86_CR0_PG, "the reset bits are kept");
        assert_eq!(sregs.cr3, PML4_ADDR);
        assert_eq!(sregs.cr4, X86_CR4_PAE);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (GDT_ADDR, 31));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (IDT_ADDR, 7));
        assert_eq!((sregs.cs.selector, sregs.cs.l, sregs.cs.db), (CODE_SELECTOR, 1, 0));
        assert_eq!((sregs.ss.selector, sregs.ss.db), (DATA_SELECTOR, 1));
        assert_eq!((sregs.tr.selector, sregs.tr.s), (TSS_SELECTOR, 0));
    }

    #[test]
    fn flat_protected_sregs_have_no_tables_and_no_paging() {
        let mut sregs = kvm_sregs { cr0: u64::MAX, cr4: u64::MAX, efer: u64::MAX, ..Default::default() };
        sregs.gdt.limit = 0xffff;
        flat_protected_sregs(&mut sregs);
        assert_eq!((sregs.cr0, sregs.cr4, sregs.efer), (X86_CR0_PE | X86_CR0_ET, 0, 0));
        assert_eq!((sregs.gdt.base, sregs.gdt.limit, sregs.idt.limit), (0, 0, 0));
        assert_eq!((sregs.cs.selector, sregs.cs.l, sregs.cs.db), (CODE_SELECTOR, 0, 1));
        assert_eq!((sregs.ds.base, sregs.ds.limit), (0, 0xffff_ffff));
    }
}

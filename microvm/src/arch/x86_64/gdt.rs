//! Segment descriptors and the boot GDT.
//!
//! Both entry modes use the same selectors: null, code ([`CODE_SELECTOR`]), data
//! ([`DATA_SELECTOR`]) and a TSS ([`TSS_SELECTOR`]). The 64-bit entry also finds them in a GDT
//! at [`GDT_ADDR`], next to an empty IDT at [`IDT_ADDR`]; the flat 32-bit entry loads only the
//! hidden segment state and has no tables.

use kvm_bindings::{kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Guest address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest address of the (empty) IDT.
pub const IDT_ADDR: u64 = 0x520;
/// Entries of the boot GDT: null, code, data, TSS.
pub const BOOT_GDT_ENTRIES: usize = 4;
// The GDT ends before the IDT.
const _: () = assert!(GDT_ADDR + 8 * BOOT_GDT_ENTRIES as u64 <= IDT_ADDR);

/// Selector of the code segment (GDT entry 1).
pub const CODE_SELECTOR: u16 = 0x8;
/// Selector of the data segment (GDT entry 2), also used for the stack.
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the task state segment (GDT entry 3).
pub const TSS_SELECTOR: u16 = 0x18;

/// Code segment type: execute/read, accessed.
const TYPE_CODE: u8 = 0xb;
/// Data segment type: read/write, accessed.
const TYPE_DATA: u8 = 0x3;
/// System segment type: busy TSS (what TR must hold).
const TYPE_TSS_BUSY: u8 = 0xb;

/// A present ring-0 segment with base 0 and a 4 GiB limit in 4 KiB units. With `code64` it is
/// a long-mode code segment (L set, D/B clear), otherwise a 32-bit one.
pub fn segment(selector: u16, type_: u8, code64: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!code64),
        s: 1,
        l: u8::from(code64),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// A GDT entry from a kvm_segment, as the CPU reads it.
pub fn gdt_entry(seg: &kvm_segment) -> u64 {
    let limit = u64::from(seg.limit >> 12); // 4 KiB granularity
    let base = seg.base;
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (u64::from(seg.type_) << 40)
        | (u64::from(seg.s) << 44)
        | (u64::from(seg.dpl) << 45)
        | (u64::from(seg.present) << 47)
        | (((limit >> 16) & 0xf) << 48)
        | (u64::from(seg.l) << 53)
        | (u64::from(seg.db) << 54)
        | (u64::from(seg.g) << 55)
        | (((base >> 24) & 0xff) << 56)
}

/// The segments a vCPU starts with in one entry mode.
#[derive(Debug, Clone, Copy)]
pub struct BootSegments {
    /// CS.
    pub code: kvm_segment,
    /// DS, ES, FS, GS and SS.
    pub data: kvm_segment,
    /// TR.
    pub tss: kvm_segment,
}

impl BootSegments {
    /// Flat 32-bit protected mode: 32-bit code and data over all 4 GiB, and a minimal TSS
    /// (byte-granular, 0x68 bytes) that only makes TR valid.
    pub fn flat_protected() -> Self {
        BootSegments {
            code: segment(CODE_SELECTOR, TYPE_CODE, false),
            data: segment(DATA_SELECTOR, TYPE_DATA, false),
            tss: kvm_segment {
                selector: TSS_SELECTOR,
                type_: TYPE_TSS_BUSY,
                limit: 0x67,
                present: 1,
                ..Default::default()
            },
        }
    }

    /// 64-bit mode: a long-mode code segment, 32-bit data, a system-segment TSS.
    pub fn long_mode() -> Self {
        BootSegments {
            code: segment(CODE_SELECTOR, TYPE_CODE, true),
            data: segment(DATA_SELECTOR, TYPE_DATA, false),
            tss: kvm_segment { s: 0, db: 0, ..segment(TSS_SELECTOR, TYPE_TSS_BUSY, false) },
        }
    }

    /// The GDT holding these segments at their selectors.
    pub fn gdt(&self) -> [u64; BOOT_GDT_ENTRIES] {
        [0, gdt_entry(&self.code), gdt_entry(&self.data), gdt_entry(&self.tss)]
    }

    /// Loads CS, the data segments and TR of `sregs` with these segments.
    pub fn load_into(&self, sregs: &mut kvm_sregs) {
        sregs.cs = self.code;
        sregs.ds = self.data;
        sregs.es = self.data;
        sregs.fs = self.data;
        sregs.gs = self.data;
        sregs.ss = self.data;
        sregs.tr = self.tss;
    }
}

/// Writes `gdt` at [`GDT_ADDR`] and one empty IDT entry at [`IDT_ADDR`].
pub fn write_boot_tables(memory: &GuestMemoryMmap, gdt: &[u64; BOOT_GDT_ENTRIES]) -> Result<(), GuestMemoryError> {
    for (i, e) in gdt.iter().enumerate() {
        memory.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    memory.write_obj(0u64, GuestAddress(IDT_ADDR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_classic_values() {
        assert_eq!(gdt_entry(&segment(0x8, 0xb, true)), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(&segment(0x10, 0x3, false)), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn long_mode_gdt_is_null_code_data_tss() {
        let gdt = BootSegments::long_mode().gdt();
        assert_eq!(gdt[0], 0);
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff, "64-bit code");
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff, "32-bit data");
        assert_eq!(gdt[3], 0x008f_8b00_0000_ffff, "busy TSS: a system segment, no D/B");
    }

    #[test]
    fn segments_are_loaded_by_role() {
        let segments = BootSegments::flat_protected();
        let mut sregs = kvm_sregs::default();
        segments.load_into(&mut sregs);
        assert_eq!((sregs.cs.selector, sregs.cs.db, sregs.cs.l), (CODE_SELECTOR, 1, 0));
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!((seg.selector, seg.type_, seg.limit), (DATA_SELECTOR, TYPE_DATA, 0xffff_ffff));
        }
        assert_eq!((sregs.tr.selector, sregs.tr.limit, sregs.tr.g), (TSS_SELECTOR, 0x67, 0));
    }

    #[test]
    fn boot_tables_land_at_their_addresses() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        memory.write_obj(u64::MAX, GuestAddress(IDT_ADDR)).unwrap();
        let gdt = BootSegments::long_mode().gdt();
        write_boot_tables(&memory, &gdt).unwrap();
        for (i, e) in gdt.iter().enumerate() {
            assert_eq!(memory.read_obj::<u64>(GuestAddress(GDT_ADDR + 8 * i as u64)).unwrap(), *e);
        }
        assert_eq!(memory.read_obj::<u64>(GuestAddress(IDT_ADDR)).unwrap(), 0);
    }
}

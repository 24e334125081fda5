//! The Intel MultiProcessor Specification (1.4) table: how a guest without ACPI learns its CPUs,
//! its I/O APIC and how the ISA interrupts are wired. Linux (`X86_MPPARSE`) finds the floating
//! pointer by scanning the first KiB of the EBDA, where this module writes everything.
//!
//! Layout at [`MPTABLE_START`]: the 16-byte floating pointer, then the configuration table
//! header and its entries: one processor per vCPU (the first is the boot processor), the ISA
//! bus, the I/O APIC, an I/O interrupt entry per I/O APIC pin (vectored, identity-mapped from
//! ISA IRQs), and the two local interrupt entries (ExtINT on LINT0, NMI on LINT1).

use twinbox_exit::ExitCode;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Where the table goes: the start of the EBDA, which the e820 map leaves out of RAM.
pub const MPTABLE_START: u64 = 0x9_fc00;
/// The local APIC's MMIO base.
pub const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
/// The I/O APIC's MMIO base.
pub const IO_APIC_DEFAULT_BASE: u32 = 0xfec0_0000;
/// Pins of KVM's in-kernel I/O APIC.
pub const IOAPIC_PINS: u8 = 24;
/// Space the EBDA gives the table (up to the 640 KiB line).
const MPTABLE_MAX: u64 = 0xa_0000 - MPTABLE_START;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6 model 1 stepping 1: any plausible signature does; Linux only prints it.
const CPU_SIGNATURE: u32 = (6 << 8) | (1 << 4) | 1;
/// FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
const MP_IOAPIC_ENABLED: u8 = 1;

/// Errors writing the table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    /// More CPUs than local APIC ids below the I/O APIC's, or than fit the EBDA.
    #[error("{0} vCPUs do not fit an MP table (at most {max})", max = max_cpus())]
    TooManyCpus(u8),
    /// Guest memory does not cover the EBDA.
    #[error("guest memory does not cover the MP table at {MPTABLE_START:#x}")]
    NoMemory,
}

impl ExitCode for MpTableError {
    fn exit_code(&self) -> i32 {
        match self {
            // The vCPU count or memory size asked for.
            MpTableError::TooManyCpus(_) | MpTableError::NoMemory => twinbox_exit::USER_ERROR,
        }
    }
}

/// The most CPUs a table can list: the entries must fit the EBDA's first KiB.
pub const fn max_cpus() -> u8 {
    let fixed = 16 + 44 + 8 + 8 + 8 * IOAPIC_PINS as u64 + 2 * 8;
    ((MPTABLE_MAX - fixed) / 20) as u8
}

/// The I/O APIC's id in a table for `cpus` processors: the first after the CPUs' local APIC
/// ids.
pub const fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

/// Bytes of the table for `cpus` processors.
fn table(cpus: u8) -> Vec<u8> {
    let ioapic_id = ioapic_id(cpus);
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MP_IOAPIC_ENABLED]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_BASE.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // type, irq type, flags (u16: conforms to the bus), source bus, source IRQ, dest APIC,
        // dest pin. Every pin is a vectored interrupt, IRQ 0 (KVM's PIT) included: KVM routes
        // GSI n to pin n, and Linux sets up its timer from the IRQ 0 entry.
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // Local interrupts to every local APIC (0xff): ExtINT on LINT0, NMI on LINT1.
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let config_addr = MPTABLE_START as u32 + 16;
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"TWINBOX ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    let sum = header.iter().chain(&entries).fold(0u8, |a, b| a.wrapping_add(*b));
    header[7] = 0u8.wrapping_sub(sum);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&config_addr.to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(4); // spec revision 1.4
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // feature bytes: 0 = the configuration table is present
    let sum = floating.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    floating[10] = 0u8.wrapping_sub(sum);

    let mut out = floating;
    out.extend_from_slice(&header);
    out.extend_from_slice(&entries);
    out
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
pub fn setup_mptable<M: GuestMemory>(mem: &M, cpus: u8) -> Result<(), MpTableError> {
    if cpus == 0 || cpus > max_cpus() {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let bytes = table(cpus);
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START)).map_err(|_| MpTableError::NoMemory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn checksum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }

    #[test]
    fn structures_have_valid_signatures_lengths_and_checksums() {
        for cpus in [1, 2, 4, max_cpus()] {
            let t = table(cpus);
            assert!(t.len() as u64 <= MPTABLE_MAX, "{cpus}: {} bytes", t.len());
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(checksum(&t[..16]), 0);
            assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), MPTABLE_START as u32 + 16);
            let cfg = &t[16..];
            assert_eq!(&cfg[..4], b"PCMP");
            assert_eq!(u16_at(cfg, 4) as usize, cfg.len());
            assert_eq!(checksum(cfg), 0);
            let count = u16_at(cfg, 34) as usize;
            assert_eq!(count, cpus as usize + 2 + IOAPIC_PINS as usize + 2);
        }
    }

    #[test]
    fn entries_list_each_cpu_once_with_the_bsp_first() {
        let t = table(3);
        let mut off = 16 + 44;
        let mut cpus = Vec::new();
        let mut ioapic = None;
        let mut pins = 0;
        while off < t.len() {
            match t[off] {
                MP_PROCESSOR => {
                    cpus.push((t[off + 1], t[off + 3]));
                    off += 20;
                }
                MP_IOAPIC => {
                    ioapic = Some((t[off + 1], u32::from_le_bytes(t[off + 4..off + 8].try_into().unwrap())));
                    off += 8;
                }
                MP_INTSRC => {
                    assert_eq!(t[off + 1], MP_INT, "IRQ {} is vectored (the timer's IRQ 0 too)", t[off + 5]);
                    assert_eq!(t[off + 5], t[off + 7], "ISA IRQ n goes to pin n");
                    pins += 1;
                    off += 8;
                }
                MP_BUS | MP_LINTSRC => off += 8,
                other => panic!("unknown entry type {other}"),
            }
        }
        assert_eq!(cpus, [(0, CPU_ENABLED | CPU_BOOTPROCESSOR), (1, CPU_ENABLED), (2, CPU_ENABLED)]);
        assert_eq!(ioapic, Some((3, IO_APIC_DEFAULT_BASE)));
        assert_eq!(pins, IOAPIC_PINS);
    }

    #[test]
    fn written_into_guest_memory_and_bad_counts_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_mptable(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
        assert_eq!(setup_mptable(&mem, 0), Err(MpTableError::TooManyCpus(0)));
        assert_eq!(setup_mptable(&mem, max_cpus() + 1), Err(MpTableError::TooManyCpus(max_cpus() + 1)));
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9_0000)]).unwrap();
        assert_eq!(setup_mptable(&small, 1), Err(MpTableError::NoMemory));
    }
}

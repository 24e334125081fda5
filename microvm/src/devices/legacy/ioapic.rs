//! The IOAPIC of a split irqchip (82093AA register model, version 0x11, 24 pins).
//!
//! KVM keeps the local APICs; this device only keeps the redirection table. Each write that
//! changes an entry reprograms KVM's GSI routing: pin `p` unmasked becomes an MSI route on GSI
//! `p` with the entry's vector, delivery mode, destination and trigger mode, so the irqfds the
//! devices signal (and `KVM_IRQ_LINE`) reach the LAPICs without leaving the kernel. A masked
//! pin has no route, and an interrupt on it is dropped, as a real IOAPIC drops a masked edge.
//!
//! Every line in this VMM is a pulse (an irqfd write), so all of them behave as edges; a guest
//! that programs a pin level-triggered gets a level MSI, and KVM then reports the EOI
//! (`KVM_EXIT_IOAPIC_EOI`), which the vCPU loop acknowledges with nothing left to re-deliver.

use serde::{Deserialize, Serialize};

use crate::devices::{BusDevice, VmEvent};
use crate::mptable::IOAPIC_PINS;
use crate::vstate::vm::{MsiMessage, RouteTable};

/// The IOAPIC's MMIO window (the MP table announces it at `mptable::IO_APIC_DEFAULT_BASE`).
pub const IOAPIC_MMIO_LEN: u64 = 0x1000;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_TABLE: u8 = 0x10;
const VERSION: u32 = 0x11;
const MASKED: u64 = 1 << 16;
/// Delivery status (12) and remote IRR (14) are read-only; both stay 0 here.
const READ_ONLY_BITS: u64 = (1 << 12) | (1 << 14);
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;

/// An IOAPIC's registers as a snapshot keeps them: its id register, the selected register and
/// the redirection table, one 64-bit entry per pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoApicState {
    pub id: u32,
    pub select: u8,
    pub table: Vec<u64>,
}

/// The redirection-table half of an IOAPIC, programming routes into `R`.
#[derive(Debug)]
pub struct IoApic<R: RouteTable> {
    id: u32,
    select: u8,
    table: [u64; IOAPIC_PINS as usize],
    routes: R,
    programmed: Vec<(u32, MsiMessage)>,
}

impl<R: RouteTable> IoApic<R> {
    /// An IOAPIC with APIC id `id` (the MP table's), every pin masked.
    pub fn new(id: u8, routes: R) -> Self {
        IoApic {
            id: u32::from(id) << 24,
            select: 0,
            table: [MASKED; IOAPIC_PINS as usize],
            routes,
            programmed: Vec::new(),
        }
    }

    /// Its registers, for a snapshot.
    pub fn state(&self) -> IoApicState {
        IoApicState { id: self.id, select: self.select, table: self.table.to_vec() }
    }

    /// Takes the registers of a snapshot and programs KVM's routes to match them.
    pub fn restore(&mut self, state: &IoApicState) -> Result<(), String> {
        self.table = state.table.as_slice().try_into().map_err(|_| {
            format!("the IOAPIC's saved state has {} pins, this one has {IOAPIC_PINS}", state.table.len())
        })?;
        self.id = state.id & 0x0f00_0000;
        self.select = state.select;
        self.update_routes();
        Ok(())
    }

    /// The MSI a redirection entry sends, or `None` when the pin is masked.
    pub fn message(entry: u64) -> Option<MsiMessage> {
        if entry & MASKED != 0 {
            return None;
        }
        let vector = (entry & 0xff) as u32;
        let delivery_mode = ((entry >> 8) & 0x7) as u32;
        let logical = (entry >> 11) & 1;
        let level = ((entry >> 15) & 1) as u32;
        let destination = entry >> 56;
        Some(MsiMessage {
            address: MSI_ADDRESS_BASE | (destination << 12) | (logical << 2),
            data: vector | (delivery_mode << 8) | (level << 15),
        })
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID | REG_ARBITRATION => self.id,
            REG_VERSION => (u32::from(IOAPIC_PINS - 1) << 16) | VERSION,
            r if r >= REG_TABLE => match self.table.get(usize::from((r - REG_TABLE) / 2)) {
                Some(&entry) if (r - REG_TABLE).is_multiple_of(2) => entry as u32,
                Some(&entry) => (entry >> 32) as u32,
                None => 0,
            },
            _ => 0,
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = value & 0x0f00_0000,
            r if r >= REG_TABLE => {
                let pin = usize::from((r - REG_TABLE) / 2);
                let Some(entry) = self.table.get_mut(pin) else { return };
                let old = *entry;
                let new = if (r - REG_TABLE).is_multiple_of(2) {
                    (old & !0xffff_ffff) | (u64::from(value) & !READ_ONLY_BITS)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                *entry = new;
                if new != old {
                    self.update_routes();
                }
            }
            _ => {}
        }
    }

    fn update_routes(&mut self) {
        let routes: Vec<(u32, MsiMessage)> = (0u32..)
            .zip(self.table.iter())
            .filter_map(|(pin, &entry)| Self::message(entry).map(|m| (pin, m)))
            .collect();
        if routes == self.programmed {
            return;
        }
        match self.routes.set_routes(&routes) {
            Ok(()) => self.programmed = routes,
            // A guest write cannot fail; the lost route shows as a missing interrupt, so say
            // why loudly.
            Err(e) => tracing::error!(error = %e, "cannot program KVM's MSI routes for the IOAPIC"),
        }
    }
}

impl<R: RouteTable> BusDevice for IoApic<R> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset & !0x3 {
            IOREGSEL => u32::from(self.select),
            IOWIN => self.read_register(),
            _ => 0,
        };
        let shift = (offset & 0x3) * 8;
        let bytes = (value >> shift).to_le_bytes();
        for (d, b) in data.iter_mut().zip(bytes.iter().chain(std::iter::repeat(&0))) {
            *d = *b;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmEvent> {
        let mut bytes = [0u8; 4];
        for (b, d) in bytes.iter_mut().zip(data) {
            *b = *d;
        }
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.select = value as u8,
            // Linux writes whole dwords; a partial write of IOWIN would need a read-modify-write
            // nobody does.
            IOWIN if data.len() == 4 => self.write_register(value),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Every routing table programmed, in order.
    type Tables = Arc<Mutex<Vec<Vec<(u32, MsiMessage)>>>>;

    #[derive(Clone, Default)]
    struct Recorder(Tables);

    impl RouteTable for Recorder {
        fn set_routes(&self, routes: &[(u32, MsiMessage)]) -> std::io::Result<()> {
            self.0.lock().unwrap().push(routes.to_vec());
            Ok(())
        }
    }

    fn write_reg(io: &mut IoApic<Recorder>, reg: u8, value: u32) {
        io.write(IOREGSEL, &u32::from(reg).to_le_bytes());
        io.write(IOWIN, &value.to_le_bytes());
    }

    fn read_reg(io: &mut IoApic<Recorder>, reg: u8) -> u32 {
        io.write(IOREGSEL, &u32::from(reg).to_le_bytes());
        let mut data = [0u8; 4];
        io.read(IOWIN, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn identifies_itself_as_linux_reads_it() {
        let mut io = IoApic::new(2, Recorder::default());
        assert_eq!(read_reg(&mut io, REG_ID), 2 << 24);
        // 24 entries (max index 23), version 0x11.
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0011);
        for pin in 0..IOAPIC_PINS {
            assert_eq!(read_reg(&mut io, REG_TABLE + 2 * pin), MASKED as u32, "pin {pin} starts masked");
        }
        write_reg(&mut io, REG_ID, 5 << 24);
        assert_eq!(read_reg(&mut io, REG_ID), 5 << 24);
        let mut sel = [0u8; 4];
        io.read(IOREGSEL, &mut sel);
        assert_eq!(sel[0], REG_ID);
    }

    #[test]
    fn unmasking_a_pin_programs_its_msi_route_and_masking_removes_it() {
        let rec = Recorder::default();
        let mut io = IoApic::new(1, rec.clone());
        // COM1 (pin 4): vector 0x24, fixed, physical destination APIC 1, edge.
        write_reg(&mut io, REG_TABLE + 2 * 4 + 1, 1 << 24);
        assert!(rec.0.lock().unwrap().is_empty(), "a masked entry has no route to change");
        write_reg(&mut io, REG_TABLE + 2 * 4, 0x24);
        let msg = MsiMessage { address: 0xfee0_1000, data: 0x24 };
        assert_eq!(rec.0.lock().unwrap().last().unwrap(), &vec![(4, msg)]);
        assert_eq!(read_reg(&mut io, REG_TABLE + 2 * 4), 0x24);
        assert_eq!(read_reg(&mut io, REG_TABLE + 2 * 4 + 1), 1 << 24);
        // Logical destination, lowest priority, level-triggered: the trigger bit reaches KVM
        // (so it reports the EOI); read-only bits written by the guest are dropped.
        write_reg(&mut io, REG_TABLE + 2 * 5 + 1, 0xff << 24);
        write_reg(&mut io, REG_TABLE + 2 * 5, 0x31 | (1 << 8) | (1 << 11) | (1 << 15) | READ_ONLY_BITS as u32);
        assert_eq!(read_reg(&mut io, REG_TABLE + 2 * 5), 0x31 | (1 << 8) | (1 << 11) | (1 << 15));
        let level = MsiMessage { address: 0xfee0_0000 | (0xff << 12) | (1 << 2), data: 0x31 | (1 << 8) | (1 << 15) };
        assert_eq!(rec.0.lock().unwrap().last().unwrap(), &vec![(4, msg), (5, level)]);
        let calls = rec.0.lock().unwrap().len();
        // Rewriting the same value programs nothing.
        write_reg(&mut io, REG_TABLE + 2 * 4, 0x24);
        assert_eq!(rec.0.lock().unwrap().len(), calls);
        write_reg(&mut io, REG_TABLE + 2 * 4, 0x24 | MASKED as u32);
        assert_eq!(rec.0.lock().unwrap().last().unwrap(), &vec![(5, level)]);
    }

    #[test]
    fn a_restored_ioapic_programs_the_routes_of_its_snapshot() {
        let mut io = IoApic::new(1, Recorder::default());
        write_reg(&mut io, REG_TABLE + 2 * 4 + 1, 1 << 24);
        write_reg(&mut io, REG_TABLE + 2 * 4, 0x24);
        let state: IoApicState = serde_json::from_str(&serde_json::to_string(&io.state()).unwrap()).unwrap();
        assert_eq!(state, io.state());
        let rec = Recorder::default();
        let mut copy = IoApic::new(1, rec.clone());
        copy.restore(&state).unwrap();
        let msg = MsiMessage { address: 0xfee0_1000, data: 0x24 };
        assert_eq!(rec.0.lock().unwrap().as_slice(), &[vec![(4, msg)]], "the route is in KVM again");
        assert_eq!(read_reg(&mut copy, REG_TABLE + 2 * 4 + 1), 1 << 24);
        let short = IoApicState { table: vec![0; 3], ..state };
        assert!(copy.restore(&short).unwrap_err().contains("3 pins"));
    }

    #[test]
    fn odd_accesses_do_not_panic_or_change_state() {
        let rec = Recorder::default();
        let mut io = IoApic::new(0, rec.clone());
        io.write(IOREGSEL, &[0x10]);
        io.write(IOWIN, &[0x00, 0x00]);
        io.write(0x800, &[1, 2, 3, 4]);
        write_reg(&mut io, 0xfe, 7);
        assert_eq!(read_reg(&mut io, 0xfe), 0);
        assert_eq!(read_reg(&mut io, 0x03), 0);
        let mut one = [0u8; 1];
        io.read(IOWIN + 2, &mut one);
        let mut eight = [0xaa; 8];
        io.read(0x20, &mut eight);
        assert_eq!(eight, [0; 8]);
        assert!(rec.0.lock().unwrap().is_empty());
    }
}

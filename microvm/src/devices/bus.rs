//! A bus maps non-overlapping address ranges (I/O ports or MMIO) to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use twinbox_exit::ExitCode;

use super::VmEvent;

/// A device on a [`Bus`]. `offset` is relative to the start of the range it was inserted at.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write; may ask something of the VM.
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmEvent>;
}

/// A shared device, as the bus holds it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// `[base, base + len)` on a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BusRange {
    /// First address.
    pub base: u64,
    /// Length in bytes, at least 1.
    pub len: u64,
}

impl BusRange {
    fn last(&self) -> u64 {
        self.base + (self.len - 1)
    }

    fn overlaps(&self, other: &BusRange) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }
}

impl std::fmt::Display for BusRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}..={:#x}", self.base, self.last())
    }
}

/// Errors while populating a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of length zero.
    #[error("bus range at {0:#x} has length zero")]
    ZeroLength(u64),
    /// base + len wraps around.
    #[error("bus range at {base:#x} with length {len:#x} wraps around")]
    Wraps {
        /// First address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The new range overlaps a device already on the bus.
    #[error("bus range {new} overlaps {existing}")]
    Overlap {
        /// The range being inserted.
        new: BusRange,
        /// The range already there.
        existing: BusRange,
    },
}

impl ExitCode for BusError {
    fn exit_code(&self) -> i32 {
        match self {
            BusError::ZeroLength(_) | BusError::Wraps { .. } | BusError::Overlap { .. } => twinbox_exit::INTERNAL,
        }
    }
}

/// Port I/O or MMIO bus.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<BusRange, SharedDevice>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.devices.keys()).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        if base.checked_add(len - 1).is_none() {
            return Err(BusError::Wraps { base, len });
        }
        let new = BusRange { base, len };
        // Only the neighbours around `base` can overlap.
        let before = self.devices.range(..=new).next_back().map(|(r, _)| *r);
        let after = self.devices.range(new..).next().map(|(r, _)| *r);
        for existing in before.into_iter().chain(after) {
            if existing.overlaps(&new) {
                return Err(BusError::Overlap { new, existing });
            }
        }
        self.devices.insert(new, device);
        Ok(())
    }

    /// The device holding `addr` and the offset of `addr` in its range.
    pub fn resolve(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let key = BusRange { base: addr, len: u64::MAX };
        let (range, dev) = self.devices.range(..=key).next_back()?;
        (addr <= range.last()).then(|| (addr - range.base, dev))
    }

    /// Routes a guest read; unclaimed addresses read as all ones, like an empty ISA bus.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Routes a guest write; unclaimed addresses drop it.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<VmEvent> {
        let (offset, dev) = self.resolve(addr)?;
        lock(dev).write(offset, data)
    }
}

fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    // A device that panicked mid-access is still the best state we have.
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmEvent> {
            self.writes.push((offset, data.to_vec()));
            None
        }
    }

    fn dev() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn routes_to_the_right_device_with_offsets() {
        let mut bus = Bus::new();
        let a = dev();
        let b = dev();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x60, 5).unwrap();
        let mut byte = [0u8];
        assert!(bus.read(0x3fa, &mut byte));
        assert_eq!(byte, [2]);
        assert!(bus.read(0x64, &mut byte));
        assert_eq!(byte, [4]);
        assert!(!bus.read(0x3f7, &mut byte));
        assert_eq!(byte, [0xff]);
        assert!(!bus.read(0x400, &mut byte));
        assert!(!bus.read(0x65, &mut byte));
        bus.write(0x3f8, b"H");
        assert_eq!(a.lock().unwrap().writes, vec![(0, b"H".to_vec())]);
        assert!(b.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn refuses_overlaps_zero_length_and_wrap() {
        let mut bus = Bus::new();
        bus.insert(dev(), 0x100, 0x10).unwrap();
        for (base, len) in [(0x100, 1), (0xf0, 0x11), (0x10f, 4), (0x0, 0x1000), (0x105, 2)] {
            let err = bus.insert(dev(), base, len).unwrap_err();
            assert!(matches!(err, BusError::Overlap { .. }), "{base:#x}+{len:#x}: {err}");
        }
        // Touching ranges are fine.
        bus.insert(dev(), 0xf0, 0x10).unwrap();
        bus.insert(dev(), 0x110, 0x10).unwrap();
        assert_eq!(bus.insert(dev(), 0x500, 0), Err(BusError::ZeroLength(0x500)));
        assert!(matches!(bus.insert(dev(), u64::MAX, 2), Err(BusError::Wraps { .. })));
        bus.insert(dev(), u64::MAX, 1).unwrap();
        assert!(bus.resolve(u64::MAX).is_some());
    }

    #[test]
    fn overlap_message_names_both_ranges() {
        let mut bus = Bus::new();
        bus.insert(dev(), 0x60, 5).unwrap();
        let err = bus.insert(dev(), 0x64, 1).unwrap_err();
        assert_eq!(err.to_string(), "bus range 0x64..=0x64 overlaps 0x60..=0x64");
    }
}

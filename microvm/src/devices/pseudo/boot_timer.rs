//! The boot timer, compatible with Firecracker's: the guest writes the byte 123 at MMIO
//! address 0xc000_0000 (e.g. `devmem 0xc0000000 8 123` just before it execs the workload) and
//! the VMM records the time elapsed since its own process started.

use std::time::{Duration, Instant};

use crate::devices::{BusDevice, VmEvent};

/// Guest-physical address of the boot timer (the first page of the MMIO gap).
pub const BOOT_TIMER_ADDR: u64 = twinbox_agent::BOOT_TIMER_ADDR;
/// Length of its MMIO range.
pub const BOOT_TIMER_LEN: u64 = 0x1000;
/// The magic byte that marks "guest booted".
pub const MAGIC_BOOT_COMPLETE: u8 = twinbox_agent::BOOT_TIMER_MAGIC;

/// Records the first boot-complete signal.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    first: Option<Duration>,
    signals: u32,
}

impl BootTimer {
    /// A timer counting from `start` (the VMM process start).
    pub fn new(start: Instant) -> Self {
        BootTimer { start, first: None, signals: 0 }
    }

    /// Time from the VMM start to the guest's first signal, if it came.
    pub fn boot_time(&self) -> Option<Duration> {
        self.first
    }

    /// How many times the guest signalled.
    pub fn signals(&self) -> u32 {
        self.signals
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmEvent> {
        if offset != 0 || data.first() != Some(&MAGIC_BOOT_COMPLETE) {
            return None;
        }
        let elapsed = self.start.elapsed();
        self.signals += 1;
        if self.first.is_none() {
            self.first = Some(elapsed);
        }
        let us = elapsed.as_micros();
        tracing::info!(boot_time_us = us as u64, "Guest-boot-time = {us:>6} us {} ms", us / 1000);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_magic_write_once() {
        let start = Instant::now() - Duration::from_millis(5);
        let mut timer = BootTimer::new(start);
        assert_eq!(timer.boot_time(), None);
        assert_eq!(timer.write(0, &[123]), None);
        let first = timer.boot_time().unwrap();
        assert!(first >= Duration::from_millis(5), "{first:?}");
        assert!(first < Duration::from_secs(5), "{first:?}");
        std::thread::sleep(Duration::from_millis(2));
        timer.write(0, &[123, 0, 0, 0]);
        assert_eq!(timer.boot_time(), Some(first), "the first signal is the one kept");
        assert_eq!(timer.signals(), 2);
    }

    #[test]
    fn other_values_and_offsets_are_ignored() {
        let mut timer = BootTimer::new(Instant::now());
        timer.write(0, &[122]);
        timer.write(0, &[0]);
        timer.write(1, &[123]);
        timer.write(0, &[]);
        assert_eq!(timer.boot_time(), None);
        assert_eq!(timer.signals(), 0);
    }
}

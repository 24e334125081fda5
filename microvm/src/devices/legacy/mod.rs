//! The PC legacy devices a microVM keeps: the 8250 serial console, the i8042's reset line, and
//! the IOAPIC of a split irqchip.

pub mod i8042;
pub mod ioapic;
pub mod serial;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// COM1's I/O ports.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's interrupt line (IOAPIC pin, GSI).
pub const COM1_GSI: u32 = 4;
/// The i8042's data and command/status ports: 0x60..=0x64.
pub const I8042_PORT: u64 = 0x60;

/// Raises an interrupt by writing to an `EventFd` registered with KVM as an irqfd; `None` in a
/// VM without an interrupt controller, where interrupts go nowhere.
#[derive(Debug)]
pub struct EventFdTrigger(pub Option<EventFd>);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        match &self.0 {
            Some(evt) => evt.write(1),
            None => Ok(()),
        }
    }
}

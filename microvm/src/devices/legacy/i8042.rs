//! The i8042 keyboard controller, reduced to what a microVM needs: the CPU reset command.
//!
//! A guest booted with `reboot=k` resets by writing 0xFE to the command port 0x64. A microVM
//! has nothing to reboot into, so reset means: the VM ends cleanly (Firecracker does the same).

use crate::devices::{BusDevice, VmEvent};

/// Ports 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;
/// Offset of the command/status port (0x64) from 0x60.
pub const COMMAND_OFFSET: u64 = 4;
/// "Pulse output line 0" = CPU reset.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// The reset-only i8042.
#[derive(Debug, Default)]
pub struct I8042Device {
    resets: u32,
}

impl I8042Device {
    /// A controller with an empty output buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many reset commands the guest sent.
    pub fn resets(&self) -> u32 {
        self.resets
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so polling guests move on.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmEvent> {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.resets += 1;
            return Some(VmEvent::Reset);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let mut dev = I8042Device::new();
        assert_eq!(dev.write(COMMAND_OFFSET, &[0xfe]), Some(VmEvent::Reset));
        assert_eq!(dev.resets(), 1);
    }

    #[test]
    fn other_writes_are_ignored() {
        let mut dev = I8042Device::new();
        assert_eq!(dev.write(COMMAND_OFFSET, &[0xad]), None);
        assert_eq!(dev.write(0, &[0xfe]), None);
        assert_eq!(dev.write(COMMAND_OFFSET, &[]), None);
        assert_eq!(dev.resets(), 0);
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}

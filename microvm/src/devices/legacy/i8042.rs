//! The i8042 keyboard controller, reduced to what a microVM needs: the CPU reset command, and
//! enough of the controller for Linux's driver to probe it at once.
//!
//! A guest booted with `reboot=k` resets by writing 0xFE to the command port 0x64. A microVM
//! has nothing to reboot into, so reset means: the VM ends cleanly (Firecracker does the same).
//!
//! Linux's i8042 driver reads the controller's command byte (CTR) while it probes and polls for
//! the answer for up to half a second per try; a controller that never answers costs the boot
//! about 1.5 s. So this one answers: the CTR read and write, the self tests, the output port,
//! and an ACK for every byte sent to the keyboard. There is no keyboard behind it.

use std::collections::VecDeque;

use crate::devices::{BusDevice, VmEvent};

/// Ports 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;
/// Offset of the data port (0x60).
pub const DATA_OFFSET: u64 = 0;
/// Offset of the command/status port (0x64) from 0x60.
pub const COMMAND_OFFSET: u64 = 4;
/// "Pulse output line 0" = CPU reset.
pub const CMD_RESET_CPU: u8 = 0xfe;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const SELF_TEST_OK: u8 = 0x55;
const KBD_ACK: u8 = 0xfa;

/// Status: output buffer full (a byte waits at the data port).
const SB_OUT_DATA_AVAIL: u8 = 0x01;
/// Status: system flag (self test passed).
const SB_SYSTEM: u8 = 0x04;
/// Status: the last write was a command.
const SB_LAST_WAS_CMD: u8 = 0x08;
/// Status: keyboard not inhibited.
const SB_KBD_ENABLED: u8 = 0x10;

/// CTR after power-on: keyboard interrupt on, system flag, translation on.
const CTR_DEFAULT: u8 = 0x45;
/// Output port: A20 enabled, no reset.
const OUTP_DEFAULT: u8 = 0x03;

/// The controller.
#[derive(Debug)]
pub struct I8042Device {
    ctr: u8,
    outp: u8,
    status: u8,
    /// What the next data-port write is, after a command that takes a parameter.
    pending: Option<u8>,
    output: VecDeque<u8>,
    resets: u32,
}

impl Default for I8042Device {
    fn default() -> Self {
        I8042Device {
            ctr: CTR_DEFAULT,
            outp: OUTP_DEFAULT,
            status: SB_SYSTEM | SB_KBD_ENABLED,
            pending: None,
            output: VecDeque::new(),
            resets: 0,
        }
    }
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

    fn push(&mut self, byte: u8) {
        // Sixteen bytes is far more than any exchange the driver has in flight.
        if self.output.len() < 16 {
            self.output.push_back(byte);
        }
    }

    fn command(&mut self, cmd: u8) -> Option<VmEvent> {
        self.status |= SB_LAST_WAS_CMD;
        match cmd {
            CMD_RESET_CPU => {
                self.resets += 1;
                return Some(VmEvent::Reset);
            }
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending = Some(cmd),
            CMD_READ_OUTP => self.push(self.outp),
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_KBD_TEST | CMD_AUX_TEST => self.push(0x00),
            // Enable/disable ports, and what a microVM has no use for: accepted, no answer.
            _ => {}
        }
        None
    }

    fn data(&mut self, byte: u8) {
        self.status &= !SB_LAST_WAS_CMD;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = byte,
            Some(CMD_WRITE_OUTP) => self.outp = byte,
            // A byte for the keyboard: there is none, but every command is acknowledged so
            // the driver does not wait for an answer.
            _ => self.push(KBD_ACK),
        }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.output.pop_front().unwrap_or(0),
            COMMAND_OFFSET => {
                let full = if self.output.is_empty() { 0 } else { SB_OUT_DATA_AVAIL };
                self.status | full
            }
            _ => 0,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmEvent> {
        let &byte = data.first()?;
        match offset {
            COMMAND_OFFSET => self.command(byte),
            DATA_OFFSET => {
                self.data(byte);
                None
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(dev: &mut I8042Device) -> u8 {
        let mut s = [0u8];
        dev.read(COMMAND_OFFSET, &mut s);
        s[0]
    }

    fn data(dev: &mut I8042Device) -> u8 {
        let mut d = [0u8];
        dev.read(DATA_OFFSET, &mut d);
        d[0]
    }

    #[test]
    fn reset_command_ends_the_vm() {
        let mut dev = I8042Device::new();
        assert_eq!(dev.write(COMMAND_OFFSET, &[0xfe]), Some(VmEvent::Reset));
        assert_eq!(dev.resets(), 1);
    }

    #[test]
    fn ctr_reads_back_what_was_written_as_linux_probes_it() {
        let mut dev = I8042Device::new();
        assert_eq!(status(&mut dev) & SB_OUT_DATA_AVAIL, 0, "nothing to read at first");
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_ne!(status(&mut dev) & SB_OUT_DATA_AVAIL, 0, "the answer is waiting");
        assert_eq!(data(&mut dev), CTR_DEFAULT);
        assert_eq!(status(&mut dev) & SB_OUT_DATA_AVAIL, 0);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x47]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(data(&mut dev), 0x47);
        assert_eq!(dev.resets(), 0);
    }

    #[test]
    fn self_tests_output_port_and_keyboard_bytes_are_answered() {
        let mut dev = I8042Device::new();
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(data(&mut dev), SELF_TEST_OK);
        dev.write(COMMAND_OFFSET, &[CMD_KBD_TEST]);
        assert_eq!(data(&mut dev), 0);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_OUTP]);
        dev.write(DATA_OFFSET, &[0x01]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_OUTP]);
        assert_eq!(data(&mut dev), 0x01);
        dev.write(DATA_OFFSET, &[0xf2]); // keyboard "identify"
        assert_eq!(data(&mut dev), KBD_ACK);
        assert_eq!(dev.write(COMMAND_OFFSET, &[]), None);
        assert_eq!(dev.write(2, &[0xfe]), None, "only the command port resets");
        assert_eq!(dev.resets(), 0);
    }
}

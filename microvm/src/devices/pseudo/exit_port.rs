//! The exit-status port: the guest agent writes its workload's exit status (0..=255, or
//! 128 + signal, as a shell reports it) to I/O port 0x501 as a byte or a little-endian
//! 16/32-bit value, and the VM ends with that status. 0x501 is the port QEMU's
//! `isa-debug-exit` device uses by default, so the same guest also stops under
//! `qemu -device isa-debug-exit` (which exits with `(status << 1) | 1`).
//!
//! A byte written to the port after it (0x502, the agent's `READY_PORT`) says that the agent
//! of a template VM waits for its workload: [`VmEvent::Ready`].

use crate::devices::{BusDevice, VmEvent};

/// The I/O port.
pub const EXIT_PORT: u64 = twinbox_agent::EXIT_PORT as u64;
/// Ports decoded (one 32-bit register).
pub const EXIT_PORT_LEN: u64 = twinbox_agent::EXIT_PORT_LEN as u64;

/// The ready port's offset from the exit port.
const READY_OFFSET: u64 = twinbox_agent::READY_PORT as u64 - EXIT_PORT;

/// Turns a guest write into [`VmEvent::Exit`].
#[derive(Debug, Default)]
pub struct ExitPort;

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmEvent> {
        if offset == READY_OFFSET && data.len() == 1 {
            return Some(VmEvent::Ready);
        }
        if offset != 0 || data.is_empty() || data.len() > 4 {
            return None;
        }
        let mut bytes = [0u8; 4];
        bytes[..data.len()].copy_from_slice(data);
        Some(VmEvent::Exit(i32::from_le_bytes(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_and_dword_writes_give_the_status() {
        assert_eq!(ExitPort.write(0, &[3]), Some(VmEvent::Exit(3)));
        assert_eq!(ExitPort.write(0, &[0x89, 0]), Some(VmEvent::Exit(137)));
        assert_eq!(ExitPort.write(0, &[0, 1, 0, 0]), Some(VmEvent::Exit(256)));
        assert_eq!(ExitPort.write(2, &[3]), None);
        assert_eq!(ExitPort.write(1, &[0, 0]), None, "a word over the ready port is no signal");
    }

    #[test]
    fn a_byte_on_the_ready_port_says_the_agent_waits() {
        assert_eq!(ExitPort.write(READY_OFFSET, &[1]), Some(VmEvent::Ready));
    }
}

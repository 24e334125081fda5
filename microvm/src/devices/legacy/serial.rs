//! The 8250/16550 UART (vm-superio) as the guest console.
//!
//! Output goes to any `Write`; the interrupt goes through any vm-superio `Trigger` (an irqfd
//! `EventFd` in a VM, a counter in tests).

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};

use crate::devices::{BusDevice, VmEvent};

/// Number of ports the UART decodes.
pub const SERIAL_PORT_LEN: u64 = 8;

/// The console UART.
pub struct SerialDevice<T: Trigger, W: Write> {
    serial: Serial<T, vm_superio::serial::NoEvents, W>,
}

impl<T: Trigger, W: Write> SerialDevice<T, W> {
    /// A UART writing to `out` and signalling through `trigger`.
    pub fn new(trigger: T, out: W) -> Self {
        SerialDevice { serial: Serial::new(trigger, out) }
    }

    /// A UART as a snapshot left it ([`SerialDevice::state`]).
    pub fn from_state(state: &UartState, trigger: T, out: W) -> Result<Self, String> {
        let state = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::from_state(&state, trigger, vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("the serial port's saved state is invalid: {e:?}"))?;
        Ok(SerialDevice { serial })
    }

    /// Its registers and unread input, for a snapshot.
    pub fn state(&self) -> UartState {
        let s = self.serial.state();
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// The output writer.
    pub fn writer(&self) -> &W {
        self.serial.writer()
    }

    /// Queues bytes for the guest to read (console input).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(input).unwrap_or(0)
    }
}

impl<T, W> BusDevice for SerialDevice<T, W>
where
    T: Trigger + Send,
    W: Write + Send,
{
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmEvent> {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.serial.write(offset, value) {
                tracing::warn!(error = ?e, "serial write failed");
            }
        }
        None
    }
}

/// The UART's registers and the input the guest has not read, as a snapshot keeps them
/// (vm-superio's `SerialState`, field for field).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UartState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// A byte buffer several owners write to, drained by whoever forwards the console.
#[derive(Debug, Clone, Default)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves everything written so far into `out`.
    pub fn drain_to(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let bytes = {
            let mut buf = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if buf.is_empty() {
                return Ok(());
            }
            std::mem::take(&mut *buf)
        };
        out.write_all(&bytes)?;
        out.flush()
    }

    /// Whether there is nothing to drain.
    pub fn is_empty(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts interrupts instead of raising them.
    #[derive(Default, Clone)]
    struct FakeTrigger(Arc<AtomicUsize>);

    impl Trigger for FakeTrigger {
        type E = std::io::Error;
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;

    #[test]
    fn output_reaches_the_writer() {
        let trigger = FakeTrigger::default();
        let mut uart = SerialDevice::new(trigger.clone(), Vec::new());
        for b in b"Hello" {
            uart.write(THR, &[*b]);
        }
        assert_eq!(uart.writer(), b"Hello");
        // No interrupt unless the guest enabled one.
        assert_eq!(trigger.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn thr_empty_interrupt_goes_through_the_trigger() {
        let trigger = FakeTrigger::default();
        let mut uart = SerialDevice::new(trigger.clone(), Vec::new());
        // Enabling "transmitter holding register empty" raises it at once (THR is empty).
        uart.write(IER, &[0x02]);
        assert_eq!(trigger.0.load(Ordering::SeqCst), 1);
        let mut iir = [0u8];
        uart.read(IIR, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02, "IIR says THR empty");
        // Reading IIR acknowledged it; the next byte sent raises it again.
        uart.write(THR, b"x");
        assert_eq!(trigger.0.load(Ordering::SeqCst), 2);
        assert_eq!(uart.writer(), b"x");
    }

    #[test]
    fn line_status_says_ready_to_send() {
        let mut uart = SerialDevice::new(FakeTrigger::default(), Vec::new());
        let mut lsr = [0u8];
        uart.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn input_is_read_back_by_the_guest() {
        let trigger = FakeTrigger::default();
        let mut uart = SerialDevice::new(trigger.clone(), Vec::new());
        uart.write(IER, &[0x01]);
        assert_eq!(uart.enqueue_input(b"ok"), 2);
        assert!(trigger.0.load(Ordering::SeqCst) >= 1);
        let mut b = [0u8];
        uart.read(THR, &mut b);
        assert_eq!(b[0], b'o');
    }

    #[test]
    fn registers_and_pending_input_survive_a_snapshot() {
        let trigger = FakeTrigger::default();
        let mut uart = SerialDevice::new(trigger.clone(), Vec::new());
        uart.write(IER, &[0x01]);
        uart.write(7, &[0x5a]); // scratch
        uart.write(3, &[0x83]); // LCR: 8N1 with DLAB set
        uart.write(0, &[0x0c]); // divisor low: 9600 baud
        uart.write(3, &[0x03]); // DLAB off again
        uart.enqueue_input(b"hi");
        let state = uart.state();
        let json = serde_json::to_string(&state).unwrap();
        let state: UartState = serde_json::from_str(&json).unwrap();
        let mut copy = SerialDevice::from_state(&state, trigger.clone(), Vec::new()).unwrap();
        assert_eq!(copy.state(), uart.state(), "field by field");
        let mut b = [0u8];
        copy.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        copy.read(THR, &mut b);
        assert_eq!(b[0], b'h', "input the guest had not read yet is still there");
        // A buffer larger than the FIFO is refused, named.
        let too_much = UartState { in_buffer: vec![0; 1000], ..state };
        let err = SerialDevice::from_state(&too_much, trigger, Vec::new()).err().unwrap();
        assert!(err.contains("serial"), "{err}");
    }

    #[test]
    fn shared_buffer_drains() {
        let buf = SharedBuffer::new();
        let mut uart = SerialDevice::new(FakeTrigger::default(), buf.clone());
        uart.write(THR, b"A");
        let mut out = Vec::new();
        buf.drain_to(&mut out).unwrap();
        assert_eq!(out, b"A");
        assert!(buf.is_empty());
    }
}

//! Port I/O to the VMM, behind the `Ports` trait so the forwarding logic runs on a recording
//! fake in tests.

use std::fs::File;
use std::io::{self, Write};

use twinbox_agent::{EXIT_PORT, EXIT_PORT_LEN, MAX_CHUNK, READY_PORT, STDERR_PORT, STDOUT_PORT};

use crate::sys;

/// Where the agent's output goes.
pub trait Ports {
    /// Sends `data` to `port`, at most [`MAX_CHUNK`] bytes per `rep outsb`.
    fn write_bytes(&mut self, port: u16, data: &[u8]);
    /// One 32-bit `out` of `value` to `port`.
    fn write_u32(&mut self, port: u16, value: u32);
    /// One 8-bit `out` of `value` to `port`.
    fn write_u8(&mut self, port: u16, value: u8);
}

/// The real ports; only [`IoPorts::grant`] makes one, so holding it (or a copy) means
/// `ioperm` allowed every port it writes.
#[derive(Debug, Clone, Copy)]
pub struct IoPorts(());

impl IoPorts {
    /// Asks the kernel for the exit port, the ready port (within the exit port's range today,
    /// asked for on its own all the same) and the two output ports.
    pub fn grant() -> io::Result<Self> {
        sys::ioperm(EXIT_PORT, EXIT_PORT_LEN, true)?;
        sys::ioperm(READY_PORT, 1, true)?;
        sys::ioperm(STDOUT_PORT, 2, true)?;
        Ok(IoPorts(()))
    }

    /// Gives the ports back (in a forked child, so the workload cannot write them).
    pub fn revoke() -> io::Result<()> {
        sys::ioperm(EXIT_PORT, EXIT_PORT_LEN, false)?;
        sys::ioperm(READY_PORT, 1, false)?;
        sys::ioperm(STDOUT_PORT, 2, false)
    }
}

fn granted(port: u16) -> bool {
    (EXIT_PORT..EXIT_PORT + EXIT_PORT_LEN).contains(&port)
        || port == READY_PORT
        || port == STDOUT_PORT
        || port == STDERR_PORT
}

impl Ports for IoPorts {
    fn write_bytes(&mut self, port: u16, data: &[u8]) {
        assert!(granted(port), "port {port:#x} was not granted");
        for chunk in data.chunks(MAX_CHUNK) {
            // SAFETY: `ioperm` granted `port` to this process (an `IoPorts` exists, and the
            // assert above keeps to the granted ports), so the `outsb`s cannot fault; the port
            // belongs to the VMM and has no effect on this process's memory. `rep outsb` reads
            // `rcx` bytes from `rsi`, which is the live slice `chunk`, and the direction flag
            // is clear as the ABI guarantees. It clobbers rsi and rcx, declared as outputs.
            unsafe {
                core::arch::asm!(
                    "rep outsb",
                    in("dx") port,
                    inout("rsi") chunk.as_ptr() => _,
                    inout("rcx") chunk.len() => _,
                    options(nostack, preserves_flags, readonly),
                );
            }
        }
    }

    fn write_u32(&mut self, port: u16, value: u32) {
        assert!(granted(port), "port {port:#x} was not granted");
        // SAFETY: as above, `port` is granted and owned by the VMM; a 32-bit `out` touches
        // neither memory nor flags.
        unsafe {
            core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags));
        }
    }

    fn write_u8(&mut self, port: u16, value: u8) {
        assert!(granted(port), "port {port:#x} was not granted");
        // SAFETY: as above, `port` is granted and owned by the VMM; an 8-bit `out` touches
        // neither memory nor flags.
        unsafe {
            core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
        }
    }
}

/// Ports that also copy everything to a console (`twinbox.console` on the kernel command line),
/// for VMMs that ignore the output ports, QEMU among them.
#[derive(Debug)]
pub struct Tee<P> {
    inner: P,
    console: Option<File>,
}

impl<P: Ports> Tee<P> {
    /// Ports `inner`, copied to nothing yet.
    pub fn new(inner: P) -> Self {
        Tee { inner, console: None }
    }

    /// From now on, copies everything to `console` too.
    pub fn mirror_to(&mut self, console: File) {
        self.console = Some(console);
    }
}

impl<P: Ports> Ports for Tee<P> {
    fn write_bytes(&mut self, port: u16, data: &[u8]) {
        self.inner.write_bytes(port, data);
        if let Some(console) = &mut self.console {
            let _ = console.write_all(data);
        }
    }

    fn write_u32(&mut self, port: u16, value: u32) {
        if let Some(console) = &mut self.console {
            let _ = writeln!(console, "twinbox-agent: wrote {value} to port {port:#x}");
            // The exit status ends the VM at once: first let the UART send what the tty
            // layer still holds, or the mirrored output is lost.
            use std::os::fd::AsRawFd;
            // SAFETY: tcdrain on an fd this struct owns; it only waits.
            unsafe { libc::tcdrain(console.as_raw_fd()) };
        }
        self.inner.write_u32(port, value);
    }

    fn write_u8(&mut self, port: u16, value: u8) {
        if let Some(console) = &mut self.console {
            let _ = writeln!(console, "twinbox-agent: wrote {value} to port {port:#x}");
        }
        self.inner.write_u8(port, value);
    }
}

#[cfg(test)]
pub mod fake {
    use super::Ports;

    /// What a `Recorder` saw, in order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Write {
        Bytes(u16, Vec<u8>),
        U32(u16, u32),
        U8(u16, u8),
    }

    /// Ports that record every write.
    #[derive(Debug, Default)]
    pub struct Recorder {
        pub writes: Vec<Write>,
    }

    impl Recorder {
        /// Everything sent to `port`, concatenated.
        pub fn bytes(&self, port: u16) -> Vec<u8> {
            self.writes
                .iter()
                .filter_map(|w| match w {
                    Write::Bytes(p, b) if *p == port => Some(b.as_slice()),
                    _ => None,
                })
                .flatten()
                .copied()
                .collect()
        }
    }

    impl Ports for Recorder {
        fn write_bytes(&mut self, port: u16, data: &[u8]) {
            self.writes.push(Write::Bytes(port, data.to_vec()));
        }

        fn write_u32(&mut self, port: u16, value: u32) {
            self.writes.push(Write::U32(port, value));
        }

        fn write_u8(&mut self, port: u16, value: u8) {
            self.writes.push(Write::U8(port, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{Recorder, Write};
    use super::*;
    use std::io::Read;

    #[test]
    fn tee_copies_bytes_and_notes_the_status() {
        let (mut r, w) = sys::pipe().unwrap();
        let mut tee = Tee::new(Recorder::default());
        tee.write_bytes(STDOUT_PORT, b"quiet ");
        tee.mirror_to(File::from(w));
        tee.write_bytes(STDOUT_PORT, b"hello\n");
        tee.write_u8(READY_PORT, 1);
        tee.write_u32(EXIT_PORT, 3);
        let Tee { inner, console } = tee;
        drop(console);
        let mut copied = String::new();
        r.read_to_string(&mut copied).unwrap();
        assert_eq!(copied, "hello\ntwinbox-agent: wrote 1 to port 0x502\ntwinbox-agent: wrote 3 to port 0x501\n");
        assert_eq!(
            inner.writes,
            [
                Write::Bytes(STDOUT_PORT, b"quiet ".to_vec()),
                Write::Bytes(STDOUT_PORT, b"hello\n".to_vec()),
                Write::U8(READY_PORT, 1),
                Write::U32(EXIT_PORT, 3)
            ]
        );
    }

    #[test]
    fn only_the_protocol_ports_count_as_granted() {
        assert!(granted(0x501) && granted(0x504) && granted(0x510) && granted(0x511));
        assert!(granted(READY_PORT), "the template's ready port");
        assert!(!granted(0x500) && !granted(0x505) && !granted(0x512) && !granted(0x3f8));
    }
}

//! The workload-output ports: the guest agent copies what its workload writes to stdout and
//! stderr to I/O ports 0x510 and 0x511 with `rep outsb`, up to a page per instruction, and the
//! VMM writes those bytes to its own stdout and stderr. The kernel console (COM1) stays a
//! separate channel, so the workload's output is byte for byte what the container run prints,
//! with no kernel messages mixed in.
//!
//! A stand-in for virtio-console/vsock: one exit per 4 KiB and no guest driver at all. Output
//! only; the workload's stdin is /dev/null.

use std::io::Write;

use crate::devices::{BusDevice, VmEvent};

/// First port: stdout at +0, stderr at +1.
pub const OUTPUT_PORT: u64 = twinbox_agent::STDOUT_PORT as u64;
/// Ports decoded.
pub const OUTPUT_PORT_LEN: u64 = 2;
// The device decodes stderr as the port after stdout.
const _: () = assert!(twinbox_agent::STDERR_PORT == twinbox_agent::STDOUT_PORT + 1);

/// Routes guest writes to two host writers.
pub struct OutputPort {
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    failed: bool,
}

impl std::fmt::Debug for OutputPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputPort").field("failed", &self.failed).finish_non_exhaustive()
    }
}

impl OutputPort {
    /// Output to `stdout` and `stderr`.
    pub fn new(stdout: Box<dyn Write + Send>, stderr: Box<dyn Write + Send>) -> Self {
        OutputPort { stdout, stderr, failed: false }
    }
}

impl BusDevice for OutputPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmEvent> {
        let out = match offset {
            0 => &mut self.stdout,
            1 => &mut self.stderr,
            _ => return None,
        };
        // A closed host pipe (e.g. `| head`) must not stop the guest: drop the rest quietly,
        // as a container's stdout does after SIGPIPE is ignored.
        if !self.failed {
            if let Err(e) = out.write_all(data).and_then(|()| out.flush()) {
                tracing::debug!(error = %e, "workload output dropped");
                self.failed = true;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::serial::SharedBuffer;

    #[test]
    fn stdout_and_stderr_go_to_their_writers_byte_for_byte() {
        let (out, err) = (SharedBuffer::new(), SharedBuffer::new());
        let mut port = OutputPort::new(Box::new(out.clone()), Box::new(err.clone()));
        let page: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        assert_eq!(port.write(0, &page), None);
        port.write(1, b"oops\n");
        port.write(0, b"\r\n\0");
        port.write(2, b"ignored");
        let (mut o, mut e) = (Vec::new(), Vec::new());
        out.drain_to(&mut o).unwrap();
        err.drain_to(&mut e).unwrap();
        let mut want = page.clone();
        want.extend_from_slice(b"\r\n\0");
        assert_eq!(o, want);
        assert_eq!(e, b"oops\n");
    }

    #[test]
    fn a_broken_host_pipe_is_not_a_guest_error() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut port = OutputPort::new(Box::new(Broken), Box::new(Broken));
        assert_eq!(port.write(0, b"x"), None);
        assert_eq!(port.write(0, b"y"), None);
    }
}

//! The agent's main loop once the workload runs: its output to the ports, then its status.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;

use twinbox_agent::MAX_CHUNK;

use crate::ports::Ports;
use crate::sys;

/// A pipe from the workload and the port its bytes go to.
#[derive(Debug)]
pub struct Stream {
    /// The read end.
    pub pipe: File,
    /// STDOUT_PORT or STDERR_PORT.
    pub port: u16,
}

/// Supervision failed (the agent's own system calls, not the workload).
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// poll(2) failed.
    #[error("cannot poll the workload's output")]
    Poll(#[source] io::Error),
    /// Reading a pipe failed.
    #[error("cannot read the workload's output")]
    Read(#[source] io::Error),
    /// waitpid(2) failed before the workload's status came.
    #[error("cannot wait for the workload")]
    Wait(#[source] io::Error),
}

/// A page-aligned buffer: one `rep outsb` never crosses a page, which lets KVM hand the whole
/// chunk to the VMM in one exit.
#[repr(C, align(4096))]
struct Page([u8; MAX_CHUNK]);

/// Copies every stream to its port, each read (≤ [`MAX_CHUNK`] bytes) as one write, until all
/// of them reach end of file. They do once the workload's pid namespace is gone: its init
/// dying kills every process that could hold a write end.
#[cfg(test)]
pub fn forward(ports: &mut dyn Ports, streams: Vec<Stream>) -> Result<(), SuperviseError> {
    forward_serving(ports, streams, None)
}

/// [`forward`], serving the control channel's exec requests meanwhile (see
/// [`crate::control`]), and on until the workload has ended even if it closed its output
/// first (a service that logs nowhere still takes `exec`).
pub fn forward_serving(
    ports: &mut dyn Ports,
    mut streams: Vec<Stream>,
    mut control: Option<&mut crate::control::Control<'_>>,
) -> Result<(), SuperviseError> {
    let mut buf = Box::new(Page([0; MAX_CHUNK]));
    while !streams.is_empty() || control.as_deref().is_some_and(|c| c.workload_runs()) {
        let mut fds: Vec<libc::pollfd> =
            streams.iter().map(|s| libc::pollfd { fd: s.pipe.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
        if let Some(c) = control.as_deref() {
            fds.extend(c.poll_fds());
        }
        sys::poll(&mut fds).map_err(SuperviseError::Poll)?;
        let mut ended = Vec::new();
        for (i, (stream, fd)) in streams.iter_mut().zip(&fds).enumerate() {
            if fd.revents == 0 {
                continue;
            }
            // Readable, hung up or in error: a read says which (data, 0 for EOF, or the error).
            match stream.pipe.read(&mut buf.0) {
                Ok(0) => ended.push(i),
                Ok(n) => ports.write_bytes(stream.port, &buf.0[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SuperviseError::Read(e)),
            }
        }
        if let Some(c) = control.as_deref_mut() {
            c.service(&fds[streams.len()..]);
        }
        for i in ended.into_iter().rev() {
            streams.remove(i);
        }
    }
    Ok(())
}

/// Reaps children until `pid` ends and returns its wait status. The agent is pid 1: any
/// other child that ends on the way is reaped too.
pub fn wait_for(pid: libc::pid_t) -> Result<i32, SuperviseError> {
    loop {
        let (reaped, status) = sys::wait_any().map_err(SuperviseError::Wait)?;
        if reaped == pid && twinbox_agent::exit_code(status).is_some() {
            return Ok(status);
        }
    }
}

/// Reports `status` on the exit port.
pub fn report(ports: &mut dyn Ports, status: i32) {
    ports.write_u32(twinbox_agent::EXIT_PORT, u32::from_le_bytes(status.to_le_bytes()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::fake::{Recorder, Write};
    use std::io::Write as _;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    use twinbox_agent::{EXIT_PORT, STDERR_PORT, STDOUT_PORT};

    fn streams() -> (Vec<Stream>, File, File) {
        let (out_r, out_w) = sys::pipe().unwrap();
        let (err_r, err_w) = sys::pipe().unwrap();
        let streams = vec![Stream { pipe: out_r, port: STDOUT_PORT }, Stream { pipe: err_r, port: STDERR_PORT }];
        (streams, File::from(out_w), File::from(err_w))
    }

    #[test]
    fn every_byte_reaches_its_port_in_page_sized_chunks() {
        let (streams, mut out, mut err) = streams();
        let stdout: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expected = stdout.clone();
        let writer = std::thread::spawn(move || {
            for (i, piece) in stdout.chunks(7_000).enumerate() {
                out.write_all(piece).unwrap();
                writeln!(err, "line {i}").unwrap();
            }
        });
        let mut ports = Recorder::default();
        forward(&mut ports, streams).unwrap();
        writer.join().unwrap();
        assert_eq!(ports.bytes(STDOUT_PORT), expected);
        let err_text = String::from_utf8(ports.bytes(STDERR_PORT)).unwrap();
        assert_eq!(err_text.lines().count(), 43);
        assert!(err_text.starts_with("line 0\nline 1\n") && err_text.ends_with("line 42\n"));
        assert!(ports.writes.iter().all(|w| matches!(w, Write::Bytes(_, b) if !b.is_empty() && b.len() <= MAX_CHUNK)));
        assert!(ports.writes.iter().any(|w| matches!(w, Write::Bytes(_, b) if b.len() == MAX_CHUNK)));
    }

    #[test]
    fn ends_when_both_pipes_close_even_if_one_closes_early() {
        let (streams, out, mut err) = streams();
        drop(out);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            err.write_all(b"late").unwrap();
        });
        let mut ports = Recorder::default();
        forward(&mut ports, streams).unwrap();
        writer.join().unwrap();
        assert_eq!(ports.writes, [Write::Bytes(STDERR_PORT, b"late".to_vec())]);
    }

    #[test]
    fn a_real_process_output_and_status() {
        let mut child = Command::new("sh")
            .args(["-c", "printf 'out\\n'; printf 'err\\n' >&2; exit 3"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = File::from(std::os::fd::OwnedFd::from(child.stdout.take().unwrap()));
        let err = File::from(std::os::fd::OwnedFd::from(child.stderr.take().unwrap()));
        let mut ports = Recorder::default();
        forward(&mut ports, vec![Stream { pipe: out, port: STDOUT_PORT }, Stream { pipe: err, port: STDERR_PORT }])
            .unwrap();
        // std's wait, not waitpid(-1): other tests of this process have children too.
        let status = child.wait().unwrap().into_raw();
        let code = twinbox_agent::exit_code(status).unwrap();
        report(&mut ports, code);
        assert_eq!(ports.bytes(STDOUT_PORT), b"out\n");
        assert_eq!(ports.bytes(STDERR_PORT), b"err\n");
        assert_eq!(ports.writes.last(), Some(&Write::U32(EXIT_PORT, 3)));
    }

    #[test]
    fn a_killed_process_reports_128_plus_the_signal() {
        let mut child = Command::new("sh").args(["-c", "kill -9 $$"]).spawn().unwrap();
        let status = sys::wait_pid(child.id() as libc::pid_t).unwrap();
        let mut ports = Recorder::default();
        report(&mut ports, twinbox_agent::exit_code(status).unwrap());
        assert_eq!(ports.writes, [Write::U32(EXIT_PORT, 137)]);
        // Already reaped: std's wait must not find it again.
        assert!(child.try_wait().is_err());
    }

    #[test]
    fn negative_statuses_go_out_as_little_endian_i32() {
        let mut ports = Recorder::default();
        report(&mut ports, -1);
        assert_eq!(ports.writes, [Write::U32(EXIT_PORT, 0xffff_ffff)]);
    }
}

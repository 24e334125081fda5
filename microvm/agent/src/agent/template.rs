//! A warm template's wait for its workload (see the library's documentation): the listener on
//! the control port, the byte on [`READY_PORT`] after which the VMM snapshots the VM, and the
//! connections taken one at a time, blocking (nothing else runs yet), until one brings a valid
//! `start`. Then what a restored copy must not share with its siblings: the kernel's random
//! state (the host's entropy, credited, and a reseed) and the wall-clock time.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use twinbox_agent::control::{
    frame, mailbox_len, ExecRequest, StartRequest, CONTROL_PORT, FRAME_ERROR, FRAME_EXIT, MAILBOX_HEADER, MAX_REQUEST,
};
use twinbox_agent::{MAILBOX_ADDR, READY_PORT};

use crate::ports::Ports;
use crate::sys;

/// The answer to anything but a `start` while there is no workload.
pub const NO_WORKLOAD: &str = "no workload yet: this VM is a template waiting for its start request";

/// The template could not wait, or could not make a restored copy its own.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The control port's listener could not be made (no vsock device?).
    #[error("cannot listen on vsock port {CONTROL_PORT} for the start request")]
    Listen(#[source] io::Error),
    /// accept(2) failed for good.
    #[error("cannot accept a connection on vsock port {CONTROL_PORT}")]
    Accept(#[source] io::Error),
    /// RNDADDENTROPY or RNDRESEEDCRNG failed.
    #[error("cannot add the host's entropy to the kernel's random pool")]
    Entropy(#[source] io::Error),
    /// clock_settime(CLOCK_REALTIME) failed.
    #[error("cannot set the wall clock to the host's time")]
    Clock(#[source] io::Error),
    /// The workload's root disk is not the one the template mounted (or it has volumes).
    #[error("start: the workload's root disk or volumes are not the template's (its root is mounted already); make a template for it")]
    OtherRoot,
}

/// The connection a `start` came on, answered once the workload's process is spawned or the
/// start failed; none for a start from the mailbox (the VMM waits for nothing, as for a cold
/// boot).
#[derive(Debug)]
pub struct StartAnswer {
    conn: Option<File>,
}

impl StartAnswer {
    /// The workload's process was spawned: an exit frame of 0.
    pub fn started(self) {
        if let Some(mut conn) = self.conn {
            let _ = conn.write_all(&frame(FRAME_EXIT, &0i32.to_le_bytes()));
        }
    }

    /// The start failed: `message` in an error frame, then an exit frame of 1.
    pub fn failed(self, message: &str) {
        if let Some(conn) = self.conn {
            answer(conn, message, 1);
        }
    }
}

fn answer(mut conn: File, message: &str, code: i32) {
    let mut frames = frame(FRAME_ERROR, message.as_bytes());
    frames.extend(frame(FRAME_EXIT, &code.to_le_bytes()));
    // A host that went away has no use for the answer.
    let _ = conn.write_all(&frames);
}

/// The listener the control server takes over once the workload runs.
pub fn listen() -> Result<OwnedFd, TemplateError> {
    crate::control::listen(CONTROL_PORT).map_err(TemplateError::Listen)
}

/// Tells the VMM the template is ready to be snapshotted.
pub fn ready(ports: &mut dyn Ports) {
    ports.write_u8(READY_PORT, 1);
}

/// The `start` the VMM left in the mailbox (see [`MAILBOX_ADDR`]) before this restored copy
/// ran: None when there is none (it comes on the control port then), else the request or the
/// message and exit code it is refused with.
pub fn from_mailbox() -> Option<Result<(StartRequest, StartAnswer), (String, i32)>> {
    let line = read_mailbox().ok()??;
    Some(judge(&line).map(|start| (start, StartAnswer { conn: None })))
}

/// The mailbox's line, read through /dev/mem (which maps RAM outside the e820 map write-back).
fn read_mailbox() -> io::Result<Option<Vec<u8>>> {
    let mem = File::open("/dev/mem")?;
    let mut header = [0u8; MAILBOX_HEADER];
    mem.read_exact_at(&mut header, MAILBOX_ADDR)?;
    let Some(len) = mailbox_len(&header) else { return Ok(None) };
    let mut line = vec![0u8; len];
    mem.read_exact_at(&mut line, MAILBOX_ADDR + MAILBOX_HEADER as u64)?;
    Ok(Some(line))
}

/// What a request line asks of a template: a `start` it can run, or the message and exit code
/// it is answered with.
pub fn judge(line: &[u8]) -> Result<StartRequest, (String, i32)> {
    let start = match serde_json::from_slice::<ExecRequest>(line) {
        Err(e) => return Err((format!("bad exec request: {e}"), 125)),
        Ok(ExecRequest { start: None, .. }) => return Err((NO_WORKLOAD.to_string(), 1)),
        Ok(ExecRequest { start: Some(start), .. }) => start,
    };
    if start.config.template {
        return Err(("start: the configuration is a template's, not a workload's".to_string(), 1));
    }
    if let Err(e) = start.config.validate() {
        return Err((format!("start: invalid configuration: {e}"), 1));
    }
    if start.entropy.is_empty() {
        return Err(("start: no entropy given".to_string(), 1));
    }
    Ok(start)
}

/// The request line of `conn`, without its newline; None when the host hung up or sent more
/// than [`MAX_REQUEST`] bytes without one.
fn read_line(conn: &mut File) -> Option<Vec<u8>> {
    let mut line = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => {
                if let Some(end) = buf[..n].iter().position(|b| *b == b'\n') {
                    line.extend_from_slice(&buf[..end]);
                    return Some(line);
                }
                line.extend_from_slice(&buf[..n]);
                if line.len() > MAX_REQUEST {
                    return None;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// The next connection on `listener`, blocking.
fn accept(listener: &OwnedFd) -> Result<File, TemplateError> {
    loop {
        // SAFETY: accept4 with null address pointers writes no memory.
        let fd = unsafe {
            libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
        };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by accept4 and nothing else owns it.
            return Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        let err = io::Error::last_os_error();
        // Only a broken listener ends the wait. Anything else was one connection's: interrupted,
        // gone before it was taken, or reset by the transport reset a restore sends (vsock's
        // accept then says ECONNRESET), which is why the host tries again.
        if matches!(
            err.raw_os_error(),
            Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT)
        ) {
            return Err(TemplateError::Accept(err));
        }
    }
}

/// Takes `listener`'s connections one at a time, answering each that is not a valid `start`
/// (see [`judge`]) and noting it in `log`, until one is: that request, and its connection to
/// answer.
pub fn wait_for_start(
    listener: &OwnedFd,
    log: &mut dyn FnMut(fmt::Arguments),
) -> Result<(StartRequest, StartAnswer), TemplateError> {
    loop {
        let mut conn = accept(listener)?;
        let Some(line) = read_line(&mut conn) else { continue };
        match judge(&line) {
            Ok(start) => return Ok((start, StartAnswer { conn: Some(conn) })),
            Err((message, code)) => {
                log(format_args!("refused a request: {message}"));
                answer(conn, &message, code);
            }
        }
    }
}

/// Makes a restored copy's kernel state its own: `start`'s entropy into the random pool (then a
/// reseed), and its time on the wall clock.
pub fn refresh(start: &StartRequest) -> Result<(), TemplateError> {
    sys::add_entropy(&start.entropy).map_err(TemplateError::Entropy)?;
    sys::set_realtime(start.realtime_ns).map_err(TemplateError::Clock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};
    use twinbox_agent::control::read_frame;
    use twinbox_agent::GuestConfig;

    fn start() -> StartRequest {
        StartRequest {
            config: GuestConfig { args: vec!["/hello".into()], ..GuestConfig::default() },
            entropy: vec![7; 64],
            realtime_ns: 1_700_000_000_000_000_000,
        }
    }

    fn line(start: StartRequest) -> Vec<u8> {
        serde_json::to_vec(&ExecRequest { start: Some(start), ..ExecRequest::default() }).unwrap()
    }

    #[test]
    fn only_a_valid_start_is_taken() {
        assert_eq!(judge(&line(start())), Ok(start()));
        assert_eq!(judge(br#"{"args":["ls"]}"#), Err((NO_WORKLOAD.to_string(), 1)));
        assert_eq!(judge(br#"{"signal":15}"#), Err((NO_WORKLOAD.to_string(), 1)));
        let (message, code) = judge(b"{").unwrap_err();
        assert!(message.starts_with("bad exec request: ") && code == 125, "{message}");
        let (message, code) = judge(br#"{"start":{"config":{},"entropy":[],"realtime_ns":0,"x":1}}"#).unwrap_err();
        assert!(message.contains("unknown field `x`") && code == 125, "{message}");
        let edit = |f: fn(&mut StartRequest)| {
            let mut s = start();
            f(&mut s);
            judge(&line(s)).unwrap_err()
        };
        assert_eq!(
            edit(|s| s.config.args.clear()).0,
            "start: invalid configuration: no command to run (args is empty)"
        );
        assert_eq!(edit(|s| s.config.template = true).0, "start: the configuration is a template's, not a workload's");
        assert_eq!(edit(|s| s.entropy.clear()), ("start: no entropy given".to_string(), 1));
    }

    /// The wait on a real (UNIX) listener: a host that hangs up, then a plain exec, then a bad
    /// start, each answered or skipped, then the start, answered once "spawned".
    #[test]
    fn waits_through_other_requests_for_the_start() {
        let dir = std::env::temp_dir().join(format!("twinbox-agent-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let _ = std::fs::remove_file(&path);
        let listener = OwnedFd::from(UnixListener::bind(&path).unwrap());
        let host = std::thread::spawn({
            let path = path.clone();
            move || {
                let answers = |request: &[u8]| {
                    let mut conn = UnixStream::connect(&path).unwrap();
                    conn.write_all(request).unwrap();
                    let mut frames = Vec::new();
                    while let Some(f) = read_frame(&mut conn).unwrap() {
                        frames.push(f);
                    }
                    frames
                };
                drop(UnixStream::connect(&path).unwrap());
                let refused = answers(b"{\"args\":[\"ls\"]}\n");
                let mut bad = start();
                bad.config.cwd = "relative".into();
                let bad = answers(&[line(bad), b"\n".to_vec()].concat());
                let started = answers(&[line(start()), b"\n".to_vec()].concat());
                (refused, bad, started)
            }
        });
        let mut logged = Vec::new();
        let (got, answer) = wait_for_start(&listener, &mut |a| logged.push(a.to_string())).unwrap();
        assert_eq!(got, start());
        answer.started();
        let (refused, bad, started) = host.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let exit = |code: i32| (FRAME_EXIT, code.to_le_bytes().to_vec());
        assert_eq!(refused, [(FRAME_ERROR, NO_WORKLOAD.as_bytes().to_vec()), exit(1)]);
        assert_eq!(bad[1], exit(1));
        assert_eq!(
            String::from_utf8_lossy(&bad[0].1),
            r#"start: invalid configuration: cwd "relative" is not an absolute path"#
        );
        assert_eq!(started, [exit(0)]);
        assert_eq!(logged.len(), 2, "{logged:?}");
        assert!(logged[0].starts_with("refused a request: no workload yet"), "{logged:?}");
    }

    #[test]
    fn a_failed_start_says_why_then_exits_1() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        StartAnswer { conn: Some(File::from(OwnedFd::from(ours))) }.failed("cannot mount ext4 /dev/vda on /mnt/lower");
        let mut theirs = theirs;
        assert_eq!(
            read_frame(&mut theirs).unwrap(),
            Some((FRAME_ERROR, b"cannot mount ext4 /dev/vda on /mnt/lower".to_vec()))
        );
        assert_eq!(read_frame(&mut theirs).unwrap(), Some((FRAME_EXIT, 1i32.to_le_bytes().to_vec())));
        assert_eq!(read_frame(&mut theirs).unwrap(), None);
    }
}

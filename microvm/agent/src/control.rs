//! The control channel between the host and the agent, over vsock: the agent listens on
//! [`CONTROL_PORT`]; the host reaches it through the VMM's UNIX socket (`CONNECT 1024`).
//!
//! One connection runs one `exec` (or delivers one signal to the workload): the host sends an
//! [`ExecRequest`] as one JSON line; the agent starts the process in the workload's namespaces
//! and root and answers with frames until it ends: `[kind: u8][length: u32 LE][payload]`, kinds
//! [`FRAME_STDOUT`], [`FRAME_STDERR`], [`FRAME_ERROR`] (why it could not start, text) and last
//! [`FRAME_EXIT`] (the exit code, i32 LE, as `twinbox exec` of a container returns it).
//!
//! After its request line the host may send frames too: [`FRAME_STDIN`] (bytes for the
//! process's standard input when the request asked for it; an empty one closes it) and
//! [`FRAME_RESIZE`] (the terminal's new size, when the request asked for one).

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

/// The agent's vsock port.
pub const CONTROL_PORT: u32 = 1024;
/// The process's standard output.
pub const FRAME_STDOUT: u8 = 1;
/// Its standard error.
pub const FRAME_STDERR: u8 = 2;
/// Its exit code; the last frame.
pub const FRAME_EXIT: u8 = 3;
/// Why it could not be started.
pub const FRAME_ERROR: u8 = 4;
/// Host to agent: bytes for the process's standard input; empty: its end.
pub const FRAME_STDIN: u8 = 5;
/// Host to agent: the terminal's size, rows then columns, u16 LE each.
pub const FRAME_RESIZE: u8 = 6;
/// The longest request line the agent reads.
pub const MAX_REQUEST: usize = 256 * 1024;

/// A process to run beside the workload (`twinbox exec`): in its pid and mount namespaces and
/// its root, with its environment, working directory and user unless given here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecRequest {
    /// argv; `args[0]` is looked up in the environment's PATH.
    pub args: Vec<String>,
    /// "K=V" added to (or replacing in) the workload's environment.
    pub env: Vec<String>,
    /// The working directory (default: the workload's).
    pub cwd: Option<String>,
    /// User and group ids (default: the workload's).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Supplementary groups (default: the workload's when no `uid` is given, else none).
    pub groups: Option<Vec<u32>>,
    /// `exec -i`: the process reads what the host sends in [`FRAME_STDIN`] frames; without
    /// it, /dev/null.
    pub stdin: bool,
    /// `exec -t`: the process runs on a terminal of its own (a pty in the workload's /dev/pts),
    /// its output one stream in [`FRAME_STDOUT`] frames.
    pub tty: bool,
    /// The terminal's first size (rows, columns), with `tty`.
    pub size: Option<(u16, u16)>,
    /// Instead of running a process: send this signal to the workload (`twinbox kill`,
    /// `stop`); the answer is an exit frame of 0, or an error frame and 1.
    pub signal: Option<i32>,
    /// Instead of running a process: the workload's new /etc/hosts (an instance joined or left
    /// its network), rewritten in place; answered as `signal` is.
    pub hosts: Option<String>,
}

/// One frame's bytes.
pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + payload.len());
    f.push(kind);
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// Takes the first whole frame off the front of `buf`, if there is one; an error when it
/// announces more than [`MAX_REQUEST`] bytes.
pub fn take_frame(buf: &mut Vec<u8>) -> io::Result<Option<(u8, Vec<u8>)>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_REQUEST {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes")));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    let kind = buf[0];
    let payload = buf[5..5 + len].to_vec();
    buf.drain(..5 + len);
    Ok(Some((kind, payload)))
}

/// A [`FRAME_RESIZE`] frame.
pub fn resize_frame(rows: u16, cols: u16) -> Vec<u8> {
    let mut size = rows.to_le_bytes().to_vec();
    size.extend_from_slice(&cols.to_le_bytes());
    frame(FRAME_RESIZE, &size)
}

/// Reads the next frame; None at a clean end of the stream.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    }
    r.read_exact(&mut head[1..])?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_REQUEST {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((head[0], payload)))
}

/// The environment of an exec: the workload's, with `extra` added or replacing by name.
pub fn merge_env(base: &[String], extra: &[String]) -> Vec<String> {
    let key = |kv: &str| kv.split_once('=').map_or(kv, |(k, _)| k).to_owned();
    let mut env: Vec<String> = base.iter().filter(|kv| !extra.iter().any(|e| key(e) == key(kv))).cloned().collect();
    env.extend(extra.iter().cloned());
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut bytes = frame(FRAME_STDOUT, b"out");
        bytes.extend(frame(FRAME_EXIT, &3i32.to_le_bytes()));
        let mut r = &bytes[..];
        assert_eq!(read_frame(&mut r).unwrap(), Some((FRAME_STDOUT, b"out".to_vec())));
        assert_eq!(read_frame(&mut r).unwrap(), Some((FRAME_EXIT, 3i32.to_le_bytes().to_vec())));
        assert_eq!(read_frame(&mut r).unwrap(), None);
        assert!(read_frame(&mut &[1u8, 9, 0][..]).is_err(), "a cut frame is an error");
    }

    #[test]
    fn frames_come_off_a_buffer_whole() {
        let mut bytes = frame(FRAME_STDIN, b"abc");
        bytes.extend(resize_frame(33, 120));
        let mut buf = bytes[..6].to_vec();
        assert_eq!(take_frame(&mut buf).unwrap(), None, "a cut frame waits for the rest");
        buf.extend_from_slice(&bytes[6..]);
        assert_eq!(take_frame(&mut buf).unwrap(), Some((FRAME_STDIN, b"abc".to_vec())));
        let (kind, size) = take_frame(&mut buf).unwrap().unwrap();
        assert_eq!((kind, size), (FRAME_RESIZE, [33, 0, 120, 0].to_vec()));
        assert!(buf.is_empty());
        let mut huge = vec![FRAME_STDIN];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(take_frame(&mut huge).is_err());
    }

    #[test]
    fn env_merges_by_name() {
        let base = ["PATH=/bin".to_string(), "A=1".to_string()];
        assert_eq!(merge_env(&base, &["A=2".into(), "B=3".into()]), ["PATH=/bin", "A=2", "B=3"]);
    }

    #[test]
    fn requests_default_to_the_workload() {
        let r: ExecRequest = serde_json::from_str(r#"{"args":["ls"]}"#).unwrap();
        assert_eq!((r.cwd, r.uid, r.gid, r.groups), (None, None, None, None));
        assert!(!r.stdin && !r.tty && r.size.is_none());
        assert!(serde_json::from_str::<ExecRequest>(r#"{"argz":[]}"#).is_err());
    }
}

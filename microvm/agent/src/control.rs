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
//!
//! A warm template's agent (see [`GuestConfig::template`]) has no workload yet: it answers
//! only a request with [`start`](ExecRequest::start), which gives it one, with a
//! [`FRAME_EXIT`] of 0 once the workload's process was spawned, or a [`FRAME_ERROR`] and a
//! [`FRAME_EXIT`] of 1. Any other request gets [`FRAME_ERROR`] "no workload yet: …" and 1; a
//! `start` sent to an agent that has its workload gets "this VM already runs its workload"
//! and 1.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use crate::GuestConfig;

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
    /// Instead of running a process: the workload of a VM restored from a warm template's
    /// snapshot, which the agent then starts as a cold boot would; the answer is an exit frame
    /// of 0 once its process was spawned, or an error frame and 1.
    pub start: Option<StartRequest>,
}

/// What a VM restored from a template's snapshot needs to become a workload's own VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The workload's full configuration, as a cold boot reads it from
    /// [`CONFIG_PATH`](crate::CONFIG_PATH) (`template` false): its own hostname, network and
    /// eth0 MAC address.
    pub config: GuestConfig,
    /// Fresh entropy from the host (64 bytes), added to the kernel's pool, credited, before the
    /// pool is reseeded: every copy of the snapshot would otherwise draw the same numbers.
    pub entropy: Vec<u8>,
    /// The host's CLOCK_REALTIME, nanoseconds since the Unix epoch, to which the guest's wall
    /// clock is set (it stopped with the snapshot).
    pub realtime_ns: u64,
}

/// The mailbox bytes (see [`MAILBOX_ADDR`](crate::MAILBOX_ADDR)) that carry the request line
/// `line` (JSON, no newline), or None when they would not fit.
pub fn mailbox(line: &[u8]) -> Option<Vec<u8>> {
    let len = u32::try_from(line.len()).ok()?;
    let mut bytes = Vec::with_capacity(MAILBOX_HEADER + line.len());
    bytes.extend_from_slice(&crate::MAILBOX_MAGIC);
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(line);
    (bytes.len() <= crate::MAILBOX_LEN).then_some(bytes)
}

/// The mailbox's header: its magic and the length of the line.
pub const MAILBOX_HEADER: usize = crate::MAILBOX_MAGIC.len() + 4;

/// How many line bytes follow a mailbox `header` ([`MAILBOX_HEADER`] bytes); None when it holds
/// no request (no magic: a template, or a VM never restored) or announces more than fits.
pub fn mailbox_len(header: &[u8]) -> Option<usize> {
    let (magic, len) = header.split_at_checked(crate::MAILBOX_MAGIC.len())?;
    if magic != crate::MAILBOX_MAGIC {
        return None;
    }
    let len = usize::try_from(u32::from_le_bytes(len.get(..4)?.try_into().ok()?)).ok()?;
    (len <= crate::MAILBOX_LEN - MAILBOX_HEADER).then_some(len)
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
    fn a_mailbox_holds_one_line_that_fits() {
        let bytes = mailbox(b"{\"start\":1}").unwrap();
        assert_eq!(&bytes[..8], b"TBSTART1");
        assert_eq!(mailbox_len(&bytes[..MAILBOX_HEADER]), Some(11));
        assert_eq!(&bytes[MAILBOX_HEADER..], b"{\"start\":1}");
        // A template's mailbox is zero; a cut or foreign header holds nothing.
        assert_eq!(mailbox_len(&[0; MAILBOX_HEADER]), None);
        assert_eq!(mailbox_len(&bytes[..6]), None);
        // The largest line that fits, and one byte more.
        let most = crate::MAILBOX_LEN - MAILBOX_HEADER;
        assert_eq!(mailbox(&vec![b'x'; most]).map(|b| b.len()), Some(crate::MAILBOX_LEN));
        assert_eq!(mailbox(&vec![b'x'; most + 1]), None);
        let mut too_long = bytes[..MAILBOX_HEADER].to_vec();
        too_long[8..].copy_from_slice(&(most as u32 + 1).to_le_bytes());
        assert_eq!(mailbox_len(&too_long), None);
    }

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
        assert!(r.start.is_none());
    }

    fn start() -> StartRequest {
        StartRequest {
            config: GuestConfig {
                args: vec!["/hello".into()],
                hostname: "web-1".into(),
                network: Some(crate::GuestNetwork {
                    address: std::net::Ipv4Addr::new(10, 89, 0, 7),
                    prefix_len: 16,
                    gateway: std::net::Ipv4Addr::new(10, 89, 0, 1),
                    mtu: 1500,
                    route_mtu: None,
                    mac: Some("02:42:0a:59:00:07".into()),
                }),
                ..GuestConfig::default()
            },
            entropy: (0..64).collect(),
            realtime_ns: 1_700_000_000_123_456_789,
        }
    }

    #[test]
    fn start_requests_round_trip_through_json() {
        let request = ExecRequest { start: Some(start()), ..ExecRequest::default() };
        let line = serde_json::to_string(&request).unwrap();
        assert!(!line.contains('\n'), "one line: {line}");
        let back: ExecRequest = serde_json::from_str(&line).unwrap();
        assert_eq!(back, request);
        let start = back.start.unwrap();
        assert_eq!(start.entropy.len(), 64);
        assert!(start.config.validate().is_ok());
        assert_eq!(start.config.network.unwrap().mac.as_deref(), Some("02:42:0a:59:00:07"));
    }

    #[test]
    fn start_requests_refuse_unknown_and_missing_fields() {
        let json = serde_json::to_value(start()).unwrap();
        let with = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = serde_json::json!({ "start": json.clone() });
            edit(&mut v);
            serde_json::from_value::<ExecRequest>(v).map_err(|e| e.to_string())
        };
        assert!(with(&|_| {}).is_ok());
        let err = with(&|v| v["start"]["realtime"] = 1.into()).unwrap_err();
        assert!(err.contains("realtime"), "{err}");
        let err = with(&|v| v["start"]["config"]["argz"] = serde_json::json!([])).unwrap_err();
        assert!(err.contains("argz"), "{err}");
        let err = with(&|v| v["start"]["config"]["network"]["macaddr"] = "x".into()).unwrap_err();
        assert!(err.contains("macaddr"), "{err}");
        let err = with(&|v| drop(v["start"].as_object_mut().unwrap().remove("entropy"))).unwrap_err();
        assert!(err.contains("entropy"), "{err}");
        assert!(with(&|v| v["start"]["entropy"] = serde_json::json!([256])).is_err(), "bytes only");
        assert!(with(&|v| v["start"]["realtime_ns"] = (-1).into()).is_err());
    }

    #[test]
    fn a_start_configuration_is_validated_like_a_cold_boots() {
        let mut bad_mac = start();
        bad_mac.config.network.as_mut().unwrap().mac = Some("02:42:0a:59:00".into());
        let line = serde_json::to_string(&ExecRequest { start: Some(bad_mac), ..ExecRequest::default() }).unwrap();
        let parsed: ExecRequest = serde_json::from_str(&line).unwrap();
        let err = parsed.start.unwrap().config.validate().unwrap_err();
        assert_eq!(err.to_string(), r#"network: MAC address "02:42:0a:59:00" is not of the form aa:bb:cc:dd:ee:ff"#);
        let mut no_args = start();
        no_args.config.args.clear();
        assert!(matches!(no_args.config.validate(), Err(crate::GuestConfigError::NoArgs)));
    }
}

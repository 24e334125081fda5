//! When an instance of the user's own image is ready (`twinbox bench --image IMAGE --ready
//! SPEC`): the image runs its own entrypoint and cmd, so the harness cannot wait for a line of
//! `hello`'s; SPEC says what to wait for instead.
//!
//! | SPEC | ready when |
//! |---|---|
//! | `http://:PORT/PATH` | an HTTP GET of PATH to the instance's PORT, published on 127.0.0.1, answers with any status |
//! | `tcp:PORT` | a TCP connect to the instance's PORT, published on 127.0.0.1, succeeds |
//! | `log:TEXT` | TEXT appears in the instance's output (stdout and stderr) |
//!
//! A TCP connect through a published port reaches the instance by DNAT, so it is refused until
//! something listens there; where a backend could only forward through a process of its own
//! that accepts first, `tcp:` would say ready too early, and `http://` is the safer choice.

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use twinbox_exit::ExitCode;

/// What `--ready` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadySpec {
    /// `http://:PORT/PATH`.
    Http { port: u16, path: String },
    /// `tcp:PORT`.
    Tcp { port: u16 },
    /// `log:TEXT`.
    Log { text: String },
}

/// The forms `--ready` takes, for the error messages.
const FORMS: &str = "http://:PORT/PATH, tcp:PORT or log:TEXT";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadySpecError {
    #[error("--ready {0:?} is not a readiness check; give {FORMS}")]
    Unknown(String),
    #[error("--ready {spec:?}: {port:?} is not a port; give a number from 1 to 65535, the port the image listens on")]
    BadPort { spec: String, port: String },
    #[error(
        "--ready {0:?} names a host; give none (http://:PORT/PATH): the bench publishes the instance's PORT on \
         127.0.0.1 itself"
    )]
    HostGiven(String),
    #[error("--ready {0:?}: the path must start with / and hold no spaces or control characters (e.g. http://:8080/)")]
    BadPath(String),
    #[error("--ready https is not supported; give http://:PORT/PATH, or tcp:PORT for a TLS port")]
    Https,
    #[error("--ready log: needs the text to wait for (log:TEXT)")]
    NoText,
}

impl ExitCode for ReadySpecError {
    fn exit_code(&self) -> i32 {
        match self {
            ReadySpecError::Unknown(_)
            | ReadySpecError::BadPort { .. }
            | ReadySpecError::HostGiven(_)
            | ReadySpecError::BadPath(_)
            | ReadySpecError::Https
            | ReadySpecError::NoText => twinbox_exit::USER_ERROR,
        }
    }
}

fn port(spec: &str, text: &str) -> Result<u16, ReadySpecError> {
    text.parse::<u16>()
        .ok()
        .filter(|&p| p > 0 && text.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| ReadySpecError::BadPort { spec: spec.to_owned(), port: text.to_owned() })
}

impl std::str::FromStr for ReadySpec {
    type Err = ReadySpecError;

    fn from_str(spec: &str) -> Result<ReadySpec, ReadySpecError> {
        if let Some(rest) = spec.strip_prefix("http://") {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, "/"),
            };
            let Some(p) = authority.strip_prefix(':') else {
                return Err(if authority.contains(':') || !authority.is_empty() {
                    ReadySpecError::HostGiven(spec.to_owned())
                } else {
                    ReadySpecError::BadPort { spec: spec.to_owned(), port: String::new() }
                });
            };
            let port = port(spec, p)?;
            if path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
                return Err(ReadySpecError::BadPath(spec.to_owned()));
            }
            return Ok(ReadySpec::Http { port, path: path.to_owned() });
        }
        if spec.starts_with("https://") {
            return Err(ReadySpecError::Https);
        }
        if let Some(p) = spec.strip_prefix("tcp:") {
            return Ok(ReadySpec::Tcp { port: port(spec, p)? });
        }
        if let Some(text) = spec.strip_prefix("log:") {
            if text.is_empty() {
                return Err(ReadySpecError::NoText);
            }
            return Ok(ReadySpec::Log { text: text.to_owned() });
        }
        Err(ReadySpecError::Unknown(spec.to_owned()))
    }
}

impl std::fmt::Display for ReadySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadySpec::Http { port, path } => write!(f, "http://:{port}{path}"),
            ReadySpec::Tcp { port } => write!(f, "tcp:{port}"),
            ReadySpec::Log { text } => write!(f, "log:{text}"),
        }
    }
}

impl ReadySpec {
    /// The instance's port to publish, if the check goes through one.
    pub fn port(&self) -> Option<u16> {
        match self {
            ReadySpec::Http { port, .. } | ReadySpec::Tcp { port } => Some(*port),
            ReadySpec::Log { .. } => None,
        }
    }

    /// What is waited for, in words: "an HTTP answer to GET / on 127.0.0.1:PORT".
    pub fn describe(&self, addr: Option<SocketAddr>) -> String {
        let at = addr.map_or_else(|| "the published port".to_owned(), |a| a.to_string());
        match self {
            ReadySpec::Http { path, .. } => format!("an HTTP answer to GET {path} on {at}"),
            ReadySpec::Tcp { .. } => format!("a TCP connection accepted on {at}"),
            ReadySpec::Log { text } => format!("{text:?} in the instance's output"),
        }
    }
}

/// The pause between two checks.
const PAUSE: Duration = Duration::from_millis(1);
/// How long one HTTP or TCP attempt may take.
const ATTEMPT: Duration = Duration::from_millis(500);

/// Where a `log:` check reads the instance's output: a file that grows, read from where the
/// last check stopped, with the tail of the previous read kept so TEXT split across two reads
/// is found.
pub struct OutputWatch<'p> {
    path: &'p Path,
    offset: u64,
    carry: Vec<u8>,
}

impl<'p> OutputWatch<'p> {
    pub fn new(path: &'p Path) -> Self {
        OutputWatch { path, offset: 0, carry: Vec::new() }
    }

    /// Whether `text` has appeared in the file by now.
    pub fn contains(&mut self, text: &str) -> bool {
        use std::io::Seek;
        let Ok(mut f) = std::fs::File::open(self.path) else { return false };
        if f.seek(std::io::SeekFrom::Start(self.offset)).is_err() {
            return false;
        }
        let mut new = Vec::new();
        if f.read_to_end(&mut new).is_err() || new.is_empty() {
            return false;
        }
        self.offset += new.len() as u64;
        let mut hay = std::mem::take(&mut self.carry);
        hay.extend_from_slice(&new);
        let needle = text.as_bytes();
        if hay.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        let keep = needle.len().saturating_sub(1).min(hay.len());
        self.carry = hay[hay.len() - keep..].to_vec();
        false
    }
}

/// One check of `spec`: `addr` is where the instance's port is published (http, tcp), `output`
/// what it wrote (log).
pub fn check(spec: &ReadySpec, addr: Option<SocketAddr>, output: Option<&mut OutputWatch<'_>>) -> bool {
    match spec {
        ReadySpec::Http { path, .. } => {
            addr.is_some_and(|a| crate::scenario::net_client::answers(a, path, ATTEMPT).is_ok())
        }
        ReadySpec::Tcp { .. } => addr.is_some_and(|a| std::net::TcpStream::connect_timeout(&a, ATTEMPT).is_ok()),
        ReadySpec::Log { text } => output.is_some_and(|o| o.contains(text)),
    }
}

/// Checks `spec` until it holds (returns the time waited) or `deadline` has passed since the
/// call (None). `gone` is asked now and then, once the first second has passed, whether the
/// instance has ended: then there is no point waiting on.
pub fn wait(
    spec: &ReadySpec,
    addr: Option<SocketAddr>,
    output: Option<&Path>,
    deadline: Duration,
    mut gone: impl FnMut() -> bool,
) -> Result<Duration, WaitEnd> {
    let start = Instant::now();
    let mut watch = output.map(OutputWatch::new);
    let mut next_look = Duration::from_secs(1);
    loop {
        if check(spec, addr, watch.as_mut()) {
            return Ok(start.elapsed());
        }
        let t = start.elapsed();
        if t >= deadline {
            return Err(WaitEnd::Timeout);
        }
        if t >= next_look {
            if gone() {
                return Err(WaitEnd::Gone);
            }
            next_look = t + Duration::from_millis(500);
        }
        std::thread::sleep(PAUSE.min(deadline - t));
    }
}

/// Why [`wait`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnd {
    Timeout,
    /// The instance ended before it was ready.
    Gone,
}

/// The last `lines` lines of a file, on one line (for an error).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().map(str::trim_end).filter(|l| !l.is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ReadySpec, ReadySpecError> {
        s.parse()
    }

    #[test]
    fn good_specs() {
        assert_eq!(parse("http://:8080/"), Ok(ReadySpec::Http { port: 8080, path: "/".into() }));
        assert_eq!(parse("http://:80/health?full=1"), Ok(ReadySpec::Http { port: 80, path: "/health?full=1".into() }));
        assert_eq!(parse("http://:8080"), Ok(ReadySpec::Http { port: 8080, path: "/".into() }), "no path: /");
        assert_eq!(parse("tcp:5432"), Ok(ReadySpec::Tcp { port: 5432 }));
        assert_eq!(
            parse("log:ready to accept connections"),
            Ok(ReadySpec::Log { text: "ready to accept connections".into() })
        );
        assert_eq!(parse("log:a:b"), Ok(ReadySpec::Log { text: "a:b".into() }));
        for s in ["http://:8080/x", "tcp:1", "log:started"] {
            assert_eq!(parse(s).unwrap().to_string(), s, "prints back as given");
        }
        assert_eq!(parse("http://:8080/").unwrap().port(), Some(8080));
        assert_eq!(parse("log:x").unwrap().port(), None);
    }

    #[test]
    fn bad_specs_say_what_to_give() {
        let err = |s: &str| parse(s).unwrap_err();
        let msg = |s: &str| err(s).to_string();
        assert_eq!(err("8080"), ReadySpecError::Unknown("8080".into()));
        assert_eq!(
            msg("8080"),
            "--ready \"8080\" is not a readiness check; give http://:PORT/PATH, tcp:PORT or log:TEXT"
        );
        assert_eq!(err(""), ReadySpecError::Unknown(String::new()));
        assert_eq!(err("udp:53"), ReadySpecError::Unknown("udp:53".into()));
        assert_eq!(err("tcp:0"), ReadySpecError::BadPort { spec: "tcp:0".into(), port: "0".into() });
        assert_eq!(
            msg("tcp:http"),
            "--ready \"tcp:http\": \"http\" is not a port; give a number from 1 to 65535, the port the image listens on"
        );
        assert!(matches!(err("tcp:65536"), ReadySpecError::BadPort { .. }));
        assert!(matches!(err("tcp:+80"), ReadySpecError::BadPort { .. }));
        assert!(matches!(err("http://:/"), ReadySpecError::BadPort { .. }));
        assert!(matches!(err("http:///"), ReadySpecError::BadPort { .. }));
        assert_eq!(err("http://localhost:8080/"), ReadySpecError::HostGiven("http://localhost:8080/".into()));
        assert!(msg("http://localhost:8080/").contains("give none (http://:PORT/PATH)"));
        assert_eq!(err("http://example.org/"), ReadySpecError::HostGiven("http://example.org/".into()));
        assert_eq!(err("http://:8080/a b"), ReadySpecError::BadPath("http://:8080/a b".into()));
        assert!(msg("http://:8080/a\r\nX: y").contains("the path must start with /"));
        assert_eq!(err("https://:8443/"), ReadySpecError::Https);
        assert_eq!(err("log:"), ReadySpecError::NoText);
        assert_eq!(msg("log:"), "--ready log: needs the text to wait for (log:TEXT)");
        assert_eq!(err("tcp:x").exit_code(), 1, "a user error");
    }

    #[test]
    fn log_text_is_found_across_reads() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out");
        let mut w = OutputWatch::new(&p);
        assert!(!w.contains("ready"), "no file yet");
        std::fs::write(&p, "starting\nrea").unwrap();
        assert!(!w.contains("ready"));
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        std::io::Write::write_all(&mut f, b"dy now\n").unwrap();
        assert!(w.contains("ready"), "split over two reads");
    }

    #[test]
    fn wait_ends_on_the_text_on_a_timeout_or_when_the_instance_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out");
        std::fs::write(&p, "listening\n").unwrap();
        let spec = ReadySpec::Log { text: "listening".into() };
        assert!(wait(&spec, None, Some(&p), Duration::from_secs(5), || false).is_ok());
        let other = ReadySpec::Log { text: "never".into() };
        assert_eq!(wait(&other, None, Some(&p), Duration::from_millis(50), || false), Err(WaitEnd::Timeout));
        assert_eq!(wait(&other, None, Some(&p), Duration::from_secs(30), || true), Err(WaitEnd::Gone));
        assert_eq!(tail(&p, 3), "listening");
    }

    #[test]
    fn tcp_and_http_checks_on_a_real_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                // Any status is an answer.
                let _ = std::io::Write::write_all(&mut s, b"HTTP/1.0 404 Not Found\r\n\r\n");
            }
        });
        let http = ReadySpec::Http { port: addr.port(), path: "/missing".into() };
        assert!(check(&http, Some(addr), None));
        assert!(check(&ReadySpec::Tcp { port: addr.port() }, Some(addr), None));
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(!check(&ReadySpec::Tcp { port: closed.port() }, Some(closed), None));
        assert!(!check(&http, Some(closed), None));
    }
}

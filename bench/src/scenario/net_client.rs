//! The client side of the `net` scenario: HTTP/1.1 requests to `hello serve PORT` (or any
//! server speaking the same small protocol: `GET /` and `GET /bytes/N`), or `GET PATH` to the
//! user's own image's server (`--ready http://:PORT/PATH`), timed on the host.
//!
//! Every socket gets read and write timeouts and every loop a bound, so a server that stops
//! answering ends a measurement with an error instead of hanging it. Responses are parsed
//! (status line, headers, `Content-Length`) and exactly their body is read, so one connection
//! carries request after request; a response that announces no length is read to the end of
//! its connection when the server closes it after (HTTP/1.0 servers, busybox httpd).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How long one connect, read or write may take before a measurement fails.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one attempt of [`wait_ready`] may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
/// The pause between two failed attempts of [`wait_ready`].
const RETRY_PAUSE: Duration = Duration::from_millis(1);
/// The longest status or header line accepted.
const MAX_LINE: u64 = 16 * 1024;
/// The most header lines accepted in one response.
const MAX_HEADERS: usize = 100;
/// The longest body without a `Content-Length` read to the connection's end.
const MAX_UNSIZED_BODY: u64 = 64 << 20;
/// The read buffer of [`throughput`].
const BULK_BUFFER: usize = 1 << 20;

/// Waits until `GET /` on `addr` answers 200: attempt after attempt (each with short timeouts,
/// ~1 ms apart) until `deadline` has passed. Returns the time from the call to the first
/// successful response, or None when there was none in time.
pub fn wait_ready(addr: SocketAddr, deadline: Duration) -> Option<Duration> {
    let start = Instant::now();
    loop {
        let left = deadline.checked_sub(start.elapsed()).filter(|d| !d.is_zero())?;
        if ready_once(addr, left.min(ATTEMPT_TIMEOUT)).is_ok() {
            return Some(start.elapsed());
        }
        let left = deadline.checked_sub(start.elapsed())?;
        std::thread::sleep(left.min(RETRY_PAUSE));
    }
}

/// One attempt of [`wait_ready`]: connect, `GET /`, a whole 200 response, all within about
/// `timeout` per step.
fn ready_once(addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let mut conn = connect(addr, timeout)?;
    conn.request("/", true)?;
    let head = conn.response()?;
    expect_ok(&head)?;
    conn.skip_body(&head)
}

/// Whether `GET path` on `addr` gets an answer, with any status: connect, the request, the
/// response's head, each within about `timeout`. The status.
pub fn answers(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<u16> {
    let mut conn = connect(addr, timeout)?;
    conn.request(path, true)?;
    Ok(conn.response()?.status)
}

/// Whether the server at `addr` keeps a connection open after answering `GET path` (asked
/// for by HTTP/1.1's default), so that [`latency_keepalive`] can measure it.
pub fn keeps_alive(addr: SocketAddr, path: &str) -> io::Result<bool> {
    let mut conn = connect(addr, IO_TIMEOUT)?;
    conn.request(path, false)?;
    let head = conn.response()?;
    expect_ok(&head)?;
    conn.skip_body(&head)?;
    Ok(!head.close)
}

/// `requests` sequential `GET path` on one kept-alive connection (TCP_NODELAY); each sample is
/// a round trip, from writing the request to the last byte of the response, in µs. The
/// connect is not part of any sample.
pub fn latency_keepalive(addr: SocketAddr, path: &str, requests: usize) -> io::Result<Vec<f64>> {
    let mut conn = connect(addr, IO_TIMEOUT)?;
    let mut samples = Vec::with_capacity(requests);
    for i in 0..requests {
        let start = Instant::now();
        conn.request(path, false)?;
        let head = conn.response()?;
        expect_ok(&head)?;
        conn.skip_body(&head)?;
        samples.push(micros(start.elapsed()));
        if head.close && i + 1 < requests {
            return Err(invalid("the server closed a kept-alive connection"));
        }
    }
    Ok(samples)
}

/// `requests` times: a new connection (TCP_NODELAY), `GET path` with `Connection: close`, the
/// whole response; each sample from before the connect to the last byte of the response, in µs.
/// After each sample the client waits (untimed) for the server to close first, so the
/// server's side of the connection, not the client's, waits out TIME_WAIT and many samples do
/// not use up the client's ephemeral ports.
pub fn latency_new_connection(addr: SocketAddr, path: &str, requests: usize) -> io::Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(requests);
    for _ in 0..requests {
        let start = Instant::now();
        let mut conn = connect(addr, IO_TIMEOUT)?;
        conn.request(path, true)?;
        let head = conn.response()?;
        expect_ok(&head)?;
        conn.skip_body(&head)?;
        samples.push(micros(start.elapsed()));
        conn.await_close();
    }
    Ok(samples)
}

/// One `GET /bytes/{bytes}` (TCP_NODELAY), the body read to its end with a large buffer;
/// returns the rate in MB/s (10^6 bytes per second) from writing the request to the last byte
/// of the body. Fails when the response is not 200 or its body is not exactly `bytes` long.
pub fn throughput(addr: SocketAddr, bytes: u64) -> io::Result<f64> {
    if bytes == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "a throughput needs at least one byte"));
    }
    let mut conn = connect(addr, IO_TIMEOUT)?;
    let start = Instant::now();
    conn.request(&format!("/bytes/{bytes}"), true)?;
    let head = conn.response()?;
    expect_ok(&head)?;
    if head.length != Some(bytes) {
        return Err(invalid(format!("asked for {bytes} bytes, the response announced {:?}", head.length)));
    }
    conn.skip_body(&head)?;
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    Ok(bytes as f64 / secs / 1e6)
}

/// A connection with the bytes received but not yet consumed.
struct Conn {
    reader: BufReader<TcpStream>,
    /// `addr` as the `Host` header.
    host: String,
}

/// What [`Conn::response`] read of a response head.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    /// The `Content-Length`, if there was one.
    length: Option<u64>,
    /// Whether the server closes the connection after this response.
    close: bool,
}

/// Connects to `addr` with `timeout` for the connect and for every later read and write.
fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Conn> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(Conn { reader: BufReader::with_capacity(64 * 1024, stream), host: addr.to_string() })
}

impl Conn {
    /// Sends `GET path`, with `Connection: close` when `close`.
    fn request(&mut self, path: &str, close: bool) -> io::Result<()> {
        let connection = if close { "Connection: close\r\n" } else { "" };
        let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n{connection}\r\n", self.host);
        self.reader.get_mut().write_all(request.as_bytes())
    }

    /// Reads a response head.
    fn response(&mut self) -> io::Result<Head> {
        read_head(&mut self.reader)
    }

    /// Reads and drops the body `head` announced: exactly `Content-Length` bytes; without one,
    /// nothing for a status that has no body (1xx, 204, 304), else up to the end of a
    /// connection the server closes after this response (one it keeps open, its body's end
    /// unknown, is refused).
    fn skip_body(&mut self, head: &Head) -> io::Result<()> {
        let no_body = head.status < 200 || head.status == 204 || head.status == 304;
        let mut left = match head.length {
            Some(n) => n,
            None if no_body => 0,
            None if head.close => return self.read_to_close(),
            None => return Err(invalid("a kept-alive response without Content-Length")),
        };
        let mut buf = vec![0u8; usize::try_from(left).unwrap_or(usize::MAX).min(BULK_BUFFER)];
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match self.reader.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection ended inside a body"))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            left -= n as u64;
        }
        Ok(())
    }

    /// Reads and drops everything until the server closes the connection.
    fn read_to_close(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut read = 0u64;
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    read += n as u64;
                    if read > MAX_UNSIZED_BODY {
                        return Err(invalid(format!(
                            "a response without Content-Length went on past {} MiB",
                            MAX_UNSIZED_BODY >> 20
                        )));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits (bounded by the read timeout and a few reads) for the server to close.
    fn await_close(mut self) {
        let mut sink = [0u8; 4096];
        for _ in 0..16 {
            match self.reader.read(&mut sink) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

/// Reads a response head: `HTTP/1.x SSS reason`, header lines, an empty line.
fn read_head(r: &mut impl BufRead) -> io::Result<Head> {
    let line = read_line(r)?;
    let (version, rest) = line.split_once(' ').unwrap_or((&line, ""));
    let code = rest.split(' ').next().unwrap_or_default();
    let status = Some(code)
        .filter(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|c| c.parse().ok())
        .filter(|_| matches!(version, "HTTP/1.0" | "HTTP/1.1"))
        .ok_or_else(|| invalid(format!("not an HTTP/1 status line: {line:?}")))?;
    let http10 = version == "HTTP/1.0";
    let (mut length, mut close, mut keep_alive) = (None, false, false);
    for _ in 0..=MAX_HEADERS {
        let line = read_line(r)?;
        if line.is_empty() {
            let close = close || (http10 && !keep_alive);
            return Ok(Head { status, length, close });
        }
        let (name, value) = line.split_once(':').ok_or_else(|| invalid(format!("not a header: {line:?}")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value.parse().map_err(|_| invalid(format!("bad Content-Length {value:?}")))?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid("conflicting Content-Length headers"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid(format!("Transfer-Encoding {value:?} is not supported")));
        } else if name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(str::trim) {
                close |= option.eq_ignore_ascii_case("close");
                keep_alive |= option.eq_ignore_ascii_case("keep-alive");
            }
        }
    }
    Err(invalid(format!("more than {MAX_HEADERS} header lines")))
}

/// Reads one line (CRLF or LF) of at most [`MAX_LINE`] bytes, without its end.
fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    r.take(MAX_LINE + 1).read_until(b'\n', &mut line)?;
    match line.strip_suffix(b"\n") {
        Some(l) => {
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            String::from_utf8(l.to_vec()).map_err(|_| invalid("a response line is not UTF-8"))
        }
        None if line.len() as u64 > MAX_LINE => Err(invalid("a response line is too long")),
        None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection ended inside a response head")),
    }
}

/// A success or a redirect: what a request that is measured must get (an error page would
/// measure the server's error path).
fn expect_ok(head: &Head) -> io::Result<()> {
    if (200..400).contains(&head.status) {
        Ok(())
    } else {
        Err(invalid(format!("status {}, not 2xx or 3xx", head.status)))
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Shutdown, TcpListener};
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// What the test server counted.
    #[derive(Default)]
    struct Counts {
        connections: AtomicUsize,
        requests: AtomicUsize,
        body_bytes: AtomicU64,
    }

    /// Starts a server on 127.0.0.1:0 that speaks like `hello serve` (`GET /bytes/N`: N bytes;
    /// any other `GET`: a greeting; `Connection: close` honoured). It drops its first
    /// `refuse` connections without an answer, as a port forwarder does while nothing listens
    /// behind it.
    fn server(refuse: usize) -> (SocketAddr, Arc<Counts>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let c = Arc::clone(&counts);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let n = c.connections.fetch_add(1, Ordering::SeqCst);
                if n < refuse {
                    continue;
                }
                let c = Arc::clone(&c);
                std::thread::spawn(move || serve_connection(stream, &c));
            }
        });
        (addr, counts)
    }

    fn serve_connection(stream: TcpStream, counts: &Counts) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut out = stream;
        loop {
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if line == "\r\n" {
                    break;
                }
                head.push(line.trim_end().to_owned());
            }
            counts.requests.fetch_add(1, Ordering::SeqCst);
            let target = head[0].split(' ').nth(1).unwrap().to_owned();
            let close = head.iter().any(|h| h.eq_ignore_ascii_case("connection: close"));
            let body = match target.strip_prefix("/bytes/") {
                Some(n) => vec![b'x'; n.parse().unwrap()],
                None => b"hello from twinbox\n".to_vec(),
            };
            let connection = if close { "Connection: close\r\n" } else { "" };
            // One write: a head and body written apart could wait on Nagle and delayed ACKs.
            let mut response =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{connection}\r\n", body.len()).into_bytes();
            response.extend_from_slice(&body);
            // Counted before it is sent, so the count is complete once the client has it all.
            counts.body_bytes.fetch_add(body.len() as u64, Ordering::SeqCst);
            out.write_all(&response).unwrap();
            if close {
                let _ = out.shutdown(Shutdown::Write);
                return;
            }
        }
    }

    #[test]
    fn wait_ready_answers_once_the_server_does() {
        let (addr, counts) = server(3);
        let ready = wait_ready(addr, Duration::from_secs(5)).expect("ready");
        assert!(ready < Duration::from_secs(5));
        assert_eq!(counts.connections.load(Ordering::SeqCst), 4, "3 dropped attempts, then one answered");
        assert_eq!(counts.requests.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn wait_ready_gives_up_on_a_closed_port() {
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let start = Instant::now();
        assert_eq!(wait_ready(addr, Duration::from_millis(100)), None);
        assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    }

    #[test]
    fn keepalive_uses_one_connection() {
        let (addr, counts) = server(0);
        let samples = latency_keepalive(addr, "/", 50).unwrap();
        assert_eq!(samples.len(), 50);
        assert!(samples.iter().all(|&us| us > 0.0), "{samples:?}");
        assert_eq!(counts.connections.load(Ordering::SeqCst), 1);
        assert_eq!(counts.requests.load(Ordering::SeqCst), 50);
    }

    #[test]
    fn new_connection_per_request() {
        let (addr, counts) = server(0);
        let samples = latency_new_connection(addr, "/", 20).unwrap();
        assert_eq!(samples.len(), 20);
        assert!(samples.iter().all(|&us| us > 0.0), "{samples:?}");
        assert_eq!(counts.connections.load(Ordering::SeqCst), 20);
        assert_eq!(counts.requests.load(Ordering::SeqCst), 20);
    }

    /// A server that answers every request as an HTTP/1.0 one: `status`, no Content-Length,
    /// the body up to the connection's end, which it closes (as busybox httpd and other small
    /// servers do).
    fn closing_server(status: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                    line.clear();
                }
                let _ = write!(stream, "HTTP/1.0 {status}\r\nContent-Type: text/html\r\n\r\n<p>hi</p>\n");
                let _ = stream.shutdown(Shutdown::Both);
            }
        });
        addr
    }

    #[test]
    fn a_server_that_closes_every_connection() {
        let addr = closing_server("200 OK");
        assert_eq!(answers(addr, "/", IO_TIMEOUT).unwrap(), 200);
        assert!(!keeps_alive(addr, "/index.html").unwrap());
        let samples = latency_new_connection(addr, "/index.html", 5).unwrap();
        assert_eq!(samples.len(), 5, "bodies read to the connection's end");
        let e = latency_keepalive(addr, "/", 3).unwrap_err();
        assert!(e.to_string().contains("closed a kept-alive connection"), "{e}");
        // Readiness takes any answer; a measurement wants a success.
        let missing = closing_server("404 Not Found");
        assert_eq!(answers(missing, "/nothing", IO_TIMEOUT).unwrap(), 404);
        let e = latency_new_connection(missing, "/nothing", 1).unwrap_err();
        assert!(e.to_string().contains("status 404, not 2xx or 3xx"), "{e}");
    }

    #[test]
    fn throughput_reads_the_whole_body() {
        let (addr, counts) = server(0);
        let bytes = 8 * 1024 * 1024 + 7;
        let rate = throughput(addr, bytes).unwrap();
        assert!(rate > 0.0 && rate.is_finite(), "{rate}");
        assert_eq!(counts.body_bytes.load(Ordering::SeqCst), bytes);
        assert!(throughput(addr, 0).is_err());
    }

    #[test]
    fn heads_parse() {
        let mut r = &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"[..];
        assert_eq!(read_head(&mut r).unwrap(), Head { status: 200, length: Some(5), close: false });
        assert_eq!(r, b"hello");
        let mut r = &b"HTTP/1.1 404 Not Found\nconnection: Close\ncontent-length:0\n\n"[..];
        assert_eq!(read_head(&mut r).unwrap(), Head { status: 404, length: Some(0), close: true });
        let mut r = &b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n"[..];
        assert!(read_head(&mut r).unwrap().close, "HTTP/1.0 closes unless kept alive");
        let mut r = &b"HTTP/1.1 200 OK\r\n\r\n"[..];
        assert_eq!(read_head(&mut r).unwrap(), Head { status: 200, length: None, close: false });
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/2 200\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n",
        ] {
            assert!(read_head(&mut &bad[..]).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}

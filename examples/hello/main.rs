//! The workload of twinbox's built-in default image. Static, with no dependency but the
//! workspace's own probe crate, so the same binary runs as a container's pid 1 on the host
//! kernel and as a VM guest's workload.
//!
//! `hello` greets and says where it runs; `hello true` exits 0 at once; `hello exit N`
//! exits N; `hello sleep SECS` idles; `hello spin N` does N rounds of integer work and
//! prints a checksum; `hello syscalls N` makes N getppid() system calls (the syscall-heavy
//! loop of `twinbox bench`) and prints their sum; either loop followed by `timed` also prints
//! `loop_ns=T`, the loop's own time on the monotonic clock of the kernel it runs on (how
//! `twinbox bench` times the work without the start and exit around it); `hello crash` dies of SIGILL (exit 132), the
//! signal a kernel delivers even to a pid-namespace init; `hello serve PORT` is a tiny HTTP/1.1
//! server on 0.0.0.0:PORT (the `net` scenario's workload): `GET /bytes/N` answers N bytes,
//! any other `GET` a greeting, and it prints `listening on PORT` once the socket is bound; UDP
//! datagrams to the same port are echoed back. `hello disk DIR MIB` measures file I/O in DIR
//! (the `disk` scenario's workload): a MIB-MiB file written sequentially and synced, read back,
//! then random 4 KiB writes each made durable (fdatasync) and random 4 KiB reads, printing
//! `seq_write_mbps=`, `seq_read_mbps=`, `rand_write_iops=`, `rand_write_p99_us=`,
//! `rand_read_iops=` and `rand_read_p99_us=`; the file is removed at the end. `hello isolation`
//! prints one JSON line of what it can reach of the kernel it runs on (`twinbox_probe`: system
//! calls that run, capabilities, device nodes, /proc/sys and /sys/class entries): the
//! `isolation` figures of `twinbox bench`.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("greet") => greet(),
        Some("true") => ExitCode::SUCCESS,
        Some("exit") => ExitCode::from(arg_num(&args, 0) as u8),
        Some("sleep") => {
            std::thread::sleep(Duration::from_secs(arg_num(&args, u64::MAX / 4)));
            ExitCode::SUCCESS
        }
        Some("spin") => timed(&args, spin),
        Some("syscalls") => timed(&args, syscalls),
        Some("crash") => crash(),
        Some("isolation") => {
            println!("{}", twinbox_probe::Surface::measure(&|| false).to_json());
            ExitCode::SUCCESS
        }
        Some("serve") => serve(&args),
        Some("disk") => match disk(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hello: disk: {e}");
                ExitCode::FAILURE
            }
        },
        Some(other) => {
            eprintln!(
                "hello: unknown mode {other:?}; use greet, true, exit N, sleep SECS, spin N, syscalls N, crash, serve PORT or disk DIR MIB"
            );
            ExitCode::from(2)
        }
    }
}

/// Runs `work` with the round count in `args[1]`, prints its result, and with `timed` in
/// `args[2]` the loop's time in nanoseconds.
fn timed(args: &[String], work: fn(u64) -> u64) -> ExitCode {
    let timed = match args.get(2).map(String::as_str) {
        None => false,
        Some("timed") => true,
        Some(other) => {
            eprintln!("hello: unknown option {other:?}; use `timed`");
            return ExitCode::from(2);
        }
    };
    let rounds = arg_num(args, 1_000_000);
    let start = std::time::Instant::now();
    let result = std::hint::black_box(work(std::hint::black_box(rounds)));
    let ns = start.elapsed().as_nanos();
    println!("{result}");
    if timed {
        println!("loop_ns={ns}");
    }
    ExitCode::SUCCESS
}

/// Random 4 KiB writes (each followed by fdatasync) and reads of `hello disk`.
const RANDOM_WRITES: usize = 400;
const RANDOM_READS: usize = 20_000;

/// `hello disk DIR MIB`: see the crate doc.
fn disk(args: &[String]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    use std::time::Instant;
    let dir = args.get(1).map(String::as_str).unwrap_or("/");
    let mib: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64).max(1);
    let path = std::path::Path::new(dir).join(format!("hello-disk-{}.bin", std::process::id()));
    let result = (|| {
        let mut chunk = vec![0x5au8; 1 << 20];
        let mbps = |bytes: u64, t: Duration| bytes as f64 / 1e6 / t.as_secs_f64().max(1e-9);
        let mut f = std::fs::File::create(&path)?;
        let start = Instant::now();
        for i in 0..mib {
            chunk[0] = i as u8;
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        println!("seq_write_mbps={:.1}", mbps(mib << 20, start.elapsed()));
        let mut f = std::fs::File::open(&path)?;
        let start = Instant::now();
        let mut read = 0u64;
        loop {
            match f.read(&mut chunk)? {
                0 => break,
                n => read += n as u64,
            }
        }
        println!("seq_read_mbps={:.1}", mbps(read, start.elapsed()));
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
        let blocks = mib * 256;
        // xorshift64: the same offsets in every backend.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % blocks) * 4096
        };
        let mut block = [0xa5u8; 4096];
        let report = |what: &str, lat: &mut Vec<Duration>, total: Duration| {
            lat.sort();
            let p99 = lat[(lat.len() * 99).div_ceil(100).saturating_sub(1)];
            println!("{what}_iops={:.0}", lat.len() as f64 / total.as_secs_f64().max(1e-9));
            println!("{what}_p99_us={:.1}", p99.as_secs_f64() * 1e6);
        };
        let mut lat = Vec::with_capacity(RANDOM_WRITES);
        let start = Instant::now();
        for i in 0..RANDOM_WRITES {
            block[0] = i as u8;
            let t = Instant::now();
            f.write_all_at(&block, next())?;
            f.sync_data()?;
            lat.push(t.elapsed());
        }
        report("rand_write", &mut lat, start.elapsed());
        let mut lat = Vec::with_capacity(RANDOM_READS);
        let start = Instant::now();
        for _ in 0..RANDOM_READS {
            let t = Instant::now();
            f.read_exact_at(&mut block, next())?;
            lat.push(t.elapsed());
        }
        report("rand_read", &mut lat, start.elapsed());
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    result
}

fn arg_num(args: &[String], default: u64) -> u64 {
    args.get(1).and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn greet() -> ExitCode {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_else(|_| "unknown (no /proc)".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "unknown".into());
    println!("Hello from twinbox!");
    println!("pid {} on kernel {} as host {}", std::process::id(), kernel.trim(), host.trim());
    ExitCode::SUCCESS
}

/// Executes an invalid instruction. The kernel answers with a forced SIGILL, which kills even
/// pid 1 of a pid namespace (signals *sent* to such an init are ignored unless it handles
/// them), so the run reports 128 + 4.
fn crash() -> ExitCode {
    // SAFETY: `ud2` touches no memory and no register; it only raises #UD, which the kernel
    // turns into SIGILL with the default action (terminate), so execution never continues.
    unsafe { std::arch::asm!("ud2", options(nomem, nostack)) };
    ExitCode::FAILURE
}

/// A xorshift loop the optimiser cannot fold away.
fn spin(rounds: u64) -> u64 {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_add(i);
    }
    x
}

/// One getppid() system call per round (std does not cache it), summed so none is skipped.
fn syscalls(rounds: u64) -> u64 {
    (0..rounds).fold(0u64, |acc, _| acc.wrapping_add(u64::from(std::os::unix::process::parent_id())))
}

/// The longest request head (request line and headers) `serve` reads before answering 400.
const MAX_HEAD: usize = 16 * 1024;
/// The buffer `GET /bytes/N` sends its body from, again and again.
const CHUNK: usize = 64 * 1024;
/// The body of every `GET` but `/bytes/N`.
const GREETING: &[u8] = b"hello from twinbox\n";
/// The answer to a request `serve` cannot parse; the connection closes after it.
const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Serves HTTP/1.1 on 0.0.0.0:`args[1]`, one thread per connection, until killed.
fn serve(args: &[String]) -> ExitCode {
    let Some(port) = args.get(1).and_then(|s| s.parse::<u16>().ok()) else {
        eprintln!("hello: serve needs a port number (0-65535)");
        return ExitCode::from(2);
    };
    let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hello: cannot listen on port {port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The bound port, which differs from the one asked for only when that was 0.
    let port = listener.local_addr().map_or(port, |a| a.port());
    // The same port in UDP echoes every datagram back to its sender (for publishing /udp).
    if let Ok(udp) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) {
        drop(std::thread::Builder::new().spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&buf[..n], from);
            }
        }));
    }
    let mut out = io::stdout().lock();
    // A closed stdout must not stop the server, so errors here are ignored.
    let _ = writeln!(out, "listening on {port}");
    let _ = out.flush();
    drop(out);
    loop {
        match listener.accept() {
            // A connection that gets no thread (out of memory or threads) is dropped, closing it.
            Ok((stream, _)) => drop(std::thread::Builder::new().spawn(move || connection(stream))),
            // Out of descriptors, or a connection reset before it was accepted: back off briefly.
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// A request `serve` understood.
struct Request {
    /// N of `GET /bytes/N`; None for any other path.
    bytes: Option<u64>,
    /// Whether the connection stays open after the response.
    keep_alive: bool,
    /// An HTTP/1.0 request, whose keep-alive the response has to confirm.
    http10: bool,
}

/// A request `serve` could not parse.
struct BadRequest;

/// Answers the requests of one connection in order until the client closes it, asks to close
/// it, or sends something unparsable (answered with 400).
fn connection(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    // Bytes received but not yet consumed: the rest of a head, or pipelined requests.
    let mut pending = Vec::new();
    loop {
        match read_request(&mut stream, &mut pending) {
            Ok(Some(request)) => {
                if respond(&mut stream, &request).is_err() {
                    return;
                }
                if !request.keep_alive {
                    return finish(stream);
                }
            }
            Ok(None) => return,
            Err(BadRequest) => {
                let _ = stream.write_all(BAD_REQUEST);
                return finish(stream);
            }
        }
    }
}

/// Reads the next request head from `pending` and the stream and parses it; Ok(None) when the
/// connection ends (or fails) first.
fn read_request(stream: &mut TcpStream, pending: &mut Vec<u8>) -> Result<Option<Request>, BadRequest> {
    let mut chunk = [0u8; 4096];
    loop {
        // Empty lines before a request line are to be ignored (RFC 9112, section 2.2).
        let blank = pending.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
        pending.drain(..blank);
        if let Some(end) = head_end(pending) {
            if end > MAX_HEAD {
                return Err(BadRequest);
            }
            let request = parse_request(&pending[..end]);
            pending.drain(..end);
            return request.map(Some);
        }
        if pending.len() >= MAX_HEAD {
            return Err(BadRequest);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(None),
        }
    }
}

/// Where the head in `buf` ends: just past the empty line after the headers (CRLF line ends,
/// or bare LF, which RFC 9112 allows a recipient to accept).
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.iter().enumerate().filter(|&(_, &b)| b == b'\n').find_map(|(i, _)| match &buf[i + 1..] {
        [b'\n', ..] => Some(i + 2),
        [b'\r', b'\n', ..] => Some(i + 3),
        _ => None,
    })
}

/// Parses a request head: `GET TARGET HTTP/1.x`, then `Name: value` lines. Only GET is served;
/// a request that announces a body is answered, and then the connection is closed rather
/// than reading the body.
fn parse_request(head: &[u8]) -> Result<Request, BadRequest> {
    let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let line = std::str::from_utf8(lines.next().ok_or(BadRequest)?).map_err(|_| BadRequest)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BadRequest);
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(BadRequest),
    };
    if method != "GET" || target.is_empty() {
        return Err(BadRequest);
    }
    let (mut close, mut keep_alive, mut body) = (false, false, false);
    for line in lines.filter(|l| !l.is_empty()) {
        let colon = line.iter().position(|&b| b == b':').ok_or(BadRequest)?;
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.is_empty() || name.iter().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(BadRequest);
        }
        if name.eq_ignore_ascii_case(b"connection") {
            for option in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                close |= option.eq_ignore_ascii_case(b"close");
                keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            body |= value != b"0";
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            body = true;
        }
    }
    let path = target.split('?').next().unwrap_or(target);
    let bytes = path
        .strip_prefix("/bytes/")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok());
    let keep_alive = !close && !body && (keep_alive || !http10);
    Ok(Request { bytes, keep_alive, http10 })
}

/// Writes the 200 response to `request`: N bytes for `/bytes/N`, the greeting otherwise.
fn respond(stream: &mut TcpStream, request: &Request) -> io::Result<()> {
    let (kind, length) = match request.bytes {
        Some(n) => ("application/octet-stream", n),
        None => ("text/plain", GREETING.len() as u64),
    };
    let connection = match (request.keep_alive, request.http10) {
        (false, _) => "Connection: close\r\n",
        (true, true) => "Connection: keep-alive\r\n",
        (true, false) => "",
    };
    let mut response =
        format!("HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {length}\r\n{connection}\r\n").into_bytes();
    let Some(n) = request.bytes else {
        response.extend_from_slice(GREETING);
        return stream.write_all(&response);
    };
    // The head goes out with the first chunk, the rest of the body from the same buffer.
    let chunk = vec![b'x'; n.min(CHUNK as u64) as usize];
    response.extend_from_slice(&chunk);
    stream.write_all(&response)?;
    let mut left = n - chunk.len() as u64;
    while left > 0 {
        let now = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..now])?;
        left -= now as u64;
    }
    Ok(())
}

/// Closes a connection after its last response: the sending side first, so the client reads
/// the whole response and then EOF; then what the client still sends is read and dropped
/// (briefly, and bounded), since closing with unread data would reset the connection and could
/// destroy the response on its way.
fn finish(stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut sink = [0u8; 4096];
    for _ in 0..64 {
        match (&stream).read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

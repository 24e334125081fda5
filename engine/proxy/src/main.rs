//! `twinbox-proxy container-proxy IP PORT…`: the port proxy of one container (see the engine's
//! `network::publish`). Started by the engine with the container init's pidfd as descriptor 3
//! and the bound host sockets as descriptors 4, 5, … (one per PORT, in order). It holds them,
//! so the ports stay reserved while the container lives, and forwards each TCP connection that
//! reaches it to IP:PORT (the engine's DNAT rules normally take connections past it; it
//! forwards when they could not be made). A UDP socket is only held. It exits once the init
//! has ended (the pidfd becomes readable), so a SIGKILLed twinbox leaves no proxy behind.
//!
//! Small on purpose: std only, linked static and position-dependent, so the pages of its code
//! are shared clean file pages and what each proxy costs is its own stacks and heap.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Connections one published port carries at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 512;

/// Stack of each thread: a copy loop needs little, and each proxy's threads are its memory.
const STACK: usize = 64 << 10;

const POLLIN: i16 = 1;
const SOL_SOCKET: i32 = 1;
const SO_TYPE: i32 = 3;
const SOCK_DGRAM: i32 = 2;
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;
const ENOBUFS: i32 = 105;
const ENOMEM: i32 = 12;

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

extern "C" {
    fn poll(fds: *mut PollFd, n: u64, timeout: i32) -> i32;
    fn getsockopt(fd: i32, level: i32, name: i32, value: *mut core::ffi::c_void, len: *mut u32) -> i32;
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.split_first() {
        Some((mode, rest)) if mode == "container-proxy" && rest.len() >= 2 => {
            let ip = rest[0].parse::<Ipv4Addr>().ok();
            let ports: Option<Vec<u16>> = rest[1..].iter().map(|p| p.parse().ok()).collect();
            ip.zip(ports)
        }
        _ => None,
    };
    let Some((ip, ports)) = parsed else {
        eprintln!("usage: twinbox-proxy container-proxy IP PORT... (started by twinbox, with descriptors 3, 4, ...)");
        std::process::exit(1);
    };
    if let Err(e) = run(ip, &ports) {
        eprintln!("twinbox-proxy: forwarding published ports: {e}");
        std::process::exit(125);
    }
}

/// With the init's pidfd as descriptor 3 and the listeners as 4, 5, … (in `ports` order),
/// forwards each listener to `target`:its port until the init ends.
fn run(target: Ipv4Addr, ports: &[u16]) -> io::Result<()> {
    // SAFETY: the engine passed the pidfd as descriptor 3; it is taken over once.
    let pidfd = unsafe { OwnedFd::from_raw_fd(3) };
    let mut held = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        // SAFETY: the engine passed the sockets as descriptors 4.. in this order; each is
        // taken over once.
        let fd = unsafe { OwnedFd::from_raw_fd(4 + i as i32) };
        if socket_type(&fd)? == SOCK_DGRAM {
            held.push(fd);
            continue;
        }
        let listener = TcpListener::from(fd);
        let to = SocketAddr::new(IpAddr::V4(target), port);
        std::thread::Builder::new().stack_size(STACK).spawn(move || accept_loop(listener, to))?;
    }
    let mut fds = [PollFd { fd: pidfd.as_raw_fd(), events: POLLIN, revents: 0 }];
    loop {
        // SAFETY: poll reads and writes the one PollFd of a live array.
        if unsafe { poll(fds.as_mut_ptr(), 1, -1) } > 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// SO_TYPE of socket `fd`.
fn socket_type(fd: &OwnedFd) -> io::Result<i32> {
    let mut kind: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as u32;
    // SAFETY: getsockopt writes at most `len` bytes into `kind`, a live i32, and the length
    // into `len`.
    let r = unsafe { getsockopt(fd.as_raw_fd(), SOL_SOCKET, SO_TYPE, (&mut kind as *mut i32).cast(), &mut len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(kind)
}

fn accept_loop(listener: TcpListener, to: SocketAddr) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let client = match listener.accept() {
            Ok((c, _)) => c,
            // Out of descriptors or memory: wait for connections to end, not spin.
            Err(e) if matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM)) => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(_) => continue,
        };
        open.fetch_add(1, Ordering::Relaxed);
        let spawned = std::thread::Builder::new().stack_size(STACK).spawn({
            let open = Arc::clone(&open);
            move || {
                forward(client, to);
                open.fetch_sub(1, Ordering::Relaxed);
            }
        });
        if spawned.is_err() {
            // The connection (moved into the closure) is closed; the count goes back.
            open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One connection: to the container's port, then both directions until both end.
fn forward(client: TcpStream, to: SocketAddr) {
    let Ok(server) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { return };
    if let Ok(up) = std::thread::Builder::new().stack_size(STACK).spawn(move || pipe(c2, s2)) {
        pipe(server, client);
        let _ = up.join();
    }
}

/// Copies `from` to `to` until `from` ends, then half-closes `to`.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

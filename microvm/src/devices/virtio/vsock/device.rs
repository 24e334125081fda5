//! The socket device: connections between guest ports and UNIX sockets, and the I/O thread
//! that moves host data and replies into the receive queue.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use super::{
    op, parse_connect, shutdown, Header, VsockError, CONN_BUFFER, HEADER_LEN, HOST_CID, MAX_CONNECTIONS,
    MAX_CONNECT_LINE, QUEUE_SIZES, RX_QUEUE, TX_QUEUE, TYPE_STREAM, VIRTIO_ID_VSOCK,
};
use super::{EVENT_QUEUE, EVENT_TRANSPORT_RESET};
use crate::devices::virtio::{MmioTransport, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};

/// The largest payload of one packet to the guest.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Host-side ports of host-initiated connections count up from here (Firecracker's habit of a
/// range the guest's own services do not use).
const FIRST_HOST_PORT: u32 = 1 << 30;

/// A host process connected to the device's UNIX socket, not yet past its `CONNECT` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// One connection, keyed by (host port, guest port).
#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    /// Host-initiated, waiting for the guest's RESPONSE.
    connecting: bool,
    /// To write to the UNIX socket: first `ok_len` bytes of `OK <port>\n`, then the guest's
    /// data the socket has not taken yet.
    pending: Vec<u8>,
    ok_len: usize,
    /// The guest's data passed to the UNIX socket (our `fwd_cnt`).
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    told_fwd_cnt: u32,
    /// What the guest buffers, and how much of ours it has passed on.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// The host side will send nothing more (end of file, told to the guest).
    host_eof: bool,
    /// The guest will send nothing more: the socket's write side closes once `pending` is out.
    guest_eof: bool,
    /// The guest shut both ways: the connection is reset once `pending` is out.
    closing: bool,
}

impl Conn {
    fn new(stream: UnixStream, connecting: bool) -> Self {
        Conn {
            stream,
            connecting,
            pending: Vec::new(),
            ok_len: 0,
            fwd_cnt: 0,
            told_fwd_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            host_eof: false,
            guest_eof: false,
            closing: false,
        }
    }

    /// How many more bytes the guest can take.
    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn readable(&self) -> bool {
        !self.connecting && !self.host_eof && self.credit() > 0
    }

    /// Writes what is pending to the socket; false when the socket failed (the connection is
    /// to be reset).
    fn flush(&mut self) -> bool {
        while !self.pending.is_empty() {
            match self.stream.write(&self.pending) {
                Ok(0) => return false,
                Ok(n) => {
                    let ok = n.min(self.ok_len);
                    self.ok_len -= ok;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - ok) as u32);
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if self.guest_eof {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        true
    }
}

/// A virtio socket device whose host side is UNIX sockets.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    handshakes: Vec<Handshake>,
    conns: BTreeMap<(u32, u32), Conn>,
    /// Headers without data for the guest: requests, responses, resets, credit.
    control: VecDeque<Header>,
    next_port: u32,
    /// Where the last round of reads stopped, so every connection gets its turn.
    cursor: (u32, u32),
    rx_starved: bool,
    active: bool,
    /// The I/O thread is the one running the receive queue now.
    serving: bool,
    kick: Arc<EventFd>,
    buf: Vec<u8>,
    /// After a restore, until the driver has taken the transport reset in (it reads the CID
    /// again when it does): host processes wait before their `CONNECT` goes to the guest,
    /// which would otherwise reset their new connection along with the old ones.
    reset_pending: AtomicBool,
}

impl Vsock {
    /// A device for guest `cid`, listening on `uds_path` (which must not exist).
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&cid) {
            return Err(VsockError::Cid(cid));
        }
        let listen = |source| VsockError::Listen { path: uds_path.to_owned(), source };
        let listener = UnixListener::bind(uds_path).map_err(listen)?;
        // Whoever connects runs processes in the guest as its agent does: the VMM's user only.
        std::fs::set_permissions(uds_path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(listen)?;
        listener.set_nonblocking(true).map_err(listen)?;
        Ok(Vsock {
            cid,
            uds_path: uds_path.to_owned(),
            listener,
            handshakes: Vec::new(),
            conns: BTreeMap::new(),
            control: VecDeque::new(),
            next_port: FIRST_HOST_PORT,
            cursor: (0, 0),
            rx_starved: true,
            active: false,
            serving: false,
            kick: Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VsockError::EventFd)?),
            buf: vec![0; MAX_PAYLOAD],
            reset_pending: AtomicBool::new(false),
        })
    }

    /// The UNIX socket host processes connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Connections open now (host-initiated ones still waiting for the guest included).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// A header from the host's side of connection `key` to the guest.
    fn header(&self, key: (u32, u32), op: u16, flags: u32, len: u32) -> Header {
        let fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUFFER,
            fwd_cnt,
        }
    }

    fn reset(&mut self, key: (u32, u32)) {
        self.conns.remove(&key);
        let h = self.header(key, op::RST, 0, 0);
        self.control.push_back(h);
    }

    fn kick(&self) {
        let _ = self.kick.write(1);
    }

    /// One packet from the guest.
    fn handle_tx(&mut self, h: Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        if h.dst_cid != HOST_CID || h.src_cid != self.cid || h.kind != TYPE_STREAM {
            if h.op != op::RST {
                tracing::debug!(?h, "vsock packet not for the host or not a stream, reset");
                let mut rst = self.header(key, op::RST, 0, 0);
                rst.kind = h.kind;
                self.control.push_back(rst);
            }
            return;
        }
        if h.op == op::REQUEST {
            self.connect_to_host(key);
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.peer_buf_alloc = h.buf_alloc;
                conn.peer_fwd_cnt = h.fwd_cnt;
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if h.op != op::RST {
                self.reset(key);
            }
            return;
        };
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        let alive = match h.op {
            op::RESPONSE if conn.connecting => {
                conn.connecting = false;
                let ok = format!("OK {}\n", key.0);
                conn.ok_len = ok.len();
                conn.pending.splice(0..0, ok.into_bytes());
                conn.flush()
            }
            op::RW if !conn.connecting && !conn.guest_eof => {
                if conn.pending.len() - conn.ok_len + payload.len() > CONN_BUFFER as usize {
                    tracing::debug!(port = key.1, "the guest sent beyond its credit, reset");
                    false
                } else {
                    conn.pending.extend_from_slice(payload);
                    conn.flush()
                }
            }
            op::CREDIT_UPDATE => true,
            op::CREDIT_REQUEST => {
                let h = self.header(key, op::CREDIT_UPDATE, 0, 0);
                self.control.push_back(h);
                true
            }
            op::SHUTDOWN => {
                if h.flags & shutdown::SEND != 0 {
                    conn.guest_eof = true;
                }
                if h.flags & (shutdown::RCV | shutdown::SEND) == shutdown::RCV | shutdown::SEND {
                    // Both ways: reset once what the guest sent has reached the socket (the
                    // I/O thread's flush finishes it when the socket is slow).
                    conn.closing = true;
                    conn.flush() && !conn.pending.is_empty()
                } else {
                    conn.flush()
                }
            }
            op::RST => {
                self.conns.remove(&key);
                return;
            }
            _ => false,
        };
        if !alive {
            self.reset(key);
            return;
        }
        self.tell_credit(key);
    }

    /// Tells the guest about room the socket made on connection `key` (a CREDIT_UPDATE), once
    /// it is worth a packet: a quarter of the buffer, or everything it sent passed on. Linux
    /// waits for this rather than asking when it has run out of credit.
    fn tell_credit(&mut self, key: (u32, u32)) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        let untold = conn.fwd_cnt.wrapping_sub(conn.told_fwd_cnt);
        if untold >= CONN_BUFFER / 4 || (untold > 0 && conn.pending.len() == conn.ok_len) {
            conn.told_fwd_cnt = conn.fwd_cnt;
            let h = self.header(key, op::CREDIT_UPDATE, 0, 0);
            self.control.push_back(h);
        }
    }

    /// The guest connects to host port `key.0`: the UNIX socket `<uds_path>_<port>`.
    fn connect_to_host(&mut self, key: (u32, u32)) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.reset(key);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.0));
        match connect_nonblocking(std::path::Path::new(&path)) {
            Ok(stream) => {
                self.conns.insert(key, Conn::new(stream, false));
                let h = self.header(key, op::RESPONSE, 0, 0);
                self.control.push_back(h);
            }
            Err(e) => {
                tracing::debug!(path = ?path, error = %e, "guest connection to the host refused");
                self.reset(key);
            }
        }
    }

    /// New host processes, and the `CONNECT` lines of those that wrote theirs.
    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        self.handshakes.push(Handshake { stream, line: Vec::new() });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if self.reset_pending.load(Ordering::SeqCst) {
            return;
        }
        let mut i = 0;
        while i < self.handshakes.len() {
            let hs = &mut self.handshakes[i];
            let mut byte = [0u8; 1];
            // Byte by byte: what follows the line is the connection's, for the guest.
            let done = loop {
                match hs.stream.read(&mut byte) {
                    Ok(0) => break Some(None),
                    Ok(_) if byte[0] == b'\n' => {
                        break Some(std::str::from_utf8(&hs.line).ok().and_then(parse_connect))
                    }
                    Ok(_) if hs.line.len() >= MAX_CONNECT_LINE => break Some(None),
                    Ok(_) => hs.line.push(byte[0]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                    Err(_) => break Some(None),
                }
            };
            match done {
                None => i += 1,
                Some(port) => {
                    let hs = self.handshakes.swap_remove(i);
                    match port {
                        Some(port) if self.conns.len() < MAX_CONNECTIONS => {
                            let key = (self.next_port, port);
                            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
                            self.conns.insert(key, Conn::new(hs.stream, true));
                            let h = self.header(key, op::REQUEST, 0, 0);
                            self.control.push_back(h);
                        }
                        // A malformed line (or too many connections): the socket closes.
                        _ => drop(hs),
                    }
                }
            }
        }
    }

    /// Writes pending data to every socket that takes it; resets the connections whose
    /// socket failed.
    fn flush_all(&mut self) {
        let mut done = Vec::new();
        let mut flushed = Vec::new();
        for (key, c) in self.conns.iter_mut() {
            if c.pending.is_empty() {
                continue;
            }
            if !c.flush() || (c.closing && c.pending.is_empty()) {
                done.push(*key);
            } else {
                flushed.push(*key);
            }
        }
        for key in done {
            self.reset(key);
        }
        for key in flushed {
            self.tell_credit(key);
        }
    }

    /// Reads from the next connection with data and credit into `self.buf` (at most `room`
    /// bytes): the connection and the length, or None when no socket has anything. A socket at
    /// its end makes a SHUTDOWN for the guest.
    fn read_some(&mut self, room: usize) -> Option<((u32, u32), usize)> {
        let keys: Vec<(u32, u32)> = self
            .conns
            .range((std::ops::Bound::Excluded(self.cursor), std::ops::Bound::Unbounded))
            .chain(self.conns.range(..=self.cursor))
            .filter(|(_, c)| c.readable())
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let conn = self.conns.get_mut(&key).expect("listed above");
            let n = room.min(conn.credit() as usize).min(self.buf.len());
            match conn.stream.read(&mut self.buf[..n]) {
                Ok(0) => {
                    conn.host_eof = true;
                    let h = self.header(key, op::SHUTDOWN, shutdown::RCV | shutdown::SEND, 0);
                    self.control.push_back(h);
                }
                Ok(n) => {
                    self.cursor = key;
                    return Some((key, n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.reset(key),
            }
        }
        None
    }

    /// Everything the host side has for the guest, into receive buffers, until the buffers or
    /// the news run out.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<usize, VirtioError> {
        self.accept();
        self.flush_all();
        let mut used = 0;
        loop {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // Starved only if there is something to say.
                self.rx_starved = !self.control.is_empty() || self.conns.values().any(Conn::readable);
                return Ok(used);
            };
            let head = chain.head_index();
            let room: usize = chain.clone().writable().map(|d| d.len() as usize).sum();
            let packet = if let Some(h) = self.control.pop_front() {
                Some((h, 0))
            } else if room > HEADER_LEN {
                self.read_some(room - HEADER_LEN).map(|(key, n)| {
                    let conn = self.conns.get_mut(&key).expect("read from it");
                    conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                    conn.told_fwd_cnt = conn.fwd_cnt;
                    (self.header(key, op::RW, 0, n as u32), n)
                })
            } else {
                None
            };
            // A SHUTDOWN or reset made while reading goes out in this buffer.
            let packet = packet.or_else(|| self.control.pop_front().map(|h| (h, 0)));
            let Some((h, n)) = packet else {
                queue.go_to_previous_position();
                self.rx_starved = false;
                return Ok(used);
            };
            let len = match write_packet(chain, mem, &h, &self.buf[..n]) {
                Some(len) => len,
                None => {
                    tracing::debug!("vsock receive buffer too small or outside guest memory; packet dropped");
                    0
                }
            };
            queue.add_used(mem, head, len).map_err(|source| VirtioError::UsedRing { queue: RX_QUEUE, source })?;
            used += 1;
        }
    }

    /// Every packet the guest queued.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<usize, VirtioError> {
        let mut used = 0;
        let mut packet = Vec::new();
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match read_packet(chain, mem, &mut packet) {
                Some(h) => self.handle_tx(h, &packet[HEADER_LEN..]),
                None => tracing::debug!("malformed vsock packet from the guest, dropped"),
            }
            queue.add_used(mem, head, 0).map_err(|source| VirtioError::UsedRing { queue: TX_QUEUE, source })?;
            used += 1;
        }
        if used > 0 {
            // Replies, or connections whose state changed: the I/O thread looks again.
            self.kick();
        }
        Ok(used)
    }

    /// The descriptors the receive thread waits on, and for what.
    fn poll_set(&self) -> Vec<libc::pollfd> {
        let fd = |fd: RawFd, events: libc::c_short| libc::pollfd { fd, events, revents: 0 };
        let mut set = vec![fd(self.listener.as_raw_fd(), libc::POLLIN)];
        if !self.reset_pending.load(Ordering::SeqCst) {
            set.extend(self.handshakes.iter().map(|h| fd(h.stream.as_raw_fd(), libc::POLLIN)));
        }
        for c in self.conns.values() {
            let mut events = 0;
            if c.readable() && !self.rx_starved {
                events |= libc::POLLIN;
            }
            if !c.pending.is_empty() {
                events |= libc::POLLOUT;
            }
            if events != 0 {
                set.push(fd(c.stream.as_raw_fd(), events));
            }
        }
        set
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// The header and payload of a packet from the guest (readable descriptors, in order), into
/// `out`; None when it is shorter than a header, its payload is not all there, or it is larger
/// than a connection's buffer.
fn read_packet(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap, out: &mut Vec<u8>) -> Option<Header> {
    out.clear();
    for desc in chain.readable() {
        let len = desc.len() as usize;
        if out.len() + len > HEADER_LEN + CONN_BUFFER as usize {
            return None;
        }
        let start = out.len();
        out.resize(start + len, 0);
        mem.read_slice(&mut out[start..], desc.addr()).ok()?;
    }
    let h = Header::parse(out.get(..HEADER_LEN)?.try_into().ok()?);
    out.truncate(HEADER_LEN.checked_add(h.len as usize)?);
    (out.len() == HEADER_LEN + h.len as usize).then_some(h)
}

/// Writes header `h` and `payload` into the device-writable buffers of `chain`; the length
/// written, or None when they do not fit.
fn write_packet(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    h: &Header,
    payload: &[u8],
) -> Option<u32> {
    let head = h.bytes();
    let mut parts = [&head[..], payload];
    let total = HEADER_LEN + payload.len();
    let mut done = 0usize;
    for desc in chain.writable() {
        let mut at = desc.addr();
        let mut room = desc.len() as usize;
        for part in parts.iter_mut() {
            if room == 0 {
                break;
            }
            let n = part.len().min(room);
            if n == 0 {
                continue;
            }
            mem.write_slice(&part[..n], at).ok()?;
            at = at.checked_add(n as u64)?;
            room -= n;
            done += n;
            *part = &part[n..];
        }
        if done == total {
            break;
        }
    }
    (done == total).then_some(total as u32)
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        if self.reset_pending.swap(false, Ordering::SeqCst) {
            // The driver took the transport reset in: the waiting host processes go ahead.
            self.kick();
        }
        // guest_cid, le64; nothing else.
        let cid = self.cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *byte = at.and_then(|at| cid.get(at)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, _features: u64) {
        self.active = true;
        self.rx_starved = false;
        self.kick();
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<usize, VirtioError> {
        match index {
            RX_QUEUE => {
                let used = self.receive(queue, mem)?;
                // The guest gave buffers: the thread watches the sockets again (it makes its
                // set anew after each of its own rounds, so it needs no kick from those).
                if !self.serving {
                    self.kick();
                }
                Ok(used)
            }
            TX_QUEUE => self.transmit(queue, mem),
            _ => Ok(0),
        }
    }

    /// After a restore no connection of the snapshot exists on this side: the driver is told
    /// with a transport reset on the event queue (as Firecracker does), which resets the
    /// guest's connected sockets; its listening ones stay.
    fn restored(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(queue) = queues.get_mut(EVENT_QUEUE) else { return false };
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            tracing::warn!("vsock: no event buffer after a restore; the guest keeps its dead connections");
            return false;
        };
        let head = chain.head_index();
        let written = chain
            .writable()
            .next()
            .filter(|d| d.len() >= 4)
            .and_then(|d| mem.write_slice(&EVENT_TRANSPORT_RESET.to_le_bytes(), d.addr()).ok())
            .map_or(0, |()| 4);
        if let Err(e) = queue.add_used(mem, head, written) {
            tracing::warn!(error = %e, "vsock: cannot hand the transport reset to the guest");
            return false;
        }
        self.reset_pending.store(true, Ordering::SeqCst);
        true
    }

    fn reset(&mut self) {
        self.reset_pending.store(false, Ordering::SeqCst);
        self.conns.clear();
        self.handshakes.clear();
        self.control.clear();
        self.active = false;
        self.rx_starved = true;
    }
}

/// What the receive thread needs, taken before the VM runs.
#[derive(Debug)]
pub struct RxLoop {
    kick: Arc<EventFd>,
    stop: Arc<EventFd>,
}

impl RxLoop {
    /// The thread's handles for the device in `transport`; `stop` ends it.
    pub fn new<T: Trigger>(transport: &MmioTransport<Vsock, T>, stop: Arc<EventFd>) -> Self {
        RxLoop { kick: transport.device().kick.clone(), stop }
    }
}

/// The receive thread: waits for a host process, host data, room in a socket, a kick (the
/// guest gave buffers, or the device has replies), or `stop`; then has the transport run the
/// receive queue, which raises the interrupt.
pub fn rx_loop<T: Trigger>(transport: &Mutex<MmioTransport<Vsock, T>>, handles: &RxLoop) {
    loop {
        let (mut set, active) = {
            let t = transport.lock().unwrap_or_else(|e| e.into_inner());
            (t.device().poll_set(), t.device().active)
        };
        if !active {
            set.clear();
        }
        set.push(libc::pollfd { fd: handles.kick.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        set.push(libc::pollfd { fd: handles.stop.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        // SAFETY: poll reads and writes only the `set.len()` pollfd structs of `set`. A socket
        // the vCPU thread closes meanwhile is at worst a spurious wake-up (POLLNVAL), after
        // which the set is made again.
        let rc = unsafe { libc::poll(set.as_mut_ptr(), set.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!(error = %e, "vsock receive thread cannot wait; the guest hears nothing more");
            return;
        }
        let n = set.len();
        if set[n - 1].revents != 0 {
            return;
        }
        if set[n - 2].revents != 0 {
            let _ = handles.kick.read();
        }
        if set.iter().any(|p| p.revents != 0) {
            let mut t = transport.lock().unwrap_or_else(|e| e.into_inner());
            t.device_mut().serving = true;
            if !t.process(RX_QUEUE) {
                t.device_mut().rx_starved = true;
            }
            t.device_mut().serving = false;
        }
    }
}

/// Connects to the UNIX socket at `path` without waiting: a listener whose backlog is full
/// refuses (EAGAIN) instead of holding up the device, which serves every connection.
fn connect_nonblocking(path: &std::path::Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    let addr = UnixAddr::new(path)?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::mmio::tests::*;
    use crate::devices::virtio::mmio::CONFIG_SPACE;
    use crate::devices::virtio::status;

    const RXQ_AT: u64 = 0x1000;
    const TXQ_AT: u64 = 0x4000;
    const EVQ_AT: u64 = 0x7000;
    const TX_PACKET: u64 = 0x1_0000;
    const RX_BUFS: u64 = 0x2_0000;
    const RX_BUF_LEN: u32 = HEADER_LEN as u32 + 4096;
    const LEN: u16 = 16;
    const CID: u64 = 3;

    type Transport = MmioTransport<Vsock, CountingTrigger>;

    struct Guest<'m> {
        mem: &'m GuestMemoryMmap,
        rxq: MockSplitQueue<'m, GuestMemoryMmap>,
        txq: MockSplitQueue<'m, GuestMemoryMmap>,
        /// Used receive entries read so far.
        seen: u16,
        /// Transmit descriptors given so far.
        sent: u16,
    }

    impl Guest<'_> {
        /// Gives `n` receive buffers, starting at descriptor `first`.
        fn give_rx(&self, first: u16, n: u16) {
            let bufs: Vec<RawDescriptor> = (first..first + n)
                .map(|i| {
                    let addr = RX_BUFS + u64::from(i) * u64::from(RX_BUF_LEN);
                    RawDescriptor::from(Descriptor::new(addr, RX_BUF_LEN, VRING_DESC_F_WRITE as u16, 0))
                })
                .collect();
            self.rxq.add_desc_chains(&bufs, first).unwrap();
        }

        /// The packets the device put in the receive queue since the last call.
        fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
            let mut out = Vec::new();
            let used = self.rxq.used().idx().load();
            while self.seen != used {
                let elem = self.rxq.used().ring().ref_at(usize::from(self.seen % LEN)).unwrap().load();
                let addr = RX_BUFS + u64::from(elem.id()) * u64::from(RX_BUF_LEN);
                let mut bytes = vec![0u8; elem.len() as usize];
                self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
                let h = Header::parse(bytes[..HEADER_LEN].try_into().unwrap());
                out.push((h, bytes[HEADER_LEN..].to_vec()));
                self.seen = self.seen.wrapping_add(1);
            }
            out
        }

        /// Sends one packet from guest port `src` to host port `dst`.
        fn send(&mut self, t: &Mutex<Transport>, src: u32, dst: u32, op: u16, flags: u32, payload: &[u8]) {
            let h = Header {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port: src,
                dst_port: dst,
                len: payload.len() as u32,
                kind: TYPE_STREAM,
                op,
                flags,
                buf_alloc: 65536,
                fwd_cnt: 0,
            };
            let mut bytes = h.bytes().to_vec();
            bytes.extend_from_slice(payload);
            let addr = TX_PACKET + u64::from(self.sent % LEN) * 0x1000;
            self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
            let desc = RawDescriptor::from(Descriptor::new(addr, bytes.len() as u32, 0, 0));
            self.txq.add_desc_chains(&[desc], self.sent % LEN).unwrap();
            self.sent += 1;
            t.lock().unwrap().w(R_QUEUE_NOTIFY, TX_QUEUE as u32);
        }
    }

    /// Waits (bounded) until the guest has received packets other than credit updates (which
    /// the device sends as the host side drains); returns them.
    fn wait_received(g: &mut Guest<'_>) -> Vec<(Header, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut got = g.received();
            got.retain(|(h, _)| h.op != op::CREDIT_UPDATE);
            if !got.is_empty() || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn read_line(s: &mut UnixStream) -> String {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        String::from_utf8(line).unwrap()
    }

    fn read_exact(s: &mut UnixStream, n: usize) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).unwrap();
        buf
    }

    /// Both directions of Firecracker's host side, over mock queues and real UNIX sockets in a
    /// temporary directory: a host process's CONNECT, the guest's RESPONSE and the `OK` line,
    /// data both ways (the host's through the receive thread), a guest connection to a host
    /// listener, a refused one, the host closing its end, and the socket gone with the device.
    #[test]
    fn a_restored_device_tells_the_guest_its_connections_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let evq = MockSplitQueue::create(&mem, GuestAddress(EVQ_AT), LEN);
        let event_buf = 0x3_0000;
        mem.write_slice(&[0xff; 8], GuestAddress(event_buf)).unwrap();
        let desc = RawDescriptor::from(Descriptor::new(event_buf, 8, VRING_DESC_F_WRITE as u16, 0));
        evq.add_desc_chains(&[desc], 0).unwrap();
        let mut queues = [Queue::new(LEN).unwrap(), Queue::new(LEN).unwrap(), evq.create_queue().unwrap()];
        let mut dev = Vsock::new(CID, &dir.path().join("v.sock")).unwrap();
        assert!(dev.restored(&mut queues, &mem), "it used a buffer");
        assert_eq!(evq.used().idx().load(), 1);
        let used = evq.used().ring().ref_at(0).unwrap().load();
        assert_eq!((used.id(), used.len()), (0, 4));
        let mut event = [0u8; 8];
        mem.read_slice(&mut event, GuestAddress(event_buf)).unwrap();
        assert_eq!(event, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff], "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, 4 bytes");
        // Host processes wait until the driver read the CID again, as it does on the event.
        assert!(dev.reset_pending.load(Ordering::SeqCst));
        let _host = std::os::unix::net::UnixStream::connect(dir.path().join("v.sock")).unwrap();
        assert_eq!(dev.poll_set().len(), 1, "only the listener is watched");
        dev.accept();
        assert_eq!(dev.handshakes.len(), 1);
        dev.read_config(0, &mut [0u8; 8]);
        assert_eq!(dev.poll_set().len(), 2, "the handshake is watched again");
        // No buffer left: nothing used, nothing raised.
        assert!(!dev.restored(&mut queues, &mem));
    }

    #[test]
    fn host_and_guest_connections() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        assert!(matches!(Vsock::new(2, &uds), Err(VsockError::Cid(2))));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let trigger = CountingTrigger::default();
        let mut t = MmioTransport::new(Vsock::new(CID, &uds).unwrap(), trigger.clone(), mem.clone());
        let mut g = Guest {
            mem: &mem,
            rxq: MockSplitQueue::create(&mem, GuestAddress(RXQ_AT), LEN),
            txq: MockSplitQueue::create(&mem, GuestAddress(TXQ_AT), LEN),
            seen: 0,
            sent: 0,
        };
        let evq = MockSplitQueue::create(&mem, GuestAddress(EVQ_AT), LEN);
        assert_eq!(t.r(R_DEVICE_ID), VIRTIO_ID_VSOCK);
        assert_eq!(negotiate(&mut t, VIRTIO_F_VERSION_1) & status::FEATURES_OK, status::FEATURES_OK);
        assert_eq!(t.r(CONFIG_SPACE), CID as u32);
        for (i, q) in [&g.rxq, &g.txq, &evq].into_iter().enumerate() {
            setup_queue(&mut t, i as u32, LEN, q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0);
        }
        t.w(R_STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        let t = Arc::new(Mutex::new(t));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&uds).unwrap().permissions().mode() & 0o777, 0o600, "the VMM's user only");

        // Host → guest: CONNECT, the guest's REQUEST, RESPONSE, OK.
        let mut host = UnixStream::connect(&uds).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        g.give_rx(0, 8);
        t.lock().unwrap().w(R_QUEUE_NOTIFY, RX_QUEUE as u32);
        let got = g.received();
        assert_eq!(got.len(), 1, "{got:?}");
        let req = got[0].0;
        assert_eq!((req.op, req.src_cid, req.dst_cid, req.dst_port), (op::REQUEST, HOST_CID, CID, 52));
        let host_port = req.src_port;
        g.send(&t, 52, host_port, op::RESPONSE, 0, b"");
        assert_eq!(read_line(&mut host), format!("OK {host_port}"));

        // Host data reaches the guest through the receive thread, with an interrupt.
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let handles = RxLoop::new(&t.lock().unwrap(), stop.clone());
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let thread = {
            let t = t.clone();
            std::thread::spawn(move || {
                // SAFETY: gettid takes nothing and cannot fail.
                tid_tx.send(unsafe { libc::gettid() }).unwrap();
                rx_loop(&t, &handles)
            })
        };
        let tid = tid_rx.recv().unwrap();
        // Idle, the thread sleeps in poll: it must not wake itself (its kick) round after round.
        let cpu_ticks = || {
            let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
            let fields: Vec<u64> = stat
                .rsplit_once(')')
                .unwrap()
                .1
                .split_whitespace()
                .skip(11)
                .take(2)
                .map(|f| f.parse().unwrap())
                .collect();
            fields[0] + fields[1]
        };
        let before = cpu_ticks();
        std::thread::sleep(Duration::from_millis(500));
        assert!(cpu_ticks() - before < 10, "the idle I/O thread used {} ticks in 0.5 s", cpu_ticks() - before);
        let interrupts = trigger.count();
        host.write_all(b"ping").unwrap();
        let got = wait_received(&mut g);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].0.op, got[0].0.dst_port, got[0].1.as_slice()), (op::RW, 52, &b"ping"[..]));
        assert!(trigger.count() > interrupts);
        // Guest data reaches the host.
        g.send(&t, 52, host_port, op::RW, 0, b"pong");
        assert_eq!(read_exact(&mut host, 4), b"pong");

        // Guest → host: a listener at <uds>_1234 gets the connection; nobody at 1235: reset.
        let mut listener_path = uds.clone().into_os_string();
        listener_path.push("_1234");
        let listener = UnixListener::bind(&listener_path).unwrap();
        g.send(&t, 5000, 1234, op::REQUEST, 0, b"");
        let got = wait_received(&mut g);
        assert_eq!((got[0].0.op, got[0].0.src_port, got[0].0.dst_port), (op::RESPONSE, 1234, 5000), "{got:?}");
        let (mut served, _) = listener.accept().unwrap();
        g.send(&t, 5000, 1234, op::RW, 0, b"hi");
        assert_eq!(read_exact(&mut served, 2), b"hi");
        g.send(&t, 5001, 1235, op::REQUEST, 0, b"");
        let got = wait_received(&mut g);
        assert_eq!((got[0].0.op, got[0].0.dst_port), (op::RST, 5001), "{got:?}");

        // The host closes its end: the guest is told (SHUTDOWN), answers RST, it is gone.
        drop(host);
        let got = wait_received(&mut g);
        assert_eq!((got[0].0.op, got[0].0.dst_port), (op::SHUTDOWN, 52), "{got:?}");
        g.send(&t, 52, host_port, op::RST, 0, b"");
        assert_eq!(t.lock().unwrap().device().connections(), 1, "only the guest's connection to 1234 is left");

        // A malformed CONNECT line: the host process is hung up on.
        let mut bad = UnixStream::connect(&uds).unwrap();
        bad.write_all(b"HELLO\n").unwrap();
        bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(bad.read(&mut [0u8; 8]).unwrap(), 0);

        stop.write(1).unwrap();
        thread.join().unwrap();
        drop(t);
        assert!(!uds.exists(), "the socket goes with the device");
    }
}

//! The virtio-net device model and the I/O thread that feeds its receive queue.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use super::{
    tap_offload, Tap, MAX_FRAME, NET_HDR_LEN, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_ID_NET, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
};
use crate::devices::virtio::{MmioTransport, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};

/// A virtio network card whose other end is a tap.
#[derive(Debug)]
pub struct Net {
    tap: Tap,
    mac: Option<[u8; 6]>,
    /// The guest has no receive buffer: stop watching the tap until it gives some.
    rx_starved: bool,
    /// Wakes the receive thread (the guest gave buffers).
    kick: Arc<EventFd>,
    /// Frames dropped: too long for the guest's buffer, malformed chains, tap errors.
    dropped: u64,
}

impl Net {
    /// A card on `tap`, with `mac` in its configuration space (else the guest picks one).
    pub fn new(tap: Tap, mac: Option<[u8; 6]>) -> io::Result<Self> {
        Ok(Net {
            tap,
            mac,
            // Nothing to receive into until the driver activates the device.
            rx_starved: true,
            kick: Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?),
            dropped: 0,
        })
    }

    /// The tap behind the card.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// Frames dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Whether a frame waits for a receive buffer the guest has not given.
    pub fn rx_starved(&self) -> bool {
        self.rx_starved
    }

    /// Moves frames from the tap into receive buffers until the tap has none or the guest's
    /// buffers run out. The tap reads straight into guest memory (no copy in between).
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<usize, VirtioError> {
        let mut used = 0;
        loop {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // Whatever waits on the tap waits for buffers.
                self.rx_starved = true;
                break;
            };
            self.rx_starved = false;
            let head = chain.head_index();
            let buffers: Vec<(GuestAddress, usize)> = chain.writable().map(|d| (d.addr(), d.len() as usize)).collect();
            let room: usize = buffers.iter().map(|b| b.1).sum();
            let Some(iov) = iovecs(&buffers, mem).filter(|_| room > NET_HDR_LEN) else {
                self.dropped += 1;
                tracing::debug!("receive buffer too small or outside guest memory, returned empty");
                queue.add_used(mem, head, 0).map_err(|source| VirtioError::UsedRing { queue: RX_QUEUE, source })?;
                used += 1;
                continue;
            };
            // SAFETY: `iovecs` built every entry from a slice of guest memory that `mem`
            // maps for as long as the VM exists (the call is shorter); the guest writing those
            // bytes at the same time only garbles the frame it is given.
            let read = unsafe { self.tap.read_frame_into(&iov) };
            let len = match read {
                Ok(n) if n > NET_HDR_LEN => n,
                Ok(_) => {
                    queue.go_to_previous_position();
                    continue;
                }
                Err(e) => {
                    // Nothing waiting (or the tap failed): the buffer stays the guest's.
                    queue.go_to_previous_position();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::warn!(error = %e, tap = self.tap.name(), "cannot read from the tap");
                    }
                    break;
                }
            };
            // No mergeable buffers: the frame is whole in one chain, `num_buffers` is 1.
            write_at(&buffers, mem, 10, &1u16.to_le_bytes());
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            queue.add_used(mem, head, len).map_err(|source| VirtioError::UsedRing { queue: RX_QUEUE, source })?;
            used += 1;
        }
        Ok(used)
    }

    /// Sends every frame the guest queued, gathered straight from guest memory.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<usize, VirtioError> {
        let mut used = 0;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let buffers: Vec<(GuestAddress, usize)> = chain.readable().map(|d| (d.addr(), d.len() as usize)).collect();
            let total: usize = buffers.iter().map(|b| b.1).sum();
            match iovecs(&buffers, mem).filter(|_| total > NET_HDR_LEN && total <= MAX_FRAME) {
                Some(iov) => {
                    // SAFETY: as in `receive`: guest memory `mem` maps for the VM's life;
                    // the guest changing it meanwhile only garbles its own frame.
                    if let Err(e) = unsafe { self.tap.write_frame_from(&iov) } {
                        self.dropped += 1;
                        tracing::debug!(error = %e, tap = self.tap.name(), "cannot send a frame, dropped");
                    }
                }
                None => {
                    self.dropped += 1;
                    tracing::debug!("malformed transmit chain, dropped");
                }
            }
            queue.add_used(mem, head, 0).map_err(|source| VirtioError::UsedRing { queue: TX_QUEUE, source })?;
            used += 1;
        }
        Ok(used)
    }
}

/// Host addresses of guest `buffers`, as iovecs; None when one is not wholly inside one region
/// of guest memory.
fn iovecs(buffers: &[(GuestAddress, usize)], mem: &GuestMemoryMmap) -> Option<Vec<libc::iovec>> {
    buffers
        .iter()
        .map(|&(addr, len)| {
            let slice = mem.get_slice(addr, len).ok()?;
            Some(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: slice.len() })
        })
        .collect()
}

/// Writes `bytes` at `offset` into the buffers, which may split them.
fn write_at(buffers: &[(GuestAddress, usize)], mem: &GuestMemoryMmap, offset: usize, bytes: &[u8]) {
    let mut skip = offset;
    let mut rest = bytes;
    for &(addr, len) in buffers {
        if rest.is_empty() {
            return;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = rest.len().min(len - skip);
        let _ = mem.write_slice(&rest[..n], addr.unchecked_add(skip as u64));
        rest = &rest[n..];
        skip = 0;
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        let mac = if self.mac.is_some() { VIRTIO_NET_F_MAC } else { 0 };
        VIRTIO_F_VERSION_1
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | mac
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The configuration space is the MAC (no status, no multiqueue, no MTU field).
        let mac = self.mac.unwrap_or_default();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *byte = at.and_then(|at| mac.get(at)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, features: u64) {
        if let Err(e) = self.tap.set_offload(tap_offload(features)) {
            tracing::warn!(error = %e, "cannot set the tap's offloads");
        }
        self.rx_starved = false;
        let _ = self.kick.write(1);
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<usize, VirtioError> {
        match index {
            RX_QUEUE => {
                let used = self.receive(queue, mem)?;
                if !self.rx_starved {
                    // Buffers are left: the receive thread watches the tap again.
                    let _ = self.kick.write(1);
                }
                Ok(used)
            }
            TX_QUEUE => self.transmit(queue, mem),
            _ => Ok(0),
        }
    }

    fn reset(&mut self) {
        self.rx_starved = true;
        if let Err(e) = self.tap.set_offload(0) {
            tracing::debug!(error = %e, "cannot reset the tap's offloads");
        }
    }
}

/// What the receive thread needs, taken before the VM runs.
#[derive(Debug)]
pub struct RxLoop {
    tap: OwnedFd,
    kick: Arc<EventFd>,
    stop: Arc<EventFd>,
    /// Signalled by KVM when the guest notifies the transmit queue (an ioeventfd), so the
    /// thread serves it instead of the vCPU after an exit.
    tx: Option<EventFd>,
}

impl RxLoop {
    /// The thread's handles for the card in `transport`; `stop` ends it; `tx`, when given, is
    /// the transmit queue's ioeventfd.
    pub fn new<T: Trigger>(
        transport: &MmioTransport<Net, T>,
        stop: Arc<EventFd>,
        tx: Option<EventFd>,
    ) -> io::Result<Self> {
        let device = transport.device();
        Ok(RxLoop { tap: device.tap.as_fd().try_clone_to_owned()?, kick: device.kick.clone(), stop, tx })
    }
}

/// The receive thread: waits for a frame on the tap (unless the guest has no buffer for it),
/// for the guest to give buffers, or for `stop`; delivers through the transport, which raises
/// the interrupt.
pub fn rx_loop<T: Trigger>(transport: &Mutex<MmioTransport<Net, T>>, handles: &RxLoop) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        let starved = transport.lock().unwrap_or_else(|e| e.into_inner()).device().rx_starved();
        let tap_events = if starved { PollFlags::empty() } else { PollFlags::POLLIN };
        let mut fds = vec![
            PollFd::new(event_fd(&handles.stop), PollFlags::POLLIN),
            PollFd::new(event_fd(&handles.kick), PollFlags::POLLIN),
            PollFd::new(handles.tap.as_fd(), tap_events),
        ];
        if let Some(tx) = &handles.tx {
            fds.push(PollFd::new(event_fd(tx), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "network receive thread cannot wait; the guest receives nothing more");
                return;
            }
        }
        let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        if ready(&fds[0]) {
            return;
        }
        if ready(&fds[1]) {
            let _ = handles.kick.read();
        }
        if fds.get(3).is_some_and(ready) {
            if let Some(tx) = &handles.tx {
                let _ = tx.read();
            }
            transport.lock().unwrap_or_else(|e| e.into_inner()).process(TX_QUEUE);
        }
        let tap = fds[2].revents().unwrap_or(PollFlags::empty());
        if tap.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL) {
            tracing::warn!(?tap, "the tap failed; the guest receives nothing more");
            return;
        }
        if tap.contains(PollFlags::POLLIN) {
            let mut t = transport.lock().unwrap_or_else(|e| e.into_inner());
            if !t.process(RX_QUEUE) {
                // Not active or no receive queue: nothing can take the frame until the driver
                // (re)starts the device.
                t.device_mut().rx_starved = true;
            }
        }
    }
}

/// `evt`'s descriptor, borrowed for as long as `evt` (vmm-sys-util's EventFd has no `AsFd`).
fn event_fd(evt: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor belongs to `evt`, which outlives the borrow and does not close it
    // while borrowed (an EventFd closes its descriptor only when dropped).
    unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::process::Command;
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
    const TXQ_AT: u64 = 0x5000;
    const TX_FRAME: u64 = 0x9000;
    const RX_BUFS: u64 = 0x2_0000;
    const RX_BUF_LEN: u32 = 0x1_1000;
    const LEN: u16 = 16;
    const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

    /// An Ethernet + IPv4 + UDP frame from 10.200.0.2:4000 to 10.200.0.1:5000 (`dst_mac`), a
    /// zero virtio-net header in front (no offload asked).
    fn udp_frame(dst_mac: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; NET_HDR_LEN];
        f.extend_from_slice(&dst_mac);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 8 + payload.len()) as u16;
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[10, 200, 0, 2]);
        ip[16..20].copy_from_slice(&[10, 200, 0, 1]);
        let mut sum: u32 = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&4000u16.to_be_bytes());
        f.extend_from_slice(&5000u16.to_be_bytes());
        f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed on IPv4)
        f.extend_from_slice(payload);
        f
    }

    fn ip(args: &[&str]) {
        let st = Command::new("ip").args(args).status().expect("run ip");
        assert!(st.success(), "ip {args:?}");
    }

    fn tap_mac(name: &str) -> [u8; 6] {
        let out = Command::new("ip").args(["-o", "link", "show", name]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mac = text.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).unwrap().to_owned();
        super::super::parse_mac(&mac).unwrap()
    }

    /// A frame the guest sends reaches a socket on the host side of the tap, and a datagram
    /// from that socket reaches the guest's receive buffer through the receive thread, with an
    /// interrupt; all in a network namespace of the test's own (nothing leaves it).
    #[test]
    fn frames_cross_a_tap_both_ways() {
        let test = "frames_cross_a_tap_both_ways";
        if !twinbox_testutil::require_root(test, "a tap and a network namespace")
            || !twinbox_testutil::require(std::path::Path::new("/dev/net/tun").exists(), test, "no /dev/net/tun")
            || !twinbox_testutil::require(Command::new("ip").arg("-V").output().is_ok(), test, "no `ip` (iproute2)")
        {
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare changes only this thread's network namespace; it takes no pointers.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "{}", io::Error::last_os_error());
            let tap = Tap::open("tbnet0").unwrap();
            ip(&["link", "set", "lo", "up"]);
            ip(&["addr", "add", "10.200.0.1/24", "dev", "tbnet0"]);
            ip(&["link", "set", "tbnet0", "up"]);
            ip(&["neigh", "add", "10.200.0.2", "lladdr", "02:00:00:00:00:02", "dev", "tbnet0"]);
            let host_mac = tap_mac("tbnet0");

            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
            let net = Net::new(tap, Some(GUEST_MAC)).unwrap();
            let trigger = CountingTrigger::default();
            let mut t = MmioTransport::new(net, trigger.clone(), mem.clone());
            let rxq = MockSplitQueue::create(&mem, GuestAddress(RXQ_AT), LEN);
            let txq = MockSplitQueue::create(&mem, GuestAddress(TXQ_AT), LEN);
            let offered = read_device_features(&mut t);
            assert_ne!(offered & VIRTIO_NET_F_MAC, 0);
            assert_eq!(negotiate(&mut t, offered) & status::FEATURES_OK, status::FEATURES_OK);
            let mac: Vec<u8> = (0..6).map(|i| t.r(CONFIG_SPACE + i) as u8).collect();
            assert_eq!(mac, GUEST_MAC, "the MAC in the configuration space");
            setup_queue(&mut t, 0, LEN, rxq.desc_table_addr().0, rxq.avail_addr().0, rxq.used_addr().0);
            setup_queue(&mut t, 1, LEN, txq.desc_table_addr().0, txq.avail_addr().0, txq.used_addr().0);
            t.w(R_STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);

            // Guest → host.
            let sock = UdpSocket::bind("10.200.0.1:5000").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let frame = udp_frame(host_mac, b"hello from the guest");
            mem.write_slice(&frame, GuestAddress(TX_FRAME)).unwrap();
            txq.add_desc_chains(&[RawDescriptor::from(Descriptor::new(TX_FRAME, frame.len() as u32, 0, 0))], 0)
                .unwrap();
            t.w(R_QUEUE_NOTIFY, 1);
            assert_eq!(txq.used().idx().load(), 1, "the transmit chain is used");
            let mut buf = [0u8; 64];
            let (n, from) = sock.recv_from(&mut buf).expect("the guest's datagram arrives");
            assert_eq!(&buf[..n], b"hello from the guest");
            assert_eq!(from.to_string(), "10.200.0.2:4000");

            // Host → guest, through the receive thread.
            let transport = Arc::new(Mutex::new(t));
            let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
            let handles = RxLoop::new(&transport.lock().unwrap(), stop.clone(), None).unwrap();
            let thread = {
                let transport = transport.clone();
                std::thread::spawn(move || rx_loop(&transport, &handles))
            };
            let bufs: Vec<RawDescriptor> = (0..8u64)
                .map(|i| {
                    let addr = RX_BUFS + i * u64::from(RX_BUF_LEN);
                    RawDescriptor::from(Descriptor::new(addr, RX_BUF_LEN, VRING_DESC_F_WRITE as u16, 0))
                })
                .collect();
            rxq.add_desc_chains(&bufs, 0).unwrap();
            transport.lock().unwrap().w(R_QUEUE_NOTIFY, 0);
            sock.send_to(b"hello guest", "10.200.0.2:4000").unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut found = false;
            let mut seen = 0u16;
            while !found && Instant::now() < deadline {
                let used = rxq.used().idx().load();
                while seen != used {
                    let elem = rxq.used().ring().ref_at(usize::from(seen % LEN)).unwrap().load();
                    let mut got = vec![0u8; elem.len() as usize];
                    let addr = RX_BUFS + u64::from(elem.id()) * u64::from(RX_BUF_LEN);
                    mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
                    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
                    found |= got.len() > NET_HDR_LEN + 6
                        && got[NET_HDR_LEN..NET_HDR_LEN + 6] == GUEST_MAC
                        && got.ends_with(b"hello guest");
                    seen = seen.wrapping_add(1);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(found, "the datagram reached a receive buffer");
            assert!(trigger.count() >= 2, "interrupts for both directions");
            stop.write(1).unwrap();
            thread.join().unwrap();
            assert_eq!(transport.lock().unwrap().device().dropped(), 0);
        })
        .join()
        .unwrap();
    }
}

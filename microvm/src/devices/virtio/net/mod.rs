//! The virtio-net device: a tap on the host side, two queues (receive 0, transmit 1) on the
//! guest's. Every frame crosses with a 12-byte virtio-net v1 header, the same layout the tap
//! reads and writes (IFF_VNET_HDR), so checksum and segmentation offloads go through untouched:
//! the device offers what Firecracker's does (CSUM, GUEST_CSUM, TSO4/6 both ways) and MAC.
//!
//! The transmit queue is served on the vCPU thread that notifies it. Frames arriving on the tap
//! are delivered by an I/O thread ([`rx_loop`]) that waits on the tap, and is woken again
//! through an eventfd when the guest gives receive buffers after running out.

mod device;
mod tap;

pub use device::{rx_loop, Net, RxLoop};
pub use tap::{check_tap_name, Tap, IFNAMSIZ};

use twinbox_exit::ExitCode;
use virtio_bindings::virtio_net as vn;

/// virtio's device id of a network card.
pub const VIRTIO_ID_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Receive and transmit queues: 256 descriptors each, as Firecracker's.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const NET_HDR_LEN: usize = 12;
/// The largest frame with its header: a 64 KiB GSO packet, an Ethernet header and a VLAN tag.
pub const MAX_FRAME: usize = NET_HDR_LEN + 65_535 + 14 + 4;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// The device handles a partially checksummed frame from the guest.
pub const VIRTIO_NET_F_CSUM: u64 = bit(vn::VIRTIO_NET_F_CSUM);
/// The guest takes partially checksummed frames.
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = bit(vn::VIRTIO_NET_F_GUEST_CSUM);
/// The configuration space holds the guest's MAC address.
pub const VIRTIO_NET_F_MAC: u64 = bit(vn::VIRTIO_NET_F_MAC);
/// The guest takes TCP segments of up to 64 KiB (IPv4, IPv6).
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO4);
/// See [`VIRTIO_NET_F_GUEST_TSO4`].
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO6);
/// The device takes TCP segments of up to 64 KiB from the guest (IPv4, IPv6).
pub const VIRTIO_NET_F_HOST_TSO4: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO4);
/// See [`VIRTIO_NET_F_HOST_TSO4`].
pub const VIRTIO_NET_F_HOST_TSO6: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO6);

/// What setting up a network device can run into.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Not a name an interface can have.
    #[error("invalid tap name {0:?}: give 1 to 15 characters without '/', ':', spaces or NUL")]
    TapName(String),
    /// A system call on the tap failed.
    #[error("tap {name}: {op} failed")]
    Tap {
        /// The interface.
        name: String,
        /// What was done.
        op: &'static str,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// Not a MAC address.
    #[error("invalid MAC address {0:?}: give six hex bytes separated by ':', e.g. 02:42:0a:59:00:02")]
    Mac(String),
}

impl ExitCode for NetError {
    fn exit_code(&self) -> i32 {
        match self {
            NetError::TapName(_) | NetError::Mac(_) => twinbox_exit::USER_ERROR,
            NetError::Tap { .. } => twinbox_exit::INTERNAL,
        }
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], NetError> {
    let bad = || NetError::Mac(text.to_owned());
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// Which of the tap's offloads the guest's accepted features allow (TUNSETOFFLOAD): the tap
/// may only hand over what the guest takes.
pub fn tap_offload(acked: u64) -> libc::c_uint {
    let mut flags = 0;
    if acked & VIRTIO_NET_F_GUEST_CSUM != 0 {
        flags |= libc::TUN_F_CSUM;
        if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_or_are_refused() {
        assert_eq!(parse_mac("02:42:0a:59:00:02").unwrap(), [2, 0x42, 10, 0x59, 0, 2]);
        for bad in ["", "02:42:0a:59:00", "02:42:0a:59:00:02:03", "2:42:0a:59:00:02", "zz:42:0a:59:00:02"] {
            assert!(matches!(parse_mac(bad), Err(NetError::Mac(_))), "{bad}");
        }
    }

    #[test]
    fn offloads_follow_the_guest() {
        assert_eq!(tap_offload(0), 0);
        assert_eq!(tap_offload(VIRTIO_NET_F_GUEST_TSO4), 0, "TSO without checksum offload is not TSO");
        assert_eq!(
            tap_offload(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
    }
}

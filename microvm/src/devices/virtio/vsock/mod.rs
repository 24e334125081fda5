//! The virtio-vsock device, with Firecracker's host side: the guest's AF_VSOCK stream sockets
//! meet UNIX sockets on the host.
//!
//! - Host to guest: a host process connects to the VMM's UNIX socket (`uds_path`) and writes
//!   `CONNECT <port>\n`; the device asks the guest for a connection to `<port>` and, once the
//!   guest accepts, answers `OK <host port>\n`; from then on the bytes flow both ways.
//! - Guest to host: a guest connecting to CID 2, port `P` is connected to the UNIX socket
//!   `<uds_path>_<P>`, if something listens there; else the guest gets a reset.
//!
//! Packets (virtio 1.x, 5.10.6) are a 44-byte header and the payload. Flow control is the
//! spec's credit scheme: each side says how much it buffers (`buf_alloc`) and how much it has
//! passed on (`fwd_cnt`); neither sends more than the other can hold. The transmit queue is
//! served on the vCPU thread that notifies it; what goes to the guest (data read from the UNIX
//! sockets, replies) is delivered by an I/O thread ([`rx_loop`]) that waits on the sockets and
//! on an eventfd the device kicks when it has something to say. The event queue exists, as the
//! spec wants, and carries nothing (its only event is a transport reset after a snapshot).

mod device;
mod packet;

pub use device::{rx_loop, RxLoop, Vsock};
pub use packet::{Header, HEADER_LEN};

/// virtio's device id of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Queue sizes: receive, transmit, event.
pub const QUEUE_SIZES: [u16; 3] = [256, 256, 16];
/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// The event queue's index: the device's news for the driver.
pub const EVENT_QUEUE: usize = 2;
/// The event that tells the driver every connection is gone and the CID may have changed
/// (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`), sent after a restore.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// How much of the guest's data the device holds per connection before the UNIX socket takes
/// it (the `buf_alloc` it advertises).
pub const CONN_BUFFER: u32 = 256 * 1024;
/// At most this many connections at once; a REQUEST beyond gets a reset.
pub const MAX_CONNECTIONS: usize = 1024;
/// The longest `CONNECT <port>\n` line a host process may send.
pub const MAX_CONNECT_LINE: usize = 32;

/// Packet types (only streams).
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// The request accepted.
    pub const RESPONSE: u16 = 2;
    /// Reset: the connection is gone (or never was).
    pub const RST: u16 = 3;
    /// No more receiving and/or sending (flags below).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Here is my credit.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Tell me your credit.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags.
pub mod shutdown {
    /// The sender will receive nothing more.
    pub const RCV: u32 = 1;
    /// The sender will send nothing more.
    pub const SEND: u32 = 2;
}

/// What setting up the socket device can run into.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest's CID must be above the reserved ones and below `u32::MAX`.
    #[error("invalid guest CID {0}: give 3 to 4294967294")]
    Cid(u64),
    /// The UNIX socket could not be made.
    #[error("cannot listen on {path}")]
    Listen {
        /// Where.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd could not be made.
    #[error("cannot make the vsock device's eventfd")]
    EventFd(#[source] std::io::Error),
}

impl twinbox_exit::ExitCode for VsockError {
    fn exit_code(&self) -> i32 {
        match self {
            VsockError::Cid(_) => twinbox_exit::USER_ERROR,
            VsockError::Listen { .. } | VsockError::EventFd(_) => twinbox_exit::INTERNAL,
        }
    }
}

/// Parses a host process's `CONNECT <port>\n` line (without the newline).
pub fn parse_connect(line: &str) -> Option<u32> {
    line.strip_prefix("CONNECT ")?.trim_end_matches('\r').parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect("CONNECT 52"), Some(52));
        assert_eq!(parse_connect("CONNECT 52\r"), Some(52));
        for bad in ["CONNECT", "CONNECT x", "connect 52", "CONNECT -1", "CONNECT 99999999999"] {
            assert_eq!(parse_connect(bad), None, "{bad}");
        }
    }
}

//! virtio-blk (virtio 1.x, 5.2): a disk image file as a guest block device.
//!
//! [`Block`] implements [`VirtioDevice`](super::VirtioDevice); put it behind an
//! [`MmioTransport`](super::MmioTransport). One request queue, processed synchronously with
//! positioned reads and writes on the image file.

pub mod device;
pub mod request;

pub use device::Block;
pub use request::{Request, RequestType};

use twinbox_exit::ExitCode;
use virtio_bindings::virtio_blk as blk;

/// The virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Bytes per sector, the unit of `capacity` and of request offsets.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of a device id (GET_ID answer).
pub const ID_BYTES: usize = blk::VIRTIO_BLK_ID_BYTES as usize;
/// Length of a request header: type, reserved, sector.
pub const REQUEST_HEADER_LEN: usize = 16;

/// Feature: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << blk::VIRTIO_BLK_F_RO;
/// Feature: `seg_max` in the configuration space is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << blk::VIRTIO_BLK_F_SEG_MAX;
/// Feature: the device understands FLUSH.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << blk::VIRTIO_BLK_F_FLUSH;

/// Request type: read sectors.
pub const VIRTIO_BLK_T_IN: u32 = blk::VIRTIO_BLK_T_IN;
/// Request type: write sectors.
pub const VIRTIO_BLK_T_OUT: u32 = blk::VIRTIO_BLK_T_OUT;
/// Request type: make written data durable.
pub const VIRTIO_BLK_T_FLUSH: u32 = blk::VIRTIO_BLK_T_FLUSH;
/// Request type: read the device id.
pub const VIRTIO_BLK_T_GET_ID: u32 = blk::VIRTIO_BLK_T_GET_ID;

/// Request status: done.
pub const VIRTIO_BLK_S_OK: u8 = blk::VIRTIO_BLK_S_OK as u8;
/// Request status: failed (bad request or host I/O error).
pub const VIRTIO_BLK_S_IOERR: u8 = blk::VIRTIO_BLK_S_IOERR as u8;
/// Request status: request type not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = blk::VIRTIO_BLK_S_UNSUPP as u8;

/// Errors of the block device: opening its image, and the requests a guest sends it (those
/// become a request status, never a panic or a VMM error).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open the disk image")]
    Open(#[source] std::io::Error),
    /// The image's size cannot be found.
    #[error("cannot find the size of the disk image")]
    Size(#[source] std::io::Error),
    /// A readable descriptor follows a writable one.
    #[error("descriptor chain has a device-readable buffer after a device-writable one")]
    ReadableAfterWritable,
    /// No room for the status byte.
    #[error("descriptor chain has no device-writable byte for the status")]
    NoStatus,
    /// The readable part is shorter than a request header.
    #[error("request header is {0} bytes, {REQUEST_HEADER_LEN} needed")]
    HeaderTooShort(u64),
    /// A data length that is not a whole number of sectors.
    #[error("request data of {0} bytes is not a multiple of {SECTOR_SIZE}")]
    NotSectorMultiple(u64),
    /// The request reaches past the end of the disk.
    #[error("request of {len} bytes at sector {sector} is outside the disk of {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Data length.
        len: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// A request type the device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// A data buffer that is not all in guest memory.
    #[error("request data buffer outside guest memory")]
    BufferOutsideMemory,
    /// Guest memory could not be read or written.
    #[error("cannot access guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// The image could not be read, written or synced.
    #[error("disk image I/O failed")]
    Io(#[source] std::io::Error),
}

impl ExitCode for BlockError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        match self {
            // The disk image the user gave.
            BlockError::Open(_) | BlockError::Size(_) => USER_ERROR,
            // A request of the guest's that the device refuses, or the image's I/O failing.
            BlockError::ReadableAfterWritable
            | BlockError::NoStatus
            | BlockError::HeaderTooShort(_)
            | BlockError::NotSectorMultiple(_)
            | BlockError::OutOfRange { .. }
            | BlockError::ReadOnly
            | BlockError::Unsupported(_)
            | BlockError::BufferOutsideMemory
            | BlockError::GuestMemory(_)
            | BlockError::Io(_) => INTERNAL,
        }
    }
}

impl BlockError {
    /// The status byte the guest gets for a request that failed this way.
    pub fn status(&self) -> u8 {
        match self {
            BlockError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

//! virtio devices on the virtio-mmio transport (version 2, "modern" virtio 1.x only).
//!
//! A device implements [`VirtioDevice`]: its id, its feature bits, its queue sizes, its
//! configuration space and what it does with a queue when the driver notifies it. The generic
//! [`MmioTransport`] holds the registers, the queues and the interrupt (any vm-superio
//! [`Trigger`](vm_superio::Trigger)) and is what sits on the MMIO bus.
//!
//! Linux finds the devices from its command line: `virtio_mmio.device=4K@0xd0000000:5` per
//! device ([`kernel_cmdline_entry`]); device `i` lives at [`mmio_slot`]`(i)`.

pub mod block;
pub mod mmio;
pub mod net;
pub mod vsock;

pub use mmio::MmioTransport;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// First virtio-mmio device's base address, inside the 32-bit MMIO gap.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device's register window (registers and config space).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The first virtio device's interrupt line; device `i` uses `VIRTIO_FIRST_GSI + i`.
pub const VIRTIO_FIRST_GSI: u32 = 5;

/// virtio-mmio's magic value, "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The transport version: 2, virtio 1.x without the legacy interface.
pub const MMIO_VERSION: u32 = 2;
/// The vendor id the transport reports ("twbx").
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"twbx");

/// Feature bit: the device follows virtio 1.x (required by a version-2 transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: the driver may use indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;

    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is ready: the device may use its queues.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is done.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// InterruptStatus bit: the device used buffers in a queue.
pub const INTERRUPT_USED_BUFFER: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the configuration (or the device status) changed.
pub const INTERRUPT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Base address and interrupt line of the `index`th virtio-mmio device.
pub fn mmio_slot(index: usize) -> (u64, u32) {
    // Callers stay far below these bounds (config::MAX_DISKS); saturate instead of wrapping.
    let i = u32::try_from(index).unwrap_or(u32::MAX);
    let base = VIRTIO_MMIO_BASE.saturating_add(u64::from(i).saturating_mul(VIRTIO_MMIO_SIZE));
    (base, VIRTIO_FIRST_GSI.saturating_add(i))
}

/// The kernel command-line parameter that tells Linux about a device at `base` on `gsi`.
pub fn kernel_cmdline_entry(base: u64, gsi: u32) -> String {
    format!("virtio_mmio.device={}K@{base:#x}:{gsi}", VIRTIO_MMIO_SIZE >> 10)
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 for a block device).
    fn device_type(&self) -> u32;
    /// The feature bits the device offers, transport bits (VERSION_1) included.
    fn features(&self) -> u64;
    /// The maximum size of each queue; each a power of two, at most 32768.
    fn queue_max_sizes(&self) -> &[u16];
    /// A guest read of the configuration space; `offset` is relative to its start.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A guest write of the configuration space; ignored unless the device has writable fields.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK having accepted `features`; the queues are valid from now on.
    fn activate(&mut self, _features: u64) {}
    /// Handles what the driver made available in queue `index`; returns how many chains went
    /// to the used ring. Guest mistakes in a request are the device's to report in the
    /// request; an error here means the queue itself is broken.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<usize, VirtioError>;
    /// The driver reset the device (status 0): forget everything negotiated.
    fn reset(&mut self) {}
    /// The VM was restored from a snapshot with this device active (after
    /// [`VirtioDevice::activate`]): whatever the device must tell the driver about it, it puts
    /// in `queues` now; true when it used buffers (the transport raises the interrupt).
    fn restored(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> bool {
        false
    }
}

/// A queue that cannot be used any more until the driver resets the device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The used ring could not be written.
    #[error("cannot add to the used ring of queue {queue}")]
    UsedRing {
        /// The queue index.
        queue: usize,
        /// What virtio-queue said.
        #[source]
        source: virtio_queue::Error,
    },
}

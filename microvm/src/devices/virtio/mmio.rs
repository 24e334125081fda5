//! The virtio-mmio transport, version 2 (virtio 1.x, 4.2.2): the register window a driver
//! probes and programs, generic over the device behind it and over how it raises interrupts.
//!
//! Queue notifications are handled synchronously on the vCPU thread that wrote QueueNotify:
//! the device processes the queue, then InterruptStatus bit 0 is set and the interrupt raised.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vm_superio::Trigger;

use super::{
    status, VirtioDevice, INTERRUPT_CONFIG, INTERRUPT_USED_BUFFER, MMIO_MAGIC_VALUE, MMIO_VERSION, VENDOR_ID,
    VIRTIO_F_VERSION_1,
};
use crate::devices::{BusDevice, VmEvent};

const MAGIC_VALUE: u64 = reg::VIRTIO_MMIO_MAGIC_VALUE as u64;
const VERSION: u64 = reg::VIRTIO_MMIO_VERSION as u64;
const DEVICE_ID: u64 = reg::VIRTIO_MMIO_DEVICE_ID as u64;
const VENDOR: u64 = reg::VIRTIO_MMIO_VENDOR_ID as u64;
const DEVICE_FEATURES: u64 = reg::VIRTIO_MMIO_DEVICE_FEATURES as u64;
const DEVICE_FEATURES_SEL: u64 = reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
const DRIVER_FEATURES: u64 = reg::VIRTIO_MMIO_DRIVER_FEATURES as u64;
const DRIVER_FEATURES_SEL: u64 = reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
const QUEUE_SEL: u64 = reg::VIRTIO_MMIO_QUEUE_SEL as u64;
const QUEUE_NUM_MAX: u64 = reg::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
const QUEUE_NUM: u64 = reg::VIRTIO_MMIO_QUEUE_NUM as u64;
const QUEUE_READY: u64 = reg::VIRTIO_MMIO_QUEUE_READY as u64;
const QUEUE_NOTIFY: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
const INTERRUPT_STATUS: u64 = reg::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const INTERRUPT_ACK: u64 = reg::VIRTIO_MMIO_INTERRUPT_ACK as u64;
const STATUS: u64 = reg::VIRTIO_MMIO_STATUS as u64;
const QUEUE_DESC_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
const QUEUE_DESC_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
const QUEUE_DRIVER_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
const QUEUE_DRIVER_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
const QUEUE_DEVICE_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
const QUEUE_DEVICE_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
const CONFIG_GENERATION: u64 = reg::VIRTIO_MMIO_CONFIG_GENERATION as u64;
/// QueueNotify's offset in the window (where an ioeventfd can take a queue's kicks).
pub const QUEUE_NOTIFY_OFFSET: u64 = QUEUE_NOTIFY;
/// Where the device's configuration space starts in the window.
pub const CONFIG_SPACE: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

/// One queue as a snapshot keeps it (virtio-queue's `QueueState`, field for field): its
/// addresses and size as the driver set them and where the device had got to in its rings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&QueueSnapshot> for QueueState {
    fn from(q: &QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A transport's registers and queues as a snapshot keeps them; the device behind it is made
/// anew from the VM's configuration (its disk, tap or socket) and takes up this state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportState {
    /// The virtio device id (2 block, 1 net, 19 vsock), checked on restore.
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
}

/// A virtio device as the guest sees it on the MMIO bus.
pub struct MmioTransport<D: VirtioDevice, T: Trigger> {
    device: D,
    trigger: T,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    status: u32,
}

impl<D: VirtioDevice, T: Trigger> std::fmt::Debug for MmioTransport<D, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("interrupt_status", &self.interrupt_status)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice, T: Trigger> MmioTransport<D, T> {
    /// `device` on the bus, its queues in `mem`, interrupts through `trigger`.
    pub fn new(device: D, trigger: T, mem: GuestMemoryMmap) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| {
                Queue::new(max).unwrap_or_else(|e| {
                    // A bug in the device, not the guest's doing: the queue reads as absent
                    // (QueueNumMax 0), which a driver takes as "no such queue".
                    tracing::error!(max, error = %e, "virtio device declares an invalid queue size");
                    Queue::default()
                })
            })
            .collect();
        MmioTransport {
            device,
            trigger,
            mem,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            status: 0,
        }
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device behind the transport, to change.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status the driver wrote (plus DEVICE_NEEDS_RESET if the device set it).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features both sides agreed on, once FEATURES_OK is set.
    pub fn acked_features(&self) -> u64 {
        self.driver_features
    }

    /// The queues, as the driver set them up.
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// The interrupt trigger.
    pub fn trigger(&self) -> &T {
        &self.trigger
    }

    /// Its registers and queues, for a snapshot (the VM paused).
    pub fn state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
        }
    }

    /// Takes up a snapshot's `state` on a transport made for the same device. An active device
    /// is activated with the features the driver had accepted and told it was restored
    /// ([`VirtioDevice::restored`]); the interrupt is raised again when one was pending.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        let kind = self.device.device_type();
        if state.device_type != kind {
            return Err(format!("the snapshot has virtio device type {} where this VM has {kind}", state.device_type));
        }
        let maxes = self.device.queue_max_sizes();
        let saved: Vec<u16> = state.queues.iter().map(|q| q.max_size).collect();
        if saved != maxes {
            return Err(format!(
                "virtio device type {kind}: the snapshot's queues {saved:?} are not this device's {maxes:?}"
            ));
        }
        let queues = state
            .queues
            .iter()
            .map(|q| Queue::try_from(QueueState::from(q)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("virtio device type {kind}: a saved queue is invalid: {e}"))?;
        if state.driver_features & !self.device.features() != 0 {
            return Err(format!("virtio device type {kind}: the snapshot's features are more than this device offers"));
        }
        self.queues = queues;
        self.status = state.status;
        self.driver_features = state.driver_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.interrupt_status = state.interrupt_status;
        if self.active() {
            if let Some(index) = self.queues.iter().position(|q| q.ready() && !q.is_valid(&self.mem)) {
                return Err(format!("virtio device type {kind}: saved queue {index} lies outside guest memory"));
            }
            self.device.activate(self.driver_features);
            if self.device.restored(&mut self.queues, &self.mem) {
                self.interrupt_status |= INTERRUPT_USED_BUFFER;
            }
        }
        if self.interrupt_status != 0 {
            self.raise(0);
        }
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::try_from(self.queue_sel).ok()?)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK (4.2.3.2).
    fn queue_config_allowed(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED) == status::FEATURES_OK
    }

    fn active(&self) -> bool {
        self.status & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET | status::FAILED) == status::DRIVER_OK
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = usize::try_from(self.queue_sel).ok().and_then(|i| self.queues.get(i));
        let features = self.device.features();
        match offset {
            MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            QUEUE_NUM => queue.map_or(0, |q| u32::from(q.size())),
            QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            QUEUE_DESC_LOW => queue.map_or(0, |q| q.desc_table() as u32),
            QUEUE_DESC_HIGH => queue.map_or(0, |q| (q.desc_table() >> 32) as u32),
            QUEUE_DRIVER_LOW => queue.map_or(0, |q| q.avail_ring() as u32),
            QUEUE_DRIVER_HIGH => queue.map_or(0, |q| (q.avail_ring() >> 32) as u32),
            QUEUE_DEVICE_LOW => queue.map_or(0, |q| q.used_ring() as u32),
            QUEUE_DEVICE_HIGH => queue.map_or(0, |q| (q.used_ring() >> 32) as u32),
            INTERRUPT_STATUS => self.interrupt_status,
            STATUS => self.status,
            // The configuration space never changes behind the driver's back.
            CONFIG_GENERATION => 0,
            _ => {
                tracing::debug!(offset, "virtio-mmio read of an unknown register");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM | QUEUE_READY | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => self.write_queue_register(offset, value),
            QUEUE_NOTIFY => self.notify(value),
            INTERRUPT_ACK => self.interrupt_status &= !value,
            STATUS => self.write_status(value),
            _ => tracing::debug!(offset, value, "virtio-mmio write to an unknown or read-only register"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating = self.status & (status::DRIVER | status::FEATURES_OK) == status::DRIVER;
        if !negotiating {
            tracing::warn!(status = self.status, "virtio driver features written outside negotiation");
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            sel => {
                if value != 0 {
                    tracing::warn!(sel, value, "virtio driver accepts features beyond bit 63");
                }
                return;
            }
        };
        self.driver_features = (self.driver_features & !(0xffff_ffff_u64 << shift)) | (u64::from(value) << shift);
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_config_allowed() {
            tracing::warn!(offset, status = self.status, "virtio queue register written outside set-up");
            return;
        }
        let Some(queue) = self.selected_queue() else {
            tracing::warn!(offset, "virtio queue register written for a queue that does not exist");
            return;
        };
        match offset {
            // An invalid size (not a power of two, too large) is refused by virtio-queue.
            QUEUE_NUM => queue.set_size(u16::try_from(value).unwrap_or(0)),
            QUEUE_READY => queue.set_ready(value == 1),
            QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
            QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
            QUEUE_DRIVER_LOW => queue.set_avail_ring_address(Some(value), None),
            QUEUE_DRIVER_HIGH => queue.set_avail_ring_address(None, Some(value)),
            QUEUE_DEVICE_LOW => queue.set_used_ring_address(Some(value), None),
            QUEUE_DEVICE_HIGH => queue.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    /// Status only moves forward one step at a time (3.1.1), FAILED at any time, 0 resets.
    fn write_status(&mut self, value: u32) {
        use status::*;
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's bit; a driver echoing it back does not set it.
        let value = value & !DEVICE_NEEDS_RESET;
        let old = self.status & !DEVICE_NEEDS_RESET;
        let added = value & !old;
        if value & old != old {
            tracing::warn!(old, value, "virtio driver cleared status bits without a reset");
            return;
        }
        match (old, added) {
            (_, FAILED) => self.status |= FAILED,
            (0, ACKNOWLEDGE) => self.status = value,
            (s, DRIVER) if s == ACKNOWLEDGE => self.status = value,
            (s, FEATURES_OK) if s == ACKNOWLEDGE | DRIVER => {
                let offered = self.device.features();
                let extra = self.driver_features & !offered;
                if extra != 0 {
                    tracing::warn!(extra, "virtio driver accepted features the device does not offer");
                } else if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                    tracing::warn!("virtio driver did not accept VIRTIO_F_VERSION_1 (required by virtio-mmio 2)");
                } else {
                    // Left unset otherwise: the driver reads it back and gives up.
                    self.status = value;
                }
            }
            (s, DRIVER_OK) if s == ACKNOWLEDGE | DRIVER | FEATURES_OK => self.activate(value),
            _ => tracing::warn!(old, value, "virtio status change out of order, ignored"),
        }
    }

    fn activate(&mut self, value: u32) {
        self.status = value;
        let mem = &self.mem;
        let broken = self.queues.iter().position(|q| q.ready() && !q.is_valid(mem));
        if let Some(index) = broken {
            tracing::warn!(queue = index, "virtio queue set up outside guest memory");
            self.needs_reset();
            return;
        }
        self.device.activate(self.driver_features);
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.status = 0;
    }

    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            self.raise(INTERRUPT_CONFIG);
        }
    }

    fn raise(&mut self, bit: u32) {
        self.interrupt_status |= bit;
        if let Err(e) = self.trigger.trigger() {
            tracing::warn!(error = ?e, "cannot raise the virtio interrupt");
        }
    }

    fn notify(&mut self, value: u32) {
        if !self.process(value as usize) {
            tracing::debug!(
                queue = value,
                status = self.status,
                "virtio notify ignored: device not active or queue not ready"
            );
        }
    }

    /// Has the device handle what queue `index` holds, as a notify does, and raises the
    /// interrupt if it used buffers: for devices whose work also arrives from the host side (a
    /// frame on a tap). False when the device is not active or the queue is not ready.
    pub fn process(&mut self, index: usize) -> bool {
        if !self.active() {
            return false;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            tracing::warn!(queue = index, "virtio notify for a queue that does not exist");
            return false;
        };
        if !queue.ready() {
            return false;
        }
        match self.device.process_queue(index, queue, &self.mem) {
            Ok(0) => {}
            Ok(_) => {
                // Without VIRTIO_RING_F_EVENT_IDX this is always true; ask anyway.
                let notify = queue.needs_notification(&self.mem).unwrap_or(true);
                if notify {
                    self.raise(INTERRUPT_USED_BUFFER);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "virtio queue broken, the device needs a reset");
                self.needs_reset();
            }
        }
        true
    }
}

impl<D, T> BusDevice for MmioTransport<D, T>
where
    D: VirtioDevice,
    T: Trigger + Send,
{
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers are 32 bits wide and read as a whole (4.2.2.2).
        if data.len() != 4 || offset & 3 != 0 {
            tracing::warn!(offset, len = data.len(), "virtio-mmio register read of the wrong width");
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmEvent> {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            return None;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset & 3 == 0 => self.write_register(offset, u32::from_le_bytes(bytes)),
            _ => tracing::warn!(offset, len = data.len(), "virtio-mmio register write of the wrong width"),
        }
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use vm_memory::GuestAddress;

    use super::*;

    /// Counts interrupts instead of raising them.
    #[derive(Default, Clone, Debug)]
    pub(crate) struct CountingTrigger(pub Arc<AtomicUsize>);

    impl CountingTrigger {
        pub(crate) fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl Trigger for CountingTrigger {
        type E = std::io::Error;
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// Register-level access the way a driver does it.
    pub(crate) trait Regs {
        fn r(&mut self, offset: u64) -> u32;
        fn w(&mut self, offset: u64, value: u32);
    }

    impl<B: BusDevice> Regs for B {
        fn r(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.read(offset, &mut b);
            u32::from_le_bytes(b)
        }
        fn w(&mut self, offset: u64, value: u32) {
            assert!(self.write(offset, &value.to_le_bytes()).is_none());
        }
    }

    pub(crate) const R_MAGIC: u64 = MAGIC_VALUE;
    pub(crate) const R_VERSION: u64 = VERSION;
    pub(crate) const R_DEVICE_ID: u64 = DEVICE_ID;
    pub(crate) const R_DEVICE_FEATURES: u64 = DEVICE_FEATURES;
    pub(crate) const R_DEVICE_FEATURES_SEL: u64 = DEVICE_FEATURES_SEL;
    pub(crate) const R_DRIVER_FEATURES: u64 = DRIVER_FEATURES;
    pub(crate) const R_DRIVER_FEATURES_SEL: u64 = DRIVER_FEATURES_SEL;
    pub(crate) const R_QUEUE_SEL: u64 = QUEUE_SEL;
    pub(crate) const R_QUEUE_NUM_MAX: u64 = QUEUE_NUM_MAX;
    pub(crate) const R_QUEUE_NUM: u64 = QUEUE_NUM;
    pub(crate) const R_QUEUE_READY: u64 = QUEUE_READY;
    pub(crate) const R_QUEUE_NOTIFY: u64 = QUEUE_NOTIFY;
    pub(crate) const R_INTERRUPT_STATUS: u64 = INTERRUPT_STATUS;
    pub(crate) const R_INTERRUPT_ACK: u64 = INTERRUPT_ACK;
    pub(crate) const R_STATUS: u64 = STATUS;

    /// The device features as a driver reads them (both halves).
    pub(crate) fn read_device_features(t: &mut impl Regs) -> u64 {
        t.w(R_DEVICE_FEATURES_SEL, 1);
        let high = t.r(R_DEVICE_FEATURES);
        t.w(R_DEVICE_FEATURES_SEL, 0);
        u64::from(high) << 32 | u64::from(t.r(R_DEVICE_FEATURES))
    }

    /// Linux's probe sequence up to FEATURES_OK, accepting `features`; returns the status read
    /// back after FEATURES_OK.
    pub(crate) fn negotiate(t: &mut impl Regs, features: u64) -> u32 {
        t.w(R_STATUS, 0);
        t.w(R_STATUS, status::ACKNOWLEDGE);
        t.w(R_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        t.w(R_DRIVER_FEATURES_SEL, 1);
        t.w(R_DRIVER_FEATURES, (features >> 32) as u32);
        t.w(R_DRIVER_FEATURES_SEL, 0);
        t.w(R_DRIVER_FEATURES, features as u32);
        t.w(R_STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        t.r(R_STATUS)
    }

    /// Programs queue `index` with the given ring addresses and size, and sets it ready.
    pub(crate) fn setup_queue(t: &mut impl Regs, index: u32, size: u16, desc: u64, avail: u64, used: u64) {
        t.w(R_QUEUE_SEL, index);
        assert_eq!(t.r(R_QUEUE_READY), 0);
        t.w(R_QUEUE_NUM, u32::from(size));
        for (low, addr) in [(QUEUE_DESC_LOW, desc), (QUEUE_DRIVER_LOW, avail), (QUEUE_DEVICE_LOW, used)] {
            t.w(low, addr as u32);
            t.w(low + 4, (addr >> 32) as u32);
        }
        t.w(R_QUEUE_READY, 1);
    }

    /// A device that puts every chain straight into the used ring with length 7.
    struct Echo {
        features: u64,
        activated: Option<u64>,
        resets: usize,
    }

    impl VirtioDevice for Echo {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            self.features
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn activate(&mut self, features: u64) {
            self.activated = Some(features);
        }
        fn process_queue(
            &mut self,
            index: usize,
            queue: &mut Queue,
            mem: &GuestMemoryMmap,
        ) -> Result<usize, super::super::VirtioError> {
            let mut n = 0;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                queue
                    .add_used(mem, chain.head_index(), 7)
                    .map_err(|source| super::super::VirtioError::UsedRing { queue: index, source })?;
                n += 1;
            }
            Ok(n)
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated = None;
        }
    }

    fn transport() -> MmioTransport<Echo, CountingTrigger> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let dev = Echo { features: VIRTIO_F_VERSION_1 | 1 << 3, activated: None, resets: 0 };
        MmioTransport::new(dev, CountingTrigger::default(), mem)
    }

    #[test]
    fn identifies_itself() {
        let mut t = transport();
        assert_eq!(t.r(R_MAGIC), 0x7472_6976);
        assert_eq!(t.r(R_VERSION), 2);
        assert_eq!(t.r(R_DEVICE_ID), 42);
        assert_eq!(t.r(VENDOR), VENDOR_ID);
        assert_eq!(t.r(CONFIG_GENERATION), 0);
        assert_eq!(read_device_features(&mut t), VIRTIO_F_VERSION_1 | 1 << 3);
        t.w(R_DEVICE_FEATURES_SEL, 2);
        assert_eq!(t.r(R_DEVICE_FEATURES), 0);
        let mut cfg = [0u8; 3];
        t.read(CONFIG_SPACE + 5, &mut cfg);
        assert_eq!(cfg, [5, 6, 7]);
    }

    #[test]
    fn a_restored_transport_has_the_registers_and_queues_of_its_snapshot_and_is_active() {
        let mut t = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 3);
        setup_queue(&mut t, 1, 4, 0x1000, 0x2000, 0x3000);
        t.w(R_STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        t.w(R_QUEUE_SEL, 1);
        let state = t.state();
        let json = serde_json::to_string(&state).unwrap();
        let state: TransportState = serde_json::from_str(&json).unwrap();
        assert_eq!(state, t.state(), "field by field");
        let mut copy = transport();
        copy.restore(&state).unwrap();
        assert_eq!(copy.state(), state);
        assert_eq!(copy.device().activated, Some(VIRTIO_F_VERSION_1 | 1 << 3), "activated with the saved features");
        assert_eq!(copy.r(R_QUEUE_NUM), 4, "queue 1 selected, as it was");
        assert_eq!(copy.trigger().count(), 0, "no interrupt was pending");
        // Another device, other queues or features beyond the device's are refused, named.
        let mut other = TransportState { device_type: 2, ..state.clone() };
        assert!(copy.restore(&other).unwrap_err().contains("device type 2 where this VM has 42"));
        other = TransportState { queues: state.queues[..1].to_vec(), ..state.clone() };
        assert!(copy.restore(&other).unwrap_err().contains("queues"));
        other = TransportState { driver_features: 1 << 20, ..state.clone() };
        assert!(copy.restore(&other).unwrap_err().contains("features"));
        // A pending interrupt is raised again.
        let pending = TransportState { interrupt_status: INTERRUPT_USED_BUFFER, ..state };
        let mut copy = transport();
        copy.restore(&pending).unwrap();
        assert_eq!(copy.trigger().count(), 1);
        assert_eq!(copy.r(R_INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);
    }

    #[test]
    fn queue_sizes_per_queue_and_absent_queues() {
        let mut t = transport();
        for (sel, max) in [(0, 16), (1, 8), (2, 0), (u32::MAX, 0)] {
            t.w(R_QUEUE_SEL, sel);
            assert_eq!(t.r(R_QUEUE_NUM_MAX), max, "queue {sel}");
        }
    }

    #[test]
    fn features_ok_needs_version_1_and_offered_bits_only() {
        let mut t = transport();
        let st = negotiate(&mut t, 1 << 3);
        assert_eq!(st & status::FEATURES_OK, 0, "VERSION_1 missing");
        let st = negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 4);
        assert_eq!(st & status::FEATURES_OK, 0, "bit 4 was not offered");
        let st = negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 3);
        assert_eq!(st, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1 | 1 << 3);
        // Features are fixed once FEATURES_OK is set.
        t.w(R_DRIVER_FEATURES, 0);
        assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1 | 1 << 3);
    }

    #[test]
    fn status_moves_forward_only() {
        let mut t = transport();
        t.w(R_STATUS, status::DRIVER);
        assert_eq!(t.r(R_STATUS), 0, "DRIVER before ACKNOWLEDGE");
        t.w(R_STATUS, status::ACKNOWLEDGE);
        t.w(R_STATUS, status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
        assert_eq!(t.r(R_STATUS), status::ACKNOWLEDGE, "two steps at once");
        t.w(R_STATUS, status::ACKNOWLEDGE | status::FAILED);
        assert_eq!(t.r(R_STATUS), status::ACKNOWLEDGE | status::FAILED);
    }

    #[test]
    fn queue_registers_only_between_features_ok_and_driver_ok() {
        let mut t = transport();
        t.w(R_QUEUE_NUM, 4);
        t.w(R_QUEUE_READY, 1);
        assert_eq!(t.r(R_QUEUE_NUM), 16);
        assert_eq!(t.r(R_QUEUE_READY), 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 1, 4, 0x1000, 0x2000, 0x3000);
        let q = &t.queues()[1];
        assert_eq!((q.size(), q.ready()), (4, true));
        assert_eq!((q.desc_table(), q.avail_ring(), q.used_ring()), (0x1000, 0x2000, 0x3000));
        // Not a power of two: refused.
        t.w(R_QUEUE_NUM, 3);
        assert_eq!(t.r(R_QUEUE_NUM), 4);
        t.w(R_STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        assert_eq!(t.device().activated, Some(VIRTIO_F_VERSION_1));
        t.w(R_QUEUE_NUM, 8);
        assert_eq!(t.r(R_QUEUE_NUM), 4);
    }

    #[test]
    fn queue_outside_memory_makes_driver_ok_need_a_reset() {
        let mut t = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 16, 0x10_0000, 0x2000, 0x3000);
        t.w(R_STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        assert_ne!(t.r(R_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(t.r(R_INTERRUPT_STATUS), INTERRUPT_CONFIG);
        assert_eq!(t.trigger().count(), 1);
        assert_eq!(t.device().activated, None);
        // Notifications go nowhere until the driver resets the device.
        t.w(R_QUEUE_NOTIFY, 0);
        assert_eq!(t.trigger().count(), 1);
        // Linux then adds FAILED to the status it read back.
        let st = t.r(R_STATUS);
        t.w(R_STATUS, st | status::FAILED);
        assert_eq!(t.r(R_STATUS), st | status::FAILED);
        t.w(R_STATUS, 0);
        assert_eq!(t.r(R_STATUS), 0);
    }

    #[test]
    fn notify_uses_buffers_and_interrupts_then_ack_clears() {
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        let mut t = transport();
        let mem = t.mem.clone();
        let mq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 16, mq.desc_table_addr().0, mq.avail_addr().0, mq.used_addr().0);
        t.w(R_QUEUE_NOTIFY, 0);
        assert_eq!(t.trigger().count(), 0, "notify before DRIVER_OK");
        t.w(R_STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        let descs = [RawDescriptor::from(Descriptor::new(0x8000, 16, 0, 0))];
        mq.add_desc_chains(&descs, 0).unwrap();
        t.w(R_QUEUE_NOTIFY, 0);
        assert_eq!(t.trigger().count(), 1);
        assert_eq!(t.r(R_INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);
        assert_eq!(mq.used().idx().load(), 1);
        assert_eq!(mq.used().ring().ref_at(0).unwrap().load().len(), 7);
        t.w(R_INTERRUPT_ACK, INTERRUPT_USED_BUFFER);
        assert_eq!(t.r(R_INTERRUPT_STATUS), 0);
        // Nothing new: no interrupt.
        t.w(R_QUEUE_NOTIFY, 0);
        assert_eq!(t.trigger().count(), 1);
        // A queue that does not exist, or is not ready.
        t.w(R_QUEUE_NOTIFY, 1);
        t.w(R_QUEUE_NOTIFY, 9);
        assert_eq!(t.trigger().count(), 1);
    }

    #[test]
    fn reset_clears_everything() {
        let mut t = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 8, 0x1000, 0x2000, 0x3000);
        t.w(R_STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        let resets = t.device().resets;
        t.w(R_STATUS, 0);
        assert_eq!(t.r(R_STATUS), 0);
        assert_eq!(t.acked_features(), 0);
        assert_eq!(t.device().resets, resets + 1);
        assert_eq!(t.device().activated, None);
        let q = &t.queues()[0];
        assert!(!q.ready());
        assert_eq!(q.size(), 16);
        assert_eq!(q.next_avail(), 0);
        assert_eq!(q.desc_table(), 0);
    }

    #[test]
    fn odd_widths_are_ignored() {
        let mut t = transport();
        let mut b = [0xffu8; 2];
        t.read(R_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        t.read(R_MAGIC + 1, &mut b);
        assert_eq!(b, [0; 4]);
        t.write(R_STATUS, &[1]);
        assert_eq!(t.r(R_STATUS), 0);
        // Reads and writes at offsets past any register do not panic.
        assert_eq!(t.r(0xf8), 0);
        t.w(0xf8, 1);
    }
}

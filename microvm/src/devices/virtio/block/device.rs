//! The virtio-blk device: an image file, its size in sectors, and the request loop.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::request::{Buffers, Request, RequestType};
use super::{
    BlockError, ID_BYTES, QUEUE_SIZE, SECTOR_SHIFT, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_S_OK, VIRTIO_ID_BLOCK,
};
use crate::devices::virtio::{VirtioDevice, VirtioError, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC};

/// The largest single pread/pwrite through the bounce buffer.
const BOUNCE_MAX: usize = 1 << 20;
/// The configuration space fields the device fills: capacity (le64), size_max (le32, not
/// offered: 0), seg_max (le32).
const CONFIG_LEN: usize = 16;

/// A virtio block device backed by an image file.
#[derive(Debug)]
pub struct Block {
    file: File,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_BYTES],
    config: [u8; CONFIG_LEN],
    bounce: Vec<u8>,
}

impl Block {
    /// Opens the image at `path`, for reading only or for reading and writing.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(BlockError::Open)?;
        Self::new(file, read_only)
    }

    /// A device on an open image; `read_only` makes it refuse writes (the file may be
    /// writable). Its capacity is the file's size, rounded down to whole sectors.
    pub fn new(mut file: File, read_only: bool) -> Result<Self, BlockError> {
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size = file.seek(SeekFrom::End(0)).map_err(BlockError::Size)?;
        let meta = file.metadata().map_err(BlockError::Size)?;
        let capacity = size >> SECTOR_SHIFT;
        if size % (1 << SECTOR_SHIFT) != 0 {
            tracing::warn!(size, "disk image size is not a multiple of 512; the last partial sector is not visible");
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..8].copy_from_slice(&capacity.to_le_bytes());
        // With indirect descriptors a request is one ring slot whatever its segment count;
        // keep the cap a direct chain would also fit in (header and status take two).
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        Ok(Block { file, read_only, capacity, id: disk_id(&meta), config, bounce: Vec::new() })
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the device refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The id the guest reads with GET_ID (`/sys/block/vdX/serial`).
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// Runs one request; returns the used length (bytes written to the guest, status included).
    fn handle(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let buffers = match Buffers::from_chain(chain) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "virtio-blk request dropped");
                return 0;
            }
        };
        let Some(status_addr) = buffers.status_addr() else {
            tracing::debug!(error = %BlockError::NoStatus, "virtio-blk request dropped");
            return 0;
        };
        let (status, written) = match Request::parse(&buffers, mem).and_then(|r| self.execute(&r, mem)) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(e) => {
                match &e {
                    BlockError::Io(_) => {
                        tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "virtio-blk request failed")
                    }
                    _ => tracing::debug!(error = %e, "virtio-blk request refused"),
                }
                (e.status(), 0)
            }
        };
        match mem.write_obj(status, status_addr) {
            Ok(()) => written.saturating_add(1),
            Err(e) => {
                tracing::debug!(error = %e, "virtio-blk status byte outside guest memory");
                0
            }
        }
    }

    /// Does what `req` asks; returns how many data bytes went to the guest.
    fn execute(&mut self, req: &Request, mem: &GuestMemoryMmap) -> Result<u32, BlockError> {
        // A chain is shorter than 4 GiB (virtio-queue stops longer ones).
        let data_len = u32::try_from(req.data.len()).unwrap_or(u32::MAX);
        match req.request_type {
            RequestType::In => {
                let offset = req.checked_offset(self.capacity)?;
                self.read_to_guest(req, offset, mem)?;
                Ok(data_len)
            }
            RequestType::Out => {
                if self.read_only {
                    return Err(BlockError::ReadOnly);
                }
                let offset = req.checked_offset(self.capacity)?;
                self.write_from_guest(req, offset, mem)?;
                Ok(0)
            }
            RequestType::Flush => {
                if !self.read_only {
                    self.file.sync_data().map_err(BlockError::Io)?;
                }
                Ok(0)
            }
            RequestType::GetId => {
                let n = self.id.len().min(req.data.len() as usize);
                req.data.write_from(mem, 0, &self.id[..n])?;
                Ok(n as u32)
            }
            RequestType::Unsupported(t) => Err(BlockError::Unsupported(t)),
        }
    }

    fn read_to_guest(&mut self, req: &Request, offset: u64, mem: &GuestMemoryMmap) -> Result<(), BlockError> {
        let mut done = 0u64;
        while done < req.data.len() {
            let n = bounce_len(req.data.len() - done);
            let buf = bounce(&mut self.bounce, n);
            self.file.read_exact_at(buf, offset + done).map_err(BlockError::Io)?;
            req.data.write_from(mem, done, buf)?;
            done += n as u64;
        }
        Ok(())
    }

    fn write_from_guest(&mut self, req: &Request, offset: u64, mem: &GuestMemoryMmap) -> Result<(), BlockError> {
        let mut done = 0u64;
        while done < req.data.len() {
            let n = bounce_len(req.data.len() - done);
            let buf = bounce(&mut self.bounce, n);
            req.data.read_into(mem, done, buf)?;
            self.file.write_all_at(buf, offset + done).map_err(BlockError::Io)?;
            done += n as u64;
        }
        Ok(())
    }
}

fn bounce_len(remaining: u64) -> usize {
    usize::try_from(remaining).map_or(BOUNCE_MAX, |r| r.min(BOUNCE_MAX))
}

/// The first `n` bytes of the bounce buffer, grown as needed (up to [`BOUNCE_MAX`]).
fn bounce(buf: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if buf.len() < n {
        buf.resize(n, 0);
    }
    &mut buf[..n]
}

/// A stable id for the image: device, rdev and inode numbers in hex, like Firecracker's.
fn disk_id(meta: &std::fs::Metadata) -> [u8; ID_BYTES] {
    let text = format!("{:x}{:x}{:x}", meta.dev(), meta.rdev(), meta.ino());
    let mut id = [0u8; ID_BYTES];
    let n = text.len().min(ID_BYTES);
    id[..n].copy_from_slice(&text.as_bytes()[..n]);
    id
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH | ro
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *byte = at.and_then(|at| self.config.get(at)).copied().unwrap_or(0);
        }
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<usize, VirtioError> {
        let mut used = 0;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = self.handle(chain, mem);
            queue.add_used(mem, head, len).map_err(|source| VirtioError::UsedRing { queue: index, source })?;
            used += 1;
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use super::super::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
    };
    use super::*;
    use crate::devices::virtio::mmio::tests::*;
    use crate::devices::virtio::mmio::{MmioTransport, CONFIG_SPACE};
    use crate::devices::virtio::{status, INTERRUPT_USED_BUFFER};
    use crate::devices::BusDevice;

    const QUEUE_AT: u64 = 0x1000;
    const QUEUE_LEN: u16 = 16;
    const HEADER: u64 = 0x4000;
    const STATUS: u64 = 0x5000;
    const DATA: u64 = 0x8000;
    const SECTORS: u64 = 64;

    type Transport = MmioTransport<Block, CountingTrigger>;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// A temp image of `SECTORS` sectors, sector `i` filled with byte `i`.
    fn image() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for i in 0..SECTORS {
            f.write_all(&[i as u8; 512]).unwrap();
        }
        f.flush().unwrap();
        f
    }

    fn contents(f: &tempfile::NamedTempFile) -> Vec<u8> {
        std::fs::read(f.path()).unwrap()
    }

    /// The driver side: Linux's handshake up to DRIVER_OK with one queue at `mq`.
    fn driver_ok(t: &mut Transport, mq: &MockSplitQueue<'_, GuestMemoryMmap>) {
        let offered = read_device_features(t);
        assert_eq!(negotiate(t, offered) & status::FEATURES_OK, status::FEATURES_OK);
        t.w(R_QUEUE_SEL, 0);
        assert_eq!(t.r(R_QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
        setup_queue(t, 0, QUEUE_LEN, mq.desc_table_addr().0, mq.avail_addr().0, mq.used_addr().0);
        t.w(R_STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        assert_eq!(t.r(R_STATUS), status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    }

    fn setup(
        mem: &GuestMemoryMmap,
        read_only: bool,
    ) -> (tempfile::NamedTempFile, Transport, MockSplitQueue<'_, GuestMemoryMmap>) {
        let img = image();
        let block = Block::open(img.path(), read_only).unwrap();
        let mut t = MmioTransport::new(block, CountingTrigger::default(), mem.clone());
        let mq = MockSplitQueue::create(mem, GuestAddress(QUEUE_AT), QUEUE_LEN);
        driver_ok(&mut t, &mq);
        (img, t, mq)
    }

    fn write_header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
    }

    /// Puts one chain of `(addr, len, device-writable)` descriptors in the queue, notifies,
    /// and returns the used ring entry's length.
    fn submit(t: &mut Transport, mq: &MockSplitQueue<'_, GuestMemoryMmap>, descs: &[(u64, u32, bool)]) -> u32 {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let mut flags = if writable { VRING_DESC_F_WRITE as u16 } else { 0 };
                let mut next = 0;
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                    next = i as u16 + 1;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        // Requests complete synchronously, so each chain can reuse descriptors from 0.
        mq.add_desc_chains(&raw, 0).unwrap();
        let before = mq.used().idx().load();
        let interrupts = t.trigger().count();
        t.w(R_QUEUE_NOTIFY, 0);
        let after = mq.used().idx().load();
        assert_eq!(after, before.wrapping_add(1), "one chain used");
        assert_eq!(t.trigger().count(), interrupts + 1, "one interrupt");
        assert_eq!(t.r(R_INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);
        t.w(R_INTERRUPT_ACK, INTERRUPT_USED_BUFFER);
        let elem = mq.used().ring().ref_at(usize::from(before % QUEUE_LEN)).unwrap().load();
        assert_eq!(elem.id(), 0, "head index");
        elem.len()
    }

    fn status_byte(mem: &GuestMemoryMmap) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn reset_status(mem: &GuestMemoryMmap) {
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    #[test]
    fn handshake_features_and_capacity() {
        let mem = memory();
        for read_only in [false, true] {
            let img = image();
            let mut t = MmioTransport::new(
                Block::open(img.path(), read_only).unwrap(),
                CountingTrigger::default(),
                mem.clone(),
            );
            assert_eq!(t.r(R_MAGIC), 0x7472_6976);
            assert_eq!(t.r(R_VERSION), 2);
            assert_eq!(t.r(R_DEVICE_ID), 2);
            let features = read_device_features(&mut t);
            assert_ne!(features & VIRTIO_F_VERSION_1, 0);
            assert_ne!(features & VIRTIO_BLK_F_FLUSH, 0);
            assert_eq!(features & VIRTIO_BLK_F_RO != 0, read_only);
            // capacity as Linux reads a 64-bit field: two 32-bit halves.
            assert_eq!(t.r(CONFIG_SPACE), SECTORS as u32);
            assert_eq!(t.r(CONFIG_SPACE + 4), 0);
            let mut cap = [0u8; 8];
            t.read(CONFIG_SPACE, &mut cap);
            assert_eq!(u64::from_le_bytes(cap), SECTORS);
            assert_eq!(t.r(CONFIG_SPACE + 12), 254, "seg_max");
            assert_eq!(t.r(CONFIG_SPACE + 0x40), 0, "past the fields the device fills");
            let mq = MockSplitQueue::create(&mem, GuestAddress(QUEUE_AT), QUEUE_LEN);
            driver_ok(&mut t, &mq);
            assert_eq!(t.acked_features(), features);
            assert_eq!(t.trigger().count(), 0);
        }
    }

    #[test]
    fn write_then_read_round_trip() {
        let mem = memory();
        let (img, mut t, mq) = setup(&mem, false);
        // Three sectors at sector 2, from two guest buffers.
        let payload: Vec<u8> = (0..1536u32).map(|i| (i * 7 % 251) as u8).collect();
        mem.write_slice(&payload[..1024], GuestAddress(DATA)).unwrap();
        mem.write_slice(&payload[1024..], GuestAddress(DATA + 0x2000)).unwrap();
        write_header(&mem, VIRTIO_BLK_T_OUT, 2);
        reset_status(&mem);
        let used = submit(
            &mut t,
            &mq,
            &[(HEADER, 16, false), (DATA, 1024, false), (DATA + 0x2000, 512, false), (STATUS, 1, true)],
        );
        assert_eq!(used, 1, "only the status byte is written to the guest");
        assert_eq!(status_byte(&mem), VIRTIO_BLK_S_OK);
        let disk = contents(&img);
        assert_eq!(&disk[1024..2560], &payload[..]);
        assert_eq!(&disk[..1024], &[[0u8; 512], [1u8; 512]].concat()[..]);
        assert_eq!(&disk[2560..3072], &[5u8; 512][..], "sector after the write untouched");

        // Read sectors 1..=4 back into three other buffers.
        write_header(&mem, VIRTIO_BLK_T_IN, 1);
        reset_status(&mem);
        let used = submit(
            &mut t,
            &mq,
            &[
                (HEADER, 16, false),
                (0x2_0000, 512, true),
                (0x3_0000, 1024, true),
                (0x4_0000, 512, true),
                (STATUS, 1, true),
            ],
        );
        assert_eq!(used, 2048 + 1);
        assert_eq!(status_byte(&mem), VIRTIO_BLK_S_OK);
        let mut got = vec![0u8; 2048];
        mem.read_slice(&mut got[..512], GuestAddress(0x2_0000)).unwrap();
        mem.read_slice(&mut got[512..1536], GuestAddress(0x3_0000)).unwrap();
        mem.read_slice(&mut got[1536..], GuestAddress(0x4_0000)).unwrap();
        assert_eq!(&got[..512], &[1u8; 512][..]);
        assert_eq!(&got[512..], &payload[..]);
        assert_eq!(t.trigger().count(), 2);
    }

    #[test]
    fn large_read_goes_through_the_bounce_buffer_in_pieces() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let disk: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 253) as u8).collect();
        f.write_all(&disk).unwrap();
        let mut t = MmioTransport::new(Block::open(f.path(), true).unwrap(), CountingTrigger::default(), mem.clone());
        let mq = MockSplitQueue::create(&mem, GuestAddress(QUEUE_AT), QUEUE_LEN);
        driver_ok(&mut t, &mq);
        write_header(&mem, VIRTIO_BLK_T_IN, 1);
        let len = (BOUNCE_MAX + 4096) as u32;
        let used = submit(&mut t, &mq, &[(HEADER, 16, false), (0x10_0000, len, true), (STATUS, 1, true)]);
        assert_eq!(used, len + 1);
        let mut got = vec![0u8; len as usize];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert!(got == disk[512..512 + len as usize]);
    }

    #[test]
    fn flush_get_id_and_unsupported() {
        let mem = memory();
        let (_img, mut t, mq) = setup(&mem, false);
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        reset_status(&mem);
        assert_eq!(submit(&mut t, &mq, &[(HEADER, 16, false), (STATUS, 1, true)]), 1);
        assert_eq!(status_byte(&mem), VIRTIO_BLK_S_OK);

        write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        reset_status(&mem);
        assert_eq!(submit(&mut t, &mq, &[(HEADER, 16, false), (DATA, 20, true), (STATUS, 1, true)]), 21);
        assert_eq!(status_byte(&mem), VIRTIO_BLK_S_OK);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, t.device().id());
        assert!(id[0].is_ascii_hexdigit());

        write_header(&mem, 11, 0); // DISCARD, not offered
        reset_status(&mem);
        assert_eq!(submit(&mut t, &mq, &[(HEADER, 16, false), (DATA, 16, false), (STATUS, 1, true)]), 1);
        assert_eq!(status_byte(&mem), VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn out_of_range_is_an_io_error() {
        let mem = memory();
        let (img, mut t, mq) = setup(&mem, false);
        let before = contents(&img);
        for (request_type, sector) in
            [(VIRTIO_BLK_T_IN, SECTORS - 1), (VIRTIO_BLK_T_OUT, SECTORS - 1), (VIRTIO_BLK_T_IN, u64::MAX / 256)]
        {
            write_header(&mem, request_type, sector);
            reset_status(&mem);
            let data_writable = request_type == VIRTIO_BLK_T_IN;
            assert_eq!(submit(&mut t, &mq, &[(HEADER, 16, false), (DATA, 1024, data_writable), (STATUS, 1, true)]), 1);
            assert_eq!(status_byte(&mem), VIRTIO_BLK_S_IOERR, "type {request_type} sector {sector}");
        }
        assert_eq!(contents(&img), before);
        // The last sector itself is fine.
        write_header(&mem, VIRTIO_BLK_T_IN, SECTORS - 1);
        assert_eq!(submit(&mut t, &mq, &[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]), 513);
        assert_eq!(status_byte(&mem), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let mem = memory();
        let (img, mut t, mq) = setup(&mem, true);
        assert_ne!(t.acked_features() & VIRTIO_BLK_F_RO, 0);
        let before = contents(&img);
        mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        reset_status(&mem);
        assert_eq!(submit(&mut t, &mq, &[(HEADER, 16, false), (DATA, 512, false), (STATUS, 1, true)]), 1);
        assert_eq!(status_byte(&mem), VIRTIO_BLK_S_IOERR);
        assert_eq!(contents(&img), before);
        // Reads and flushes still work.
        write_header(&mem, VIRTIO_BLK_T_IN, 3);
        assert_eq!(submit(&mut t, &mq, &[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]), 513);
        let mut got = [0u8; 512];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [3u8; 512]);
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        reset_status(&mem);
        assert_eq!(submit(&mut t, &mq, &[(HEADER, 16, false), (STATUS, 1, true)]), 1);
        assert_eq!(status_byte(&mem), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn malformed_chains_are_answered_without_panic() {
        let mem = memory();
        let (img, mut t, mq) = setup(&mem, false);
        let before = contents(&img);
        mem.write_slice(&[0xbb; 512], GuestAddress(DATA)).unwrap();

        // Status descriptor not writable: nowhere to report, used length 0, nothing written.
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        reset_status(&mem);
        assert_eq!(submit(&mut t, &mq, &[(HEADER, 16, false), (DATA, 512, false), (STATUS, 1, false)]), 0);
        assert_eq!(status_byte(&mem), 0xff);
        // Readable after writable: dropped the same way.
        assert_eq!(submit(&mut t, &mq, &[(HEADER, 16, false), (STATUS, 1, true), (DATA, 512, false)]), 0);
        // A lone descriptor.
        assert_eq!(submit(&mut t, &mq, &[(HEADER, 16, false)]), 0);
        // Header too short: IOERR.
        assert_eq!(submit(&mut t, &mq, &[(HEADER, 8, false), (STATUS, 1, true)]), 1);
        assert_eq!(status_byte(&mem), VIRTIO_BLK_S_IOERR);
        // Data not a whole number of sectors: IOERR.
        reset_status(&mem);
        assert_eq!(submit(&mut t, &mq, &[(HEADER, 16, false), (DATA, 500, false), (STATUS, 1, true)]), 1);
        assert_eq!(status_byte(&mem), VIRTIO_BLK_S_IOERR);
        // Data outside guest memory: IOERR.
        reset_status(&mem);
        assert_eq!(submit(&mut t, &mq, &[(HEADER, 16, false), (0xff_fe00, 1024, false), (STATUS, 1, true)]), 1);
        assert_eq!(status_byte(&mem), VIRTIO_BLK_S_IOERR);
        // Status byte outside guest memory: used length 0.
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(submit(&mut t, &mq, &[(HEADER, 16, false), (DATA, 512, true), (0x1_0000_0000, 1, true)]), 0);
        assert_eq!(contents(&img), before);
        // The device still works afterwards.
        write_header(&mem, VIRTIO_BLK_T_IN, 9);
        reset_status(&mem);
        assert_eq!(submit(&mut t, &mq, &[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]), 513);
        assert_eq!(status_byte(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(t.r(R_STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn indirect_descriptor_table() {
        let mem = memory();
        let (_img, mut t, mq) = setup(&mem, false);
        write_header(&mem, VIRTIO_BLK_T_IN, 4);
        let table = 0x6000u64;
        let entries = [
            Descriptor::new(HEADER, 16, VRING_DESC_F_NEXT as u16, 1),
            Descriptor::new(DATA, 1024, (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16, 2),
            Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, d) in entries.iter().enumerate() {
            mem.write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64)).unwrap();
        }
        let head = Descriptor::new(table, 16 * entries.len() as u32, VRING_DESC_F_INDIRECT as u16, 0);
        mq.add_desc_chains(&[RawDescriptor::from(head)], 0).unwrap();
        t.w(R_QUEUE_NOTIFY, 0);
        assert_eq!(mq.used().idx().load(), 1);
        assert_eq!(mq.used().ring().ref_at(0).unwrap().load().len(), 1025);
        assert_eq!(status_byte(&mem), VIRTIO_BLK_S_OK);
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [[4u8; 512], [5u8; 512]].concat());
    }

    #[test]
    fn reset_clears_queue_state_and_the_device_comes_back() {
        let mem = memory();
        let (_img, mut t, mq) = setup(&mem, false);
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        submit(&mut t, &mq, &[(HEADER, 16, false), (STATUS, 1, true)]);
        submit(&mut t, &mq, &[(HEADER, 16, false), (STATUS, 1, true)]);
        assert_eq!(t.queues()[0].next_avail(), 2);
        t.w(R_INTERRUPT_ACK, 0); // nothing pending
        t.w(R_STATUS, 0);
        assert_eq!(t.r(R_STATUS), 0);
        assert_eq!(t.acked_features(), 0);
        let q = &t.queues()[0];
        assert!(!q.ready());
        assert_eq!((q.next_avail(), q.next_used(), q.size()), (0, 0, QUEUE_SIZE));
        // Notifications after a reset do nothing.
        let interrupts = t.trigger().count();
        t.w(R_QUEUE_NOTIFY, 0);
        assert_eq!(t.trigger().count(), interrupts);
        // A new handshake with fresh rings elsewhere works.
        let mq2 = MockSplitQueue::create(&mem, GuestAddress(0xa000), QUEUE_LEN);
        driver_ok(&mut t, &mq2);
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(submit(&mut t, &mq2, &[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]), 513);
        assert_eq!(mq.used().idx().load(), 2, "old rings untouched");
    }

    #[test]
    fn capacity_rounds_down_and_open_errors() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 4096 + 100]).unwrap();
        let b = Block::open(f.path(), false).unwrap();
        assert_eq!(b.capacity(), 8);
        assert!(!b.read_only());
        let err = Block::open(Path::new("/nonexistent/disk.img"), true).unwrap_err();
        assert!(matches!(&err, BlockError::Open(e) if e.kind() == std::io::ErrorKind::NotFound), "{err:?}");
    }
}

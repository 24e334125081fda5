//! A virtio-blk request as a descriptor chain lays it out (5.2.6):
//!
//! ```text
//! device-readable:  type (le32) | reserved (le32) | sector (le64) | data (OUT)
//! device-writable:  data (IN, GET_ID)                             | status (u8)
//! ```
//!
//! The layout is read as two byte streams, so any split into descriptors works (Linux uses
//! one descriptor for the header, one per data segment and one for the status).

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{
    BlockError, REQUEST_HEADER_LEN, SECTOR_SIZE, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};

/// What a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the guest.
    In,
    /// Write sectors from the guest.
    Out,
    /// Make written data durable.
    Flush,
    /// Read the device id.
    GetId,
    /// Anything else (DISCARD, WRITE_ZEROES, ...): answered with UNSUPP.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            other => RequestType::Unsupported(other),
        }
    }
}

/// Guest buffers seen as one byte stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Segments {
    parts: Vec<(GuestAddress, u32)>,
    len: u64,
}

impl Segments {
    fn push(&mut self, addr: GuestAddress, len: u32) {
        if len > 0 {
            self.parts.push((addr, len));
            self.len += u64::from(len);
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The guest pieces covering bytes `start..start + len` of the stream, in order.
    pub fn pieces(&self, start: u64, len: u64) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
        let end = start.saturating_add(len).min(self.len);
        let mut pos = 0u64;
        self.parts.iter().filter_map(move |&(addr, part_len)| {
            let part_start = pos;
            let part_end = pos + u64::from(part_len);
            pos = part_end;
            let from = start.max(part_start);
            let to = end.min(part_end);
            // `to - from` is at most `part_len`, a u32.
            (from < to).then(|| (GuestAddress(addr.0.wrapping_add(from - part_start)), (to - from) as usize))
        })
    }

    /// The stream without its first `n` bytes.
    fn skip(&self, n: u64) -> Segments {
        let mut out = Segments::default();
        for (addr, len) in self.pieces(n, self.len.saturating_sub(n)) {
            out.push(addr, len as u32);
        }
        out
    }

    /// The stream without its last `n` bytes.
    fn truncate_end(&self, n: u64) -> Segments {
        let mut out = Segments::default();
        for (addr, len) in self.pieces(0, self.len.saturating_sub(n)) {
            out.push(addr, len as u32);
        }
        out
    }

    /// Whether every byte is in guest memory.
    pub fn in_memory(&self, mem: &GuestMemoryMmap) -> bool {
        self.parts.iter().all(|&(addr, len)| GuestMemoryBackend::check_range(mem, addr, len as usize))
    }

    /// Copies bytes `start..start + buf.len()` of the stream into `buf`.
    pub fn read_into(&self, mem: &GuestMemoryMmap, start: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let mut done = 0;
        for (addr, len) in self.pieces(start, buf.len() as u64) {
            mem.read_slice(&mut buf[done..done + len], addr).map_err(BlockError::GuestMemory)?;
            done += len;
        }
        Ok(())
    }

    /// Copies `buf` to bytes `start..start + buf.len()` of the stream.
    pub fn write_from(&self, mem: &GuestMemoryMmap, start: u64, buf: &[u8]) -> Result<(), BlockError> {
        let mut done = 0;
        for (addr, len) in self.pieces(start, buf.len() as u64) {
            mem.write_slice(&buf[done..done + len], addr).map_err(BlockError::GuestMemory)?;
            done += len;
        }
        Ok(())
    }
}

/// A descriptor chain split into what the device reads and what it writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Buffers {
    /// Device-readable bytes (header, then OUT data).
    pub readable: Segments,
    /// Device-writable bytes (IN data, then the status byte).
    pub writable: Segments,
}

impl Buffers {
    /// Splits a chain; readable descriptors must all come before writable ones (2.7.4.2).
    pub fn from_chain(descriptors: impl Iterator<Item = Descriptor>) -> Result<Buffers, BlockError> {
        let mut b = Buffers::default();
        for d in descriptors {
            if d.is_write_only() {
                b.writable.push(d.addr(), d.len());
            } else if b.writable.is_empty() {
                b.readable.push(d.addr(), d.len());
            } else {
                return Err(BlockError::ReadableAfterWritable);
            }
        }
        Ok(b)
    }

    /// Where the status byte goes: the last writable byte.
    pub fn status_addr(&self) -> Option<GuestAddress> {
        let (addr, len) = self.writable.pieces(self.writable.len().checked_sub(1)?, 1).next()?;
        (len == 1).then_some(addr)
    }
}

/// A parsed request, its buffers checked against guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What it asks.
    pub request_type: RequestType,
    /// The first sector (IN and OUT).
    pub sector: u64,
    /// The data buffers: readable for OUT, writable for IN and GET_ID, empty otherwise.
    pub data: Segments,
}

impl Request {
    /// Reads the header and finds the data. The status byte is the caller's: it exists
    /// ([`Buffers::status_addr`]) whenever this returns `Ok`.
    pub fn parse(buffers: &Buffers, mem: &GuestMemoryMmap) -> Result<Request, BlockError> {
        if buffers.writable.is_empty() {
            return Err(BlockError::NoStatus);
        }
        if buffers.readable.len() < REQUEST_HEADER_LEN as u64 {
            return Err(BlockError::HeaderTooShort(buffers.readable.len()));
        }
        let mut header = [0u8; REQUEST_HEADER_LEN];
        buffers.readable.read_into(mem, 0, &mut header)?;
        let [t0, t1, t2, t3, _, _, _, _, s @ ..] = header;
        let request_type = RequestType::from(u32::from_le_bytes([t0, t1, t2, t3]));
        let sector = u64::from_le_bytes(s);
        let data = match request_type {
            RequestType::Out => buffers.readable.skip(REQUEST_HEADER_LEN as u64),
            RequestType::In | RequestType::GetId => buffers.writable.truncate_end(1),
            RequestType::Flush | RequestType::Unsupported(_) => Segments::default(),
        };
        if matches!(request_type, RequestType::In | RequestType::Out) && data.len() % SECTOR_SIZE != 0 {
            return Err(BlockError::NotSectorMultiple(data.len()));
        }
        if !data.in_memory(mem) {
            return Err(BlockError::BufferOutsideMemory);
        }
        Ok(Request { request_type, sector, data })
    }

    /// The byte offset in the image, once the range `[sector, sector + data)` is checked to
    /// lie inside a disk of `capacity` sectors.
    pub fn checked_offset(&self, capacity: u64) -> Result<u64, BlockError> {
        let out_of_range = || BlockError::OutOfRange { sector: self.sector, len: self.data.len(), capacity };
        let offset = self.sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)?;
        let end = offset.checked_add(self.data.len()).ok_or_else(out_of_range)?;
        if end > capacity.saturating_mul(SECTOR_SIZE) {
            return Err(out_of_range());
        }
        Ok(offset)
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;

    use super::*;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, at: u64, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn buffers(descs: &[(u64, u32, u16)]) -> Result<Buffers, BlockError> {
        Buffers::from_chain(descs.iter().map(|&(a, l, f)| Descriptor::new(a, l, f, 0)))
    }

    #[test]
    fn pieces_cut_across_segments() {
        let b = buffers(&[(0x100, 4, 0), (0x200, 0, 0), (0x300, 6, 0)]).unwrap();
        assert_eq!(b.readable.len(), 10);
        let p: Vec<_> = b.readable.pieces(2, 5).collect();
        assert_eq!(p, vec![(GuestAddress(0x102), 2), (GuestAddress(0x300), 3)]);
        assert_eq!(b.readable.pieces(9, 100).collect::<Vec<_>>(), vec![(GuestAddress(0x305), 1)]);
        assert_eq!(b.readable.pieces(10, 1).count(), 0);
        assert_eq!(b.status_addr(), None);
    }

    #[test]
    fn linux_layout_in() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 7);
        let b = buffers(&[(0x1000, 16, 0), (0x2000, 1024, W), (0x3000, 1, W)]).unwrap();
        assert_eq!(b.status_addr(), Some(GuestAddress(0x3000)));
        let r = Request::parse(&b, &m).unwrap();
        assert_eq!((r.request_type, r.sector, r.data.len()), (RequestType::In, 7, 1024));
        assert_eq!(r.checked_offset(9).unwrap(), 7 * 512);
        assert!(matches!(r.checked_offset(8), Err(BlockError::OutOfRange { sector: 7, len: 1024, capacity: 8 })));
    }

    #[test]
    fn merged_layout_out() {
        // Header and data in one readable descriptor, data and status in one writable.
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 1);
        let b = buffers(&[(0x1000, 16 + 512, 0), (0x3000, 1, W)]).unwrap();
        let r = Request::parse(&b, &m).unwrap();
        assert_eq!(r.request_type, RequestType::Out);
        assert_eq!(r.data.pieces(0, 512).collect::<Vec<_>>(), vec![(GuestAddress(0x1010), 512)]);
        header(&m, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        let b = buffers(&[(0x1000, 16, 0), (0x2000, 21, W)]).unwrap();
        assert_eq!(b.status_addr(), Some(GuestAddress(0x2014)));
        assert_eq!(Request::parse(&b, &m).unwrap().data.len(), 20);
    }

    #[test]
    fn malformed_chains() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert!(matches!(
            buffers(&[(0x1000, 16, 0), (0x2000, 1, W), (0x3000, 4, 0)]),
            Err(BlockError::ReadableAfterWritable)
        ));
        let b = buffers(&[(0x1000, 16, 0), (0x2000, 1, 0)]).unwrap();
        assert!(matches!(Request::parse(&b, &m), Err(BlockError::NoStatus)));
        let b = buffers(&[(0x1000, 8, 0), (0x2000, 1, W)]).unwrap();
        assert!(matches!(Request::parse(&b, &m), Err(BlockError::HeaderTooShort(8))));
        let b = buffers(&[(0x1000, 16, 0), (0x2000, 100, W), (0x3000, 1, W)]).unwrap();
        assert!(matches!(Request::parse(&b, &m), Err(BlockError::NotSectorMultiple(100))));
        let b = buffers(&[(0x1000, 16, 0), (0xfe00, 1024, W), (0x3000, 1, W)]).unwrap();
        assert!(matches!(Request::parse(&b, &m), Err(BlockError::BufferOutsideMemory)));
        let b = buffers(&[(0x1000, 16, 0), (u64::MAX - 10, 512, W), (0x3000, 1, W)]).unwrap();
        assert!(matches!(Request::parse(&b, &m), Err(BlockError::BufferOutsideMemory)));
        let b = buffers(&[(0xfff8, 16, 0), (0x3000, 1, W)]).unwrap();
        assert!(matches!(Request::parse(&b, &m), Err(BlockError::GuestMemory(_))));
        header(&m, 0x1000, VIRTIO_BLK_T_IN, u64::MAX);
        let b = buffers(&[(0x1000, 16, 0), (0x2000, 512, W), (0x3000, 1, W)]).unwrap();
        assert!(matches!(Request::parse(&b, &m).unwrap().checked_offset(u64::MAX), Err(BlockError::OutOfRange { .. })));
    }

    #[test]
    fn request_types() {
        assert_eq!(RequestType::from(0), RequestType::In);
        assert_eq!(RequestType::from(1), RequestType::Out);
        assert_eq!(RequestType::from(4), RequestType::Flush);
        assert_eq!(RequestType::from(8), RequestType::GetId);
        assert_eq!(RequestType::from(11), RequestType::Unsupported(11));
    }
}

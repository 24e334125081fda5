//! A tap device: the host end of a virtio-net device, opened with a virtio-net header in front
//! of every frame (IFF_VNET_HDR) so checksum and segmentation offloads pass through both ways.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{NetError, NET_HDR_LEN};

/// The longest interface name Linux takes, without its NUL.
pub const IFNAMSIZ: usize = 15;

/// Refuses what cannot be an interface's name.
pub fn check_tap_name(name: &str) -> Result<(), NetError> {
    let bad = |b: u8| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace();
    if name.is_empty() || name.len() > IFNAMSIZ || name == "." || name == ".." || name.bytes().any(bad) {
        return Err(NetError::TapName(name.to_owned()));
    }
    Ok(())
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the union is 24 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap device. Linux removes the interface when the last descriptor closes, so a VMM
/// that ends, however it ends, leaves no tap behind.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates the tap `name` (or attaches to it if it exists and is not in use), non-blocking,
    /// with 12-byte virtio-net v1 headers.
    pub fn open(name: &str) -> Result<Self, NetError> {
        check_tap_name(name)?;
        let fail = |op: &'static str| {
            let name = name.to_owned();
            move |source| NetError::Tap { name, op, source }
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(fail("open /dev/net/tun"))?;
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one (name, flags and
        // the rest of the union as padding), alive and exclusively borrowed for the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(fail("TUNSETIFF")(io::Error::last_os_error()));
        }
        let hdr_len = NET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at `hdr_len`.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) };
        if rc < 0 {
            return Err(fail("TUNSETVNETHDRSZ")(io::Error::last_os_error()));
        }
        Ok(Tap { file, name: name.to_owned() })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the tap may hand over: `TUN_F_*` bits (checksum, TSO), as the guest accepted them.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), NetError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long); no memory is
        // read or written.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        if rc < 0 {
            return Err(NetError::Tap {
                name: self.name.clone(),
                op: "TUNSETOFFLOAD",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// One frame scattered into the buffers `iov` describes; `WouldBlock` when none is
    /// waiting. A frame longer than the buffers is cut (the tap drops the rest).
    ///
    /// # Safety
    /// Every `iov` entry must describe memory that is valid for writes of its length for the
    /// duration of the call.
    pub unsafe fn read_frame_into(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the buffers; readv writes at most their lengths.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Sends one frame gathered from the buffers `iov` describes.
    ///
    /// # Safety
    /// Every `iov` entry must describe memory that is valid for reads of its length for the
    /// duration of the call.
    pub unsafe fn write_frame_from(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the buffers; writev only reads them.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

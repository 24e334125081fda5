//! Guest physical memory: anonymous, private, `MAP_NORESERVE` mappings from `vm-memory`, laid
//! out around the 32-bit MMIO gap so devices (boot timer, virtio-mmio) live at 3 GiB..4 GiB.

use twinbox_exit::ExitCode;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Start of the 32-bit MMIO gap; guest RAM above it continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The smallest guest this VMM builds.
pub const MIN_MEMORY_MIB: u32 = 1;

const MIB: u64 = 1 << 20;

/// Errors while laying out or mapping guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is zero.
    #[error("guest memory must be at least {MIN_MEMORY_MIB} MiB")]
    TooSmall,
    /// The requested size is larger than the host's RAM.
    #[error("guest memory of {requested_mib} MiB is more than the host's {host_mib} MiB of RAM")]
    MoreThanHost {
        /// What the configuration asked for.
        requested_mib: u64,
        /// `MemTotal` of the host.
        host_mib: u64,
    },
    /// The size does not fit the host's address space.
    #[error("guest memory of {0} MiB does not fit the host address space")]
    Overflow(u64),
    /// mmap of the guest memory failed.
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

impl ExitCode for MemoryError {
    fn exit_code(&self) -> i32 {
        match self {
            // The memory size asked for; mmap fails for a size the host cannot back.
            MemoryError::TooSmall
            | MemoryError::MoreThanHost { .. }
            | MemoryError::Overflow(_)
            | MemoryError::Map(_) => twinbox_exit::USER_ERROR,
        }
    }
}

/// The guest-physical ranges for `mib` MiB of RAM, split around the MMIO gap.
pub fn layout(mib: u64) -> Result<Vec<(GuestAddress, usize)>, MemoryError> {
    if mib < u64::from(MIN_MEMORY_MIB) {
        return Err(MemoryError::TooSmall);
    }
    let bytes = mib.checked_mul(MIB).ok_or(MemoryError::Overflow(mib))?;
    let to_usize = |n: u64| usize::try_from(n).map_err(|_| MemoryError::Overflow(mib));
    if bytes <= MMIO_GAP_START {
        return Ok(vec![(GuestAddress(0), to_usize(bytes)?)]);
    }
    let high = bytes - MMIO_GAP_START;
    MMIO_GAP_END.checked_add(high).ok_or(MemoryError::Overflow(mib))?;
    Ok(vec![(GuestAddress(0), to_usize(MMIO_GAP_START)?), (GuestAddress(MMIO_GAP_END), to_usize(high)?)])
}

/// `MemTotal` from /proc/meminfo, in MiB, if it can be read.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Checks `mib` against the host's RAM, then maps it.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges = layout(mib)?;
    if let Some(host_mib) = host_memory_mib() {
        if mib > host_mib {
            return Err(MemoryError::MoreThanHost { requested_mib: mib, host_mib });
        }
    }
    GuestMemoryMmap::from_ranges(&ranges).map_err(MemoryError::Map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(layout(128).unwrap(), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let r = layout(4096).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), 0xc000_0000));
        assert_eq!(r[1], (GuestAddress(0x1_0000_0000), 0x4000_0000));
    }

    #[test]
    fn zero_and_overflow_are_refused() {
        assert!(matches!(layout(0), Err(MemoryError::TooSmall)));
        assert!(matches!(layout(u64::MAX), Err(MemoryError::Overflow(_))));
    }

    #[test]
    fn more_than_host_is_refused() {
        let host = host_memory_mib().unwrap();
        let err = create_guest_memory(host + 1).unwrap_err();
        assert!(err.to_string().contains("more than the host"), "{err}");
    }

    #[test]
    fn maps_anonymous_memory() {
        let mem = create_guest_memory(2).unwrap();
        assert_eq!(mem.num_regions(), 1);
    }
}

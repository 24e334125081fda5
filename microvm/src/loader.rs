//! Kernel loading with linux-loader: an ELF vmlinux or a bzImage into guest memory, the
//! command line, an initramfs, and the zero page (boot_params with the e820 map) for the
//! Linux 64-bit boot protocol.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader, KernelLoaderResult};
use twinbox_exit::ExitCode;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::MAX_CMDLINE_LEN;
use crate::vstate::memory::MMIO_GAP_START;

/// The guest kernel booted when none is named: `$TWINBOX_KERNEL`, else the `vmlinux` that
/// scripts/build-guest-kernel.sh last built (`${TWINBOX_CACHE:-~/.cache/twinbox}/kernel/latest`).
pub fn default_kernel() -> PathBuf {
    kernel_from(std::env::var_os("TWINBOX_KERNEL"), std::env::var_os("TWINBOX_CACHE"), std::env::var_os("HOME"))
}

fn kernel_from(kernel: Option<OsString>, cache: Option<OsString>, home: Option<OsString>) -> PathBuf {
    if let Some(k) = kernel {
        return PathBuf::from(k);
    }
    let cache = cache
        .map(PathBuf::from)
        .unwrap_or_else(|| home.map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root")).join(".cache/twinbox"));
    cache.join("kernel/latest/vmlinux")
}

/// Where kernels load (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// The zero page (boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Start of the EBDA; RAM below it is the usable low memory.
pub const EBDA_START: u64 = 0x9_fc00;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// bzImage's 64-bit entry is 0x200 past where the protected-mode kernel is loaded.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors while loading a kernel and setting up its boot data.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel path does not exist.
    #[error("kernel {0} does not exist")]
    KernelMissing(PathBuf),
    /// The kernel is larger than guest memory.
    #[error("kernel {path} ({size} bytes) does not fit {memory_mib} MiB of guest memory; give the VM more memory")]
    KernelTooLarge {
        /// The kernel.
        path: PathBuf,
        /// Its file size.
        size: u64,
        /// Guest memory.
        memory_mib: u64,
    },
    /// The kernel cannot be opened.
    #[error("cannot open kernel {path}")]
    KernelOpen {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither an ELF nor a bzImage.
    #[error("{0} is not a kernel (neither an ELF vmlinux nor a bzImage)")]
    NotAKernel(PathBuf),
    /// A kernel format was recognised but could not be loaded.
    #[error("cannot load kernel {path}")]
    Load {
        /// The path.
        path: PathBuf,
        /// What linux-loader said.
        #[source]
        source: loader::Error,
    },
    /// The command line is invalid.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line does not fit guest memory.
    #[error("cannot place the kernel command line")]
    CmdlinePlace(#[source] loader::Error),
    /// The initramfs path does not exist.
    #[error("initrd {0} does not exist")]
    InitrdMissing(PathBuf),
    /// The initramfs cannot be read.
    #[error("cannot read initrd {path}")]
    InitrdRead {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the top of low memory.
    #[error("initrd of {size} bytes does not fit guest memory above the kernel; give the VM more memory")]
    InitrdTooLarge {
        /// Its size.
        size: u64,
    },
    /// Writing the initramfs into guest memory failed.
    #[error("cannot write the initrd into guest memory")]
    InitrdWrite(#[source] vm_memory::GuestMemoryError),
    /// Writing boot_params failed.
    #[error("cannot write boot_params")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// More memory regions than the zero page's e820 table holds.
    #[error("too many e820 entries")]
    E820Full,
}

impl ExitCode for LoaderError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        match self {
            // The kernel, initrd, command line and memory size the user gave.
            LoaderError::KernelMissing(_)
            | LoaderError::KernelTooLarge { .. }
            | LoaderError::KernelOpen { .. }
            | LoaderError::NotAKernel(_)
            | LoaderError::Load { .. }
            | LoaderError::Cmdline(_)
            | LoaderError::CmdlinePlace(_)
            | LoaderError::InitrdMissing(_)
            | LoaderError::InitrdRead { .. }
            | LoaderError::InitrdTooLarge { .. } => USER_ERROR,
            // Once the pieces fit, writing them is the VMM's business.
            LoaderError::InitrdWrite(_) | LoaderError::BootParams(_) | LoaderError::E820Full => INTERNAL,
        }
    }
}

/// Where the boot CPU starts, for the Linux 64-bit boot protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// 64-bit entry point.
    pub entry: u64,
    /// The zero page, passed in `rsi`.
    pub boot_params: u64,
    /// End of the kernel image in guest memory.
    pub kernel_end: u64,
}

/// Where an initramfs comes from.
#[derive(Debug, Clone, Copy)]
pub enum Initrd<'a> {
    /// A file.
    File(&'a Path),
    /// Bytes built in memory (an image run's agent and config).
    Bytes(&'a [u8]),
}

/// Loads `kernel` (ELF or bzImage), `initrd` and `cmdline` into `mem` and writes the zero page.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<Initrd<'_>>,
    cmdline: &str,
) -> Result<BootEntry, LoaderError> {
    let mut file = File::open(kernel).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => LoaderError::KernelMissing(kernel.to_path_buf()),
        _ => LoaderError::KernelOpen { path: kernel.to_path_buf(), source: e },
    })?;
    let memory: u64 = mem.iter().map(|r| r.len()).sum();
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    // ELF segments load at their physical addresses above 1 MiB: a file larger than the
    // memory cannot fit (linux-loader would only say it could not read the image).
    if size.saturating_add(HIMEM_START) > memory {
        return Err(LoaderError::KernelTooLarge { path: kernel.to_path_buf(), size, memory_mib: memory >> 20 });
    }
    let load_err = |source| LoaderError::Load { path: kernel.to_path_buf(), source };
    let himem = Some(GuestAddress(HIMEM_START));
    let (result, entry): (KernelLoaderResult, u64) = match Elf::load(mem, None, &mut file, himem) {
        Ok(r) => (r, r.kernel_load.raw_value()),
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
            match BzImage::load(mem, None, &mut file, himem) {
                Ok(r) => (r, r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET),
                Err(loader::Error::Bzimage(loader::bzimage::Error::InvalidBzImage))
                | Err(loader::Error::Bzimage(loader::bzimage::Error::ReadBzImageHeader)) => {
                    return Err(LoaderError::NotAKernel(kernel.to_path_buf()))
                }
                Err(e) => return Err(load_err(e)),
            }
        }
        Err(loader::Error::Elf(loader::elf::Error::ReadElfHeader)) => {
            return Err(LoaderError::NotAKernel(kernel.to_path_buf()))
        }
        Err(e) => return Err(load_err(e)),
    };

    let cmdline = Cmdline::try_from(cmdline, MAX_CMDLINE_LEN).map_err(LoaderError::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(LoaderError::CmdlinePlace)?;
    let cmdline_len = cmdline.as_cstring().map_err(LoaderError::Cmdline)?.as_bytes().len();

    let mut params = boot_params::default();
    if let Some(hdr) = result.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;

    if let Some(initrd) = initrd {
        let (addr, size) = load_initrd(mem, initrd, result.kernel_end)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let mut e820 = vec![boot_e820_entry { addr: 0, size: EBDA_START, r#type: E820_RAM }];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            e820.push(boot_e820_entry { addr: start, size: end - start, r#type: E820_RAM });
        }
    }
    if e820.len() > params.e820_table.len() {
        return Err(LoaderError::E820Full);
    }
    params.e820_entries = e820.len() as u8;
    params.e820_table[..e820.len()].copy_from_slice(&e820);

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(LoaderError::BootParams)?;

    Ok(BootEntry { entry, boot_params: ZERO_PAGE_START, kernel_end: result.kernel_end })
}

/// Puts the initramfs page-aligned at the top of RAM below the MMIO gap.
fn load_initrd(mem: &GuestMemoryMmap, initrd: Initrd<'_>, kernel_end: u64) -> Result<(u64, u64), LoaderError> {
    let read;
    let bytes: &[u8] = match initrd {
        Initrd::Bytes(b) => b,
        Initrd::File(path) => {
            read = std::fs::read(path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => LoaderError::InitrdMissing(path.to_path_buf()),
                _ => LoaderError::InitrdRead { path: path.to_path_buf(), source: e },
            })?;
            &read
        }
    };
    let size = bytes.len() as u64;
    let top = (mem.last_addr().raw_value() + 1).min(MMIO_GAP_START);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or(LoaderError::InitrdTooLarge { size })?;
    mem.write_slice(bytes, GuestAddress(addr)).map_err(LoaderError::InitrdWrite)?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stub::{pvh_elf, STUB_LOAD_ADDR};
    use std::io::Write;

    #[test]
    fn the_default_kernel_is_named_by_the_environment_or_the_build_cache() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(kernel_from(os("/k/vmlinux"), os("/c"), os("/h")), Path::new("/k/vmlinux"));
        assert_eq!(kernel_from(None, os("/c"), os("/h")), Path::new("/c/kernel/latest/vmlinux"));
        assert_eq!(kernel_from(None, None, os("/h")), Path::new("/h/.cache/twinbox/kernel/latest/vmlinux"));
        assert_eq!(kernel_from(None, None, None), Path::new("/root/.cache/twinbox/kernel/latest/vmlinux"));
    }

    fn mem(mib: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
    }

    fn file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn loads_a_tiny_elf_and_writes_the_zero_page() {
        let code = [0x90, 0x90, 0xf4];
        let kernel = file(&pvh_elf(&code));
        let initrd = file(b"initramfs!");
        let m = mem(16);
        let boot = load_linux(&m, kernel.path(), Some(Initrd::File(initrd.path())), "console=ttyS0 quiet").unwrap();
        assert_eq!(boot.entry, STUB_LOAD_ADDR);
        assert_eq!(boot.boot_params, ZERO_PAGE_START);
        let mut loaded = [0u8; 3];
        m.read_slice(&mut loaded, GuestAddress(STUB_LOAD_ADDR)).unwrap();
        assert_eq!(loaded, code);

        let params: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        let mut cmd = [0u8; 20];
        m.read_slice(&mut cmd, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&cmd, b"console=ttyS0 quiet\0");
        assert_eq!(params.e820_entries, 2);
        let e = params.e820_table[1];
        assert_eq!(({ e.addr }, { e.size }), (HIMEM_START, (16 << 20) - HIMEM_START));
        // A restored template's mailbox is guest memory the kernel is not given as RAM.
        let mailbox = twinbox_agent::MAILBOX_ADDR..twinbox_agent::MAILBOX_ADDR + twinbox_agent::MAILBOX_LEN as u64;
        for e in &params.e820_table[..usize::from(params.e820_entries)] {
            assert!(e.addr + e.size <= mailbox.start || e.addr >= mailbox.end, "e820 RAM over the mailbox");
        }
        assert!(m.address_in_range(GuestAddress(mailbox.end - 1)), "the mailbox is in guest memory");
        let (ramdisk, size) = ({ hdr.ramdisk_image }, { hdr.ramdisk_size });
        assert_eq!(size, 10);
        assert_eq!(ramdisk % 0x1000, 0);
        let mut back = [0u8; 10];
        m.read_slice(&mut back, GuestAddress(u64::from(ramdisk))).unwrap();
        assert_eq!(&back, b"initramfs!");
    }

    #[test]
    fn missing_kernel_says_so() {
        let err = load_linux(&mem(4), Path::new("/nonexistent/vmlinux"), None, "").unwrap_err();
        assert!(matches!(err, LoaderError::KernelMissing(_)));
        assert_eq!(err.to_string(), "kernel /nonexistent/vmlinux does not exist");
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        for bytes in [&b"#!/bin/sh\necho not a kernel\n"[..], &[0u8; 4096][..], b""] {
            let f = file(bytes);
            let err = load_linux(&mem(4), f.path(), None, "").unwrap_err();
            assert!(matches!(err, LoaderError::NotAKernel(_)), "{err:?}");
            assert!(err.to_string().contains("is not a kernel"));
        }
    }

    #[test]
    fn kernel_beyond_memory_asks_for_more_memory() {
        let f = file(&pvh_elf(&[0xf4]));
        // 1 MiB of RAM: the kernel's 1 MiB load address is past the end.
        let err = load_linux(&mem(1), f.path(), None, "").unwrap_err();
        assert!(matches!(err, LoaderError::KernelTooLarge { memory_mib: 1, .. }), "{err:?}");
        assert!(err.to_string().ends_with("does not fit 1 MiB of guest memory; give the VM more memory"), "{err}");
    }

    #[test]
    fn missing_and_oversized_initrd() {
        let k = file(&pvh_elf(&[0xf4]));
        let err = load_linux(&mem(4), k.path(), Some(Initrd::File(Path::new("/nonexistent/initrd"))), "").unwrap_err();
        assert!(matches!(err, LoaderError::InitrdMissing(_)));
        let big = file(&vec![0u8; 4 << 20]);
        let err = load_linux(&mem(4), k.path(), Some(Initrd::File(big.path())), "").unwrap_err();
        assert!(matches!(err, LoaderError::InitrdTooLarge { .. }), "{err:?}");
    }
}

//! Snapshots of a paused microVM, and the checks a restore makes first.
//!
//! A snapshot is a directory of three files:
//!
//! - `memory`: guest RAM, its regions one after another in guest-physical order (below the
//!   32-bit MMIO gap, then above it). Pages that were zero are holes, so a 128 MiB guest that
//!   touched 30 MiB takes 30 MiB of disk. A restore maps it `MAP_PRIVATE`: pages load from the
//!   page cache on first touch, and every VM restored from one snapshot shares the pages none
//!   of them wrote.
//! - `state.json`: [`SnapshotState`], versioned by [`FORMAT_VERSION`]: who made it (the twinbox
//!   VMM build, [`VMM_BUILD`]) and on what CPU ([`CpuIdentity`]), the VM's shape ([`Shape`]),
//!   the layout of `memory`, the KVM clock, every vCPU's state
//!   ([`VcpuState`]: registers, special registers, XSAVE, XCRs, debug registers, LAPIC, MSRs,
//!   pending events, MP state) and every device's ([`DeviceStates`]: the serial port, the
//!   split irqchip's IOAPIC, the virtio-mmio transports of the disks, cards and socket device
//!   with their queues).
//! - `SHA256SUMS`: the SHA-256 of the other two in `sha256sum`'s format (`sha256sum -c
//!   SHA256SUMS` checks a snapshot by hand).
//! - `verified` (not part of the format): the stamp of the last full check of `memory`, see
//!   below.
//!
//! A restore refuses, with the reason, a snapshot whose checksum does not match (truncated or
//! altered), of another format or VMM build, made on a CPU with another identity, or of
//! another shape than the VM being built. Hashing all of `memory` at every restore would cost
//! more than the restore itself, so a successful check leaves a stamp (`verified`: the file's
//! inode, size and change times with the hash it matched); while the file's change time is the
//! stamp's, nothing has written it since, and the hash is not read again.
//!
//! Devices whose host side cannot be carried over start afresh: a restored socket device
//! has no connections and tells the guest so (a transport reset, as Firecracker does); a
//! network card is on the tap the new VM's configuration names, with the MAC it gives.
//! Snapshots need the split irqchip (the default): an in-kernel PIC, IOAPIC and PIT are not
//! saved.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use twinbox_exit::ExitCode;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::config::IrqChip;
use crate::devices::legacy::ioapic::IoApicState;
use crate::devices::legacy::serial::UartState;
use crate::devices::virtio::mmio::TransportState;
use crate::vstate::snapshot::{VcpuState, VmClock};
use crate::VmConfig;

/// The version of the snapshot format this VMM writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The VMM build a snapshot belongs to: the package version and a hash of the VMM's and the
/// guest agent's code, so that a snapshot from any other build (whose devices may keep other
/// state) is refused.
pub const VMM_BUILD: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("TWINBOX_VMM_BUILD"));
/// The file of guest RAM.
pub const MEMORY_FILE: &str = "memory";
/// The file of the VM's state.
pub const STATE_FILE: &str = "state.json";
/// The checksums of the other two.
pub const CHECKSUMS_FILE: &str = "SHA256SUMS";
/// The stamp a full check of `memory` leaves.
const VERIFIED_FILE: &str = "verified";
const PAGE: usize = 4096;
/// How much of guest memory is copied and hashed at a time.
const CHUNK: usize = 1 << 20;

/// Everything of a VM a snapshot keeps but its memory; `state.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    /// [`FORMAT_VERSION`] of the VMM that wrote it.
    pub format: u32,
    /// [`VMM_BUILD`] of the VMM that wrote it.
    pub vmm: String,
    /// The CPU it was made on.
    pub cpu: CpuIdentity,
    /// The VM's shape, which the VM restoring it must have.
    pub shape: Shape,
    /// `memory`'s regions: (guest-physical start, length in bytes), in file order.
    pub memory: Vec<(u64, u64)>,
    /// The KVM clock.
    pub clock: VmClock,
    /// Each vCPU's state, by index.
    pub vcpus: Vec<VcpuState>,
    /// The devices'.
    pub devices: DeviceStates,
}

/// The CPU a snapshot was made on, as KVM describes it to guests: its vendor, family, model and
/// stepping for messages, and a hash of KVM's whole supported CPUID table, which must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuIdentity {
    /// "AuthenticAMD, family 25 model 1 stepping 1".
    pub model: String,
    /// SHA-256 of the supported CPUID entries.
    pub cpuid_sha256: String,
}

impl CpuIdentity {
    /// The identity of the CPU KVM describes by `supported` (KVM_GET_SUPPORTED_CPUID).
    pub fn of(supported: &kvm_bindings::CpuId) -> CpuIdentity {
        let entries = supported.as_slice();
        let leaf = |f: u32| entries.iter().find(|e| e.function == f && e.index == 0);
        let vendor = leaf(0)
            .map(|e| {
                let bytes: Vec<u8> = [e.ebx, e.edx, e.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
                String::from_utf8_lossy(&bytes).trim_end_matches('\0').to_owned()
            })
            .unwrap_or_else(|| "unknown vendor".to_owned());
        let model = match leaf(1) {
            Some(e) => {
                let (base_family, ext_family) = ((e.eax >> 8) & 0xf, (e.eax >> 20) & 0xff);
                let family = if base_family == 0xf { base_family + ext_family } else { base_family };
                let mut model = (e.eax >> 4) & 0xf;
                if base_family == 0x6 || base_family == 0xf {
                    model |= ((e.eax >> 16) & 0xf) << 4;
                }
                format!("{vendor}, family {family} model {model} stepping {}", e.eax & 0xf)
            }
            None => vendor,
        };
        let mut h = Sha256::new();
        for e in entries {
            // KVM reads the table off the host CPU the thread runs on: the fields that name
            // that CPU (its APIC ids) differ from call to call and are no feature.
            let (mut ebx, mut edx, mut eax) = (e.ebx, e.edx, e.eax);
            match e.function {
                0x1 => ebx &= 0x00ff_ffff,
                0xb | 0x1f => edx = 0,
                0x8000_001e => eax = 0,
                _ => {}
            }
            for v in [e.function, e.index, e.flags, eax, ebx, e.ecx, edx] {
                h.update(v.to_le_bytes());
            }
        }
        CpuIdentity { model, cpuid_sha256: hex::encode(h.finalize()) }
    }
}

/// What a VM restoring a snapshot must have as the one that made it did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    pub memory_mib: u32,
    pub vcpus: u8,
    pub irqchip: IrqChip,
    /// Each disk's read-only flag, in order.
    pub disks: Vec<bool>,
    /// How many network cards.
    pub nets: usize,
    /// Whether it has the socket device.
    pub vsock: bool,
}

impl Shape {
    /// The shape of the VM `config` describes.
    pub fn of(config: &VmConfig) -> Shape {
        Shape {
            memory_mib: config.memory_mib,
            vcpus: config.vcpus,
            irqchip: config.irqchip,
            disks: config.disks.iter().map(|d| d.read_only).collect(),
            nets: config.nets.len(),
            vsock: config.vsock.is_some(),
        }
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ro = self.disks.iter().filter(|r| **r).count();
        write!(
            f,
            "{} MiB, {} vCPU{}, {} irqchip, {} disk{} ({ro} read-only), {} network card{}, {}",
            self.memory_mib,
            self.vcpus,
            if self.vcpus == 1 { "" } else { "s" },
            self.irqchip,
            self.disks.len(),
            if self.disks.len() == 1 { "" } else { "s" },
            self.nets,
            if self.nets == 1 { "" } else { "s" },
            if self.vsock { "a socket device" } else { "no socket device" }
        )
    }
}

/// The devices' state: the serial port, the IOAPIC, and the virtio-mmio transports in slot
/// order (disks, then network cards, then the socket device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceStates {
    pub serial: UartState,
    pub ioapic: IoApicState,
    pub disks: Vec<TransportState>,
    pub nets: Vec<TransportState>,
    pub vsock: Option<TransportState>,
}

/// Saving or restoring a snapshot failed, or a snapshot was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file of the snapshot could not be read or written.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was done.
        op: &'static str,
        /// To which file.
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file is missing or its checksum does not match: the snapshot is damaged.
    #[error("snapshot {}: {file} {problem}; the snapshot is damaged or was altered: remove it and make it again", dir.display())]
    Damaged {
        /// The snapshot.
        dir: PathBuf,
        /// The file.
        file: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The snapshot is of another format or VMM build.
    #[error("snapshot {}: made by twinbox VMM {found} (format {format}), this is {VMM_BUILD} (format {FORMAT_VERSION}); make the snapshot again with this twinbox", dir.display())]
    OtherBuild {
        /// The snapshot.
        dir: PathBuf,
        /// Its VMM build.
        found: String,
        /// Its format.
        format: u32,
    },
    /// The snapshot was made on another CPU.
    #[error("snapshot {}: made on another CPU ({saved}); this host's KVM describes {this}{}; a snapshot restores only on the CPU model it was made on", dir.display(), if saved == this { " with other features" } else { "" })]
    OtherCpu {
        /// The snapshot.
        dir: PathBuf,
        /// Its CPU.
        saved: String,
        /// This host's.
        this: String,
    },
    /// The VM being built has another shape than the snapshot's.
    #[error("snapshot {}: made of a VM of {saved}; this VM has {this}", dir.display())]
    OtherShape {
        /// The snapshot.
        dir: PathBuf,
        /// Its shape.
        saved: Box<Shape>,
        /// This VM's.
        this: Box<Shape>,
    },
    /// Only VMs with the split irqchip are snapshotted.
    #[error("snapshots need the split irqchip (the default); this VM has its interrupt controllers in the kernel")]
    KernelIrqChip,
    /// The state is inconsistent with itself (a vCPU or device count, a device's fields).
    #[error("snapshot {}: {problem}", dir.display())]
    Invalid {
        /// The snapshot.
        dir: PathBuf,
        /// What does not fit.
        problem: String,
    },
    /// The snapshot's directory exists already.
    #[error("{} exists; a snapshot is written to a new directory", .0.display())]
    Exists(PathBuf),
    /// Mapping the memory file failed.
    #[error("cannot map the snapshot's guest memory")]
    Map(String),
}

impl ExitCode for SnapshotError {
    fn exit_code(&self) -> i32 {
        match self {
            // What the user pointed at: a damaged snapshot, or one for another VMM, CPU or VM.
            SnapshotError::Damaged { .. }
            | SnapshotError::OtherBuild { .. }
            | SnapshotError::OtherCpu { .. }
            | SnapshotError::OtherShape { .. }
            | SnapshotError::KernelIrqChip
            | SnapshotError::Invalid { .. }
            | SnapshotError::Exists(_) => twinbox_exit::USER_ERROR,
            SnapshotError::Io { .. } | SnapshotError::Map(_) => twinbox_exit::INTERNAL,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { op, path: path.to_owned(), source }
}

/// Writes `memory` to `path` (holes for zero pages) and returns the SHA-256 of what the file
/// reads as, and the regions' layout.
pub(crate) fn write_memory(memory: &GuestMemoryMmap, path: &Path) -> Result<(String, Vec<(u64, u64)>), SnapshotError> {
    let file = fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(io_err("create", path))?;
    let mut hash = Sha256::new();
    let mut layout = Vec::new();
    let mut at = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for region in memory.iter() {
        let (start, len) = (region.start_addr().0, region.len());
        layout.push((start, len));
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            memory
                .read_slice(chunk, GuestAddress(start + done))
                .map_err(|e| SnapshotError::Map(format!("cannot read guest memory at {:#x}: {e}", start + done)))?;
            hash.update(&*chunk);
            for (i, page) in chunk.chunks(PAGE).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    file.write_all_at(page, at + done + (i * PAGE) as u64).map_err(io_err("write", path))?;
                }
            }
            done += n as u64;
        }
        at += len;
    }
    file.set_len(at).map_err(io_err("size", path))?;
    file.sync_all().map_err(io_err("sync", path))?;
    Ok((hex::encode(hash.finalize()), layout))
}

/// Writes `state` and the checksums next to the memory file in `tmp`, then moves `tmp` to
/// `dir`: a snapshot appears whole or not at all.
pub(crate) fn finish(tmp: &Path, dir: &Path, state: &SnapshotState, memory_sha256: &str) -> Result<(), SnapshotError> {
    let json = serde_json::to_vec_pretty(state).map_err(|e| SnapshotError::Invalid {
        dir: dir.to_owned(),
        problem: format!("cannot serialize the state: {e}"),
    })?;
    let state_path = tmp.join(STATE_FILE);
    write_synced(&state_path, &json)?;
    let sums = format!("{}  {STATE_FILE}\n{memory_sha256}  {MEMORY_FILE}\n", hex::encode(Sha256::digest(&json)));
    write_synced(&tmp.join(CHECKSUMS_FILE), sums.as_bytes())?;
    // The memory file was hashed as it was written: its first restore need not read it again.
    if let Ok(meta) = fs::metadata(tmp.join(MEMORY_FILE)) {
        write_stamp(tmp, &stamp_text(&meta, memory_sha256));
    }
    fs::rename(tmp, dir).map_err(io_err("move the finished snapshot to", dir))?;
    if let Some(parent) = dir.parent() {
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let mut f = fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(io_err("create", path))?;
    f.write_all(bytes).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("sync", path))
}

/// The temporary directory a snapshot of `dir` is written in (beside it, so the final rename
/// stays on one file system). Refuses a `dir` that exists.
pub(crate) fn start(dir: &Path) -> Result<TempSnapshot, SnapshotError> {
    if dir.symlink_metadata().is_ok() {
        return Err(SnapshotError::Exists(dir.to_owned()));
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
    Ok(TempSnapshot(Some(tmp)))
}

/// A snapshot being written; removed unless [`TempSnapshot::into_done`] says it was moved.
pub(crate) struct TempSnapshot(Option<PathBuf>);

impl TempSnapshot {
    pub(crate) fn path(&self) -> &Path {
        self.0.as_deref().expect("present until done")
    }

    pub(crate) fn into_done(mut self) {
        self.0 = None;
    }
}

impl Drop for TempSnapshot {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

/// Reads the checksums, the state (checked against its checksum), and checks the memory file
/// (its size at once, its hash unless the stamp says nothing wrote it since the last check),
/// the format and the VMM build. The CPU and the shape are checked by [`SnapshotState::check`].
pub fn load(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    let damaged = |file: &'static str, problem: String| SnapshotError::Damaged { dir: dir.to_owned(), file, problem };
    let read = |file: &'static str| -> Result<Vec<u8>, SnapshotError> {
        let path = dir.join(file);
        fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => damaged(file, "is missing".into()),
            _ => SnapshotError::Io { op: "read", path, source: e },
        })
    };
    let sums_text = read(CHECKSUMS_FILE)?;
    let sums_text = String::from_utf8_lossy(&sums_text);
    let sums = parse_sums(&sums_text);
    let want = |file: &'static str| {
        sums.get(file).cloned().ok_or_else(|| damaged(CHECKSUMS_FILE, format!("has no line for {file}")))
    };
    let (state_sum, memory_sum) = (want(STATE_FILE)?, want(MEMORY_FILE)?);
    let json = read(STATE_FILE)?;
    if hex::encode(Sha256::digest(&json)) != state_sum {
        return Err(damaged(STATE_FILE, "does not match its checksum".into()));
    }
    // Parsed once on the way of every restore. Only when the whole state does not parse are
    // its version fields read alone: a snapshot of another format is named as such, not as
    // damaged.
    #[derive(Deserialize)]
    struct Version {
        format: u32,
        vmm: String,
    }
    let other_build = |v: Version| SnapshotError::OtherBuild { dir: dir.to_owned(), found: v.vmm, format: v.format };
    let state: SnapshotState = match serde_json::from_slice(&json) {
        Ok(state) => state,
        Err(e) => {
            return Err(match serde_json::from_slice::<Version>(&json) {
                Ok(v) if v.format != FORMAT_VERSION || v.vmm != VMM_BUILD => other_build(v),
                _ => damaged(STATE_FILE, format!("is not a snapshot's state: {e}")),
            })
        }
    };
    if state.format != FORMAT_VERSION || state.vmm != VMM_BUILD {
        return Err(other_build(Version { format: state.format, vmm: state.vmm }));
    }
    let expected: u64 = state.memory.iter().map(|r| r.1).sum();
    let path = dir.join(MEMORY_FILE);
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(damaged(MEMORY_FILE, "is missing".into())),
        Err(e) => return Err(SnapshotError::Io { op: "read", path, source: e }),
    };
    if meta.len() != expected {
        return Err(damaged(MEMORY_FILE, format!("has {} bytes where the state says {expected}", meta.len())));
    }
    let stamp = stamp_text(&meta, &memory_sum);
    if fs::read_to_string(dir.join(VERIFIED_FILE)).ok().as_deref() != Some(stamp.as_str()) {
        let found = hash_file(&path)?;
        if found != memory_sum {
            return Err(damaged(MEMORY_FILE, "does not match its checksum".into()));
        }
        write_stamp(dir, &stamp);
    }
    Ok(state)
}

/// What the stamp of a memory file `meta` that hashed to `sum` says: its device, inode, size,
/// modification and change times, and the hash.
fn stamp_text(meta: &fs::Metadata, sum: &str) -> String {
    format!(
        "{} {} {} {}.{} {}.{} {sum}\n",
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

/// Best effort: without the stamp the next restore hashes again.
fn write_stamp(dir: &Path, stamp: &str) {
    let tmp = dir.join(format!(".{VERIFIED_FILE}.{}", std::process::id()));
    if fs::write(&tmp, stamp).and_then(|()| fs::rename(&tmp, dir.join(VERIFIED_FILE))).is_err() {
        let _ = fs::remove_file(&tmp);
    }
}

fn parse_sums(text: &str) -> BTreeMap<&str, String> {
    text.lines()
        .filter_map(|l| l.split_once("  "))
        .filter(|(sum, _)| sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|(sum, name)| (name.trim_start_matches('*'), sum.to_ascii_lowercase()))
        .collect()
}

fn hash_file(path: &Path) -> Result<String, SnapshotError> {
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

impl SnapshotState {
    /// Refuses the snapshot in `dir` for a VM made on a CPU KVM describes as `cpu` unless it
    /// is the snapshot's.
    pub fn check_cpu(&self, dir: &Path, cpu: &CpuIdentity) -> Result<(), SnapshotError> {
        if self.cpu != *cpu {
            return Err(SnapshotError::OtherCpu {
                dir: dir.to_owned(),
                saved: self.cpu.model.clone(),
                this: cpu.model.clone(),
            });
        }
        Ok(())
    }

    /// Refuses the snapshot in `dir` for a VM of `config` unless it has the snapshot's shape,
    /// and checks the state's counts against the shape.
    pub fn check_shape(&self, dir: &Path, config: &VmConfig) -> Result<(), SnapshotError> {
        if config.irqchip != IrqChip::Split {
            return Err(SnapshotError::KernelIrqChip);
        }
        let this = Shape::of(config);
        if self.shape != this {
            return Err(SnapshotError::OtherShape {
                dir: dir.to_owned(),
                saved: Box::new(self.shape.clone()),
                this: Box::new(this),
            });
        }
        let invalid = |problem: String| Err(SnapshotError::Invalid { dir: dir.to_owned(), problem });
        if self.vcpus.len() != usize::from(self.shape.vcpus) {
            return invalid(format!("{} vCPU states for {} vCPUs", self.vcpus.len(), self.shape.vcpus));
        }
        let d = &self.devices;
        if d.disks.len() != self.shape.disks.len()
            || d.nets.len() != self.shape.nets
            || d.vsock.is_some() != self.shape.vsock
        {
            return invalid("its device states do not match its shape".into());
        }
        let layout = crate::vstate::memory::layout(u64::from(self.shape.memory_mib))
            .map_err(|e| SnapshotError::Invalid { dir: dir.to_owned(), problem: e.to_string() })?;
        let expected: Vec<(u64, u64)> = layout.iter().map(|(a, l)| (a.0, *l as u64)).collect();
        if self.memory != expected {
            return invalid(format!(
                "its memory regions {:?} are not those of {} MiB",
                self.memory, self.shape.memory_mib
            ));
        }
        Ok(())
    }
}

/// Maps the snapshot's memory file privately at the regions `state` names: pages load on
/// first touch, writes stay the VM's own.
pub fn map_memory(dir: &Path, state: &SnapshotState) -> Result<GuestMemoryMmap, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(io_err("open", &path))?;
    let mut regions = Vec::with_capacity(state.memory.len());
    let mut offset = 0u64;
    for &(start, len) in &state.memory {
        let size = usize::try_from(len).map_err(|_| SnapshotError::Map(format!("a region of {len} bytes")))?;
        let fd = file.try_clone().map_err(io_err("reopen", &path))?;
        let mapping = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(fd, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::Map(format!("{e}")))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| SnapshotError::Map(format!("region at {start:#x} overflows")))?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| SnapshotError::Map(format!("{e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_lines_are_read_as_sha256sum_writes_them() {
        let a = "a".repeat(64);
        let text = format!("{a}  state.json\n{}  *memory\nnonsense\n", "B".repeat(64));
        let sums = parse_sums(&text);
        assert_eq!(sums.get("state.json"), Some(&a));
        assert_eq!(sums.get("memory"), Some(&"b".repeat(64)));
        assert_eq!(sums.len(), 2);
    }

    #[test]
    fn shapes_name_what_they_have() {
        let shape = Shape {
            memory_mib: 128,
            vcpus: 2,
            irqchip: IrqChip::Split,
            disks: vec![true, false],
            nets: 1,
            vsock: true,
        };
        assert_eq!(
            shape.to_string(),
            "128 MiB, 2 vCPUs, split irqchip, 2 disks (1 read-only), 1 network card, a socket device"
        );
    }
}

//! The parsers that take untrusted input, each as a function of bytes that must never panic,
//! hang or touch anything outside its scratch space, whatever the bytes are:
//!
//! | target | input | what parses it |
//! |---|---|---|
//! | `unpack_layer` | a layer (tar, gzip or zstd) | the unpacker, into a scratch directory, both whiteout modes |
//! | `image_json` | an image index, manifest or config | oci-spec's types, then what `run` takes from a config |
//! | `dockerfile` | a Dockerfile | the builder's parser |
//! | `reference` | an image reference | `Reference::parse`, which must round-trip |
//! | `www_authenticate` | a `WWW-Authenticate` value | the registry client's challenge parser |
//! | `agent_config` | the guest agent's configuration and control requests | `GuestConfig`, exec/start requests, frames, the mailbox header |
//! | `virtio_blk` | a guest's memory and its MMIO accesses | the virtio-mmio transport and the block device, against a scratch disk |
//! | `runtime_config` | a bundle's config.json | the runtime's spec checks: namespaces, id maps, mounts, capabilities, rlimits, seccomp |
//!
//! `fuzz/` (cargo-fuzz, nightly) runs them with libFuzzer (`scripts/fuzz.sh`); the test
//! `tests/replay.rs` runs every file of their corpora and every past crash on stable, so CI
//! checks them without a fuzzer.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A fuzz target: a function of any bytes.
pub type Target = fn(&[u8]);

/// Every target, by name (the name of its corpus directory and of its cargo-fuzz binary).
pub const TARGETS: &[(&str, Target)] = &[
    ("unpack_layer", unpack_layer),
    ("image_json", image_json),
    ("dockerfile", dockerfile),
    ("reference", reference),
    ("www_authenticate", www_authenticate),
    ("agent_config", agent_config),
    ("virtio_blk", virtio_blk),
    ("runtime_config", runtime_config),
];

/// Most bytes a layer may unpack to, decompressed: a bomb stops there.
const MAX_LAYER: u64 = 8 << 20;

static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

/// A directory of this process's own under the temp directory, made once, for scratch files,
/// and removed when the process exits (libFuzzer's end of a run, or a test binary's).
fn scratch_root() -> &'static Path {
    SCRATCH.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("twinbox-fuzz-").tempdir().expect("a scratch directory").keep();
        // SAFETY: registers a function without arguments that only reads the set OnceLock.
        unsafe { libc::atexit(remove_scratch) };
        dir
    })
}

/// The scratch directory of target `name` (made when missing).
fn scratch(name: &str) -> PathBuf {
    let dir = scratch_root().join(name);
    std::fs::create_dir_all(&dir).expect("a target's scratch directory");
    dir
}

extern "C" fn remove_scratch() {
    if let Some(dir) = SCRATCH.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The layer unpacked into a fresh directory, in both modes. Beside that directory lies a
/// canary file; the unpacker must neither touch it nor make anything else beside it.
pub fn unpack_layer(data: &[u8]) {
    use twinbox_image::unpack::{decompress, unpack, Compression, UnpackOptions};
    let root = scratch("unpack_layer");
    let canary = root.join("canary");
    if !canary.exists() {
        std::fs::write(&canary, b"outside").expect("the canary");
    }
    for opts in [UnpackOptions::flatten(), UnpackOptions::overlay()] {
        let target = root.join("layer");
        std::fs::create_dir(&target).expect("the layer directory");
        let compression = Compression::detect(data);
        if let Ok(r) = decompress(data, compression) {
            let _ = unpack(r.take(MAX_LAYER), &target, &opts);
        }
        let mut beside: Vec<PathBuf> =
            std::fs::read_dir(&root).expect("the scratch root").map(|e| e.expect("an entry").path()).collect();
        beside.sort();
        assert_eq!(beside, [canary.clone(), target.clone()], "the unpacker made something outside its target");
        assert_eq!(std::fs::read(&canary).expect("the canary"), b"outside", "the unpacker wrote outside its target");
        remove_tree(&target);
    }
}

/// Removes what an unpack made, whatever its modes (a directory without write or search
/// permission would stop `remove_dir_all` for a user other than root).
fn remove_tree(dir: &Path) {
    if std::fs::remove_dir_all(dir).is_ok() {
        return;
    }
    for entry in walk(dir) {
        use std::os::unix::fs::PermissionsExt;
        if std::fs::symlink_metadata(&entry).is_ok_and(|m| m.is_dir()) {
            let _ = std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o700));
        }
    }
    std::fs::remove_dir_all(dir).expect("the unpacked layer removed");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = vec![dir.to_path_buf()];
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk(&e.path()));
            }
        }
    }
    out
}

/// An index, a manifest or a config; from a config, what a run takes (the process, its
/// environment and working directory) and the layers' diff ids.
pub fn image_json(data: &[u8]) {
    use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
    let _ = serde_json::from_slice::<ImageIndex>(data);
    let _ = serde_json::from_slice::<ImageManifest>(data);
    if let Ok(config) = serde_json::from_slice::<ImageConfiguration>(data) {
        let overrides = twinbox_image::launch::Overrides::default();
        let _ = twinbox_image::launch::resolve("fuzz", &config, &[], &overrides, "host");
        for d in config.rootfs().diff_ids() {
            let _ = d.parse::<twinbox_image::Digest>();
        }
    }
}

/// A Dockerfile.
pub fn dockerfile(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = twinbox_image::build::dockerfile::parse(text);
    }
}

/// A reference; one that parses prints as a reference that parses and prints the same.
pub fn reference(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(r) = twinbox_image::Reference::parse(text) else { return };
    let printed = r.to_string();
    let again = twinbox_image::Reference::parse(&printed).expect("a printed reference parses");
    assert_eq!(again.to_string(), printed, "{text:?} printed as {printed:?}");
    assert_eq!((again.registry(), again.repository(), again.digest()), (r.registry(), r.repository(), r.digest()));
    let _ = (r.registry(), r.repository(), r.name(), r.tag(), r.digest());
}

/// A `WWW-Authenticate` header value.
pub fn www_authenticate(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = twinbox_image::registry::auth::Challenge::parse(text);
    }
}

/// What the guest agent reads from the host: its configuration, exec and start requests, the
/// frames of a connection, the mailbox's header.
pub fn agent_config(data: &[u8]) {
    use twinbox_agent::control::{mailbox_len, read_frame, ExecRequest, MAILBOX_HEADER};
    if let Ok(config) = twinbox_agent::GuestConfig::from_json(data) {
        let _ = config.validate();
    }
    if let Ok(request) = serde_json::from_slice::<ExecRequest>(data) {
        if let Some(start) = request.start {
            let _ = start.config.validate();
        }
    }
    let mut r = data;
    while let Ok(Some(_)) = read_frame(&mut r) {}
    if let Some(header) = data.get(..MAILBOX_HEADER) {
        if let Some(len) = mailbox_len(header) {
            assert!(MAILBOX_HEADER + len <= twinbox_agent::MAILBOX_LEN);
        }
    }
}

/// A guest driving a virtio-blk device: the input is a script of MMIO register writes and
/// reads, writes to guest memory (descriptors, rings, requests) and queue notifications,
/// optionally after Linux's handshake with one queue in place (so the fuzzer need not find it).
pub fn virtio_blk(data: &[u8]) {
    drive_blk(data);
}

/// [`virtio_blk`]'s work; the guest memory it ends with.
fn drive_blk(data: &[u8]) -> Option<vm_memory::GuestMemoryMmap> {
    use twinbox_microvm::devices::legacy::EventFdTrigger;
    use twinbox_microvm::devices::virtio::block::Block;
    use twinbox_microvm::devices::virtio::mmio::MmioTransport;
    use twinbox_microvm::devices::BusDevice;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const MEMORY: usize = 0x1_0000;
    let (&first, mut script) = data.split_first()?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY)]).expect("guest memory");
    let disk = scratch("virtio_blk").join("disk");
    std::fs::write(&disk, vec![0x5a; 16 * 512]).expect("the scratch disk");
    let block = Block::open(&disk, first & 2 != 0).ok()?;
    let mut t = MmioTransport::new(block, EventFdTrigger(None), mem.clone());
    let w = |t: &mut MmioTransport<Block, EventFdTrigger>, reg: u64, v: u32| {
        t.write(reg, &v.to_le_bytes());
    };
    if first & 1 != 0 {
        // Linux's handshake: features with VERSION_1, queue 0 of 16 at 0x1000/0x2000/0x3000.
        w(&mut t, 0x70, 0);
        w(&mut t, 0x70, 1);
        w(&mut t, 0x70, 1 | 2);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 0);
        w(&mut t, 0x70, 1 | 2 | 8);
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 16);
        for (reg, addr) in [(0x80, 0x1000), (0x90, 0x2000), (0xa0, 0x3000)] {
            w(&mut t, reg, addr);
            w(&mut t, reg + 4, 0);
        }
        w(&mut t, 0x44, 1);
        w(&mut t, 0x70, 1 | 2 | 8 | 4);
    }
    let take = |s: &mut &[u8], n: usize| -> Option<Vec<u8>> {
        let (head, rest) = s.split_at_checked(n)?;
        *s = rest;
        Some(head.to_vec())
    };
    // At most 64 steps: each notification may serve a whole queue.
    for _ in 0..64 {
        let Some(op) = take(&mut script, 1) else { break };
        match op[0] % 4 {
            0 => {
                let Some(b) = take(&mut script, 6) else { break };
                let reg = u64::from(u16::from_le_bytes([b[0], b[1]]) & 0x1ff);
                t.write(reg, &b[2..6]);
            }
            1 => {
                let Some(b) = take(&mut script, 2) else { break };
                let reg = u64::from(u16::from_le_bytes([b[0], b[1]]) & 0x1ff);
                let mut out = [0u8; 4];
                t.read(reg, &mut out);
            }
            2 => {
                let Some(b) = take(&mut script, 3) else { break };
                let addr = u64::from(u16::from_le_bytes([b[0], b[1]]));
                let Some(bytes) = take(&mut script, usize::from(b[2])) else { break };
                let _ = mem.write_slice(&bytes, GuestAddress(addr));
            }
            _ => w(&mut t, 0x50, 0),
        }
    }
    Some(mem)
}

/// A bundle's config.json, through what `create` checks before it makes anything: the
/// version, namespaces and id maps, the overlay annotation, the process (capabilities,
/// rlimits, seccomp compiled to BPF) and every mount's options.
pub fn runtime_config(data: &[u8]) {
    use twinbox_runtime::{create, namespaces, process, rootfs};
    let Ok(spec) = serde_json::from_slice::<oci_spec::runtime::Spec>(data) else { return };
    let _ = create::check_version(spec.version());
    let linux = spec.linux().clone().unwrap_or_default();
    let _ = namespaces::Namespaces::from_spec(linux.namespaces().as_deref().unwrap_or(&[]));
    let _ = namespaces::check_id_maps(
        linux.uid_mappings().as_deref().unwrap_or(&[]),
        linux.gid_mappings().as_deref().unwrap_or(&[]),
    );
    if let Some(v) = spec.annotations().as_ref().and_then(|a| a.get(rootfs::OVERLAY_ANNOTATION)) {
        let _ = rootfs::Overlay::parse(v);
    }
    if let Some(p) = spec.process() {
        let _ = process::prepare(p, linux.seccomp().as_ref());
    }
    for m in spec.mounts().as_deref().unwrap_or(&[]) {
        let _ = rootfs::parse_options(m.options().as_deref().unwrap_or(&[]), m.destination());
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn the_block_seeds_reach_the_device() {
        // fuzz/seeds/virtio_blk/read: a read of sector 1 into 0x5000, its status at 0x6000.
        let seed = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/virtio_blk/read")).unwrap();
        let mem = super::drive_blk(&seed).unwrap();
        let status: u8 = mem.read_obj(GuestAddress(0x6000)).unwrap();
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(0x5000)).unwrap();
        assert_eq!((status, data), (0, [0x5a; 512]), "VIRTIO_BLK_S_OK and the sector's bytes");
    }
}

//! Warm templates: a microVM of an image booted once to where its guest agent waits for a
//! workload, snapshotted into the store, and restored for every `run --isolation microvm
//! --snapshot` of that image instead of booting its kernel again.
//!
//! ```text
//! <store>/snapshots/<key>/        the VM's snapshot (twinbox_microvm::snapshot: memory, state.json, SHA256SUMS)
//! <store>/snapshots/<key>.json    what it is of: Template (image, digest, kernel, shape, VMM build)
//! <store>/snapshots/<key>.lock    held while it is made, so two runs make it once
//! ```
//!
//! The key is a hash of everything the snapshot depends on: the image's manifest digest, its
//! root disk file and the kernel file (path, size, change time), the VM's shape (memory,
//! vCPUs, irqchip, a network card or not) and the VMM build. A template of an image that is no
//! longer in the store is removed by `twinbox prune`; `twinbox snapshot ls|rm` list and remove
//! them by hand.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use twinbox_image::Store;
use twinbox_microvm::config::{NetConfig, VsockConfig};
use twinbox_microvm::snapshot::VMM_BUILD;

use crate::microvm::{self, ImageRunError, PreparedRun, VmOptions};

/// The guest CID of every microVM (each has its own socket device).
pub const GUEST_CID: u64 = 3;
/// How long a template's guest may take to boot to its agent's ready signal (the nested L1's
/// emulation boots in seconds; a hardware host in well under one).
const BOOT_LIMIT: Duration = Duration::from_secs(120);

/// What a template is of; `<key>.json` beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    /// Its key (the directory's name).
    pub key: String,
    /// The image reference it was made for.
    pub image: String,
    /// The image's manifest digest.
    pub image_digest: String,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The kernel file's identity when the template was made (path, size, change time).
    #[serde(default)]
    pub kernel_id: String,
    /// The image's root disk file's identity then.
    #[serde(default)]
    pub disk_id: String,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// Whether it has a network card (for instances on a bridge network).
    pub network: bool,
    /// The VMM build that made it.
    pub vmm: String,
    /// When it was made (RFC 3339).
    pub created: String,
}

/// Where the templates of `store` live.
pub fn templates_dir(store: &Store) -> PathBuf {
    store.root().join("snapshots")
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageRunError + 'a {
    move |source| ImageRunError::Template(format!("cannot {op} {}: {source}", path.display()))
}

/// A file's identity as far as a template depends on it: path, size and change time.
fn file_identity(path: &Path) -> Result<String, ImageRunError> {
    let m = fs::metadata(path).map_err(io_err("read", path))?;
    Ok(format!("{} {} {}.{}", path.display(), m.len(), m.ctime(), m.ctime_nsec()))
}

/// The key of the template for `prepared` (an image's run) in a VM of `shape`.
pub fn key(
    image_digest: &str,
    prepared: &PreparedRun,
    shape: &VmOptions,
    network: bool,
) -> Result<String, ImageRunError> {
    let mut h = Sha256::new();
    for part in [
        VMM_BUILD.to_owned(),
        image_digest.to_owned(),
        file_identity(&prepared.kernel)?,
        file_identity(&prepared.disk.path)?,
        prepared.cmdline.clone(),
        format!(
            "{} {} {} {network}",
            shape.memory_mib.unwrap_or(microvm::DEFAULT_MEMORY_MIB),
            shape.vcpus.unwrap_or(1),
            shape.irqchip
        ),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The snapshot directory of the template for this run, made first when there is none: the
/// image's VM booted with its agent in template mode, paused at its ready signal, snapshotted.
/// Concurrent callers make it once.
pub fn ensure(
    vmm: &crate::vmm::Launch,
    store: &Store,
    image: &str,
    image_digest: &str,
    prepared: &PreparedRun,
    shape: &VmOptions,
    network: bool,
) -> Result<PathBuf, ImageRunError> {
    let key = key(image_digest, prepared, shape, network)?;
    let dir = templates_dir(store);
    let snapshot = dir.join(&key);
    let meta = dir.join(format!("{key}.json"));
    if meta.is_file() {
        return Ok(snapshot);
    }
    fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
    let lock_path = dir.join(format!("{key}.lock"));
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err("open", &lock_path))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| ImageRunError::Template(format!("cannot lock {}: {e}", lock_path.display())))?;
    if meta.is_file() {
        return Ok(snapshot);
    }
    // Left by a maker that was killed before it wrote the metadata.
    let _ = fs::remove_dir_all(&snapshot);
    make(vmm, prepared, shape, network, &key, &snapshot)?;
    let template = Template {
        key: key.clone(),
        image: image.to_owned(),
        image_digest: image_digest.to_owned(),
        kernel: prepared.kernel.clone(),
        kernel_id: file_identity(&prepared.kernel)?,
        disk_id: file_identity(&prepared.disk.path)?,
        memory_mib: shape.memory_mib.unwrap_or(microvm::DEFAULT_MEMORY_MIB),
        vcpus: shape.vcpus.unwrap_or(1),
        network,
        vmm: VMM_BUILD.to_owned(),
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    let tmp = dir.join(format!(".{key}.json.{}", std::process::id()));
    let json = serde_json::to_vec_pretty(&template).map_err(|e| ImageRunError::Template(e.to_string()))?;
    fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&json).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&tmp, &meta))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            let _ = fs::remove_dir_all(&snapshot);
            ImageRunError::Template(format!("cannot write {}: {e}", meta.display()))
        })?;
    let _ = fs::remove_file(&lock_path);
    Ok(snapshot)
}

/// Boots the template VM and snapshots it into `snapshot`.
fn make(
    vmm: &crate::vmm::Launch,
    prepared: &PreparedRun,
    shape: &VmOptions,
    network: bool,
    key: &str,
    snapshot: &Path,
) -> Result<(), ImageRunError> {
    let mut guest = prepared.guest.clone();
    guest.template = true;
    guest.network = None;
    let prepared = PreparedRun { guest, ..prepared.clone() };
    // Its own card (a tap on no bridge: it sends nothing) and socket; each restored copy gets
    // the instance's.
    let nets = if network { vec![NetConfig { tap: format!("tbs{}", &key[..8]), mac: None }] } else { Vec::new() };
    let (mut config, initrd) = microvm::vm_config(prepared, shape, nets);
    config.timeout_ms = Some(BOOT_LIMIT.as_millis() as u64);
    let socket = crate::container::vm::vsock_path(&format!("tpl{key}"));
    if let Some(parent) = socket.parent() {
        fs::create_dir_all(parent).map_err(io_err("create", parent))?;
    }
    let _ = fs::remove_file(&socket);
    config.vsock = Some(VsockConfig { guest_cid: GUEST_CID, uds_path: socket.clone() });
    // The jailed VMM writes the snapshot into a directory of its own uid, bound into its jail;
    // moved into place from there once complete. One name per key (its lock is held here): what
    // a killed maker left is removed by the next one, or by prune.
    let making = snapshot.with_file_name(format!(".{key}.making"));
    let _ = fs::remove_dir_all(&making);
    fs::create_dir(&making).map_err(io_err("create", &making))?;
    let result = (|| {
        if let Some(uid) = vmm.jail.as_ref().and_then(|j| j.uid) {
            std::os::unix::fs::chown(&making, Some(uid), Some(uid)).map_err(io_err("hand to the VMM", &making))?;
        }
        let written = making.join("snapshot");
        microvm::make_snapshot(&vmm.command, config, initrd, &written, vmm.jail.clone())?;
        fs::rename(&written, snapshot).map_err(io_err("move into place", snapshot))
    })();
    let _ = fs::remove_file(&socket);
    let _ = fs::remove_dir_all(&making);
    result
}

/// Every template in the store, with the bytes its snapshot takes on disk.
pub fn list(store: &Store) -> Vec<(Template, u64)> {
    let dir = templates_dir(store);
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") || entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let Some(t) = fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Template>(&b).ok()) else { continue };
        let used = fs::read_dir(dir.join(&t.key))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum();
        out.push((t, used));
    }
    out.sort_by(|a, b| a.0.created.cmp(&b.0.created).then(a.0.key.cmp(&b.0.key)));
    out
}

/// Removes the template `key` (its snapshot and metadata).
pub fn remove(store: &Store, key: &str) -> Result<(), ImageRunError> {
    let dir = templates_dir(store);
    let meta = dir.join(format!("{key}.json"));
    // The metadata first: without it the snapshot is never used again.
    fs::remove_file(&meta).map_err(io_err("remove", &meta))?;
    let snapshot = dir.join(key);
    fs::remove_dir_all(&snapshot)
        .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
        .map_err(io_err("remove", &snapshot))
}

/// Whether `t` can be restored again: made by this VMM, of files that are still as they were
/// (a kernel rebuilt or a root disk made again gets a template of its own).
fn current(t: &Template) -> bool {
    let same = |id: &str| {
        let path = id.rsplitn(3, ' ').nth(2).unwrap_or_default();
        file_identity(Path::new(path)).is_ok_and(|now| now == id)
    };
    t.vmm == VMM_BUILD && same(&t.kernel_id) && same(&t.disk_id)
}

/// Removes the templates whose image is not in the store any more (`in_store` says which
/// digests are) or that can never be restored again (another VMM build, a kernel or root disk
/// file that changed), and what killed makers left; returns the keys removed.
pub fn prune(store: &Store, in_store: impl Fn(&str) -> bool) -> Vec<String> {
    let mut removed = Vec::new();
    for (t, _) in list(store) {
        if (!in_store(&t.image_digest) || !current(&t)) && remove(store, &t.key).is_ok() {
            removed.push(t.key);
        }
    }
    // Snapshots without metadata whose maker is gone (no lock held).
    let dir = templates_dir(store);
    for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let stale_tmp = name.starts_with('.');
        let orphan = !stale_tmp && path.is_dir() && !dir.join(format!("{name}.json")).exists();
        if !(orphan || stale_tmp) {
            continue;
        }
        let key = name.trim_start_matches('.').split('.').next().unwrap_or_default().to_owned();
        let lock_path = dir.join(format!("{key}.lock"));
        let busy = fs::OpenOptions::new()
            .write(true)
            .open(&lock_path)
            .ok()
            .is_some_and(|f| nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err());
        if busy {
            continue;
        }
        let gone = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        if gone.is_ok() && orphan {
            removed.push(name);
        }
        let _ = fs::remove_file(&lock_path);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A template's files as `ensure` leaves them, without booting anything; its kernel and
    /// disk are files of the store's directory.
    fn fake(store: &Store, key: &str, digest: &str, vmm: &str) {
        let dir = templates_dir(store);
        let (kernel, disk) = (store.root().join("vmlinux"), store.root().join("root disk.ext4"));
        for f in [&kernel, &disk] {
            if !f.exists() {
                fs::write(f, b"x").unwrap();
            }
        }
        fs::create_dir_all(dir.join(key)).unwrap();
        fs::write(dir.join(key).join("memory"), vec![1u8; 8192]).unwrap();
        let t = Template {
            key: key.into(),
            image: format!("img-{key}:latest"),
            image_digest: digest.into(),
            kernel: kernel.clone(),
            kernel_id: file_identity(&kernel).unwrap(),
            disk_id: file_identity(&disk).unwrap(),
            memory_mib: 128,
            vcpus: 1,
            network: false,
            vmm: vmm.into(),
            created: format!("2026-12-07T00:00:0{}Z", key.len() % 10),
        };
        fs::write(dir.join(format!("{key}.json")), serde_json::to_vec(&t).unwrap()).unwrap();
    }

    #[test]
    fn prune_removes_templates_of_images_gone_other_builds_and_leftovers_of_killed_makers() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        fake(&store, "aaaa", "sha256:kept", VMM_BUILD);
        fake(&store, "bbbb", "sha256:gone", VMM_BUILD);
        fake(&store, "cccc", "sha256:kept", "0.0.1+old");
        let dir = templates_dir(&store);
        // A maker killed after its snapshot, before its metadata; and one killed mid-write.
        fs::create_dir_all(dir.join("dddd")).unwrap();
        fs::create_dir_all(dir.join(".eeee.tmp-99")).unwrap();
        let listed: Vec<String> = list(&store).into_iter().map(|(t, _)| t.key).collect();
        assert_eq!(listed.len(), 3, "{listed:?}");
        assert!(list(&store).iter().all(|(_, bytes)| *bytes >= 8192), "disk use is counted");
        let mut removed = prune(&store, |d| d == "sha256:kept");
        removed.sort();
        assert_eq!(removed, ["bbbb", "cccc", "dddd"]);
        let left: Vec<String> =
            fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        let mut left = left;
        left.sort();
        assert_eq!(left, ["aaaa", "aaaa.json"]);
        remove(&store, "aaaa").unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        assert!(remove(&store, "aaaa").is_err(), "removing what is not there says so");
        // A kernel built again: its templates go.
        fake(&store, "gggg", "sha256:kept", VMM_BUILD);
        assert!(prune(&store, |_| true).is_empty(), "nothing changed");
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(store.root().join("vmlinux"), b"rebuilt").unwrap();
        assert_eq!(prune(&store, |_| true), ["gggg"]);
    }

    #[test]
    fn a_maker_at_work_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let dir = templates_dir(&store);
        fs::create_dir_all(dir.join("ffff")).unwrap();
        let lock = fs::File::create(dir.join("ffff.lock")).unwrap();
        let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
        assert!(prune(&store, |_| true).is_empty());
        assert!(dir.join("ffff").is_dir());
    }
}

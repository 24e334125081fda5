//! Root disks for microVMs: an image flattened into an ext4 filesystem image, made by e2fsprogs'
//! own `mkfs.ext4 -d` (the format's maker), cached by manifest digest under
//! `ROOT/disks/<hex>.ext4` so a second VM of the same image reuses it.
//!
//! The disk is built in `tmp/` and appears under `disks/` by one rename once complete, so a
//! crash or Ctrl-C never leaves a half-made disk where a VM would use it. Guests mount it
//! read-only (the copy-on-write layer is a tmpfs overlay inside the guest), so one file serves
//! every VM of the image at once.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use twinbox_exit::ExitCode;

use crate::digest::Digest;
use crate::rootfs::flatten;
use crate::store::{Image, Store, StoreError};

/// The program that makes the filesystem.
pub const MKFS: &str = "mkfs.ext4";

const MIB: u64 = 1 << 20;
/// Bytes of inode table per inode (`mkfs.ext4 -I`).
const INODE_SIZE: u64 = 256;
/// Room for the journal-less ext4's own metadata (superblocks, group descriptors, bitmaps).
const FIXED_OVERHEAD: u64 = 8 * MIB;

/// Errors while making a root disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The store could not give the image's layers.
    #[error("cannot flatten the image")]
    Store(#[from] StoreError),
    /// A filesystem operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// mkfs.ext4 is not installed.
    #[error("{MKFS} is not installed; install e2fsprogs (apt-get install e2fsprogs) to run images as microVMs")]
    MkfsMissing,
    /// mkfs.ext4 failed.
    #[error("{MKFS} failed ({status}) making {path}: {stderr}")]
    Mkfs {
        /// The disk being made.
        path: PathBuf,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed.
        stderr: String,
    },
}

impl ExitCode for DiskError {
    fn exit_code(&self) -> i32 {
        match self {
            DiskError::Store(e) => e.exit_code(),
            DiskError::MkfsMissing => twinbox_exit::USER_ERROR,
            DiskError::Io { .. } | DiskError::Mkfs { .. } => twinbox_exit::INTERNAL,
        }
    }
}

fn io_err(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> DiskError {
    let path = path.into();
    move |source| DiskError::Io { op, path, source }
}

/// A root disk in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootDisk {
    /// The ext4 image.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Whether this call made it (false: it was cached).
    pub created: bool,
}

/// Where the disks live.
pub fn disks_dir(store: &Store) -> PathBuf {
    store.root().join("disks")
}

/// Where the root disk of the image with this manifest lives (whether or not it exists).
pub fn disk_path(store: &Store, manifest: &Digest) -> PathBuf {
    disks_dir(store).join(format!("{}.ext4", manifest.hex()))
}

/// The root disk of `image`, made now unless it is cached.
pub fn root_disk(store: &Store, image: &Image) -> Result<RootDisk, DiskError> {
    let path = disk_path(store, &image.manifest_digest);
    if let Ok(m) = fs::metadata(&path) {
        return Ok(RootDisk { path, size: m.len(), created: false });
    }
    // A concurrent prune must not empty tmp/ under us.
    let _guard = store.writer_guard()?;
    let dir = disks_dir(store);
    fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    let work = tempfile::Builder::new()
        .prefix("disk-")
        .tempdir_in(store.tmp_dir())
        .map_err(io_err("create temp dir in", store.tmp_dir()))?;
    let tree = work.path().join("rootfs");
    flatten(store, image, &tree)?;
    let image_file = work.path().join("root.ext4");
    let size = make_ext4(&tree, &image_file)?;
    fs::File::open(&image_file).and_then(|f| f.sync_all()).map_err(io_err("sync", &image_file))?;
    match fs::rename(&image_file, &path) {
        Ok(()) => {}
        // Someone made it at the same time; theirs is as good.
        Err(_) if path.is_file() => {}
        Err(e) => return Err(io_err("rename disk to", &path)(e)),
    }
    if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    drop(work);
    tracing::debug!(disk = %path.display(), size, "root disk made");
    Ok(RootDisk { path, size, created: true })
}

/// Sizes the filesystem for `tree` and makes it in `out` with `mkfs.ext4 -d`. Returns the size.
pub fn make_ext4(tree: &Path, out: &Path) -> Result<u64, DiskError> {
    let (bytes, inodes) = tree_usage(tree)?;
    let size = ext4_size(bytes, inodes);
    let file = fs::File::create(out).map_err(io_err("create", out))?;
    file.set_len(size).map_err(io_err("size", out))?;
    drop(file);
    let result = Command::new(MKFS)
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-L", "twinbox-root"])
        // No journal (the guest mounts it read-only), and no lazy init to do in the guest.
        .args(["-O", "^has_journal", "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0"])
        .arg("-I")
        .arg(INODE_SIZE.to_string())
        .arg("-N")
        .arg((inodes + inodes / 4 + 64).to_string())
        .arg("-d")
        .arg(tree)
        .arg(out)
        .stdin(std::process::Stdio::null())
        .output();
    let output = match result {
        Ok(o) => o,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let _ = fs::remove_file(out);
            return Err(DiskError::MkfsMissing);
        }
        Err(e) => {
            let _ = fs::remove_file(out);
            return Err(io_err("run", MKFS)(e));
        }
    };
    if !output.status.success() {
        let _ = fs::remove_file(out);
        return Err(DiskError::Mkfs {
            path: out.to_owned(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(size)
}

/// Bytes of file data (rounded up to 4 KiB blocks) and the number of inodes in `tree`.
fn tree_usage(tree: &Path) -> Result<(u64, u64), DiskError> {
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    for entry in walkdir::WalkDir::new(tree) {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(tree).to_owned();
            DiskError::Io { op: "walk", path, source: e.into() }
        })?;
        let meta = entry.metadata().map_err(|e| DiskError::Io {
            op: "stat",
            path: entry.path().to_owned(),
            source: e.into(),
        })?;
        inodes += 1;
        if meta.is_file() || meta.is_dir() || meta.file_type().is_symlink() {
            bytes += meta.len().div_ceil(4096) * 4096;
        }
    }
    Ok((bytes, inodes))
}

/// The filesystem size for `bytes` of data in `inodes` inodes: the data with 25% slack (block
/// groups, directory blocks, extent trees), the inode table, a fixed overhead, whole MiB.
pub fn ext4_size(bytes: u64, inodes: u64) -> u64 {
    let raw = bytes + bytes / 4 + (inodes + inodes / 4 + 64) * INODE_SIZE + FIXED_OVERHEAD;
    raw.div_ceil(MIB) * MIB
}

/// Removes the disks of images no tag or hold reaches any more. Returns how many went.
pub(crate) fn remove_unreferenced(
    store: &Store,
    live: &std::collections::BTreeSet<Digest>,
) -> Result<usize, StoreError> {
    let dir = disks_dir(store);
    let Ok(entries) = fs::read_dir(&dir) else { return Ok(0) };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let keep = name
            .strip_suffix(".ext4")
            .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok())
            .is_some_and(|d| live.contains(&d));
        if !keep {
            fs::remove_file(e.path()).map_err(|source| StoreError::Io { op: "remove", path: e.path(), source })?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_grows_with_data_and_inodes_in_whole_mib() {
        let empty = ext4_size(0, 1);
        assert_eq!(empty % MIB, 0);
        assert!(empty >= FIXED_OVERHEAD);
        assert!(ext4_size(100 * MIB, 10) >= 125 * MIB);
        assert!(ext4_size(0, 100_000) > ext4_size(0, 1) + 100_000 * INODE_SIZE);
    }
}

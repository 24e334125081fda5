//! The shared lower layer that holds the mount points (and working directory) an image lacks:
//! `<store>/mountpoints/<sha256>`, the topmost lower of every container whose image lacks the
//! same ones, so that the runtime does not make them in each container's upper layer (six
//! files and directories for a one-binary image, each an inode and a copy-up per container).
//!
//! The layer holds each missing entry (an empty directory, or an empty file for a bind mount
//! of a file: mode 0755 or 0644, root's, time 0) and the directories above it. As the topmost
//! lower, its directories give the merged ones their mode, owner and times, so a directory
//! the image has (`/etc`, `/tmp`, `/home/app`) and its root get exactly the image's: taken from
//! the topmost image layer that has them. The name hashes all of it: a layer is made once
//! (atomically, a temporary directory renamed into place) and never changed.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{io_err, EngineError};

/// An entry of the layer and the attributes it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    path: PathBuf,
    dir: bool,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
}

impl Entry {
    fn from_image(path: &Path, layers: &[PathBuf]) -> Option<Entry> {
        let md = layers.iter().rev().find_map(|l| fs::symlink_metadata(l.join(path)).ok())?;
        Some(Entry {
            path: path.to_owned(),
            dir: md.is_dir(),
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: (md.mtime(), md.mtime_nsec()),
        })
    }

    fn new(path: &Path, dir: bool) -> Entry {
        Entry { path: path.to_owned(), dir, mode: if dir { 0o755 } else { 0o644 }, uid: 0, gid: 0, mtime: (0, 0) }
    }
}

/// The entries for `missing` (see `spec::missing_mount_points`, parents first) over `layers`
/// (base first): the root, then each missing entry after the directories above it.
fn entries(layers: &[PathBuf], missing: &[(PathBuf, bool)]) -> Vec<Entry> {
    let root = Entry::from_image(Path::new(""), layers).unwrap_or_else(|| Entry::new(Path::new(""), true));
    let mut out = vec![root];
    for (path, dir) in missing {
        let mut at = PathBuf::new();
        for c in path.parent().into_iter().flat_map(|p| p.components()) {
            at.push(c);
            if !out.iter().any(|e| e.path == at) {
                out.push(Entry::from_image(&at, layers).unwrap_or_else(|| Entry::new(&at, true)));
            }
        }
        if !out.iter().any(|e| &e.path == path) {
            out.push(Entry::new(path, *dir));
        }
    }
    out
}

/// The layer for `missing` over `layers`, under `parent` (made when missing).
pub fn layer(parent: &Path, layers: &[PathBuf], missing: &[(PathBuf, bool)]) -> Result<PathBuf, EngineError> {
    use sha2::Digest;
    let entries = entries(layers, missing);
    let mut h = sha2::Sha256::new();
    for e in &entries {
        let bytes = e.path.as_os_str().as_encoded_bytes();
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
        h.update([u8::from(e.dir)]);
        for n in [u64::from(e.mode), u64::from(e.uid), u64::from(e.gid), e.mtime.0 as u64, e.mtime.1 as u64] {
            h.update(n.to_le_bytes());
        }
    }
    let dir = parent.join(format!("{:x}", h.finalize()));
    if dir.is_dir() {
        return Ok(dir);
    }
    fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
    let tmp =
        tempfile::Builder::new().prefix(".tmp-").tempdir_in(parent).map_err(io_err("create a directory in", parent))?;
    for e in &entries {
        let at = tmp.path().join(&e.path);
        if !e.path.as_os_str().is_empty() {
            let made = if e.dir { fs::create_dir(&at) } else { fs::File::create(&at).map(drop) };
            made.map_err(io_err("create", &at))?;
        }
        std::os::unix::fs::lchown(&at, Some(e.uid), Some(e.gid)).map_err(io_err("chown", &at))?;
        fs::set_permissions(&at, fs::Permissions::from_mode(e.mode)).map_err(io_err("chmod", &at))?;
    }
    // Times last, children first: making an entry changes its directory's.
    for e in entries.iter().rev() {
        let at = tmp.path().join(&e.path);
        let time = std::time::UNIX_EPOCH
            + std::time::Duration::new(e.mtime.0.max(0) as u64, e.mtime.1.clamp(0, 999_999_999) as u32);
        let set = fs::File::open(&at).and_then(|f| f.set_times(fs::FileTimes::new().set_modified(time)));
        set.map_err(io_err("set the time of", &at))?;
    }
    match fs::rename(tmp.path(), &dir) {
        Ok(()) => {
            let _ = tmp.keep();
            Ok(dir)
        }
        // Made by a concurrent run meanwhile: the same content.
        Err(_) if dir.is_dir() => Ok(dir),
        Err(e) => Err(io_err("rename into place", &dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The directories the image has keep their mode and owner in the merged view; new ones
    /// are root's 0755 and files 0644, whatever the umask.
    #[test]
    fn parents_keep_the_images_attributes() {
        let d = tempfile::tempdir().unwrap();
        let (base, top) = (d.path().join("base"), d.path().join("top"));
        fs::create_dir_all(base.join("tmp")).unwrap();
        fs::create_dir_all(top.join("tmp")).unwrap();
        fs::set_permissions(&base, fs::Permissions::from_mode(0o750)).unwrap();
        fs::set_permissions(&top, fs::Permissions::from_mode(0o711)).unwrap();
        fs::set_permissions(base.join("tmp"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(top.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        std::os::unix::fs::lchown(top.join("tmp"), Some(1234), Some(5678)).unwrap();
        let missing = [(PathBuf::from("tmp/x"), true), (PathBuf::from("etc/hosts"), false)];
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let made = layer(&d.path().join("mp"), &[base.clone(), top.clone()], &missing);
        nix::sys::stat::umask(old);
        let made = made.unwrap();
        let attrs = |p: &str| {
            let md = fs::symlink_metadata(made.join(p)).unwrap();
            (md.mode() & 0o7777, md.uid(), md.gid())
        };
        assert_eq!(attrs(""), (0o711, 0, 0), "the top layer's root");
        assert_eq!(attrs("tmp"), (0o1777, 1234, 5678), "the topmost layer's /tmp");
        assert_eq!(attrs("tmp/x"), (0o755, 0, 0));
        assert_eq!(attrs("etc"), (0o755, 0, 0));
        assert_eq!(attrs("etc/hosts"), (0o644, 0, 0));
        assert!(fs::symlink_metadata(made.join("etc/hosts")).unwrap().is_file());
        let tmp_time = fs::symlink_metadata(top.join("tmp")).unwrap().modified().unwrap();
        assert_eq!(fs::symlink_metadata(made.join("tmp")).unwrap().modified().unwrap(), tmp_time);
        // Made once: the same list over the same image gives the same layer.
        assert_eq!(layer(&d.path().join("mp"), &[base, top.clone()], &missing).unwrap(), made);
        // Another /tmp mode is another layer.
        fs::set_permissions(top.join("tmp"), fs::Permissions::from_mode(0o755)).unwrap();
        assert_ne!(layer(&d.path().join("mp"), &[d.path().join("base"), top], &missing).unwrap(), made);
        let names: Vec<_> = fs::read_dir(d.path().join("mp")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temporary directory left: {names:?}");
    }
}

//! What a `RUN` step changed, as a layer: an overlayfs upper directory turned into a
//! [`LayerPlan`].
//!
//! ```text
//! upper/                          layer tar
//!   app/            (dir)     ─►  app/                 mode, owner, mtime, xattrs
//!   app/out         (file)    ─►  app/out              hardlinks grouped by (dev, ino)
//!   bin/cat         (c 0/0)   ─►  bin/.wh.cat          empty file, mode 0600
//!   d/   trusted.overlay.opaque=y
//!                             ─►  d/ + d/.wh..wh..opq  empty file, the dir's permissions
//! ```
//!
//! Symlinks, fifos and devices keep their kind, mode and owner. Extended attributes are kept
//! (PAX `SCHILY.xattr.*`), except overlayfs's own `trusted.overlay.*`. Sockets are skipped
//! (a layer cannot hold one; Docker skips them too). Times are kept, or clamped to
//! `SOURCE_DATE_EPOCH` when the build has one.
//!
//! Two overlayfs features would store part of a change outside the upper directory
//! (`redirect_dir` for renamed directories, `metacopy` for chmod/chown-only copy-ups); the
//! conversion refuses an upper that uses them rather than write an incomplete layer.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use twinbox_exit::ExitCode;

use super::layer::{Entry, EntryKind, LayerPlan, Xattrs};

/// The prefix of overlayfs's private xattrs.
const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";
/// The xattr marking an opaque directory.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Overlay xattrs that mean the change is not all in the upper directory.
const UNSUPPORTED_XATTRS: [(&str, &str); 2] =
    [("trusted.overlay.redirect", "redirect_dir"), ("trusted.overlay.metacopy", "metacopy")];
/// Prefix of an OCI whiteout name.
const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of the opaque-directory marker.
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Why an upper directory could not be turned into a layer.
#[derive(Debug, thiserror::Error)]
pub enum UpperError {
    /// Reading the upper directory failed.
    #[error("cannot read {}", path.display())]
    Read {
        /// What was being read.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A name a layer's tar paths cannot carry.
    #[error("{}: file names that are not UTF-8 cannot be stored in a layer", path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
    },
    /// A name that a layer would read as a whiteout.
    #[error("{}: names starting with .wh. are OCI whiteouts and cannot be stored in a layer", path.display())]
    Reserved {
        /// The file.
        path: PathBuf,
    },
    /// The overlay mount used a feature that keeps part of the change outside the upper dir.
    #[error("{}: overlayfs {feature} is on ({xattr}); mount the build overlay with {feature}=off", path.display())]
    Feature {
        /// The file.
        path: PathBuf,
        /// The overlayfs feature.
        feature: &'static str,
        /// The xattr found.
        xattr: &'static str,
    },
}

impl ExitCode for UpperError {
    fn exit_code(&self) -> i32 {
        match self {
            // What the step's command wrote, or how the host's overlayfs is set up.
            UpperError::NotUtf8 { .. } | UpperError::Reserved { .. } | UpperError::Feature { .. } => {
                twinbox_exit::USER_ERROR
            }
            UpperError::Read { .. } => twinbox_exit::INTERNAL,
        }
    }
}

/// The layer a `RUN` step's upper directory describes. File contents are read from `upper`
/// when the plan is written, so the directory must outlive [`super::layer::write_layer`].
/// `clamp` caps every modification time (`SOURCE_DATE_EPOCH`).
pub fn plan_from_upper(upper: &Path, clamp: Option<u64>) -> Result<LayerPlan, UpperError> {
    let mut plan = LayerPlan::default();
    let walk = walkdir::WalkDir::new(upper).min_depth(1).follow_links(false).sort_by_file_name();
    for item in walk {
        let item = item.map_err(|e| {
            let path = e.path().unwrap_or(upper).to_owned();
            UpperError::Read { path, source: e.into() }
        })?;
        let path = item.path();
        let read_err = |source| UpperError::Read { path: path.to_owned(), source };
        let rel = path.strip_prefix(upper).expect("walkdir yields paths below its root");
        let rel = rel.to_str().ok_or_else(|| UpperError::NotUtf8 { path: path.to_owned() })?.to_owned();
        let name = item.file_name().to_str().unwrap_or_default();
        if name.starts_with(WHITEOUT_PREFIX) {
            return Err(UpperError::Reserved { path: path.to_owned() });
        }
        let meta = std::fs::symlink_metadata(path).map_err(read_err)?;
        let ft = meta.file_type();
        let mtime = u64::try_from(meta.mtime()).unwrap_or(0);
        let mtime = clamp.map_or(mtime, |c| mtime.min(c));
        let (mode, uid, gid) = (meta.mode() & 0o7777, u64::from(meta.uid()), u64::from(meta.gid()));
        let kind = if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_file() {
            let link = (meta.nlink() > 1).then(|| (meta.dev(), meta.ino()));
            EntryKind::File { source: path.to_owned(), size: meta.len(), link }
        } else if ft.is_symlink() {
            let target = std::fs::read_link(path).map_err(read_err)?;
            let target = target.to_str().ok_or_else(|| UpperError::NotUtf8 { path: path.to_owned() })?.to_owned();
            EntryKind::Symlink { target }
        } else if ft.is_fifo() {
            EntryKind::Fifo
        } else if ft.is_char_device() || ft.is_block_device() {
            let (major, minor) = (nix::sys::stat::major(meta.rdev()), nix::sys::stat::minor(meta.rdev()));
            if ft.is_char_device() && major == 0 && minor == 0 {
                let whiteout = sibling(&rel, &format!("{WHITEOUT_PREFIX}{name}"));
                plan.insert(whiteout, Entry::new(EntryKind::Whiteout, 0o600, uid, gid, mtime));
                continue;
            }
            let (major, minor) = (major as u32, minor as u32);
            if ft.is_char_device() {
                EntryKind::Char { major, minor }
            } else {
                EntryKind::Block { major, minor }
            }
        } else {
            tracing::debug!(path = %path.display(), "socket in a RUN step's changes skipped");
            continue;
        };
        let (xattrs, opaque) = read_xattrs(path)?;
        if opaque && kind == EntryKind::Dir {
            let marker = Entry::new(EntryKind::Whiteout, mode & 0o777, uid, gid, mtime);
            plan.insert(format!("{rel}/{OPAQUE_MARKER}"), marker);
        }
        plan.insert(rel, Entry { kind, mode, uid, gid, mtime, xattrs });
    }
    Ok(plan)
}

/// Whether `dir` is an opaque overlayfs directory (`trusted.overlay.opaque=y`): in a stack of
/// lower directories, it hides what the directories below it hold at the same path.
pub fn is_opaque(dir: &Path) -> bool {
    xattr::get(dir, OPAQUE_XATTR).ok().flatten().is_some_and(|v| v == b"y")
}

/// `name` next to `rel`.
fn sibling(rel: &str, name: &str) -> String {
    match rel.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{name}"),
        None => name.to_owned(),
    }
}

/// The xattrs worth keeping (sorted by name), and whether the directory is opaque.
fn read_xattrs(path: &Path) -> Result<(Xattrs, bool), UpperError> {
    let read_err = |source| UpperError::Read { path: path.to_owned(), source };
    let names = match xattr::list(path) {
        Ok(n) => n,
        // A filesystem without xattrs has none to keep.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok((Vec::new(), false)),
        Err(e) => return Err(read_err(e)),
    };
    let mut out = Vec::new();
    let mut opaque = false;
    for name in names {
        let Some(name) = name.to_str() else {
            tracing::debug!(path = %path.display(), "xattr with a non-UTF-8 name skipped");
            continue;
        };
        if let Some((x, feature)) = UNSUPPORTED_XATTRS.iter().find(|(x, _)| *x == name) {
            return Err(UpperError::Feature { path: path.to_owned(), feature, xattr: x });
        }
        let Some(value) = xattr::get(path, name).map_err(read_err)? else { continue };
        if name == OPAQUE_XATTR {
            opaque = value == b"y";
        } else if !name.starts_with(OVERLAY_XATTR_PREFIX) {
            out.push((name.to_owned(), value));
        }
    }
    out.sort();
    Ok((out, opaque))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteout_names_sit_next_to_their_victim() {
        assert_eq!(sibling("a/b/c", ".wh.c"), "a/b/.wh.c");
        assert_eq!(sibling("c", ".wh.c"), ".wh.c");
    }

    #[test]
    fn plain_upper_without_root() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/f"), "x").unwrap();
        std::fs::hard_link(d.path().join("a/b/f"), d.path().join("a/g")).unwrap();
        std::os::unix::fs::symlink("b/f", d.path().join("a/s")).unwrap();
        let plan = plan_from_upper(d.path(), Some(5)).unwrap();
        let paths: Vec<&str> = plan.entries().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["a", "a/b", "a/b/f", "a/g", "a/s"]);
        let f = plan.get("a/b/f").unwrap();
        let g = plan.get("a/g").unwrap();
        assert!(
            matches!((&f.kind, &g.kind), (EntryKind::File { link: Some(x), .. }, EntryKind::File { link: Some(y), .. }) if x == y)
        );
        assert!(plan.entries().all(|(_, e)| e.mtime <= 5));
        std::fs::write(d.path().join(".wh.x"), "").unwrap();
        assert!(matches!(plan_from_upper(d.path(), None), Err(UpperError::Reserved { .. })));
    }
}

//! File operations on cgroup directories.
//!
//! The same code runs on the kernel's cgroupfs and on the plain directory trees the unit tests
//! build: files are opened with `O_CREAT` (harmless on cgroupfs, where they already exist; a
//! missing cgroupfs file fails with `EACCES` and is reported as [`CgroupError::MissingFile`]),
//! and removing a directory deletes plain files in it only when it is *not* on a cgroup
//! filesystem.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC};

use super::CgroupError;

/// Writes `value` to a cgroup file in a single `write(2)`.
pub(super) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    tracing::debug!(path = %path.display(), value, "cgroup write");
    let mut file = match std::fs::OpenOptions::new().write(true).truncate(true).create(true).mode(0o644).open(path) {
        Ok(f) => f,
        Err(e) if !path.exists() && path.parent().is_some_and(Path::is_dir) && e.kind() != ErrorKind::NotFound => {
            return Err(CgroupError::MissingFile { path: path.to_path_buf() })
        }
        Err(source) => return Err(CgroupError::Write { path: path.to_path_buf(), value: value.into(), source }),
    };
    file.write_all(value.as_bytes()).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.into(),
        source,
    })?;
    #[cfg(test)]
    WRITES.with(|w| w.borrow_mut().push((path.to_path_buf(), value.to_string())));
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Every successful write of this thread, in order: unit tests assert on it (a file in the
    /// fake tree only keeps the last value written to it).
    static WRITES: std::cell::RefCell<Vec<(PathBuf, String)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The writes recorded since the last call, oldest first.
#[cfg(test)]
pub(super) fn take_writes() -> Vec<(PathBuf, String)> {
    WRITES.with(|w| std::mem::take(&mut *w.borrow_mut()))
}

/// Reads a whole cgroup file.
pub(super) fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read { path: path.to_path_buf(), source })
}

/// Reads a cgroup file, `None` when it does not exist.
pub(super) fn read_if_exists(path: &Path) -> Result<Option<String>, CgroupError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CgroupError::Read { path: path.to_path_buf(), source }),
    }
}

/// Parses a file holding one unsigned number.
pub(super) fn parse_u64(path: &Path, text: &str) -> Result<u64, CgroupError> {
    let t = text.trim();
    t.parse().map_err(|_| CgroupError::Parse { path: path.to_path_buf(), content: t.chars().take(80).collect() })
}

/// A number from a file of `key value` lines (`memory.events`, `cpu.stat`, `memory.oom_control`).
pub(super) fn keyed_u64(path: &Path, text: &str, key: &str) -> Result<Option<u64>, CgroupError> {
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if it.next() == Some(key) {
            return it.next().map(|v| parse_u64(path, v)).transpose();
        }
    }
    Ok(None)
}

/// An optional number file: `None` when the file does not exist.
pub(super) fn read_u64_if_exists(path: &Path) -> Result<Option<u64>, CgroupError> {
    read_if_exists(path)?.map(|t| parse_u64(path, &t)).transpose()
}

/// Whitespace-separated words (`cgroup.controllers`, `cgroup.subtree_control`); a missing file
/// is empty. Leading `+` are dropped, so a fake tree's `+cpu +memory` reads like the kernel's.
pub(super) fn read_words(path: &Path) -> Result<BTreeSet<String>, CgroupError> {
    Ok(read_if_exists(path)?
        .unwrap_or_default()
        .split_whitespace()
        .map(|w| w.trim_start_matches('+').to_string())
        .filter(|w| !w.is_empty())
        .collect())
}

/// Adds the pids in `dir/cgroup.procs` and in every descendant cgroup to `out`.
pub(super) fn procs_recursive(dir: &Path, out: &mut BTreeSet<i32>) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    if let Some(text) = read_if_exists(&procs)? {
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let pid = line
                .parse::<i32>()
                .map_err(|_| CgroupError::Parse { path: procs.clone(), content: line.chars().take(80).collect() })?;
            out.insert(pid);
        }
    }
    for child in subdirs(dir)? {
        procs_recursive(&child, out)?;
    }
    Ok(())
}

/// Child directories (child cgroups); none when `dir` does not exist.
fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(CgroupError::Read { path: dir.to_path_buf(), source }),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| CgroupError::Read { path: dir.to_path_buf(), source })?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.push(entry.path());
        }
    }
    Ok(out)
}

fn is_cgroupfs(dir: &Path) -> bool {
    statfs(dir).is_ok_and(|s| {
        let t = s.filesystem_type();
        t == CGROUP_SUPER_MAGIC || t == CGROUP2_SUPER_MAGIC
    })
}

/// How often and how long `rmdir` is retried while the kernel still reports the cgroup busy
/// (a task that was just killed is unlinked from its cgroup slightly after it is reaped).
const RMDIR_TRIES: u32 = 40;
const RMDIR_MAX_SLEEP: Duration = Duration::from_millis(100);

/// Removes one cgroup directory; a directory that is already gone is fine.
pub(super) fn rmdir(dir: &Path) -> Result<(), CgroupError> {
    let mut sleep = Duration::from_millis(1);
    for attempt in 1..=RMDIR_TRIES {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) && !is_cgroupfs(dir) => {
                // A unit test's plain directory: drop the files standing in for cgroup files.
                for entry in std::fs::read_dir(dir).map_err(|source| CgroupError::Rmdir { path: dir.into(), source })? {
                    let entry = entry.map_err(|source| CgroupError::Rmdir { path: dir.into(), source })?;
                    if entry.file_type().is_ok_and(|t| t.is_file()) {
                        std::fs::remove_file(entry.path())
                            .map_err(|source| CgroupError::Rmdir { path: dir.into(), source })?;
                    }
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < RMDIR_TRIES => {
                std::thread::sleep(sleep);
                sleep = (sleep * 2).min(RMDIR_MAX_SLEEP);
            }
            Err(source) => return Err(CgroupError::Rmdir { path: dir.to_path_buf(), source }),
        }
    }
    Err(CgroupError::Rmdir { path: dir.to_path_buf(), source: std::io::Error::from_raw_os_error(libc::EBUSY) })
}

/// Removes a cgroup and every cgroup below it, deepest first.
pub(super) fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    for child in subdirs(dir)? {
        remove_tree(&child)?;
    }
    rmdir(dir)
}

/// Directories a `create` made, removed again (deepest first) unless `create` succeeds.
/// Shared parents that someone else started using in the meantime stay (their `rmdir` fails
/// with `EBUSY`/`ENOTEMPTY`, which is ignored).
#[derive(Default, Debug)]
pub(super) struct CreatedDirs {
    dirs: Vec<PathBuf>,
}

impl CreatedDirs {
    /// `create` succeeded: keep everything.
    pub(super) fn keep(mut self) {
        self.dirs.clear();
    }
}

impl Drop for CreatedDirs {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            if let Err(e) = rmdir_once(dir) {
                tracing::debug!(path = %dir.display(), error = %e, "left cgroup directory in place");
            }
        }
    }
}

fn rmdir_once(dir: &Path) -> Result<(), CgroupError> {
    if std::fs::read_dir(dir).is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_type().is_ok_and(|t| t.is_dir())))) {
        return Err(CgroupError::Rmdir {
            path: dir.into(),
            source: std::io::Error::from_raw_os_error(libc::ENOTEMPTY),
        });
    }
    rmdir(dir)
}

/// How many times a path is re-walked when a parent vanished under us: a concurrent failed
/// `create` removing a shared parent it had just made, or a `destroy` removing an emptied
/// `/twinbox` between our `mkdir` of it and the writes into it.
const MKDIR_ATTEMPTS: u32 = 20;

/// Makes `mount/components…`, calling `before_child(parent)` before each level is created and
/// `after_child(child, parent)` after. Intermediate directories may exist already; the last one
/// (the container's leaf) must not. Returns the leaf.
/// Whether cgroup directory `dir` is being removed: its files read ENODEV.
fn dying(dir: &Path) -> bool {
    std::fs::read(dir.join("cgroup.procs")).is_err_and(|e| e.raw_os_error() == Some(libc::ENODEV))
}

pub(super) fn make_chain(
    mount: &Path,
    components: &[&OsStr],
    created: &mut CreatedDirs,
    mut before_child: impl FnMut(&Path) -> Result<(), CgroupError>,
    mut after_child: impl FnMut(&Path, &Path) -> Result<(), CgroupError>,
) -> Result<PathBuf, CgroupError> {
    let mut attempt = 0;
    'walk: loop {
        attempt += 1;
        let mut dir = mount.to_path_buf();
        for (i, comp) in components.iter().enumerate() {
            let is_leaf = i + 1 == components.len();
            // A shared parent removed under us (the last container under it went) takes the
            // writes into it along: walk the path again.
            let vanished = |d: &Path| i > 0 && attempt < MKDIR_ATTEMPTS && (!d.exists() || dying(d));
            match before_child(&dir) {
                Err(_) if vanished(&dir) => continue 'walk,
                // A parent's file that read ENODEV was being removed then, even when the check
                // above comes too late to see it (seen with five VMM cgroups made and removed
                // at once under /twinbox/vmm).
                Err(CgroupError::Read { source, .. })
                    if i > 0 && attempt < MKDIR_ATTEMPTS && source.raw_os_error() == Some(libc::ENODEV) =>
                {
                    continue 'walk
                }
                r => r?,
            }
            let child = dir.join(comp);
            match std::fs::create_dir(&child) {
                Ok(()) => created.dirs.push(child.clone()),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && !is_leaf => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    return Err(CgroupError::AlreadyExists { path: child })
                }
                Err(e) if e.kind() == ErrorKind::NotFound && i > 0 && attempt < MKDIR_ATTEMPTS => continue 'walk,
                Err(source) => return Err(CgroupError::Mkdir { path: child, source }),
            }
            match after_child(&child, &dir) {
                // The new directory itself went (it was still an empty parent), or its parent
                // (removed, or dying as the last container under it went: its files then read
                // ENODEV): undo the leaf made in it, and walk the path again.
                Err(_)
                    if attempt < MKDIR_ATTEMPTS
                        && (!child.exists() || !dir.exists() || dying(&child) || dying(&dir)) =>
                {
                    if is_leaf && std::fs::remove_dir(&child).is_ok() {
                        created.dirs.retain(|d| d != &child);
                    }
                    continue 'walk;
                }
                r => r?,
            }
            dir = child;
        }
        return Ok(dir);
    }
}

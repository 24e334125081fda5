//! Shared pieces of the cgroup integration tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use twinbox_runtime::cgroups::{CgroupManager, DEFAULT_MOUNT_ROOT};

/// Root, or a printed skip reason (`why` says what root is for); under CI=true a failure.
pub fn have_root(test: &str, why: &str) -> bool {
    twinbox_testutil::require_root(test, why)
}

/// An id unique to this process and call, `twinbox-test-<pid>-<tag><n>`.
pub fn unique_id(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("twinbox-test-{}-{tag}{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Fails if any directory named `id` or `id-…` is left under `/sys/fs/cgroup/*/` (depth ≤ 3).
pub fn assert_no_leak(id: &str) {
    fn walk(dir: &Path, depth: usize, id: &str, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue; // also skips the cpu -> cpu,cpuacct symlinks
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if name == id || name.starts_with(&format!("{id}-")) {
                found.push(e.path());
            }
            if depth < 3 {
                walk(&e.path(), depth + 1, id, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(Path::new(DEFAULT_MOUNT_ROOT), 0, id, &mut found);
    assert!(found.is_empty(), "cgroup directories left behind: {found:?}");
}

/// Destroys the cgroup however the test ends (destroy is idempotent).
pub struct Destroy<'a>(pub &'a CgroupManager);

impl Drop for Destroy<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.destroy() {
            eprintln!("cleanup: {e}");
        }
    }
}

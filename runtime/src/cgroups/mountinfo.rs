//! Finding the cgroup hierarchies under a mount root from `/proc/thread-self/mountinfo`.
//!
//! `thread-self`, not `self`: a thread that did `unshare(CLONE_NEWNS)` (the v2 tests do) has its
//! own mount namespace, and `/proc/self` shows the thread group leader's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{CgroupError, Layout};
#[cfg(test)]
use crate::mountinfo::parse;
use crate::mountinfo::MountEntry;

/// The v1 controllers whose hierarchies a container joins (`name=systemd` only for
/// membership, as runc does).
pub(super) const V1_HIERARCHIES: &[&str] =
    &["blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer", "memory", "pids", "name=systemd"];

/// The cgroup hierarchies found under a mount root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Hierarchies {
    pub layout: Layout,
    /// v1 controller (or `name=systemd`) → mount point of the hierarchy holding it. A combined
    /// `cpu,cpuacct` mount appears under both names with the same mount point.
    pub v1: BTreeMap<String, PathBuf>,
    /// The cgroup2 mount: the mount root itself (unified) or a child of it (hybrid).
    pub unified: Option<PathBuf>,
}

/// Reads this thread's mountinfo and finds the hierarchies under `mount_root`.
pub(super) fn discover(mount_root: &Path) -> Result<Hierarchies, CgroupError> {
    let root = std::fs::canonicalize(mount_root)
        .map_err(|source| CgroupError::MountRoot { path: mount_root.to_path_buf(), source })?;
    let mut path = Path::new("/proc/thread-self/mountinfo");
    if !path.exists() {
        path = Path::new("/proc/self/mountinfo");
    }
    let text =
        std::fs::read_to_string(path).map_err(|source| CgroupError::MountInfo { path: path.to_path_buf(), source })?;
    from_mounts(&crate::mountinfo::parse(&text), &root)
}

/// Classifies the cgroup mounts at `root` (canonical) or directly below it.
pub(super) fn from_mounts(mounts: &[MountEntry], root: &Path) -> Result<Hierarchies, CgroupError> {
    // Later lines are mounted on top of earlier ones at the same place: the last one is visible.
    let mut visible: BTreeMap<&Path, &MountEntry> = BTreeMap::new();
    for m in mounts {
        visible.insert(&m.mount_point, m);
    }
    let mut v1 = BTreeMap::new();
    let mut unified_child = None;
    for (mount_point, m) in &visible {
        if *mount_point == root && m.fstype == "cgroup2" {
            return Ok(Hierarchies { layout: Layout::Unified, v1: BTreeMap::new(), unified: Some(root.into()) });
        }
        if mount_point.parent() != Some(root) {
            continue;
        }
        match m.fstype.as_str() {
            "cgroup2" => unified_child = Some(mount_point.to_path_buf()),
            "cgroup" => {
                for opt in &m.super_options {
                    if V1_HIERARCHIES.contains(&opt.as_str()) {
                        v1.insert(opt.clone(), mount_point.to_path_buf());
                    }
                }
            }
            _ => {}
        }
    }
    if v1.is_empty() {
        return Err(CgroupError::NoCgroupMounts { mount_root: root.to_path_buf() });
    }
    let layout = if unified_child.is_some() { Layout::Hybrid } else { Layout::Legacy };
    Ok(Hierarchies { layout, v1, unified: unified_child })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_SEPARATE: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const LEGACY_COMBINED: &str = "\
25 18 0:21 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:22 / /sys/fs/cgroup/systemd rw,nosuid shared:10 - cgroup cgroup rw,xattr,name=systemd
29 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:13 - cgroup cgroup rw,cpu,cpuacct
30 25 0:26 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid shared:14 - cgroup cgroup rw,net_cls,net_prio
31 25 0:27 / /sys/fs/cgroup/memory rw,nosuid shared:15 - cgroup cgroup rw,memory
";

    const UNIFIED: &str = "\
24 18 0:21 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn hybrid_with_separate_cpu_and_cpuacct() {
        let h = from_mounts(&parse(HYBRID_SEPARATE), Path::new("/sys/fs/cgroup")).unwrap();
        assert_eq!(h.layout, Layout::Hybrid);
        assert_eq!(h.unified.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(h.v1["cpu"], Path::new("/sys/fs/cgroup/cpu"));
        assert_eq!(h.v1["cpuacct"], Path::new("/sys/fs/cgroup/cpuacct"));
        assert_eq!(h.v1["name=systemd"], Path::new("/sys/fs/cgroup/systemd"));
        assert!(!h.v1.contains_key("devices"));
    }

    #[test]
    fn legacy_with_combined_cpu_cpuacct() {
        let h = from_mounts(&parse(LEGACY_COMBINED), Path::new("/sys/fs/cgroup")).unwrap();
        assert_eq!(h.layout, Layout::Legacy);
        assert_eq!(h.unified, None);
        assert_eq!(h.v1["cpu"], Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(h.v1["cpuacct"], Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(h.v1.keys().collect::<Vec<_>>(), ["cpu", "cpuacct", "memory", "name=systemd"]);
    }

    #[test]
    fn unified_and_mounts_elsewhere() {
        let h = from_mounts(&parse(UNIFIED), Path::new("/sys/fs/cgroup")).unwrap();
        assert_eq!(h.layout, Layout::Unified);
        assert_eq!(h.unified.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        let err = from_mounts(&parse(UNIFIED), Path::new("/tmp/x")).unwrap_err();
        assert!(matches!(err, CgroupError::NoCgroupMounts { .. }), "{err}");
    }

    #[test]
    fn last_mount_on_a_mount_point_wins() {
        let text = format!("{UNIFIED}99 24 0:50 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n");
        assert!(from_mounts(&parse(&text), Path::new("/sys/fs/cgroup")).is_err());
    }
}

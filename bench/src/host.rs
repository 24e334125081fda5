//! What the figures were taken on (revision, date, host, kernel, cgroup layout, kind of
//! virtualization) and the host-side memory readings the scenarios take.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// How KVM guests would run on this host; figures from different kinds never go into one
/// comparison.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum VirtKind {
    /// /dev/kvm backed by VMX/SVM (kvm_intel, kvm_amd).
    HardwareKvm,
    /// /dev/kvm is PVM (kvm_pvm): a software-assisted KVM for hosts that are themselves VMs.
    Pvm,
    /// Inside a guest that QEMU emulates with TCG.
    NestedTcg,
    /// No /dev/kvm at all.
    None,
}

impl std::fmt::Display for VirtKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VirtKind::HardwareKvm => "hardware KVM",
            VirtKind::Pvm => "PVM",
            VirtKind::NestedTcg => "nested TCG",
            VirtKind::None => "no KVM",
        })
    }
}

/// The virtualization the host offers and what it runs on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Virtualization {
    pub kind: VirtKind,
    /// e.g. "kvm_pvm loaded; the host itself runs under a hypervisor (KVM)".
    pub detail: String,
}

/// Where and when figures were taken; copied into every record.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Context {
    /// `git rev-parse --short HEAD` of the checkout, or "unknown".
    pub rev: String,
    /// Uncommitted changes in the checkout when measured.
    pub dirty: bool,
    /// RFC 3339 local time at the start of the run.
    pub date: String,
    pub host: String,
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_total_kib: u64,
    /// As `twinbox_runtime::cgroups::Layout` prints it ("cgroup v1/v2 hybrid"), or "unknown".
    pub cgroup_layout: String,
    pub virtualization: Virtualization,
    /// The filesystem of the image store's containers/ directory, where twinbox makes each
    /// container's overlay upper and work directories and its bundle; absent in results from
    /// before it was recorded.
    #[serde(default)]
    pub store_fs: Option<StoreFs>,
}

/// The filesystem a directory is on, as far as it bears on launch times.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StoreFs {
    /// The directory looked at.
    pub path: String,
    /// Type as /proc/self/mountinfo gives it: "ext4", "xfs", "tmpfs", …
    pub fs_type: String,
    /// The mount's source, e.g. "/dev/vda".
    pub source: String,
    /// ext4 only: whether it has a journal (a /proc/fs/jbd2 entry for its device); null for
    /// other types and when that cannot be told.
    pub journal: Option<bool>,
}

impl StoreFs {
    /// ext4 without a journal: there the kernel will not reuse an inode freed in the last one
    /// to six minutes (fs/ext4/ialloc.c, `recently_deleted`), and every allocation scans past
    /// those, so creating files gets slower the more were deleted just before.
    pub fn journal_less_ext4(&self) -> bool {
        self.fs_type == "ext4" && self.journal == Some(false)
    }
}

impl std::fmt::Display for StoreFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on {}", self.fs_type, self.source)?;
        match self.journal {
            Some(true) => f.write_str(", journaled")?,
            Some(false) => f.write_str(", no journal")?,
            None => {}
        }
        write!(f, " ({})", self.path)
    }
}

/// The filesystem `dir` is on, from /proc/self/mountinfo; None when `dir` does not exist or
/// the mount table cannot be read.
pub fn store_fs(dir: &Path) -> Option<StoreFs> {
    let canonical = dir.canonicalize().ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let jbd2: Option<Vec<String>> = std::fs::read_dir("/proc/fs/jbd2")
        .ok()
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect());
    let block_name = |dev: &str| {
        std::fs::read_link(format!("/sys/dev/block/{dev}"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    store_fs_from(&canonical, &mountinfo, jbd2.as_deref(), block_name)
}

/// [`store_fs`] on given inputs. `jbd2`: the entries of /proc/fs/jbd2 ("vda-8": a journal on
/// device vda), None when that directory cannot be read. `block_name` maps "MAJ:MIN" to the
/// kernel's name of the block device ("vda", "dm-0", "loop0").
pub fn store_fs_from(
    dir: &Path,
    mountinfo: &str,
    jbd2: Option<&[String]>,
    block_name: impl Fn(&str) -> Option<String>,
) -> Option<StoreFs> {
    // The deepest mount point containing `dir`; among mounts on the same point, the last one
    // listed is on top.
    let mounts = twinbox_runtime::mountinfo::parse(mountinfo);
    let mut best: Option<(usize, &twinbox_runtime::mountinfo::MountEntry)> = None;
    for m in mounts.iter().filter(|m| dir.starts_with(&m.mount_point)) {
        let depth = m.mount_point.components().count();
        if best.is_none_or(|b| depth >= b.0) {
            best = Some((depth, m));
        }
    }
    let (_, m) = best?;
    let journal = if m.fstype == "ext4" {
        match (jbd2, block_name(&m.device)) {
            (Some(entries), Some(name)) => Some(entries.iter().any(|e| {
                e.strip_prefix(name.as_str())
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|ino| !ino.is_empty() && ino.bytes().all(|b| b.is_ascii_digit()))
            })),
            _ => None,
        }
    } else {
        None
    };
    Some(StoreFs { path: dir.display().to_string(), fs_type: m.fstype.clone(), source: m.source.clone(), journal })
}

impl Context {
    /// Look at this host. `repo_hint`: a directory inside the checkout (the `twinbox`
    /// binary's), tried after the current directory.
    pub fn detect(repo_hint: Option<&Path>) -> Context {
        let (rev, dirty) = git_rev(repo_hint);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Context {
            rev,
            dirty,
            date: chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
            host: read_trim("/proc/sys/kernel/hostname"),
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim()))
                .unwrap_or("unknown")
                .to_owned(),
            mem_total_kib: meminfo().get("MemTotal").copied().unwrap_or(0),
            cgroup_layout: twinbox_runtime::cgroups::detect(Path::new("/sys/fs/cgroup"))
                .map(|l| l.to_string())
                .unwrap_or_else(|_| "unknown".into()),
            virtualization: detect_virtualization(Path::new("/"), &cpuinfo),
            store_fs: None,
        }
    }
}

fn read_trim(p: &str) -> String {
    std::fs::read_to_string(p).map(|s| s.trim().to_owned()).unwrap_or_else(|_| "unknown".into())
}

/// The checkout's revision; `TWINBOX_REV` (e.g. `abc1234` or `abc1234-dirty`) stands in where
/// there is no checkout, as in the nested L1 of scripts/nested-bench.sh.
fn git_rev(hint: Option<&Path>) -> (String, bool) {
    if let Ok(rev) = std::env::var("TWINBOX_REV") {
        return match rev.strip_suffix("-dirty") {
            Some(r) => (r.to_owned(), true),
            None => (rev, false),
        };
    }
    let mut dirs: Vec<PathBuf> = std::env::current_dir().into_iter().collect();
    dirs.extend(hint.map(Path::to_owned));
    for d in dirs {
        let out = Command::new("git").arg("-C").arg(&d).args(["rev-parse", "--short", "HEAD"]).output();
        if let Some(o) = out.ok().filter(|o| o.status.success()) {
            let rev = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            let dirty = Command::new("git")
                .arg("-C")
                .arg(&d)
                .args(["status", "--porcelain", "--untracked-files=no"])
                .output()
                .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
            return (rev, dirty);
        }
    }
    ("unknown".into(), false)
}

/// Classify the host's KVM. `root` is "/" except in tests.
pub fn detect_virtualization(root: &Path, cpuinfo: &str) -> Virtualization {
    let has = |p: &str| root.join(p).exists();
    let under_hypervisor =
        cpuinfo.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    let vendor = std::fs::read_to_string(root.join("sys/class/dmi/id/sys_vendor")).unwrap_or_default();
    let product = std::fs::read_to_string(root.join("sys/class/dmi/id/product_name")).unwrap_or_default();
    let tcg = cpuinfo.lines().any(|l| l.starts_with("model name") && l.contains("QEMU Virtual CPU"));
    let outer = if under_hypervisor {
        let what = format!("{} {}", vendor.trim(), product.trim());
        format!(
            "the host itself is a guest ({})",
            if what.trim().is_empty() { "unknown hypervisor" } else { what.trim() }
        )
    } else {
        "bare metal".into()
    };
    // scripts/nested-kvm.sh marks its L1 on the kernel command line: the CPU model there is a
    // real one (EPYC) and kvm_amd is loaded, so nothing else tells it from hardware KVM.
    let nested = std::fs::read_to_string(root.join("proc/cmdline"))
        .is_ok_and(|c| c.split_whitespace().any(|w| w == "twinbox.nested=tcg"));
    let (kind, detail) = if nested {
        // Its guests' memory: on the nested paging TCG emulates, or on L1 KVM's shadow pages.
        let paging = match std::fs::read_to_string(root.join("sys/module/kvm_amd/parameters/npt")) {
            Ok(v) if v.trim() == "N" || v.trim() == "0" => " (shadow paging, npt=0)",
            Ok(_) => " (emulated nested paging)",
            Err(_) => "",
        };
        (
            VirtKind::NestedTcg,
            format!(
                "nested L1 of scripts/nested-kvm.sh: QEMU TCG emulating an AMD EPYC with SVM, kvm_amd inside{paging}; \
                 shows the mechanics, not representative timings"
            ),
        )
    } else if has("sys/module/kvm_pvm") {
        (VirtKind::Pvm, format!("/dev/kvm is PVM (kvm_pvm loaded); {outer}"))
    } else if tcg {
        (VirtKind::NestedTcg, format!("a guest emulated by QEMU TCG; {outer}"))
    } else if has("dev/kvm") && (has("sys/module/kvm_intel") || has("sys/module/kvm_amd")) {
        (
            VirtKind::HardwareKvm,
            format!("/dev/kvm with {}; {outer}", if has("sys/module/kvm_intel") { "kvm_intel" } else { "kvm_amd" }),
        )
    } else {
        (VirtKind::None, format!("no usable /dev/kvm; {outer}"))
    };
    Virtualization { kind, detail }
}

/// /proc/meminfo as KiB values by key.
pub fn meminfo() -> HashMap<String, u64> {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.to_owned(), v.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

/// The kernel memory that grows with every process, namespace, mount and cgroup: Slab +
/// PageTables + KernelStack + Percpu (per-CPU counters, mostly cgroups'), in KiB.
pub fn kernel_kib() -> u64 {
    let m = meminfo();
    ["Slab", "PageTables", "KernelStack", "Percpu"].iter().filter_map(|k| m.get(*k)).sum()
}

/// [`kernel_kib`] once it has stopped moving. The kernel frees the namespaces, cgroups and
/// tasks of instances that already exited some time after they exit (network namespaces in a
/// work queue, most objects after an RCU grace period), and a reading taken while that goes
/// on charges the freeing to whatever is measured next: waits until two readings 200 ms apart
/// differ by less than 256 KiB, at most `max_wait`.
pub fn settled_kernel_kib(max_wait: std::time::Duration) -> u64 {
    let start = std::time::Instant::now();
    let mut last = kernel_kib();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = kernel_kib();
        if now.abs_diff(last) < 256 || start.elapsed() >= max_wait {
            break;
        }
        last = now;
    }
    kernel_kib()
}

/// [`kernel_kib`] right after every slab cache gave back its empty slabs
/// (`/sys/kernel/slab/*/shrink`, about 12 ms; root only), so that `Slab` counts pages holding
/// live objects rather than whatever the per-CPU partial lists happen to keep: without it,
/// the same 50 idle containers read as 150 KiB or 320 KiB of kernel memory each from one
/// round to the next.
pub fn shrunk_kernel_kib() -> u64 {
    shrink_slabs();
    kernel_kib()
}

/// Asks every slab cache to release its empty slabs (root only; a no-op otherwise).
fn shrink_slabs() {
    let Ok(dir) = std::fs::read_dir("/sys/kernel/slab") else { return };
    for e in dir.flatten() {
        // Aliases are symlinks to the same cache; writing to each once is enough.
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::write(e.path().join("shrink"), "1");
        }
    }
}

/// Host memory in use (MemTotal − MemAvailable), in KiB.
pub fn used_kib() -> u64 {
    let m = meminfo();
    m.get("MemTotal").copied().unwrap_or(0).saturating_sub(m.get("MemAvailable").copied().unwrap_or(0))
}

/// One process found by [`scan`].
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    /// Its parent (0 when unknown).
    pub ppid: u32,
    pub args: Vec<String>,
}

/// The processes each instance leaves running, as `(instance, pid, share)`: those whose
/// arguments hold the instance's marker and their descendants (share 1), and the parent of those when it is a
/// launcher's process that watches workloads (not pid 1, not the harness, holding no marker),
/// such as twinbox's container monitor, whose own arguments do not name the workload. A parent
/// of k instances' processes (one monitor for every detached container of a store) is shared:
/// each of them gets 1/k of it, so that it is counted once in all.
pub fn instance_processes(procs: &[Proc], markers: &[String]) -> Vec<(usize, u32, f64)> {
    let instance = |p: &Proc| markers.iter().position(|m| p.args.iter().any(|a| a == m));
    let mut out: Vec<(usize, u32, f64)> = procs.iter().filter_map(|p| Some((instance(p)?, p.pid, 1.0))).collect();
    // And what a marked process started, whose own arguments do not say (a twinbox microVM's
    // VMM process, `twinbox microvm-vmm`, under its `twinbox run`).
    let mut children: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
    for p in procs {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut seen: std::collections::BTreeSet<u32> = out.iter().map(|(_, pid, _)| *pid).collect();
    let mut todo: Vec<(usize, u32)> = out.iter().map(|&(i, pid, _)| (i, pid)).collect();
    while let Some((i, pid)) = todo.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            if seen.insert(child) {
                out.push((i, child, 1.0));
                todo.push((i, child));
            }
        }
    }
    let marked: std::collections::BTreeSet<u32> = out.iter().map(|(_, pid, _)| *pid).collect();
    let mut parents: std::collections::BTreeMap<u32, std::collections::BTreeSet<usize>> = Default::default();
    for p in procs {
        if let Some(i) = instance(p) {
            parents.entry(p.ppid).or_default().insert(i);
        }
    }
    for (ppid, instances) in parents {
        if ppid > 1 && ppid != std::process::id() && !marked.contains(&ppid) {
            let share = 1.0 / instances.len() as f64;
            out.extend(instances.into_iter().map(|i| (i, ppid, share)));
        }
    }
    out
}

/// The processes each instance leaves running, as [`instance_processes`] gives them, for
/// instances found not by a marker in their arguments but by the processes their backend
/// knows them by (`roots[i]`: instance i's container init, VMM, port proxy: see
/// [`crate::backend::Backend::instance_pids`]), as the user's own image has no marker to give:
/// each root and all its descendants (share 1), and a root's parent when it is a launcher's
/// process that watches it (not pid 1, not the harness, not itself one of an instance's
/// processes), shared as there among the instances under it.
pub fn instance_trees(procs: &[Proc], roots: &[Vec<u32>]) -> Vec<(usize, u32, f64)> {
    let mut children: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
    for p in procs {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let exists: std::collections::BTreeSet<u32> = procs.iter().map(|p| p.pid).collect();
    let mut owner: std::collections::BTreeMap<u32, usize> = Default::default();
    for (i, r) in roots.iter().enumerate() {
        let mut todo: Vec<u32> = r.iter().copied().filter(|p| exists.contains(p)).collect();
        while let Some(pid) = todo.pop() {
            // A process belongs to the first instance that reaches it.
            if owner.contains_key(&pid) {
                continue;
            }
            owner.insert(pid, i);
            todo.extend(children.get(&pid).into_iter().flatten());
        }
    }
    let ppid: std::collections::BTreeMap<u32, u32> = procs.iter().map(|p| (p.pid, p.ppid)).collect();
    let mut parents: std::collections::BTreeMap<u32, std::collections::BTreeSet<usize>> = Default::default();
    for (i, r) in roots.iter().enumerate() {
        for pid in r {
            if let Some(&pp) = ppid.get(pid) {
                if pp > 1 && pp != std::process::id() && !owner.contains_key(&pp) {
                    parents.entry(pp).or_default().insert(i);
                }
            }
        }
    }
    let mut out: Vec<(usize, u32, f64)> = owner.into_iter().map(|(pid, i)| (i, pid, 1.0)).collect();
    for (pp, instances) in parents {
        let share = 1.0 / instances.len() as f64;
        out.extend(instances.into_iter().map(|i| (i, pp, share)));
    }
    out
}

/// `roots` (those that exist in `procs`) and all their descendants.
pub fn tree(procs: &[Proc], roots: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = procs.iter().map(|p| p.pid).filter(|p| roots.contains(p)).collect();
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            procs.iter().filter(|p| p.ppid == parent && !out.contains(&p.pid)).map(|p| p.pid).collect::<Vec<_>>(),
        );
        i += 1;
    }
    out
}

/// Whether `pid` runs: it exists and is not a zombie.
pub fn running(pid: u32) -> bool {
    crate::backend::stat_fields(&format!("/proc/{pid}/stat")).first().is_some_and(|s| s != "Z")
}

/// Every process with its command line.
pub fn scan() -> Vec<Proc> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let ppid = crate::backend::stat_fields(&e.path().join("stat").to_string_lossy())
                .get(1)
                .and_then(|f| f.parse().ok())
                .unwrap_or(0);
            let args = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some(Proc { pid, ppid, args })
        })
        .collect()
}

/// Proportional set size of a process, in KiB (None when it is gone).
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("Pss:")).and_then(|r| r.split_whitespace().next()?.parse().ok())
}

/// Find `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The first line of `tool --version`, if it runs.
pub fn tool_version(tool: &Path) -> Option<String> {
    let o = Command::new(tool).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines().next().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_owns_its_workload_and_its_share_of_a_parent() {
        let p =
            |pid: u32, ppid: u32, args: &[&str]| Proc { pid, ppid, args: args.iter().map(|a| a.to_string()).collect() };
        let me = std::process::id();
        let procs = [
            p(10, 9, &["hello", "sleep", "101"]),   // a workload under its monitor (9)
            p(9, 1, &["twinbox-monitor", "10"]),    // …which names no marker
            p(20, me, &["hello", "sleep", "102"]),  // a child of the harness: not the instance's
            p(21, 20, &["twinbox", "microvm-vmm"]), // what a marked process started (a VMM) is
            p(22, 21, &["helper"]),                 // …and what that started
            p(30, 5, &["hello", "sleep", "103"]),   // two instances under one shared parent (5)
            p(31, 5, &["hello", "sleep", "104"]),
            p(40, 1, &["hello", "sleep", "105"]), // reparented to init
            p(5, 1, &["shared-reaper"]),
            p(50, 9, &["unrelated"]),
        ];
        let markers: Vec<String> = (101..=105).map(|m| m.to_string()).collect();
        let mut found = instance_processes(&procs, &markers);
        found.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(
            found,
            [
                (0, 9, 1.0),
                (0, 10, 1.0),
                (1, 20, 1.0),
                (1, 21, 1.0),
                (1, 22, 1.0),
                (2, 5, 0.5),
                (2, 30, 1.0),
                (3, 5, 0.5),
                (3, 31, 1.0),
                (4, 40, 1.0)
            ]
        );
    }

    #[test]
    fn an_instance_owns_the_tree_under_its_roots_and_a_share_of_their_watcher() {
        let p =
            |pid: u32, ppid: u32, args: &[&str]| Proc { pid, ppid, args: args.iter().map(|a| a.to_string()).collect() };
        let me = std::process::id();
        let procs = [
            p(9, 1, &["twinbox-monitor"]),         // watches both containers' inits
            p(10, 9, &["nginx: master process"]),  // instance 0's init…
            p(11, 10, &["nginx: worker process"]), // …and its worker
            p(12, 11, &["sh", "-c", "x"]),         // and a grandchild
            p(20, 9, &["httpd", "-f"]),            // instance 1's init
            p(21, 1, &["twinbox-proxy-0123456789abcdef", "container-proxy", "10.89.0.3", "8080"]), // instance 1's port proxy
            p(30, me, &["qemu-system-x86_64"]), // instance 2, a child of the harness
            p(40, 9, &["unrelated"]),
        ];
        let roots = vec![vec![10], vec![20, 21], vec![30], vec![99]];
        let mut found = instance_trees(&procs, &roots);
        found.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(
            found,
            [
                (0, 9, 0.5),
                (0, 10, 1.0),
                (0, 11, 1.0),
                (0, 12, 1.0),
                (1, 9, 0.5),
                (1, 20, 1.0),
                (1, 21, 1.0),
                (2, 30, 1.0)
            ]
        );
        let mut t = tree(&procs, &[10, 21]);
        t.sort_unstable();
        assert_eq!(t, [10, 11, 12, 21]);
        assert!(running(std::process::id()));
        assert!(!running(u32::MAX));
    }

    #[test]
    fn virtualization_kinds_from_a_fake_root() {
        let d = tempfile::tempdir().unwrap();
        let flags = "flags\t: fpu vme hypervisor\nmodel name\t: Intel Xeon\n";
        assert_eq!(detect_virtualization(d.path(), flags).kind, VirtKind::None);
        std::fs::create_dir_all(d.path().join("sys/module/kvm_intel")).unwrap();
        std::fs::create_dir_all(d.path().join("dev")).unwrap();
        std::fs::write(d.path().join("dev/kvm"), "").unwrap();
        assert_eq!(detect_virtualization(d.path(), flags).kind, VirtKind::HardwareKvm);
        std::fs::create_dir_all(d.path().join("sys/module/kvm_pvm")).unwrap();
        let v = detect_virtualization(d.path(), flags);
        assert_eq!(v.kind, VirtKind::Pvm);
        assert!(v.detail.contains("kvm_pvm") && v.detail.contains("guest"), "{}", v.detail);
        let tcg = "model name\t: QEMU Virtual CPU version 2.5+\n";
        let d2 = tempfile::tempdir().unwrap();
        assert_eq!(detect_virtualization(d2.path(), tcg).kind, VirtKind::NestedTcg);
        // The L1 of scripts/nested-kvm.sh: kvm_amd and an EPYC model, marked on the cmdline.
        std::fs::create_dir_all(d.path().join("proc")).unwrap();
        std::fs::write(d.path().join("proc/cmdline"), "console=ttyS0 twinbox.nested=tcg\n").unwrap();
        let v = detect_virtualization(d.path(), flags);
        assert_eq!(v.kind, VirtKind::NestedTcg);
        assert!(v.detail.contains("not representative"), "{}", v.detail);
        std::fs::create_dir_all(d.path().join("sys/module/kvm_amd/parameters")).unwrap();
        std::fs::write(d.path().join("sys/module/kvm_amd/parameters/npt"), "N\n").unwrap();
        assert!(detect_virtualization(d.path(), flags).detail.contains("shadow paging, npt=0"));
        std::fs::write(d.path().join("sys/module/kvm_amd/parameters/npt"), "Y\n").unwrap();
        assert!(detect_virtualization(d.path(), flags).detail.contains("(emulated nested paging)"));
    }

    #[test]
    fn store_filesystem_and_its_journal_from_mountinfo() {
        let mi = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n\
                  30 22 0:25 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw\n\
                  40 22 7:0 / /mnt/with\\040space rw,relatime - ext4 /dev/loop0 rw\n\
                  41 22 8:17 / /var/lib/twinbox rw - xfs /dev/sdb1 rw\n\
                  42 41 0:31 / /var/lib/twinbox rw - tmpfs tmpfs rw\n";
        let names = |dev: &str| match dev {
            "254:0" => Some("vda".to_owned()),
            "7:0" => Some("loop0".to_owned()),
            _ => None,
        };
        let at = |dir: &str, jbd2: Option<&[String]>| store_fs_from(Path::new(dir), mi, jbd2, names).unwrap();

        // The root ext4 with no journal of its own: "vda1-8" is another device's.
        let other = ["loop0-8".to_owned(), "vda1-8".to_owned()];
        let root = at("/var/lib/twinboxes/x", Some(&other));
        assert_eq!((root.fs_type.as_str(), root.source.as_str(), root.journal), ("ext4", "/dev/vda", Some(false)));
        assert!(root.journal_less_ext4());
        assert_eq!(root.to_string(), "ext4 on /dev/vda, no journal (/var/lib/twinboxes/x)");
        let journaled = ["vda-8".to_owned()];
        assert_eq!(at("/var/lib/twinboxes/x", Some(&journaled)).journal, Some(true));
        assert!(!at("/var/lib/twinboxes/x", Some(&journaled)).journal_less_ext4());
        // Unknown when /proc/fs/jbd2 cannot be read: no claim either way.
        assert_eq!(at("/", None).journal, None);

        // An escaped mount point, and the deepest mount wins.
        let spaced = at("/mnt/with space/store", Some(&other));
        assert_eq!((spaced.source.as_str(), spaced.journal), ("/dev/loop0", Some(true)));
        // Two mounts on one point: the later one is on top. No journal question off ext4.
        let stacked = at("/var/lib/twinbox/containers", Some(&other));
        assert_eq!((stacked.fs_type.as_str(), stacked.journal), ("tmpfs", None));
        assert!(!stacked.journal_less_ext4());
        assert_eq!(stacked.to_string(), "tmpfs on tmpfs (/var/lib/twinbox/containers)");

        // On this machine: a real directory has a filesystem; a missing one has none.
        let d = tempfile::tempdir().unwrap();
        assert!(store_fs(d.path()).is_some_and(|f| !f.fs_type.is_empty()));
        assert_eq!(store_fs(&d.path().join("missing")), None);
    }

    #[test]
    fn meminfo_has_the_fields_the_scenarios_read() {
        let m = meminfo();
        for k in ["MemTotal", "MemAvailable", "Slab", "PageTables", "KernelStack"] {
            assert!(m.contains_key(k), "{k} missing from /proc/meminfo");
        }
        assert!(used_kib() > 0 && kernel_kib() > 0);
    }
}

//! cgroups on the host's own layout (`/sys/fs/cgroup`): v1, hybrid or v2, whichever this machine
//! has. The development host is a v1/v2 hybrid with `cpu` and `cpuacct` as separate mounts;
//! the assertions follow `CgroupManager::layout()`.
//!
//! Needs root: without it each test prints `SKIPPED: …` and returns, except under `CI=true`,
//! where that is a failure. Every test ends by checking that no directory named after its id is
//! left under `/sys/fs/cgroup/*/`.

mod cgroups_util;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cgroups_util::{assert_no_leak, have_root, unique_id, Destroy};
use nix::unistd::Pid;
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxDeviceCgroupBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources,
    LinuxResourcesBuilder,
};
use std::os::unix::process::ExitStatusExt;
use twinbox_runtime::cgroups::{detect, CgroupError, CgroupManager, Layout, DEFAULT_MOUNT_ROOT};

const MIB: i64 = 1024 * 1024;

/// A child process killed and reaped however the test ends.
struct Kid(Child);

impl Kid {
    /// `sh -c script` with stdin piped: scripts start with `read _` so they only run once
    /// they are in the cgroup and [`go`](Self::go) was called.
    fn sh(script: &str) -> Kid {
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        Kid(child)
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.0.id() as i32)
    }

    fn go(&mut self) {
        let mut stdin = self.0.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
    }

    fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.0.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn output(&mut self) -> (String, String) {
        let (mut out, mut err) = (String::new(), String::new());
        self.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        self.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        (out, err)
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).trim().to_string()
}

fn file(m: &CgroupManager, controller: &str, name: &str) -> String {
    read(&m.controller_dir(controller).unwrap_or_else(|| panic!("no {controller} dir")).join(name))
}

fn procs(dir: &Path) -> Vec<i32> {
    read(&dir.join("cgroup.procs")).lines().map(|l| l.parse().unwrap()).collect()
}

fn limits() -> LinuxResources {
    LinuxResourcesBuilder::default()
        .memory(LinuxMemoryBuilder::default().limit(32 * MIB).build().unwrap())
        .pids(LinuxPidsBuilder::default().limit(20).build().unwrap())
        .cpu(LinuxCpuBuilder::default().quota(50_000).period(100_000u64).shares(512u64).cpus("0").build().unwrap())
        .build()
        .unwrap()
}

#[test]
fn limits_membership_stats_freeze_and_destroy() {
    if !have_root("limits_membership_stats_freeze_and_destroy", "create cgroups") {
        return;
    }
    let id = unique_id("");
    let m = CgroupManager::new(None, &id).unwrap();
    assert_eq!(m.layout(), detect(Path::new(DEFAULT_MOUNT_ROOT)).unwrap());
    assert_eq!(m.path(), Path::new("/").join(&id));
    let _cleanup = Destroy(&m);
    m.create(Some(&limits())).unwrap();
    for dir in m.dirs() {
        assert!(dir.is_dir(), "{}", dir.display());
    }

    // Each value in the right file of the right hierarchy.
    match m.layout() {
        Layout::Legacy | Layout::Hybrid => {
            assert_eq!(file(&m, "memory", "memory.limit_in_bytes"), "33554432");
            assert_eq!(file(&m, "pids", "pids.max"), "20");
            assert_eq!(file(&m, "cpu", "cpu.cfs_quota_us"), "50000");
            assert_eq!(file(&m, "cpu", "cpu.cfs_period_us"), "100000");
            assert_eq!(file(&m, "cpu", "cpu.shares"), "512");
            assert_eq!(file(&m, "cpuset", "cpuset.cpus"), "0");
            let cpuset_parent = m.controller_dir("cpuset").unwrap().parent().unwrap().to_path_buf();
            assert_eq!(file(&m, "cpuset", "cpuset.mems"), read(&cpuset_parent.join("cpuset.mems")));
            assert!(!read(&cpuset_parent.join("cpuset.cpus")).is_empty(), "parent cpuset left empty");
            assert!(m.controller_dir("cpuacct").unwrap().join("cpuacct.usage").exists());
            assert_eq!(m.unified_dir().is_some(), m.layout() == Layout::Hybrid);
        }
        Layout::Unified => {
            assert_eq!(file(&m, "memory", "memory.max"), "33554432");
            assert_eq!(file(&m, "pids", "pids.max"), "20");
            assert_eq!(file(&m, "cpu", "cpu.max"), "50000 100000");
            assert_eq!(file(&m, "cpu", "cpu.weight"), "20");
            assert_eq!(file(&m, "cpuset", "cpuset.cpus"), "0");
        }
    }

    // Membership in every hierarchy (and the cgroup2 one on a hybrid host).
    let mut kid = Kid::sh("read _; exec sleep 30");
    let pid = kid.pid();
    m.add_task(pid).unwrap();
    for dir in m.dirs() {
        assert_eq!(procs(&dir), [pid.as_raw()], "{}", dir.display());
    }
    let proc_cgroup = read(Path::new(&format!("/proc/{pid}/cgroup")));
    let expected = m.path().display().to_string();
    if let Some(unified) = m.unified_dir() {
        assert_eq!(procs(&unified), [pid.as_raw()]);
        assert!(proc_cgroup.lines().any(|l| l == format!("0::{expected}")), "{proc_cgroup}");
    }
    if m.layout() != Layout::Unified {
        assert!(proc_cgroup.lines().any(|l| l.ends_with(&format!(":memory:{expected}"))), "{proc_cgroup}");
        assert!(proc_cgroup.lines().any(|l| l.ends_with(&format!(":pids:{expected}"))), "{proc_cgroup}");
    }
    assert_eq!(m.pids().unwrap(), [pid]);

    // The exec happens inside the cgroup, so its memory is charged there.
    kid.go();
    let start = Instant::now();
    let stats = loop {
        let s = m.stats().unwrap();
        if s.memory_current.is_some_and(|v| v > 0) || start.elapsed() > Duration::from_secs(5) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(stats.memory_current.is_some_and(|v| v > 0), "{stats:?}");
    assert!(stats.memory_peak.unwrap_or(1) > 0, "{stats:?}");
    assert!(stats.cpu_usage_ns.is_some(), "{stats:?}");
    assert_eq!(stats.pids_current, Some(1), "{stats:?}");
    assert_eq!(m.oom_kills().unwrap(), 0);

    m.freeze(true).unwrap();
    let state = |pid: Pid| {
        read(Path::new(&format!("/proc/{pid}/status"))).lines().find(|l| l.starts_with("State:")).unwrap().to_string()
    };
    if m.layout() != Layout::Unified {
        assert_eq!(file(&m, "freezer", "freezer.state"), "FROZEN");
    }
    m.freeze(false).unwrap();
    if m.layout() != Layout::Unified {
        assert_eq!(file(&m, "freezer", "freezer.state"), "THAWED");
    }
    assert!(state(pid).contains('S'), "{}", state(pid));

    // destroy kills the process and removes every leaf; the shared parent stays.
    m.destroy().unwrap();
    let status = kid.wait_for(Duration::from_secs(5)).expect("child still running after destroy");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    for dir in m.dirs() {
        assert!(!dir.exists(), "{} left", dir.display());
        assert!(dir.parent().unwrap().is_dir(), "shared parent {} removed", dir.parent().unwrap().display());
    }
    assert_eq!(m.pids().unwrap(), []);
    m.destroy().unwrap();
    assert_no_leak(&id);
}

#[test]
fn oom_kill_is_counted() {
    if !have_root("oom_kill_is_counted", "create cgroups") {
        return;
    }
    let id = unique_id("");
    let m = CgroupManager::new(None, &id).unwrap();
    let _cleanup = Destroy(&m);
    // memory+swap = memory: no swapping out of the limit.
    let r = LinuxResourcesBuilder::default()
        .memory(LinuxMemoryBuilder::default().limit(32 * MIB).swap(32 * MIB).build().unwrap())
        .build()
        .unwrap();
    m.create(Some(&r)).unwrap();
    // GNU tail keeps an endless newline-free line in memory: it grows until killed.
    let mut kid = Kid::sh("read _; exec tail /dev/zero");
    m.add_task(kid.pid()).unwrap();
    kid.go();
    let status = kid.wait_for(Duration::from_secs(60)).expect("tail /dev/zero was not OOM-killed within 60 s");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(m.oom_kills().unwrap() >= 1);
    let stats = m.stats().unwrap();
    assert!(stats.memory_peak.is_none_or(|p| p >= 30 * MIB as u64), "{stats:?}");
    m.destroy().unwrap();
    assert_no_leak(&id);
}

#[test]
fn pids_limit_stops_forks() {
    if !have_root("pids_limit_stops_forks", "create cgroups") {
        return;
    }
    let id = unique_id("");
    let m = CgroupManager::new(None, &id).unwrap();
    let _cleanup = Destroy(&m);
    let r =
        LinuxResourcesBuilder::default().pids(LinuxPidsBuilder::default().limit(20).build().unwrap()).build().unwrap();
    m.create(Some(&r)).unwrap();
    // The sleeps must not hold the stdout/stderr pipes, or reading them waits for the sleeps.
    let mut kid = Kid::sh("read _; for i in $(seq 50); do sleep 30 >/dev/null 2>&1 & done; wait");
    m.add_task(kid.pid()).unwrap();
    kid.go();
    let status = kid.wait_for(Duration::from_secs(20)).expect("sh did not finish");
    let (_, stderr) = kid.output();
    assert!(!status.success(), "50 forks succeeded under pids.max 20");
    assert!(stderr.to_lowercase().contains("fork"), "stderr: {stderr}");
    let stats = m.stats().unwrap();
    assert!(stats.pids_current.is_some_and(|n| (1..=20).contains(&n)), "{stats:?}");
    let pids = m.pids().unwrap();
    assert!(!pids.is_empty() && pids.len() <= 20, "{} pids", pids.len());
    // The orphaned sleeps are killed by destroy.
    m.destroy().unwrap();
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}/cmdline")).exists() || read_state(pid) == Some('Z'), "{pid} alive");
    }
    assert_no_leak(&id);
}

fn read_state(pid: Pid) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next())
}

#[test]
fn bad_cpuset_names_the_file_and_leaves_nothing() {
    if !have_root("bad_cpuset_names_the_file_and_leaves_nothing", "create cgroups") {
        return;
    }
    let id = unique_id("");
    let m = CgroupManager::new(None, &id).unwrap();
    let r =
        LinuxResourcesBuilder::default().cpu(LinuxCpuBuilder::default().cpus("99").build().unwrap()).build().unwrap();
    let err = m.create(Some(&r)).unwrap_err();
    assert!(matches!(err, CgroupError::Write { .. }), "{err:?}");
    assert!(err.to_string().contains("cpuset.cpus"), "{err}");
    for dir in m.dirs() {
        assert!(!dir.exists(), "{} left after a failed create", dir.display());
    }
    assert_no_leak(&id);
}

#[test]
fn systemd_path_is_refused() {
    let err = CgroupManager::new(Some(Path::new("system.slice:twinbox:abc")), "abc").unwrap_err();
    assert!(matches!(err, CgroupError::SystemdPath { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("systemd cgroup driver is not supported") && msg.contains("absolute cgroupsPath"), "{msg}");
}

#[test]
fn update_changes_limits() {
    if !have_root("update_changes_limits", "create cgroups") {
        return;
    }
    let id = unique_id("");
    let m = CgroupManager::new(None, &id).unwrap();
    let _cleanup = Destroy(&m);
    m.create(Some(&limits())).unwrap();
    let r = LinuxResourcesBuilder::default()
        .memory(LinuxMemoryBuilder::default().limit(64 * MIB).build().unwrap())
        .pids(LinuxPidsBuilder::default().limit(-1).build().unwrap())
        .build()
        .unwrap();
    m.update(&r).unwrap();
    if m.layout() == Layout::Unified {
        assert_eq!(file(&m, "memory", "memory.max"), "67108864");
    } else {
        assert_eq!(file(&m, "memory", "memory.limit_in_bytes"), "67108864");
    }
    assert_eq!(file(&m, "pids", "pids.max"), "max");
    m.destroy().unwrap();
    assert!(matches!(m.update(&r), Err(CgroupError::NotCreated { .. })));
    assert_no_leak(&id);
}

/// Device rules on the host's own layout: the v1 devices controller (legacy, hybrid), or the
/// cgroup device program (pure v2).
#[test]
fn device_rules_are_enforced() {
    if !have_root("device_rules_are_enforced", "create cgroups") {
        return;
    }
    let id = unique_id("");
    let m = CgroupManager::new(None, &id).unwrap();
    let v1 = m.layout() != Layout::Unified;
    assert!(!v1 || m.controller_dir("devices").is_some(), "a cgroup v1 host without the devices controller");
    let _cleanup = Destroy(&m);
    let deny_all = LinuxDeviceCgroupBuilder::default().allow(false).access("rwm").build().unwrap();
    let r = LinuxResourcesBuilder::default().devices(vec![deny_all]).build().unwrap();
    m.create(Some(&r)).unwrap();
    if v1 {
        let list = file(&m, "devices", "devices.list");
        assert!(!list.contains("a *:* rwm"), "{list}");
        assert!(list.lines().any(|l| l == "c 1:5 rwm"), "{list}");
    }
    // /dev/zero is a default device; /dev/kmsg (c 1:11) is not.
    let mut kid = Kid::sh(
        "read _; head -c1 /dev/zero >/dev/null && echo zero-ok; (: < /dev/kmsg) 2>/dev/null && echo kmsg-ok || echo kmsg-denied",
    );
    m.add_task(kid.pid()).unwrap();
    kid.go();
    kid.wait_for(Duration::from_secs(10)).expect("sh did not finish");
    let (out, err) = kid.output();
    assert_eq!(out, "zero-ok\nkmsg-denied\n", "stderr: {err}");
    m.destroy().unwrap();
    assert_no_leak(&id);
}

#[test]
fn empty_twinbox_parents_go_and_foreign_parents_stay() {
    if !have_root("empty_twinbox_parents_go_and_foreign_parents_stay", "create cgroups") {
        return;
    }
    let id = unique_id("");
    // Under /twinbox: the emptied intermediate parent is removed with the leaf.
    let parent = format!("/twinbox/{id}-parent");
    let m = CgroupManager::new(Some(&Path::new(&parent).join(&id)), &id).unwrap();
    assert_eq!(m.path(), Path::new(&parent).join(&id));
    m.create(None).unwrap();
    m.destroy().unwrap();
    for dir in m.dirs() {
        assert!(!dir.exists(), "{}", dir.display());
        assert!(!dir.parent().unwrap().exists(), "empty twinbox parent left: {}", dir.parent().unwrap().display());
    }
    // Anywhere else: a parent twinbox did not name is never removed.
    let foreign = format!("/{id}-foreign");
    let m = CgroupManager::new(Some(&Path::new(&foreign).join(&id)), &id).unwrap();
    m.create(None).unwrap();
    m.destroy().unwrap();
    for dir in m.dirs() {
        assert!(!dir.exists());
        let parent_dir = dir.parent().unwrap();
        assert!(parent_dir.is_dir(), "{}", parent_dir.display());
        std::fs::remove_dir(parent_dir).unwrap();
    }
    // A relative path goes under /twinbox/.
    let rel = CgroupManager::new(Some(Path::new(&format!("{id}-rel"))), &id).unwrap();
    assert_eq!(rel.path(), Path::new(&format!("/twinbox/{id}-rel")));
    // No path: /<id> directly under each hierarchy's root, as runc and crun, and the roots stay.
    let m = CgroupManager::new(None, &id).unwrap();
    assert_eq!(m.path(), Path::new("/").join(&id));
    m.create(None).unwrap();
    let dirs = m.dirs();
    assert!(!dirs.is_empty());
    for dir in &dirs {
        assert!(dir.is_dir(), "{}", dir.display());
        let root = dir.parent().unwrap();
        let mount_root = Path::new(DEFAULT_MOUNT_ROOT);
        assert!(
            root == mount_root || root.parent() == Some(mount_root),
            "{} is not at a hierarchy root",
            dir.display()
        );
    }
    m.destroy().unwrap();
    for dir in &dirs {
        assert!(!dir.exists(), "{}", dir.display());
        assert!(dir.parent().unwrap().is_dir());
    }
    assert_no_leak(&id);
}

#[test]
fn concurrent_creates_share_the_parent() {
    if !have_root("concurrent_creates_share_the_parent", "create cgroups") {
        return;
    }
    let id = unique_id("");
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let id = id.clone();
            std::thread::spawn(move || {
                for i in 0..5 {
                    let m = CgroupManager::new(Some(Path::new(&format!("/{id}-shared/c{t}-{i}"))), &id).unwrap();
                    m.create(Some(&limits())).unwrap();
                    m.destroy().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // The shared parent is left for the next container; remove it here.
    let m = CgroupManager::new(Some(Path::new(&format!("/{id}-shared/x"))), &id).unwrap();
    for dir in m.dirs() {
        std::fs::remove_dir(dir.parent().unwrap()).unwrap();
    }
    assert_no_leak(&id);
}

#[test]
fn destroy_kills_forking_processes_and_removes_child_cgroups() {
    if !have_root("destroy_kills_forking_processes_and_removes_child_cgroups", "create cgroups") {
        return;
    }
    let id = unique_id("");
    let m = CgroupManager::new(None, &id).unwrap();
    let _cleanup = Destroy(&m);
    let r =
        LinuxResourcesBuilder::default().pids(LinuxPidsBuilder::default().limit(64).build().unwrap()).build().unwrap();
    m.create(Some(&r)).unwrap();
    // A process that forks as fast as it can, in the v1 hierarchies only (as after an add_task
    // that failed half-way on a hybrid host): no cgroup.kill reaches it, so destroy's
    // freeze-list-SIGKILL loop must.
    let mut kid = Kid::sh("read _; while :; do (sleep 10 >/dev/null 2>&1 &) 2>/dev/null; done");
    let v1_only: Vec<PathBuf> = match m.layout() {
        Layout::Unified => m.dirs(),
        Layout::Legacy | Layout::Hybrid => {
            m.dirs().into_iter().filter(|d| Some(d) != m.unified_dir().as_ref()).collect()
        }
    };
    for dir in &v1_only {
        std::fs::write(dir.join("cgroup.procs"), kid.pid().to_string()).unwrap();
    }
    // Child cgroups, as a container with its own cgroup namespace may make.
    for dir in m.dirs() {
        std::fs::create_dir(dir.join("sub")).unwrap();
    }
    kid.go();
    std::thread::sleep(Duration::from_millis(300));
    assert!(m.pids().unwrap().len() > 1, "the fork loop did not start");
    m.destroy().unwrap();
    let status = kid.wait_for(Duration::from_secs(5)).expect("sh survived destroy");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    for dir in m.dirs() {
        assert!(!dir.exists(), "{} left", dir.display());
    }
    assert_no_leak(&id);
}

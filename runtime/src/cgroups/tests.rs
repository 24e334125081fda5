//! Unit tests on fake cgroup trees: a temp directory laid out like a host's cgroup mounts, a
//! mountinfo text describing it, and the write log of `fs::write`. They assert exactly which
//! file gets which value, in which order, for v1 and v2, without root and without the
//! controllers the host may lack (this is how the v2 limit writing is verified on a host whose
//! cgroup2 hierarchy has no controllers).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources,
    LinuxResourcesBuilder,
};

use super::*;

const MIB: i64 = 1024 * 1024;

struct Fake {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Fake {
    /// v1 hierarchies `(directory, super options)`, plus a cgroup2 at `unified` when `hybrid`.
    fn v1(mounts: &[(&str, &str)], hybrid: bool) -> (Fake, CgroupManager) {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        let mut text = format!("30 1 0:27 / {} rw - tmpfs tmpfs rw,mode=755\n", root.display());
        for (i, (dir, opts)) in mounts.iter().enumerate() {
            std::fs::create_dir(root.join(dir)).unwrap();
            text +=
                &format!("{} 30 0:{} / {}/{dir} rw,relatime - cgroup cgroup {opts}\n", 31 + i, 40 + i, root.display());
        }
        if hybrid {
            std::fs::create_dir(root.join("unified")).unwrap();
            text += &format!("99 30 0:99 / {}/unified rw,relatime - cgroup2 cgroup2 rw\n", root.display());
        }
        let fake = Fake { _tmp: tmp, root };
        let m = fake.manager(&text, Some(Path::new("/twinbox/c1")), "c1");
        (fake, m)
    }

    /// A pure cgroup2 tree offering `controllers`.
    fn v2(controllers: &str) -> (Fake, CgroupManager) {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        std::fs::write(root.join("cgroup.controllers"), controllers).unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let text = format!("24 18 0:21 / {} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n", root.display());
        let fake = Fake { _tmp: tmp, root };
        let m = fake.manager(&text, Some(Path::new("/twinbox/c1")), "c1");
        (fake, m)
    }

    fn manager(&self, mountinfo_text: &str, cgroups_path: Option<&Path>, id: &str) -> CgroupManager {
        let h = mountinfo::from_mounts(&crate::mountinfo::parse(mountinfo_text), &self.root).unwrap();
        CgroupManager::from_hierarchies(h, &self.root, resolve_path(cgroups_path, id).unwrap())
    }

    fn put(&self, rel: &str, content: &str) {
        std::fs::write(self.root.join(rel), content).unwrap();
    }

    fn get(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root.join(rel)).unwrap()
    }

    /// The recorded writes, with paths relative to the fake root.
    fn writes(&self) -> Vec<(String, String)> {
        fs::take_writes()
            .into_iter()
            .map(|(p, v)| (p.strip_prefix(&self.root).unwrap().display().to_string(), v))
            .collect()
    }
}

fn w(path: &str, value: &str) -> (String, String) {
    (path.to_string(), value.to_string())
}

/// The separate-mount hybrid of the development host.
const HYBRID: &[(&str, &str)] = &[
    ("cpu", "rw,cpu"),
    ("cpuacct", "rw,cpuacct"),
    ("cpuset", "rw,cpuset"),
    ("devices", "rw,devices"),
    ("freezer", "rw,freezer"),
    ("memory", "rw,memory"),
    ("pids", "rw,pids"),
    ("systemd", "rw,name=systemd"),
];

fn hybrid_fake() -> (Fake, CgroupManager) {
    let (fake, m) = Fake::v1(HYBRID, true);
    fake.put("cpuset/cpuset.cpus", "0-1\n");
    fake.put("cpuset/cpuset.mems", "0\n");
    fake.put("memory/memory.memsw.limit_in_bytes", "9223372036854771712\n");
    fs::take_writes();
    (fake, m)
}

fn full_resources() -> LinuxResources {
    LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(32 * MIB)
                .swap(64 * MIB)
                .reservation(16 * MIB)
                .swappiness(10u64)
                .disable_oom_killer(true)
                .build()
                .unwrap(),
        )
        .cpu(
            LinuxCpuBuilder::default()
                .shares(512u64)
                .quota(50_000)
                .period(100_000u64)
                .cpus("0")
                .mems("0")
                .build()
                .unwrap(),
        )
        .pids(LinuxPidsBuilder::default().limit(20).build().unwrap())
        .build()
        .unwrap()
}

#[test]
fn paths() {
    let p = |s: Option<&str>, id: &str| resolve_path(s.map(Path::new), id);
    assert_eq!(p(None, "abc").unwrap(), Path::new("/abc"));
    assert_eq!(p(Some("/a/b/c"), "x").unwrap(), Path::new("/a/b/c"));
    assert_eq!(p(Some("/a//./b/"), "x").unwrap(), Path::new("/a/b"));
    assert_eq!(p(Some("a/b"), "x").unwrap(), Path::new("/twinbox/a/b"));
    assert!(matches!(p(Some("system.slice:twinbox:abc"), "x"), Err(CgroupError::SystemdPath { .. })));
    assert!(matches!(p(Some("/a/../b"), "x"), Err(CgroupError::InvalidPath { .. })));
    assert!(matches!(p(Some("/"), "x"), Err(CgroupError::InvalidPath { .. })));
    for id in ["", ".", "..", "a/b"] {
        assert!(matches!(p(None, id), Err(CgroupError::InvalidId { .. })), "{id:?}");
    }
    let msg = p(Some("machine.slice:twinbox:x"), "x").unwrap_err().to_string();
    assert!(msg.contains("systemd cgroup driver is not supported") && msg.contains("absolute cgroupsPath"), "{msg}");
}

#[test]
fn conversions() {
    assert_eq!(v2::shares_to_weight(2), 1);
    assert_eq!(v2::shares_to_weight(1024), 39);
    assert_eq!(v2::shares_to_weight(512), 20);
    assert_eq!(v2::shares_to_weight(262_144), 10_000);
    assert_eq!(v2::shares_to_weight(1), 1);
    assert_eq!(v2::swap_max(Some(32), Some(64)).unwrap().as_deref(), Some("32"));
    assert_eq!(v2::swap_max(Some(32), Some(32)).unwrap().as_deref(), Some("0"));
    assert_eq!(v2::swap_max(Some(32), Some(-1)).unwrap().as_deref(), Some("max"));
    assert_eq!(v2::swap_max(Some(-1), None).unwrap().as_deref(), Some("max"));
    assert_eq!(v2::swap_max(Some(32), None).unwrap(), None);
    assert!(matches!(v2::swap_max(Some(64), Some(32)), Err(CgroupError::SwapBelowLimit { .. })));
    assert!(matches!(v2::swap_max(None, Some(32)), Err(CgroupError::SwapWithoutLimit { .. })));
    assert_eq!(pids_max(20), "20");
    assert_eq!(pids_max(0), "max");
    assert_eq!(pids_max(-1), "max");
    assert_eq!(max_or(-1), "max");
    assert_eq!(max_or(5), "5");
}

#[test]
fn device_rules() {
    let rule = |allow, typ: Option<LinuxDeviceType>, major: Option<i64>, minor: Option<i64>, access: Option<&str>| {
        let mut b = LinuxDeviceCgroupBuilder::default().allow(allow);
        if let Some(t) = typ {
            b = b.typ(t);
        }
        if let Some(m) = major {
            b = b.major(m);
        }
        if let Some(m) = minor {
            b = b.minor(m);
        }
        if let Some(a) = access {
            b = b.access(a);
        }
        devices::Rule::from_spec(&b.build().unwrap()).map(|r| r.map(|r| r.to_string()))
    };
    assert_eq!(rule(false, None, None, None, Some("rwm")).unwrap().as_deref(), Some("a *:* rwm"));
    assert_eq!(rule(true, Some(LinuxDeviceType::C), Some(1), Some(3), None).unwrap().as_deref(), Some("c 1:3 rwm"));
    assert_eq!(
        rule(true, Some(LinuxDeviceType::U), Some(136), None, Some("rw")).unwrap().as_deref(),
        Some("c 136:* rw")
    );
    assert_eq!(rule(true, Some(LinuxDeviceType::B), Some(8), Some(-1), Some("r")).unwrap().as_deref(), Some("b 8:* r"));
    assert_eq!(rule(true, Some(LinuxDeviceType::P), None, None, None).unwrap(), None);
    assert!(matches!(rule(true, None, None, None, Some("rx")), Err(CgroupError::InvalidValue { .. })));
    assert!(matches!(rule(true, None, Some(-5), None, None), Err(CgroupError::InvalidValue { .. })));
}

#[test]
fn validation() {
    let mem = |limit: Option<i64>, swap: Option<i64>| {
        let mut b = LinuxMemoryBuilder::default();
        if let Some(l) = limit {
            b = b.limit(l);
        }
        if let Some(s) = swap {
            b = b.swap(s);
        }
        validate(&LinuxResourcesBuilder::default().memory(b.build().unwrap()).build().unwrap())
    };
    assert!(mem(Some(32), Some(64)).is_ok());
    assert!(mem(Some(-1), Some(-1)).is_ok());
    assert!(mem(Some(32), Some(-1)).is_ok());
    assert!(matches!(mem(Some(64), Some(32)), Err(CgroupError::SwapBelowLimit { limit: 64, swap: 32 })));
    assert!(matches!(mem(None, Some(32)), Err(CgroupError::SwapWithoutLimit { swap: 32 })));
    assert!(matches!(mem(Some(-7), None), Err(CgroupError::InvalidValue { field: "memory.limit", .. })));
    let swappiness = LinuxMemoryBuilder::default().swappiness(101u64).build().unwrap();
    let r = LinuxResourcesBuilder::default().memory(swappiness).build().unwrap();
    assert!(matches!(validate(&r), Err(CgroupError::InvalidValue { field: "memory.swappiness", .. })));
}

#[test]
fn v1_create_writes_each_limit_to_its_hierarchy() {
    let (fake, m) = hybrid_fake();
    assert_eq!(m.layout(), Layout::Hybrid);
    let mut r = full_resources();
    r.set_devices(Some(vec![
        LinuxDeviceCgroupBuilder::default().allow(false).access("rwm").build().unwrap(),
        LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(4)
            .minor(64)
            .access("rw")
            .build()
            .unwrap(),
    ]));
    m.create(Some(&r)).unwrap();
    let mut expected = vec![
        // cpuset: the new parent and the leaf get their parent's cpus/mems …
        w("cpuset/twinbox/cpuset.cpus", "0-1"),
        w("cpuset/twinbox/cpuset.mems", "0"),
        w("cpuset/twinbox/c1/cpuset.cpus", "0-1"),
        w("cpuset/twinbox/c1/cpuset.mems", "0"),
        // … then the limits: memory lowered from unlimited, so the limit before memory+swap.
        w("memory/twinbox/c1/memory.limit_in_bytes", "33554432"),
        w("memory/twinbox/c1/memory.memsw.limit_in_bytes", "67108864"),
        w("memory/twinbox/c1/memory.soft_limit_in_bytes", "16777216"),
        w("memory/twinbox/c1/memory.swappiness", "10"),
        w("memory/twinbox/c1/memory.oom_control", "1"),
        w("cpu/twinbox/c1/cpu.shares", "512"),
        w("cpu/twinbox/c1/cpu.cfs_period_us", "100000"),
        w("cpu/twinbox/c1/cpu.cfs_quota_us", "50000"),
        w("cpuset/twinbox/c1/cpuset.cpus", "0"),
        w("cpuset/twinbox/c1/cpuset.mems", "0"),
        w("pids/twinbox/c1/pids.max", "20"),
        w("devices/twinbox/c1/devices.deny", "a *:* rwm"),
        w("devices/twinbox/c1/devices.allow", "c 4:64 rw"),
    ];
    expected.extend(devices::DEFAULT_RULES.iter().map(|r| w("devices/twinbox/c1/devices.allow", &r.to_string())));
    assert_eq!(fake.writes(), expected);
    for h in ["cpu", "cpuacct", "cpuset", "devices", "freezer", "memory", "pids", "systemd", "unified"] {
        assert!(fake.root.join(h).join("twinbox/c1").is_dir(), "{h}");
    }
    assert_eq!(m.controller_dir("cpuacct"), Some(fake.root.join("cpuacct/twinbox/c1")));
    assert_eq!(m.unified_dir(), Some(fake.root.join("unified/twinbox/c1")));
    assert_eq!(m.dirs().len(), 9);

    m.add_task(Pid::from_raw(4242)).unwrap();
    let procs: Vec<_> = fake.writes();
    assert_eq!(procs.len(), 9);
    assert!(procs.iter().all(|(p, v)| p.ends_with("twinbox/c1/cgroup.procs") && v == "4242"), "{procs:?}");
    assert!(procs.iter().any(|(p, _)| p == "unified/twinbox/c1/cgroup.procs"));
    assert!(procs.iter().any(|(p, _)| p == "systemd/twinbox/c1/cgroup.procs"));
    assert_eq!(m.pids().unwrap(), vec![Pid::from_raw(4242)]);

    // The fake has no processes to kill: destroy removes the leaves, and /twinbox where it is
    // left empty (a real cgroup dir's files vanish with it; the fake's cpuset files do not).
    fake.put("memory/twinbox/c1/cgroup.procs", "");
    for h in ["cpu", "cpuacct", "cpuset", "devices", "freezer", "pids", "systemd", "unified"] {
        fake.put(&format!("{h}/twinbox/c1/cgroup.procs"), "");
    }
    m.destroy().unwrap();
    for h in ["cpu", "cpuset", "memory", "unified"] {
        assert!(!fake.root.join(h).join("twinbox/c1").exists(), "{h}");
    }
    assert!(!fake.root.join("cpu/twinbox").exists(), "emptied parent removed");
    m.destroy().unwrap();
}

#[test]
fn v1_update_orders_memory_and_swap() {
    let (fake, m) = hybrid_fake();
    m.create(None).unwrap();
    fake.writes();
    fake.put("memory/twinbox/c1/memory.limit_in_bytes", "33554432\n");
    let mem = |l: i64, s: i64| {
        LinuxResourcesBuilder::default()
            .memory(LinuxMemoryBuilder::default().limit(l).swap(s).build().unwrap())
            .build()
            .unwrap()
    };
    // Raising: memory+swap first.
    m.update(&mem(128 * MIB, 256 * MIB)).unwrap();
    assert_eq!(
        fake.writes(),
        [
            w("memory/twinbox/c1/memory.memsw.limit_in_bytes", "268435456"),
            w("memory/twinbox/c1/memory.limit_in_bytes", "134217728"),
        ]
    );
    // Lowering: memory first.
    fake.put("memory/twinbox/c1/memory.limit_in_bytes", "134217728\n");
    m.update(&mem(16 * MIB, 16 * MIB)).unwrap();
    assert_eq!(
        fake.writes(),
        [
            w("memory/twinbox/c1/memory.limit_in_bytes", "16777216"),
            w("memory/twinbox/c1/memory.memsw.limit_in_bytes", "16777216"),
        ]
    );
    // Unlimited memory means unlimited memory+swap too; pids 0 means no limit.
    let r = LinuxResourcesBuilder::default()
        .memory(LinuxMemoryBuilder::default().limit(-1).build().unwrap())
        .pids(LinuxPidsBuilder::default().limit(0).build().unwrap())
        .build()
        .unwrap();
    m.update(&r).unwrap();
    assert_eq!(
        fake.writes(),
        [
            w("memory/twinbox/c1/memory.memsw.limit_in_bytes", "-1"),
            w("memory/twinbox/c1/memory.limit_in_bytes", "-1"),
            w("pids/twinbox/c1/pids.max", "max"),
        ]
    );
    m.destroy().unwrap();
    assert!(matches!(m.update(&r), Err(CgroupError::NotCreated { .. })));
}

#[test]
fn v1_combined_cpu_cpuacct_and_no_swap_accounting() {
    let (fake, m) = Fake::v1(&[("cpu,cpuacct", "rw,cpu,cpuacct"), ("memory", "rw,memory"), ("pids", "rw,pids")], false);
    assert_eq!(m.layout(), Layout::Legacy);
    assert_eq!(
        m.dirs(),
        [
            fake.root.join("cpu,cpuacct/twinbox/c1"),
            fake.root.join("memory/twinbox/c1"),
            fake.root.join("pids/twinbox/c1")
        ]
    );
    let r = LinuxResourcesBuilder::default()
        .memory(LinuxMemoryBuilder::default().limit(32 * MIB).swap(64 * MIB).build().unwrap())
        .cpu(LinuxCpuBuilder::default().quota(20_000).build().unwrap())
        .build()
        .unwrap();
    m.create(Some(&r)).unwrap();
    // No memory.memsw.* at the hierarchy root: swap is skipped (with a warning), not an error.
    assert_eq!(
        fake.writes(),
        [
            w("memory/twinbox/c1/memory.limit_in_bytes", "33554432"),
            w("cpu,cpuacct/twinbox/c1/cpu.cfs_quota_us", "20000"),
        ]
    );
    fake.put("cpu,cpuacct/twinbox/c1/cpuacct.usage", "123456789\n");
    fake.put("memory/twinbox/c1/memory.usage_in_bytes", "4096\n");
    fake.put("memory/twinbox/c1/memory.max_usage_in_bytes", "8192\n");
    fake.put("memory/twinbox/c1/memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n");
    let stats = m.stats().unwrap();
    assert_eq!(
        stats,
        CgroupStats {
            memory_current: Some(4096),
            memory_peak: Some(8192),
            cpu_usage_ns: Some(123_456_789),
            pids_current: None
        }
    );
    assert_eq!(m.oom_kills().unwrap(), 3);
    // No freezer hierarchy on a legacy host: a clear error.
    assert!(matches!(m.freeze(true), Err(CgroupError::ControllerNotMounted { controller: "freezer", .. })));
    m.destroy().unwrap();
}

#[test]
fn v1_missing_controller_is_refused_before_anything_is_made() {
    let (fake, m) = Fake::v1(&[("memory", "rw,memory")], false);
    let r =
        LinuxResourcesBuilder::default().pids(LinuxPidsBuilder::default().limit(5).build().unwrap()).build().unwrap();
    let err = m.create(Some(&r)).unwrap_err();
    assert!(matches!(err, CgroupError::ControllerNotMounted { controller: "pids", .. }), "{err}");
    assert!(err.to_string().contains("pids"));
    assert!(!fake.root.join("memory/twinbox").exists());
    let mut unified = HashMap::new();
    unified.insert("memory.high".to_string(), "1000".to_string());
    let r = LinuxResourcesBuilder::default().unified(unified).build().unwrap();
    assert!(matches!(m.create(Some(&r)), Err(CgroupError::UnifiedNeedsV2 { .. })));
}

#[test]
fn failed_create_removes_what_it_made_and_only_that() {
    let (fake, m) = hybrid_fake();
    // Another container already owns the leaf in the pids hierarchy (and so /twinbox there).
    std::fs::create_dir_all(fake.root.join("pids/twinbox/c1")).unwrap();
    let err = m.create(Some(&full_resources())).unwrap_err();
    assert!(matches!(&err, CgroupError::AlreadyExists { path } if path.ends_with("pids/twinbox/c1")), "{err}");
    for h in ["cpu", "cpuacct", "cpuset", "devices", "freezer", "memory"] {
        assert!(!fake.root.join(h).join("twinbox").exists(), "{h}: parent made by the failed create stays");
    }
    assert!(fake.root.join("pids/twinbox/c1").is_dir(), "someone else's cgroup was removed");
}

#[test]
fn v2_create_enables_controllers_and_writes_limits() {
    let (fake, m) = Fake::v2("cpuset cpu io memory hugetlb pids misc");
    assert_eq!(m.layout(), Layout::Unified);
    let mut r = full_resources();
    let mut unified = HashMap::new();
    unified.insert("memory.high".to_string(), "30000000".to_string());
    unified.insert("rdma.max".to_string(), "mlx4_0 hca_handle=2".to_string());
    r.set_unified(Some(unified));
    let err = m.create(Some(&r)).unwrap_err();
    // rdma is not offered by the hierarchy: refused before anything is made.
    assert!(matches!(&err, CgroupError::ControllerUnavailableV2 { controller, .. } if controller == "rdma"), "{err}");
    assert!(!fake.root.join("twinbox").exists());
    assert_eq!(fake.writes(), []);

    // A unified key's controller is enabled on the way down, besides cpu, cpuset, memory, pids.
    let unified = r.unified_mut().as_mut().unwrap();
    unified.remove("rdma.max");
    unified.insert("io.weight".to_string(), "default 50".to_string());
    m.create(Some(&r)).unwrap();
    assert_eq!(
        fake.writes(),
        [
            w("cgroup.subtree_control", "+cpu +cpuset +io +memory +pids"),
            w("twinbox/cgroup.subtree_control", "+cpu +cpuset +io +memory +pids"),
            w("twinbox/c1/memory.max", "33554432"),
            w("twinbox/c1/memory.swap.max", "33554432"),
            w("twinbox/c1/memory.low", "16777216"),
            w("twinbox/c1/cpu.weight", "20"),
            w("twinbox/c1/cpu.max", "50000 100000"),
            w("twinbox/c1/cpuset.cpus", "0"),
            w("twinbox/c1/cpuset.mems", "0"),
            w("twinbox/c1/pids.max", "20"),
            w("twinbox/c1/io.weight", "default 50"),
            w("twinbox/c1/memory.high", "30000000"),
        ]
    );
    assert!(fake.root.join("twinbox/c1").is_dir());
    assert_eq!(m.dirs(), [fake.root.join("twinbox/c1")]);
    assert_eq!(m.controller_dir("memory"), Some(fake.root.join("twinbox/c1")));

    // Quota alone keeps the period; -1 is max.
    let r = LinuxResourcesBuilder::default()
        .cpu(LinuxCpuBuilder::default().quota(-1).build().unwrap())
        .memory(LinuxMemoryBuilder::default().limit(-1).build().unwrap())
        .build()
        .unwrap();
    m.update(&r).unwrap();
    assert_eq!(
        fake.writes(),
        [w("twinbox/c1/memory.max", "max"), w("twinbox/c1/memory.swap.max", "max"), w("twinbox/c1/cpu.max", "max")]
    );

    fake.put("twinbox/c1/memory.current", "1000\n");
    fake.put("twinbox/c1/memory.peak", "2000\n");
    fake.put("twinbox/c1/cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n");
    fake.put("twinbox/c1/pids.current", "3\n");
    fake.put("twinbox/c1/memory.events", "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\n");
    let stats = m.stats().unwrap();
    assert_eq!(
        stats,
        CgroupStats {
            memory_current: Some(1000),
            memory_peak: Some(2000),
            cpu_usage_ns: Some(1_500_000),
            pids_current: Some(3)
        }
    );
    assert_eq!(m.oom_kills().unwrap(), 2);

    fake.put("twinbox/c1/cgroup.events", "populated 0\nfrozen 1\n");
    m.freeze(true).unwrap();
    assert_eq!(fake.get("twinbox/c1/cgroup.freeze"), "1");
    m.freeze(false).unwrap();
    assert_eq!(fake.get("twinbox/c1/cgroup.freeze"), "0");

    m.destroy().unwrap();
    assert!(!fake.root.join("twinbox/c1").exists());
    assert!(fake.root.join("twinbox").is_dir());

    // A second container reuses the parent: controllers already enabled, nothing rewritten.
    let m2 = CgroupManager { path: PathBuf::from("/twinbox/c2"), ..m.clone() };
    fs::take_writes();
    m2.create(None).unwrap();
    assert_eq!(fake.writes(), []);
    m2.destroy().unwrap();
}

#[test]
fn v2_missing_controller_names_it_and_leaves_nothing() {
    let (fake, m) = Fake::v2("cpu pids");
    let r = LinuxResourcesBuilder::default()
        .memory(LinuxMemoryBuilder::default().limit(32 * MIB).build().unwrap())
        .build()
        .unwrap();
    let err = m.create(Some(&r)).unwrap_err();
    assert!(matches!(&err, CgroupError::ControllerUnavailableV2 { controller, .. } if controller == "memory"), "{err}");
    assert!(err.to_string().contains("controller memory not available in cgroup v2 hierarchy"), "{err}");
    assert!(!fake.root.join("twinbox").exists());
    assert_eq!(fake.writes(), []);
    // Without limits it works, enabling what is offered.
    m.create(None).unwrap();
    assert_eq!(
        fake.writes(),
        [w("cgroup.subtree_control", "+cpu +pids"), w("twinbox/cgroup.subtree_control", "+cpu +pids")]
    );
    assert!(matches!(m.oom_kills(), Err(CgroupError::ControllerUnavailableV2 { .. })));
    assert_eq!(m.stats().unwrap(), CgroupStats::default());
    m.destroy().unwrap();
}

#[test]
fn manager_round_trips_through_json() {
    let (_fake, m) = hybrid_fake();
    let json = serde_json::to_string(&m).unwrap();
    let back: CgroupManager = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m);
    assert!(json.contains("\"layout\":\"hybrid\""), "{json}");
}

#[test]
fn a_parent_removed_between_its_mkdir_and_the_writes_into_it_is_made_again() {
    // What a concurrent `destroy` does to an emptied /twinbox: it goes right after our mkdir,
    // before the cpuset values are copied into it.
    let tmp = tempfile::tempdir().unwrap();
    let mount = tmp.path();
    std::fs::write(mount.join("cpuset.cpus"), "0-1").unwrap();
    let mut created = fs::CreatedDirs::default();
    let mut removed = false;
    let comps: Vec<&std::ffi::OsStr> = vec!["twinbox".as_ref(), "c1".as_ref()];
    let leaf = fs::make_chain(
        mount,
        &comps,
        &mut created,
        |_| Ok(()),
        |child, parent| {
            if !removed && child.ends_with("twinbox") {
                removed = true;
                std::fs::remove_dir(child).unwrap();
            }
            let v = std::fs::read_to_string(parent.join("cpuset.cpus"))
                .map_err(|source| CgroupError::Read { path: parent.join("cpuset.cpus"), source })?;
            std::fs::write(child.join("cpuset.cpus"), v).map_err(|source| CgroupError::Write {
                path: child.join("cpuset.cpus"),
                value: String::new(),
                source,
            })
        },
    )
    .unwrap();
    assert!(removed);
    assert_eq!(leaf, mount.join("twinbox/c1"));
    assert_eq!(std::fs::read_to_string(mount.join("twinbox/c1/cpuset.cpus")).unwrap(), "0-1");
    created.keep();
}

/// Limits this runtime does not apply are refused before anything is made, each named (they
/// were dropped with a debug line); empty settings and kernel memory pass.
#[test]
fn limits_not_applied_are_refused() {
    use oci_spec::runtime::{
        LinuxBlockIoBuilder, LinuxCpuBuilder, LinuxHugepageLimitBuilder, LinuxInterfacePriorityBuilder,
        LinuxNetworkBuilder,
    };
    let (fake, m) = hybrid_fake();
    let cases: Vec<(LinuxResources, &str)> = vec![
        (
            LinuxResourcesBuilder::default()
                .block_io(LinuxBlockIoBuilder::default().weight(500u16).build().unwrap())
                .build()
                .unwrap(),
            "blockIO",
        ),
        (
            LinuxResourcesBuilder::default()
                .hugepage_limits(vec![LinuxHugepageLimitBuilder::default()
                    .page_size("2MB")
                    .limit(1i64 << 21)
                    .build()
                    .unwrap()])
                .build()
                .unwrap(),
            "hugepageLimits",
        ),
        (
            LinuxResourcesBuilder::default()
                .network(
                    LinuxNetworkBuilder::default()
                        .priorities(vec![LinuxInterfacePriorityBuilder::default()
                            .name("eth0")
                            .priority(1u32)
                            .build()
                            .unwrap()])
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap(),
            "network",
        ),
        (
            LinuxResourcesBuilder::default()
                .cpu(LinuxCpuBuilder::default().realtime_runtime(1000i64).build().unwrap())
                .build()
                .unwrap(),
            "cpu.realtime",
        ),
    ];
    for (r, field) in cases {
        let err = m.create(Some(&r)).unwrap_err();
        assert!(matches!(err, CgroupError::Unsupported { .. }), "{field}: {err}");
        assert!(err.to_string().contains(&format!("linux.resources.{field}")), "{err}");
        assert!(!fake.root.join("memory/twinbox").exists(), "nothing made");
    }
    let empty =
        LinuxResourcesBuilder::default().block_io(LinuxBlockIoBuilder::default().build().unwrap()).build().unwrap();
    m.create(Some(&empty)).unwrap();
}

//! cgroup v1 ("legacy", and the v1 half of the hybrid layout): one hierarchy per controller,
//! or per group of controllers (`cpu,cpuacct`); the container gets the same relative path in
//! each.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::{LinuxCpu, LinuxDeviceCgroup, LinuxMemory, LinuxResources};

use super::{devices, fs, pids_max, CgroupError, CgroupManager, CgroupStats};

/// How long `freeze(true)` waits for `freezer.state` to read `FROZEN`.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// The controllers `r` writes to.
pub(super) fn needed(r: &LinuxResources) -> Vec<&'static str> {
    let mut out = Vec::new();
    if r.memory().as_ref().is_some_and(memory_requested) {
        out.push("memory");
    }
    if let Some(cpu) = r.cpu() {
        if cpu.shares().is_some_and(|s| s != 0)
            || cpu.quota().is_some_and(|q| q != 0)
            || cpu.period().is_some_and(|p| p != 0)
        {
            out.push("cpu");
        }
        if non_empty(cpu.cpus()).is_some() || non_empty(cpu.mems()).is_some() {
            out.push("cpuset");
        }
    }
    if r.pids().is_some() {
        out.push("pids");
    }
    if r.devices().as_ref().is_some_and(|d| !d.is_empty()) {
        out.push("devices");
    }
    out
}

fn memory_requested(m: &LinuxMemory) -> bool {
    m.limit().is_some_and(|v| v != 0)
        || m.swap().is_some_and(|v| v != 0)
        || m.reservation().is_some_and(|v| v != 0)
        || m.swappiness().is_some()
        || m.disable_oom_killer() == Some(true)
}

pub(super) fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// A new v1 cpuset cgroup starts with empty `cpuset.cpus`/`cpuset.mems`, and no task can join
/// it until both are set: give every level that is still empty its parent's value (top-down,
/// so the parent has one). Done for parents that already existed too, so two concurrent
/// `create`s that share a new parent both end up with a usable one.
pub(super) fn inherit_cpuset(child: &Path, parent: &Path) -> Result<(), CgroupError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let current = fs::read_if_exists(&child.join(file))?.unwrap_or_default();
        if current.trim().is_empty() {
            let from_parent = fs::read(&parent.join(file))?;
            fs::write(&child.join(file), from_parent.trim())?;
        }
    }
    Ok(())
}

/// Writes the limits in `r`. Device rules are applied only when `creating` (rewriting them on
/// a running container would briefly deny everything).
pub(super) fn apply(m: &CgroupManager, r: &LinuxResources, creating: bool) -> Result<(), CgroupError> {
    if let Some(mem) = r.memory().as_ref().filter(|mem| memory_requested(mem)) {
        memory(m, &m.v1_dir("memory")?, mem)?;
    }
    if let Some(cpu) = r.cpu() {
        self::cpu(m, cpu)?;
    }
    if let Some(pids) = r.pids() {
        fs::write(&m.v1_dir("pids")?.join("pids.max"), &pids_max(pids.limit()))?;
    }
    match r.devices().as_deref() {
        Some(rules) if !rules.is_empty() && creating => devices(&m.v1_dir("devices")?, rules)?,
        Some(rules) if !rules.is_empty() => {
            tracing::debug!("device cgroup rules are applied at create only; update leaves them unchanged")
        }
        _ => {}
    }
    Ok(())
}

fn memory(m: &CgroupManager, dir: &Path, mem: &LinuxMemory) -> Result<(), CgroupError> {
    let limit = mem.limit().filter(|v| *v != 0);
    let mut swap = mem.swap().filter(|v| *v != 0);
    if limit == Some(-1) && swap.is_none() {
        // As runc: "unlimited memory" also means unlimited memory+swap.
        swap = Some(-1);
    }
    let limit_file = dir.join("memory.limit_in_bytes");
    let memsw_file = dir.join("memory.memsw.limit_in_bytes");
    let memsw_root = m.v1.get("memory").map(|mount| mount.join("memory.memsw.limit_in_bytes"));
    if swap.is_some() && !memsw_root.is_some_and(|f| f.exists()) {
        tracing::warn!(
            "swap accounting is off on this host (no memory.memsw.limit_in_bytes; boot with swapaccount=1): \
             linux.resources.memory.swap is not applied"
        );
        swap = None;
    }
    match (limit, swap) {
        (Some(l), Some(s)) => {
            // memory+swap must stay >= memory at every step: raise memsw first, lower it last.
            let current = match fs::read_if_exists(&limit_file)? {
                Some(text) => fs::parse_u64(&limit_file, &text)?,
                None => u64::MAX,
            };
            if s == -1 || u64::try_from(l).is_ok_and(|l| l > current) {
                fs::write(&memsw_file, &s.to_string())?;
                fs::write(&limit_file, &l.to_string())?;
            } else {
                fs::write(&limit_file, &l.to_string())?;
                fs::write(&memsw_file, &s.to_string())?;
            }
        }
        (Some(l), None) => fs::write(&limit_file, &l.to_string())?,
        (None, Some(s)) => fs::write(&memsw_file, &s.to_string())?,
        (None, None) => {}
    }
    if let Some(v) = mem.reservation().filter(|v| *v != 0) {
        fs::write(&dir.join("memory.soft_limit_in_bytes"), &v.to_string())?;
    }
    if let Some(v) = mem.swappiness() {
        fs::write(&dir.join("memory.swappiness"), &v.to_string())?;
    }
    if mem.disable_oom_killer() == Some(true) {
        fs::write(&dir.join("memory.oom_control"), "1")?;
    }
    Ok(())
}

fn cpu(m: &CgroupManager, cpu: &LinuxCpu) -> Result<(), CgroupError> {
    let shares = cpu.shares().filter(|s| *s != 0);
    let quota = cpu.quota().filter(|q| *q != 0);
    let period = cpu.period().filter(|p| *p != 0);
    if shares.is_some() || quota.is_some() || period.is_some() {
        let dir = m.v1_dir("cpu")?;
        if let Some(s) = shares {
            fs::write(&dir.join("cpu.shares"), &s.to_string())?;
        }
        let period_file = dir.join("cpu.cfs_period_us");
        let mut period_later = None;
        if let Some(p) = period {
            match fs::write(&period_file, &p.to_string()) {
                Ok(()) => {}
                // A period below the current one can be refused (EINVAL) because the *old*
                // quota over the new period exceeds the parent's; retry after the quota.
                Err(CgroupError::Write { source, .. })
                    if source.raw_os_error() == Some(libc::EINVAL) && quota.is_some() =>
                {
                    period_later = Some(p)
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(q) = quota {
            fs::write(&dir.join("cpu.cfs_quota_us"), &q.to_string())?;
        }
        if let Some(p) = period_later {
            fs::write(&period_file, &p.to_string())?;
        }
    }
    let cpus = non_empty(cpu.cpus());
    let mems = non_empty(cpu.mems());
    if cpus.is_some() || mems.is_some() {
        let dir = m.v1_dir("cpuset")?;
        if let Some(c) = cpus {
            fs::write(&dir.join("cpuset.cpus"), c)?;
        }
        if let Some(v) = mems {
            fs::write(&dir.join("cpuset.mems"), v)?;
        }
    }
    Ok(())
}

/// The spec's rules in order, then the default devices ([`devices::rules`]), each written to
/// `devices.allow` or `devices.deny`.
fn devices(dir: &Path, rules: &[LinuxDeviceCgroup]) -> Result<(), CgroupError> {
    for rule in devices::rules(rules)? {
        fs::write(&dir.join(if rule.allow { "devices.allow" } else { "devices.deny" }), &rule.to_string())?;
    }
    Ok(())
}

pub(super) fn stats(m: &CgroupManager) -> Result<CgroupStats, CgroupError> {
    let read = |c: &'static str, file: &str| {
        m.v1_dir(c).ok().map(|d| fs::read_u64_if_exists(&d.join(file))).transpose().map(Option::flatten)
    };
    Ok(CgroupStats {
        memory_current: read("memory", "memory.usage_in_bytes")?,
        memory_peak: read("memory", "memory.max_usage_in_bytes")?,
        cpu_usage_ns: read("cpuacct", "cpuacct.usage")?,
        pids_current: read("pids", "pids.current")?,
    })
}

pub(super) fn oom_kills(m: &CgroupManager) -> Result<u64, CgroupError> {
    let path = m.v1_dir("memory")?.join("memory.oom_control");
    let text = fs::read(&path)?;
    fs::keyed_u64(&path, &text, "oom_kill")?.ok_or(CgroupError::NoOomCounter { path })
}

/// Freezes (waiting until the kernel reports `FROZEN`, thawing again on timeout) or thaws.
pub(super) fn freeze(dir: &Path, frozen: bool) -> Result<(), CgroupError> {
    let state = dir.join("freezer.state");
    if !frozen {
        return fs::write(&state, "THAWED");
    }
    if wait_frozen(&state, FREEZE_TIMEOUT)? {
        return Ok(());
    }
    fs::write(&state, "THAWED")?;
    Err(CgroupError::FreezeTimeout { path: state, state: "FROZEN", waited: FREEZE_TIMEOUT })
}

/// Writes `FROZEN` (again every few polls, as runc does: a task that forked while freezing can
/// leave the cgroup in `FREEZING`) until the state reads `FROZEN` or `timeout` passes.
fn wait_frozen(state: &Path, timeout: Duration) -> Result<bool, CgroupError> {
    let start = Instant::now();
    let mut sleep = Duration::from_micros(500);
    let mut polls_until_rewrite = 0u32;
    loop {
        if polls_until_rewrite == 0 {
            fs::write(state, "FROZEN")?;
            polls_until_rewrite = 8;
        }
        polls_until_rewrite -= 1;
        if fs::read(state)?.trim() == "FROZEN" {
            return Ok(true);
        }
        if start.elapsed() >= timeout {
            return Ok(false);
        }
        std::thread::sleep(sleep);
        sleep = (sleep * 2).min(Duration::from_millis(20));
    }
}

/// For `destroy`: freeze so nothing forks between listing and killing. Best effort; returns
/// the `freezer.state` path to thaw afterwards if it froze.
pub(super) fn freeze_for_kill(m: &CgroupManager) -> Option<PathBuf> {
    let state = m.v1_dir("freezer").ok()?.join("freezer.state");
    match wait_frozen(&state, Duration::from_millis(200)) {
        Ok(_) => Some(state),
        Err(e) => {
            tracing::debug!(error = %e, "could not freeze before killing; killing anyway");
            None
        }
    }
}

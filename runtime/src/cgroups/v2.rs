//! cgroup v2 ("unified"): one hierarchy; controllers are enabled top-down through each
//! parent's `cgroup.subtree_control`, and a cgroup's `cgroup.controllers` lists what its parent
//! enabled.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxResources};

use super::{bpf, devices, fs, max_or, pids_max, v1::non_empty, CgroupError, CgroupStats};

/// The controllers twinbox enables on the way down to a container's cgroup (when the hierarchy
/// has them), so limits can be set now or by a later `update`, and stats read.
pub(super) const MANAGED: &[&str] = &["cpu", "cpuset", "memory", "pids"];

/// How long `freeze(true)` waits for `cgroup.events` to say `frozen 1`.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// The controllers `r` writes to (`linux.resources.unified` keys name theirs: `io.max` → `io`).
pub(super) fn needed(r: &LinuxResources) -> Result<BTreeSet<String>, CgroupError> {
    let mut out = BTreeSet::new();
    if r.memory().as_ref().is_some_and(memory_requested) {
        out.insert("memory".to_string());
    }
    if let Some(cpu) = r.cpu() {
        if cpu.shares().is_some_and(|s| s != 0)
            || cpu.quota().is_some_and(|q| q != 0)
            || cpu.period().is_some_and(|p| p != 0)
        {
            out.insert("cpu".to_string());
        }
        if non_empty(cpu.cpus()).is_some() || non_empty(cpu.mems()).is_some() {
            out.insert("cpuset".to_string());
        }
    }
    if r.pids().is_some() {
        out.insert("pids".to_string());
    }
    for key in r.unified().iter().flat_map(|u| u.keys()) {
        if let Some(c) = unified_controller(key)? {
            out.insert(c.to_string());
        }
    }
    Ok(out)
}

fn memory_requested(m: &LinuxMemory) -> bool {
    m.limit().is_some_and(|v| v != 0) || m.swap().is_some_and(|v| v != 0) || m.reservation().is_some_and(|v| v != 0)
}

/// The controller a `linux.resources.unified` key belongs to (`None` for `cgroup.*` core
/// files), refusing keys that are not a plain file name.
fn unified_controller(key: &str) -> Result<Option<&str>, CgroupError> {
    let plain = !key.is_empty() && !key.starts_with('.') && !key.contains('/') && key.contains('.');
    if !plain || matches!(key, "cgroup.procs" | "cgroup.threads" | "cgroup.subtree_control" | "cgroup.kill") {
        return Err(CgroupError::InvalidUnifiedKey { key: key.to_string() });
    }
    Ok(key.split('.').next().filter(|c| *c != "cgroup"))
}

/// Makes the container's cgroup under `mount`, enabling [`MANAGED`] controllers and `extra`
/// ones (those the hierarchy offers) in each parent's `cgroup.subtree_control` on the way. A
/// controller that cannot be enabled somewhere (a parent with processes of its own, for
/// instance) is left out with a warning; applying the limits then names it if it was needed.
/// Returns the leaf and the controllers available in it.
pub(super) fn make_leaf(
    mount: &Path,
    components: &[&OsStr],
    extra: &BTreeSet<String>,
    created: &mut fs::CreatedDirs,
) -> Result<(PathBuf, BTreeSet<String>), CgroupError> {
    let offered = fs::read_words(&mount.join("cgroup.controllers"))?;
    let mut wanted: BTreeSet<String> =
        MANAGED.iter().map(|c| c.to_string()).chain(extra.iter().cloned()).filter(|c| offered.contains(c)).collect();
    let leaf = fs::make_chain(mount, components, created, |parent| enable(parent, &mut wanted), |_, _| Ok(()))?;
    let available = leaf_controllers(&leaf)?;
    Ok((leaf, available))
}

/// The controllers enabled for `leaf`: its parent's `cgroup.subtree_control` (what the kernel
/// shows as the leaf's `cgroup.controllers`).
pub(super) fn leaf_controllers(leaf: &Path) -> Result<BTreeSet<String>, CgroupError> {
    match leaf.parent() {
        Some(parent) => fs::read_words(&parent.join("cgroup.subtree_control")),
        None => Ok(BTreeSet::new()),
    }
}

fn enable(dir: &Path, wanted: &mut BTreeSet<String>) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    let enabled = fs::read_words(&file)?;
    let missing: Vec<String> = wanted.iter().filter(|c| !enabled.contains(*c)).cloned().collect();
    if missing.is_empty() {
        return Ok(());
    }
    let all = missing.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(" ");
    if fs::write(&file, &all).is_ok() {
        return Ok(());
    }
    // Gone or going (the last cgroup under it was removed): an error, so the path is walked
    // again, instead of dropping controllers that the next parent can enable.
    if !file.exists() || !dir.join("cgroup.procs").exists() {
        return Err(CgroupError::Read { path: file, source: std::io::ErrorKind::NotFound.into() });
    }
    // One at a time, to keep those that can be enabled.
    for c in missing {
        if let Err(e) = fs::write(&file, &format!("+{c}")) {
            tracing::warn!(controller = %c, error = %e, "cannot enable cgroup v2 controller; its limits will be refused");
            wanted.remove(&c);
        }
    }
    Ok(())
}

/// Writes the limits in `r` to `leaf`, whose enabled controllers are `available`. Device rules
/// are applied only when `creating`, as on v1: attached as a program that allows what the v1
/// controller would (see [`devices`]).
pub(super) fn apply(
    leaf: &Path,
    available: &BTreeSet<String>,
    r: &LinuxResources,
    creating: bool,
) -> Result<(), CgroupError> {
    let need = |c: &str| {
        if available.contains(c) {
            Ok(())
        } else {
            Err(CgroupError::ControllerUnavailableV2 { controller: c.to_string(), path: leaf.to_path_buf() })
        }
    };
    if let Some(mem) = r.memory().as_ref().filter(|m| memory_requested(m)) {
        need("memory")?;
        memory(leaf, mem)?;
    }
    if let Some(c) = r.cpu() {
        cpu(leaf, c, &need)?;
    }
    if let Some(p) = r.pids() {
        need("pids")?;
        fs::write(&leaf.join("pids.max"), &pids_max(p.limit()))?;
    }
    match r.devices().as_deref() {
        Some(rules) if !rules.is_empty() && creating => {
            let policy = devices::Policy::from_rules(&devices::rules(rules)?);
            bpf::attach_device_program(leaf, &policy.program())?;
        }
        Some(rules) if !rules.is_empty() => {
            tracing::debug!("device cgroup rules are applied at create only; update leaves them unchanged")
        }
        _ => {}
    }
    if let Some(unified) = r.unified() {
        // Sorted, so the writes happen in a stable order.
        for (key, value) in unified.iter().collect::<BTreeMap<_, _>>() {
            if let Some(c) = unified_controller(key)? {
                need(c)?;
            }
            fs::write(&leaf.join(key), value)?;
        }
    }
    Ok(())
}

fn memory(leaf: &Path, mem: &LinuxMemory) -> Result<(), CgroupError> {
    let limit = mem.limit().filter(|v| *v != 0);
    let swap = mem.swap().filter(|v| *v != 0);
    if let Some(l) = limit {
        fs::write(&leaf.join("memory.max"), &max_or(l))?;
    }
    if let Some(value) = swap_max(limit, swap)? {
        match fs::write(&leaf.join("memory.swap.max"), &value) {
            Err(CgroupError::MissingFile { path }) => tracing::warn!(
                path = %path.display(),
                "no swap accounting on this host: linux.resources.memory.swap is not applied"
            ),
            other => other?,
        }
    }
    if let Some(v) = mem.reservation().filter(|v| *v != 0) {
        fs::write(&leaf.join("memory.low"), &max_or(v))?;
    }
    if mem.swappiness().is_some() || mem.disable_oom_killer().is_some() {
        tracing::debug!("memory.swappiness and disableOOMKiller have no cgroup v2 equivalent; ignored");
    }
    Ok(())
}

/// `memory.swap.max` from the spec's memory+swap total, as runc converts it: swap alone is
/// `swap - limit`; `-1` is unlimited; an unlimited memory limit with no swap set means both.
pub(super) fn swap_max(limit: Option<i64>, swap: Option<i64>) -> Result<Option<String>, CgroupError> {
    match (limit, swap) {
        (Some(-1), None) | (_, Some(-1)) => Ok(Some("max".into())),
        (_, None) => Ok(None),
        (Some(l), Some(s)) if l > 0 => {
            if s < l {
                Err(CgroupError::SwapBelowLimit { limit: l, swap: s })
            } else {
                Ok(Some((s - l).to_string()))
            }
        }
        (_, Some(s)) => Err(CgroupError::SwapWithoutLimit { swap: s }),
    }
}

/// runc's conversion of v1 `cpu.shares` [2, 262144] to v2 `cpu.weight` [1, 10000].
pub(super) fn shares_to_weight(shares: u64) -> u64 {
    1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142
}

fn cpu(leaf: &Path, cpu: &LinuxCpu, need: &dyn Fn(&str) -> Result<(), CgroupError>) -> Result<(), CgroupError> {
    if let Some(s) = cpu.shares().filter(|s| *s != 0) {
        need("cpu")?;
        fs::write(&leaf.join("cpu.weight"), &shares_to_weight(s).to_string())?;
    }
    let quota = cpu.quota().filter(|q| *q != 0);
    let period = cpu.period().filter(|p| *p != 0);
    if quota.is_some() || period.is_some() {
        need("cpu")?;
        let mut max = match quota {
            Some(q) if q > 0 => q.to_string(),
            _ => "max".to_string(),
        };
        if let Some(p) = period {
            max = format!("{max} {p}");
        }
        fs::write(&leaf.join("cpu.max"), &max)?;
    }
    if let Some(c) = non_empty(cpu.cpus()) {
        need("cpuset")?;
        fs::write(&leaf.join("cpuset.cpus"), c)?;
    }
    if let Some(m) = non_empty(cpu.mems()) {
        need("cpuset")?;
        fs::write(&leaf.join("cpuset.mems"), m)?;
    }
    Ok(())
}

pub(super) fn stats(leaf: &Path) -> Result<CgroupStats, CgroupError> {
    let cpu_stat = leaf.join("cpu.stat");
    let cpu_usage_ns = match fs::read_if_exists(&cpu_stat)? {
        Some(text) => fs::keyed_u64(&cpu_stat, &text, "usage_usec")?.map(|us| us.saturating_mul(1000)),
        None => None,
    };
    Ok(CgroupStats {
        memory_current: fs::read_u64_if_exists(&leaf.join("memory.current"))?,
        memory_peak: fs::read_u64_if_exists(&leaf.join("memory.peak"))?,
        cpu_usage_ns,
        pids_current: fs::read_u64_if_exists(&leaf.join("pids.current"))?,
    })
}

pub(super) fn oom_kills(leaf: &Path) -> Result<u64, CgroupError> {
    let path = leaf.join("memory.events");
    let Some(text) = fs::read_if_exists(&path)? else {
        return Err(CgroupError::ControllerUnavailableV2 { controller: "memory".into(), path: leaf.to_path_buf() });
    };
    fs::keyed_u64(&path, &text, "oom_kill")?.ok_or(CgroupError::NoOomCounter { path })
}

/// `cgroup.freeze`; freezing waits until `cgroup.events` says `frozen 1` (thawing again on
/// timeout).
pub(super) fn freeze(leaf: &Path, frozen: bool) -> Result<(), CgroupError> {
    let file = leaf.join("cgroup.freeze");
    fs::write(&file, if frozen { "1" } else { "0" })?;
    if !frozen {
        return Ok(());
    }
    let events = leaf.join("cgroup.events");
    let start = Instant::now();
    let mut sleep = Duration::from_micros(500);
    loop {
        if fs::keyed_u64(&events, &fs::read(&events)?, "frozen")? == Some(1) {
            return Ok(());
        }
        if start.elapsed() >= FREEZE_TIMEOUT {
            fs::write(&file, "0")?;
            return Err(CgroupError::FreezeTimeout { path: events, state: "frozen 1", waited: FREEZE_TIMEOUT });
        }
        std::thread::sleep(sleep);
        sleep = (sleep * 2).min(Duration::from_millis(20));
    }
}

/// Kills everything in `leaf` and below through `cgroup.kill` (Linux 5.14+); `false` when the
/// kernel has no such file.
pub(super) fn kill(leaf: &Path) -> Result<bool, CgroupError> {
    let file = leaf.join("cgroup.kill");
    if !file.exists() {
        return Ok(false);
    }
    fs::write(&file, "1")?;
    Ok(true)
}

//! What can be done to a running container besides signals: `pause` and `resume` (the cgroup
//! freezer), `update` (new cgroup limits) and `events` (cgroup counters as runc's event JSON).
//! Each takes the container's lock, so two commands on one container never interleave.

use oci_spec::runtime::LinuxResources;
use serde::Serialize;

use crate::cgroups::CgroupStats;
use crate::container::{Runtime, RuntimeError};
use crate::state::Status;

pub(crate) fn pause(rt: &Runtime, id: &str) -> Result<(), RuntimeError> {
    let _lock = rt.lock(id)?;
    let mut st = rt.load(id)?;
    if st.status != Status::Running {
        return Err(RuntimeError::NotRunning { id: id.to_string() });
    }
    st.cgroup.freeze(true)?;
    st.paused = true;
    if let Err(e) = st.save(&rt.state_dir(id)) {
        // Not recorded as paused: thaw, so state and freezer agree.
        let _ = st.cgroup.freeze(false);
        return Err(e.into());
    }
    tracing::debug!(id, "paused");
    Ok(())
}

pub(crate) fn resume(rt: &Runtime, id: &str) -> Result<(), RuntimeError> {
    let _lock = rt.lock(id)?;
    let mut st = rt.load(id)?;
    if st.status != Status::Paused {
        return Err(RuntimeError::NotPaused { id: id.to_string() });
    }
    st.cgroup.freeze(false)?;
    st.paused = false;
    st.save(&rt.state_dir(id))?;
    tracing::debug!(id, "resumed");
    Ok(())
}

pub(crate) fn update(rt: &Runtime, id: &str, resources: &LinuxResources) -> Result<(), RuntimeError> {
    let _lock = rt.lock(id)?;
    let mut st = rt.load(id)?;
    if !matches!(st.status, Status::Created | Status::Running | Status::Paused) {
        return Err(RuntimeError::NotRunning { id: id.to_string() });
    }
    st.cgroup.update(resources)?;
    // Keep the recorded config in step, so `state` and a later `update` see the limits in force.
    let mut linux = st.config.linux().clone().unwrap_or_default();
    linux.set_resources(Some(merge(linux.resources().clone().unwrap_or_default(), resources)));
    st.config.set_linux(Some(linux));
    st.save(&rt.state_dir(id))?;
    tracing::debug!(id, "updated");
    Ok(())
}

/// `old` with every limit `new` sets replaced.
fn merge(mut old: LinuxResources, new: &LinuxResources) -> LinuxResources {
    if new.memory().is_some() {
        old.set_memory(*new.memory());
    }
    if new.cpu().is_some() {
        old.set_cpu(new.cpu().clone());
    }
    if new.pids().is_some() {
        old.set_pids(*new.pids());
    }
    if new.block_io().is_some() {
        old.set_block_io(new.block_io().clone());
    }
    old
}

/// One `events` line, as runc prints it: `{"type":"stats","id":…,"data":{…}}` or
/// `{"type":"oom","id":…}`.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<StatsData>,
}

/// The part of runc's stats document twinbox fills.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatsData {
    pub cpu: CpuStats,
    pub memory: MemoryStats,
    pub pids: PidsStats,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuStats {
    pub usage: CpuUsage,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuUsage {
    /// Nanoseconds of CPU time.
    pub total: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryStats {
    pub usage: MemoryUsage,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryUsage {
    /// Bytes charged now.
    pub usage: u64,
    /// Most bytes ever charged.
    pub max: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PidsStats {
    pub current: u64,
}

impl StatsData {
    fn from_cgroup(s: &CgroupStats) -> StatsData {
        StatsData {
            cpu: CpuStats { usage: CpuUsage { total: s.cpu_usage_ns.unwrap_or(0) } },
            memory: MemoryStats {
                usage: MemoryUsage { usage: s.memory_current.unwrap_or(0), max: s.memory_peak.unwrap_or(0) },
            },
            pids: PidsStats { current: s.pids_current.unwrap_or(0) },
        }
    }
}

/// The stats event of a container that is not stopped, and its OOM-kill count so far.
pub(crate) fn stats(rt: &Runtime, id: &str) -> Result<(Event, u64), RuntimeError> {
    let st = rt.load(id)?;
    if st.status == Status::Stopped {
        return Err(RuntimeError::NotRunning { id: id.to_string() });
    }
    let data = StatsData::from_cgroup(&st.cgroup.stats()?);
    let ooms = st.cgroup.oom_kills().unwrap_or(0);
    Ok((Event { kind: "stats", id: id.to_string(), data: Some(data) }, ooms))
}

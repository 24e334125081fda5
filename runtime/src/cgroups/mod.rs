//! cgroups for containers, on the three layouts hosts have:
//!
//! - [`Layout::Legacy`]: cgroup v1 only, one hierarchy per controller (or per group of them:
//!   `cpu,cpuacct`) under the mount root.
//! - [`Layout::Hybrid`]: the v1 hierarchies plus a cgroup2 mount at `<root>/unified` that holds
//!   no controllers we use. Limits go to v1; the container's cgroup is also made in the cgroup2
//!   hierarchy and its processes join it, as runc does, so tools that look only at v2 (systemd,
//!   `/proc/PID/cgroup`'s `0::` line) see them.
//! - [`Layout::Unified`]: pure cgroup v2 at the mount root.
//!
//! Which one a host has is read from `/proc/thread-self/mountinfo` (the filesystem types of the
//! mounts at and directly below the mount root), so a combined `cpu,cpuacct` mount and its
//! `cpu`/`cpuacct` symlinks are found by what is mounted, not by name.
//!
//! **Paths.** `linux.cgroupsPath` `/a/b` is relative to every hierarchy's root (as runc); a
//! relative path `a/b` goes under `/twinbox/` (`/twinbox/a/b`): runc puts it below its own
//! cgroup, but on v2 a runtime's own cgroup usually holds processes and so cannot have
//! controllers enabled for children, and a path that depends on who calls `create` would not
//! be found again by `delete`. No path → `/<id>` at every hierarchy's root, where runc and
//! crun put such a container too (no shared parent to make and remove on every run). The
//! systemd `slice:prefix:name` form is refused (no systemd driver).
//!
//! **Parents.** Intermediate directories (`/twinbox` for `twinbox run`'s `/twinbox/<id>`) are
//! shared by containers: made when missing (v1 cpuset: given their parent's
//! `cpuset.cpus`/`cpuset.mems`; v2: our controllers enabled in their `cgroup.subtree_control`).
//! `destroy` removes the ones under `/twinbox` once empty, so nothing of twinbox stays in the
//! hierarchies; parents elsewhere belong to whoever chose the path and stay, as with runc. A
//! failed `create` removes the parents *it* made when they are still empty, and `create`
//! re-walks the path if a parent vanishes under it, so a removal racing a concurrent `create`
//! cannot break it. The container's own leaf must not exist yet.
//!
//! **Limits** (`linux.resources`): memory (limit, swap = memory+swap total, reservation,
//! swappiness and disableOOMKiller on v1), cpu (shares, quota/period, cpus/mems), pids, device
//! rules (the spec's in order, then the default devices, as runc: written to the v1 devices
//! controller, or on v2 compiled to a cgroup device eBPF program, see `devices` and `bpf`), and
//! on v2 the `unified` map. A limit whose controller is missing is an error naming it. Block
//! I/O, hugepages, network class/priorities, RDMA and realtime/idle/burst CPU are refused, naming
//! the field; kernel memory (no longer enforced by kernels, ignored by runc) with a warning.

mod bpf;
mod devices;
mod fs;
mod mountinfo;
mod v1;
mod v2;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};
use twinbox_exit::ExitCode;

/// Where hosts mount their cgroup hierarchies.
pub const DEFAULT_MOUNT_ROOT: &str = "/sys/fs/cgroup";
/// The parent of relative `cgroupsPath`s (`a/b` → `/twinbox/a/b`) and of `twinbox run`'s
/// containers (`/twinbox/<id>`).
pub const DEFAULT_PARENT: &str = "twinbox";
/// How long `destroy` waits for killed processes to leave the cgroup.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// How a host's cgroup hierarchies are mounted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// cgroup v1 only.
    Legacy,
    /// cgroup v1 controllers plus a controller-less cgroup2 at `<root>/unified`.
    Hybrid,
    /// cgroup v2 only, at the mount root.
    Unified,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Legacy => "cgroup v1",
            Layout::Hybrid => "cgroup v1/v2 hybrid",
            Layout::Unified => "cgroup v2",
        })
    }
}

impl CgroupError {
    /// Did the kernel refuse a cgroup directory for lack of permission (not root, or a
    /// read-only cgroupfs)?
    pub fn is_permission_denied(&self) -> bool {
        match self {
            CgroupError::Mkdir { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM | libc::EROFS))
            }
            _ => false,
        }
    }

    /// The directory the error is about, when it names one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            CgroupError::Mkdir { path, .. } => Some(path),
            _ => None,
        }
    }
}

/// Errors of cgroup set-up, control and removal.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read the mount table {path}; is /proc mounted?")]
    MountInfo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup mount root {path} is not accessible; pass the directory where cgroups are mounted")]
    MountRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no cgroup filesystem is mounted at or directly below {mount_root}; mount cgroup2 there, or the v1 \
         controllers in directories below it"
    )]
    NoCgroupMounts { mount_root: PathBuf },
    #[error(
        "cgroupsPath {path:?} is in the systemd slice:prefix:name form, but the systemd cgroup driver is not \
         supported; use an absolute cgroupsPath such as /twinbox/<id>"
    )]
    SystemdPath { path: String },
    #[error("cgroupsPath {path:?} {reason}; use an absolute path such as /twinbox/<id>")]
    InvalidPath { path: PathBuf, reason: &'static str },
    #[error("container id {id:?} cannot name a cgroup: it must be non-empty, not \".\" or \"..\", with no '/'")]
    InvalidId { id: String },
    #[error("linux.resources.{field} = {value} is invalid: expected {expected}")]
    InvalidValue { field: &'static str, value: String, expected: &'static str },
    #[error(
        "linux.resources.memory.swap ({swap}) is below memory.limit ({limit}): swap is the memory+swap total, \
         so set it to at least the limit (or -1 for unlimited)"
    )]
    SwapBelowLimit { limit: i64, swap: i64 },
    #[error("linux.resources.memory.swap ({swap}) needs a memory.limit; set one, or drop swap")]
    SwapWithoutLimit { swap: i64 },
    #[error(
        "cgroup v1 controller {controller} is not mounted under {mount_root}, but linux.resources sets a \
         {controller} limit; mount the controller, or drop the limit"
    )]
    ControllerNotMounted { controller: &'static str, mount_root: PathBuf },
    #[error(
        "controller {controller} not available in cgroup v2 hierarchy at {path}: it is not in \
         cgroup.controllers or could not be enabled in a parent's cgroup.subtree_control (on a v1/hybrid host \
         it may be bound to a v1 hierarchy); enable it, or drop the {controller} limits"
    )]
    ControllerUnavailableV2 { controller: String, path: PathBuf },
    #[error(
        "linux.resources.unified sets {key}, which needs cgroup v2, but this host has {layout}; use the typed \
         linux.resources fields"
    )]
    UnifiedNeedsV2 { key: String, layout: Layout },
    #[error("linux.resources.unified key {key:?} does not name a controller file (like memory.high) of the cgroup")]
    InvalidUnifiedKey { key: String },
    #[error(
        "cgroup {path} already exists: another container uses this cgroupsPath, or an earlier one was not \
         deleted; choose another path, or delete that container"
    )]
    AlreadyExists { path: PathBuf },
    #[error("cgroup {path} does not exist (not created yet, or destroyed); create the container first")]
    NotCreated { path: PathBuf },
    /// A limit this runtime does not apply.
    #[error(
        "linux.resources.{field} is not supported by this runtime; remove it from the config (it would not be applied)"
    )]
    Unsupported { field: &'static str },
    /// cgroup v2 device rules are a BPF program; loading or attaching it failed.
    #[error(
        "cannot enforce linux.resources.devices in cgroup {path}: could not {op}{}; cgroup v2 device rules \
         need root (CAP_SYS_ADMIN) and a kernel built with CONFIG_CGROUP_BPF",
        if verifier.is_empty() { String::new() } else { format!(" (verifier: {verifier})") }
    )]
    DeviceProgram {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: Errno,
        verifier: String,
    },
    /// Not root, no write access to the hierarchies, and the spec asks for limits.
    #[error(
        "a rootless container cannot get the limits in linux.resources: {path} is not writable for this \
         runtime (uid {uid}, without privileges on the host); run as the host's root, or give this user a \
         delegated cgroup v2 subtree and point linux.cgroupsPath into it"
    )]
    RootlessLimits { path: PathBuf, uid: u32 },
    #[error("cannot create cgroup directory {path}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {path}; check that the linux.resources value is valid on this host")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not exist: this kernel lacks the feature or the controller is off; drop the setting")]
    MissingFile { path: PathBuf },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected content {content:?} in {path}")]
    Parse { path: PathBuf, content: String },
    #[error("{path} has no oom_kill counter; that needs Linux 4.13 or later")]
    NoOomCounter { path: PathBuf },
    #[error(
        "cannot move pid {pid} into {path}; check that the process still exists (and on cgroup v1 that the \
         cgroup's cpuset.cpus and cpuset.mems are set)"
    )]
    AddTask {
        pid: i32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} did not report {state} within {waited:?} (a process may be in uninterruptible sleep); it was \
         thawed again, retry later"
    )]
    FreezeTimeout { path: PathBuf, state: &'static str, waited: Duration },
    #[error(
        "processes {pids:?} were still in cgroup {path} {waited:?} after SIGKILL; they may be in \
         uninterruptible sleep (D state, see /proc/PID/stack): retry the delete later"
    )]
    KillTimeout { path: PathBuf, pids: Vec<i32>, waited: Duration },
    #[error("cannot send SIGKILL to pid {pid} in cgroup {path}")]
    Kill {
        pid: i32,
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot remove cgroup directory {path}; a process or a child cgroup may still be in it")]
    Rmdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ExitCode for CgroupError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        match self {
            // What the spec's linux.cgroupsPath and linux.resources ask for, or the cgroup set-up
            // of the host; each message says what to change.
            CgroupError::MountRoot { .. }
            | CgroupError::NoCgroupMounts { .. }
            | CgroupError::SystemdPath { .. }
            | CgroupError::InvalidPath { .. }
            | CgroupError::InvalidId { .. }
            | CgroupError::InvalidValue { .. }
            | CgroupError::SwapBelowLimit { .. }
            | CgroupError::SwapWithoutLimit { .. }
            | CgroupError::ControllerNotMounted { .. }
            | CgroupError::ControllerUnavailableV2 { .. }
            | CgroupError::UnifiedNeedsV2 { .. }
            | CgroupError::InvalidUnifiedKey { .. }
            | CgroupError::AlreadyExists { .. }
            | CgroupError::NotCreated { .. }
            | CgroupError::Unsupported { .. }
            | CgroupError::RootlessLimits { .. }
            | CgroupError::Write { .. }
            | CgroupError::MissingFile { .. } => USER_ERROR,
            CgroupError::MountInfo { .. }
            | CgroupError::DeviceProgram { .. }
            | CgroupError::Mkdir { .. }
            | CgroupError::Read { .. }
            | CgroupError::Parse { .. }
            | CgroupError::NoOomCounter { .. }
            | CgroupError::AddTask { .. }
            | CgroupError::FreezeTimeout { .. }
            | CgroupError::KillTimeout { .. }
            | CgroupError::Kill { .. }
            | CgroupError::Rmdir { .. } => INTERNAL,
        }
    }
}

/// Usage counters of a container's cgroup; `None` where the host does not provide the counter
/// (controller not mounted or enabled, or an older kernel: `memory.peak` needs Linux 5.19).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// Bytes charged now (v1 `memory.usage_in_bytes`, v2 `memory.current`).
    pub memory_current: Option<u64>,
    /// Most bytes ever charged (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`).
    pub memory_peak: Option<u64>,
    /// CPU time used, in nanoseconds (v1 `cpuacct.usage`, v2 `cpu.stat` `usage_usec`).
    pub cpu_usage_ns: Option<u64>,
    /// Tasks now (`pids.current`).
    pub pids_current: Option<u64>,
}

/// Which layout the cgroup hierarchies at `mount_root` (normally [`DEFAULT_MOUNT_ROOT`]) have.
pub fn detect(mount_root: &Path) -> Result<Layout, CgroupError> {
    Ok(mountinfo::discover(mount_root)?.layout)
}

/// The directories a [`CgroupManager::create_begin`] made: removed on drop unless
/// [`CgroupManager::create_finish`] succeeded.
#[derive(Debug)]
pub struct CgroupCreation {
    created: fs::CreatedDirs,
}

/// One container's cgroup in every hierarchy of the host. Plain data, stored in the container's
/// state and reloaded by other processes (`kill`, `delete`); nothing is made until
/// [`create`](Self::create) and nothing is removed on drop (see [`destroy`](Self::destroy)).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CgroupManager {
    layout: Layout,
    /// The root the hierarchies were found under (for messages).
    mount_root: PathBuf,
    /// The container's cgroup relative to each hierarchy's root, like `/twinbox/<id>`.
    path: PathBuf,
    /// v1 controller (or `name=systemd`) → mount point of its hierarchy.
    v1: BTreeMap<String, PathBuf>,
    /// The cgroup2 mount point (unified: the mount root; hybrid: `<root>/unified`).
    unified: Option<PathBuf>,
}

impl CgroupManager {
    /// The container's cgroup under [`DEFAULT_MOUNT_ROOT`]. `cgroups_path` is the spec's
    /// `linux.cgroupsPath` (absolute: relative to the hierarchy roots; relative: under
    /// `/twinbox/`; `None` → `/<id>`); the systemd `slice:prefix:name` form is an error.
    pub fn new(cgroups_path: Option<&Path>, id: &str) -> Result<Self, CgroupError> {
        Self::with_mount_root(Path::new(DEFAULT_MOUNT_ROOT), cgroups_path, id)
    }

    /// As [`new`](Self::new), with the hierarchies found under `mount_root`.
    pub fn with_mount_root(mount_root: &Path, cgroups_path: Option<&Path>, id: &str) -> Result<Self, CgroupError> {
        let path = resolve_path(cgroups_path, id)?;
        let h = mountinfo::discover(mount_root)?;
        Ok(Self::from_hierarchies(h, mount_root, path))
    }

    fn from_hierarchies(h: mountinfo::Hierarchies, mount_root: &Path, path: PathBuf) -> Self {
        Self { layout: h.layout, mount_root: mount_root.to_path_buf(), path, v1: h.v1, unified: h.unified }
    }

    /// The same container with no hierarchy at all: creating, joining and destroying it do
    /// nothing. For a rootless container that asks for no limits on a host whose hierarchies
    /// its user may not write, as runc does.
    pub fn without_hierarchies(mut self) -> Self {
        self.v1.clear();
        self.unified = None;
        self
    }

    /// The host's layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The container's cgroup relative to each hierarchy's root (such as `/<id>` or `/twinbox/<id>`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The container's directory holding `controller`'s files (`"memory"`, `"cpu"`, …): in that
    /// controller's v1 hierarchy, or the cgroup2 one on a unified host. `None` when a v1 host
    /// does not mount it.
    pub fn controller_dir(&self, controller: &str) -> Option<PathBuf> {
        match self.layout {
            Layout::Unified => self.unified_dir(),
            Layout::Legacy | Layout::Hybrid => self.v1.get(controller).map(|mount| self.leaf(mount)),
        }
    }

    /// The container's directory in the cgroup2 hierarchy (hybrid and unified hosts).
    pub fn unified_dir(&self) -> Option<PathBuf> {
        self.unified.as_deref().map(|mount| self.leaf(mount))
    }

    /// Every directory `create` makes for the container (one per hierarchy) and `destroy`
    /// removes.
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = self.v1_mounts().into_iter().map(|m| self.leaf(m)).collect();
        out.extend(self.unified_dir());
        out
    }

    /// Makes the container's cgroup in every hierarchy and applies `resources`. Intermediate
    /// directories are made as needed; the leaf must not exist yet. On error, whatever this
    /// call made is removed again.
    pub fn create(&self, resources: Option<&LinuxResources>) -> Result<(), CgroupError> {
        let mut creation = self.create_begin(resources)?;
        self.create_finish(&mut creation, resources)
    }

    /// [`create`](Self::create) in two steps, for an init cloned straight into its cgroup v2
    /// directory (`CLONE_INTO_CGROUP`) that starts its own set-up while the v1 hierarchies are
    /// still being made: this step checks `resources` and makes what the clone needs (pure v2:
    /// the whole cgroup with its limits; hybrid: the cgroup2 directory; v1: nothing).
    /// [`create_finish`](Self::create_finish) makes the rest. Dropped unfinished, the returned
    /// [`CgroupCreation`] removes what was made, so the init must be gone from it by then.
    pub fn create_begin(&self, resources: Option<&LinuxResources>) -> Result<CgroupCreation, CgroupError> {
        if let Some(r) = resources {
            self.check(r)?;
        }
        let components = self.components();
        let mut creation = CgroupCreation { created: fs::CreatedDirs::default() };
        match self.layout {
            Layout::Legacy => {}
            Layout::Hybrid => {
                if let Some(mount) = &self.unified {
                    fs::make_chain(mount, &components, &mut creation.created, |_| Ok(()), |_, _| Ok(()))?;
                }
            }
            Layout::Unified => {
                let extra = match resources {
                    Some(r) => v2::needed(r)?,
                    None => BTreeSet::new(),
                };
                let (leaf, available) =
                    v2::make_leaf(self.unified_mount()?, &components, &extra, &mut creation.created)?;
                if let Some(r) = resources {
                    v2::apply(&leaf, &available, r, true)?;
                }
            }
        }
        Ok(creation)
    }

    /// The second step of [`create_begin`](Self::create_begin): the v1 hierarchies'
    /// directories and limits. On success everything made stays; on error `creation` still
    /// holds it all, to be removed when dropped.
    pub fn create_finish(
        &self,
        creation: &mut CgroupCreation,
        resources: Option<&LinuxResources>,
    ) -> Result<(), CgroupError> {
        if self.layout != Layout::Unified {
            let components = self.components();
            let cpuset = self.v1.get("cpuset").map(PathBuf::as_path);
            for mount in self.v1_mounts() {
                let is_cpuset = cpuset == Some(mount);
                fs::make_chain(
                    mount,
                    &components,
                    &mut creation.created,
                    |_| Ok(()),
                    |child, parent| if is_cpuset { v1::inherit_cpuset(child, parent) } else { Ok(()) },
                )?;
            }
            if let Some(r) = resources {
                v1::apply(self, r, true)?;
            }
        }
        std::mem::take(&mut creation.created).keep();
        tracing::debug!(path = %self.path.display(), layout = %self.layout, "cgroup created");
        Ok(())
    }

    /// Moves process `pid` into the container's cgroup in every hierarchy.
    pub fn add_task(&self, pid: Pid) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            add_to(&dir, pid)?;
        }
        Ok(())
    }

    /// Moves process `pid` into the container's cgroup v2 directory, if there is one.
    pub fn add_task_unified(&self, pid: Pid) -> Result<(), CgroupError> {
        match self.unified_dir() {
            Some(dir) => add_to(&dir, pid),
            None => Ok(()),
        }
    }

    /// The `tasks` file of the container's cgroup in every v1 hierarchy. A single-threaded
    /// process that writes `0` there moves itself without the global threadgroup lock a
    /// `cgroup.procs` write takes, whose RCU grace period costs 5–10 ms on a cgroup v1 host.
    pub fn v1_task_files(&self) -> Vec<PathBuf> {
        if self.layout == Layout::Unified {
            return Vec::new();
        }
        self.v1_mounts().into_iter().map(|m| self.leaf(m).join("tasks")).collect()
    }

    /// Applies new limits to the existing cgroup (v1 device rules are left as created).
    pub fn update(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        self.check(resources)?;
        if !self.dirs().iter().any(|d| d.is_dir()) {
            return Err(CgroupError::NotCreated { path: self.path.clone() });
        }
        match self.layout {
            Layout::Legacy | Layout::Hybrid => v1::apply(self, resources, false),
            Layout::Unified => {
                let leaf = self.leaf(self.unified_mount()?);
                let available = v2::leaf_controllers(&leaf)?;
                v2::apply(&leaf, &available, resources, false)
            }
        }
    }

    /// The processes in the container's cgroup and the cgroups below it, in every hierarchy.
    /// Empty when the cgroup does not exist.
    pub fn pids(&self) -> Result<Vec<Pid>, CgroupError> {
        Ok(self.pid_set()?.into_iter().map(Pid::from_raw).collect())
    }

    /// How many processes the kernel's OOM killer killed in the cgroup.
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        match self.layout {
            Layout::Legacy | Layout::Hybrid => v1::oom_kills(self),
            Layout::Unified => v2::oom_kills(&self.leaf(self.unified_mount()?)),
        }
    }

    /// Memory, CPU and task counters.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        match self.layout {
            Layout::Legacy | Layout::Hybrid => v1::stats(self),
            Layout::Unified => v2::stats(&self.leaf(self.unified_mount()?)),
        }
    }

    /// Freezes (waiting until every process is frozen) or thaws the cgroup: the v1 freezer, or
    /// v2 `cgroup.freeze` (also on a hybrid host without a v1 freezer).
    pub fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        match (self.layout, self.v1_dir("freezer")) {
            (Layout::Legacy | Layout::Hybrid, Ok(dir)) => v1::freeze(&dir, frozen),
            (Layout::Hybrid | Layout::Unified, _) => v2::freeze(&self.leaf(self.unified_mount()?), frozen),
            (Layout::Legacy, Err(e)) => Err(e),
        }
    }

    /// Kills whatever is left in the cgroup (v2 `cgroup.kill` when the kernel has it, else
    /// SIGKILL to every listed process, with the v1 freezer holding them still while they are
    /// listed and signalled), waits until it is empty (at most [`KILL_TIMEOUT`]) and removes
    /// the container's directory, and any child cgroups, in every hierarchy (`EBUSY` retried).
    /// Shared parents stay. Calling it again, or for a cgroup never created, is fine.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        let dirs = self.dirs();
        // The usual case, a container whose processes have all exited: its cgroups are empty
        // and one rmdir each removes them (the kernel refuses a cgroup that still has tasks
        // or children; one already gone is fine). Only what is left goes through the kill and
        // the recursive removal.
        let left: Vec<&PathBuf> = dirs
            .iter()
            .filter(|d| std::fs::remove_dir(d).is_err_and(|e| e.kind() != std::io::ErrorKind::NotFound))
            .collect();
        if !left.is_empty() {
            self.kill_all()?;
            let mut first_error = None;
            for dir in left {
                if let Err(e) = fs::remove_tree(dir) {
                    tracing::warn!(path = %dir.display(), error = %e, "cannot remove cgroup");
                    first_error.get_or_insert(e);
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        self.remove_empty_parents(&dirs);
        tracing::debug!(path = %self.path.display(), "cgroup destroyed");
        Ok(())
    }

    /// Remove twinbox's own parent cgroups (`/twinbox/…`) once the last container under them
    /// is gone, so nothing of twinbox stays in the hierarchies. Only parents below and
    /// including `/twinbox` are touched, and only when empty (rmdir refuses otherwise); a
    /// concurrent create re-walks its path if a parent disappears under it.
    fn remove_empty_parents(&self, leaves: &[PathBuf]) {
        let depth = self.path.components().count();
        if depth < 3 || self.path.components().nth(1) != Some(std::path::Component::Normal(DEFAULT_PARENT.as_ref())) {
            return;
        }
        for leaf in leaves {
            let mut dir = leaf.parent();
            // `path` is /twinbox/…/leaf: its parents up to /twinbox are depth - 2 levels.
            for _ in 0..depth - 2 {
                let Some(d) = dir else { break };
                if std::fs::remove_dir(d).is_err() {
                    break;
                }
                dir = d.parent();
            }
        }
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        // v2 cgroup.kill: the kernel kills everything, late forks included. On a unified host
        // that is all it takes; on a hybrid one, processes that joined only the v1 hierarchies
        // (an add_task that failed half-way) still need the signals below.
        let cgroup_kill = match self.unified_dir().filter(|d| d.exists()) {
            Some(dir) => v2::kill(&dir)?,
            None => false,
        };
        let send_signals = !(cgroup_kill && self.layout == Layout::Unified);
        let start = Instant::now();
        let mut sleep = Duration::from_millis(1);
        loop {
            let pids = self.pid_set()?;
            if pids.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= KILL_TIMEOUT {
                return Err(CgroupError::KillTimeout {
                    path: self.path.clone(),
                    pids: pids.into_iter().collect(),
                    waited: KILL_TIMEOUT,
                });
            }
            if send_signals {
                self.sigkill(&pids)?;
            }
            std::thread::sleep(sleep);
            sleep = (sleep * 2).min(Duration::from_millis(50));
        }
    }

    /// SIGKILL to each of `pids`, the v1 freezer (when there is one) holding the cgroup still
    /// meanwhile so that nothing forks between the listing and the signals.
    fn sigkill(&self, pids: &BTreeSet<i32>) -> Result<(), CgroupError> {
        let thaw = if self.layout == Layout::Unified { None } else { v1::freeze_for_kill(self) };
        let result = pids.iter().try_for_each(|&pid| match kill(Pid::from_raw(pid), Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(source) => Err(CgroupError::Kill { pid, path: self.path.clone(), source }),
        });
        if let Some(state) = thaw {
            fs::write(&state, "THAWED")?;
        }
        result
    }

    fn pid_set(&self) -> Result<BTreeSet<i32>, CgroupError> {
        let mut set = BTreeSet::new();
        for dir in self.dirs() {
            fs::procs_recursive(&dir, &mut set)?;
        }
        Ok(set)
    }

    /// Refuses, before anything is made, limits this host cannot apply.
    fn check(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        validate(r)?;
        match self.layout {
            Layout::Legacy | Layout::Hybrid => {
                for controller in v1::needed(r) {
                    self.v1_dir(controller)?;
                }
                if let Some(key) = r.unified().as_ref().and_then(|u| u.keys().min()) {
                    return Err(CgroupError::UnifiedNeedsV2 { key: key.clone(), layout: self.layout });
                }
            }
            Layout::Unified => {
                let mount = self.unified_mount()?;
                let offered = fs::read_words(&mount.join("cgroup.controllers"))?;
                if let Some(c) = v2::needed(r)?.into_iter().find(|c| !offered.contains(c)) {
                    return Err(CgroupError::ControllerUnavailableV2 { controller: c, path: mount.to_path_buf() });
                }
            }
        }
        refuse_unsupported(r)
    }

    fn leaf(&self, mount: &Path) -> PathBuf {
        mount.join(self.path.strip_prefix("/").unwrap_or(&self.path))
    }

    fn components(&self) -> Vec<&OsStr> {
        self.path.components().filter_map(|c| if let Component::Normal(s) = c { Some(s) } else { None }).collect()
    }

    /// The distinct v1 hierarchies (a combined `cpu,cpuacct` mount once).
    fn v1_mounts(&self) -> BTreeSet<&Path> {
        self.v1.values().map(PathBuf::as_path).collect()
    }

    fn v1_dir(&self, controller: &'static str) -> Result<PathBuf, CgroupError> {
        match self.v1.get(controller) {
            Some(mount) if self.layout != Layout::Unified => Ok(self.leaf(mount)),
            _ => Err(CgroupError::ControllerNotMounted { controller, mount_root: self.mount_root.clone() }),
        }
    }

    fn unified_mount(&self) -> Result<&Path, CgroupError> {
        self.unified.as_deref().ok_or_else(|| CgroupError::NoCgroupMounts { mount_root: self.mount_root.clone() })
    }
}

/// The container's cgroup path relative to the hierarchy roots (see the module docs).
fn resolve_path(cgroups_path: Option<&Path>, id: &str) -> Result<PathBuf, CgroupError> {
    if id.is_empty() || id == "." || id == ".." || id.contains('/') {
        return Err(CgroupError::InvalidId { id: id.to_string() });
    }
    let Some(p) = cgroups_path else {
        return Ok(Path::new("/").join(id));
    };
    if !p.is_absolute() && p.to_string_lossy().split(':').count() == 3 {
        return Err(CgroupError::SystemdPath { path: p.to_string_lossy().into_owned() });
    }
    let mut out = PathBuf::from("/");
    if !p.is_absolute() {
        out.push(DEFAULT_PARENT);
    }
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(CgroupError::InvalidPath { path: p.to_path_buf(), reason: "must not contain \"..\"" })
            }
        }
    }
    if out == Path::new("/") {
        return Err(CgroupError::InvalidPath { path: p.to_path_buf(), reason: "names the root cgroup" });
    }
    Ok(out)
}

/// Value checks common to v1 and v2, so a bad spec fails before anything is made.
fn validate(r: &LinuxResources) -> Result<(), CgroupError> {
    devices::rules(r.devices().as_deref().unwrap_or(&[]))?;
    if let Some(m) = r.memory() {
        let fields = [("memory.limit", m.limit()), ("memory.swap", m.swap()), ("memory.reservation", m.reservation())];
        for (field, value) in fields {
            if let Some(v) = value.filter(|v| *v < -1) {
                return Err(CgroupError::InvalidValue {
                    field,
                    value: v.to_string(),
                    expected: "bytes, or -1 for unlimited",
                });
            }
        }
        if let Some(s) = m.swappiness().filter(|s| *s > 100) {
            return Err(CgroupError::InvalidValue {
                field: "memory.swappiness",
                value: s.to_string(),
                expected: "0 to 100",
            });
        }
        let limit = m.limit().filter(|v| *v != 0);
        match (limit, m.swap().filter(|v| *v != 0)) {
            (Some(l), Some(s)) if l > 0 && s > 0 && s < l => {
                return Err(CgroupError::SwapBelowLimit { limit: l, swap: s })
            }
            (None | Some(-1), Some(s)) if s > 0 => return Err(CgroupError::SwapWithoutLimit { swap: s }),
            _ => {}
        }
    }
    if let Some(q) = r.cpu().as_ref().and_then(|c| c.quota()).filter(|q| *q < -1) {
        return Err(CgroupError::InvalidValue {
            field: "cpu.quota",
            value: q.to_string(),
            expected: "microseconds per period, or -1 for unlimited",
        });
    }
    Ok(())
}

/// Refuses limits this runtime does not apply (block I/O, hugepages, network class and
/// priority, RDMA, realtime/idle/burst CPU), naming the field: a limit that was asked for is
/// applied or refused, never dropped. Kernel memory limits, which the kernel itself stopped
/// enforcing (and runc ignores), are ignored with a warning.
fn refuse_unsupported(r: &LinuxResources) -> Result<(), CgroupError> {
    let refuse = |field: &'static str| Err(CgroupError::Unsupported { field });
    if let Some(b) = r.block_io() {
        let devices = [
            b.weight_device().as_ref().map_or(0, Vec::len),
            b.throttle_read_bps_device().as_ref().map_or(0, Vec::len),
            b.throttle_write_bps_device().as_ref().map_or(0, Vec::len),
            b.throttle_read_iops_device().as_ref().map_or(0, Vec::len),
            b.throttle_write_iops_device().as_ref().map_or(0, Vec::len),
        ];
        if b.weight().is_some() || b.leaf_weight().is_some() || devices.iter().any(|n| *n > 0) {
            return refuse("blockIO");
        }
    }
    if r.hugepage_limits().as_ref().is_some_and(|h| !h.is_empty()) {
        return refuse("hugepageLimits");
    }
    if let Some(n) = r.network() {
        if n.class_id().is_some() || n.priorities().as_ref().is_some_and(|p| !p.is_empty()) {
            return refuse("network");
        }
    }
    if r.rdma().as_ref().is_some_and(|h| !h.is_empty()) {
        return refuse("rdma");
    }
    if let Some(c) = r.cpu() {
        if c.realtime_runtime().is_some_and(|v| v != 0) || c.realtime_period().is_some_and(|v| v != 0) {
            return refuse("cpu.realtimeRuntime/realtimePeriod");
        }
        if c.idle().is_some_and(|v| v != 0) || c.burst().is_some_and(|v| v != 0) {
            return refuse("cpu.idle/burst");
        }
    }
    if let Some(m) = r.memory() {
        #[allow(deprecated)]
        let kernel = m.kernel().is_some();
        if kernel || m.kernel_tcp().is_some() {
            tracing::warn!("linux.resources.memory.kernel/kernelTCP: kernel memory limits are not enforced by current kernels; ignored, as runc does");
        }
    }
    Ok(())
}

/// A v2 limit value: `-1` (or any negative) is `max`.
fn max_or(v: i64) -> String {
    if v < 0 {
        "max".to_string()
    } else {
        v.to_string()
    }
}

/// `pids.max` for the spec's limit: `0` or negative is no limit.
fn pids_max(limit: i64) -> String {
    if limit > 0 {
        limit.to_string()
    } else {
        "max".to_string()
    }
}

/// Writes `pid` into `dir/cgroup.procs`.
fn add_to(dir: &Path, pid: Pid) -> Result<(), CgroupError> {
    fs::write(&dir.join("cgroup.procs"), &pid.to_string()).map_err(|e| match e {
        CgroupError::Write { path, source, .. } => CgroupError::AddTask { pid: pid.as_raw(), path, source },
        other => other,
    })
}

#[cfg(test)]
mod tests;

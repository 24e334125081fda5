//! `create`: load and check the bundle, make the state directory, the exec fifo and the cgroup,
//! clone the init into its namespaces, put it into the cgroup, write its id maps, run the
//! prestart/createRuntime hooks when it asks, and return once it reports it is ready (blocked
//! on `exec.fifo`). Everything made along the way is undone by [`CreateGuard`] on failure.
//!
//! The cgroup is made in two steps around the clone: the cgroup v2 directory before it (the
//! init is cloned straight into it), the v1 hierarchies after it, while the init already
//! mounts what comes before the spec's first cgroup mount. The init joins the v1 cgroups itself
//! when the go-ahead comes, before that mount (see `init::init`).

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::signal::{kill, Signal};
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxDeviceCgroup, LinuxNamespaceType, LinuxResources, Spec};

use crate::cgroups::{CgroupCreation, CgroupError, CgroupManager};
use crate::container::{connect_console, validate_id, write_pid_file, CreateOptions, Runtime, RuntimeError};
use crate::init::{self, InitArgs, Msg, SyncChannel};
use crate::namespaces::{self, Namespaces, PidNsForChildren};
use crate::rootfs::{Overlay, OVERLAY_ANNOTATION};
use crate::state::{ProcStat, State, Status, EXEC_FIFO, OCI_VERSION};

/// Undoes a partial create unless disarmed: kills and reaps the init, removes the cgroup
/// directories of an unfinished two-step create or destroys the finished cgroup, removes the
/// state directory.
struct CreateGuard {
    dir: PathBuf,
    creation: Option<CgroupCreation>,
    cgroup: Option<CgroupManager>,
    child: Option<Pid>,
    /// A container in the host's mount namespace: its root, and the mounts stacked there
    /// before it.
    host_mounts: Option<(PathBuf, usize)>,
    armed: bool,
}

impl CreateGuard {
    fn new(dir: PathBuf) -> Self {
        CreateGuard { dir, creation: None, cgroup: None, child: None, host_mounts: None, armed: true }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CreateGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(pid) = self.child {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
        if let Some((root, below)) = &self.host_mounts {
            if let Err(e) = crate::rootfs::unmount_host_mounts(root, *below) {
                tracing::warn!(error = %e, "unmounting what a failed create mounted");
            }
        }
        // Only now that the init has left them can its cgroup directories go.
        drop(self.creation.take());
        if let Some(cg) = &self.cgroup {
            if let Err(e) = cg.destroy() {
                tracing::warn!(error = %e, "removing the cgroup of a failed create");
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.dir.display(), error = %e, "removing state dir");
            }
        }
    }
}

/// Accept ociVersion 1.0.x – 1.3.x (with any pre-release suffix, like runc's "1.0.2-dev").
pub fn check_version(v: &str) -> Result<(), RuntimeError> {
    let bad = || RuntimeError::Version { version: v.to_string() };
    let core = v.split(['-', '+']).next().unwrap_or("");
    let mut parts = core.split('.');
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    if let Some(patch) = parts.next() {
        patch.parse::<u32>().map_err(|_| bad())?;
    }
    if major != 1 || minor > 3 || parts.next().is_some() {
        return Err(bad());
    }
    Ok(())
}

/// Load `<bundle>/config.json` and check what create needs from it.
pub fn load_spec(bundle: &Path) -> Result<Spec, RuntimeError> {
    let path = bundle.join("config.json");
    let spec = Spec::load(&path).map_err(|source| RuntimeError::Spec { path, source })?;
    check_version(spec.version())?;
    Ok(spec)
}

/// Log the `linux` fields this runtime accepts but does not act on.
fn warn_unsupported(linux: &oci_spec::runtime::Linux) {
    for (field, set) in [
        ("intelRdt", linux.intel_rdt().is_some()),
        ("personality", linux.personality().is_some()),
        ("timeOffsets", linux.time_offsets().is_some()),
        ("memoryPolicy", linux.memory_policy().is_some()),
        ("mountLabel", linux.mount_label().is_some()),
        ("netDevices", linux.net_devices().is_some()),
    ] {
        if set {
            tracing::warn!(field, "linux field not supported, ignored");
        }
    }
}

/// The spec's resources, with an allow rule for every device in `linux.devices` (as runc does:
/// a device the container gets must also be usable under a deny-all device policy).
fn resources_with_devices(linux: &oci_spec::runtime::Linux) -> Option<LinuxResources> {
    let devices = linux.devices().as_deref().unwrap_or(&[]);
    let mut res = linux.resources().clone();
    if devices.is_empty() {
        return res;
    }
    let r = res.get_or_insert_with(LinuxResources::default);
    let mut rules = r.devices().clone().unwrap_or_default();
    rules.extend(devices.iter().map(LinuxDeviceCgroup::from));
    r.set_devices(Some(rules));
    res
}

/// A rootless container's resources: the spec's without device rules, as runc does. They
/// could not be applied (v1 device rules and v2 device programs need privileges on the host),
/// and are not needed: a user namespace keeps the container from making device nodes, and a
/// device bound in from the host is opened with the host's permissions for this user.
fn resources_for_rootless(linux: &oci_spec::runtime::Linux) -> Option<LinuxResources> {
    let mut res = linux.resources().clone();
    if let Some(r) = res.as_mut().filter(|r| r.devices().as_ref().is_some_and(|d| !d.is_empty())) {
        tracing::debug!("rootless: device rules are left to the user namespace and the host's permissions");
        r.set_devices(None);
    }
    res
}

/// Does the spec ask for a limit, anything beyond device rules, that needs a cgroup?
fn asks_for_limits(r: &LinuxResources) -> bool {
    let mut without_devices = r.clone();
    without_devices.set_devices(None);
    without_devices != LinuxResources::default()
}

pub(crate) fn create(rt: &Runtime, id: &str, bundle: &Path, opts: CreateOptions) -> Result<State, RuntimeError> {
    validate_id(id)?;
    let bundle =
        std::fs::canonicalize(bundle).map_err(|source| RuntimeError::Bundle { path: bundle.to_path_buf(), source })?;
    let spec = load_spec(&bundle)?;
    let root = spec.root().as_ref().ok_or(RuntimeError::InvalidSpec { reason: "root is missing" })?;
    let rootfs_path = if root.path().is_absolute() { root.path().clone() } else { bundle.join(root.path()) };
    let rootfs = std::fs::canonicalize(&rootfs_path)
        .map_err(|source| RuntimeError::Rootfs { path: rootfs_path.clone(), source })?;
    if rootfs == Path::new("/") {
        return Err(RuntimeError::RootPath {
            path: rootfs_path,
            why: "is the host's root directory: give the container a root filesystem of its own",
        });
    }
    if !rootfs.is_dir() {
        return Err(RuntimeError::RootPath {
            path: rootfs_path,
            why: "is not a directory: it must be one, the container's /",
        });
    }
    let process = spec.process().as_ref().ok_or(RuntimeError::InvalidSpec { reason: "process is missing" })?;
    if process.args().as_deref().unwrap_or(&[]).is_empty() {
        return Err(RuntimeError::InvalidSpec { reason: "process.args must not be empty" });
    }
    if !process.cwd().is_absolute() {
        return Err(RuntimeError::InvalidSpec { reason: "process.cwd must be an absolute path (as runc requires)" });
    }
    let linux = spec.linux().clone().unwrap_or_default();
    let ns = Namespaces::from_spec(linux.namespaces().as_deref().unwrap_or(&[]))?;
    if !nix::unistd::geteuid().is_root() && !ns.contains(LinuxNamespaceType::User) {
        return Err(RuntimeError::InvalidSpec {
            reason: "a container started by a user other than root needs a user namespace \
                     (linux.namespaces: user, with uidMappings and gidMappings); \
                     `twinbox-runc spec --rootless` writes such a config",
        });
    }
    if ns.is_new(LinuxNamespaceType::User) {
        namespaces::check_id_maps(
            linux.uid_mappings().as_deref().unwrap_or(&[]),
            linux.gid_mappings().as_deref().unwrap_or(&[]),
        )?;
    }
    if spec.hostname().as_deref().is_some_and(|h| !h.is_empty()) && !ns.contains(LinuxNamespaceType::Uts) {
        return Err(RuntimeError::InvalidSpec { reason: "unable to set hostname without a private UTS namespace" });
    }
    let overlay =
        spec.annotations().as_ref().and_then(|a| a.get(OVERLAY_ANNOTATION)).map(|v| Overlay::parse(v)).transpose()?;
    let terminal = process.terminal().unwrap_or(false);
    if terminal && opts.console_socket.is_none() {
        return Err(RuntimeError::NoConsoleSocket);
    }
    let prepared = crate::process::prepare(process, linux.seccomp().as_ref())?;
    warn_unsupported(&linux);

    // The state directory; mkdir's EEXIST is the "already exists" check.
    std::fs::create_dir_all(rt.root()).map_err(|source| RuntimeError::Io {
        what: "creating state root",
        path: rt.root().to_path_buf(),
        source,
    })?;
    let dir = rt.state_dir(id);
    match nix::unistd::mkdir(&dir, Mode::from_bits_truncate(0o711)) {
        Ok(()) => {}
        Err(nix::errno::Errno::EEXIST) => return Err(RuntimeError::Exists { id: id.to_string() }),
        Err(source) => return Err(RuntimeError::Sys { what: "creating the state directory", source }),
    }
    let mut guard = CreateGuard::new(dir.clone());
    // Without a mount namespace its mounts are the host's (see `RootfsConfig::host_mounts`).
    let host_mounts_below = (!ns.contains(LinuxNamespaceType::Mount)).then(|| crate::rootfs::stacked_at(&rootfs));
    guard.host_mounts = host_mounts_below.map(|below| (rootfs.clone(), below));
    // 0622 so that the init can open it for writing after dropping to its user.
    nix::unistd::mkfifo(&dir.join(EXEC_FIFO), Mode::from_bits_truncate(0o622))
        .map_err(|source| RuntimeError::Sys { what: "creating exec.fifo", source })?;
    nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        &dir.join(EXEC_FIFO),
        Mode::from_bits_truncate(0o622),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(|source| RuntimeError::Sys { what: "chmod exec.fifo", source })?;
    let state_dir_fd: OwnedFd =
        nix::fcntl::open(&dir, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|source| RuntimeError::Sys { what: "opening the state directory", source })?;

    let mut cgroup = CgroupManager::new(linux.cgroups_path().as_deref(), id)?;
    let rootless = rt.is_rootless();
    let resources = if rootless { resources_for_rootless(&linux) } else { resources_with_devices(&linux) };
    // As root, only what the clone needs is made now (the cgroup v2 directory); the v1
    // hierarchies are made while the init already sets up its mounts (it waits for them at
    // its first cgroup mount). Rootless, all of it is made first: where the hierarchies are
    // not writable, the container may have to run without a cgroup.
    if !rootless {
        guard.creation = Some(cgroup.create_begin(resources.as_ref())?);
    } else if let Err(e) = cgroup.create(resources.as_ref()) {
        let uid = nix::unistd::geteuid();
        if !e.is_permission_denied() {
            return Err(e.into());
        }
        // Rootless, on hierarchies this user may not write: like runc, run without a cgroup
        // when nothing needs one (device rules cannot apply anyway: the user namespace keeps
        // the container from making device nodes), and say why not when limits were asked for.
        if linux.resources().as_ref().is_some_and(asks_for_limits) {
            let path = e.path().map(Path::to_path_buf).unwrap_or_default();
            return Err(CgroupError::RootlessLimits { path, uid: uid.as_raw() }.into());
        }
        tracing::info!(error = %e, "rootless: the container gets no cgroup");
        cgroup = cgroup.without_hierarchies();
    }
    if rootless {
        guard.cgroup = Some(cgroup.clone());
    }

    let console = match (&opts.console_socket, terminal) {
        (Some(p), true) => Some(connect_console(p)?),
        _ => None,
    };
    let mut state = State {
        oci_version: OCI_VERSION.to_string(),
        id: id.to_string(),
        status: Status::Creating,
        pid: 0,
        bundle: bundle.clone(),
        annotations: spec.annotations().clone().unwrap_or_default(),
        rootfs: rootfs.clone(),
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        owner_uid: nix::unistd::geteuid().as_raw(),
        init_start_time: 0,
        cgroup: cgroup.clone(),
        config: spec.clone(),
        paused: false,
        host_mounts_below,
    };

    let hooks = spec.hooks().clone().unwrap_or_default();
    let prestart = hooks.prestart().clone().unwrap_or_default();
    let create_runtime = hooks.create_runtime().clone().unwrap_or_default();
    let (parent_sync, child_sync) =
        SyncChannel::pair().map_err(|source| RuntimeError::Sys { what: "socketpair", source })?;
    let stdio_raw = opts.stdio.as_ref().map(|[a, b, c]| [a.as_raw_fd(), b.as_raw_fd(), c.as_raw_fd()]);
    let session_keyring = if opts.no_new_keyring { None } else { CString::new(format!("_ses.{id}")).ok() };
    // The init joins its cgroups itself, cheaply (see `Cgroup::v1_task_files` and
    // `clone_process_into`), unless it starts in a new user namespace.
    let self_join = !ns.is_new(LinuxNamespaceType::User);
    let cgroup_tasks = if self_join { cgroup.v1_task_files() } else { Vec::new() };
    let unified = match cgroup.unified_dir() {
        Some(dir) if self_join => Some(std::fs::File::open(&dir).map_err(|source| RuntimeError::Io {
            what: "opening the cgroup",
            path: dir.clone(),
            source,
        })?),
        _ => None,
    };
    let args = InitArgs {
        spec: &spec,
        bundle: &bundle,
        rootfs: &rootfs,
        overlay: overlay.as_ref(),
        ns: &ns,
        prepared: &prepared,
        sync: &child_sync,
        state_dir: state_dir_fd.as_raw_fd(),
        stdio: stdio_raw,
        console: console.as_ref().map(|c| c.as_raw_fd()),
        preserve_fds: opts.preserve_fds,
        no_pivot: opts.no_pivot,
        parent_hooks: !prestart.is_empty() || !create_runtime.is_empty(),
        session_keyring,
        cgroup_tasks: &cgroup_tasks,
    };

    let (pid, in_unified) = {
        let _pidns = ns.pid_path.as_deref().map(PidNsForChildren::enter).transpose()?;
        namespaces::clone_process_into(ns.clone_flags, unified.as_ref().map(|f| f.as_fd()), || init::run(&args))?
    };
    drop(unified);
    tracing::debug!(self_join, in_unified, "init cloned; joins its v1 cgroups itself when self_join");
    guard.child = Some(pid);
    drop(child_sync);
    drop(opts.stdio);
    drop(console);
    tracing::debug!(id, pid = pid.as_raw(), "init cloned");

    if ns.is_new(LinuxNamespaceType::User) {
        namespaces::write_id_maps(
            pid,
            linux.uid_mappings().as_deref().unwrap_or(&[]),
            linux.gid_mappings().as_deref().unwrap_or(&[]),
        )?;
    }
    if let Some(creation) = guard.creation.as_mut() {
        cgroup.create_finish(creation, resources.as_ref())?;
        guard.creation = None;
        guard.cgroup = Some(cgroup.clone());
    }
    if !self_join {
        cgroup.add_task(pid)?;
    } else if !in_unified {
        cgroup.add_task_unified(pid)?;
    }
    state.pid = pid.as_raw();
    let sys = |what| move |source| RuntimeError::Sys { what, source };
    if let Err(e) = parent_sync.send(&Msg::Go(state.oci_json())) {
        // The init fails before it needs the go-ahead when a mount before the cgroups fails:
        // its report is waiting here.
        if let Ok(Some(Msg::Error { code, message })) = parent_sync.recv() {
            return Err(RuntimeError::Init { message, code });
        }
        return Err(sys("sending go to the init")(e));
    }

    loop {
        match parent_sync.recv().map_err(sys("waiting for the init"))? {
            Some(Msg::HooksRequest) => {
                let json = state.oci_json();
                crate::hooks::run("prestart", &prestart, &json)?;
                crate::hooks::run("createRuntime", &create_runtime, &json)?;
                parent_sync.send(&Msg::HooksDone).map_err(sys("resuming the init"))?;
            }
            Some(Msg::Ready) => break,
            Some(Msg::Error { code, message }) => {
                return Err(RuntimeError::Init { message, code });
            }
            Some(_) | None => {
                let status = match waitpid(pid, None) {
                    Ok(WaitStatus::Exited(_, c)) => format!("exit status {c}"),
                    Ok(WaitStatus::Signaled(_, s, _)) => format!("killed by {s}"),
                    Ok(other) => format!("{other:?}"),
                    Err(e) => e.to_string(),
                };
                guard.child = None;
                return Err(RuntimeError::InitDied { status });
            }
        }
    }

    state.init_start_time = ProcStat::read(pid.as_raw()).map(|s| s.start_time).unwrap_or_default();
    state.status = Status::Created;
    state.save(&dir)?;
    if let Some(p) = &opts.pid_file {
        write_pid_file(p, pid)?;
    }
    guard.disarm();
    tracing::debug!(id, pid = pid.as_raw(), "created");
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        for ok in ["1.0.0", "1.0.2-dev", "1.1.0", "1.2.1", "1.3.0", "1.2"] {
            assert!(check_version(ok).is_ok(), "{ok}");
        }
        for bad in ["2.0.0", "0.9.0", "1.4.0", "", "x", "1.0.x"] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
        assert_eq!(
            check_version("2.0.0").unwrap_err().to_string(),
            "unsupported ociVersion \"2.0.0\": this runtime supports 1.0.x to 1.3.x"
        );
    }
}

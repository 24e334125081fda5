//! Docker-like containers over the OCI runtime: `twinbox run`, `ps`, `logs`, `stop`, `kill`,
//! `rm`, `start`, `exec`.
//!
//! A container is a directory `<store>/containers/<id>/` holding `record.json` (what the user
//! asked for and what happened), the OCI bundle (`bundle/config.json`, an empty
//! `bundle/rootfs` mount point), the copy-on-write `upper/` and `work/` dirs, and `log` (the
//! output of every container not run with `--rm`). The image's unpacked layers are the overlay lowers; the overlay is
//! mounted by the runtime inside the container's own mount namespace, so nothing is mounted on
//! the host and nothing can be left mounted.
//!
//! A foreground run waits for its container itself. Detached containers (`-d`, `start`) are
//! watched by one small process per store, the few-KiB `twinbox-monitor` program (see
//! [`monitor`]): a launcher it starts creates and starts the container, so the init becomes
//! the monitor's child; once the init exits, the monitor runs the command that records the exit
//! code and OOM kill and removes the container when `--rm` was given ([`Engine::exited`]).

pub mod monitor;
mod mountpoints;
pub mod spec;
pub mod vm;

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use twinbox_exit::ExitCode;
use twinbox_image::{store::remove_tree, Store, StoreError};

pub use spec::RunOptions;

use crate::network::attach::{self, Endpoint, NetworkMode};
use crate::network::publish::{self, PortMapping};
use crate::network::{cni, nft, Networks, DEFAULT_NETWORK};
use twinbox_runtime::cgroups::CgroupManager;
use twinbox_runtime::container::{CreateOptions, Runtime};
use twinbox_runtime::state::ProcStat;
use twinbox_runtime::RuntimeError;

/// What `twinbox exec` asks for beside the command.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// "K=V" added to (or replacing in) the instance's environment.
    pub env: Vec<String>,
    /// Working directory instead of the instance's.
    pub workdir: Option<String>,
    /// `USER[:GROUP]` (names or ids) instead of the instance's.
    pub user: Option<String>,
    /// `-i`: our stdin is the process's; without it the process reads /dev/null.
    pub interactive: bool,
    /// `-t`: the process gets a terminal of its own (a pty), sized as ours and resized with it.
    pub tty: bool,
}

/// Errors from the container engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The image store failed or lacks the image.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A volume or a `-v` mount.
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
    /// The OCI runtime failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The image and the run's flags give no process to start.
    #[error(transparent)]
    Launch(#[from] twinbox_image::launch::LaunchError),
    /// A seccomp profile file that is not OCI seccomp JSON.
    #[error("seccomp profile {0} is not valid OCI seccomp JSON")]
    SeccompProfile(PathBuf, #[source] serde_json::Error),
    /// `--cpus` out of what the kernel and the host can give (Docker's range).
    #[error("--cpus {value}: give a number from 0.01 to {max}, the CPUs this host has")]
    BadCpus { value: f64, max: usize },
    /// No container with that id, id prefix or name.
    #[error("no such container: {0}; see `twinbox ps -a`")]
    NoSuchContainer(String),
    /// Not a name Docker would take.
    #[error("invalid container name {0:?}: use letters, digits, '_', '.' and '-', starting with a letter or digit")]
    InvalidName(String),
    /// The name is taken.
    #[error("the container name {0:?} is already in use; remove that container or choose another name")]
    NameInUse(String),
    /// `rm` of a running container without `-f`.
    #[error("container {0} is running; stop it first or use rm -f")]
    Running(String),
    /// The operation needs a running container.
    #[error("container {0} is not running")]
    NotRunning(String),
    /// A filesystem operation on a container's directory failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A system call failed.
    #[error("{0}")]
    Sys(&'static str, #[source] nix::Error),
    /// Networking the container failed, or its network does not exist.
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    /// A port could not be published.
    #[error(transparent)]
    Publish(#[from] crate::network::publish::PublishError),
    /// `-p` with a network mode that has no address of its own to forward to.
    #[error("ports can be published only from a bridge network, not with --network {0}; drop -p, or use a network")]
    PublishNeedsBridge(String),
    /// The detached monitor reported a failure to start the container.
    #[error("starting the container failed: {0}")]
    Monitor(String),
    /// A detached microVM's launcher failed, with this exit code and message.
    #[error("{message}")]
    Relayed { code: i32, message: String },
    /// The engine was not told what starts a detached container.
    #[error("detached containers need the command that launches them; see Engine::set_launcher")]
    NoLaunchCommand,
    /// The engine was not told what starts a microVM's VMM process.
    #[error("microVMs need the command that starts their VMM process; see Engine::set_vmm_command")]
    NoVmmCommand,
    /// Running the microVM failed (see [`vm`]).
    #[error(transparent)]
    Vm(#[from] crate::microvm::ImageRunError),
    /// What a microVM cannot do (yet), named.
    #[error("{0}")]
    NotForMicrovm(String),
    /// A microVM's guest agent could not be reached, or broke off.
    #[error("{0}")]
    Agent(String),
    /// The engine was not told what records a detached container's exit.
    #[error("detached containers need the command that records their exit; see Engine::set_on_exit")]
    NoExitCommand,
}

impl ExitCode for EngineError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        match self {
            EngineError::Store(e) => e.exit_code(),
            EngineError::Volume(e) => e.exit_code(),
            EngineError::Runtime(e) => e.exit_code(),
            EngineError::Launch(e) => e.exit_code(),
            EngineError::Network(e) => e.exit_code(),
            EngineError::Publish(e) => e.exit_code(),
            EngineError::PublishNeedsBridge(_) | EngineError::NotForMicrovm(_) => USER_ERROR,
            EngineError::Vm(e) => e.exit_code(),
            EngineError::Relayed { code, .. } => *code,
            EngineError::SeccompProfile(..)
            | EngineError::BadCpus { .. }
            | EngineError::NoSuchContainer(_)
            | EngineError::NameInUse(_)
            | EngineError::InvalidName(_)
            | EngineError::Running(_)
            | EngineError::NotRunning(_) => USER_ERROR,
            EngineError::Io { .. }
            | EngineError::Agent(_)
            | EngineError::Sys(..)
            | EngineError::Monitor(_)
            | EngineError::NoExitCommand
            | EngineError::NoLaunchCommand
            | EngineError::NoVmmCommand => INTERNAL,
        }
    }
}

fn io_err(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> EngineError {
    let path = path.into();
    move |source| EngineError::Io { op, path, source }
}

/// Where a container is in its life, as `twinbox ps` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Phase {
    /// Prepared, not started.
    Created,
    /// Its process runs.
    Running {
        /// The init's host pid.
        pid: i32,
    },
    /// It ended.
    Exited {
        /// Exit code as a shell reports it (128+N for signal N).
        code: i32,
        /// The kernel's OOM killer killed it.
        oom_killed: bool,
    },
}

/// What `record.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// 64 hex characters.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// The image as the user named it.
    pub image: String,
    /// Manifest digest of the image.
    pub image_digest: String,
    /// The command run.
    pub command: Vec<String>,
    /// The options it was run with.
    pub options: RunOptions,
    /// RFC 3339 creation time.
    pub created: String,
    /// Current phase.
    pub phase: Phase,
    /// Where it sits on its bridge network while it runs.
    #[serde(default)]
    pub endpoint: Option<Endpoint>,
    /// Its published ports as bound (a free host port filled in) while it runs.
    #[serde(default)]
    pub ports: Vec<PortMapping>,
    /// The twinbox process that answers for the container while it is made and started (for
    /// a detached one, its launcher), and for a foreground run until it has ended; None once the
    /// store's monitor watches it.
    /// A record whose owner is gone was left by a twinbox that was killed ([`Engine::reconcile`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// A microVM's shape (see [`vm`]); none for a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<crate::microvm::VmOptions>,
}

impl Record {
    /// `container` or `microvm`, as `ps` shows it.
    pub fn isolation(&self) -> &'static str {
        if self.vm.is_some() {
            "microvm"
        } else {
            "container"
        }
    }
}

/// A process, told apart from a later one with the same pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat: clock ticks after boot.
    pub start: u64,
}

impl Owner {
    /// This process.
    pub fn me() -> Option<Owner> {
        let pid = std::process::id() as i32;
        Some(Owner { pid, start: ProcStat::read(pid)?.start_time })
    }

    /// Whether it still runs.
    pub fn alive(&self) -> bool {
        ProcStat::read(self.pid).map(|s| s.start_time) == Some(self.start)
    }
}

/// Whether process `pid` runs: it exists and is not a zombie (an init whose parent was killed
/// waits as one until init reaps it, which can take a while).
fn runs(pid: i32) -> bool {
    ProcStat::read(pid).is_some_and(|s| s.state != 'Z')
}

/// The container engine.
pub struct Engine {
    pub(crate) store: Store,
    pub(crate) runtime: Runtime,
    dir: PathBuf,
    on_exit: Option<Vec<std::ffi::OsString>>,
    launcher: Option<Vec<std::ffi::OsString>>,
    vm_launcher: Option<Vec<std::ffi::OsString>>,
    vmm_command: Option<Vec<std::ffi::OsString>>,
}

/// How a foreground container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code (128+N when killed by signal N).
    pub code: i32,
    /// Killed by the OOM killer.
    pub oom_killed: bool,
}

impl Engine {
    /// Open over an image store; containers live in `<store>/containers`, runtime state in
    /// `runtime_root`.
    pub fn new(store: Store, runtime_root: impl Into<PathBuf>) -> Result<Self, EngineError> {
        let dir = store.root().join("containers");
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        Ok(Self {
            store,
            runtime: Runtime::new(runtime_root),
            dir,
            on_exit: None,
            launcher: None,
            vm_launcher: None,
            vmm_command: None,
        })
    }

    /// The command a detached container's monitor runs, with the container's id and exit code
    /// appended, once its init has exited: one that calls [`exited`](Self::exited) (the CLI's
    /// hidden `container-exited`). Needed by [`run_detached`](Self::run_detached).
    pub fn set_on_exit(&mut self, command: Vec<std::ffi::OsString>) {
        self.on_exit = Some(command);
    }

    /// The command that starts a detached container, with its id appended: one that calls
    /// [`launch`](Self::launch) (the CLI's hidden `container-launch`), run by the store's
    /// monitor. Needed by [`run_detached`](Self::run_detached).
    pub fn set_launcher(&mut self, command: Vec<std::ffi::OsString>) {
        self.launcher = Some(command);
    }

    /// The command that runs a detached microVM, with its id appended and a pipe as
    /// descriptor 3: one that calls [`launch_microvm`](Self::launch_microvm) (the CLI's hidden
    /// `microvm-launch`).
    pub fn set_vm_launcher(&mut self, command: Vec<std::ffi::OsString>) {
        self.vm_launcher = Some(command);
    }

    /// The command that starts a microVM's VMM process (`twinbox microvm-vmm`, which calls
    /// [`crate::vmm::serve`]); without one no microVM runs.
    pub fn set_vmm_command(&mut self, command: Vec<std::ffi::OsString>) {
        self.vmm_command = Some(command);
    }

    /// The image store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn container_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Write the bundle and record for a new container; nothing runs yet. On error nothing
    /// is left behind.
    pub fn prepare(&self, opts: &RunOptions) -> Result<Record, EngineError> {
        // From resolving the image until its hold is placed, a concurrent `prune` waits: it
        // would otherwise remove layers this container is about to use (an `rmi -f` may untag
        // the image meanwhile; the hold keeps what the container uses).
        let _gc = self.store.writer_guard()?;
        let image = self.store.resolve(&opts.image)?;
        let layers = self.store.unpacked_layers(&image)?;
        let id = new_id();
        let name = match &opts.name {
            Some(n) => {
                if !valid_name(n) {
                    return Err(EngineError::InvalidName(n.clone()));
                }
                if self.records()?.iter().any(|r| &r.name == n) {
                    return Err(EngineError::NameInUse(n.clone()));
                }
                n.clone()
            }
            None => format!("twinbox_{}", &id[..8]),
        };
        let cdir = self.container_dir(&id);
        let guard = DirGuard::new(cdir.clone())?;
        for d in ["bundle/rootfs", "upper", "work"] {
            fs::create_dir_all(cdir.join(d)).map_err(io_err("create directory", cdir.join(d)))?;
        }
        // After the directory: a reservation whose container has no directory is stale.
        let _name = self.reserve_name(&name, &id)?;
        let overlay = spec::OverlayStack {
            lower: layers.iter().rev().cloned().collect(),
            upper: cdir.join("upper"),
            work: cdir.join("work"),
        };
        let exposed = if opts.publish_all { publish::exposed(&image.config) } else { Vec::new() };
        let mut with_exposed;
        let opts = if exposed.is_empty() {
            opts
        } else {
            with_exposed = opts.clone();
            for port in exposed {
                if !with_exposed.publish.iter().any(|m| m.container_port == port.container_port && m.udp == port.udp) {
                    with_exposed.publish.push(port);
                }
            }
            &with_exposed
        };
        if !opts.publish.is_empty() && !matches!(opts.network, NetworkMode::Bridge(_) | NetworkMode::Cni(_)) {
            let mode = match &opts.network {
                NetworkMode::None => "none".to_owned(),
                NetworkMode::Host => "host".to_owned(),
                NetworkMode::Container(c) => format!("container:{c}"),
                NetworkMode::Bridge(n) | NetworkMode::Cni(n) => n.clone(),
            };
            return Err(EngineError::PublishNeedsBridge(mode));
        }
        let net = self.net_setup(&id, &cdir, opts)?;
        let mut spec = spec::build_spec(&id, &image.config, &layers, &overlay, opts, &net)?;
        // Until the record naming them is saved, no `volume rm` of these.
        let _volume_users = if opts.volumes.is_empty() { None } else { Some(self.volumes().users_lock(false)?) };
        let binds = self.volume_binds(opts)?;
        if !binds.is_empty() {
            let mut mounts = spec.mounts().clone().unwrap_or_default();
            mounts.extend(binds);
            spec.set_mounts(Some(mounts));
        }
        let missing = spec::missing_mount_points(&spec, &layers);
        if !missing.is_empty() {
            let mut overlay = overlay;
            overlay.lower.insert(0, mountpoints::layer(&self.store.root().join("mountpoints"), &layers, &missing)?);
            let mut annotations = spec.annotations().clone().unwrap_or_default();
            annotations.insert(
                spec::OVERLAY_ANNOTATION.to_owned(),
                serde_json::to_string(&overlay).expect("an overlay stack always serializes"),
            );
            spec.set_annotations(Some(annotations));
        }
        let cfg = cdir.join("bundle/config.json");
        let json = serde_json::to_vec_pretty(&spec).expect("a spec always serializes");
        fs::write(&cfg, json).map_err(io_err("write", &cfg))?;
        let command = spec.process().as_ref().and_then(|p| p.args().clone()).unwrap_or_default();
        let record = Record {
            id: id.clone(),
            name,
            image: opts.image.clone(),
            image_digest: image.manifest_digest.to_string(),
            command,
            options: opts.clone(),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            phase: Phase::Created,
            endpoint: None,
            ports: Vec::new(),
            owner: Owner::me(),
            vm: None,
        };
        self.save(&record)?;
        self.store.hold(&id, &image.manifest_digest)?;
        guard.kept();
        _name.keep();
        Ok(record)
    }

    /// The bind mounts of a container's `-v`s: a host path (which must exist) or a local
    /// volume's data (the volume made if missing).
    fn volume_binds(&self, opts: &RunOptions) -> Result<Vec<oci_spec::runtime::Mount>, EngineError> {
        use crate::volume::VolumeSource;
        let volumes = self.volumes();
        // Everything checked before any volume is made.
        for m in &opts.volumes {
            match &m.source {
                VolumeSource::Host(path) if !path.exists() => {
                    return Err(crate::volume::VolumeError::BadMount {
                        spec: m.to_string(),
                        why: format!("the host path {} does not exist; create it first", path.display()),
                    }
                    .into())
                }
                VolumeSource::Host(_) => {}
                VolumeSource::Named(name) => volumes.check_mount(name, false)?,
            }
        }
        let mut out = Vec::new();
        for m in &opts.volumes {
            let source = match &m.source {
                // A typo is not made an empty directory bound over the image's files (what
                // `docker run -v` does; `--mount` refuses it, as here): checked above.
                VolumeSource::Host(path) => path.clone(),
                VolumeSource::Named(name) => {
                    volumes.for_mount(name, false)?;
                    volumes.data_dir(name)
                }
            };
            let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
            if m.read_only {
                options.push("ro".into());
            }
            out.push(
                oci_spec::runtime::MountBuilder::default()
                    .destination(PathBuf::from(&m.target))
                    .typ("bind")
                    .source(source)
                    .options(options)
                    .build()
                    .expect("mount fields set"),
            );
        }
        Ok(out)
    }

    /// The store's named volumes.
    pub fn volumes(&self) -> crate::volume::Volumes {
        crate::volume::Volumes::new(self.store.root())
    }

    /// Removes named volume `name`, unless an instance (running or not) mounts it.
    pub fn remove_volume(&self, name: &str) -> Result<(), EngineError> {
        let _users_lock = self.volumes().users_lock(true)?;
        let users: Vec<String> = self
            .records()?
            .into_iter()
            .filter(|r| {
                r.options.volumes.iter().any(|m| m.source == crate::volume::VolumeSource::Named(name.to_owned()))
            })
            .map(|r| r.name)
            .collect();
        Ok(self.volumes().remove(name, &users)?)
    }

    /// Claims `name` for container `id`: a file `<store>/names/NAME` holding the id, made
    /// under the names' lock, so that of two runs asking for one name at the same moment
    /// exactly one gets it. A claim whose container directory is gone (a run killed half way)
    /// is taken over. The returned guard gives the name back unless the container is kept
    /// ([`NameClaim::keep`]).
    fn reserve_name(&self, name: &str, id: &str) -> Result<NameClaim, EngineError> {
        let dir = self.store.root().join("names");
        let _lock = self.names_lock(&dir)?;
        let path = dir.join(name);
        if let Ok(holder) = fs::read_to_string(&path) {
            if self.container_dir(holder.trim()).is_dir() {
                return Err(EngineError::NameInUse(name.to_owned()));
            }
        }
        fs::write(&path, id).map_err(io_err("write", &path))?;
        Ok(NameClaim { path: Some(path), id: id.to_owned() })
    }

    /// The lock every claim and release of a name takes (`<store>/names/.lock`).
    fn names_lock(&self, dir: &Path) -> Result<nix::fcntl::Flock<fs::File>, EngineError> {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let path = dir.join(".lock");
        crate::lock_file(&path, nix::fcntl::FlockArg::LockExclusive).map_err(io_err("lock", &path))
    }

    /// Gives back the name container `id` holds, if it holds it.
    fn release_name(&self, name: &str, id: &str) {
        let dir = self.store.root().join("names");
        let Ok(_lock) = self.names_lock(&dir) else { return };
        let path = dir.join(name);
        if fs::read_to_string(&path).is_ok_and(|holder| holder.trim() == id) {
            let _ = fs::remove_file(&path);
        }
    }

    /// The container's network namespace and `/etc` files for its `--network`, checked before
    /// anything runs: a bridge network must exist (the default one is made when first used),
    /// a `container:` one must run.
    fn net_setup(&self, id: &str, cdir: &Path, opts: &RunOptions) -> Result<spec::NetSetup, EngineError> {
        let hostname = spec::hostname(id, opts);
        let write = |name: &str, text: &str| -> Result<PathBuf, EngineError> {
            let p = cdir.join(name);
            fs::write(&p, text).map_err(io_err("write", &p))?;
            Ok(p)
        };
        let host_file = |path: &str| fs::read_to_string(path).unwrap_or_default();
        Ok(match &opts.network {
            NetworkMode::None => spec::NetSetup {
                namespace: spec::NetNamespace::New,
                files: vec![
                    (write("hosts", &attach::hosts_file(&hostname, None))?, "/etc/hosts"),
                    (write("hostname", &format!("{hostname}\n"))?, "/etc/hostname"),
                ],
            },
            NetworkMode::Bridge(_) | NetworkMode::Cni(_) => {
                match &opts.network {
                    NetworkMode::Bridge(name) if name != DEFAULT_NETWORK => drop(self.networks().get(name)?),
                    NetworkMode::Cni(name) => drop(cni::find(name).map_err(crate::network::NetworkError::from)?),
                    _ => {}
                }
                spec::NetSetup {
                    namespace: spec::NetNamespace::New,
                    files: vec![
                        // Its address goes in once it has one (written in place: the bind stays).
                        (write("hosts", &attach::hosts_file(&hostname, None))?, "/etc/hosts"),
                        (
                            write("resolv.conf", &attach::resolv_conf(&host_file("/etc/resolv.conf")))?,
                            "/etc/resolv.conf",
                        ),
                        (write("hostname", &format!("{hostname}\n"))?, "/etc/hostname"),
                    ],
                }
            }
            NetworkMode::Host => spec::NetSetup {
                namespace: spec::NetNamespace::Host,
                files: vec![
                    (write("hosts", &host_file("/etc/hosts"))?, "/etc/hosts"),
                    (write("resolv.conf", &host_file("/etc/resolv.conf"))?, "/etc/resolv.conf"),
                ],
            },
            NetworkMode::Container(key) => {
                let target = self.find(key)?;
                let Phase::Running { pid } = target.phase else { return Err(EngineError::NotRunning(target.name)) };
                let tdir = self.container_dir(&target.id);
                let files = [("hosts", "/etc/hosts"), ("resolv.conf", "/etc/resolv.conf")]
                    .into_iter()
                    .filter(|(f, _)| tdir.join(f).is_file())
                    .map(|(f, dest)| (tdir.join(f), dest))
                    .collect();
                spec::NetSetup { namespace: spec::NetNamespace::Path(format!("/proc/{pid}/ns/net").into()), files }
            }
        })
    }

    fn networks(&self) -> Networks {
        Networks::new(self.store.root())
    }

    /// For `--network container:NAME`: the namespace of NAME's init as it runs now (a start
    /// after NAME restarted must not join a stale pid's, or a stranger's), written into the
    /// bundle before `create`. Refused when NAME does not run.
    fn resolve_joined_netns(&self, record: &Record) -> Result<(), EngineError> {
        let NetworkMode::Container(key) = &record.options.network else { return Ok(()) };
        let target = self.find(key)?;
        let Phase::Running { pid } = target.phase else { return Err(EngineError::NotRunning(target.name)) };
        let cfg = self.container_dir(&record.id).join("bundle/config.json");
        let bytes = fs::read(&cfg).map_err(io_err("read", &cfg))?;
        let mut spec: oci_spec::runtime::Spec = serde_json::from_slice(&bytes).map_err(|e| EngineError::Io {
            op: "parse",
            path: cfg.clone(),
            source: e.into(),
        })?;
        if let Some(linux) = spec.linux_mut() {
            let mut namespaces = linux.namespaces().clone().unwrap_or_default();
            for ns in namespaces.iter_mut().filter(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network) {
                ns.set_path(Some(format!("/proc/{pid}/ns/net").into()));
            }
            linux.set_namespaces(Some(namespaces));
        }
        let json = serde_json::to_vec_pretty(&spec).expect("a spec always serializes");
        twinbox_image::atomic::write(&cfg, &json, 0o644, false).map_err(io_err("write", &cfg))
    }

    /// The steps between `create` and a running container, the same in the foreground and
    /// detached: its network, its record (now running), then `start`.
    fn network_and_start(&self, record: &mut Record, state: &mut twinbox_runtime::State) -> Result<(), EngineError> {
        self.join_network(record, state.pid)?;
        self.save(record)?;
        self.runtime.start_created(state).map_err(EngineError::from)
    }

    /// Puts a created container (its init is `pid`) on its bridge network, if it has one:
    /// an address, `/etc/hosts` with it, and the veth pair. On error its address is free again.
    fn join_network(&self, record: &mut Record, pid: i32) -> Result<(), EngineError> {
        if let NetworkMode::Cni(name) = &record.options.network {
            let name = name.clone();
            return self.join_cni(record, pid, &name);
        }
        let NetworkMode::Bridge(name) = &record.options.network else { return Ok(()) };
        let nets = self.networks();
        let network = nets.get_or_create_default(name)?;
        nets.ensure_bridge(&network)?;
        // Addresses of containers that are gone (their twinbox was killed) are free again.
        let (network, ip) = nets.allocate(&network.name, &record.id, |c| !self.container_dir(c).exists())?;
        let endpoint = Endpoint::new(&network, ip, &record.id);
        let joined = (|| {
            let hosts = self.container_dir(&record.id).join("hosts");
            let hostname = spec::hostname(&record.id, &record.options);
            rewrite_in_place(&hosts, attach::hosts_file(&hostname, Some(ip)).as_bytes())
                .map_err(io_err("write", &hosts))?;
            attach::connect(&endpoint, &network.bridge, pid)?;
            self.publish(record, ip, pid)
        })();
        if let Err(e) = joined {
            let _ = nets.release(&record.id);
            return Err(e);
        }
        record.endpoint = Some(endpoint);
        self.refresh_hosts(&network.name, Some(record));
        Ok(())
    }

    /// Attaches a created container (its init is `pid`) to CNI network `name` (see
    /// [`cni`]), publishing its ports through the network's portmap plugin; what the removal
    /// needs goes to `<container>/cni.json`. On error nothing stays attached.
    fn join_cni(&self, record: &mut Record, pid: i32, name: &str) -> Result<(), EngineError> {
        let config = cni::find(name).map_err(crate::network::NetworkError::from)?;
        let netns = cni::keep_netns(&record.id, pid).map_err(crate::network::NetworkError::from)?;
        let a = match cni::add(&config, &record.id, &netns, "eth0", &record.options.publish) {
            Ok(a) => a,
            Err(e) => {
                cni::release_netns(&record.id);
                return Err(crate::network::NetworkError::from(e).into());
            }
        };
        let kept = (|| {
            let path = self.container_dir(&record.id).join("cni.json");
            let json = serde_json::to_vec(&a).expect("an attachment serializes");
            twinbox_image::atomic::write(&path, &json, 0o600, false).map_err(io_err("write", &path))?;
            let hosts = self.container_dir(&record.id).join("hosts");
            let hostname = spec::hostname(&record.id, &record.options);
            rewrite_in_place(&hosts, attach::hosts_file(&hostname, a.ipv4().map(|(ip, _)| ip)).as_bytes())
                .map_err(io_err("write", &hosts))
        })();
        if let Err(e) = kept {
            cni::del(&a, &record.id, Some(&netns), "eth0");
            cni::release_netns(&record.id);
            let _ = fs::remove_file(self.container_dir(&record.id).join("cni.json"));
            return Err(e);
        }
        record.ports = record.options.publish.clone();
        Ok(())
    }

    /// Rewrites (in place: the files are bound into the containers) the `/etc/hosts` of every
    /// container on network `name`, each naming all the others. `joining` is a container whose
    /// record is not saved yet.
    fn refresh_hosts(&self, name: &str, joining: Option<&Record>) {
        let mut vms = Vec::new();
        let refreshed = self.networks().with_network(name, |n| {
            let members = self.members(n, joining);
            let names = member_names(&members);
            for (ip, r) in &members {
                let text = attach::network_hosts_file(&spec::hostname(&r.id, &r.options), *ip, &names);
                if r.vm.is_some() {
                    if matches!(r.phase, Phase::Running { .. }) && joining.is_none_or(|j| j.id != r.id) {
                        vms.push((r.clone(), text));
                    }
                    continue;
                }
                let hosts = self.container_dir(&r.id).join("hosts");
                if let Err(e) = rewrite_in_place(&hosts, text.as_bytes()) {
                    tracing::warn!(path = %hosts.display(), error = %e, "cannot update /etc/hosts");
                }
            }
        });
        if let Err(e) = refreshed {
            tracing::warn!(network = name, error = %e, "cannot update the containers' /etc/hosts");
        }
        // The microVMs' through their agents, once the network's lock is given back.
        for (r, text) in vms {
            if let Err(e) = self.vm_hosts(&r, text) {
                tracing::warn!(name = r.name, error = %e, "cannot update the microVM's /etc/hosts");
            }
        }
    }

    /// The instances holding an address on network `n`, with it. `joining` is one whose record
    /// is not saved yet.
    fn members(&self, n: &crate::network::Network, joining: Option<&Record>) -> Vec<(std::net::Ipv4Addr, Record)> {
        let record_of = |id: &str| match joining {
            Some(r) if r.id == id => Some(r.clone()),
            _ => self.stored(id),
        };
        n.addresses.iter().filter_map(|(ip, id)| Some((*ip, record_of(id)?))).collect()
    }

    /// Binds the container's published ports and starts its proxy (see
    /// [`crate::network::publish`]), which ends with the init `pid`.
    fn publish(&self, record: &mut Record, ip: std::net::Ipv4Addr, pid: i32) -> Result<(), EngineError> {
        if record.options.publish.is_empty() {
            return Ok(());
        }
        let proxy = publish::install_proxy(&self.store.root().join("bin"))?;
        let (listeners, bound) = publish::bind(&record.options.publish)?;
        let pidfd = publish::pidfd(pid).map_err(publish::PublishError::Proxy)?;
        // The pidfd then the listeners, as descriptors 3, 4, …
        let mut fds = vec![std::os::fd::AsRawFd::as_raw_fd(&pidfd)];
        fds.extend(listeners.iter().map(std::os::fd::AsRawFd::as_raw_fd));
        let mut cmd = std::process::Command::new(proxy);
        cmd.arg("container-proxy").arg(ip.to_string());
        cmd.args(bound.iter().map(|m| m.container_port.to_string()));
        monitor::spawn_orphan(cmd, &fds).map_err(|e| EngineError::Publish(publish::PublishError::Proxy(e)))?;
        drop((listeners, pidfd));
        // The proxy holds the ports; connections to the host's own addresses go to the
        // container by DNAT, past it. Should nftables refuse, the proxy forwards them.
        if let Err(e) = self.forward_published(&record.id, ip, &bound) {
            // The proxy forwards TCP only: without the rules a UDP port would be dead.
            if bound.iter().any(|m| m.udp) {
                return Err(EngineError::Network(crate::network::NetworkError::Nft(e)));
            }
            tracing::warn!(id = %record.id, error = %e, "published ports go through the proxy only");
        }
        record.ports = bound;
        Ok(())
    }

    /// Container `id`'s DNAT rules for its `ports` (see [`nft::publish_rules`]), after removing
    /// the rules this store left for containers that are gone (their twinbox was killed).
    fn forward_published(&self, id: &str, ip: std::net::Ipv4Addr, ports: &[PortMapping]) -> Result<(), nft::NftError> {
        crate::network::publish::forward_ports(self.store.root(), id, ip, ports, |other| {
            !self.container_dir(other).exists()
        })
    }

    /// Gives back the address a container held and takes its name out of the other
    /// containers' `/etc/hosts` on its network. Its veth pair goes with its namespace: the
    /// kernel removes it once the namespace's last process is gone, a few milliseconds later
    /// and off the command's path (removing it here would add about 20 ms to every
    /// `run --rm` on this host, the time a veth deletion waits for RCU).
    fn leave_network(&self, id: &str, endpoint: Option<&Endpoint>, published: bool) {
        if let Err(e) = self.networks().release(id) {
            tracing::warn!(id, error = %e, "cannot release the container's address");
        }
        // A CNI network's plugins, last first, in the namespace kept for them. Once: `rm -f`
        // and the monitor's exit command of the same container may both get here, and two
        // DELs at once trip over each other's rules. The first takes the file's lock, the
        // second finds the file gone once it has the lock.
        let kept = self.container_dir(id).join("cni.json");
        if let Ok(file) = fs::File::open(&kept) {
            if let Ok(mut locked) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive) {
                let mut bytes = Vec::new();
                if kept.exists() && locked.read_to_end(&mut bytes).is_ok() {
                    let netns = cni::kept_netns(id);
                    match serde_json::from_slice::<cni::Attachment>(&bytes) {
                        Ok(a) => cni::del(&a, id, netns.as_deref(), "eth0"),
                        Err(e) => tracing::warn!(id, error = %e, "unreadable {}", kept.display()),
                    }
                    cni::release_netns(id);
                    let _ = fs::remove_file(&kept);
                }
            }
        }
        // Kept by a join killed before it wrote the file.
        cni::release_netns(id);
        if published {
            // Looked up first: a removal, even of nothing, waits for the kernel's RCU grace
            // period (about 20 ms here), and `rm -f` and the monitor's exit command may both
            // get here.
            if let Err(e) = crate::network::publish::unforward(id) {
                tracing::warn!(id, error = %e, "cannot remove the container's port forwarding rules");
            }
        }
        if let Some(e) = endpoint {
            // A container that joined this one's namespace (`--network container:`) keeps it,
            // and with it the veth pair and the released address: the pair goes now, as Docker
            // takes a stopped container's interface away from its dependents. (Without them
            // the namespace and the pair go with the init, at no cost to this command.)
            let dependent = |r: &Record| match &r.options.network {
                NetworkMode::Container(key) => {
                    matches!(r.phase, Phase::Running { .. }) && (key == id || self.find(key).is_ok_and(|t| t.id == id))
                }
                _ => false,
            };
            if self.records().is_ok_and(|all| all.iter().any(dependent)) {
                if let Err(err) = crate::network::attach::disconnect(e) {
                    tracing::warn!(id, error = %err, "cannot remove the container's veth pair");
                }
            }
            self.refresh_hosts(&e.network, None);
        }
    }

    fn save(&self, r: &Record) -> Result<(), EngineError> {
        let p = self.container_dir(&r.id).join("record.json");
        let json = serde_json::to_vec_pretty(r).expect("a record always serializes");
        twinbox_image::atomic::write(&p, &json, 0o644, false).map_err(io_err("write", &p))
    }

    /// All containers, oldest first.
    pub fn records(&self) -> Result<Vec<Record>, EngineError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))?.flatten() {
            if let Some(mut r) = self.stored(&e.file_name().to_string_lossy()) {
                r.phase = self.live_phase(&r);
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// A record's phase checked against the processes actually running: a container whose
    /// init is gone but whose monitor could not record it shows as exited with code -1.
    fn live_phase(&self, r: &Record) -> Phase {
        match &r.phase {
            Phase::Running { pid } if !runs(*pid) => Phase::Exited { code: -1, oom_killed: false },
            p => p.clone(),
        }
    }

    /// Find a container by full id, unique id prefix or name.
    pub fn find(&self, key: &str) -> Result<Record, EngineError> {
        let all = self.records()?;
        if let Some(r) = all.iter().find(|r| r.id == key || r.name == key) {
            return Ok(r.clone());
        }
        let hits: Vec<&Record> = all.iter().filter(|r| key.len() >= 3 && r.id.starts_with(key)).collect();
        match hits.as_slice() {
            [one] => Ok((*one).clone()),
            _ => Err(EngineError::NoSuchContainer(key.to_owned())),
        }
    }

    /// Run a prepared container in the foreground: its stdio is ours, signals we receive go
    /// to its init, and we return when it exits.
    pub fn run_foreground(&self, mut record: Record) -> Result<Exit, EngineError> {
        let bundle = self.container_dir(&record.id).join("bundle");
        // Block the signals we forward before the container exists, so none is lost.
        let mut forwarded = SigSet::empty();
        for s in FORWARDED {
            forwarded.add(s);
        }
        forwarded.add(Signal::SIGCHLD);
        let old = forwarded
            .thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK)
            .map_err(|e| EngineError::Sys("sigprocmask", e))?;
        // Without --rm the output is kept for `twinbox logs`, as Docker keeps it: the container
        // writes into pipes, and a thread per pipe copies to our own stream and the log. The
        // threads start only once the container exists: `create` clones the init, which must
        // not inherit another thread's locks.
        let mut tee = None;
        // -t: the init opens a pty in the container and sends its master over a socket of
        // ours; a proxy copies between it and our stdio (in raw mode). Its output is not kept
        // for `logs`.
        let console = if record.options.tty {
            forwarded.add(Signal::SIGWINCH);
            let _ = forwarded.thread_block();
            Some(twinbox_runtime::terminal::ConsoleSocket::listen().map_err(io_err("listen on", "a console socket"))?)
        } else {
            None
        };
        let mut proxy = None;
        let result = (|| {
            let stdio = if record.options.rm || console.is_some() {
                None
            } else {
                let (stdio, readers) = self.log_pipes(&record.id)?;
                tee = Some(readers);
                Some(stdio)
            };
            self.resolve_joined_netns(&record)?;
            let opts =
                CreateOptions { stdio, console_socket: console.as_ref().map(|c| c.path.clone()), ..Default::default() };
            let mut state = self.runtime.create(&record.id, &bundle, opts)?;
            if let Some(c) = &console {
                match c.receive() {
                    Ok(master) => proxy = Some(twinbox_runtime::terminal::ConsoleProxy::start(master)),
                    Err(e) => {
                        let _ = self.runtime.delete(&record.id, true);
                        return Err(io_err("receive the terminal of", self.container_dir(&record.id))(e));
                    }
                }
            }
            let copiers = tee.take().map(|(out, err, log)| tee_threads(out, err, log)).unwrap_or_default();
            let pid = Pid::from_raw(state.pid);
            record.phase = Phase::Running { pid: pid.as_raw() };
            let started = self.network_and_start(&mut record, &mut state);
            Ok((
                started.map(|()| {
                    twinbox_runtime::wait_forwarding(pid, &forwarded, proxy.as_ref()).unwrap_or(twinbox_exit::INTERNAL)
                }),
                copiers,
            ))
        })();
        if let Some(p) = proxy.take() {
            p.finish();
        }
        let _ = old.thread_set_mask();
        let (code, copiers) = match result {
            Ok((Ok(code), copiers)) => (code, copiers),
            Ok((Err(e), copiers)) => {
                // The init exists: remove it first, or the copiers wait for its pipes forever.
                let _ = self.runtime.delete(&record.id, true);
                join_all(copiers);
                let _ = self.remove_files(&record.id);
                return Err(e);
            }
            Err(e) => {
                let _ = self.runtime.delete(&record.id, true);
                let _ = self.remove_files(&record.id);
                return Err(e);
            }
        };
        // Removing the container also ends whatever still held the pipes (its pid namespace
        // dies with its init), so the copiers reach end of file.
        let finished = self.finish(record, code);
        join_all(copiers);
        finished
    }

    /// Stdio for a foreground container whose output is also kept in its log: our stdin (or
    /// /dev/null when we have none), and a pipe each for stdout and stderr. Returns the read
    /// ends and the open log for [`tee_threads`].
    fn log_pipes(&self, id: &str) -> Result<([OwnedFd; 3], TeeReaders), EngineError> {
        let log_path = self.container_dir(id).join("log");
        let log =
            fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(io_err("open", &log_path))?;
        let stdin = match io::stdin().as_fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(_) => OwnedFd::from(fs::File::open("/dev/null").map_err(io_err("open", "/dev/null"))?),
        };
        let (out_rd, out_wr) = io::pipe().map_err(io_err("create pipe for", &log_path))?;
        let (err_rd, err_wr) = io::pipe().map_err(io_err("create pipe for", &log_path))?;
        Ok(([stdin, OwnedFd::from(out_wr), OwnedFd::from(err_wr)], (out_rd, err_rd, log)))
    }

    /// After the init exited with `code`: note OOM, delete the runtime container, and either
    /// remove everything (`--rm`) or record the exit.
    fn finish(&self, mut record: Record, code: i32) -> Result<Exit, EngineError> {
        if record.vm.is_some() {
            self.finish_microvm(record, code)?;
            return Ok(Exit { code, oom_killed: false });
        }
        let oom_killed = CgroupManager::new(Some(Path::new(&format!("/twinbox/{}", record.id))), &record.id)
            .ok()
            .and_then(|c| c.oom_kills().ok())
            .is_some_and(|n| n > 0);
        let deleted = self.delete_runtime(&record.id);
        if record.options.rm {
            // Leaves the network too, once.
            self.remove_files(&record.id)?;
        } else {
            let endpoint = record.endpoint.take();
            if endpoint.is_some() || matches!(record.options.network, NetworkMode::Cni(_)) {
                self.leave_network(&record.id, endpoint.as_ref(), !record.options.publish.is_empty());
            }
            record.ports.clear();
            record.phase = Phase::Exited { code, oom_killed };
            self.save(&record)?;
        }
        deleted?;
        Ok(Exit { code, oom_killed })
    }

    fn remove_files(&self, id: &str) -> Result<(), EngineError> {
        let stored = self.stored(id);
        if stored.as_ref().is_some_and(|r| r.vm.is_some()) {
            // A VMM that was killed leaves its socket, and its monitor the VMM's cgroup.
            let _ = fs::remove_file(vm::vsock_path(id));
            crate::vmm::VmmCgroup::remove(id);
        }
        if let Some(r) = &stored {
            self.release_name(&r.name, id);
        }
        let published = stored.as_ref().is_some_and(|r| !r.options.publish.is_empty());
        let endpoint = stored.and_then(|r| r.endpoint);
        self.leave_network(id, endpoint.as_ref(), published);
        self.store.release(id)?;
        remove_tree(&self.container_dir(id)).map_err(EngineError::from)
    }

    /// Start a prepared (or exited) container in the background; returns once it runs (or
    /// failed to). A launcher ([`launch`](Self::launch), the command given to
    /// [`set_launcher`](Self::set_launcher)) creates and starts it as a child of the store's
    /// monitor, which then watches its init.
    pub fn run_detached(&self, record: Record) -> Result<Record, EngineError> {
        self.on_exit.as_deref().filter(|c| !c.is_empty()).ok_or(EngineError::NoExitCommand)?;
        let launcher = self.launcher.as_deref().filter(|c| !c.is_empty()).ok_or(EngineError::NoLaunchCommand)?;
        let program = monitor::install(&self.store.root().join("bin"))?;
        let cdir = self.container_dir(&record.id);
        let (mut rd, wr) = std::io::pipe().map_err(io_err("create pipe for", &cdir))?;
        let null = fs::File::open("/dev/null").map_err(io_err("open", "/dev/null"))?;
        let mut argv = launcher.to_vec();
        argv.push(record.id.clone().into());
        let stderr = io::stderr();
        let outcome = (|| {
            monitor::launch(
                self.store.root(),
                &program,
                &argv,
                &monitor::environment(),
                [null.as_fd(), wr.as_fd(), stderr.as_fd()],
            )?;
            drop((wr, null));
            let mut msg = String::new();
            rd.read_to_string(&mut msg).map_err(io_err("read from the launcher of", &cdir))?;
            match msg.strip_prefix("ok ") {
                Some(pid) => Ok(pid.trim().parse().unwrap_or(0)),
                None if msg.is_empty() => Err(EngineError::Monitor("the launcher ended without a word".into())),
                None => Err(EngineError::Monitor(msg)),
            }
        })();
        match outcome {
            Ok(pid) => {
                let mut now = self.stored(&record.id).unwrap_or(record);
                now.phase = Phase::Running { pid };
                Ok(now)
            }
            Err(e) => {
                // A new container whose launcher never got to it (or died) is removed, as one
                // that failed to start; the launcher has done so itself when it reported.
                if self.stored(&record.id).is_some_and(|r| r.phase == Phase::Created) {
                    let _ = self.remove_files(&record.id);
                }
                Err(e)
            }
        }
    }

    /// The launcher of [`run_detached`](Self::run_detached), run by the store's monitor: the
    /// container `id` created (stdio to its log) and started as this process's child, the
    /// monitor asked to watch it, and the outcome written to stdout (`ok PID`, or the error).
    /// When this process exits, the init becomes the monitor's child. Returns the exit code.
    pub fn launch(&self, id: &str) -> i32 {
        let mut report = io::stdout();
        let Some(mut record) = self.stored(id) else {
            let _ = write!(report, "{}", EngineError::NoSuchContainer(id.to_owned()));
            return 1;
        };
        let log_path = self.container_dir(id).join("log");
        // A new container (run -d) that fails to start is removed; an existing one (start)
        // is kept, exited as it was, with nothing of the failed start left.
        let fresh = matches!(record.phase, Phase::Created);
        let previous = record.phase.clone();
        let setup = (|| -> Result<Pid, EngineError> {
            let log =
                fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(io_err("open", &log_path))?;
            let null = fs::File::open("/dev/null").map_err(io_err("open", "/dev/null"))?;
            let dup = |f: &fs::File| -> Result<OwnedFd, EngineError> {
                f.try_clone().map(OwnedFd::from).map_err(io_err("dup", &log_path))
            };
            let stdio = [OwnedFd::from(null), dup(&log)?, dup(&log)?];
            let bundle = self.container_dir(id).join("bundle");
            self.resolve_joined_netns(&record)?;
            let mut state =
                self.runtime.create(id, &bundle, CreateOptions { stdio: Some(stdio), ..Default::default() })?;
            let pid = Pid::from_raw(state.pid);
            record.phase = Phase::Running { pid: pid.as_raw() };
            // The launcher answers for it until the monitor watches it.
            record.owner = Owner::me();
            if let Err(e) = self.network_and_start(&mut record, &mut state) {
                let _ = self.runtime.delete(id, true);
                return Err(e);
            }
            Ok(pid)
        })();
        let pid = match setup {
            Ok(pid) => pid,
            Err(e) => {
                let _ = write!(report, "{}", twinbox_runtime::container::error_chain(&e));
                let _ = self.runtime.delete(id, true);
                if fresh {
                    let _ = self.remove_files(id);
                } else {
                    self.leave_network(id, record.endpoint.take().as_ref(), !record.options.publish.is_empty());
                    record.ports.clear();
                    record.phase = previous;
                    let _ = self.save(&record);
                }
                return 1;
            }
        };
        let on_exit = self.on_exit.clone().unwrap_or_default();
        let mut command = on_exit;
        command.push(id.into());
        command.push(pid.as_raw().to_string().into());
        let watched = monitor::watch(self.store.root(), pid.as_raw(), &command, &monitor::environment());
        if watched.is_ok() {
            // From here on the store's monitor answers for it.
            record.owner = None;
            let _ = self.save(&record);
        }
        let _ = writeln!(report, "ok {pid}");
        let _ = report.flush();
        let Err(e) = watched else { return 0 };
        // The monitor is gone (killed): watch the container from here instead, with nothing
        // of ours left on the caller's descriptors.
        tracing::warn!(container = id, error = %e, "the store's monitor cannot watch the container; its launcher does");
        if let Ok(null) = fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(&null);
            let _ = nix::unistd::dup2_stderr(&null);
        }
        let code = wait_exit(pid);
        match self.finish(record, code) {
            Ok(_) => 0,
            Err(_) => 1,
        }
    }

    /// Record how a detached container's init `pid` ended (`code` as a shell reports it) and
    /// remove what it leaves (runtime state, cgroup; all of it with `--rm`): what its monitor
    /// has run once the init is gone. `None` when there is nothing to do: the container was
    /// removed meanwhile, or runs again with another init (a late report of an earlier run).
    pub fn exited(&self, id: &str, pid: i32, code: i32) -> Result<Option<Exit>, EngineError> {
        let Some(record) = self.stored(id) else { return Ok(None) };
        if record.phase != (Phase::Running { pid }) {
            return Ok(None);
        }
        self.finish(record, code).map(Some)
    }

    /// Signal a running container's init.
    pub fn kill(&self, key: &str, sig: Signal) -> Result<Record, EngineError> {
        let r = self.find(key)?;
        match r.phase {
            Phase::Running { .. } if r.vm.is_some() => {
                // To the workload through the guest agent, as a container's init gets it; the
                // VMM itself only when the agent does not answer.
                if let Err(e) = self.signal_workload(&r, sig) {
                    tracing::debug!(error = %e, "signalling through the agent failed, signalling the VMM");
                    self.signal_vmm(&r, sig)?;
                }
                Ok(r)
            }
            Phase::Running { .. } => {
                self.runtime.kill(&r.id, sig, false)?;
                Ok(r)
            }
            _ => Err(EngineError::NotRunning(r.name)),
        }
    }

    /// SIGTERM, then SIGKILL after `timeout`; returns when it has exited.
    pub fn stop(&self, key: &str, timeout: std::time::Duration) -> Result<Record, EngineError> {
        let r = self.find(key)?;
        let Phase::Running { pid } = r.phase else { return Ok(r) };
        let pid = Pid::from_raw(pid);
        if r.vm.is_some() {
            // SIGTERM to the workload through the guest agent (the VM ends with it), else to
            // the VMM, which stops the VM; SIGKILL to the VMM after the timeout. The VMM
            // records the exit itself.
            if self.signal_workload(&r, Signal::SIGTERM).is_err() {
                let _ = self.signal_vmm(&r, Signal::SIGTERM);
            }
            if !wait_gone(pid, timeout) {
                // SIGKILL to the workload (137, as a container's); the VMM only if that fails,
                // and then its exit is recorded here.
                let killed = self.signal_workload(&r, Signal::SIGKILL).is_ok()
                    && wait_gone(pid, std::time::Duration::from_secs(10));
                if !killed {
                    self.kill_vmm(&r);
                    if let Some(now) = self.stored(&r.id).filter(|s| matches!(s.phase, Phase::Running { .. })) {
                        self.finish_microvm(now, 128 + Signal::SIGKILL as i32)?;
                    }
                }
            }
        } else {
            let _ = self.runtime.kill(&r.id, Signal::SIGTERM, false);
            if !wait_gone(pid, timeout) {
                let _ = self.runtime.kill(&r.id, Signal::SIGKILL, true);
                wait_gone(pid, std::time::Duration::from_secs(10));
            }
        }
        // Wait for the monitor to record the exit code (the live view already says exited).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            match self.stored(&r.id) {
                Some(now) if matches!(now.phase, Phase::Running { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                _ => break,
            }
        }
        self.find(&r.id).or(Ok(r))
    }

    /// The record as last written, without checking the processes.
    fn stored(&self, id: &str) -> Option<Record> {
        let bytes = fs::read(self.container_dir(id).join("record.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Remove a container; `force` kills it first if it runs.
    pub fn remove(&self, key: &str, force: bool) -> Result<Record, EngineError> {
        let r = self.find(key)?;
        if let Phase::Running { pid } = r.phase {
            if !force {
                return Err(EngineError::Running(r.name));
            }
            if r.vm.is_some() {
                self.kill_vmm(&r);
            } else {
                let _ = self.runtime.kill(&r.id, Signal::SIGKILL, true);
                wait_gone(Pid::from_raw(pid), std::time::Duration::from_secs(10));
            }
        }
        if r.vm.is_none() {
            self.delete_runtime(&r.id)?;
        }
        self.remove_files(&r.id)?;
        Ok(r)
    }

    /// Deletes container `id` from the runtime, killing what runs: also one whose create was
    /// killed before the runtime wrote its state (an init waiting on exec.fifo, its cgroup, a
    /// state directory the runtime does not list), through the cgroup every container of the
    /// engine gets (`/twinbox/<id>`, which the init is cloned into).
    pub(crate) fn delete_runtime(&self, id: &str) -> Result<(), EngineError> {
        match self.runtime.delete(id, true) {
            Ok(()) => Ok(()),
            Err(RuntimeError::NotFound { .. }) => {
                if let Ok(cg) = CgroupManager::new(Some(Path::new(&format!("/twinbox/{id}"))), id) {
                    if let Err(e) = cg.destroy() {
                        tracing::warn!(id, error = %e, "cannot remove the cgroup of a half-made container");
                    }
                }
                let dir = self.runtime.state_dir(id);
                match fs::remove_dir_all(&dir) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &dir)(e)),
                    _ => Ok(()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Puts right what twinbox commands that were killed left (`twinbox system prune`): a
    /// container whose create was cut short is removed with its init, cgroup, runtime state,
    /// name and hold; one whose init has ended with nobody left to record it (its foreground
    /// `run` was killed, or the store's monitor) is finished as exited with an unknown code,
    /// and removed when it was run with `--rm`. What it did, one line each.
    pub fn reconcile(&self) -> Result<Vec<String>, EngineError> {
        let mut done = Vec::new();
        // Volumes half made or half removed by a killed command.
        self.volumes().reconcile();
        let monitor_runs = monitor::running(self.store.root());
        for r in self.records()? {
            let Some(stored) = self.stored(&r.id) else { continue };
            let owner_gone = stored.owner.as_ref().is_some_and(|o| !o.alive());
            // Recorded as running, but killed before its start: the init waits on exec.fifo.
            let never_started = owner_gone
                && matches!(r.phase, Phase::Running { .. })
                && matches!(self.runtime.state(&r.id), Ok(s) if s.status == twinbox_runtime::Status::Created);
            match (&stored.phase, &r.phase) {
                (Phase::Created, _) | (Phase::Running { .. }, Phase::Running { .. })
                    if (owner_gone || (stored.owner.is_none() && !monitor_runs))
                        && (stored.phase == Phase::Created || never_started) =>
                {
                    if r.vm.is_none() {
                        self.delete_runtime(&r.id)?;
                    }
                    self.remove_files(&r.id)?;
                    done.push(format!(
                        "removed {} ({}): its twinbox was killed while creating it",
                        r.name,
                        &r.id[..12]
                    ));
                }
                (Phase::Running { .. }, Phase::Exited { .. })
                    if owner_gone || (stored.owner.is_none() && !monitor_runs) =>
                {
                    let rm = stored.options.rm;
                    self.finish(stored, -1)?;
                    done.push(if rm {
                        format!("removed {} ({}): it ended with nobody left to record it (--rm)", r.name, &r.id[..12])
                    } else {
                        format!(
                            "{} ({}) ended with nobody left to record it: exited, code unknown",
                            r.name,
                            &r.id[..12]
                        )
                    });
                }
                _ => {}
            }
        }
        // Directories whose command was killed before it saved their record (see DirGuard).
        for e in fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))?.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            // A lock left with no directory (killed between the two): removed once nobody holds it.
            if let Some(of) = id.strip_prefix('.').and_then(|n| n.strip_suffix(".creating")) {
                if take_unheld(&e.path()).is_ok() && !self.dir.join(of).exists() {
                    let _ = fs::remove_file(e.path());
                }
                continue;
            }
            if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || e.path().join("record.json").exists() {
                continue;
            }
            let lock_path = creating_lock_path(&e.path());
            // Held: its command is making it.
            let Ok(lock) = take_unheld(&lock_path) else { continue };
            // Saved in the meantime (its creator unlocks only after saving).
            if e.path().join("record.json").exists() {
                continue;
            }
            self.remove_files(&id)?;
            let _ = fs::remove_file(&lock_path);
            drop(lock);
            done.push(format!("removed {}: its twinbox was killed before recording it", &id[..12]));
        }
        Ok(done)
    }

    /// Start an exited (or created) container again, detached.
    pub fn start(&self, key: &str) -> Result<Record, EngineError> {
        let r = self.find(key)?;
        if matches!(r.phase, Phase::Running { .. }) {
            return Ok(r);
        }
        if r.vm.is_some() {
            return self.launch_detached(r);
        }
        match self.runtime.delete(&r.id, true) {
            Ok(()) | Err(RuntimeError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.run_detached(r)
    }

    /// Run another process in a running container (`twinbox exec`); returns its exit code.
    /// `opts.env` adds to the container's environment; `workdir` and `user` replace the
    /// container's. Its stdout and stderr are ours; its stdin ours with `interactive`, else
    /// /dev/null. With `tty` it gets a pty of its own instead, whose output we copy to our
    /// stdout (and our stdin to it with `interactive`, in raw mode while it runs).
    pub fn exec(&self, key: &str, argv: &[String], opts: &ExecOptions) -> Result<i32, EngineError> {
        let r = self.find(key)?;
        if !matches!(r.phase, Phase::Running { .. }) {
            return Err(EngineError::NotRunning(r.name));
        }
        if r.vm.is_some() {
            return self.exec_vm(&r, argv, opts);
        }
        let state = self.runtime.state(&r.id)?;
        let mut process = state.config.process().clone().unwrap_or_default();
        process.set_args(Some(argv.to_vec()));
        process.set_terminal(Some(opts.tty));
        // The pty is made with our size before the process runs (the proxy's resize comes
        // after it started, too late for a `stty size`).
        process.set_console_size(
            twinbox_runtime::terminal::our_size().filter(|_| opts.tty).and_then(|(rows, cols)| {
                oci_spec::runtime::BoxBuilder::default().height(rows).width(cols).build().ok()
            }),
        );
        let mut vars = process.env().clone().unwrap_or_default();
        for kv in &opts.env {
            let key = kv.split('=').next().unwrap_or_default();
            vars.retain(|e| e.split('=').next() != Some(key));
            vars.push(kv.clone());
        }
        process.set_env(Some(vars));
        if let Some(w) = &opts.workdir {
            process.set_cwd(w.into());
        }
        if let Some(u) = &opts.user {
            let image = self.store.resolve(&r.image_digest)?;
            let layers = self.store.unpacked_layers(&image)?;
            let (uid, gid, additional) = twinbox_image::launch::resolve_user(u, &layers)?;
            let mut user = process.user().clone();
            user.set_uid(uid);
            user.set_gid(gid);
            user.set_additional_gids(Some(additional));
            process.set_user(user);
        }
        if opts.tty {
            return self.exec_terminal(&r, &process, opts.interactive);
        }
        let stdio = exec_stdio(opts.interactive)?;
        let run = twinbox_runtime::container::ExecOptions { stdio: Some(stdio), ..Default::default() };
        let pid = self.runtime.exec(&r.id, &process, run)?;
        Ok(wait_exit(pid))
    }

    /// `exec -t`: the process opens a pty in the container and sends us its master over a
    /// console socket of ours; a proxy copies its output to our stdout (and our stdin to it
    /// when `input`). Signals we receive go to the process, SIGWINCH resizes the pty.
    fn exec_terminal(&self, r: &Record, process: &oci_spec::runtime::Process, input: bool) -> Result<i32, EngineError> {
        use twinbox_runtime::terminal::{ConsoleProxy, ConsoleSocket};
        let console = ConsoleSocket::listen().map_err(io_err("listen on", "a console socket"))?;
        let mut forwarded = SigSet::empty();
        for s in FORWARDED {
            forwarded.add(s);
        }
        forwarded.add(Signal::SIGWINCH);
        forwarded.add(Signal::SIGCHLD);
        let old = forwarded
            .thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK)
            .map_err(|e| EngineError::Sys("sigprocmask", e))?;
        let result = (|| {
            let run = twinbox_runtime::container::ExecOptions {
                console_socket: Some(console.path.clone()),
                ..Default::default()
            };
            let pid = self.runtime.exec(&r.id, process, run)?;
            let master = match console.receive() {
                Ok(m) => m,
                Err(e) => {
                    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                    wait_exit(pid);
                    return Err(io_err("receive the terminal of an exec in", self.container_dir(&r.id))(e));
                }
            };
            // Our terminal gets its modes back when the proxy is dropped, on every path.
            let proxy = if input { ConsoleProxy::start(master) } else { ConsoleProxy::output_only(master) };
            let code =
                twinbox_runtime::wait_forwarding(pid, &forwarded, Some(&proxy)).unwrap_or(twinbox_exit::INTERNAL);
            // A child it left in the background may hold the pty for as long as it likes.
            proxy.finish_within(std::time::Duration::from_millis(500));
            Ok(code)
        })();
        let _ = old.thread_set_mask();
        result
    }

    /// Path of a container's log (absent for a foreground `--rm` run, whose output is not kept).
    pub fn log_path(&self, key: &str) -> Result<PathBuf, EngineError> {
        Ok(self.container_dir(&self.find(key)?.id).join("log"))
    }
}

/// Signals `twinbox run` passes on to the container's init.
pub const FORWARDED: [Signal; 6] =
    [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2];

/// The read ends of a foreground container's stdout and stderr pipes, and its log.
type TeeReaders = (io::PipeReader, io::PipeReader, fs::File);

/// The names each member answers to in the others' /etc/hosts: its name, and its hostname
/// when that differs.
fn member_names(members: &[(std::net::Ipv4Addr, Record)]) -> Vec<(std::net::Ipv4Addr, Vec<String>)> {
    members
        .iter()
        .map(|(ip, r)| {
            let hostname = spec::hostname(&r.id, &r.options);
            let mut names = vec![r.name.clone()];
            if hostname != r.name {
                names.push(hostname);
            }
            (*ip, names)
        })
        .collect()
}

/// One thread per pipe copying to our stdout or stderr and to the log. When our stream is
/// closed (`twinbox run … | head`), that thread stops reading, so the container gets EPIPE
/// as it would writing to the closed stream itself.
fn tee_threads(out: io::PipeReader, err: io::PipeReader, log: fs::File) -> Vec<std::thread::JoinHandle<()>> {
    let log = std::sync::Arc::new(std::sync::Mutex::new(log));
    let spawn = |mut rd: io::PipeReader, to_stderr: bool| {
        let log = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                let n = match rd.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                if let Ok(mut f) = log.lock() {
                    let _ = f.write_all(&buf[..n]);
                }
                let written = if to_stderr {
                    io::stderr().lock().write_all(&buf[..n])
                } else {
                    let mut o = io::stdout().lock();
                    o.write_all(&buf[..n]).and_then(|()| o.flush())
                };
                if written.is_err_and(|e| e.kind() == io::ErrorKind::BrokenPipe) {
                    break;
                }
            }
        })
    };
    vec![spawn(out, false), spawn(err, true)]
}

fn join_all(threads: Vec<std::thread::JoinHandle<()>>) {
    for t in threads {
        let _ = t.join();
    }
}

/// Stdio for a process `exec` starts without a terminal: our stdin when `interactive` (or
/// /dev/null when we have none), else /dev/null; copies of our stdout and stderr.
fn exec_stdio(interactive: bool) -> Result<[OwnedFd; 3], EngineError> {
    let null = || -> Result<OwnedFd, EngineError> {
        Ok(OwnedFd::from(fs::File::open("/dev/null").map_err(io_err("open", "/dev/null"))?))
    };
    let ours = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().ok();
    let stdin = match interactive.then(|| ours(io::stdin().as_fd())).flatten() {
        Some(fd) => fd,
        None => null()?,
    };
    let stdout = match ours(io::stdout().as_fd()) {
        Some(fd) => fd,
        None => null()?,
    };
    let stderr = match ours(io::stderr().as_fd()) {
        Some(fd) => fd,
        None => null()?,
    };
    Ok([stdin, stdout, stderr])
}

fn wait_exit(pid: Pid) -> i32 {
    loop {
        match waitpid(pid, None) {
            Ok(s) => {
                if let Some(code) = twinbox_runtime::exit_code(s) {
                    return code;
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return -1,
        }
    }
}

/// Wait until `pid` is gone or a zombie (the runtime's check, which also notices a reused pid).
fn wait_gone(pid: Pid, timeout: std::time::Duration) -> bool {
    match twinbox_runtime::state::ProcStat::read(pid.as_raw()) {
        Some(st) => twinbox_runtime::container::wait_gone(pid.as_raw(), st.start_time, timeout),
        None => true,
    }
}

/// Replaces a file's content keeping its inode (it is bound into a container, where a rename
/// would not be seen): the new bytes over the old, then the length cut, so a reader never
/// finds it empty.
fn rewrite_in_place(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(bytes)?;
    f.set_len(bytes.len() as u64)
}

/// A random 64-hex container id.
pub(crate) fn new_id() -> String {
    let mut b = [0u8; 32];
    if fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        b[..16].copy_from_slice(&t.to_le_bytes());
        b[16..20].copy_from_slice(&std::process::id().to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A name claimed by [`Engine::reserve_name`]; given back when dropped unless kept (the
/// claim's file holds the id, and a later claim by another container is never removed: a
/// stale one is only overwritten under the lock).
struct NameClaim {
    path: Option<PathBuf>,
    id: String,
}

impl NameClaim {
    fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for NameClaim {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            if fs::read_to_string(p).is_ok_and(|holder| holder.trim() == self.id) {
                let _ = fs::remove_file(p);
            }
        }
    }
}

/// A container name: Docker's rule, at most 128 bytes.
fn valid_name(name: &str) -> bool {
    crate::valid_name(name, 128)
}

/// Removes a half-made container directory unless forgotten.
/// A container directory being made: removed again unless [`kept`](DirGuard::kept) once its
/// record is saved. Its creator holds `<containers>/.<id>.creating` locked from before the
/// directory exists until then, so a directory without a record whose lock nobody holds was
/// left by a killed command ([`Engine::reconcile`] removes it).
struct DirGuard {
    dir: PathBuf,
    lock_path: PathBuf,
    _lock: nix::fcntl::Flock<fs::File>,
}

impl DirGuard {
    fn new(dir: PathBuf) -> Result<Self, EngineError> {
        let lock_path = creating_lock_path(&dir);
        let file = fs::File::create(&lock_path).map_err(io_err("create", &lock_path))?;
        let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| EngineError::Sys("locking a new container's directory", e))?;
        Ok(DirGuard { dir, lock_path, _lock })
    }

    /// The record is saved: the directory stays, the lock goes.
    fn kept(mut self) {
        self.dir = PathBuf::new();
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if !self.dir.as_os_str().is_empty() {
            let _ = remove_tree(&self.dir);
        }
        let _ = fs::remove_file(&self.lock_path);
    }
}

/// The lock file at `path`, taken when nobody holds it (`Ok(None)`: there is none); `Err`
/// while another process holds it.
fn take_unheld(path: &Path) -> Result<Option<nix::fcntl::Flock<fs::File>>, ()> {
    match fs::File::open(path) {
        Ok(f) => nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map(Some).map_err(|_| ()),
        Err(_) => Ok(None),
    }
}

/// `<containers>/.<id>.creating` for the container directory `dir`.
fn creating_lock_path(dir: &Path) -> PathBuf {
    let id = dir.file_name().unwrap_or_default().to_string_lossy();
    dir.with_file_name(format!(".{id}.creating"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A container directory whose command was killed before it saved the record goes at the
    /// next reconcile, with its lock; one still being made (its lock held) stays, and so does
    /// nothing else.
    #[test]
    fn a_directory_no_command_recorded_is_removed_unless_being_made() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("store")).unwrap();
        let engine = Engine::new(store, tmp.path().join("runtime")).unwrap();
        let dead = engine.container_dir(&"a".repeat(64));
        fs::create_dir_all(dead.join("bundle/rootfs")).unwrap();
        // Its creator died holding it: the file stays, its lock went with the process.
        fs::File::create(creating_lock_path(&dead)).unwrap();
        let live = DirGuard::new(engine.container_dir(&"b".repeat(64))).unwrap();
        fs::create_dir_all(&live.dir).unwrap();
        // Killed between the lock and the directory.
        let stray = creating_lock_path(&engine.container_dir(&"c".repeat(64)));
        fs::File::create(&stray).unwrap();
        let done = engine.reconcile().unwrap();
        assert_eq!(done, [format!("removed {}: its twinbox was killed before recording it", "a".repeat(12))]);
        assert!(!dead.exists() && !creating_lock_path(&dead).exists() && !stray.exists());
        assert!(live.dir.exists() && live.lock_path.exists(), "one being made stays");
        let live_dir = live.dir.clone();
        drop(live);
        assert!(!live_dir.exists(), "its own guard removes it on error");
    }
}

//! `runc` and `crun`, given an OCI bundle made from the same image: the flattened rootfs and
//! `oci_spec::runtime::Spec::default()` with the workload's arguments.
//!
//! crun refuses this project's cgroup v1/v2 hybrid hosts, so on those it runs in a private
//! mount namespace with a tmpfs over /sys/fs/cgroup/unified, set up in the forked child before
//! exec (crun pays an unshare, not another program start) — as runtime/runc/benches/start.rs does.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{
    is_root, own_process_group, run_quiet, Backend, BackendError, Instance, Isolation, PreparedImage, Publish,
    Unavailable, Workload,
};
use crate::host::{tool_version, which};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OciRuntime {
    Runc,
    Crun,
}

impl OciRuntime {
    fn name(self) -> &'static str {
        match self {
            OciRuntime::Runc => "runc",
            OciRuntime::Crun => "crun",
        }
    }
}

#[derive(Debug)]
pub struct Oci {
    runtime: OciRuntime,
    exe: Option<PathBuf>,
    hide_unified: bool,
    image: Option<PreparedImage>,
    state: PathBuf,
    /// The CNI attachments of the servers that run, by instance id.
    attached: std::sync::Mutex<std::collections::HashMap<String, super::cni::Attachment>>,
}

impl Oci {
    pub fn new(runtime: OciRuntime) -> Self {
        let hybrid = matches!(
            twinbox_runtime::cgroups::detect(Path::new("/sys/fs/cgroup")),
            Ok(twinbox_runtime::cgroups::Layout::Hybrid)
        );
        Oci {
            runtime,
            exe: which(runtime.name()),
            hide_unified: runtime == OciRuntime::Crun && hybrid,
            image: None,
            state: PathBuf::new(),
            attached: Default::default(),
        }
    }

    fn base(&self) -> Command {
        let mut cmd = Command::new(self.exe.as_ref().expect("available() before use"));
        cmd.arg("--root").arg(&self.state);
        own_process_group(&mut cmd);
        if self.hide_unified {
            hide_unified_cgroup2(&mut cmd);
        }
        cmd
    }

    /// The host directory bound in as the `disk` scenario's volume: on the store's file
    /// system, as twinbox's volumes are (the scratch directory may be a tmpfs).
    fn disk_volume_dir(&self, store: &Path) -> PathBuf {
        store.join(".bench-disk").join(format!("{}-volume", self.runtime.name()))
    }

    /// Instance `id`'s bundle directory.
    fn bundle_dir(&self, id: &str) -> PathBuf {
        let image = self.image.as_ref().expect("prepare() before use");
        image.work.join("bundles").join(format!("{}-{id}", self.runtime.name()))
    }

    /// A bundle per instance: config.json only; the root is the shared flattened rootfs. With
    /// `netns`, the container joins that network namespace instead of a new one.
    fn bundle(&self, workload: &Workload, id: &str, netns: Option<&Path>) -> Result<PathBuf, BackendError> {
        let image = self.image.as_ref().expect("prepare() before use");
        let dir = self.bundle_dir(id);
        let write_err = |source| BackendError::Write { path: dir.clone(), source };
        std::fs::create_dir_all(&dir).map_err(write_err)?;
        let mut spec = bundle_spec(&image.rootfs, &image.argv(workload));
        if let Some(path) = netns {
            join_netns(&mut spec, path);
        }
        if let (Workload::Own, Some(f)) = (workload, &image.foreign) {
            own_process(&mut spec, &f.process);
        }
        if let Workload::Disk { volume, .. } = workload {
            // The root writable (the shared flattened directory, written in place: no overlay),
            // and for the volume a directory of the host bound in, as a volume is.
            if let Some(root) = spec.root_mut() {
                root.set_readonly(Some(false));
            }
            if *volume {
                let host = self.disk_volume_dir(&image.store_root);
                std::fs::create_dir_all(&host).map_err(|source| BackendError::Write { path: host.clone(), source })?;
                let mut mounts = spec.mounts().clone().unwrap_or_default();
                mounts.push(
                    oci_spec::runtime::MountBuilder::default()
                        .destination(super::DISK_VOLUME_PATH)
                        .typ("bind")
                        .source(host)
                        .options(vec!["rbind".to_string(), "rw".to_string()])
                        .build()
                        .expect("mount fields set"),
                );
                spec.set_mounts(Some(mounts));
            }
        }
        let json = serde_json::to_vec_pretty(&spec).expect("a runtime spec always serializes");
        std::fs::write(dir.join("config.json"), json).map_err(write_err)?;
        Ok(dir)
    }
}

/// The default spec (namespaces, mounts, capabilities as runc's `spec` gives), with `args`,
/// no terminal, and `rootfs` (absolute) as the root.
pub fn bundle_spec(rootfs: &Path, args: &[String]) -> oci_spec::runtime::Spec {
    let mut spec = oci_spec::runtime::Spec::default();
    let mut p = spec.process().clone().unwrap_or_default();
    p.set_args(Some(args.to_vec()));
    p.set_terminal(Some(false));
    spec.set_process(Some(p));
    spec.set_hostname(Some("bench".into()));
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs.to_owned());
    spec.set_root(Some(root));
    spec
}

/// The image's own process in `spec`, as a container engine makes it from the image's config
/// (umoci, containerd): its environment, working directory and user, and a writable root, as
/// a service expects its root to be (a pid file, a cache); the root is the shared flattened
/// directory, written in place.
fn own_process(spec: &mut oci_spec::runtime::Spec, launch: &twinbox_image::launch::Launch) {
    let mut p = spec.process().clone().unwrap_or_default();
    p.set_env(Some(launch.env.clone()));
    p.set_cwd(launch.cwd.clone().into());
    let mut user = p.user().clone();
    user.set_uid(launch.uid);
    user.set_gid(launch.gid);
    user.set_additional_gids((!launch.additional_gids.is_empty()).then(|| launch.additional_gids.clone()));
    p.set_user(user);
    spec.set_process(Some(p));
    if let Some(root) = spec.root_mut() {
        root.set_readonly(Some(false));
    }
}

/// Makes `spec`'s network namespace the one at `path`.
fn join_netns(spec: &mut oci_spec::runtime::Spec, path: &Path) {
    use oci_spec::runtime::LinuxNamespaceType;
    let Some(linux) = spec.linux_mut() else { return };
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    for ns in &mut namespaces {
        if ns.typ() == LinuxNamespaceType::Network {
            ns.set_path(Some(path.to_owned()));
        }
    }
    linux.set_namespaces(Some(namespaces));
}

/// Run `cmd` in its own mount namespace with a tmpfs over /sys/fs/cgroup/unified, so crun
/// sees a plain cgroup v1 host instead of the hybrid it refuses.
fn hide_unified_cgroup2(cmd: &mut Command) {
    use nix::mount::{mount, MsFlags};
    // SAFETY: the closure runs between fork and exec and makes only async-signal-safe system
    // calls (unshare, mount); it allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)?;
            mount(Some("tmpfs"), "/sys/fs/cgroup/unified", Some("tmpfs"), MsFlags::empty(), None::<&str>)?;
            Ok(())
        });
    }
}

impl Backend for Oci {
    fn name(&self) -> &'static str {
        self.runtime.name()
    }

    fn isolation(&self) -> Isolation {
        Isolation::Container
    }

    fn available(&self) -> Result<(), Unavailable> {
        if self.exe.is_none() {
            return Err(Unavailable::new(format!("{0} not on PATH (apt-get install {0})", self.runtime.name())));
        }
        if !is_root() {
            return Err(Unavailable::new("needs root (namespaces, cgroups)"));
        }
        Ok(())
    }

    fn version(&self) -> Option<String> {
        self.exe.as_deref().and_then(tool_version)
    }

    fn note(&self) -> Option<String> {
        let how = format!(
            "`{} run -b BUNDLE ID`, bundle = flattened image + default config.json (no seccomp profile)",
            self.runtime.name()
        );
        Some(if self.hide_unified {
            format!(
                "{how}; crun refuses the cgroup v1/v2 hybrid, so it runs in a private mount namespace with a tmpfs \
                 over /sys/fs/cgroup/unified (set up before exec)"
            )
        } else {
            how
        })
    }

    fn prepare(&mut self, image: &PreparedImage) -> Result<(), BackendError> {
        self.state = image.work.join(format!("state-{}", self.runtime.name()));
        std::fs::create_dir_all(&self.state)
            .map_err(|source| BackendError::Write { path: self.state.clone(), source })?;
        self.image = Some(image.clone());
        Ok(())
    }

    fn run_command(&self, workload: &Workload, id: &str) -> Result<Command, BackendError> {
        let bundle = self.bundle(workload, id, None)?;
        let mut cmd = self.base();
        cmd.arg("run").arg("-b").arg(bundle).arg(id);
        Ok(cmd)
    }

    fn cleanup_run(&self, id: &str) {
        let mut cmd = self.base();
        cmd.args(["delete", "--force", id]);
        let _ = run_quiet(cmd, "delete");
    }

    fn launch(&self, workload: &Workload, id: &str) -> Result<Instance, BackendError> {
        let bundle = self.bundle(workload, id, None)?;
        let mut cmd = self.base();
        cmd.arg("run").arg("-d").arg("-b").arg(bundle).arg(id);
        cmd.stdin(Stdio::null());
        run_quiet(cmd, &format!("{} run -d", self.runtime.name()))?;
        Ok(Instance { id: id.to_owned(), child: None })
    }

    fn teardown(&self, instance: &mut Instance) -> Result<(), BackendError> {
        let mut cmd = self.base();
        cmd.args(["delete", "--force", &instance.id]);
        let deleted = run_quiet(cmd, &format!("{} delete --force", self.runtime.name()));
        let attachment = self.attached.lock().unwrap_or_else(|e| e.into_inner()).remove(&instance.id);
        if let Some(a) = attachment {
            super::cni::detach(a);
        }
        deleted
    }

    fn serves(&self) -> bool {
        super::cni::available().is_ok()
    }

    fn net_cleanup(&self) {
        if self.attached.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            super::cni::remove_bridge();
        }
    }

    fn launch_server(&self, id: &str, host_port: u16) -> Result<Option<Instance>, BackendError> {
        if super::cni::available().is_err() {
            return Ok(None);
        }
        let image = self.image.as_ref().expect("prepare() before use");
        let a = super::cni::attach(&image.work, id, host_port, super::SERVER_PORT)?;
        let launched = (|| {
            let bundle = self.bundle(&Workload::Serve(super::SERVER_PORT), id, Some(&a.netns))?;
            let mut cmd = self.base();
            cmd.arg("run").arg("-d").arg("-b").arg(bundle).arg(id);
            run_quiet(cmd, &format!("{} run -d", self.runtime.name()))
        })();
        if let Err(e) = launched {
            super::cni::detach(a);
            return Err(e);
        }
        self.attached.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_owned(), a);
        Ok(Some(Instance { id: id.to_owned(), child: None }))
    }

    fn launch_image(&self, id: &str, publish: Option<Publish>) -> Result<Option<Instance>, BackendError> {
        let image = self.image.as_ref().expect("prepare() before use");
        let a = match publish {
            Some(p) if super::cni::available().is_ok() => Some(super::cni::attach(&image.work, id, p.host, p.port)?),
            Some(_) => return Ok(None),
            None => None,
        };
        let launched = (|| {
            let bundle = self.bundle(&Workload::Own, id, a.as_ref().map(|a| a.netns.as_path()))?;
            let mut cmd = self.base();
            cmd.arg("run").arg("-d").arg("-b").arg(&bundle).arg(id);
            // Detached, the container's stdio is the runtime's own (pass-through): its output.
            super::run_logged(cmd, &format!("{} run -d", self.runtime.name()), &bundle.join("output"))
        })();
        if let Err(e) = launched {
            if let Some(a) = a {
                super::cni::detach(a);
            }
            return Err(e);
        }
        if let Some(a) = a {
            self.attached.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_owned(), a);
        }
        Ok(Some(Instance { id: id.to_owned(), child: None }))
    }

    fn output_path(&self, instance: &Instance) -> Option<PathBuf> {
        self.image.as_ref().map(|_| self.bundle_dir(&instance.id).join("output"))
    }

    /// The init's pid from `runc state` (crun's likewise), while it runs.
    fn instance_pids(&self, instance: &Instance) -> Vec<u32> {
        let mut cmd = self.base();
        cmd.args(["state", &instance.id]).stdin(Stdio::null()).stderr(Stdio::null());
        let Ok(out) = cmd.output() else { return Vec::new() };
        let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let running = state["status"].as_str().is_some_and(|s| s == "running" || s == "created");
        match state["pid"].as_u64() {
            Some(pid) if running && pid > 0 => vec![pid as u32],
            _ => Vec::new(),
        }
    }

    fn run_published(&self, id: &str, host_port: u16) -> Result<Option<std::time::Duration>, BackendError> {
        if super::cni::available().is_err() {
            return Ok(None);
        }
        let image = self.image.as_ref().expect("prepare() before use");
        let t0 = std::time::Instant::now();
        let a = super::cni::attach(&image.work, id, host_port, super::SERVER_PORT)?;
        let ran = (|| {
            let bundle = self.bundle(&Workload::True, id, Some(&a.netns))?;
            let mut cmd = self.base();
            cmd.arg("run").arg("-b").arg(bundle).arg(id);
            run_quiet(cmd, &format!("{} run", self.runtime.name()))
        })();
        super::cni::detach(a);
        ran?;
        Ok(Some(t0.elapsed()))
    }

    fn exec_command(&self, id: &str) -> Option<Command> {
        let mut cmd = self.base();
        cmd.args(["exec", id, "/hello", "exit", "0"]);
        Some(cmd)
    }

    fn disk_note(&self) -> String {
        "the shared flattened root directory itself (in the bench's scratch directory), written in place (no \
         overlay); a directory on the store's file system bound in"
            .into()
    }

    fn disk_cleanup(&self) {
        if let Some(image) = &self.image {
            let dir = self.disk_volume_dir(&image.store_root);
            let _ = std::fs::remove_dir_all(&dir);
            if let Some(parent) = dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }

    fn serve_note(&self) -> String {
        format!(
            "a network namespace attached by the CNI bridge (host-local, ipMasq, the plugin's default MTU of 1500) \
             and portmap plugins of {}, 127.0.0.1:PORT → 8080",
            super::cni::PLUGIN_DIR
        )
    }
}

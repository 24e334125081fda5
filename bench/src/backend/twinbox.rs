//! `twinbox-container`: the `twinbox` CLI itself (`twinbox run --rm hello:latest …`), so what
//! is measured is what a user types: image lookup, overlay set-up, the runtime, cleanup.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{
    is_root, own_process_group, run_quiet, Backend, BackendError, Instance, Isolation, PreparedImage, Publish,
    Unavailable, Workload,
};

/// The engine of the store at `root`, to look instances up by name (their records and logs).
/// The runtime root plays no part in that; it is the CLI's all the same.
fn engine(root: &Path) -> Option<twinbox_engine::Engine> {
    let store = twinbox_image::Store::open(root).ok()?;
    let runtime = std::env::var_os("TWINBOX_RUNTIME_ROOT").unwrap_or_else(|| "/run/twinbox/runtime".into());
    twinbox_engine::Engine::new(store, PathBuf::from(runtime)).ok()
}

/// Where the twinbox instance `name` of the store at `root` writes its output (`twinbox logs`).
pub(crate) fn log_path(root: &Path, name: &str) -> Option<PathBuf> {
    engine(root)?.log_path(name).ok()
}

/// The host processes of the running twinbox instance `name` (a container or a detached
/// microVM) of the store at `root`: the pid its record holds (a container's init, a microVM's
/// VMM) and the proxy that holds its published ports (`twinbox-proxy-HASH container-proxy IP PORT…`,
/// found by the instance's address).
pub(crate) fn record_pids(root: &Path, name: &str) -> Vec<u32> {
    let Some(record) = engine(root).and_then(|e| e.find(name).ok()) else { return Vec::new() };
    let twinbox_engine::Phase::Running { pid } = record.phase else { return Vec::new() };
    let mut pids = vec![pid as u32];
    if let Some(ip) = record.endpoint.as_ref().filter(|_| !record.ports.is_empty()).map(|e| e.ip.to_string()) {
        pids.extend(
            crate::host::scan()
                .into_iter()
                .filter(|p| p.args.iter().any(|a| a == "container-proxy") && p.args.contains(&ip))
                .map(|p| p.pid),
        );
    }
    pids
}

/// `run` flags that publish `publish` on 127.0.0.1, or give loopback only without one.
pub(crate) fn publish_flags(publish: Option<Publish>) -> Vec<String> {
    match publish {
        Some(p) => vec!["-p".into(), format!("127.0.0.1:{}:{}", p.host, p.port)],
        None => vec!["--network".into(), "none".into()],
    }
}

#[derive(Debug)]
pub struct TwinboxContainer {
    exe: PathBuf,
    image: Option<PreparedImage>,
}

impl TwinboxContainer {
    /// `exe`: the `twinbox` binary to measure (the running one, normally).
    pub fn new(exe: &Path) -> Self {
        TwinboxContainer { exe: exe.to_owned(), image: None }
    }

    fn twinbox(&self) -> Command {
        let image = self.image.as_ref().expect("prepare() before use");
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--root").arg(&image.store_root).env_remove("RUST_LOG");
        own_process_group(&mut cmd);
        cmd
    }
}

impl Backend for TwinboxContainer {
    fn name(&self) -> &'static str {
        "twinbox-container"
    }

    fn isolation(&self) -> Isolation {
        Isolation::Container
    }

    fn available(&self) -> Result<(), Unavailable> {
        if !self.exe.exists() {
            return Err(Unavailable::new(format!("{} does not exist", self.exe.display())));
        }
        if !is_root() {
            return Err(Unavailable::new("needs root (namespaces, cgroups, overlay mounts)"));
        }
        Ok(())
    }

    fn version(&self) -> Option<String> {
        crate::host::tool_version(&self.exe)
    }

    fn note(&self) -> Option<String> {
        Some(format!(
            "`{} run --rm IMAGE …` with its default seccomp profile (detached: `run -d`, then `rm -f`)",
            self.exe.display()
        ))
    }

    fn prepare(&mut self, image: &PreparedImage) -> Result<(), BackendError> {
        self.image = Some(image.clone());
        Ok(())
    }

    fn run_command(&self, workload: &Workload, id: &str) -> Result<Command, BackendError> {
        let image = self.image.as_ref().expect("prepare() before use");
        let mut cmd = self.twinbox();
        // Loopback only, as runc's and crun's containers here: like for like.
        cmd.args(["run", "--rm", "--network", "none", "--name", id]);
        if let Workload::Disk { volume: true, .. } = workload {
            cmd.arg("-v").arg(format!("{}:{}", super::DISK_VOLUME, super::DISK_VOLUME_PATH));
        }
        cmd.arg(&image.reference).args(workload.args());
        Ok(cmd)
    }

    fn disk_note(&self) -> String {
        "the overlay's upper directory on the host's file system; a named volume (`-v`, a directory of the host \
         bound in)"
            .into()
    }

    fn disk_cleanup(&self) {
        let mut cmd = self.twinbox();
        cmd.args(["volume", "rm", super::DISK_VOLUME]).stdin(Stdio::null());
        let _ = run_quiet(cmd, "twinbox volume rm");
    }

    fn cleanup_run(&self, id: &str) {
        let mut cmd = self.twinbox();
        cmd.args(["rm", "-f", id]).stdin(Stdio::null());
        let _ = run_quiet(cmd, "twinbox rm -f");
    }

    fn launch(&self, workload: &Workload, id: &str) -> Result<Instance, BackendError> {
        let image = self.image.as_ref().expect("prepare() before use");
        let mut cmd = self.twinbox();
        cmd.args(["run", "-d", "--network", "none", "--name", id, &image.reference]).args(workload.args());
        cmd.stdin(Stdio::null());
        run_quiet(cmd, "twinbox run -d")?;
        Ok(Instance { id: id.to_owned(), child: None })
    }

    fn serves(&self) -> bool {
        true
    }

    fn launch_server(&self, id: &str, host_port: u16) -> Result<Option<Instance>, BackendError> {
        let image = self.image.as_ref().expect("prepare() before use");
        let mut cmd = self.twinbox();
        let publish = format!("127.0.0.1:{host_port}:{}", super::SERVER_PORT);
        cmd.args(["run", "-d", "-p", &publish, "--name", id, &image.reference])
            .args(Workload::Serve(super::SERVER_PORT).args());
        run_quiet(cmd, "twinbox run -d -p")?;
        Ok(Some(Instance { id: id.to_owned(), child: None }))
    }

    fn exec_command(&self, id: &str) -> Option<Command> {
        let mut cmd = self.twinbox();
        cmd.args(["exec", id, "/hello", "exit", "0"]);
        Some(cmd)
    }

    fn serve_note(&self) -> String {
        "`twinbox run -d -p 127.0.0.1:PORT:8080` on the default bridge network (veth and bridge of MTU 65520, \
         the containers' default route 1500)"
            .into()
    }

    fn launch_image(&self, id: &str, publish: Option<Publish>) -> Result<Option<Instance>, BackendError> {
        let image = self.image.as_ref().expect("prepare() before use");
        let mut cmd = self.twinbox();
        cmd.args(["run", "-d", "--name", id]).args(publish_flags(publish)).arg(&image.reference);
        run_quiet(cmd, "twinbox run -d")?;
        Ok(Some(Instance { id: id.to_owned(), child: None }))
    }

    fn output_path(&self, instance: &Instance) -> Option<PathBuf> {
        log_path(&self.image.as_ref()?.store_root, &instance.id)
    }

    fn instance_pids(&self, instance: &Instance) -> Vec<u32> {
        self.image.as_ref().map(|i| record_pids(&i.store_root, &instance.id)).unwrap_or_default()
    }

    fn run_published(&self, id: &str, host_port: u16) -> Result<Option<std::time::Duration>, BackendError> {
        let image = self.image.as_ref().expect("prepare() before use");
        let mut cmd = self.twinbox();
        let publish = format!("127.0.0.1:{host_port}:{}", super::SERVER_PORT);
        cmd.args(["run", "--rm", "-p", &publish, "--name", id, &image.reference]).args(Workload::True.args());
        super::timed(cmd, "twinbox run --rm -p").map(Some)
    }

    fn teardown(&self, instance: &mut Instance) -> Result<(), BackendError> {
        let mut cmd = self.twinbox();
        cmd.args(["rm", "-f", &instance.id]);
        run_quiet(cmd, "twinbox rm -f")
    }
}

//! `process`: the workload binary run straight from the flattened image, with no namespaces,
//! no cgroup and no rootfs switch — the floor every isolation model is compared with.

use std::process::{Command, Stdio};

use super::{own_process_group, Backend, BackendError, Instance, Isolation, PreparedImage, Unavailable, Workload};

#[derive(Debug, Default)]
pub struct Process {
    image: Option<PreparedImage>,
}

impl Process {
    fn command(&self, workload: &Workload) -> Command {
        let image = self.image.as_ref().expect("prepare() before use");
        let mut cmd = Command::new(image.workload_on_host());
        match workload {
            // The host's own file system: a scratch directory stands for both the root and the
            // volume (both are a directory of the host here).
            Workload::Disk { volume, mib } => {
                let dir = disk_dir(&image.store_root, *volume);
                let _ = std::fs::create_dir_all(&dir);
                cmd.arg("disk").arg(dir).arg(mib.to_string());
            }
            _ => {
                cmd.args(workload.args());
            }
        }
        own_process_group(&mut cmd);
        cmd
    }
}

/// On the store's file system, where the containers' layers and volumes are (the scratch
/// directory may be a tmpfs).
fn disk_dir(store: &std::path::Path, volume: bool) -> std::path::PathBuf {
    store.join(".bench-disk").join(if volume { "process-volume" } else { "process-root" })
}

impl Process {
    fn scratch_dirs(&self) -> Vec<std::path::PathBuf> {
        let image = self.image.as_ref().expect("prepare() before use");
        vec![disk_dir(&image.store_root, false), disk_dir(&image.store_root, true)]
    }
}

impl Backend for Process {
    fn name(&self) -> &'static str {
        "process"
    }

    fn isolation(&self) -> Isolation {
        Isolation::Process
    }

    fn available(&self) -> Result<(), Unavailable> {
        Ok(())
    }

    fn note(&self) -> Option<String> {
        Some("the image's /hello executed directly on the host: no isolation (the floor)".into())
    }

    fn not_applicable(&self, image: &PreparedImage) -> Option<String> {
        image.foreign.as_ref().map(|_| {
            "it runs the image's entrypoint as a program of the host, outside any root filesystem of the image: \
             only the hello image's static binary runs that way"
                .into()
        })
    }

    fn prepare(&mut self, image: &PreparedImage) -> Result<(), BackendError> {
        self.image = Some(image.clone());
        Ok(())
    }

    fn run_command(&self, workload: &Workload, _id: &str) -> Result<Command, BackendError> {
        Ok(self.command(workload))
    }

    fn launch(&self, workload: &Workload, id: &str) -> Result<Instance, BackendError> {
        let mut cmd = self.command(workload);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // spawn() returns once the exec has succeeded.
        let child = cmd.spawn().map_err(|source| BackendError::Spawn { what: "the workload".into(), source })?;
        Ok(Instance { id: id.to_owned(), child: Some(child) })
    }

    fn serves(&self) -> bool {
        true
    }

    fn launch_server(&self, id: &str, host_port: u16) -> Result<Option<Instance>, BackendError> {
        self.launch(&Workload::Serve(host_port), id).map(Some)
    }

    fn serve_note(&self) -> String {
        "listening on the port itself: loopback, the floor".into()
    }

    fn disk_note(&self) -> String {
        "a directory on the file system of the store (where containers' layers and volumes lie) for both (the \
         floor)"
            .into()
    }

    fn disk_cleanup(&self) {
        for d in self.scratch_dirs() {
            let _ = std::fs::remove_dir_all(&d);
            if let Some(parent) = d.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }

    fn teardown(&self, instance: &mut Instance) -> Result<(), BackendError> {
        if let Some(mut c) = instance.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }
}

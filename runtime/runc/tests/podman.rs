//! podman drives `twinbox-runc` as its OCI runtime (`podman --runtime PATH`), as it would runc:
//! foreground runs with output and exit codes, then a detached container with exec, pause and
//! unpause, stop and rm. podman keeps its storage (vfs: no mounts) in the test's temp dir.
//! Needs root and podman (scripts/test.sh installs it); under CI=true their absence fails.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{stderr, stdout, Env, BIN};

struct Podman<'a> {
    dir: &'a Path,
}

impl Podman<'_> {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "none"])
            .args(["--runtime", BIN])
            .args(args)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running podman")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "podman {args:?}: {}", stderr(&o));
        stdout(&o)
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--all", "--force", "--time", "0"]);
        let _ = self.run(&["rmi", "--all", "--force"]);
    }
}

/// podman (cgroupfs manager) keeps its own parent cgroup, `libpod_parent` with `conmon` in
/// it, in every hierarchy. The ones this test made are removed again when they are empty.
struct PodmanParents(Vec<std::path::PathBuf>);

impl PodmanParents {
    fn note() -> Self {
        let new = std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|h| h.path().join("libpod_parent"))
            .filter(|p| !p.exists())
            .collect();
        PodmanParents(new)
    }
}

impl Drop for PodmanParents {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_dir(p.join("conmon"));
            let _ = std::fs::remove_dir(p);
        }
    }
}

fn have_podman() -> bool {
    Command::new("podman").arg("--version").output().is_ok_and(|o| o.status.success())
}

#[test]
fn podman_runs_containers_with_twinbox_runc() {
    let Some(env) = Env::new("podman") else { return };
    if !common::require_tool("podman_runs_containers_with_twinbox_runc", have_podman(), "podman") {
        return;
    }
    // The test's busybox rootfs as an image in an OCI layout, which podman pulls. podman makes
    // an image name of the layout's path, which must therefore be lowercase.
    let layout_dir = tempfile::Builder::new()
        .prefix("twinbox-podman-")
        .rand_bytes(0)
        .suffix(&std::process::id().to_string())
        .tempdir()
        .unwrap();
    let layout = layout_dir.path().join("layout");
    drop(common::rootfs_image(&env, &layout, "podtest:1"));

    let _parents = PodmanParents::note();
    let podman = Podman { dir: env.tmp.path() };
    let pulled = podman.ok(&["pull", "--quiet", &format!("oci:{}:podtest:1", layout.display())]);
    let image = pulled.lines().last().unwrap().trim().to_owned();
    // This sandbox's root lacks CAP_SYS_RESOURCE: podman's default rlimits would be refused
    // with runc or crun too.
    let run = |extra: &[&str]| -> Output {
        let mut a = vec!["run", "--net", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"];
        a.extend_from_slice(extra);
        podman.run(&a)
    };

    let o = run(&["--rm", &image, "sh", "-c", "echo hello from $$"]);
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(0), "hello from 1\n"), "{}", stderr(&o));
    let o = run(&["--rm", &image, "sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));

    let marker = format!("{}", 900_000 + std::process::id() % 99_999);
    let o = run(&["-d", &image, "sleep", &marker]);
    assert!(o.status.success(), "{}", stderr(&o));
    let id = stdout(&o).trim().to_owned();
    let status = || podman.ok(&["inspect", "--format", "{{.State.Status}}", &id]).trim().to_owned();
    assert_eq!(status(), "running");
    assert_eq!(podman.ok(&["exec", &id, "echo", "inside"]), "inside\n");
    podman.ok(&["pause", &id]);
    assert_eq!(status(), "paused");
    podman.ok(&["unpause", &id]);
    assert_eq!(status(), "running");
    podman.ok(&["stop", "--time", "1", &id]);
    assert_eq!(status(), "exited");
    podman.ok(&["rm", &id]);

    assert!(common::processes_with(&marker).is_empty(), "the detached container's process is gone");
    let leftover: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .flat_map(|h| std::fs::read_dir(h.path().join("libpod_parent")).into_iter().flatten().flatten())
        .filter(|e| e.file_name().to_string_lossy().contains(&id))
        .map(|e| e.path())
        .collect();
    assert!(leftover.is_empty(), "cgroups left: {leftover:?}");
}

//! containerd drives `twinbox-runc` through its runc shim (`ctr run --runc-binary PATH`), as it
//! would runc: a foreground run with its output and exit code, then a detached task with exec,
//! pause and resume, metrics, kill and delete. The test starts a private containerd (root,
//! state and socket in its temp dir) and stops it at the end. Needs root and containerd
//! (scripts/test.sh installs it); under CI=true their absence fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{stderr, stdout, Env, BIN};

/// A containerd of the test's own; killed (and its shims' leftovers checked) on drop.
struct Containerd {
    child: Child,
    socket: PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Containerd {
        let socket = dir.join("ctd.sock");
        let config = format!(
            "version = 2\nroot = {:?}\nstate = {:?}\n[grpc]\n  address = {:?}\n",
            dir.join("root"),
            dir.join("state"),
            socket
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let c = Containerd { child, socket };
        let t = Instant::now();
        while !c.ctr(&["version"]).status.success() {
            assert!(t.elapsed() < Duration::from_secs(20), "containerd did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.socket).args(args).stdin(Stdio::null());
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running ctr")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.ctr(args);
        assert!(o.status.success(), "ctr {args:?}: {}", stderr(&o));
        stdout(&o)
    }

    fn task_status(&self, id: &str) -> String {
        let list = self.ok(&["task", "ls"]);
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("")
            .to_owned()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in ["tb-fg", "tb-bg"] {
            let _ = self.ctr(&["task", "kill", "-s", "KILL", id]);
            let _ = self.ctr(&["task", "rm", "-f", id]);
            let _ = self.ctr(&["container", "rm", id]);
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// `tool` answers its version flag.
fn have(tool: &str, flag: &str) -> bool {
    Command::new(tool).arg(flag).output().is_ok_and(|o| o.status.success())
}

#[test]
fn containerd_runs_tasks_with_twinbox_runc() {
    let Some(env) = Env::new("containerd") else { return };
    let present = have("containerd", "--version") && have("ctr", "--version") && have("containerd-shim-runc-v2", "-v");
    if !common::require_tool(
        "containerd_runs_tasks_with_twinbox_runc",
        present,
        "containerd (with ctr and its runc shim)",
    ) {
        return;
    }
    // The test's busybox rootfs as an OCI archive for `ctr images import`.
    let layout = env.tmp.path().join("layout");
    let store = common::rootfs_image(&env, &layout, "ctdtest:1");
    let archive = env.tmp.path().join("image.tar");
    twinbox_image::archive::save_to_path(&store, &["ctdtest:1".to_owned()], &archive).unwrap();

    // ctr puts tasks under the cgroup of its namespace, `/default/<id>`; like runc, the runtime
    // leaves that shared parent, so the test removes it if it made it.
    let parents: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|h| h.path().join("default"))
        .filter(|p| !p.exists())
        .collect();
    let ctd_dir = env.tmp.path().join("ctd");
    std::fs::create_dir_all(&ctd_dir).unwrap();
    let ctd = Containerd::start(&ctd_dir);
    // The index's manifest names no platform: --all-platforms keeps it.
    ctd.ok(&["images", "import", "--all-platforms", archive.to_str().unwrap()]);
    let name = "ctdtest:1";
    assert!(ctd.ok(&["images", "ls", "-q"]).lines().any(|l| l == name), "image imported");

    let o = ctd.ctr(&["run", "--rm", "--runc-binary", BIN, name, "tb-fg", "sh", "-c", "echo hello from $$; exit 3"]);
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(3), "hello from 1\n"), "{}", stderr(&o));

    let marker = format!("{}", 800_000 + std::process::id() % 99_999);
    ctd.ok(&["run", "-d", "--runc-binary", BIN, name, "tb-bg", "sleep", &marker]);
    assert_eq!(ctd.task_status("tb-bg"), "RUNNING");
    assert_eq!(ctd.ok(&["task", "exec", "--exec-id", "e1", "tb-bg", "echo", "inside"]), "inside\n");
    ctd.ok(&["task", "pause", "tb-bg"]);
    assert_eq!(ctd.task_status("tb-bg"), "PAUSED");
    ctd.ok(&["task", "resume", "tb-bg"]);
    assert_eq!(ctd.task_status("tb-bg"), "RUNNING");
    let metrics = ctd.ok(&["task", "metrics", "tb-bg"]);
    assert!(metrics.contains("memory.usage_in_bytes") || metrics.contains("memory.usage"), "{metrics}");
    ctd.ok(&["task", "kill", "-s", "KILL", "tb-bg"]);
    let t = Instant::now();
    while ctd.task_status("tb-bg") != "STOPPED" {
        assert!(t.elapsed() < Duration::from_secs(10), "the task did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    ctd.ok(&["task", "rm", "tb-bg"]);
    ctd.ok(&["container", "rm", "tb-bg"]);
    drop(ctd);
    for p in &parents {
        let _ = std::fs::remove_dir(p);
    }

    assert!(common::processes_with(&marker).is_empty(), "the detached task's process is gone");
    let dir = env.tmp.path().display().to_string();
    let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&dir))
        .map(String::from)
        .collect();
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
}

//! Shared helpers for the lifecycle tests: a busybox bundle with a `runc spec`-like config, the
//! `twinbox-runc` binary with a private `--root`, and a leak check.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_twinbox-runc");

/// Applets linked into the test rootfs.
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "ls", "id", "hostname", "sleep", "mkdir", "true", "false", "ps", "mount", "grep", "wc",
    "touch", "test", "stat", "readlink",
];

/// True when the test may run (root). Skips with a reason otherwise, except under CI=true,
/// where a missing capability is a failure.
pub fn require_root(test: &str) -> bool {
    twinbox_testutil::require_root(test, "create containers")
}

/// True when `present`; otherwise skips with `what` as the reason, except under CI=true,
/// where a missing tool is a failure.
pub fn require_tool(test: &str, present: bool, what: &str) -> bool {
    twinbox_testutil::require(present, test, &format!("{what} is not installed"))
}

/// The env's busybox rootfs as image `tag` in a new OCI layout at `layout` (what podman and
/// containerd are given).
pub fn rootfs_image(env: &Env, layout: &Path, tag: &str) -> twinbox_image::Store {
    let store = twinbox_image::Store::open(layout).unwrap();
    std::fs::write(env.bundle.join("Dockerfile"), "FROM scratch\nCOPY rootfs /\nCMD [\"sh\"]\n").unwrap();
    let opts = twinbox_image::build::BuildOptions {
        context: env.bundle.clone(),
        tags: vec![tag.parse().unwrap()],
        ..Default::default()
    };
    twinbox_image::build::build(&store, &opts, &mut |_| {}).unwrap();
    store
}

/// The static busybox to put in the rootfs; panics (a setup problem) if it is not static.
fn busybox() -> PathBuf {
    let p = PathBuf::from("/bin/busybox");
    let out = Command::new("file")
        .arg("-L")
        .arg(&p)
        .output()
        .expect("running file(1) on /bin/busybox (install busybox-static and file)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("statically linked") || text.contains("static-pie"), "/bin/busybox is not static: {text}");
    p
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// One test's world: a temp dir holding the bundle and the state root, and a unique id.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub id: String,
    pub spec: Value,
}

impl Env {
    /// A fresh bundle (config written by [`Env::write`]) or `None` when skipped.
    pub fn new(test: &str) -> Option<Env> {
        if !require_root(test) {
            return None;
        }
        let tmp = tempfile::Builder::new().prefix("twinbox-lc-").tempdir().unwrap();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("tbt-{}-{}-{n}", test.replace('_', "-"), std::process::id());
        let bundle = tmp.path().join("bundle");
        let rootfs = bundle.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::copy(busybox(), rootfs.join("bin/busybox")).unwrap();
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
        }
        for d in ["proc", "sys", "dev", "tmp", "etc"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        let spec = default_spec(&id);
        let root = tmp.path().join("state");
        Some(Env { tmp, root, bundle, rootfs, id, spec })
    }

    /// Set the process args.
    pub fn args(&mut self, args: &[&str]) -> &mut Self {
        self.spec["process"]["args"] = json!(args);
        self
    }

    /// Write the spec as config.json.
    pub fn write(&self) {
        // It must be a valid spec for the runtime's own parser too.
        let _: oci_spec::runtime::Spec = serde_json::from_value(self.spec.clone()).unwrap();
        std::fs::write(self.bundle.join("config.json"), serde_json::to_vec_pretty(&self.spec).unwrap()).unwrap();
    }

    /// `twinbox-runc --root <root> ARGS…`, not yet run.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--root").arg(&self.root).args(args);
        c
    }

    /// Run a command that does not leave a process holding its output.
    pub fn runc(&self, args: &[&str]) -> Output {
        self.cmd(args).stdin(Stdio::null()).output().unwrap()
    }

    /// `run` of the current spec in the foreground.
    pub fn run(&self) -> Output {
        self.write();
        let b = self.bundle.display().to_string();
        self.runc(&["run", "-b", &b, &self.id])
    }

    /// `create`: the init keeps stdout/stderr, so they go to files, not pipes we would wait on.
    /// Returns (exit code, stderr text).
    pub fn create(&self) -> (i32, String) {
        self.write();
        let b = self.bundle.display().to_string();
        let err_path = self.tmp.path().join(format!("create-{}.err", COUNTER.fetch_add(1, Ordering::SeqCst)));
        let err = std::fs::File::create(&err_path).unwrap();
        let out = std::fs::File::create(self.tmp.path().join("container.out")).unwrap();
        let status =
            self.cmd(&["create", "-b", &b, &self.id]).stdin(Stdio::null()).stdout(out).stderr(err).status().unwrap();
        (status.code().unwrap_or(-1), std::fs::read_to_string(err_path).unwrap_or_default())
    }

    /// What the container wrote to stdout after `create`.
    pub fn container_out(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("container.out")).unwrap_or_default()
    }

    /// The OCI state JSON, or None if `state` fails.
    pub fn state(&self) -> Option<Value> {
        let out = self.runc(&["state", &self.id]);
        if !out.status.success() {
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).unwrap())
    }

    pub fn status(&self) -> Option<String> {
        self.state().and_then(|s| s["status"].as_str().map(str::to_string))
    }

    /// Poll until the status is `want` (or time out and fail).
    pub fn wait_status(&self, want: &str, timeout: Duration) {
        let end = Instant::now() + timeout;
        loop {
            let st = self.status();
            if st.as_deref() == Some(want) {
                return;
            }
            assert!(Instant::now() < end, "status {st:?}, wanted {want}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join(&self.id)
    }

    /// Nothing of this container may remain: state dir, cgroup dirs, processes, mounts.
    pub fn assert_no_leaks(&self) {
        assert!(!self.state_dir().exists(), "state dir {} left behind", self.state_dir().display());
        assert!(cgroup_dirs(&self.id).is_empty(), "cgroups left: {:?}", cgroup_dirs(&self.id));
        let procs = processes_with(&self.id);
        assert!(procs.is_empty(), "processes left: {procs:?}");
        let tmp = self.tmp.path().display().to_string();
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&tmp) || l.contains(&self.id))
            .map(str::to_string)
            .collect();
        assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Best effort, for failed tests: never leave a container running.
        if self.state_dir().exists() {
            let _ = self.runc(&["delete", "--force", &self.id]);
        }
    }
}

/// A `runc spec`-like config: busybox sh, namespaces pid/mount/uts/ipc/net, the usual mounts,
/// masked and read-only paths, runc's default capabilities, NOFILE 1024, no_new_privs.
pub fn default_spec(id: &str) -> Value {
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "twinbox-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "cgroupsPath": format!("/twinbox/{id}"),
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

/// Directories named `id` at any cgroup hierarchy's root (a spec without cgroupsPath) or
/// under its twinbox/ directory.
pub fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let base = Path::new("/sys/fs/cgroup");
    let mut candidates = vec![base.join("twinbox").join(id), base.join(id)];
    if let Ok(rd) = std::fs::read_dir(base) {
        for e in rd.flatten() {
            candidates.push(e.path().join("twinbox").join(id));
            candidates.push(e.path().join(id));
        }
    }
    for c in candidates {
        if c.exists() {
            out.push(c);
        }
    }
    out
}

/// Pids whose command line or cgroup mentions `marker` (the container id).
pub fn processes_with(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cgroup = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // Zombies are dead already (reaped by whoever the init was reparented to).
        let zombie = stat.rfind(')').map(|i| stat[i + 1..].trim_start().starts_with('Z')).unwrap_or(false);
        if zombie {
            continue;
        }
        let cmd = String::from_utf8_lossy(&cmdline);
        // twinbox-runc itself mentions the id in its arguments: only the container's processes
        // count, and those are in its cgroup or carry the marker in their own arguments.
        if cgroup.contains(&format!("/{marker}")) || (cmd.contains(marker) && !cmd.contains("twinbox-runc")) {
            out.push(pid);
        }
    }
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

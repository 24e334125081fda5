//! Shared pieces of the CLI integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Whether a missing capability must fail instead of skip (CI=true).
pub fn strict() -> bool {
    twinbox_testutil::strict()
}

/// Skip (return false, printing why) when `cond` is false, or panic under CI=true.
pub fn require(cond: bool, what: &str) -> bool {
    twinbox_testutil::require(cond, "twinbox", what)
}

/// The tool is on PATH.
pub fn have_tool(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success())
}

/// Skip unless the tool is installed.
pub fn require_tool(tool: &str) -> bool {
    require(have_tool(tool), &format!("{tool} is not installed (scripts/test.sh installs it)"))
}

/// Skip unless running as root.
pub fn require_root() -> bool {
    require(nix::unistd::geteuid().is_root(), "this test needs root")
}

/// A temporary store and a way to run `twinbox` against it.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_twinbox"));
        c.env("TWINBOX_ROOT", self.root()).env_remove("RUST_LOG");
        c
    }

    /// Run twinbox with args; returns the output whatever the exit status.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Run twinbox with args and assert success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "twinbox {args:?} failed with {:?}\nstdout: {}\nstderr: {}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Run twinbox with args and its own runtime root (`<dir>/runtime`, so that containers
    /// of the test do not mix with the machine's); exit code, stdout, stderr.
    pub fn twinbox<A: AsRef<std::ffi::OsStr>>(&self, args: &[A]) -> (i32, String, String) {
        let mut cmd = self.cmd();
        cmd.env("TWINBOX_RUNTIME_ROOT", self.path("runtime"));
        let o = cmd.args(args).output().unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    pub fn store(&self) -> twinbox_image::Store {
        twinbox_image::Store::open(self.root()).unwrap()
    }
}

impl Drop for Env {
    /// The store's containers and networks (the default one is made by the first `run` on it)
    /// go with it, also when the test failed half way: their processes, cgroups and bridges
    /// would outlive the temporary directory.
    fn drop(&mut self) {
        if self.root().join("containers").is_dir() {
            let (_, ids, _) = self.twinbox(&["ps", "-aq"]);
            let mut rm = vec!["rm", "-f"];
            rm.extend(ids.split_whitespace());
            if rm.len() > 2 {
                let _ = self.twinbox(&rm);
            }
        }
        if self.root().join("networks").is_dir() {
            let _ = self.run(&["network", "prune"]);
        }
    }
}

/// Run an external command and assert success; returns stdout.
pub fn sh(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed: {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// Copy examples/hello with its compiled static binary into `dest`; false (skip) if the
/// binary was not built (scripts/test.sh builds it).
pub fn hello_context(dest: &Path) -> bool {
    let bin = workspace().join("target/release/hello");
    if !require(bin.exists(), "target/release/hello is not built (run scripts/test.sh, which builds it static)") {
        return false;
    }
    std::fs::create_dir_all(dest).unwrap();
    std::fs::copy(workspace().join("examples/hello/Dockerfile"), dest.join("Dockerfile")).unwrap();
    std::fs::copy(bin, dest.join("hello")).unwrap();
    true
}

/// Put Debian's static busybox and links for `applets` under `ctx/rootfs/bin`; false (skip) if
/// busybox-static is not installed.
pub fn busybox_rootfs(ctx: &Path, applets: &[&str]) -> bool {
    let busybox = Path::new("/bin/busybox");
    if !require(busybox.exists(), "/bin/busybox (Debian busybox-static) is not installed") {
        return false;
    }
    let bin = ctx.join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(busybox, bin.join("busybox")).unwrap();
    for a in applets {
        std::os::unix::fs::symlink("busybox", bin.join(a)).unwrap();
    }
    true
}

//! `twinbox build` with `RUN`, end to end as root: each step runs in a throwaway container
//! of twinbox's runtime over a busybox base image, its changes become a layer (new files,
//! whiteouts, opaque directories), rebuilds come from the cache, and a failing step fails the
//! build the way Docker's does. Every test ends with a leak check: no scratch directory,
//! container, runtime state, cgroup or mount left.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{busybox_rootfs, require, require_root, Env};

/// The leak checks look at machine-wide cgroups: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const APP: &str = "FROM base
RUN mkdir -p /app && echo built > /app/out && chmod 640 /app/out
RUN rm /bin/cat
RUN mkdir /d && touch /d/a
RUN rm -rf /d && mkdir /d && touch /d/b
ENV X=1
RUN echo $X > /x
";

/// A private store with `base:latest`, a busybox image with a few applets; `None` to skip.
fn base() -> Option<Env> {
    if !require_root() {
        return None;
    }
    let env = Env::new();
    let ctx = env.path("base");
    if !busybox_rootfs(&ctx, &["sh", "echo", "mkdir", "rm", "cat", "ls", "touch", "chmod", "mknod", "sleep"]) {
        return None;
    }
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nCOPY rootfs/ /\n").unwrap();
    build(&env, &["-t", "base", ctx.to_str().unwrap()]).ok();
    Some(env)
}

struct Built {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Built {
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "build failed\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }
}

fn twinbox(env: &Env, args: &[&str]) -> Built {
    let mut cmd = env.cmd();
    cmd.env("TWINBOX_RUNTIME_ROOT", env.path("runtime")).env_remove("SOURCE_DATE_EPOCH");
    let start = Instant::now();
    let o = cmd.args(args).output().unwrap();
    Built {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        took: start.elapsed(),
    }
}

fn build(env: &Env, args: &[&str]) -> Built {
    let mut all = vec!["build"];
    all.extend_from_slice(args);
    twinbox(env, &all)
}

/// A context directory holding only this Dockerfile.
fn dockerfile(env: &Env, name: &str, text: &str) -> PathBuf {
    let ctx = env.path(name);
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), text).unwrap();
    ctx
}

/// What a build step could leave behind on the machine.
fn leftovers(env: &Env) -> Vec<String> {
    let mut out = Vec::new();
    let store = env.root().display().to_string();
    for l in std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines() {
        if l.contains(&store) {
            out.push(format!("mount: {l}"));
        }
    }
    for dir in [env.root().join("tmp"), env.root().join("containers"), env.path("runtime")] {
        if let Ok(d) = std::fs::read_dir(&dir) {
            for e in d.flatten() {
                out.push(format!("left in {}: {}", dir.display(), e.file_name().to_string_lossy()));
            }
        }
    }
    // Build steps' cgroups are /twinbox/build-<hex> in every hierarchy (v1, hybrid or v2).
    let mut hierarchies = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(d) = std::fs::read_dir("/sys/fs/cgroup") {
        hierarchies.extend(d.flatten().map(|e| e.path()));
    }
    for h in hierarchies {
        if let Ok(d) = std::fs::read_dir(h.join("twinbox")) {
            for e in d.flatten() {
                if e.file_name().to_string_lossy().starts_with("build-") {
                    out.push(format!("cgroup: {}", e.path().display()));
                }
            }
        }
    }
    out
}

fn no_leaks(env: &Env) {
    let l = leftovers(env);
    assert!(l.is_empty(), "left behind: {l:#?}");
}

#[test]
fn run_steps_make_layers_and_rebuilds_are_cached() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(env) = base() else { return };
    let ctx = dockerfile(&env, "app", APP);
    let cold = build(&env, &["-t", "app:1", ctx.to_str().unwrap()]).ok();
    let digest = cold.stdout.trim().to_owned();
    assert!(digest.starts_with("sha256:"), "{}", cold.stdout);
    assert!(cold.stderr.contains("7 steps, 0 cached"), "{}", cold.stderr);

    let rootfs = env.path("rootfs");
    twinbox(&env, &["unpack", "app:1", rootfs.to_str().unwrap()]).ok();
    let out = rootfs.join("app/out");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "built\n");
    assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o7777, 0o640);
    assert!(std::fs::symlink_metadata(rootfs.join("bin/cat")).is_err(), "the whiteout removed /bin/cat");
    assert!(rootfs.join("bin/ls").exists());
    let d: Vec<String> =
        std::fs::read_dir(rootfs.join("d")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(d, ["b"], "the opaque /d hides the old /d/a");
    assert_eq!(std::fs::read_to_string(rootfs.join("x")).unwrap(), "1\n");
    // The runtime's mount points are not part of any layer.
    for stub in ["proc", "sys", "dev"] {
        assert!(!rootfs.join(stub).exists(), "/{stub} leaked into a layer");
    }

    let inspect = twinbox(&env, &["inspect", "app:1"]).ok();
    let v: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    let history: Vec<&str> =
        v[0]["History"].as_array().unwrap().iter().map(|h| h["created_by"].as_str().unwrap()).collect();
    assert!(history.contains(&"RUN /bin/sh -c rm /bin/cat"), "{history:?}");
    assert_eq!(v[0]["RootFS"]["diff_ids"].as_array().unwrap().len(), 6, "base + 5 RUN layers");

    // `cat` is gone, so read the file with the shell.
    let run = twinbox(&env, &["run", "--rm", "app:1", "sh", "-c", "read l < /app/out; echo $l"]).ok();
    assert_eq!(run.stdout, "built\n");

    let cached = build(&env, &["-t", "app:1", ctx.to_str().unwrap()]).ok();
    assert_eq!(cached.stdout.trim(), digest, "same manifest");
    assert!(cached.stderr.contains("7 steps, 5 cached"), "{}", cached.stderr);
    let lines: Vec<&str> = cached.stderr.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.contains(": RUN ") {
            assert_eq!(lines.get(i + 1), Some(&"--> cached"), "{}", cached.stderr);
        }
    }
    eprintln!("multi-RUN build: cold {:?}, cached {:?}", cold.took, cached.took);
    no_leaks(&env);
}

#[test]
fn a_failing_run_fails_the_build_and_leaves_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(env) = base() else { return };
    let ctx = dockerfile(&env, "bad", "FROM base\nRUN mkdir /made && touch /made/f\nRUN false\n");
    let b = build(&env, &["-t", "bad:1", ctx.to_str().unwrap()]);
    assert_eq!(b.code, 1, "{}", b.stderr);
    assert!(b.stderr.contains("The command '/bin/sh -c false' returned a non-zero code: 1"), "{}", b.stderr);
    assert!(twinbox(&env, &["inspect", "bad:1"]).code != 0, "nothing tagged");
    no_leaks(&env);

    // The command's own output goes to the build's stderr; its exit code is reported.
    let ctx = dockerfile(&env, "bad2", "FROM base\nRUN echo to-stdout; echo to-stderr >&2; exit 3\n");
    let b = build(&env, &[ctx.to_str().unwrap()]);
    assert_eq!(b.code, 1);
    assert!(b.stderr.contains("to-stdout") && b.stderr.contains("to-stderr"), "{}", b.stderr);
    assert!(b.stderr.contains("returned a non-zero code: 3"), "{}", b.stderr);
    assert!(!b.stdout.contains("to-stdout"), "stdout is only the image digest: {}", b.stdout);
    no_leaks(&env);
}

/// A `RUN` step gets the same device policy as `twinbox run`: the host's /dev/kvm cannot be
/// opened from a Dockerfile either.
#[test]
fn a_run_step_cannot_open_host_devices() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(env) = base() else { return };
    let ctx =
        dockerfile(&env, "dev", "FROM base\nRUN mknod /k c 10 232 && (exec 3</k) && echo kvm-was-$((1 + 1)); rm /k\n");
    let b = build(&env, &[ctx.to_str().unwrap()]).ok();
    assert!(b.stderr.contains("Operation not permitted"), "{}", b.stderr);
    assert!(!b.stderr.contains("kvm-was-2"), "{}", b.stderr);
    no_leaks(&env);
}

#[test]
fn workdir_user_and_args_reach_the_step() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(env) = base() else { return };
    let ctx = dockerfile(
        &env,
        "wd",
        "FROM base\nARG GREETING=hi\nWORKDIR /srv/app\nRUN echo $GREETING > here\nUSER 1000\n\
         RUN touch /srv/app/mine || true\n",
    );
    build(&env, &["-t", "wd:1", ctx.to_str().unwrap()]).ok();
    let rootfs = env.path("wd-rootfs");
    twinbox(&env, &["unpack", "wd:1", rootfs.to_str().unwrap()]).ok();
    assert_eq!(std::fs::read_to_string(rootfs.join("srv/app/here")).unwrap(), "hi\n");
    let m = std::fs::metadata(rootfs.join("srv/app")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o755, "the working directory is made 0755");
    assert!(!rootfs.join("srv/app/mine").exists(), "uid 1000 cannot write a root-owned 0755 dir");
    no_leaks(&env);
}

#[test]
fn without_root_run_is_refused_and_says_why() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Root is needed to drop to an unprivileged user for this one.
    if !require_root() || !common::require_tool("setpriv") {
        return;
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_twinbox"));
    let others_can_run = bin
        .ancestors()
        .all(|p| p.as_os_str().is_empty() || std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    if !require(others_can_run, "the twinbox binary is not executable by other users (a 0700 directory above it)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let ctx = dir.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nRUN true\n").unwrap();
    std::fs::set_permissions(&ctx, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin)
        .args(["build", ctx.to_str().unwrap()])
        .env("TWINBOX_ROOT", dir.path().join("store"))
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("line 2: RUN needs root"), "{stderr}");
}

/// A build killed with SIGKILL while a RUN step runs leaves that step's container running;
/// `prune` stops it before it removes the step's directories, and nothing of it stays.
#[test]
fn a_killed_builds_run_container_is_stopped_by_prune() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(env) = base() else { return };
    let marker = format!("tbkillstep{}", std::process::id());
    let ctx = dockerfile(&env, "slow", &format!("FROM base\nRUN sleep 30; echo {marker}\n"));
    let with_marker = || -> usize {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains(&marker) && !c.contains("build")
                })
            })
            .count()
    };
    let build_cgroups = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir("/sys/fs/cgroup")
            .unwrap()
            .flatten()
            .flat_map(|h| std::fs::read_dir(h.path().join("twinbox")).into_iter().flatten().flatten())
            .filter(|c| c.file_name().to_string_lossy().starts_with("build-"))
            .map(|c| c.path())
            .collect()
    };
    let cgroups_before = build_cgroups();
    let mut child = env
        .cmd()
        .env("TWINBOX_RUNTIME_ROOT", env.path("runtime"))
        .args(["build", "-q", "-t", "slow", ctx.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(env.path("build.err")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while with_marker() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(with_marker(), 1, "the RUN step runs: {}", std::fs::read_to_string(env.path("build.err")).unwrap());
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(with_marker(), 1, "the step's container outlives its build");
    let pruned = twinbox(&env, &["prune"]).ok();
    assert!(pruned.stdout.contains("stopped build-"), "{}", pruned.stdout);
    let deadline = Instant::now() + Duration::from_secs(10);
    while with_marker() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(with_marker(), 0, "the step's container is gone");
    let runtime: Vec<_> = std::fs::read_dir(env.path("runtime")).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(runtime.is_empty(), "no runtime state: {runtime:?}");
    let tmp: Vec<String> = std::fs::read_dir(env.root().join("tmp"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(!tmp.iter().any(|n| n.starts_with("run-")), "{tmp:?}");
    let cgroups: Vec<_> = build_cgroups().into_iter().filter(|c| !cgroups_before.contains(c)).collect();
    assert!(cgroups.is_empty(), "no cgroup: {cgroups:?}");
}

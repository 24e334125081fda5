//! `twinbox run` end to end, as root, on the default images built in a private store. Every
//! test ends with a leak check: no mount, cgroup, container dir, runtime state or process left.

mod common;

use std::path::Path;
use std::process::Command;

use common::{busybox_rootfs, require_root, Env};

/// A private store with a busybox image (each test its own, so leak checks see only its own
/// containers).
struct Images {
    env: Env,
    /// Container cgroups that existed before the test (of other runs on this machine).
    cgroups_before: Vec<String>,
    /// Tests in this file run one at a time, so that cgroups under /twinbox are ours.
    _serial: std::sync::MutexGuard<'static, ()>,
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Container cgroup dirs (64-hex names) under /twinbox in the hierarchies we use.
/// The containers' cgroups (`twinbox/<id>`) in every hierarchy: each v1 controller's, the
/// hybrid host's unified one, and a pure v2 host's root (/sys/fs/cgroup itself).
fn container_cgroups() -> Vec<String> {
    let mut out = Vec::new();
    let mut hierarchies = vec![Path::new("/sys/fs/cgroup").to_path_buf()];
    hierarchies.extend(std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten().map(|e| e.path()));
    for h in hierarchies {
        let dir = h.join("twinbox");
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()) && e.path().is_dir() {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

fn images() -> Option<Images> {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !require_root() {
        return None;
    }
    let env = Env::new();
    // The busybox image, as scripts/default-images.sh makes it.
    let ctx = env.path("busybox");
    let applets = [
        "sh", "echo", "cat", "id", "hostname", "sleep", "mkdir", "touch", "ls", "head", "tail", "ip", "unshare",
        "grep", "wc", "true", "pwd", "mknod", "tty", "stty", "readlink",
    ];
    if !busybox_rootfs(&ctx, &applets) {
        return None;
    }
    std::fs::create_dir_all(ctx.join("rootfs/etc")).unwrap();
    std::fs::write(
        ctx.join("rootfs/etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(ctx.join("rootfs/etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin GREETING=hello-from-image\nWORKDIR /work\nCMD [\"/bin/sh\"]\n",
    )
    .unwrap();
    env.ok(&["build", "-q", "-t", "busybox:latest", ctx.to_str().unwrap()]);
    std::fs::write(ctx.join("Dockerfile.user"), "FROM busybox:latest\nUSER app\n").unwrap();
    env.ok(&[
        "build",
        "-q",
        "-t",
        "busybox:app",
        "-f",
        ctx.join("Dockerfile.user").to_str().unwrap(),
        ctx.to_str().unwrap(),
    ]);
    Some(Images { env, cgroups_before: container_cgroups(), _serial: serial })
}

/// What is on the machine that a container could leave behind.
fn leftovers(env: &Env) -> Vec<String> {
    let mut out = Vec::new();
    let store = env.root().display().to_string();
    for l in std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines() {
        if l.contains(&store) {
            out.push(format!("mount: {l}"));
        }
    }
    if let Ok(d) = std::fs::read_dir(env.root().join("containers")) {
        for e in d.flatten() {
            out.push(format!("container dir: {}", e.path().display()));
        }
    }
    if let Ok(d) = std::fs::read_dir(env.path("runtime")) {
        for e in d.flatten() {
            out.push(format!("runtime state: {}", e.path().display()));
        }
    }
    out
}

fn new_cgroups(img: &Images) -> Vec<String> {
    container_cgroups()
        .into_iter()
        .filter(|c| !img.cgroups_before.contains(c))
        .map(|c| format!("cgroup: {c}"))
        .collect()
}

fn run(img: &Images, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    twinbox(img, &all)
}

/// Any twinbox command on the test's store: exit code, stdout, stderr.
fn twinbox(img: &Images, args: &[&str]) -> (i32, String, String) {
    img.env.twinbox(args)
}

fn no_leaks(img: &Images) {
    let mut l = leftovers(&img.env);
    l.extend(new_cgroups(img));
    // No container holds an image any more, and what the store keeps is whole: every blob
    // hashes to its name.
    let store = twinbox_image::store::Store::open(img.env.root()).unwrap();
    l.extend(store.holds().unwrap().into_iter().map(|(d, by)| format!("hold on {d}: {by:?}")));
    l.extend(store.verify_all().unwrap().into_iter().map(|d| format!("blob that does not hash to its name: {d}")));
    assert!(l.is_empty(), "left behind: {l:#?}");
}

#[test]
fn exit_codes_pid_1_and_hostname() {
    let Some(img) = images() else { return };
    let img = &img;
    let (code, out, err) =
        run(img, &["--rm", "--hostname", "box1", "busybox", "sh", "-c", "echo pid=$$ host=$(hostname); exit 3"]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(out.trim(), "pid=1 host=box1");
    // A signal to `twinbox run` goes to the container's init.
    let mut child = img
        .env
        .cmd()
        .env("TWINBOX_RUNTIME_ROOT", img.env.path("runtime"))
        .args(["run", "--rm", "busybox", "sh", "-c", "trap 'exit 7' TERM; echo ready; while true; do sleep 0.05; done"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(7), "SIGTERM forwarded, the trap's exit code returned");
    let (code, _, err) = run(img, &["--rm", "busybox", "/nonexistent"]);
    assert_eq!(code, 127, "{err}");
    assert!(err.contains("/nonexistent"), "{err}");
    let (code, _, err) = run(img, &["--rm", "busybox", "/etc/passwd"]);
    assert_eq!(code, 126, "{err}");
    let (code, _, err) = run(img, &["--rm", "no-such-image:1"]);
    assert_eq!(code, 1, "{err}");
    // A malformed reference is named as one, also exit 1.
    for bad in ["UPPER:tag", "", "busybox@sha256:short"] {
        let (code, _, err) = run(img, &["--rm", bad]);
        assert_eq!(code, 1, "{bad:?}: {err}");
        assert!(err.contains("is not an image reference or id"), "{bad:?}: {err}");
    }
    assert!(err.contains("no such image"), "{err}");
    no_leaks(img);
}

#[test]
fn each_rm_run_starts_from_the_image() {
    let Some(img) = images() else { return };
    let img = &img;
    let (code, _, err) = run(img, &["--rm", "busybox", "sh", "-c", "echo scratch > /work/file && cat /work/file"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run(img, &["--rm", "busybox", "sh", "-c", "ls /work"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "", "the copy-on-write layer of the first run is gone");
    no_leaks(img);
}

#[test]
fn image_env_workdir_and_user_are_honoured() {
    let Some(img) = images() else { return };
    let img = &img;
    let (code, out, err) = run(img, &["--rm", "busybox", "sh", "-c", "echo $GREETING $(pwd) $(id -u)"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "hello-from-image /work 0");
    let (_, out, _) =
        run(img, &["--rm", "-e", "GREETING=override", "-w", "/tmp", "busybox", "sh", "-c", "echo $GREETING $(pwd)"]);
    assert_eq!(out.trim(), "override /tmp");
    let (code, out, err) = run(img, &["--rm", "busybox:app", "id"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("uid=1000(app) gid=1000(app)"), "{out}");
    let (_, out, _) = run(img, &["--rm", "-u", "4242:4343", "busybox", "id"]);
    assert!(out.starts_with("uid=4242 gid=4343"), "{out}");
    let (code, _, err) = run(img, &["--rm", "-u", "nobody-here", "busybox", "id"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unable to find user nobody-here"), "{err}");
    // An image by its full ID (`sha256:` and the config digest, as `build -q` prints it).
    let inspect: serde_json::Value = serde_json::from_str(&twinbox(img, &["inspect", "busybox:app"]).1).unwrap();
    let config_id = inspect[0]["Id"].as_str().expect("Id").to_owned();
    let (code, out, err) = run(img, &["--rm", &config_id, "id", "-u"]);
    assert_eq!((code, out.trim()), (0, "1000"), "{err}");
    // exec -u looks the container's image up by its manifest digest.
    let (code, id, err) = run(img, &["-d", "busybox", "sleep", "30"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = twinbox(img, &["exec", "-u", "65534", id.trim(), "id", "-u"]);
    assert_eq!((code, out.trim()), (0, "65534"), "{err}");
    assert_eq!(twinbox(img, &["rm", "-f", id.trim()]).0, 0);
    no_leaks(img);
}

/// A limit the kernel cannot apply is refused with the range, never run without it: `--cpus
/// 1e-9` used to run unlimited, a memory size past i64 meant unlimited, `--cpus 1000` was taken
/// on a 2-CPU host.
#[test]
fn limits_that_cannot_be_applied_are_refused() {
    let Some(img) = images() else { return };
    let img = &img;
    for cpus in ["1e-9", "0.001", "1000", "0"] {
        let (code, _, err) = run(img, &["--rm", "--cpus", cpus, "busybox", "true"]);
        assert_eq!(code, 1, "--cpus {cpus}: {err}");
        assert!(err.contains("give a number from 0.01 to"), "--cpus {cpus}: {err}");
    }
    let (code, _, err) = run(img, &["--rm", "--memory", "99999999999999999999", "busybox", "true"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is too large"), "{err}");
    let (code, out, err) =
        run(img, &["--rm", "--cpus", "0.5", "busybox", "cat", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"]);
    assert_eq!(code, 0, "{err}");
    if !out.trim().is_empty() {
        assert_eq!(out.trim(), "50000");
    }
    no_leaks(img);
}

/// Two runs asking for one name at the same moment: exactly one gets it (both used to, about
/// half the time); the name is free again once its container is removed; a name Docker would
/// refuse is refused.
#[test]
fn a_name_goes_to_one_container_only() {
    let Some(img) = images() else { return };
    let img = &img;
    for trial in 0..8 {
        let name = format!("dup{trial}");
        let codes: Vec<i32> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..2)
                .map(|_| {
                    let name = name.clone();
                    s.spawn(move || run(img, &["-d", "--network", "none", "--name", &name, "busybox", "sleep", "30"]).0)
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(codes.iter().filter(|c| **c == 0).count(), 1, "trial {trial}: {codes:?}");
        let (_, ps, _) = twinbox(img, &["ps", "-a"]);
        assert_eq!(ps.lines().filter(|l| l.ends_with(&name)).count(), 1, "{ps}");
        assert_eq!(twinbox(img, &["rm", "-f", &name]).0, 0);
        let (code, _, err) = run(img, &["--rm", "--network", "none", "--name", &name, "busybox", "true"]);
        assert_eq!(code, 0, "the name is free again: {err}");
    }
    let (code, _, err) = run(img, &["--rm", "--name", "bad/name", "busybox", "true"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("invalid container name"), "{err}");
    no_leaks(img);
}

#[test]
fn memory_limit_oom_kills_with_137() {
    let Some(img) = images() else { return };
    let img = &img;
    let (code, _, err) = run(img, &["--rm", "--memory", "32m", "busybox", "sh", "-c", "head -c 100m /dev/zero | tail"]);
    assert_eq!(code, 137, "{err}");
    assert!(err.contains("OOM"), "the OOM kill is reported: {err}");
    no_leaks(img);
}

#[test]
fn pids_limit_stops_a_fork_bomb() {
    let Some(img) = images() else { return };
    let img = &img;
    // 60 background sleeps: fine without a limit, refused after 20 processes with one.
    let script = "i=0; while [ $i -lt 60 ]; do sleep 2 & i=$((i+1)); done; echo all-started";
    let (code, out, err) = run(img, &["--rm", "busybox", "sh", "-c", script]);
    assert_eq!((code, out.trim()), (0, "all-started"), "{err}");
    let (code, out, err) = run(img, &["--rm", "--pids-limit", "20", "busybox", "sh", "-c", script]);
    assert_ne!(code, 0);
    assert_eq!(out.trim(), "", "the loop did not finish");
    assert!(err.contains("can't fork"), "{err}");
    no_leaks(img);
}

#[test]
fn read_only_caps_masks_and_seccomp() {
    let Some(img) = images() else { return };
    let img = &img;
    let (code, _, err) = run(img, &["--rm", "--read-only", "busybox", "touch", "/x"]);
    assert_eq!(code, 1);
    assert!(err.contains("Read-only file system"), "{err}");
    // CAP_NET_ADMIN is not in the default set.
    let (code, _, err) = run(img, &["--rm", "busybox", "ip", "link", "set", "lo", "down"]);
    assert_ne!(code, 0);
    assert!(err.contains("Operation not permitted"), "{err}");
    // /proc/sys is read-only; masked files read empty.
    let (code, out, err) = run(
        img,
        &[
            "--rm",
            "busybox",
            "sh",
            "-c",
            "echo x > /proc/sys/kernel/ostype; cat /proc/timer_list /proc/keys 2>/dev/null | wc -c",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(out.trim(), "0", "masked paths read empty");
    // The default seccomp profile refuses unshare even though root in the container.
    let (code, _, err) = run(img, &["--rm", "busybox", "unshare", "-u", "true"]);
    assert_ne!(code, 0);
    assert!(err.contains("Operation not permitted"), "{err}");
    // A profile file: mkdir denied with EACCES (13), other syscalls allowed.
    let profile = img.env.path("deny-mkdir.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#,
    )
    .unwrap();
    let opt = format!("seccomp={}", profile.display());
    let (code, _, err) = run(img, &["--rm", "--security-opt", &opt, "busybox", "mkdir", "/tmp/d"]);
    assert_eq!(code, 1);
    assert!(err.contains("Permission denied"), "{err}");
    no_leaks(img);
}

/// Docker's device policy: a container may make any device node (CAP_MKNOD) but open only the
/// standard devices; the host's /dev/kvm and a block device stay closed to it, whatever the
/// cgroup layout (v1 devices controller, or the v2 program).
#[test]
fn host_devices_cannot_be_opened() {
    let Some(img) = images() else { return };
    let img = &img;
    let script = "for n in 'k c 10 232' 'd b 7 0' 'z c 1 5'; do set -- $n; mknod /dev/$1 $2 $3 $4 || exit 3; done
        (exec 3</dev/k) && echo kvm-opened
        (exec 3</dev/d) && echo disk-opened
        head -c 4 /dev/z | wc -c; echo x > /dev/null && echo null-ok";
    let (code, out, err) = run(img, &["--rm", "busybox", "sh", "-c", script]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["4", "null-ok"], "stderr: {err}");
    assert_eq!(err.matches("Operation not permitted").count(), 2, "{err}");
    no_leaks(img);
}

#[test]
fn detached_containers_ps_logs_stop_rm() {
    let Some(img) = images() else { return };
    let img = &img;
    let (code, out, err) = run(img, &["-d", "--name", "sleeper", "busybox", "sh", "-c", "echo up; exec sleep 300"]);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_owned();
    assert_eq!(id.len(), 64);
    let tb = |args: &[&str]| twinbox(img, args);
    let (_, ps, _) = tb(&["ps"]);
    assert!(ps.contains("sleeper") && ps.contains("Up"), "{ps}");
    // Its init's parent is the small monitor installed in the store, not a twinbox process.
    let (_, json, _) = tb(&["ps", "--json"]);
    let pid = serde_json::from_str::<serde_json::Value>(&json).unwrap()[0]["phase"]["pid"].as_i64().unwrap();
    // (Its launcher may be ending still when `run -d` returns.)
    let parent = |pid: i64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let ppid = stat.rsplit_once(')').unwrap().1.split_whitespace().nth(1).unwrap().to_owned();
            match std::fs::read_link(format!("/proc/{ppid}/exe")) {
                Ok(exe) if exe.starts_with(img.env.root().join("bin")) => return (ppid, exe),
                other if std::time::Instant::now() > deadline => panic!("parent {ppid}: {other:?}"),
                _ => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    };
    let (ppid, monitor) = parent(pid);
    assert!(monitor.starts_with(img.env.root().join("bin")), "{}", monitor.display());
    assert!(std::fs::metadata(&monitor).unwrap().len() < 64 * 1024, "{}", monitor.display());
    // Its mount points come from a shared lower layer: nothing in its upper layer yet.
    let upper = img.env.root().join("containers").join(&id).join("upper");
    let written: Vec<_> = std::fs::read_dir(&upper).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(written.is_empty(), "{}: {written:?}", upper.display());
    // A second detached container has the same monitor: one per store.
    let (code, out, err) = run(img, &["-d", "busybox", "sleep", "300"]);
    assert_eq!(code, 0, "{err}");
    let (_, json, _) = tb(&["ps", "--json"]);
    let all: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let second = all.iter().find(|c| c["id"] == out.trim()).unwrap()["phase"]["pid"].as_i64().unwrap();
    assert_eq!(parent(second).0, ppid);
    assert_eq!(tb(&["rm", "-f", out.trim()]).0, 0);
    // A container that ends by itself: its code is recorded.
    let (code, _, err) = run(img, &["-d", "--name", "three", "busybox", "sh", "-c", "exit 3"]);
    assert_eq!(code, 0, "{err}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !tb(&["ps", "-a"]).1.contains("Exited (3)") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(tb(&["ps", "-a"]).1.contains("Exited (3)"), "{}", tb(&["ps", "-a"]).1);
    assert_eq!(tb(&["rm", "three"]).0, 0);
    // exec joins the container: same hostname, sees its pid 1, gets the extra env.
    let (code, out, err) =
        tb(&["exec", "-e", "X=42", "sleeper", "sh", "-c", "echo $X $(hostname) $(cat /proc/1/comm)"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("42 {} sleep", &id[..12]));
    assert_eq!(tb(&["exec", "sleeper", "sh", "-c", "exit 5"]).0, 5);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(tb(&["logs", "sleeper"]).1.trim(), "up");
    let (code, _, err) = tb(&["rm", "sleeper"]);
    assert_eq!(code, 1, "rm of a running container refuses");
    assert!(err.contains("running"), "{err}");
    let (code, _, err) = tb(&["stop", "-t", "1", "sleeper"]);
    assert_eq!(code, 0, "{err}");
    let (_, ps, _) = tb(&["ps", "-a"]);
    assert!(ps.contains("Exited (143)") || ps.contains("Exited (137)"), "{ps}");
    let (code, _, err) = tb(&["rm", "sleeper"]);
    assert_eq!(code, 0, "{err}");
    // -d --rm: the monitor removes the container when it exits.
    let (code, _, err) = run(img, &["-d", "--rm", "busybox", "true"]);
    assert_eq!(code, 0, "{err}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !leftovers(&img.env).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    no_leaks(img);
    let pg = Command::new("pgrep").args(["-f", &id]).output().unwrap();
    assert!(pg.stdout.is_empty(), "no process mentions the container");
}

#[test]
fn foreground_output_is_kept_for_logs_unless_rm() {
    let Some(img) = images() else { return };
    let img = &img;
    let (code, out, err) = run(img, &["--name", "fg", "busybox", "sh", "-c", "echo to-out; echo to-err >&2; exit 4"]);
    assert_eq!(code, 4, "{err}");
    // The run's own streams stay apart; the log has both.
    assert_eq!(out, "to-out\n");
    assert!(err.contains("to-err") && !err.contains("to-out"), "{err}");
    let log = twinbox(img, &["logs", "fg"]).1;
    let mut lines: Vec<&str> = log.lines().collect();
    lines.sort();
    assert_eq!(lines, ["to-err", "to-out"], "{log:?}");
    // A second start (detached, under a monitor) appends to the same log, as Docker's does.
    assert_eq!(twinbox(img, &["start", "fg"]).0, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while twinbox(img, &["logs", "fg"]).1.lines().count() < 4 {
        assert!(std::time::Instant::now() < deadline, "the restarted container's output is not in the log");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    while twinbox(img, &["rm", "fg"]).0 != 0 {
        assert!(std::time::Instant::now() < deadline, "the restarted container did not exit");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A reader that stops early (`| head -1`) ends the run: the container gets EPIPE as it
    // would writing to the closed pipe itself.
    let mut cmd = img.env.cmd();
    cmd.env("TWINBOX_RUNTIME_ROOT", img.env.path("runtime"));
    let mut child = cmd
        .args(["run", "--name", "endless", "busybox", "sh", "-c", "while echo y; do :; done; exit 9"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = [0u8; 2];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    assert_eq!(&first, b"y\n");
    drop(child.stdout.take());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the run went on after its reader closed the pipe");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(matches!(status.code(), Some(9 | 141)), "{status:?}");
    assert_eq!(twinbox(img, &["rm", "endless"]).0, 0);
    // --rm keeps nothing, and its output still reaches the caller.
    let (code, out, _) = run(img, &["--rm", "--name", "gone", "busybox", "echo", "direct"]);
    assert_eq!((code, out.as_str()), (0, "direct\n"));
    assert!(twinbox(img, &["logs", "gone"]).2.contains("no such container"));
    no_leaks(img);
}

#[test]
fn a_hundred_containers_sixteen_at_a_time() {
    let Some(img) = images() else { return };
    let img = &img;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= 100 {
                    break;
                }
                let (code, out, err) = run(img, &["--rm", "busybox", "sh", "-c", &format!("echo {i}")]);
                if code != 0 || out.trim() != i.to_string() {
                    failures.lock().unwrap().push(format!("#{i}: exit {code}, out {out:?}, err {err}"));
                }
            });
        }
    });
    let f = failures.into_inner().unwrap();
    assert!(f.is_empty(), "{} of 100 failed: {f:#?}", f.len());
    no_leaks(img);
}

/// `twinbox run --rm` killed with SIGKILL at several points of its create and run: afterwards
/// `twinbox system prune` removes the half-made containers (their inits waiting on exec.fifo,
/// cgroups, runtime state) and, once their workloads have ended, the ones nobody was left to
/// record; nothing stays: no process, container, runtime state, cgroup or mount.
#[test]
fn a_killed_run_is_put_right_by_system_prune() {
    let Some(img) = images() else { return };
    let img = &img;
    let marker = format!("tbkill{}", std::process::id());
    let script = format!("sleep 1; : {marker}");
    let with_marker = || -> usize {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker))
            })
            .count()
    };
    for delay_ms in [2, 5, 8, 10, 12, 15, 20, 25, 30, 40, 80, 300] {
        let mut child = img
            .env
            .cmd()
            .env("TWINBOX_RUNTIME_ROOT", img.env.path("runtime"))
            .args(["run", "--rm", "--network", "none", "busybox", "sh", "-c", &script])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let (code, out, err) = twinbox(img, &["system", "prune"]);
    assert_eq!(code, 0, "{err}");
    // The workloads that were running end within a second; then they are finished too.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while with_marker() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(with_marker(), 0, "no process of the killed runs is left (first prune said: {out})");
    // Each prune finishes what has ended by then (an init whose parent was killed may linger
    // as a zombie for a moment before the prune sees it gone).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (code, _, err) = twinbox(img, &["system", "prune"]);
        assert_eq!(code, 0, "{err}");
        if twinbox(img, &["ps", "-aq"]).1.trim().is_empty() || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let left = twinbox(img, &["ps", "-a", "--json"]).1;
    assert_eq!(twinbox(img, &["ps", "-aq"]).1.trim(), "", "every container removed (--rm): {left}");
    assert_eq!(twinbox(img, &["system", "prune"]).1.trim(), "nothing to put right");
    no_leaks(img);
}

/// `run` racing `rmi -f` + `prune` (the image loaded again each time): every run either finds
/// no image (exit 125, "no such image") or runs on its whole root filesystem; none starts on a
/// root prune took layers from, or fails to mount one. Bounded: 6 s of each loop.
#[test]
fn runs_racing_rmi_and_prune_see_whole_images_or_none() {
    let Some(img) = images() else { return };
    let img = &img;
    let archive = img.env.path("busybox.tar");
    let (code, _, err) = twinbox(img, &["save", "-o", archive.to_str().unwrap(), "busybox"]);
    assert_eq!(code, 0, "{err}");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(6);
    let (runs, bad) = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = twinbox(img, &["load", "-i", archive.to_str().unwrap()]);
                let _ = twinbox(img, &["rmi", "-f", "busybox"]);
                let _ = twinbox(img, &["prune"]);
            }
        });
        let (mut runs, mut bad) = (0, Vec::new());
        while std::time::Instant::now() < until {
            let (code, out, err) = run(img, &["--rm", "--network", "none", "busybox", "cat", "/etc/passwd"]);
            runs += 1;
            let whole = code == 0 && out.starts_with("root:");
            let no_image = code != 0 && err.contains("no such image");
            if !whole && !no_image {
                bad.push(format!("exit {code}: {out}{err}"));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (runs, bad)
    });
    assert!(runs > 10, "only {runs} runs");
    assert!(bad.is_empty(), "{} of {runs} runs went wrong: {bad:#?}", bad.len());
    let _ = twinbox(img, &["load", "-i", archive.to_str().unwrap()]);
    no_leaks(img);
}

/// `run -it`: the workload's stdio is a terminal of its own (a pty in the container) proxied to
/// ours: it sees a tty on 0 and 1, reads what is typed, and its exit code is the run's. `-t`
/// with `-d` is refused (there is no attach).
#[test]
fn run_it_gives_the_workload_a_terminal() {
    let Some(img) = images() else { return };
    let img = &img;
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = || std::process::Stdio::from(pty.slave.try_clone().unwrap());
    let mut child = img
        .env
        .cmd()
        .env("TWINBOX_RUNTIME_ROOT", img.env.path("runtime"))
        .args(["run", "--rm", "-it", "--network", "none", "busybox", "sh", "-c"])
        .arg("test -t 0 && test -t 1 && echo both-ttys; read line; echo got-$line; exit 3")
        .stdin(slave())
        .stdout(slave())
        .stderr(slave())
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);
    std::io::Write::write_all(&mut master, b"typed\n").unwrap();
    // Read until the workload's last words (bounded by the child's exit and a deadline).
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut buf = [0u8; 1024];
    while std::time::Instant::now() < deadline && !String::from_utf8_lossy(&out).contains("got-typed") {
        let mut fds = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(&master), nix::poll::PollFlags::POLLIN)];
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16)).unwrap_or(0) > 0 {
            match std::io::Read::read(&mut master, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    }
    let status = child.wait().unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("both-ttys"), "{out}");
    assert!(out.contains("got-typed"), "{out}");
    assert_eq!(status.code(), Some(3), "{out}");
    let (code, _, err) = run(img, &["-d", "-t", "busybox", "true"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("-t with -d"), "{err}");
    no_leaks(img);
}

/// A `twinbox` command on the test's store and runtime root, to spawn with stdio of our own.
fn twinbox_cmd(img: &Images, args: &[&str]) -> Command {
    let mut cmd = img.env.cmd();
    cmd.env("TWINBOX_RUNTIME_ROOT", img.env.path("runtime")).args(args);
    cmd
}

/// Runs `cmd` with `input` written to its stdin (then closed); exit code, stdout, stderr.
fn with_input(mut cmd: Command, input: &[u8]) -> (i32, String, String) {
    use std::process::Stdio;
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // A process that does not read it may be gone already: EPIPE is not the test's concern.
    let _ = std::io::Write::write_all(&mut stdin, input);
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// Reads `r` line by line until a line contains `want` (or end of file, or `deadline`); the
/// lines read.
fn read_until(r: &mut impl std::io::BufRead, want: &str, deadline: std::time::Instant) -> String {
    let mut out = String::new();
    while std::time::Instant::now() < deadline && !out.contains(want) {
        match r.read_line(&mut out) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    out
}

/// A terminal's line discipline is in canonical (cooked) mode: not raw.
fn cooked(fd: &std::os::fd::OwnedFd) -> bool {
    nix::sys::termios::tcgetattr(fd).unwrap().local_flags.contains(nix::sys::termios::LocalFlags::ICANON)
}

/// `exec` without `-i` gives the process /dev/null as stdin (what we pipe in is not read, and
/// the process does not wait for it); with `-i` our stdin. `-it` with a stdin that is not a
/// terminal is refused, as Docker refuses it.
#[test]
fn exec_reads_our_stdin_only_with_i() {
    let Some(img) = images() else { return };
    let img = &img;
    let (code, _, err) = run(img, &["-d", "--name", "c", "--network", "none", "busybox", "sleep", "300"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = with_input(twinbox_cmd(img, &["exec", "c", "cat"]), b"hi\n");
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    let (code, out, err) = with_input(twinbox_cmd(img, &["exec", "c", "sh", "-c", "readlink /proc/self/fd/0"]), b"");
    assert_eq!((code, out.trim()), (0, "/dev/null"), "{err}");
    let (code, out, err) = with_input(twinbox_cmd(img, &["exec", "-i", "c", "cat"]), b"hi\n");
    assert_eq!((code, out.as_str()), (0, "hi\n"), "{err}");
    let (code, out, err) =
        with_input(twinbox_cmd(img, &["exec", "--interactive", "c", "sh", "-c", "cat; exit 6"]), b"x\n");
    assert_eq!((code, out.as_str()), (6, "x\n"), "{err}");
    let (code, out, err) = with_input(twinbox_cmd(img, &["exec", "-it", "c", "cat"]), b"hi\n");
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(err.contains("the input device is not a TTY"), "{err}");
    assert_eq!(twinbox(img, &["rm", "-f", "c"]).0, 0);
    no_leaks(img);
}

/// `exec -t` gives the process a pty of its own, also when we have no terminal (Docker's rule:
/// only `-it` needs one); its output reaches our stdout and its exit code is ours. Given a
/// terminal (as stdin, or as stdout only), the pty has its size from the start and follows it
/// on SIGWINCH; without `-i` our terminal is left in its modes and nothing is read from it.
#[test]
fn exec_t_gives_a_pty_sized_as_ours() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let Some(img) = images() else { return };
    let img = &img;
    let (code, _, err) = run(img, &["-d", "--name", "c", "--network", "none", "busybox", "sleep", "300"]);
    assert_eq!(code, 0, "{err}");
    // No terminal on our side at all.
    let (code, out, err) = with_input(twinbox_cmd(img, &["exec", "-t", "c", "tty"]), b"");
    assert_eq!(code, 0, "{err}");
    let tty = out.trim();
    assert!(tty.starts_with("/dev/pts/") && tty[9..].parse::<u32>().is_ok(), "{out:?}");
    let (code, out, err) = with_input(twinbox_cmd(img, &["exec", "-t", "c", "sh", "-c", "tty; exit 4"]), b"");
    assert_eq!(code, 4, "{err}");
    assert!(out.trim().starts_with("/dev/pts/"), "{out:?}");
    // Without -t no pty.
    let (code, out, _) = with_input(twinbox_cmd(img, &["exec", "c", "tty"]), b"");
    assert_eq!((code, out.trim()), (1, "not a tty"));

    // Our stdin a 33x120 terminal: the pty's size from the start, then a resize followed.
    let size = nix::pty::Winsize { ws_row: 33, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0 };
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    // (Bounded, so that a resize that never comes fails the test instead of hanging it.)
    let script = "trap 'stty size; exit 0' WINCH; stty size; test -t 0 && echo in-tty; \
                  i=0; while [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; echo no-winch";
    let mut child = twinbox_cmd(img, &["exec", "-t", "c", "sh", "-c", script])
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let first = read_until(&mut out, "in-tty", Instant::now() + Duration::from_secs(20));
    assert_eq!(first.split_whitespace().collect::<Vec<_>>(), ["33", "120", "in-tty"], "{first:?}");
    assert!(cooked(&pty.slave), "-t without -i left our terminal's modes alone");
    twinbox_runtime::terminal::set_size(std::os::fd::AsRawFd::as_raw_fd(&pty.master), 40, 100).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGWINCH).unwrap();
    let resized = read_until(&mut out, "100", Instant::now() + Duration::from_secs(20));
    assert_eq!(resized.trim(), "40 100", "{resized:?}");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));

    // Our stdout the terminal (stdin /dev/null): its size, its output there.
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    let mut child = twinbox_cmd(img, &["exec", "-t", "c", "stty", "size"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    let mut shown = Vec::new();
    let mut buf = [0u8; 256];
    // Ends with EIO once the slave is closed everywhere and what it held is read.
    while let Ok(n @ 1..) = std::io::Read::read(&mut master, &mut buf) {
        shown.extend_from_slice(&buf[..n]);
    }
    let shown = String::from_utf8_lossy(&shown);
    assert_eq!(status.code(), Some(0), "{shown:?}");
    assert_eq!(shown.trim(), "33 120");

    assert_eq!(twinbox(img, &["rm", "-f", "c"]).0, 0);
    no_leaks(img);
}

/// `exec -it`: what is typed reaches the process through its pty, our terminal is raw while it
/// runs and cooked again after.
#[test]
fn exec_it_passes_what_is_typed_and_restores_the_terminal() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let Some(img) = images() else { return };
    let img = &img;
    let (code, _, err) = run(img, &["-d", "--name", "c", "--network", "none", "busybox", "sleep", "300"]);
    assert_eq!(code, 0, "{err}");
    let pty = nix::pty::openpty(None, None).unwrap();
    assert!(cooked(&pty.slave));
    let mut child =
        twinbox_cmd(img, &["exec", "-it", "c", "sh", "-c", "echo ready; read -t 20 line; echo got-$line; exit 3"])
            .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let ready = read_until(&mut out, "ready", Instant::now() + Duration::from_secs(20));
    assert!(ready.contains("ready"), "{ready:?}");
    assert!(!cooked(&pty.slave), "our terminal is raw while the process runs");
    let mut master = std::fs::File::from(pty.master);
    std::io::Write::write_all(&mut master, b"typed\n").unwrap();
    let got = read_until(&mut out, "got-", Instant::now() + Duration::from_secs(20));
    assert!(got.contains("got-typed"), "{got:?}");
    assert_eq!(child.wait().unwrap().code(), Some(3));
    assert!(cooked(&pty.slave), "our terminal is cooked again");
    assert_eq!(twinbox(img, &["rm", "-f", "c"]).0, 0);
    no_leaks(img);
}

#[test]
fn volumes_outlive_containers_and_host_paths_bind() {
    let Some(img) = images() else { return };
    let img = &img;
    // A named volume, made by its first use, keeps what one container wrote for the next.
    let (code, _, err) = run(img, &["--rm", "-v", "data:/data", "busybox", "sh", "-c", "echo kept > /data/f"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) =
        run(img, &["--rm", "-v", "data:/data:ro", "busybox", "sh", "-c", "cat /data/f; echo x > /data/g"]);
    assert_eq!(out, "kept\n", "{err}");
    assert_ne!(code, 0, ":ro refuses writes");
    assert!(err.contains("Read-only file system"), "{err}");
    let data = img.env.root().join("volumes/data/_data");
    assert_eq!(std::fs::read_to_string(data.join("f")).unwrap(), "kept\n", "Docker's layout: _data on the host");
    // A host path must exist (a typo is not bound as an empty directory); what the container
    // writes is there.
    let host = img.env.path("shared");
    let bind = format!("{}:/mnt/shared", host.display());
    let (code, _, err) = run(img, &["--rm", "-v", &bind, "busybox", "true"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("the host path {} does not exist; create it first", host.display())), "{err}");
    std::fs::create_dir(&host).unwrap();
    let (code, _, err) =
        run(img, &["--rm", "-v", &bind, "busybox", "sh", "-c", "echo from-container > /mnt/shared/out"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(host.join("out")).unwrap(), "from-container\n");
    // ls, inspect, and rm refused while a container (even a stopped one) mounts it.
    let (_, out, _) = twinbox(img, &["volume", "ls"]);
    assert!(out.lines().any(|l| l.starts_with("local") && l.ends_with(" data")), "{out}");
    let (code, out, err) = twinbox(img, &["volume", "inspect", "data"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("\"data\": \"{}\"", data.display())), "{out}");
    let (code, _, err) = run(img, &["--name", "user", "-v", "data:/data", "busybox", "true"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = twinbox(img, &["volume", "rm", "data"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("volume data is in use by user; remove it first"), "{err}");
    twinbox(img, &["rm", "user"]);
    let (code, out, err) = twinbox(img, &["volume", "rm", "data"]);
    assert_eq!((code, out.as_str()), (0, "data\n"), "{err}");
    assert!(!img.env.root().join("volumes/data").exists());
    // Bad input is named, exit 1, and leaves no container or volume.
    for (spec, why) in [
        ("data:relative", "TARGET must be an absolute path"),
        ("/only", "give SOURCE:TARGET"),
        ("data:/x:z", "unknown option \"z\""),
        ("bad name:/x", "SOURCE is an absolute host path or a volume name"),
    ] {
        let (code, _, err) = run(img, &["--rm", "-v", spec, "busybox", "true"]);
        assert_eq!(code, 1, "{spec}: {err}");
        assert!(err.contains(&format!("-v {spec}: {why}")), "{spec}: {err}");
    }
    let (code, _, err) = twinbox(img, &["volume", "create", "--driver", "nfs", "x"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unknown volume driver \"nfs\""), "{err}");
    let (_, out, _) = twinbox(img, &["volume", "ls", "-q"]);
    assert_eq!(out, "", "no volume left");
    // Into a microVM: a host path, and a local volume, are refused by name before any boot.
    twinbox(img, &["volume", "create", "cdir"]);
    let (code, _, err) = run(img, &["--rm", "--isolation", "microvm", "-v", &bind, "busybox", "true"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("a host directory cannot go into a microVM"), "{err}");
    let (code, _, err) = run(img, &["--rm", "--isolation", "microvm", "-v", "cdir:/x", "busybox", "true"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("volume cdir is a local volume: a directory, which a microVM cannot mount"), "{err}");
    twinbox(img, &["volume", "rm", "cdir"]);
    no_leaks(img);
}

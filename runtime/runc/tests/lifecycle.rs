//! End-to-end lifecycle tests of `twinbox-runc` with a busybox bundle. Need root; each test
//! ends with a leak check (state dir, cgroups, processes, mounts).

mod common;

use std::time::Duration;

use common::{stderr, stdout, Env};
use serde_json::json;

macro_rules! env_or_skip {
    ($name:expr) => {
        match Env::new($name) {
            Some(e) => e,
            None => return,
        }
    };
}

#[test]
fn run_echo_captures_stdout() {
    let mut env = env_or_skip!("run_echo");
    env.args(&["echo", "hello", "world"]);
    let out = env.run();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello world\n");
    env.assert_no_leaks();
}

#[test]
fn exit_code_propagates() {
    let mut env = env_or_skip!("exit_code");
    env.args(&["sh", "-c", "exit 3"]);
    let out = env.run();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    env.assert_no_leaks();
}

#[test]
fn killed_process_exits_128_plus_signal() {
    let mut env = env_or_skip!("signal_exit");
    // Not pid 1 of its own namespace, so the shell can kill itself.
    env.spec["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]);
    env.args(&["sh", "-c", "kill -KILL $$"]);
    let out = env.run();
    assert_eq!(out.status.code(), Some(128 + 9), "{}", stderr(&out));
    env.assert_no_leaks();
}

#[test]
fn init_is_pid_one() {
    let mut env = env_or_skip!("pid_one");
    env.args(&["sh", "-c", "echo $$"]);
    let out = env.run();
    assert_eq!(stdout(&out), "1\n", "{}", stderr(&out));
    env.assert_no_leaks();
}

#[test]
fn hostname_is_set() {
    let mut env = env_or_skip!("hostname");
    env.args(&["hostname"]);
    let out = env.run();
    assert_eq!(stdout(&out), "twinbox-test\n", "{}", stderr(&out));
    env.assert_no_leaks();
}

#[test]
fn loopback_is_up() {
    let mut env = env_or_skip!("loopback");
    env.args(&["cat", "/sys/class/net/lo/flags"]);
    let out = env.run();
    let flags = u32::from_str_radix(stdout(&out).trim().trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("{:?} {}", stdout(&out), stderr(&out)));
    assert_eq!(flags & 1, 1, "lo not up: {flags:#x}");
    env.assert_no_leaks();
}

#[test]
fn create_start_state_delete() {
    let mut env = env_or_skip!("lifecycle");
    env.args(&["sh", "-c", "echo started; sleep 0.5"]);
    let pid_file = env.tmp.path().join("pid");
    env.write();
    let b = env.bundle.display().to_string();
    let p = pid_file.display().to_string();
    // The init inherits create's stdout and stderr: files, not pipes we would wait on.
    let err_path = env.tmp.path().join("create.err");
    let status = env
        .cmd(&["create", "-b", &b, "--pid-file", &p, &env.id])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(env.tmp.path().join("container.out")).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "{}", std::fs::read_to_string(&err_path).unwrap_or_default());

    let st = env.state().expect("state after create");
    assert_eq!(st["status"], "created");
    assert_eq!(st["id"], env.id.as_str());
    assert_eq!(st["ociVersion"].as_str().map(|v| v.starts_with("1.")), Some(true));
    let pid = st["pid"].as_i64().unwrap();
    assert!(pid > 0);
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), pid.to_string());
    assert_eq!(st["bundle"], json!(env.bundle.canonicalize().unwrap()));
    // Nothing ran yet.
    assert_eq!(env.container_out(), "");

    let list = env.runc(&["list", "-q"]);
    assert_eq!(stdout(&list), format!("{}\n", env.id));

    let out = env.runc(&["start", &env.id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(env.status().as_deref(), Some("running"));
    // A second start is refused.
    let again = env.runc(&["start", &env.id]);
    assert_eq!(again.status.code(), Some(1));

    env.wait_status("stopped", Duration::from_secs(5));
    assert_eq!(env.container_out(), "started\n");
    assert_eq!(env.state().unwrap()["pid"], 0);
    let again = env.runc(&["start", &env.id]);
    assert!(stderr(&again).contains("cannot start a container that has stopped"), "{}", stderr(&again));

    let out = env.runc(&["delete", &env.id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(env.state().is_none());
    env.assert_no_leaks();
}

#[test]
fn kill_with_term_and_9() {
    let mut env = env_or_skip!("kill");
    // As pid 1 the shell only gets signals it handles: trap TERM.
    env.args(&["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.05; done"]);
    assert_eq!(env.create().0, 0);
    assert!(env.runc(&["start", &env.id]).status.success());
    assert_eq!(env.status().as_deref(), Some("running"));
    let out = env.runc(&["kill", &env.id, "TERM"]);
    assert!(out.status.success(), "{}", stderr(&out));
    env.wait_status("stopped", Duration::from_secs(5));
    // Killing a stopped container is an error.
    let out = env.runc(&["kill", &env.id, "KILL"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("container not running"), "{}", stderr(&out));
    assert!(env.runc(&["delete", &env.id]).status.success());
    env.assert_no_leaks();

    env.args(&["sleep", "1000"]);
    assert_eq!(env.create().0, 0);
    assert!(env.runc(&["start", &env.id]).status.success());
    let out = env.runc(&["kill", &env.id, "9"]);
    assert!(out.status.success(), "{}", stderr(&out));
    env.wait_status("stopped", Duration::from_secs(5));
    assert!(env.runc(&["delete", &env.id]).status.success());
    env.assert_no_leaks();
}

#[test]
fn delete_force_of_running_container() {
    let mut env = env_or_skip!("force");
    env.args(&["sleep", "1000"]);
    assert_eq!(env.create().0, 0);
    assert!(env.runc(&["start", &env.id]).status.success());
    let out = env.runc(&["delete", &env.id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("that is not stopped: running"), "{}", stderr(&out));
    let out = env.runc(&["delete", "--force", &env.id]);
    assert!(out.status.success(), "{}", stderr(&out));
    env.assert_no_leaks();
}

#[test]
fn delete_of_created_container() {
    let mut env = env_or_skip!("delete_created");
    env.args(&["sleep", "1000"]);
    assert_eq!(env.create().0, 0);
    let out = env.runc(&["delete", &env.id]);
    assert!(out.status.success(), "{}", stderr(&out));
    env.assert_no_leaks();
}

#[test]
fn unknown_id_errors_like_runc() {
    let env = env_or_skip!("unknown");
    for args in
        [vec!["state", "nope"], vec!["start", "nope"], vec!["kill", "nope"], vec!["delete", "nope"], vec!["ps", "nope"]]
    {
        let out = env.runc(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains("container does not exist"), "{args:?}: {}", stderr(&out));
    }
    // --log-format json writes runc's error lines.
    let log = env.tmp.path().join("log.json");
    let out = env.cmd(&["--log", log.to_str().unwrap(), "--log-format", "json", "state", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&log).unwrap().lines().last().unwrap()).unwrap();
    assert_eq!(line["level"], "error");
    assert_eq!(line["msg"], "container does not exist");
    assert!(line["time"].is_string());
}

#[test]
fn existing_id_is_refused() {
    let mut env = env_or_skip!("exists");
    env.args(&["sleep", "1000"]);
    assert_eq!(env.create().0, 0);
    let (code, err) = env.create();
    assert_eq!(code, 1);
    assert!(err.contains("container with id exists"), "{err}");
    assert_eq!(env.status().as_deref(), Some("created"));
    assert!(env.runc(&["delete", "--force", &env.id]).status.success());
    env.assert_no_leaks();
}

#[test]
fn bad_oci_version_is_refused() {
    let mut env = env_or_skip!("version");
    env.spec["ociVersion"] = json!("2.0.0");
    let (code, err) = env.create();
    assert_eq!(code, 1);
    assert!(err.contains("unsupported ociVersion \"2.0.0\""), "{err}");
    env.assert_no_leaks();
}

/// As runc: a relative `process.cwd` is refused; a `root.path` that is a file, or the host's
/// `/`, is refused naming root.path. Before anything is made.
#[test]
fn relative_cwd_and_unusable_root_paths_are_refused() {
    let mut env = env_or_skip!("relative_cwd");
    env.spec["process"]["cwd"] = json!("work");
    let (code, err) = env.create();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("process.cwd must be an absolute path"), "{err}");
    env.assert_no_leaks();

    let mut env = env_or_skip!("root_is_file");
    std::fs::write(env.bundle.join("afile"), "x").unwrap();
    env.spec["root"]["path"] = json!("afile");
    let (code, err) = env.create();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("root.path") && err.contains("is not a directory"), "{err}");
    env.assert_no_leaks();

    let mut env = env_or_skip!("root_is_slash");
    env.spec["root"]["path"] = json!("/");
    let (code, err) = env.create();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("root.path /") && err.contains("host's root"), "{err}");
    env.assert_no_leaks();
}

/// runtime-tools' rootfsPropagation case, which runc passes: a `shared` root is accepted (it
/// used to be refused at create) and the container's `/` is a shared mount in its own
/// mountinfo; `slave` is applied too.
#[test]
fn shared_and_slave_root_propagation() {
    for propagation in ["rshared", "shared", "rslave"] {
        let mut env = env_or_skip!("root_propagation");
        env.spec["linux"]["rootfsPropagation"] = json!(propagation);
        env.args(&["cat", "/proc/self/mountinfo"]);
        let out = env.run();
        assert_eq!(out.status.code(), Some(0), "{propagation}: {}", stderr(&out));
        let info = stdout(&out);
        // The optional fields of the mount at `target`: "shared:N", "master:N" or none.
        let tags = |target: &str| {
            let line = info.lines().find(|l| l.split(' ').nth(4) == Some(target)).unwrap_or_default();
            line.split(" - ").next().unwrap_or_default().split(' ').skip(6).collect::<Vec<_>>().join(" ")
        };
        match propagation {
            "rshared" => {
                assert!(tags("/").starts_with("shared:"), "{info}");
                assert!(tags("/proc").starts_with("shared:"), "recursively: {info}");
            }
            "shared" => {
                assert!(tags("/").starts_with("shared:"), "{info}");
                assert_eq!(tags("/proc"), "", "not recursively: {info}");
            }
            // A slave of a private mount is private, as under runc.
            _ => assert_eq!(tags("/"), "", "{info}"),
        }
        env.assert_no_leaks();
    }
}

/// A spec without a mount namespace runs the container in the host's, as runc does
/// (runtime-tools' "inherit namespace … without type" cases): its mount namespace is this
/// test's, its root is the bundle's (a chroot), its mounts are made under that root, `exec`
/// finds the same root, and `delete` (or a failed create) leaves no mount behind.
#[test]
fn no_mount_namespace_shares_the_hosts() {
    let drop_mount_ns = |env: &mut Env| {
        let list = env.spec["linux"]["namespaces"].as_array_mut().unwrap();
        list.retain(|n| n["type"] != "mount");
    };
    let mut env = env_or_skip!("host_mount_ns");
    drop_mount_ns(&mut env);
    env.args(&["sh", "-c", "readlink /proc/self/ns/mnt; test -x /bin/busybox && echo chrooted; grep -c ' /proc ' /proc/self/mountinfo; sleep 1000"]);
    let (code, err) = env.create();
    assert_eq!(code, 0, "{err}");
    // Its mounts are in this namespace, under its root.
    let rootfs = std::fs::canonicalize(&env.rootfs).unwrap().display().to_string();
    let ours = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(ours.lines().any(|l| l.split(' ').nth(4) == Some(&format!("{rootfs}/proc"))), "{ours}");
    assert!(env.runc(&["start", &env.id]).status.success());
    let exec = env.runc(&[
        "exec",
        &env.id,
        "sh",
        "-c",
        "readlink /proc/self/ns/mnt; test -x /bin/busybox && echo exec-chrooted",
    ]);
    assert!(exec.status.success(), "{}", stderr(&exec));
    let host_ns = std::fs::read_link("/proc/self/ns/mnt").unwrap().display().to_string();
    assert_eq!(stdout(&exec), format!("{host_ns}\nexec-chrooted\n"));
    let out = env.runc(&["delete", "--force", &env.id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = env.container_out();
    assert!(said.starts_with(&format!("{host_ns}\nchrooted\n1\n")), "{said}");
    env.assert_no_leaks();

    // A create that fails after its first mounts takes them down too.
    let mut env = env_or_skip!("host_mount_ns_failed");
    drop_mount_ns(&mut env);
    let bad = json!({"destination": "/mnt", "type": "nosuchfs", "source": "none"});
    env.spec["mounts"].as_array_mut().unwrap().push(bad);
    let (code, err) = env.create();
    assert_eq!(code, 1, "{err}");
    env.assert_no_leaks();
}

#[test]
fn mount_failing_before_the_cgroups_are_made_is_reported() {
    // The init mounts what comes before the first cgroup mount while the runtime is still
    // making the cgroups: a failure there must still come back as the init's own error.
    for at_start in [true, false] {
        let mut env = env_or_skip!("early_mount");
        let bad = json!({"destination": "/mnt", "type": "nosuchfs", "source": "none"});
        let mounts = env.spec["mounts"].as_array_mut().unwrap();
        if at_start {
            mounts.insert(0, bad);
        } else {
            mounts.push(bad);
        }
        let (code, err) = env.create();
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("container init failed: mounting none on /mnt"), "{err}");
        env.assert_no_leaks();
    }
}

#[test]
fn cgroup_limit_failing_after_the_clone_kills_the_init_and_leaves_nothing() {
    // The v1 limits are written after the init was cloned into its cgroup v2 directory (on a
    // v1 or hybrid host): a limit the kernel refuses must take the init down with the
    // directories.
    let mut env = env_or_skip!("late_cgroup_error");
    env.args(&["sleep", "1000"]);
    env.spec["linux"]["resources"]["cpu"] = json!({"cpus": "999"});
    let (code, err) = env.create();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cpuset.cpus"), "{err}");
    env.assert_no_leaks();
}

#[test]
fn escaping_mount_target_is_refused() {
    let mut env = env_or_skip!("escape");
    let outside = env.tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    env.spec["mounts"].as_array_mut().unwrap().push(
        json!({"destination": "/../../../../../../../../tmp/twinbox-escape", "type": "tmpfs", "source": "tmpfs"}),
    );
    // And a symlink inside the rootfs that leads out.
    std::os::unix::fs::symlink("../../../../../../../..", env.rootfs.join("etc/up")).unwrap();
    let (code, err) = env.create();
    assert_eq!(code, 1);
    assert!(err.contains("escapes the container root"), "{err}");
    assert!(!std::path::Path::new("/tmp/twinbox-escape").exists());
    env.assert_no_leaks();

    env.spec["mounts"].as_array_mut().unwrap().pop();
    env.spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/etc/up/tmp/twinbox-escape2", "type": "tmpfs", "source": "tmpfs"}));
    let (code, err) = env.create();
    assert_eq!(code, 1);
    assert!(err.contains("escapes the container root"), "{err}");
    assert!(!std::path::Path::new("/tmp/twinbox-escape2").exists());
    env.assert_no_leaks();
}

#[test]
fn masked_and_readonly_paths() {
    let mut env = env_or_skip!("masked");
    // /proc/kcore only exists with CONFIG_PROC_KCORE; check whichever masked files exist.
    let files: Vec<&str> = ["/proc/kcore", "/proc/keys", "/proc/timer_list"]
        .into_iter()
        .filter(|f| std::path::Path::new(f).exists())
        .collect();
    assert!(!files.is_empty());
    let script = format!(
        "for f in {}; do wc -c < $f; done; ls /sys/firmware | wc -l; \
         (echo x > /proc/sys/kernel/domainname) 2>/dev/null && echo wrote || echo refused",
        files.join(" ")
    );
    env.args(&["sh", "-c", &script]);
    let out = env.run();
    let want = format!("{}0\nrefused\n", "0\n".repeat(files.len()));
    assert_eq!(stdout(&out), want, "{}", stderr(&out));
    env.assert_no_leaks();
}

#[test]
fn capabilities_match_the_config() {
    let mut env = env_or_skip!("caps");
    let caps = json!(["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SETUID"]);
    env.spec["process"]["capabilities"] = json!({
        "bounding": caps, "effective": caps, "permitted": caps
    });
    env.args(&["sh", "-c", "grep -E '^Cap(Eff|Bnd|Prm)' /proc/self/status"]);
    let out = env.run();
    // CHOWN 0, DAC_OVERRIDE 1, KILL 5, NET_BIND_SERVICE 10, SETUID 7.
    let want = (1u64 << 0) | (1 << 1) | (1 << 5) | (1 << 7) | (1 << 10);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text} {}", stderr(&out));
    for l in lines {
        let hex = l.split_whitespace().nth(1).unwrap();
        assert_eq!(u64::from_str_radix(hex, 16).unwrap(), want, "{l}");
    }
    env.assert_no_leaks();
}

#[test]
fn readonly_rootfs() {
    let mut env = env_or_skip!("ro_root");
    env.spec["root"]["readonly"] = json!(true);
    env.args(&[
        "sh",
        "-c",
        "mkdir /newdir 2>/dev/null && echo wrote || echo refused; mkdir /dev/shm/x && echo tmpfs-ok",
    ]);
    let out = env.run();
    assert_eq!(stdout(&out), "refused\ntmpfs-ok\n", "{}", stderr(&out));
    assert!(!env.rootfs.join("newdir").exists());
    env.assert_no_leaks();
}

#[test]
fn bind_mount_readonly_with_propagation() {
    let mut env = env_or_skip!("bind");
    let data = env.tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("hello"), "from host\n").unwrap();
    let file = env.tmp.path().join("single");
    std::fs::write(&file, "one file\n").unwrap();
    let mounts = env.spec["mounts"].as_array_mut().unwrap();
    mounts
        .push(json!({"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "ro", "rprivate"]}));
    mounts.push(json!({"destination": "/etc/single", "type": "bind", "source": file, "options": ["bind"]}));
    env.args(&[
        "sh",
        "-c",
        "cat /data/hello /etc/single; (echo x > /data/new) 2>/dev/null && echo wrote || echo refused",
    ]);
    let out = env.run();
    assert_eq!(stdout(&out), "from host\none file\nrefused\n", "{}", stderr(&out));
    assert!(!data.join("new").exists());
    env.assert_no_leaks();
}

#[test]
fn missing_cwd_is_created_and_an_impossible_one_fails_create() {
    // As runc: a working directory the rootfs lacks is made (Docker's WORKDIR relies on it).
    let mut env = env_or_skip!("new_cwd");
    env.spec["process"]["cwd"] = json!("/new/work");
    env.args(&["sh", "-c", "pwd"]);
    let out = env.run();
    assert_eq!(stdout(&out), "/new/work\n", "{}", stderr(&out));
    env.assert_no_leaks();

    let mut env = env_or_skip!("bad_cwd");
    env.spec["process"]["cwd"] = json!("/bin/busybox/below-a-file");
    let (code, err) = env.create();
    assert_eq!(code, 1);
    assert!(err.contains("container init failed"), "{err}");
    assert!(err.contains("chdir to cwd (\"/bin/busybox/below-a-file\")"), "{err}");
    env.assert_no_leaks();
}

#[test]
fn missing_binary_exits_127() {
    let mut env = env_or_skip!("no_binary");
    env.args(&["/bin/does-not-exist"]);
    let out = env.run();
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(stderr(&out).contains("executable file not found"), "{}", stderr(&out));
    env.assert_no_leaks();

    env.args(&["nonexistent-in-path"]);
    let out = env.run();
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    env.assert_no_leaks();
}

#[test]
fn failing_mount_reports_and_cleans_up() {
    let mut env = env_or_skip!("bad_mount");
    env.spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/x", "type": "no-such-fs", "source": "none"}));
    let (code, err) = env.create();
    assert_eq!(code, 1);
    assert!(err.contains("mounting none on /x"), "{err}");
    env.assert_no_leaks();
}

#[test]
fn exec_ps_and_list() {
    let mut env = env_or_skip!("exec");
    env.args(&["sleep", "1000"]);
    assert_eq!(env.create().0, 0);
    assert!(env.runc(&["start", &env.id]).status.success());

    let out = env.runc(&["exec", &env.id, "sh", "-c", "echo hi; hostname; echo $$"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[..2], ["hi", "twinbox-test"], "{text}");
    // In the container's pid namespace, not its init.
    let inner_pid: i32 = lines[2].parse().unwrap();
    assert!(inner_pid > 1, "{text}");

    let out = env.runc(&["exec", "--env", "A=b", "--cwd", "/proc", &env.id, "sh", "-c", "echo $A; pwd; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(stdout(&out), "b\n/proc\n");

    let out = env.runc(&["exec", "--user", "1000:1000", &env.id, "id"]);
    assert_eq!(stdout(&out), "uid=1000 gid=1000 groups=1000\n", "{}", stderr(&out));

    let out = env.runc(&["exec", &env.id, "no-such-binary"]);
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));

    let out = env.runc(&["ps", "--format", "json", &env.id]);
    let pids: Vec<i32> = serde_json::from_slice(&out.stdout).unwrap();
    let init = env.state().unwrap()["pid"].as_i64().unwrap() as i32;
    assert_eq!(pids, vec![init]);

    let out = env.runc(&["list"]);
    let text = stdout(&out);
    assert!(text.starts_with("ID"), "{text}");
    assert!(text.contains(&env.id) && text.contains("running"), "{text}");
    // As runc: the state document leaves `owner` empty; `list` names the user who created it.
    assert!(text.lines().nth(1).is_some_and(|l| l.trim_end().ends_with(" root")), "{text}");
    assert_eq!(env.state().unwrap()["owner"], "");
    let out = env.runc(&["list", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["id"], env.id.as_str());
    assert_eq!(v[0]["owner"], "root");

    assert!(env.runc(&["delete", "--force", &env.id]).status.success());
    let out = env.runc(&["exec", &env.id, "true"]);
    assert_eq!(out.status.code(), Some(1));
    env.assert_no_leaks();
}

/// Without pivot_root the rootfs is a mount moved over the runtime's root: exec must land in
/// the container's root. (Here the runtime's root is the namespace's, which joining it finds
/// anyway; the case where it is a chroot, as in the nested L1's bench, is what exec entering
/// the init's own root fixes, and the nested bench's exec figure for containers shows.)
#[test]
fn exec_lands_in_the_root_of_a_container_made_without_pivot() {
    let mut env = env_or_skip!("exec_no_pivot");
    env.args(&["sleep", "1000"]);
    env.write();
    let rootfs = env.spec["root"]["path"].as_str().map(|p| env.bundle.join(p)).unwrap();
    std::fs::write(rootfs.join("no-pivot-marker"), "inside the container\n").unwrap();
    let b = env.bundle.display().to_string();
    // The container keeps our stdio: files, not pipes, or this would wait for its end.
    let err_path = env.bundle.join("create.err");
    let status = env
        .cmd(&["create", "--no-pivot", "-b", &b, &env.id])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "{}", std::fs::read_to_string(&err_path).unwrap_or_default());
    assert!(env.runc(&["start", &env.id]).status.success());
    let out = env.runc(&["exec", &env.id, "cat", "/no-pivot-marker"]);
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "inside the container\n"), "{}", stderr(&out));
    assert!(env.runc(&["delete", "--force", &env.id]).status.success());
    env.assert_no_leaks();
}

#[test]
fn kill_all_reaches_every_process() {
    let mut env = env_or_skip!("kill_all");
    // Without a pid namespace, the init's death would not take the others along.
    env.spec["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]);
    let marker = env.id.clone();
    env.args(&["sh", "-c", &format!("sleep 1000 & sleep 1001 & wait; : {marker}")]);
    assert_eq!(env.create().0, 0);
    assert!(env.runc(&["start", &env.id]).status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let out = env.runc(&["ps", "--format", "json", &env.id]);
        let pids: Vec<i32> = serde_json::from_slice(&out.stdout).unwrap();
        if pids.len() == 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{pids:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = env.runc(&["kill", "--all", &env.id, "KILL"]);
    assert!(out.status.success(), "{}", stderr(&out));
    env.wait_status("stopped", Duration::from_secs(5));
    assert!(env.runc(&["delete", &env.id]).status.success());
    env.assert_no_leaks();
}

#[test]
fn hooks_run_at_their_moments() {
    let mut env = env_or_skip!("hooks");
    let log = env.tmp.path().join("hooks.log");
    let hook = |name: &str| json!({"path": "/bin/sh", "args": ["sh", "-c", format!("read -r s; echo {name} >> {}", log.display())]});
    env.spec["hooks"] = json!({
        "prestart": [hook("prestart")],
        "createRuntime": [hook("createRuntime")],
        // Runs in the container's mount namespace before pivot_root: host paths still visible.
        "createContainer": [hook("createContainer")],
        // Runs after pivot_root: paths are the container's.
        "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "echo startContainer > /started"]}],
        "poststart": [hook("poststart")],
        "poststop": [hook("poststop")]
    });
    env.args(&["true"]);
    assert_eq!(env.create().0, 0);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(read(), "prestart\ncreateRuntime\ncreateContainer\n");
    assert!(env.runc(&["start", &env.id]).status.success());
    env.wait_status("stopped", Duration::from_secs(5));
    assert_eq!(read(), "prestart\ncreateRuntime\ncreateContainer\npoststart\n");
    assert_eq!(std::fs::read_to_string(env.rootfs.join("started")).unwrap(), "startContainer\n");
    assert!(env.runc(&["delete", &env.id]).status.success());
    assert_eq!(read(), "prestart\ncreateRuntime\ncreateContainer\npoststart\npoststop\n");
    env.assert_no_leaks();
}

#[test]
fn failing_hook_fails_create_and_cleans_up() {
    let mut env = env_or_skip!("bad_hook");
    env.spec["hooks"] = json!({"createRuntime": [{"path": "/bin/false"}]});
    let (code, err) = env.create();
    assert_eq!(code, 1);
    assert!(err.contains("createRuntime hook"), "{err}");
    env.assert_no_leaks();
}

#[test]
fn terminal_goes_to_the_console_socket() {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixListener;

    let mut env = env_or_skip!("console");
    env.spec["process"]["terminal"] = json!(true);
    env.spec["process"]["consoleSize"] = json!({"height": 25, "width": 100});
    env.args(&["sh", "-c", "tty; stty size; echo $$"]);
    let sock_path = env.tmp.path().join("console.sock");
    let listener = UnixListener::bind(&sock_path).unwrap();
    let receiver = std::thread::spawn(move || -> (OwnedFd, String) {
        let (conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 256];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = nix::sys::socket::recvmsg::<nix::sys::socket::UnixAddr>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
        let mut fd = None;
        for c in msg.cmsgs().unwrap() {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: the kernel just gave us this descriptor; nobody else owns it.
                fd = Some(unsafe { OwnedFd::from_raw_fd(fds[0]) });
            }
        }
        let n = msg.bytes;
        (fd.expect("no fd received"), String::from_utf8_lossy(&buf[..n]).into_owned())
    });
    env.write();
    let b = env.bundle.display().to_string();
    let s = sock_path.display().to_string();
    let out = env.runc(&["create", "-b", &b, "--console-socket", &s, &env.id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (master, name) = receiver.join().unwrap();
    assert!(name.starts_with("/dev/pts/"), "{name}");
    assert!(env.runc(&["start", &env.id]).status.success());
    env.wait_status("stopped", Duration::from_secs(5));
    let mut f = std::fs::File::from(master);
    let mut text = Vec::new();
    // Reading a pty master whose slave is closed ends with EIO.
    let _ = f.read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text).replace('\r', "");
    assert_eq!(text, format!("{name}\n25 100\n1\n"));
    assert!(env.runc(&["delete", &env.id]).status.success());
    env.assert_no_leaks();
}

#[test]
fn user_namespace_maps_root() {
    let mut env = env_or_skip!("userns");
    env.spec["linux"]["namespaces"].as_array_mut().unwrap().push(json!({"type": "user"}));
    env.spec["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    env.spec["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    env.args(&["sh", "-c", "id; cat /proc/self/uid_map; hostname; cat /dev/null; echo ok"]);
    let out = env.run();
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text} {}", stderr(&out));
    assert_eq!(lines[0], "uid=0 gid=0 groups=0");
    assert_eq!(lines[1].split_whitespace().collect::<Vec<_>>(), ["0", "100000", "65536"]);
    assert_eq!(lines[2..], ["twinbox-test", "ok"]);
    env.assert_no_leaks();
}

#[test]
fn joins_namespaces_by_path() {
    let mut first = env_or_skip!("ns_first");
    first.args(&["sleep", "1000"]);
    assert_eq!(first.create().0, 0);
    assert!(first.runc(&["start", &first.id]).status.success());
    let pid = first.state().unwrap()["pid"].as_i64().unwrap();

    let mut second = env_or_skip!("ns_second");
    second.spec["linux"]["namespaces"] = json!([
        {"type": "pid", "path": format!("/proc/{pid}/ns/pid")},
        {"type": "network", "path": format!("/proc/{pid}/ns/net")},
        {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}
    ]);
    second.args(&["sh", "-c", "readlink /proc/self/ns/net; echo $$; grep -c 1000 /proc/1/cmdline"]);
    let out = second.run();
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text} {}", stderr(&out));
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_eq!(lines[0], theirs.display().to_string());
    // In the first container's pid namespace, next to its init.
    assert_ne!(lines[1], "1");
    assert_eq!(lines[2], "1");
    second.assert_no_leaks();

    assert!(first.runc(&["delete", "--force", &first.id]).status.success());
    first.assert_no_leaks();
}

#[test]
fn cgroup_namespace_hides_the_host_path() {
    let mut env = env_or_skip!("cgroupns");
    env.spec["linux"]["namespaces"].as_array_mut().unwrap().push(json!({"type": "cgroup"}));
    env.args(&["sh", "-c", "grep -c '::/$' /proc/self/cgroup; ls /sys/fs/cgroup | grep -c ."]);
    let out = env.run();
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text} {}", stderr(&out));
    // The unified hierarchy's line reads "0::/" from inside.
    assert_eq!(lines[0], "1", "{text}");
    assert!(lines[1].parse::<u32>().unwrap() >= 1, "{text}");
    env.assert_no_leaks();
}

#[test]
fn preserved_fds_pass_and_others_do_not() {
    let mut env = env_or_skip!("preserve_fds");
    let file = env.tmp.path().join("msg");
    std::fs::write(&file, "through fd 3\n").unwrap();
    env.args(&["sh", "-c", "cat <&3; ls /proc/self/fd | grep -c ."]);
    env.write();
    // fd 3 is passed; fd 4 is open in the caller but not preserved.
    let script = format!(
        "exec 3<{} 4<{}; exec {} --root {} run --preserve-fds 1 -b {} {}",
        file.display(),
        file.display(),
        common::BIN,
        env.root.display(),
        env.bundle.display(),
        env.id
    );
    let out = std::process::Command::new("/bin/sh").arg("-c").arg(&script).output().unwrap();
    let text = stdout(&out);
    // 0, 1, 2, 3, and the directory ls is reading.
    assert_eq!(text, "through fd 3\n5\n", "{}", stderr(&out));
    env.assert_no_leaks();
}

#[test]
fn overlay_rootfs_from_annotation() {
    let mut env = env_or_skip!("overlay");
    let layers = env.tmp.path().join("layers");
    let lower = layers.join("base");
    let upper = layers.join("upper");
    let work = layers.join("work");
    let merged = env.bundle.join("merged");
    std::fs::create_dir_all(&layers).unwrap();
    std::fs::rename(&env.rootfs, &lower).unwrap();
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).unwrap();
    }
    env.spec["root"]["path"] = json!("merged");
    env.spec["annotations"] = json!({
        "dev.twinbox.rootfs.overlay": json!({"lower": [lower], "upper": upper, "work": work}).to_string()
    });
    env.args(&["sh", "-c", "echo layered > /newfile; cat /newfile"]);
    let out = env.run();
    assert_eq!(stdout(&out), "layered\n", "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(upper.join("newfile")).unwrap(), "layered\n");
    assert!(!lower.join("newfile").exists());
    // The overlay lived in the container's mount namespace only.
    assert_eq!(std::fs::read_dir(&merged).unwrap().count(), 0);
    env.assert_no_leaks();
}

#[test]
fn spec_devices_sysctl_and_rlimits() {
    let mut env = env_or_skip!("devices");
    env.spec["linux"]["devices"] = json!([
        {"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3, "fileMode": 0o640, "uid": 0, "gid": 0}
    ]);
    env.spec["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
    env.args(&[
        "sh",
        "-c",
        "echo x > /dev/mynull && echo written; stat -c '%a %t:%T' /dev/mynull; \
         cat /proc/sys/net/ipv4/ip_forward; ulimit -n; readlink /dev/fd",
    ]);
    let out = env.run();
    assert_eq!(stdout(&out), "written\n640 1:3\n1\n1024\n/proc/self/fd\n", "{}", stderr(&out));
    env.assert_no_leaks();
}

#[test]
fn run_with_terminal_proxies_the_pty() {
    let mut env = env_or_skip!("run_tty");
    env.spec["process"]["terminal"] = json!(true);
    env.args(&["sh", "-c", "tty; exit 4"]);
    let out = env.run();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(stdout(&out), "/dev/pts/0\r\n");
    env.assert_no_leaks();
}

/// The counter the `counting` workload writes into the bundle's rootfs.
fn count(env: &Env) -> u64 {
    std::fs::read_to_string(env.bundle.join("rootfs/count")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

fn counting(env: &mut Env) {
    env.args(&["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.02; done"]);
    assert_eq!(env.create().0, 0);
    assert!(env.runc(&["start", &env.id]).status.success());
    let t = std::time::Instant::now();
    while count(env) < 3 {
        assert!(t.elapsed() < Duration::from_secs(5), "the workload never counted");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The v1 freezer's or v2 cgroup.freeze's view of the container: frozen or not.
fn frozen(id: &str) -> bool {
    let dirs = common::cgroup_dirs(id);
    if let Some(d) = dirs.iter().find(|d| d.starts_with("/sys/fs/cgroup/freezer")) {
        return std::fs::read_to_string(d.join("freezer.state")).unwrap().trim() == "FROZEN";
    }
    let d = dirs.iter().find(|d| d.join("cgroup.freeze").exists()).expect("a freezer");
    std::fs::read_to_string(d.join("cgroup.freeze")).unwrap().trim() == "1"
}

#[test]
fn pause_resume_update_and_events() {
    let mut env = env_or_skip!("pause");
    counting(&mut env);

    let out = env.runc(&["pause", &env.id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(env.status().as_deref(), Some("paused"));
    assert!(frozen(&env.id));
    std::thread::sleep(Duration::from_millis(100));
    let held = count(&env);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(&env), held, "a paused container does not run");
    let again = env.runc(&["pause", &env.id]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("container not running"), "{}", stderr(&again));
    let exec = env.runc(&["exec", &env.id, "true"]);
    assert_eq!(exec.status.code(), Some(1), "no exec into a paused container");

    // Stats of the frozen container: runc's event document.
    let ev = env.runc(&["events", "--stats", &env.id]);
    assert!(ev.status.success(), "{}", stderr(&ev));
    let v: serde_json::Value = serde_json::from_str(stdout(&ev).trim()).unwrap();
    assert_eq!((v["type"].as_str(), v["id"].as_str()), (Some("stats"), Some(env.id.as_str())));
    assert!(v["data"]["pids"]["current"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["data"]["memory"]["usage"]["usage"].as_u64().unwrap() > 0, "{v}");
    assert!(v["data"]["cpu"]["usage"]["total"].as_u64().unwrap() > 0, "{v}");

    // New limits reach the cgroup files, from flags and from a resources file on stdin.
    let out = env.runc(&["update", "--pids-limit", "7", "--memory", "67108864", &env.id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dirs = common::cgroup_dirs(&env.id);
    let read =
        |file: &str| dirs.iter().find_map(|d| std::fs::read_to_string(d.join(file)).ok()).map(|s| s.trim().to_owned());
    assert_eq!(read("pids.max").as_deref(), Some("7"));
    let mem = read("memory.limit_in_bytes").or_else(|| read("memory.max"));
    assert_eq!(mem.as_deref(), Some("67108864"));
    let mut child = env
        .cmd(&["update", "-r", "-", &env.id])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(br#"{"pids": {"limit": 9}}"#).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read("pids.max").as_deref(), Some("9"));
    let bad = env.runc(&["update", "--pids-limit", "5", "nonexistent-container"]);
    assert_eq!(bad.status.code(), Some(1));

    let out = env.runc(&["resume", &env.id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(env.status().as_deref(), Some("running"));
    assert!(!frozen(&env.id));
    let t = std::time::Instant::now();
    while count(&env) <= held {
        assert!(t.elapsed() < Duration::from_secs(5), "the workload did not go on after resume");
        std::thread::sleep(Duration::from_millis(20));
    }
    let again = env.runc(&["resume", &env.id]);
    assert!(stderr(&again).contains("container not paused"), "{}", stderr(&again));

    assert!(env.runc(&["delete", "--force", &env.id]).status.success());
    let gone = env.runc(&["events", "--stats", &env.id]);
    assert_eq!(gone.status.code(), Some(1));
    env.assert_no_leaks();
}

#[test]
fn commands_on_one_container_wait_for_its_lock() {
    let mut env = env_or_skip!("locking");
    counting(&mut env);
    // While something holds the container's lock (flock on its state directory), `pause`
    // waits for it instead of interleaving its load-freeze-save with the holder's.
    let dir = std::fs::File::open(env.state_dir()).unwrap();
    let held = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let mut pause = env.cmd(&["pause", &env.id]).stdin(std::process::Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert!(pause.try_wait().unwrap().is_none(), "pause did not wait for the lock");
    assert_eq!(env.status().as_deref(), Some("running"));
    drop(held);
    assert!(pause.wait().unwrap().success());
    assert_eq!(env.status().as_deref(), Some("paused"));
    assert!(frozen(&env.id));
    // Two deletes at once: one removes the container, the other finds it gone.
    let (a, b) = std::thread::scope(|s| {
        let one = s.spawn(|| env.runc(&["delete", "--force", &env.id]));
        let two = s.spawn(|| env.runc(&["delete", "--force", &env.id]));
        (one.join().unwrap(), two.join().unwrap())
    });
    let ok = [&a, &b].iter().filter(|o| o.status.success()).count();
    assert!(ok >= 1, "{} / {}", stderr(&a), stderr(&b));
    for o in [&a, &b] {
        if !o.status.success() {
            assert!(stderr(o).contains("does not exist"), "{}", stderr(o));
        }
    }
    env.assert_no_leaks();
}

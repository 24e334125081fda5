//! Rootless containers: twinbox-runc started by a user other than root (uid 4242 here, through
//! `setpriv`, with no passwd entry needed) runs a container in a user namespace that maps that
//! user to root, from the config `twinbox-runc spec --rootless` writes. Refusals name what to
//! change and leave nothing behind.

mod common;

use std::os::unix::fs::{chown, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{processes_with, require_root, require_tool, stderr, stdout, Env, BIN};
use serde_json::{json, Value};

/// The unprivileged user the test runs as.
const UID: u32 = 4242;

fn have_setpriv() -> bool {
    Command::new("setpriv").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Can an unprivileged user make a user namespace here?
fn userns_allowed() -> bool {
    std::fs::read_to_string("/proc/sys/user/max_user_namespaces").is_ok_and(|s| s.trim() != "0")
        && std::fs::read_to_string("/proc/sys/kernel/unprivileged_userns_clone").map_or(true, |s| s.trim() == "1")
}

/// `twinbox-runc ARGS…` as uid/gid 4242 with no supplementary groups, in `dir`.
fn as_user(dir: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid", &UID.to_string(), "--regid", &UID.to_string(), "--clear-groups", "--"])
        .arg(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("running setpriv")
}

/// Hand the test's temp dir to the user: owned by it and reachable from `/`.
fn give_to_user(env: &Env) {
    let mut p = env.tmp.path().to_path_buf();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    for e in walk(&p) {
        chown(&e, Some(UID), Some(UID)).unwrap();
    }
    while let Some(parent) = p.parent() {
        let mode = std::fs::metadata(parent).unwrap().permissions().mode();
        assert!(mode & 0o001 != 0, "{} is not searchable by other users", parent.display());
        p = parent.to_path_buf();
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

fn setup(test: &str) -> Option<Env> {
    if !require_root(test)
        || !require_tool(test, have_setpriv(), "setpriv (util-linux)")
        || !require_tool(test, userns_allowed(), "unprivileged user namespaces (user.max_user_namespaces > 0)")
    {
        return None;
    }
    let env = Env::new(test)?;
    std::fs::create_dir_all(&env.root).unwrap();
    give_to_user(&env);
    Some(env)
}

/// The config `spec --rootless` wrote, with `args` and a writable root.
fn rootless_spec(env: &Env, args: &[&str]) -> Value {
    let text = std::fs::read_to_string(env.bundle.join("config.json")).unwrap();
    let mut spec: Value = serde_json::from_str(&text).unwrap();
    spec["process"]["args"] = json!(args);
    spec["process"]["terminal"] = json!(false);
    spec["root"]["readonly"] = json!(false);
    spec
}

fn write(env: &Env, spec: &Value) {
    std::fs::write(env.bundle.join("config.json"), serde_json::to_vec_pretty(spec).unwrap()).unwrap();
    chown(env.bundle.join("config.json"), Some(UID), Some(UID)).unwrap();
}

#[test]
fn a_user_runs_a_container_as_root_of_its_own_user_namespace() {
    let Some(env) = setup("a_user_runs_a_container_as_root_of_its_own_user_namespace") else { return };
    let root = env.root.display().to_string();

    let o = as_user(&env.bundle, &["spec", "--rootless"]);
    assert!(o.status.success(), "spec --rootless: {}", stderr(&o));
    let spec: Value = serde_json::from_str(&std::fs::read_to_string(env.bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(spec["linux"]["uidMappings"], json!([{"containerID": 0, "hostID": UID, "size": 1}]));
    let o = as_user(&env.bundle, &["spec", "--rootless"]);
    assert!(!o.status.success() && stderr(&o).contains("exists"), "a second spec refuses: {}", stderr(&o));

    let script = "id -u; id -g; cat /proc/self/uid_map; echo pid=$$; hostname; \
                  echo made > /tmp/by-container; ls /dev/null >/dev/null && exit 7";
    write(&env, &rootless_spec(&env, &["sh", "-c", script]));
    let o = as_user(&env.bundle, &["--root", &root, "run", &env.id]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(7), "exit code passes through; stdout {out}, stderr {}", stderr(&o));
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(lines[..2], ["0", "0"], "root inside: {out}");
    assert_eq!(lines[2].split_whitespace().collect::<Vec<_>>(), ["0", &UID.to_string(), "1"], "{out}");
    assert_eq!(lines[3], "pid=1");
    assert_eq!(lines[4], "twinbox");
    // What the container's root wrote belongs to the user on the host.
    let made = env.rootfs.join("tmp/by-container");
    assert_eq!(std::fs::read_to_string(&made).unwrap(), "made\n");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&made).unwrap()), UID);
    env_is_clean(&env);
}

#[test]
fn rootless_refusals_name_the_fix_and_leave_nothing() {
    let Some(env) = setup("rootless_refusals_name_the_fix_and_leave_nothing") else { return };
    let root = env.root.display().to_string();
    assert!(as_user(&env.bundle, &["spec", "--rootless"]).status.success());
    let base = rootless_spec(&env, &["true"]);

    // Limits need a cgroup this user may not make.
    let mut limited = base.clone();
    limited["linux"]["resources"] = json!({"memory": {"limit": 33554432}});
    write(&env, &limited);
    let o = as_user(&env.bundle, &["--root", &root, "run", &env.id]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("rootless") && err.contains("linux.resources") && err.contains("cgroupsPath"), "{err}");
    env_is_clean(&env);

    // Mapping ids other than one's own needs privileges.
    let mut wide = base.clone();
    wide["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    write(&env, &wide);
    let err = stderr(&as_user(&env.bundle, &["--root", &root, "run", &env.id]));
    assert!(err.contains("uid map can only map 4242"), "{err}");
    env_is_clean(&env);

    // No user namespace at all.
    let mut no_userns = base.clone();
    let nss = no_userns["linux"]["namespaces"].as_array().unwrap().clone();
    no_userns["linux"]["namespaces"] = json!(nss.into_iter().filter(|n| n["type"] != "user").collect::<Vec<_>>());
    write(&env, &no_userns);
    let err = stderr(&as_user(&env.bundle, &["--root", &root, "run", &env.id]));
    assert!(err.contains("needs a user namespace") && err.contains("spec --rootless"), "{err}");
    env_is_clean(&env);

    // The same limits as root work (so the refusal above was about being rootless).
    write(&env, &limited);
    let o = Command::new(BIN).args(["--root", &root, "run", "-b"]).arg(&env.bundle).arg(&env.id).output().unwrap();
    assert!(o.status.success(), "as root: {}", stderr(&o));
    env_is_clean(&env);
}

/// No state, process, cgroup or mount of the container is left.
fn env_is_clean(env: &Env) {
    env.assert_no_leaks();
    assert!(processes_with(&env.id).is_empty());
    let left: Vec<_> = std::fs::read_dir(&env.root).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "state left: {left:?}");
}

//! `process::Prepared::apply` and seccomp filters, for real.
//!
//! Applying credentials cannot be undone, so each case runs in a process of its own: either this
//! test binary run again on one `#[ignore]`d helper (selected by an environment variable, and
//! checked to have printed its marker so a filter typo cannot pass silently), or a forked child
//! that only makes syscalls and reports through its exit code. Checks read
//! `/proc/thread-self/status`, since capabilities, no_new_privs and seccomp are per thread.

use std::collections::HashMap;
use std::process::Command;

use nix::errno::Errno;
use nix::sys::prctl;
use nix::sys::resource::{getrlimit, Resource};
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, getgid, getpid, getuid, mkdir, ForkResult};
use oci_spec::runtime::{LinuxSeccomp, Process};
use twinbox_runtime::process;
use twinbox_runtime::seccomp::{self, Filter};

const HELPER_ENV: &str = "TWINBOX_PROCESS_HELPER";

/// Runs the ignored test `name` of this binary in a new process and checks that it passed.
fn run_helper(name: &str) -> String {
    let output = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, name)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "helper {name}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", output.status);
    assert!(stdout.contains(&format!("HELPER-OK {name}")), "helper {name} did not run:\n{stdout}\n{stderr}");
    stdout
}

/// True in the helper process started for `name`; helpers do nothing when run any other way.
fn is_helper(name: &str) -> bool {
    let selected = std::env::var(HELPER_ENV).as_deref() == Ok(name);
    if !selected {
        println!("{name} is a helper, run by another test");
    }
    selected
}

fn require_root(what: &str) -> bool {
    twinbox_testutil::require_root(what, "apply process credentials")
}

/// The fields of /proc/thread-self/status (or of `text`).
fn status(text: Option<&str>) -> HashMap<String, String> {
    let own;
    let text = match text {
        Some(text) => text,
        None => {
            own = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            &own
        }
    };
    text.lines().filter_map(|line| line.split_once(':')).map(|(k, v)| (k.to_owned(), v.trim().to_owned())).collect()
}

fn cap_mask(status: &HashMap<String, String>, field: &str) -> u64 {
    u64::from_str_radix(&status[field], 16).unwrap()
}

const NET_BIND_SERVICE: u64 = 1 << 10;
const NET_ADMIN: u64 = 1 << 12;

fn process(json: serde_json::Value) -> Process {
    serde_json::from_value(json).unwrap()
}

fn profile(json: serde_json::Value) -> LinuxSeccomp {
    serde_json::from_value(json).unwrap()
}

fn unique_path(tag: &str) -> String {
    format!("/tmp/twinbox-process-test-{tag}-{}", getpid())
}

// ---------------------------------------------------------------------------------------------
// seccomp on its own (no root needed: no_new_privs first)

#[test]
fn seccomp_deny_rules_are_enforced() {
    run_helper("helper_seccomp_deny_rules");
}

#[test]
#[ignore = "helper, run by seccomp_deny_rules_are_enforced"]
fn helper_seccomp_deny_rules() {
    if !is_helper("helper_seccomp_deny_rules") {
        return;
    }
    let filter = seccomp::compile(&profile(serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["mkdir", "mkdirat", "no_such_syscall"], "action": "SCMP_ACT_ERRNO",
             "errnoRet": 1},
            {"names": ["chmod", "fchmodat", "fchmodat2"], "action": "SCMP_ACT_ERRNO",
             "errnoRet": 13},
            {"names": ["prctl"], "action": "SCMP_ACT_ERRNO", "errnoRet": 18,
             "args": [{"index": 0, "value": libc::PR_SET_DUMPABLE, "op": "SCMP_CMP_EQ"}]}
        ]
    })))
    .unwrap();
    let file = unique_path("chmod");
    std::fs::write(&file, b"x").unwrap();
    prctl::set_no_new_privs().unwrap();
    filter.install().unwrap();

    let dir = unique_path("mkdir");
    assert_eq!(mkdir(dir.as_str(), Mode::from_bits_truncate(0o755)), Err(Errno::EPERM));
    assert!(std::fs::metadata(&dir).is_err());
    assert!(getpid().as_raw() > 0);
    let chmod = std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600));
    assert_eq!(chmod.unwrap_err().raw_os_error(), Some(libc::EACCES));
    // The argument decides: PR_SET_DUMPABLE is refused, PR_GET_DUMPABLE is not.
    assert_eq!(prctl::set_dumpable(true), Err(Errno::EXDEV));
    assert!(prctl::get_dumpable().is_ok());
    let st = status(None);
    assert_eq!(st["Seccomp"], "2");
    assert_eq!(st["NoNewPrivs"], "1");
    std::fs::remove_file(&file).unwrap();
    println!("HELPER-OK helper_seccomp_deny_rules");
}

/// Runs `body` in a forked child under `filter` and returns how the child ended. The child only
/// makes syscalls and `_exit`s, which is what a fork of a multi-threaded process may do.
fn in_filtered_child(filter: &Filter, body: fn() -> i32) -> WaitStatus {
    // SAFETY: the child makes syscalls only (prctl, seccomp, those of `body`, which builds no
    // heap data) and leaves with _exit, so it needs no lock another thread may have held.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            let code = if prctl::set_no_new_privs().is_err() {
                90
            } else if filter.install().is_err() {
                91
            } else {
                body()
            };
            // SAFETY: _exit ends the child at once, running no handler or destructor of the
            // parent's state.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => waitpid(child, None).unwrap(),
    }
}

#[test]
fn seccomp_default_errno_allow_list_is_enforced() {
    // Docker's shape, cut down to what the child needs.
    let filter = seccomp::compile(&profile(serde_json::json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "syscalls": [
            {"names": ["exit", "exit_group", "getpid", "rt_sigreturn", "not_a_syscall"],
             "action": "SCMP_ACT_ALLOW"},
            {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 33}
        ]
    })))
    .unwrap();
    let status = in_filtered_child(&filter, || {
        if getpid().as_raw() <= 0 {
            return 1;
        }
        if mkdir("/tmp/twinbox-never", Mode::from_bits_truncate(0o755)) != Err(Errno::EPERM) {
            return 2;
        }
        // SAFETY: getppid takes no arguments; the raw call shows the filter's errno.
        let rc = unsafe { libc::syscall(libc::SYS_getppid) };
        if rc != -1 || Errno::last() != Errno::EDOM {
            return 3;
        }
        // A syscall number newer than any known: ENOSYS, so libc can fall back.
        // SAFETY: no such syscall exists; the filter answers before the kernel looks.
        let rc = unsafe { libc::syscall(1000) };
        if rc != -1 || Errno::last() != Errno::ENOSYS {
            return 4;
        }
        0
    });
    assert_eq!(status, WaitStatus::Exited(status_pid(&status), 0), "{status:?}");
}

#[test]
fn seccomp_kill_process_kills() {
    let filter = seccomp::compile(&profile(serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"}]
    })))
    .unwrap();
    let status = in_filtered_child(&filter, || {
        // SAFETY: getppid takes no arguments.
        unsafe { libc::syscall(libc::SYS_getppid) };
        7
    });
    assert_eq!(status, WaitStatus::Signaled(status_pid(&status), Signal::SIGSYS, false), "{status:?}");
}

fn status_pid(status: &WaitStatus) -> nix::unistd::Pid {
    status.pid().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Prepared::apply (root)

#[test]
fn apply_drops_to_nobody_with_no_caps() {
    if require_root("apply_drops_to_nobody_with_no_caps") {
        run_helper("helper_apply_nobody");
    }
}

#[test]
#[ignore = "helper, run by apply_drops_to_nobody_with_no_caps"]
fn helper_apply_nobody() {
    if !is_helper("helper_apply_nobody") {
        return;
    }
    let process = process(serde_json::json!({
        "cwd": "/",
        "user": {"uid": 65534, "gid": 65534, "additionalGids": [65533], "umask": 0o027},
        "noNewPrivileges": true,
        "oomScoreAdj": 500,
        "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 200, "hard": 300}],
        "capabilities": {"bounding": [], "effective": [], "permitted": [], "inheritable": [],
                         "ambient": []}
    }));
    let seccomp = profile(serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    }));
    let prepared = process::prepare(&process, Some(&seccomp)).unwrap();
    prepared.apply().unwrap();

    assert_eq!(getuid().as_raw(), 65534);
    assert_eq!(getgid().as_raw(), 65534);
    let st = status(None);
    assert_eq!(st["Uid"], "65534\t65534\t65534\t65534");
    assert_eq!(st["Gid"], "65534\t65534\t65534\t65534");
    assert_eq!(st["Groups"], "65533 65534");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(cap_mask(&st, set), 0, "{set}");
    }
    assert_eq!(st["NoNewPrivs"], "1");
    assert_eq!(st["Seccomp"], "2");
    assert_eq!(st["Umask"], "0027");
    assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (200, 300));
    let adj = std::fs::read_to_string("/proc/self/oom_score_adj").unwrap();
    assert_eq!(adj.trim(), "500");
    let dir = unique_path("nobody-mkdir");
    assert_eq!(mkdir(dir.as_str(), Mode::from_bits_truncate(0o755)), Err(Errno::EPERM));
    println!("HELPER-OK helper_apply_nobody");
}

#[test]
fn apply_keeps_ambient_caps_across_uid_change() {
    if require_root("apply_keeps_ambient_caps_across_uid_change") {
        run_helper("helper_apply_ambient");
    }
}

#[test]
#[ignore = "helper, run by apply_keeps_ambient_caps_across_uid_change"]
fn helper_apply_ambient() {
    if !is_helper("helper_apply_ambient") {
        return;
    }
    let both = ["CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN"];
    let process = process(serde_json::json!({
        "cwd": "/",
        "user": {"uid": 1000, "gid": 1000},
        "noNewPrivileges": false,
        "capabilities": {"bounding": both, "effective": both, "permitted": both,
                         "inheritable": both, "ambient": both}
    }));
    // Without no_new_privs the filter goes in early, while CAP_SYS_ADMIN is still held.
    let seccomp = profile(serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    }));
    let prepared = process::prepare(&process, Some(&seccomp)).unwrap();
    prepared.apply().unwrap();

    let want = NET_BIND_SERVICE | NET_ADMIN;
    let st = status(None);
    assert_eq!(st["Uid"], "1000\t1000\t1000\t1000");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(cap_mask(&st, set), want, "{set}");
    }
    assert_eq!(st["NoNewPrivs"], "0");
    assert_eq!(st["Seccomp"], "2");
    // The point of ambient capabilities: a program run by uid 1000 still has them.
    let out = Command::new("/bin/cat").arg("/proc/self/status").output().unwrap();
    assert!(out.status.success());
    let child = status(Some(&String::from_utf8_lossy(&out.stdout)));
    assert_eq!(child["Uid"], "1000\t1000\t1000\t1000");
    assert_eq!(cap_mask(&child, "CapEff"), want);
    assert_eq!(cap_mask(&child, "CapAmb"), want);
    assert_eq!(cap_mask(&child, "CapBnd"), want);
    assert_eq!(child["Seccomp"], "2");
    println!("HELPER-OK helper_apply_ambient");
}

#[test]
fn apply_error_names_the_step() {
    run_helper("helper_apply_error");
}

#[test]
#[ignore = "helper, run by apply_error_names_the_step"]
fn helper_apply_error() {
    if !is_helper("helper_apply_error") {
        return;
    }
    // Above fs.nr_open: refused even with CAP_SYS_RESOURCE.
    let huge = 1u64 << 40;
    let process = process(serde_json::json!({
        "cwd": "/",
        "user": {"uid": getuid().as_raw(), "gid": getgid().as_raw()},
        "rlimits": [{"type": "RLIMIT_NOFILE", "soft": huge, "hard": huge}]
    }));
    let err = process::prepare(&process, None).unwrap().apply().unwrap_err();
    assert_eq!(err.to_string(), format!("setrlimit(RLIMIT_NOFILE, soft {huge}, hard {huge})"));
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(source.contains("EPERM"), "{source}");
    println!("HELPER-OK helper_apply_error");
}

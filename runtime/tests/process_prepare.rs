//! `process::prepare`: what bad input is refused, and with which message. Nothing is applied.

use oci_spec::runtime::{LinuxSeccomp, Process, Spec};
use twinbox_runtime::{caps, process, seccomp};

fn process(json: serde_json::Value) -> Process {
    serde_json::from_value(json).unwrap()
}

fn base() -> serde_json::Value {
    serde_json::json!({"cwd": "/", "user": {"uid": 0, "gid": 0}})
}

fn with(mut value: serde_json::Value, key: &str, field: serde_json::Value) -> serde_json::Value {
    value[key] = field;
    value
}

fn prepare_err(process_json: serde_json::Value, seccomp: Option<serde_json::Value>) -> String {
    let seccomp: Option<LinuxSeccomp> = seccomp.map(|s| serde_json::from_value(s).unwrap());
    process::prepare(&process(process_json), seccomp.as_ref()).unwrap_err().to_string()
}

#[test]
fn bad_capability_names() {
    assert_eq!(caps::parse("CAP_FOO").unwrap_err().to_string(), "capability CAP_FOO unknown");
    assert_eq!(caps::parse("cap_net_admin").unwrap(), caps::parse("CAP_NET_ADMIN").unwrap());
    // In a config.json the name is refused where the spec is read, naming it.
    let json = r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"},
        "process": {"cwd": "/", "user": {"uid": 0, "gid": 0},
                    "capabilities": {"bounding": ["CAP_CHOWN", "CAP_FOO"]}}}"#;
    let err = serde_json::from_str::<Spec>(json).unwrap_err().to_string();
    assert!(err.contains("CAP_FOO"), "{err}");
}

#[test]
fn effective_must_be_permitted() {
    let json = with(base(), "capabilities", serde_json::json!({"effective": ["CAP_KILL"], "permitted": []}));
    assert_eq!(prepare_err(json, None), "effective capability CAP_KILL is not permitted");
}

#[test]
fn bad_seccomp_actions() {
    let err = serde_json::from_str::<LinuxSeccomp>(r#"{"defaultAction": "SCMP_ACT_FOO"}"#).unwrap_err().to_string();
    assert!(err.contains("SCMP_ACT_FOO"), "{err}");
    assert_eq!(
        prepare_err(base(), Some(serde_json::json!({"defaultAction": "SCMP_ACT_NOTIFY"}))),
        "seccomp: SCMP_ACT_NOTIFY not supported"
    );
    let rule = serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["ioctl"], "action": "SCMP_ACT_NOTIFY"}]});
    assert_eq!(prepare_err(base(), Some(rule)), "seccomp: SCMP_ACT_NOTIFY not supported");
    let listener = serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
        "listenerPath": "/run/seccomp.sock"});
    assert_eq!(prepare_err(base(), Some(listener)), "seccomp: listenerPath (SCMP_ACT_NOTIFY) not supported");
}

#[test]
fn bad_seccomp_rules() {
    let index = serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["read", "write"], "action": "SCMP_ACT_ERRNO",
         "args": [{"index": 7, "value": 0, "op": "SCMP_CMP_EQ"}]}]});
    assert_eq!(prepare_err(base(), Some(index)), "seccomp: syscall read,write: argument index 7 out of range (0..=5)");
    assert_eq!(
        seccomp::syscall_number("foo_bar").unwrap_err().to_string(),
        format!("seccomp: syscall foo_bar unknown on {}", std::env::consts::ARCH)
    );
    // Unknown names in a rule are skipped, as runc does; a rule of only those is empty.
    let unknown = serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["foo_bar"], "action": "SCMP_ACT_KILL"}]});
    let seccomp: LinuxSeccomp = serde_json::from_value(unknown).unwrap();
    assert!(process::prepare(&process(base()), Some(&seccomp)).is_ok());
}

#[test]
fn bad_user_rlimits_oom() {
    assert_eq!(
        prepare_err(serde_json::json!({"cwd": "/", "user": {"uid": 4294967295u32, "gid": 0}}), None),
        "user: uid 4294967295 invalid"
    );
    assert_eq!(
        prepare_err(serde_json::json!({"cwd": "/", "user": {"uid": 0, "gid": 0, "umask": 0o1777}}), None),
        "user: umask 0o1777 invalid"
    );
    let rlimits = serde_json::json!([{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 5}]);
    assert_eq!(
        prepare_err(with(base(), "rlimits", rlimits), None),
        "rlimit RLIMIT_NOFILE: soft limit 10 above hard limit 5"
    );
    assert_eq!(
        prepare_err(with(base(), "oomScoreAdj", serde_json::json!(-1001)), None),
        "oom_score_adj -1001 out of range (-1000..=1000)"
    );
}

#[test]
fn a_typical_spec_prepares() {
    // What `runc spec` writes, plus a Docker-shaped seccomp profile.
    let json = with(
        with(
            with(base(), "noNewPrivileges", serde_json::json!(true)),
            "rlimits",
            serde_json::json!([{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]),
        ),
        "capabilities",
        serde_json::json!({
            "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "ambient": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
        }),
    );
    let profile: LinuxSeccomp = serde_json::from_value(serde_json::json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32",
                          "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "syscalls": [
            {"names": ["accept", "accept4", "access", "arch_prctl", "brk", "close", "dup3",
                       "execve", "exit_group", "fstat", "getdents64", "mmap", "openat", "read",
                       "rt_sigaction", "set_tid_address", "write", "arm_fadvise64_64"],
             "action": "SCMP_ACT_ALLOW"},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]}
        ]
    }))
    .unwrap();
    let prepared = process::prepare(&process(json), Some(&profile)).unwrap();
    let caps = prepared.caps().unwrap();
    // Not inheritable, so not raised as ambient (runc warns and goes on).
    assert!(caps.ambient().is_empty());
    assert_eq!(caps.effective().len(), 3);
    assert!(prepared.no_new_privileges());
    assert!(prepared.seccomp().unwrap().program().len() > 20);
}

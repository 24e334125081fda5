//! `hooks::run` with real hook processes (`/bin/sh` scripts).

use std::path::Path;
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;
use twinbox_runtime::hooks::{self, HookError};

fn hook(path: &str, args: &[&str], env: Option<&[&str]>, timeout: Option<i64>) -> Hook {
    let mut hook = Hook::default();
    hook.set_path(path.into());
    hook.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
    hook.set_env(env.map(|env| env.iter().map(|s| s.to_string()).collect()));
    hook.set_timeout(timeout);
    hook
}

/// A `/bin/sh -c` hook that appends its argv, its environment and its stdin to `out`.
fn recording_hook(name: &str, out: &Path, env: Option<&[&str]>) -> Hook {
    let script = format!(
        "{{ echo \"== {name}\"; tr '\\0' ' ' < /proc/$$/cmdline; echo; \
           echo env:; tr '\\0' '\\n' < /proc/$$/environ; echo stdin:; cat; echo; }} >> '{}'",
        out.display()
    );
    hook("/bin/sh", &[&format!("argv0-{name}"), "-c", &script], env, Some(10))
}

const STATE: &str = r#"{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":42,"bundle":"/b"}"#;

#[test]
fn hooks_run_in_order_with_state_argv_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let hooks = [
        recording_hook("first", &out, Some(&["FOO=bar", "EMPTY=", "PATH=/usr/bin:/bin"])),
        recording_hook("second", &out, None),
    ];
    hooks::run("createRuntime", &hooks, STATE.as_bytes()).unwrap();

    let text = std::fs::read_to_string(&out).unwrap();
    let (first, second) = text.split_once("== second").unwrap();
    assert!(first.starts_with("== first\n"), "{text}");
    // argv[0] is args[0], then the rest of args.
    assert!(first.contains("\nargv0-first -c "), "{text}");
    // The environment is exactly the hook's.
    let env_of = |part: &str| -> Vec<String> {
        let env = part.split_once("env:\n").unwrap().1;
        let env = env.split_once("stdin:\n").unwrap().0;
        let mut env: Vec<String> = env.lines().map(str::to_owned).collect();
        // std::process::Command passes the variables sorted.
        env.sort();
        env
    };
    assert_eq!(env_of(first), ["EMPTY=", "FOO=bar", "PATH=/usr/bin:/bin"], "{text}");
    assert!(env_of(second).is_empty(), "{text}");
    // stdin is the state JSON, whole.
    for part in [first, second] {
        let stdin = part.split_once("stdin:\n").unwrap().1;
        assert_eq!(stdin.trim_end(), STATE, "{text}");
    }
    assert!(second.contains("\nargv0-second -c "), "{text}");
}

#[test]
fn hook_without_args_runs_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = dir.path().join("hook.sh");
    std::fs::write(&script, format!("#!/bin/sh\necho \"$0 $*\" > '{}'\n", out.display())).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut plain = Hook::default();
    plain.set_path(script.clone());
    hooks::run("poststop", &[plain], b"{}").unwrap();
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), format!("{} ", script.display()).trim());
}

#[test]
fn failing_hook_reports_kind_path_status_and_stderr() {
    let hooks = [
        hook("/bin/sh", &["sh", "-c", "echo ok"], None, None),
        hook("/bin/sh", &["sh", "-c", "echo some noise; echo 'mount failed: no such device' >&2; exit 3"], None, None),
        // Never reached.
        hook("/bin/sh", &["sh", "-c", "exit 99"], None, None),
    ];
    let err = hooks::run("prestart", &hooks, STATE.as_bytes()).unwrap_err();
    assert!(matches!(err, HookError::Failed { .. }), "{err:?}");
    assert_eq!(err.to_string(), "prestart hook /bin/sh: exit status: 3: mount failed: no such device");
    // Only stdout: that is the tail shown.
    let quiet = hook("/bin/sh", &["sh", "-c", "echo to stdout; kill -9 $$"], None, None);
    let err = hooks::run("poststart", &[quiet], b"").unwrap_err().to_string();
    assert_eq!(err, "poststart hook /bin/sh: signal: 9 (SIGKILL): to stdout");
}

/// Processes whose command line contains `marker`, this one excepted.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == std::process::id().to_string() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(marker) {
                found.push(format!("{name}: {cmdline}"));
            }
        }
    }
    found
}

#[test]
fn timeout_kills_the_hook_and_its_children() {
    // A unique sleep length marks the hook's processes.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let marker = format!("30.{}{nanos}", std::process::id());
    // `; true` keeps sh from exec-ing sleep: there is a child to kill too.
    let script = format!("sleep {marker}; true");
    let slow = hook("/bin/sh", &["sh", "-c", &script], None, Some(1));
    let start = Instant::now();
    let err = hooks::run("createContainer", &[slow], STATE.as_bytes()).unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, HookError::Timeout { secs: 1, .. }), "{err:?}");
    assert_eq!(err.to_string(), "createContainer hook /bin/sh: killed after its 1s timeout");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(10), "{took:?}");
    // The sleep was SIGKILLed with its group; give the kernel a moment to finish it off.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = processes_with(&marker);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left running: {left:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn hook_that_ignores_stdin_and_a_large_state() {
    let state = vec![b'x'; 1 << 20];
    let start = Instant::now();
    hooks::run("startContainer", &[hook("/bin/true", &["true"], None, Some(5))], &state).unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn hook_errors_before_running() {
    let err = hooks::run("prestart", &[hook("/no/such/hook", &["x"], None, None)], b"{}").unwrap_err();
    assert!(matches!(err, HookError::Spawn { .. }), "{err:?}");
    assert_eq!(err.to_string(), "prestart hook /no/such/hook: spawn");
    let err = hooks::run("prestart", &[hook("sh", &["sh"], None, None)], b"{}").unwrap_err();
    assert_eq!(err.to_string(), "prestart hook sh: path not absolute");
    let err = hooks::run("poststop", &[hook("/bin/true", &["true"], None, Some(0))], b"{}").unwrap_err();
    assert_eq!(err.to_string(), "poststop hook /bin/true: timeout 0 not positive");
    hooks::run("poststop", &[], b"{}").unwrap();
}

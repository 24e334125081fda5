//! OCI hooks: `prestart`, `createRuntime`, `createContainer`, `startContainer`, `poststart`,
//! `poststop`.
//!
//! Each hook is run in turn with the container's state JSON on stdin; `args[0]` is its argv0, its
//! environment is exactly `env` (empty if absent) and `timeout` is in seconds. A hook runs in a
//! process group of its own, so on timeout the whole group is killed, not only the first process,
//! and the hook is reaped before [`run`] returns.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use oci_spec::runtime::Hook;
use twinbox_exit::ExitCode;

/// How much of a failed hook's output the error keeps.
const OUTPUT_TAIL: usize = 4096;
/// How long a failed hook's output is waited for once it has exited (a background process it
/// left may hold the pipe open).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// Errors from running a hook. Each names the kind and the hook's path.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{kind} hook {}: path not absolute", .path.display())]
    NotAbsolute { kind: String, path: PathBuf },
    #[error("{kind} hook {}: timeout {timeout} not positive", .path.display())]
    BadTimeout { kind: String, path: PathBuf, timeout: i64 },
    #[error("{kind} hook {}: spawn", .path.display())]
    Spawn {
        kind: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{kind} hook {}: wait", .path.display())]
    Wait {
        kind: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{kind} hook {}: killed after its {secs}s timeout", .path.display())]
    Timeout { kind: String, path: PathBuf, secs: u64 },
    #[error("{kind} hook {}: {status}{}", .path.display(), output_suffix(.output))]
    Failed {
        kind: String,
        path: PathBuf,
        status: ExitStatus,
        /// The tail of its stderr (of its stdout if stderr was empty).
        output: String,
    },
}

impl ExitCode for HookError {
    fn exit_code(&self) -> i32 {
        match self {
            // The spec's hooks: their paths, timeouts and what they do.
            HookError::NotAbsolute { .. }
            | HookError::BadTimeout { .. }
            | HookError::Spawn { .. }
            | HookError::Timeout { .. }
            | HookError::Failed { .. } => twinbox_exit::USER_ERROR,
            HookError::Wait { .. } => twinbox_exit::INTERNAL,
        }
    }
}

fn output_suffix(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!(": {output}")
    }
}

/// Run `hooks` of `kind` one after the other, each with `state_json` on stdin; stop at the first
/// that fails.
pub fn run(kind: &str, hooks: &[Hook], state_json: &[u8]) -> Result<(), HookError> {
    for hook in hooks {
        run_one(kind, hook, state_json)?;
    }
    Ok(())
}

fn run_one(kind: &str, hook: &Hook, state_json: &[u8]) -> Result<(), HookError> {
    let path = hook.path();
    let kind_path = || (kind.to_owned(), path.clone());
    if !path.is_absolute() {
        let (kind, path) = kind_path();
        return Err(HookError::NotAbsolute { kind, path });
    }
    let timeout = match hook.timeout() {
        None => None,
        Some(secs) if secs > 0 => Some(secs as u64),
        Some(timeout) => {
            let (kind, path) = kind_path();
            return Err(HookError::BadTimeout { kind, path, timeout });
        }
    };
    tracing::debug!(kind, path = %path.display(), ?timeout, "running hook");

    let args = hook.args().as_deref().unwrap_or_default();
    let mut command = Command::new(path);
    match args.first() {
        Some(argv0) => command.arg0(argv0),
        None => command.arg0(path),
    };
    command.args(args.iter().skip(1)).env_clear();
    for entry in hook.env().iter().flatten() {
        match entry.split_once('=') {
            Some((key, value)) => command.env(key, value),
            None => {
                tracing::debug!(kind, entry, "hook env entry without '=', skipped");
                continue;
            }
        };
    }
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let mut child = command.spawn().map_err(|source| {
        let (kind, path) = kind_path();
        HookError::Spawn { kind, path, source }
    })?;
    // The hook leads its own process group, whose id is its pid.
    let pid = Pid::from_raw(child.id() as i32);

    // The state goes in from a thread of its own: a hook that does not read stdin must not
    // block us, and one that exits early only breaks the pipe.
    if let Some(mut stdin) = child.stdin.take() {
        let state = state_json.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&state);
        });
    }
    let (output_tx, output_rx) = mpsc::channel();
    for (stream, reader) in [
        (0, child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>)),
        (1, child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>)),
    ] {
        if let Some(reader) = reader {
            let output_tx = output_tx.clone();
            std::thread::spawn(move || {
                let _ = output_tx.send((stream, read_tail(reader)));
            });
        }
    }
    drop(output_tx);

    // Wait for the exit without reaping (WNOWAIT): until we reap it below, the pid, and so the
    // process group id, cannot be reused, which makes the killpg on timeout safe.
    let (exit_tx, exit_rx) = mpsc::channel();
    let watcher = std::thread::spawn(move || loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Err(Errno::EINTR) => continue,
            _ => {
                let _ = exit_tx.send(());
                break;
            }
        }
    });
    let timed_out = match timeout {
        Some(secs) => matches!(exit_rx.recv_timeout(Duration::from_secs(secs)), Err(mpsc::RecvTimeoutError::Timeout)),
        None => {
            let _ = exit_rx.recv();
            false
        }
    };
    if timed_out {
        // ESRCH only if the whole group is gone already.
        let _ = killpg(pid, Signal::SIGKILL);
    }
    let status = child.wait();
    let _ = watcher.join();
    let status = status.map_err(|source| {
        let (kind, path) = kind_path();
        HookError::Wait { kind, path, source }
    })?;
    if let Some(secs) = timeout.filter(|_| timed_out) {
        let (kind, path) = kind_path();
        tracing::warn!(kind, path = %path.display(), secs, "hook timed out, killed");
        return Err(HookError::Timeout { kind, path, secs });
    }
    if status.success() {
        return Ok(());
    }

    let mut outputs = [Vec::new(), Vec::new()];
    let deadline = std::time::Instant::now() + OUTPUT_GRACE;
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match output_rx.recv_timeout(left) {
            Ok((stream, tail)) => outputs[stream] = tail,
            Err(_) => break,
        }
    }
    let [stderr, stdout] = outputs;
    let tail = if stderr.iter().all(u8::is_ascii_whitespace) { stdout } else { stderr };
    let (kind, path) = kind_path();
    Err(HookError::Failed { kind, path, status, output: String::from_utf8_lossy(&tail).trim().to_owned() })
}

/// Read `reader` to its end, keeping the last [`OUTPUT_TAIL`] bytes.
fn read_tail(mut reader: impl Read) -> Vec<u8> {
    let mut tail = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > OUTPUT_TAIL {
                    tail.drain(..tail.len() - OUTPUT_TAIL);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    tail
}

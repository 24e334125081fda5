//! A container's status machine and its persisted state (`<root>/<id>/state.json`).
//!
//! The status is never trusted from disk: it is derived on every load from the init process
//! (alive, same start time so a reused pid reads as stopped) and from `exec.fifo` (present
//! until `start` consumes it).

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};
use twinbox_exit::ExitCode;

use crate::cgroups::CgroupManager;

/// The OCI runtime spec version this runtime reports.
pub const OCI_VERSION: &str = "1.2.0";
/// The state file inside a container's state directory.
pub const STATE_FILE: &str = "state.json";
/// The fifo the init blocks on until `start`.
pub const EXEC_FIFO: &str = "exec.fifo";

/// The lifecycle status (OCI `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Stopped,
    Paused,
}

impl Status {
    /// `start` is only for a created container.
    pub fn can_start(self) -> bool {
        self == Status::Created
    }

    /// Signals reach a created, running or paused container.
    pub fn can_kill(self) -> bool {
        matches!(self, Status::Created | Status::Running | Status::Paused)
    }

    /// Without `--force`, only stopped (and, as runc does, created) containers are deleted.
    pub fn can_delete(self) -> bool {
        matches!(self, Status::Stopped | Status::Created)
    }

    /// `exec` joins a created or running container.
    pub fn can_exec(self) -> bool {
        matches!(self, Status::Created | Status::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Stopped => "stopped",
            Status::Paused => "paused",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is known about a container: the OCI state plus twinbox's extras.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    pub id: String,
    pub status: Status,
    /// The init's pid in the runtime's pid namespace.
    pub pid: i32,
    pub bundle: PathBuf,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
    /// The container's root filesystem on the host.
    pub rootfs: PathBuf,
    /// RFC 3339 creation time.
    pub created: String,
    /// The uid that created the container; `list` prints its name (as runc, which leaves the
    /// state document's `owner` empty and looks the name up only when listing).
    #[serde(default)]
    pub owner_uid: u32,
    /// Field 22 of /proc/PID/stat at create time.
    pub init_start_time: u64,
    pub cgroup: CgroupManager,
    /// The spec the container was created from (hooks, namespaces, process defaults for exec).
    pub config: Spec,
    /// `pause` froze the container's cgroup (and `resume` has not thawed it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// A container without a mount namespace of its own mounts in the host's: how many mounts
    /// were stacked at `rootfs` before it, so that `delete` detaches its own and no others
    /// (see `rootfs::unmount_host_mounts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mounts_below: Option<usize>,
}

/// The OCI state document printed by `state` and given to hooks on stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OciState {
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    pub id: String,
    pub pid: i32,
    pub status: Status,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub created: String,
    pub owner: String,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

/// Errors of reading and writing state files.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ExitCode for StateError {
    fn exit_code(&self) -> i32 {
        match self {
            StateError::Read { .. } | StateError::Parse { .. } | StateError::Write { .. } => twinbox_exit::INTERNAL,
        }
    }
}

impl State {
    /// The OCI view (pid 0 once stopped, as runc prints it).
    pub fn oci(&self) -> OciState {
        OciState {
            oci_version: self.oci_version.clone(),
            id: self.id.clone(),
            pid: if self.status == Status::Stopped { 0 } else { self.pid },
            status: self.status,
            bundle: self.bundle.clone(),
            rootfs: self.rootfs.clone(),
            created: self.created.clone(),
            owner: String::new(),
            annotations: self.annotations.clone(),
        }
    }

    /// The name of [`owner_uid`](Self::owner_uid) from the host's user database, else the
    /// number.
    pub fn owner_name(&self) -> String {
        let uid = nix::unistd::Uid::from_raw(self.owner_uid);
        nix::unistd::User::from_uid(uid).ok().flatten().map(|u| u.name).unwrap_or_else(|| uid.to_string())
    }

    /// The OCI state as JSON bytes (for hooks and the `state` command).
    pub fn oci_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.oci()).unwrap_or_default()
    }

    /// Load `<dir>/state.json` and derive the current status.
    pub fn load(dir: &Path) -> Result<State, StateError> {
        let path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&path).map_err(|source| StateError::Read { path: path.clone(), source })?;
        let mut st: State = serde_json::from_slice(&bytes).map_err(|source| StateError::Parse { path, source })?;
        st.refresh(dir);
        Ok(st)
    }

    /// Re-derive `status` from the init process and the exec fifo.
    pub fn refresh(&mut self, dir: &Path) {
        self.status = match derive_status(self.pid, self.init_start_time, &dir.join(EXEC_FIFO)) {
            Status::Running if self.paused => Status::Paused,
            s => s,
        };
    }

    /// Write `<dir>/state.json` atomically (temp file + rename).
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        // 0600: the config snapshot holds the process environment.
        write_atomic(&dir.join(STATE_FILE), &bytes, 0o600)
    }
}

/// Write a file atomically with `mode`: a temp file next to it, then a rename. No fsync: the
/// state describes live processes, which a crash of the machine ends anyway (runc does the
/// same), and a sync costs every container start a disk flush when --root is not on tmpfs.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StateError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| StateError::Write { path: path.to_path_buf(), source };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(err)?;
    let res = f.write_all(bytes).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

/// The status of a container whose init was `pid`, started at `start_time` (clock ticks since
/// boot), with its exec fifo at `fifo`.
pub fn derive_status(pid: i32, start_time: u64, fifo: &Path) -> Status {
    if pid <= 0 {
        return Status::Stopped;
    }
    match ProcStat::read(pid) {
        Some(st) if st.start_time == start_time && !matches!(st.state, 'Z' | 'X' | 'x') => {
            if fifo.exists() {
                Status::Created
            } else {
                Status::Running
            }
        }
        _ => Status::Stopped,
    }
}

/// The two fields of /proc/PID/stat the runtime needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: R, S, D, Z, T, …
    pub state: char,
    /// Field 22: start time in clock ticks after boot.
    pub start_time: u64,
}

impl ProcStat {
    /// Read /proc/PID/stat; `None` if the process does not exist.
    pub fn read(pid: i32) -> Option<ProcStat> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        ProcStat::parse(&s)
    }

    /// Parse a stat line. The command name (field 2) is in parentheses and may itself hold
    /// spaces and parentheses, so fields are counted from the last ')'.
    pub fn parse(s: &str) -> Option<ProcStat> {
        let rest = &s[s.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace();
        // fields after ')': 3 = state, … 22 = starttime → index 0 and 19.
        let state = fields.next()?.chars().next()?;
        let start_time = fields.nth(18)?.parse().ok()?;
        Some(ProcStat { state, start_time })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 98765 1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let st = ProcStat::parse(line).unwrap();
        assert_eq!(st.state, 'S');
        assert_eq!(st.start_time, 98765);
    }

    #[test]
    fn own_process_is_alive() {
        let me = std::process::id() as i32;
        let st = ProcStat::read(me).unwrap();
        let dir = std::env::temp_dir();
        assert_eq!(derive_status(me, st.start_time, &dir.join("no-such-fifo-here")), Status::Running);
        assert_eq!(derive_status(me, st.start_time + 1, &dir.join("x")), Status::Stopped);
        assert_eq!(derive_status(0, 0, &dir), Status::Stopped);
    }

    #[test]
    fn status_machine() {
        assert!(Status::Created.can_start());
        assert!(!Status::Running.can_start());
        assert!(!Status::Stopped.can_kill());
        assert!(Status::Running.can_kill());
        assert!(!Status::Running.can_delete());
        assert!(Status::Stopped.can_delete());
        assert_eq!(serde_json::to_string(&Status::Created).unwrap(), "\"created\"");
    }
}

//! `spec.process` → the credentials of the container process.
//!
//! [`prepare`] runs in the runtime before fork (or in the child before anything is dropped) and
//! does everything that allocates or can fail on bad input. [`Prepared::apply`] runs in the
//! container's init as the last step before execve and only makes syscalls, in runc's order:
//!
//! 1. rlimits
//! 2. oom_score_adj
//! 3. seccomp, if `noNewPrivileges` is false (installing it without no_new_privs needs
//!    CAP_SYS_ADMIN, still held here; the filter then also sees the steps below)
//! 4. bounding set (needs CAP_SETPCAP, so before the uid change)
//! 5. `PR_SET_KEEPCAPS 1`, setgroups, setgid, setuid, umask, `PR_SET_KEEPCAPS 0`
//! 6. inheritable, effective, permitted and ambient capabilities
//! 7. `PR_SET_NO_NEW_PRIVS`, if asked for
//! 8. seccomp, if `noNewPrivileges` is true (no privilege needed any more)
//!
//! Without `process.capabilities` the capability sets are left alone (runc does the same): a
//! root process keeps the runtime's, and a change to a non-zero uid clears them the usual way,
//! since keep-caps is not set then.

use std::io::Write;

use nix::errno::Errno;
use nix::sys::prctl;
use oci_spec::runtime::{LinuxSeccomp, Process};
use twinbox_exit::ExitCode;

use crate::caps::{CapSets, CapsError};
use crate::rlimits::{self, Rlimit, RlimitError};
use crate::seccomp::{self, Filter, SeccompError};
use crate::user::{User, UserError};

/// Errors from preparing or applying a process's credentials. Each names the step and the value.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Rlimit(#[from] RlimitError),
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Caps(#[from] CapsError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("oom_score_adj {0} out of range (-1000..=1000)")]
    OomScoreAdjRange(i32),
    #[error("write {0} to /proc/self/oom_score_adj")]
    OomScoreAdj(i32, #[source] std::io::Error),
    #[error("prctl(PR_SET_KEEPCAPS, {0})")]
    KeepCaps(u8, #[source] Errno),
    #[error("prctl(PR_SET_NO_NEW_PRIVS, 1)")]
    NoNewPrivs(#[source] Errno),
}

impl ExitCode for ProcessError {
    fn exit_code(&self) -> i32 {
        match self {
            ProcessError::Rlimit(e) => e.exit_code(),
            ProcessError::User(e) => e.exit_code(),
            ProcessError::Caps(e) => e.exit_code(),
            ProcessError::Seccomp(e) => e.exit_code(),
            ProcessError::OomScoreAdjRange(_) => twinbox_exit::USER_ERROR,
            ProcessError::OomScoreAdj(..) | ProcessError::KeepCaps(..) | ProcessError::NoNewPrivs(_) => {
                twinbox_exit::INTERNAL
            }
        }
    }
}

/// A process's credentials, checked and compiled, ready to [`apply`](Prepared::apply).
#[derive(Debug, Clone)]
pub struct Prepared {
    rlimits: Vec<Rlimit>,
    oom_score_adj: Option<i32>,
    seccomp: Option<Filter>,
    no_new_privileges: bool,
    caps: Option<CapSets>,
    user: User,
}

/// Check `process` and compile `seccomp` (the spec's `linux.seccomp`).
pub fn prepare(process: &Process, seccomp: Option<&LinuxSeccomp>) -> Result<Prepared, ProcessError> {
    let rlimits = rlimits::from_spec(process.rlimits().as_deref().unwrap_or_default())?;
    let oom_score_adj = process.oom_score_adj();
    if let Some(adj) = oom_score_adj {
        if !(-1000..=1000).contains(&adj) {
            return Err(ProcessError::OomScoreAdjRange(adj));
        }
    }
    let caps = process.capabilities().as_ref().map(CapSets::from_spec).transpose()?;
    let user = User::from_spec(process.user())?;
    let seccomp = seccomp.map(seccomp::compile).transpose()?;
    for (field, set) in [
        ("apparmorProfile", process.apparmor_profile().is_some()),
        ("selinuxLabel", process.selinux_label().is_some()),
        ("ioPriority", process.io_priority().is_some()),
        ("scheduler", process.scheduler().is_some()),
        ("execCPUAffinity", process.exec_cpu_affinity().is_some()),
    ] {
        if set {
            tracing::warn!(field, "process field not supported, ignored");
        }
    }
    Ok(Prepared {
        rlimits,
        oom_score_adj,
        seccomp,
        no_new_privileges: process.no_new_privileges().unwrap_or(false),
        caps,
        user,
    })
}

impl Prepared {
    /// Apply everything to the calling process (its thread, for the per-thread parts: caps,
    /// no_new_privs, seccomp without TSYNC). Meant for a single-threaded child right before
    /// execve; makes syscalls only and allocates only to report an error.
    pub fn apply(&self) -> Result<(), ProcessError> {
        rlimits::apply(&self.rlimits)?;
        if let Some(adj) = self.oom_score_adj {
            write_oom_score_adj(adj)?;
        }
        if !self.no_new_privileges {
            if let Some(filter) = &self.seccomp {
                filter.install()?;
            }
        }
        match &self.caps {
            Some(caps) => {
                caps.drop_bounding()?;
                prctl::set_keepcaps(true).map_err(|e| ProcessError::KeepCaps(1, e))?;
                self.user.apply()?;
                prctl::set_keepcaps(false).map_err(|e| ProcessError::KeepCaps(0, e))?;
                caps.apply()?;
            }
            None => self.user.apply()?,
        }
        if self.no_new_privileges {
            prctl::set_no_new_privs().map_err(ProcessError::NoNewPrivs)?;
            if let Some(filter) = &self.seccomp {
                filter.install()?;
            }
        }
        Ok(())
    }

    pub fn user(&self) -> &User {
        &self.user
    }

    /// `None` when the spec has no `process.capabilities`.
    pub fn caps(&self) -> Option<&CapSets> {
        self.caps.as_ref()
    }

    pub fn rlimits(&self) -> &[Rlimit] {
        &self.rlimits
    }

    pub fn seccomp(&self) -> Option<&Filter> {
        self.seccomp.as_ref()
    }

    pub fn no_new_privileges(&self) -> bool {
        self.no_new_privileges
    }

    pub fn oom_score_adj(&self) -> Option<i32> {
        self.oom_score_adj
    }
}

fn write_oom_score_adj(adj: i32) -> Result<(), ProcessError> {
    let mut buf = [0u8; 16];
    let len = {
        let mut cursor = &mut buf[..];
        // "-1000" fits; writing into a slice cannot fail otherwise.
        let _ = write!(cursor, "{adj}");
        16 - cursor.len()
    };
    std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/oom_score_adj")
        .and_then(|mut file| file.write_all(&buf[..len]))
        .map_err(|e| ProcessError::OomScoreAdj(adj, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(json: &str) -> Process {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn prepare_checks_everything() {
        let err = |json: &str| prepare(&process(json), None).unwrap_err().to_string();
        let base = r#""cwd": "/", "user": {"uid": 0, "gid": 0}"#;
        assert_eq!(
            err(&format!(r#"{{{base}, "oomScoreAdj": 1001}}"#)),
            "oom_score_adj 1001 out of range (-1000..=1000)"
        );
        assert_eq!(
            err(&format!(r#"{{{base}, "rlimits": [{{"type": "RLIMIT_NOFILE", "soft": 5, "hard": 4}}]}}"#)),
            "rlimit RLIMIT_NOFILE: soft limit 5 above hard limit 4"
        );
        assert_eq!(err(r#"{"cwd": "/", "user": {"uid": 0, "gid": 0, "umask": 512}}"#), "user: umask 0o1000 invalid");
        let notify: LinuxSeccomp = serde_json::from_str(r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#).unwrap();
        let p = process(&format!("{{{base}}}"));
        assert_eq!(prepare(&p, Some(&notify)).unwrap_err().to_string(), "seccomp: SCMP_ACT_NOTIFY not supported");
    }

    #[test]
    fn prepare_resolves() {
        let p = process(
            r#"{"cwd": "/", "user": {"uid": 1000, "gid": 1000}, "noNewPrivileges": true,
                "oomScoreAdj": -500,
                "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}],
                "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]}}"#,
        );
        let allow: LinuxSeccomp = serde_json::from_str(r#"{"defaultAction": "SCMP_ACT_ALLOW"}"#).unwrap();
        let prepared = prepare(&p, Some(&allow)).unwrap();
        assert!(prepared.no_new_privileges());
        assert_eq!(prepared.oom_score_adj(), Some(-500));
        assert_eq!(prepared.rlimits().len(), 1);
        assert_eq!(prepared.user().uid().as_raw(), 1000);
        assert!(prepared.caps().unwrap().effective().contains(&::caps::Capability::CAP_KILL));
        assert!(prepared.seccomp().is_some());
        // No capabilities in the spec: left alone.
        let bare = prepare(&process(r#"{"cwd": "/", "user": {"uid": 0, "gid": 0}}"#), None).unwrap();
        assert!(bare.caps().is_none());
        assert!(!bare.no_new_privileges());
    }
}

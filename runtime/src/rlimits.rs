//! `process.rlimits` → setrlimit(2).

use nix::errno::Errno;
use nix::sys::resource::{setrlimit, Resource};
use oci_spec::runtime::{PosixRlimit, PosixRlimitType};
use twinbox_exit::ExitCode;

/// Errors from checking or applying resource limits.
#[derive(Debug, thiserror::Error)]
pub enum RlimitError {
    #[error("rlimit {typ}: soft limit {soft} above hard limit {hard}")]
    SoftAboveHard { typ: PosixRlimitType, soft: u64, hard: u64 },
    #[error("setrlimit({typ}, soft {soft}, hard {hard})")]
    Set {
        typ: PosixRlimitType,
        soft: u64,
        hard: u64,
        #[source]
        source: Errno,
    },
}

impl ExitCode for RlimitError {
    fn exit_code(&self) -> i32 {
        match self {
            RlimitError::SoftAboveHard { .. } => twinbox_exit::USER_ERROR,
            RlimitError::Set { .. } => twinbox_exit::INTERNAL,
        }
    }
}

/// One resource limit, checked and resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    typ: PosixRlimitType,
    resource: Resource,
    soft: u64,
    hard: u64,
}

impl Rlimit {
    /// Check one OCI rlimit (`u64::MAX` is RLIM_INFINITY).
    pub fn from_spec(rlimit: &PosixRlimit) -> Result<Self, RlimitError> {
        let (typ, soft, hard) = (rlimit.typ(), rlimit.soft(), rlimit.hard());
        if soft > hard {
            return Err(RlimitError::SoftAboveHard { typ, soft, hard });
        }
        Ok(Self { typ, resource: resource(typ), soft, hard })
    }

    /// setrlimit(2) for the whole process. Raising a hard limit needs CAP_SYS_RESOURCE.
    pub fn apply(&self) -> Result<(), RlimitError> {
        setrlimit(self.resource, self.soft, self.hard).map_err(|source| RlimitError::Set {
            typ: self.typ,
            soft: self.soft,
            hard: self.hard,
            source,
        })
    }

    pub fn typ(&self) -> PosixRlimitType {
        self.typ
    }

    pub fn soft(&self) -> u64 {
        self.soft
    }

    pub fn hard(&self) -> u64 {
        self.hard
    }
}

/// Check all of `process.rlimits`.
pub fn from_spec(rlimits: &[PosixRlimit]) -> Result<Vec<Rlimit>, RlimitError> {
    rlimits.iter().map(Rlimit::from_spec).collect()
}

/// Apply limits in order. Allocation free.
pub fn apply(rlimits: &[Rlimit]) -> Result<(), RlimitError> {
    rlimits.iter().try_for_each(Rlimit::apply)
}

fn resource(typ: PosixRlimitType) -> Resource {
    match typ {
        PosixRlimitType::RlimitCpu => Resource::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => Resource::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => Resource::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => Resource::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => Resource::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => Resource::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => Resource::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => Resource::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => Resource::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => Resource::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => Resource::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => Resource::RLIMIT_RTTIME,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rlimit(json: &str) -> PosixRlimit {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn checks_soft_against_hard() {
        let ok = Rlimit::from_spec(&rlimit(r#"{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 20}"#)).unwrap();
        assert_eq!((ok.soft(), ok.hard()), (10, 20));
        let err = Rlimit::from_spec(&rlimit(r#"{"type": "RLIMIT_NPROC", "soft": 30, "hard": 20}"#)).unwrap_err();
        assert_eq!(err.to_string(), "rlimit RLIMIT_NPROC: soft limit 30 above hard limit 20");
        let unlimited = rlimit(
            r#"{"type": "RLIMIT_CORE", "soft": 18446744073709551615,
                                    "hard": 18446744073709551615}"#,
        );
        assert!(Rlimit::from_spec(&unlimited).is_ok());
    }

    #[test]
    fn unknown_type_is_refused_by_the_spec() {
        let err = serde_json::from_str::<PosixRlimit>(r#"{"type": "RLIMIT_FOO", "soft": 1}"#);
        assert!(err.unwrap_err().to_string().contains("RLIMIT_FOO"));
    }
}

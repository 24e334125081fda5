//! `process.user` → supplementary groups, gid, uid and umask of the container process.

use nix::errno::Errno;
use nix::sys::stat::{umask, Mode};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
use twinbox_exit::ExitCode;

/// The kernel's NGROUPS_MAX.
const NGROUPS_MAX: usize = 65536;

/// Errors from checking or applying the user.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user: uid {0} invalid")]
    Uid(u32),
    #[error("user: gid {0} invalid")]
    Gid(u32),
    #[error("user: {0} groups, the kernel takes at most {NGROUPS_MAX}")]
    TooManyGroups(usize),
    #[error("user: umask {0:#o} invalid")]
    Umask(u32),
    #[error("setgroups({0:?})")]
    Setgroups(Vec<u32>, #[source] Errno),
    #[error("setgroups({0:?}): denied in this user namespace (/proc/self/setgroups)")]
    SetgroupsDenied(Vec<u32>),
    #[error("setgid({0})")]
    Setgid(u32, #[source] Errno),
    #[error("setuid({0})")]
    Setuid(u32, #[source] Errno),
}

impl ExitCode for UserError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        match self {
            UserError::Uid(_)
            | UserError::Gid(_)
            | UserError::TooManyGroups(_)
            | UserError::Umask(_)
            | UserError::SetgroupsDenied(_) => USER_ERROR,
            UserError::Setgroups(..) | UserError::Setgid(..) | UserError::Setuid(..) => INTERNAL,
        }
    }
}

/// The checked user of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    uid: Uid,
    gid: Gid,
    /// The primary gid, then the additional gids without repeats.
    groups: Vec<Gid>,
    /// Whether the spec asked for additional gids (beyond the primary one).
    additional: bool,
    umask: Option<Mode>,
}

impl User {
    /// Check `process.user`. `username` (Windows only in the spec) is ignored.
    pub fn from_spec(user: &oci_spec::runtime::User) -> Result<Self, UserError> {
        // (uid_t)-1 means "unchanged" to the set*id calls.
        if user.uid() == u32::MAX {
            return Err(UserError::Uid(user.uid()));
        }
        if user.gid() == u32::MAX {
            return Err(UserError::Gid(user.gid()));
        }
        let additional_gids = user.additional_gids().as_deref().unwrap_or_default();
        let mut seen = std::collections::HashSet::from([user.gid()]);
        let mut groups = vec![Gid::from_raw(user.gid())];
        for &gid in additional_gids {
            if gid == u32::MAX {
                return Err(UserError::Gid(gid));
            }
            if seen.insert(gid) {
                groups.push(Gid::from_raw(gid));
            }
        }
        if groups.len() > NGROUPS_MAX {
            return Err(UserError::TooManyGroups(groups.len()));
        }
        let additional = !additional_gids.is_empty();
        let umask = match user.umask() {
            None => None,
            Some(bits) if bits <= 0o777 => Some(Mode::from_bits_truncate(bits)),
            Some(bits) => return Err(UserError::Umask(bits)),
        };
        Ok(Self { uid: Uid::from_raw(user.uid()), gid: Gid::from_raw(user.gid()), groups, additional, umask })
    }

    /// setgroups, setresgid, setresuid, umask, in that order. Needs CAP_SETGID and CAP_SETUID
    /// unless nothing changes. Allocation free, except on error.
    ///
    /// setgroups(2) is skipped when the user namespace denies it and no additional gids were
    /// asked for (rootless containers).
    pub fn apply(&self) -> Result<(), UserError> {
        if let Err(errno) = setgroups(&self.groups) {
            if errno != Errno::EPERM || !setgroups_denied() {
                return Err(UserError::Setgroups(raw(&self.groups), errno));
            }
            if self.additional {
                return Err(UserError::SetgroupsDenied(raw(&self.groups)));
            }
        }
        setresgid(self.gid, self.gid, self.gid).map_err(|errno| UserError::Setgid(self.gid.as_raw(), errno))?;
        setresuid(self.uid, self.uid, self.uid).map_err(|errno| UserError::Setuid(self.uid.as_raw(), errno))?;
        if let Some(mask) = self.umask {
            umask(mask);
        }
        Ok(())
    }

    pub fn uid(&self) -> Uid {
        self.uid
    }

    pub fn gid(&self) -> Gid {
        self.gid
    }

    /// The groups setgroups(2) is given: the primary gid, then the additional ones.
    pub fn groups(&self) -> &[Gid] {
        &self.groups
    }

    pub fn umask(&self) -> Option<Mode> {
        self.umask
    }
}

fn raw(groups: &[Gid]) -> Vec<u32> {
    groups.iter().map(|g| g.as_raw()).collect()
}

fn setgroups_denied() -> bool {
    std::fs::read("/proc/self/setgroups").is_ok_and(|content| content.starts_with(b"deny"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(json: &str) -> oci_spec::runtime::User {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn groups_start_with_the_primary_gid() {
        let u =
            User::from_spec(&user(r#"{"uid": 1000, "gid": 100, "additionalGids": [10, 100, 20, 10], "umask": 18}"#))
                .unwrap();
        let groups: Vec<u32> = u.groups().iter().map(|g| g.as_raw()).collect();
        assert_eq!(groups, [100, 10, 20]);
        assert_eq!(u.uid().as_raw(), 1000);
        assert_eq!(u.umask(), Some(Mode::from_bits_truncate(0o022)));
        let plain = User::from_spec(&user(r#"{"uid": 0, "gid": 0}"#)).unwrap();
        assert_eq!(plain.groups(), &[Gid::from_raw(0)]);
        assert_eq!(plain.umask(), None);
    }

    #[test]
    fn invalid_users() {
        let err = |json: &str| User::from_spec(&user(json)).unwrap_err().to_string();
        assert_eq!(err(r#"{"uid": 4294967295, "gid": 0}"#), "user: uid 4294967295 invalid");
        assert_eq!(err(r#"{"uid": 0, "gid": 4294967295}"#), "user: gid 4294967295 invalid");
        assert_eq!(err(r#"{"uid": 0, "gid": 0, "umask": 4096}"#), "user: umask 0o10000 invalid");
        let many: Vec<u32> = (0..70_000).collect();
        let json = serde_json::json!({"uid": 0, "gid": 0, "additionalGids": many}).to_string();
        assert!(err(&json).contains("at most 65536"));
    }
}

//! Linux namespaces: which ones the spec asks for, the clone that creates them, joining
//! namespaces given by path, and the uid/gid maps the parent writes for a new user namespace.
//!
//! New namespaces are created by the clone of the init itself (so the init is pid 1 of a new
//! pid namespace *and* a child of the caller), except the cgroup namespace, which the init
//! unshares after the parent has put it into its cgroup. A pid namespace given by path is
//! joined in the parent around the clone (setns(CLONE_NEWPID) only affects children) and the
//! parent's own is restored right after.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxIdMapping, LinuxNamespace, LinuxNamespaceType};
use twinbox_exit::ExitCode;

/// Errors of namespace set-up.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("namespace {0} is listed twice")]
    Duplicate(&'static str),
    #[error("creating a new time namespace is not supported (join one by path instead)")]
    NewTimeUnsupported,
    #[error("joining a user namespace by path while creating a new {0} namespace is not supported")]
    UserPathWithNew(&'static str),
    #[error("opening namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("joining {kind} namespace")]
    Setns {
        kind: &'static str,
        #[source]
        source: Errno,
    },
    #[error("unsharing {kind} namespace")]
    Unshare {
        kind: &'static str,
        #[source]
        source: Errno,
    },
    #[error("clone")]
    Clone(#[source] Errno),
    /// A user that is not root (in the initial user namespace) asked for more than its own id.
    #[error(
        "as uid {uid}, a container's {what} map can only map {own} (one line, size 1, such as \
         {{\"containerID\": 0, \"hostID\": {own}, \"size\": 1}}); run as root for wider maps \
         (`twinbox-runc spec --rootless` writes a config that fits)"
    )]
    UnprivilegedMap { what: &'static str, uid: u32, own: u32 },
    #[error("writing {path}")]
    IdMap {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ExitCode for NamespaceError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        match self {
            NamespaceError::Duplicate(_)
            | NamespaceError::NewTimeUnsupported
            | NamespaceError::UserPathWithNew(_)
            | NamespaceError::Open { .. }
            | NamespaceError::UnprivilegedMap { .. } => USER_ERROR,
            NamespaceError::Setns { .. }
            | NamespaceError::Unshare { .. }
            | NamespaceError::Clone(_)
            | NamespaceError::IdMap { .. } => INTERNAL,
        }
    }
}

/// The clone flag of a namespace type.
pub fn flag(t: LinuxNamespaceType) -> CloneFlags {
    match t {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::Time => CloneFlags::from_bits_retain(libc::CLONE_NEWTIME),
    }
}

/// The namespace's name under /proc/PID/ns/.
pub fn proc_name(t: LinuxNamespaceType) -> &'static str {
    match t {
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    }
}

/// setns order: the user namespace first (it grants the rights to join the others), the mount
/// namespace last (it changes how later paths resolve).
const JOIN_ORDER: [LinuxNamespaceType; 7] = [
    LinuxNamespaceType::User,
    LinuxNamespaceType::Ipc,
    LinuxNamespaceType::Uts,
    LinuxNamespaceType::Network,
    LinuxNamespaceType::Time,
    LinuxNamespaceType::Cgroup,
    LinuxNamespaceType::Mount,
];

/// The namespaces of a spec, sorted into what is created and what is joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespaces {
    /// Namespaces created by the clone of the init (all new ones but cgroup).
    pub clone_flags: CloneFlags,
    /// A new cgroup namespace, unshared by the init once it is in its cgroup.
    pub new_cgroup: bool,
    /// Namespaces joined by the init with setns, in [`JOIN_ORDER`].
    pub joins: Vec<(LinuxNamespaceType, PathBuf)>,
    /// A pid namespace joined by path (around the clone, in the parent).
    pub pid_path: Option<PathBuf>,
    /// Every type listed, new or joined.
    pub listed: Vec<LinuxNamespaceType>,
}

impl Namespaces {
    pub fn from_spec(list: &[LinuxNamespace]) -> Result<Namespaces, NamespaceError> {
        let mut ns = Namespaces {
            clone_flags: CloneFlags::empty(),
            new_cgroup: false,
            joins: Vec::new(),
            pid_path: None,
            listed: Vec::new(),
        };
        for n in list {
            let t = n.typ();
            if ns.listed.contains(&t) {
                return Err(NamespaceError::Duplicate(proc_name(t)));
            }
            ns.listed.push(t);
            match (t, n.path()) {
                (LinuxNamespaceType::Pid, Some(p)) => ns.pid_path = Some(p.clone()),
                (_, Some(p)) => ns.joins.push((t, p.clone())),
                (LinuxNamespaceType::Cgroup, None) => ns.new_cgroup = true,
                (LinuxNamespaceType::Time, None) => return Err(NamespaceError::NewTimeUnsupported),
                (_, None) => ns.clone_flags |= flag(t),
            }
        }
        ns.joins.sort_by_key(|(t, _)| JOIN_ORDER.iter().position(|o| o == t));
        if ns.joins.iter().any(|(t, _)| *t == LinuxNamespaceType::User) {
            // New namespaces would be owned by the runtime's user namespace, not the joined one.
            if let Some(t) = ns.listed.iter().find(|t| **t != LinuxNamespaceType::User && ns.is_new(**t)) {
                return Err(NamespaceError::UserPathWithNew(proc_name(*t)));
            }
        }
        Ok(ns)
    }

    /// Is a new namespace of type `t` created?
    pub fn is_new(&self, t: LinuxNamespaceType) -> bool {
        if t == LinuxNamespaceType::Cgroup {
            return self.new_cgroup;
        }
        self.clone_flags.contains(flag(t))
    }

    /// Is `t` listed (new or joined)?
    pub fn contains(&self, t: LinuxNamespaceType) -> bool {
        self.listed.contains(&t)
    }
}

/// Fork a child with `flags` (new namespaces) the way fork(2) does — the child continues on a
/// copy of the caller's stack — and run `child` in it; its return value is the exit code.
/// Returns the child's pid in the parent.
///
/// The child must only do what a forked child of a possibly multi-threaded process may do; the
/// runtime's callers are single-threaded when they create containers.
pub fn clone_process(flags: CloneFlags, child: impl FnOnce() -> i32) -> Result<Pid, NamespaceError> {
    clone_process_into(flags, None, child).map(|(pid, _)| pid)
}

/// `clone3(2)`'s argument block (the kernel's `struct clone_args`, version 2 with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// clone3's flag: start the child in the cgroup v2 directory `CloneArgs::cgroup` names.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// [`clone_process`], the child born in the cgroup v2 directory `cgroup` when one is given
/// (`clone3` with `CLONE_INTO_CGROUP`, Linux ≥ 5.7): no migration afterwards, so none of the
/// global lock a write to `cgroup.procs` takes. The flag says whether the child is in
/// `cgroup`; `false` where clone3 is missing or refused (old kernel, a seccomp profile), after
/// falling back to a plain clone, so the caller moves the child itself.
pub fn clone_process_into(
    flags: CloneFlags,
    cgroup: Option<BorrowedFd<'_>>,
    child: impl FnOnce() -> i32,
) -> Result<(Pid, bool), NamespaceError> {
    let ret = match cgroup {
        Some(fd) => {
            let args = CloneArgs {
                flags: flags.bits() as u64 | CLONE_INTO_CGROUP,
                exit_signal: libc::SIGCHLD as u64,
                cgroup: fd.as_raw_fd() as u64,
                ..CloneArgs::default()
            };
            // SAFETY: as for the clone below: no CLONE_VM and a zero stack make clone3 a fork;
            // `args` is a live, correctly sized clone_args the kernel only reads, and its
            // pointer fields are zero. The child never returns from this function.
            let ret =
                unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
            match Errno::last() {
                Errno::ENOSYS | Errno::E2BIG | Errno::EINVAL | Errno::EPERM if ret == -1 => None,
                _ => Some((ret, true)),
            }
        }
        None => None,
    };
    let (ret, joined) = match ret {
        Some(r) => r,
        None => {
            let raw_flags = flags.bits() as libc::c_ulong | libc::SIGCHLD as libc::c_ulong;
            // SAFETY: a clone without CLONE_VM and with a NULL stack is fork(): the child gets
            // a private copy of the address space, including this stack frame, and returns 0
            // from the syscall. No pointers are passed for tids or TLS. The child never returns
            // from this function: it exits via `exit_now`.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    raw_flags,
                    std::ptr::null_mut::<libc::c_void>(),
                    std::ptr::null_mut::<libc::c_int>(),
                    std::ptr::null_mut::<libc::c_int>(),
                    0 as libc::c_ulong,
                )
            };
            (ret, false)
        }
    };
    match ret {
        -1 => Err(NamespaceError::Clone(Errno::last())),
        0 => {
            let code = child();
            crate::syscall::exit_now(code)
        }
        pid => Ok((Pid::from_raw(pid as i32), joined)),
    }
}

/// While alive, children forked by this process land in another pid namespace; dropping it
/// restores the process's own.
#[derive(Debug)]
pub struct PidNsForChildren {
    own: OwnedFd,
}

impl PidNsForChildren {
    /// Make children of this process land in the pid namespace at `path`.
    pub fn enter(path: &Path) -> Result<PidNsForChildren, NamespaceError> {
        let own = open_ns(Path::new("/proc/self/ns/pid"))?;
        let target = open_ns(path)?;
        nix::sched::setns(target.as_fd(), CloneFlags::CLONE_NEWPID)
            .map_err(|source| NamespaceError::Setns { kind: "pid", source })?;
        Ok(PidNsForChildren { own })
    }
}

impl Drop for PidNsForChildren {
    fn drop(&mut self) {
        if let Err(e) = nix::sched::setns(self.own.as_fd(), CloneFlags::CLONE_NEWPID) {
            tracing::error!(error = %e, "restoring the runtime's pid namespace");
        }
    }
}

fn open_ns(path: &Path) -> Result<OwnedFd, NamespaceError> {
    File::open(path).map(OwnedFd::from).map_err(|source| NamespaceError::Open { path: path.to_path_buf(), source })
}

/// Namespaces opened and ready to join.
#[derive(Debug)]
pub struct OpenNamespaces(Vec<(LinuxNamespaceType, OwnedFd)>);

impl OpenNamespaces {
    /// Open every path first (a later setns, especially of the mount namespace, could make the
    /// others unreachable).
    pub fn open(joins: &[(LinuxNamespaceType, PathBuf)]) -> Result<OpenNamespaces, NamespaceError> {
        let mut out = Vec::with_capacity(joins.len());
        for (t, p) in joins {
            out.push((*t, open_ns(p)?));
        }
        out.sort_by_key(|(t, _)| JOIN_ORDER.iter().position(|o| o == t));
        Ok(OpenNamespaces(out))
    }

    /// The namespaces of a running process that differ from ours, of the given types (for
    /// exec). The pid namespace is not included (see [`PidNsForChildren`]).
    pub fn of_process(pid: Pid, types: &[LinuxNamespaceType]) -> Result<OpenNamespaces, NamespaceError> {
        let mut joins = Vec::new();
        for t in JOIN_ORDER {
            if !types.contains(&t) {
                continue;
            }
            let theirs = PathBuf::from(format!("/proc/{pid}/ns/{}", proc_name(t)));
            let ours = PathBuf::from(format!("/proc/self/ns/{}", proc_name(t)));
            if same_file(&theirs, &ours) {
                continue; // joining our own user namespace would fail with EINVAL
            }
            joins.push((t, theirs));
        }
        OpenNamespaces::open(&joins)
    }

    /// setns into each, user first and mount last.
    pub fn join(&self) -> Result<(), NamespaceError> {
        for (t, fd) in &self.0 {
            nix::sched::setns(fd.as_fd(), flag(*t))
                .map_err(|source| NamespaceError::Setns { kind: proc_name(*t), source })?;
        }
        Ok(())
    }

    pub fn contains(&self, t: LinuxNamespaceType) -> bool {
        self.0.iter().any(|(x, _)| *x == t)
    }
}

/// Do two paths name the same inode (namespace files compare this way)?
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// unshare(2) one namespace type.
pub fn unshare(t: LinuxNamespaceType) -> Result<(), NamespaceError> {
    nix::sched::unshare(flag(t)).map_err(|source| NamespaceError::Unshare { kind: proc_name(t), source })
}

/// Format id mappings as /proc/PID/uid_map wants them.
pub fn format_id_map(maps: &[LinuxIdMapping]) -> String {
    maps.iter().map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size())).collect()
}

/// What the kernel lets a user without `CAP_SETUID` in the initial user namespace write: a
/// single line mapping its own uid (and gid). Root, also root inside a user namespace (as
/// rootless podman runs runtimes), may write any map.
pub fn check_id_maps(uid_maps: &[LinuxIdMapping], gid_maps: &[LinuxIdMapping]) -> Result<(), NamespaceError> {
    let uid = nix::unistd::geteuid().as_raw();
    if uid == 0 {
        return Ok(());
    }
    let gid = nix::unistd::getegid().as_raw();
    let fits = |maps: &[LinuxIdMapping], own: u32| match maps {
        [] => true,
        [m] => m.host_id() == own && m.size() == 1,
        _ => false,
    };
    if !fits(uid_maps, uid) {
        return Err(NamespaceError::UnprivilegedMap { what: "uid", uid, own: uid });
    }
    if !fits(gid_maps, gid) {
        return Err(NamespaceError::UnprivilegedMap { what: "gid", uid, own: gid });
    }
    Ok(())
}

/// Write the uid and gid maps of `pid`'s new user namespace (from its parent). An
/// unprivileged caller must deny setgroups first, or the kernel refuses the gid map.
pub fn write_id_maps(pid: Pid, uid_maps: &[LinuxIdMapping], gid_maps: &[LinuxIdMapping]) -> Result<(), NamespaceError> {
    let write = |name: &str, content: &str| {
        let path = PathBuf::from(format!("/proc/{pid}/{name}"));
        std::fs::write(&path, content).map_err(|source| NamespaceError::IdMap { path, source })
    };
    if !uid_maps.is_empty() {
        write("uid_map", &format_id_map(uid_maps))?;
    }
    if !gid_maps.is_empty() {
        if !nix::unistd::geteuid().is_root() {
            write("setgroups", "deny")?;
        }
        write("gid_map", &format_id_map(gid_maps))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(json: &str) -> Result<Namespaces, NamespaceError> {
        let list: Vec<LinuxNamespace> = serde_json::from_str(json).unwrap();
        Namespaces::from_spec(&list)
    }

    #[test]
    fn sorts_new_and_joined() {
        let n = ns(r#"[{"type":"pid"},{"type":"network","path":"/run/netns/x"},{"type":"mount"},
                      {"type":"cgroup"},{"type":"uts"},{"type":"ipc","path":"/proc/1/ns/ipc"}]"#)
        .unwrap();
        assert_eq!(n.clone_flags, CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS);
        assert!(n.new_cgroup);
        assert_eq!(
            n.joins,
            vec![
                (LinuxNamespaceType::Ipc, PathBuf::from("/proc/1/ns/ipc")),
                (LinuxNamespaceType::Network, PathBuf::from("/run/netns/x")),
            ]
        );
        assert!(n.is_new(LinuxNamespaceType::Pid));
        assert!(!n.is_new(LinuxNamespaceType::Network));
        assert!(n.contains(LinuxNamespaceType::Network));
    }

    #[test]
    fn refuses_odd_combinations() {
        assert!(matches!(ns(r#"[{"type":"pid"},{"type":"pid"}]"#), Err(NamespaceError::Duplicate("pid"))));
        assert!(matches!(ns(r#"[{"type":"time"}]"#), Err(NamespaceError::NewTimeUnsupported)));
        assert!(matches!(
            ns(r#"[{"type":"user","path":"/proc/1/ns/user"},{"type":"mount"}]"#),
            Err(NamespaceError::UserPathWithNew("mnt"))
        ));
    }

    #[test]
    fn formats_maps() {
        let maps: Vec<LinuxIdMapping> =
            serde_json::from_str(r#"[{"containerID":0,"hostID":100000,"size":65536}]"#).unwrap();
        assert_eq!(format_id_map(&maps), "0 100000 65536\n");
    }
}

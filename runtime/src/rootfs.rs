//! The container's root filesystem, built inside its own mount namespace by the init.
//!
//! Order (runc's): make `/` private (or `rootfsPropagation`), mount the overlay from the
//! `dev.twinbox.rootfs.overlay` annotation on the root (else bind the root onto itself), the
//! spec's mounts in order, default devices and `/dev` symlinks ([`prepare`]); then — after the
//! createContainer hooks — `pivot_root` ([`pivot`]); then masked paths, read-only paths and a
//! read-only root ([`finalize`]).
//!
//! Mount targets are resolved component by component inside the root ([`resolve_in_root`]):
//! symlinks are followed as the container would see them, and a `..` or a symlink that would
//! leave the root is refused rather than clamped, so a hostile bundle gets an error, not a
//! mount somewhere unexpected.
//!
//! Cgroup mounts: the host's cgroup directories of *this* container are bind-mounted read-only
//! (on v1/hybrid under a tmpfs, one directory per hierarchy as on the host; on pure v2 the
//! container's directory itself). This works with and without a cgroup namespace and in user
//! namespaces, where a v1 hierarchy cannot be mounted.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{Mode, SFlag};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount};
use serde::Deserialize;
use twinbox_exit::ExitCode;

use crate::syscall::Syscall;

/// The annotation carrying the overlay layer stack (DESIGN.md).
pub const OVERLAY_ANNOTATION: &str = "dev.twinbox.rootfs.overlay";

const MAX_SYMLINKS: usize = 40;

/// Errors of building the root filesystem. Messages name the container-side path.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("mounting {source_name} on {dest}")]
    Mount {
        source_name: String,
        dest: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("remounting {dest}")]
    Remount {
        dest: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("setting propagation of {dest}")]
    Propagation {
        dest: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("mount destination {path} escapes the container root")]
    Escape { path: PathBuf },
    #[error("mount destination {path} must be absolute")]
    Relative { path: PathBuf },
    #[error("too many levels of symbolic links resolving {path}")]
    Loop { path: PathBuf },
    #[error("resolving {path}")]
    Resolve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating mount target {path}")]
    CreateTarget {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("bind mount source {path}")]
    BindSource {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unsupported mount option {option:?} on {dest}")]
    Option { option: String, dest: PathBuf },
    #[error("invalid rootfsPropagation {value:?}")]
    RootPropagation { value: String },
    #[error("invalid {OVERLAY_ANNOTATION} annotation")]
    Overlay {
        #[source]
        source: serde_json::Error,
    },
    #[error("creating device {path}")]
    Device {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("creating symlink {path}")]
    Symlink {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("making {path} the root (pivot_root or chroot)")]
    Pivot {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("unmounting what the container mounted at {path} in the host's mount namespace")]
    Unmount {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("masking {path}")]
    Mask {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("making {path} read-only")]
    Readonly {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

impl ExitCode for RootfsError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        match self {
            // The spec's mounts and root propagation.
            RootfsError::Escape { .. }
            | RootfsError::Relative { .. }
            | RootfsError::Loop { .. }
            | RootfsError::BindSource { .. }
            | RootfsError::Option { .. }
            | RootfsError::RootPropagation { .. }
            | RootfsError::Overlay { .. } => USER_ERROR,
            RootfsError::Mount { .. }
            | RootfsError::Remount { .. }
            | RootfsError::Propagation { .. }
            | RootfsError::Resolve { .. }
            | RootfsError::CreateTarget { .. }
            | RootfsError::Device { .. }
            | RootfsError::Symlink { .. }
            | RootfsError::Pivot { .. }
            | RootfsError::Unmount { .. }
            | RootfsError::Mask { .. }
            | RootfsError::Readonly { .. } => INTERNAL,
        }
    }
}

/// The overlay annotation's value: lower layers top-most first, upper and work dirs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Overlay {
    pub lower: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
}

impl Overlay {
    pub fn parse(value: &str) -> Result<Overlay, RootfsError> {
        serde_json::from_str(value).map_err(|source| RootfsError::Overlay { source })
    }

    /// overlayfs mount data.
    pub fn data(&self) -> String {
        let lower: Vec<String> = self.lower.iter().map(|p| p.display().to_string()).collect();
        format!("lowerdir={},upperdir={},workdir={}", lower.join(":"), self.upper.display(), self.work.display())
    }
}

/// One cgroup directory of this container to bind into the container's `/sys/fs/cgroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupBind {
    /// The container's directory in that hierarchy on the host.
    pub host: PathBuf,
    /// The name under the cgroup mount (`memory`, `cpu,cpuacct`, `unified`…); empty on a pure
    /// cgroup v2 host, where the directory is bound on the mount point itself.
    pub name: String,
}

/// Everything [`prepare`] and [`finalize`] need, borrowed from the spec.
#[derive(Debug, Clone, Copy)]
pub struct RootfsConfig<'a> {
    /// The root on the host (absolute).
    pub rootfs: &'a Path,
    /// The bundle, against which relative bind sources are resolved.
    pub bundle: &'a Path,
    pub mounts: &'a [Mount],
    pub devices: &'a [LinuxDevice],
    pub propagation: Option<&'a str>,
    pub overlay: Option<&'a Overlay>,
    pub readonly_root: bool,
    pub masked_paths: &'a [String],
    pub readonly_paths: &'a [String],
    /// In a new user namespace: devices are bind-mounted from the host instead of mknod.
    pub user_ns: bool,
    /// No mount namespace of its own (none in the spec, as runc allows): the mounts are made
    /// in the host's, under a bind of the root that is made private (nothing mounted under it
    /// reaches the host's other mounts), and the init chroots instead of pivot_root, which
    /// would move the host's root. `delete` unmounts them ([`unmount_host_mounts`]).
    pub host_mounts: bool,
}

/// Parsed mount options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Flags to set.
    pub flags: MsFlags,
    /// Propagation changes to apply after mounting, in order.
    pub propagation: Vec<MsFlags>,
    /// Filesystem data (`mode=755,size=65536k`).
    pub data: Vec<String>,
}

impl MountOptions {
    pub fn is_bind(&self) -> bool {
        self.flags.contains(MsFlags::MS_BIND)
    }

    pub fn data_string(&self) -> Option<String> {
        if self.data.is_empty() {
            None
        } else {
            Some(self.data.join(","))
        }
    }

    /// The flags a bind remount should add (everything but bind/rec).
    fn remount_flags(&self) -> MsFlags {
        self.flags - MsFlags::MS_BIND - MsFlags::MS_REC - MsFlags::MS_REMOUNT
    }
}

/// Parse mount option strings the way mount(8) does: known flags become `MsFlags`, propagation
/// keywords are kept apart, anything else is filesystem data.
pub fn parse_options(options: &[String], dest: &Path) -> Result<MountOptions, RootfsError> {
    let mut out = MountOptions { flags: MsFlags::empty(), propagation: Vec::new(), data: Vec::new() };
    for opt in options {
        let (set, clear) = match opt.as_str() {
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "lazytime" => (MsFlags::MS_LAZYTIME, MsFlags::empty()),
            "nolazytime" => (MsFlags::empty(), MsFlags::MS_LAZYTIME),
            "iversion" => (MsFlags::MS_I_VERSION, MsFlags::empty()),
            "noiversion" => (MsFlags::empty(), MsFlags::MS_I_VERSION),
            "acl" => (MsFlags::MS_POSIXACL, MsFlags::empty()),
            "noacl" => (MsFlags::empty(), MsFlags::MS_POSIXACL),
            "silent" => (MsFlags::MS_SILENT, MsFlags::empty()),
            "loud" => (MsFlags::empty(), MsFlags::MS_SILENT),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            // runc's extension: copy the image's content into a tmpfs. Accepted, not done.
            "tmpcopyup" => (MsFlags::empty(), MsFlags::empty()),
            p @ ("private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable" | "runbindable") => {
                out.propagation.push(propagation_flags(p).unwrap_or(MsFlags::MS_PRIVATE));
                continue;
            }
            o @ ("idmap" | "ridmap" | "rro" | "rrw" | "rnosuid" | "rsuid" | "rnodev" | "rdev" | "rnoexec" | "rexec"
            | "rnoatime" | "ratime") => {
                return Err(RootfsError::Option { option: o.to_string(), dest: dest.to_path_buf() })
            }
            data => {
                out.data.push(data.to_string());
                continue;
            }
        };
        out.flags.insert(set);
        out.flags.remove(clear);
    }
    Ok(out)
}

/// `private`, `rslave`… as mount flags.
pub fn propagation_flags(p: &str) -> Option<MsFlags> {
    Some(match p {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        _ => return None,
    })
}

/// Resolve `path` (a container path) inside `root` on the real filesystem: every symlink is
/// followed as it would be inside the container (absolute targets restart at `root`), and any
/// `..` that would climb above `root` is an error. Components that do not exist yet are kept
/// as they are. The result starts with `root`.
pub fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf, RootfsError> {
    let escape = || RootfsError::Escape { path: path.to_path_buf() };
    let mut resolved: Vec<OsString> = Vec::new();
    let mut pending: VecDeque<OsString> = VecDeque::new();
    push_components(&mut pending, path, false);
    let mut links = 0;
    let mut missing = false;
    while let Some(c) = pending.pop_front() {
        if c == ".." {
            if resolved.pop().is_none() {
                return Err(escape());
            }
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&c);
        if !missing {
            match std::fs::symlink_metadata(&candidate) {
                Ok(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(RootfsError::Loop { path: path.to_path_buf() });
                    }
                    let target = std::fs::read_link(&candidate)
                        .map_err(|source| RootfsError::Resolve { path: path.to_path_buf(), source })?;
                    if target.is_absolute() {
                        resolved.clear();
                    }
                    push_components(&mut pending, &target, true);
                    continue;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing = true,
                Err(source) => return Err(RootfsError::Resolve { path: path.to_path_buf(), source }),
            }
        }
        resolved.push(c);
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(out)
}

/// Queue the normal and `..` components of `p` (at the front when `front`, keeping order).
fn push_components(q: &mut VecDeque<OsString>, p: &Path, front: bool) {
    let comps: Vec<OsString> = p
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect();
    if front {
        for c in comps.into_iter().rev() {
            q.push_front(c);
        }
    } else {
        q.extend(comps);
    }
}

/// What a mount target should be when it has to be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetKind {
    Dir,
    File,
}

/// Resolve `dest` inside `root` and create it (and missing parents) if needed.
fn make_target(sys: &dyn Syscall, root: &Path, dest: &Path, kind: TargetKind) -> Result<PathBuf, RootfsError> {
    if !dest.is_absolute() {
        return Err(RootfsError::Relative { path: dest.to_path_buf() });
    }
    let target = resolve_in_root(root, dest)?;
    let rel = target.strip_prefix(root).unwrap_or(Path::new(""));
    let mut cur = root.to_path_buf();
    let n = rel.components().count();
    for (i, c) in rel.components().enumerate() {
        cur.push(c);
        if std::fs::symlink_metadata(&cur).is_ok() {
            continue;
        }
        let last = i + 1 == n;
        let res = if last && kind == TargetKind::File {
            sys.create_file(&cur, Mode::from_bits_truncate(0o755))
        } else {
            sys.mkdir(&cur, Mode::from_bits_truncate(0o755))
        };
        match res {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(source) => return Err(RootfsError::CreateTarget { path: dest.to_path_buf(), source }),
        }
    }
    Ok(target)
}

/// Everything up to (not including) pivot_root. `sys` must be in the container's mount
/// namespace. `join_cgroups` puts the init into its cgroups and says where they are on the
/// host; it is called once, at the first cgroup mount or else after the spec's mounts, so that
/// the mounts before it overlap with the runtime still making the cgroups.
pub fn prepare<E: From<RootfsError>>(
    sys: &dyn Syscall,
    cfg: &RootfsConfig<'_>,
    join_cgroups: impl FnOnce() -> Result<Vec<CgroupBind>, E>,
) -> Result<(), E> {
    let mut join = Some(join_cgroups);
    let mut binds = None;
    // 1. Nothing we mount may propagate back to the host. A shared root is made shared
    //    after pivot_root ([`root_propagation`]): pivot_root refuses a shared new root or
    //    parent, and until then the namespace stays private.
    //    In the host's mount namespace the host's propagation stays as it is.
    let prop = match cfg.propagation {
        None | Some("") | Some("shared" | "rshared") => MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        Some(p) => propagation_flags(p).ok_or_else(|| RootfsError::RootPropagation { value: p.to_string() })?,
    };
    if !cfg.host_mounts {
        sys.mount(None, Path::new("/"), None, prop, None)
            .map_err(|source| RootfsError::Propagation { dest: PathBuf::from("/"), source })?;
    }

    // 2. The root itself must be a mount point for pivot_root.
    let root = cfg.rootfs;
    match cfg.overlay {
        Some(ov) => {
            let data = ov.data();
            sys.mount(Some(Path::new("overlay")), root, Some("overlay"), MsFlags::empty(), Some(&data)).map_err(
                |source| RootfsError::Mount { source_name: "overlay".into(), dest: PathBuf::from("/"), source },
            )?;
        }
        None => {
            sys.mount(Some(root), root, None, MsFlags::MS_BIND | MsFlags::MS_REC, None).map_err(|source| {
                RootfsError::Mount { source_name: root.display().to_string(), dest: PathBuf::from("/"), source }
            })?;
        }
    }

    if cfg.host_mounts {
        // Only this mount: what is mounted under it stays under it.
        sys.mount(None, root, None, MsFlags::MS_PRIVATE, None)
            .map_err(|source| RootfsError::Propagation { dest: root.to_path_buf(), source })?;
    }

    // 3. The spec's mounts, in order.
    let mut dev_is_bind = false;
    for m in cfg.mounts {
        let dest = m.destination();
        let typ = m.typ().as_deref().unwrap_or("");
        let opts = parse_options(m.options().as_deref().unwrap_or(&[]), dest)?;
        if m.uid_mappings().is_some() || m.gid_mappings().is_some() {
            return Err(RootfsError::Option {
                option: "uidMappings/gidMappings (idmapped mounts)".into(),
                dest: dest.clone(),
            }
            .into());
        }
        let bind = typ == "bind" || opts.is_bind();
        if dest == Path::new("/dev") && bind {
            dev_is_bind = true;
        }
        if matches!(typ, "cgroup" | "cgroup2") && !bind {
            if let Some(j) = join.take() {
                binds = Some(j()?);
            }
            mount_cgroup(sys, cfg, binds.as_deref().unwrap_or(&[]), dest, &opts)?;
        } else if bind {
            mount_bind(sys, cfg, m, &opts)?;
        } else {
            mount_fs(sys, cfg, m, typ, &opts)?;
        }
    }

    if let Some(j) = join.take() {
        j()?;
    }

    // 4. Devices and the usual /dev symlinks, unless /dev is the host's.
    if !dev_is_bind {
        create_devices(sys, cfg)?;
        dev_symlinks(sys, root)?;
    }
    Ok(())
}

fn mount_fs(
    sys: &dyn Syscall,
    cfg: &RootfsConfig<'_>,
    m: &Mount,
    typ: &str,
    opts: &MountOptions,
) -> Result<(), RootfsError> {
    let dest = m.destination();
    let target = make_target(sys, cfg.rootfs, dest, TargetKind::Dir)?;
    let source = m.source().clone().unwrap_or_else(|| PathBuf::from(if typ.is_empty() { "none" } else { typ }));
    let data = opts.data_string();
    let fstype = if typ.is_empty() { None } else { Some(typ) };
    let res = sys.mount(Some(&source), &target, fstype, opts.flags, data.as_deref());
    match res {
        Ok(()) => {}
        // sysfs cannot be mounted in a user namespace without its own network namespace:
        // bind the host's, as runc does.
        Err(Errno::EPERM) if typ == "sysfs" && cfg.user_ns => {
            sys.mount(Some(Path::new("/sys")), &target, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)
                .map_err(|source| RootfsError::Mount { source_name: "/sys".into(), dest: dest.clone(), source })?;
            remount_bind(sys, &target, dest, opts.remount_flags())?;
        }
        Err(errno) => {
            return Err(RootfsError::Mount {
                source_name: source.display().to_string(),
                dest: dest.clone(),
                source: errno,
            })
        }
    }
    apply_propagation(sys, &target, dest, opts)
}

fn mount_bind(sys: &dyn Syscall, cfg: &RootfsConfig<'_>, m: &Mount, opts: &MountOptions) -> Result<(), RootfsError> {
    let dest = m.destination();
    let src = m.source().clone().unwrap_or_default();
    let src = if src.is_absolute() { src } else { cfg.bundle.join(src) };
    let meta = std::fs::metadata(&src).map_err(|source| RootfsError::BindSource { path: src.clone(), source })?;
    let kind = if meta.is_dir() { TargetKind::Dir } else { TargetKind::File };
    let target = make_target(sys, cfg.rootfs, dest, kind)?;
    let flags = MsFlags::MS_BIND | (opts.flags & MsFlags::MS_REC);
    sys.mount(Some(&src), &target, None, flags, None).map_err(|source| RootfsError::Mount {
        source_name: src.display().to_string(),
        dest: dest.clone(),
        source,
    })?;
    let extra = opts.remount_flags();
    if !extra.is_empty() {
        remount_bind(sys, &target, dest, extra)?;
    }
    apply_propagation(sys, &target, dest, opts)
}

/// Bind-remount `target` with `flags`, keeping the flags the mount already has (a user
/// namespace cannot clear locked nosuid/nodev/noexec).
fn remount_bind(sys: &dyn Syscall, target: &Path, dest: &Path, flags: MsFlags) -> Result<(), RootfsError> {
    let keep = sys.mount_flags_of(target).unwrap_or(MsFlags::empty());
    sys.mount(None, target, None, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags | keep, None)
        .map_err(|source| RootfsError::Remount { dest: dest.to_path_buf(), source })
}

fn apply_propagation(sys: &dyn Syscall, target: &Path, dest: &Path, opts: &MountOptions) -> Result<(), RootfsError> {
    for p in &opts.propagation {
        sys.mount(None, target, None, *p, None)
            .map_err(|source| RootfsError::Propagation { dest: dest.to_path_buf(), source })?;
    }
    Ok(())
}

fn mount_cgroup(
    sys: &dyn Syscall,
    cfg: &RootfsConfig<'_>,
    binds: &[CgroupBind],
    dest: &Path,
    opts: &MountOptions,
) -> Result<(), RootfsError> {
    let target = make_target(sys, cfg.rootfs, dest, TargetKind::Dir)?;
    let ro_flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let bind_one = |host: &Path, at: &Path, shown: &Path| -> Result<(), RootfsError> {
        sys.mount(Some(host), at, None, MsFlags::MS_BIND, None).map_err(|source| RootfsError::Mount {
            source_name: host.display().to_string(),
            dest: shown.to_path_buf(),
            source,
        })?;
        let flags = if opts.flags.contains(MsFlags::MS_RDONLY) { ro_flags } else { ro_flags - MsFlags::MS_RDONLY };
        remount_bind(sys, at, shown, flags)
    };
    if let [only] = binds {
        if only.name.is_empty() {
            // Pure cgroup v2: the container's directory is the mount.
            bind_one(&only.host, &target, dest)?;
            return apply_propagation(sys, &target, dest, opts);
        }
    }
    let tmpfs_flags = opts.flags - MsFlags::MS_RDONLY - MsFlags::MS_BIND - MsFlags::MS_REC;
    sys.mount(Some(Path::new("tmpfs")), &target, Some("tmpfs"), tmpfs_flags, Some("mode=755"))
        .map_err(|source| RootfsError::Mount { source_name: "tmpfs".into(), dest: dest.to_path_buf(), source })?;
    for b in binds {
        let at = target.join(&b.name);
        let shown = dest.join(&b.name);
        sys.mkdir(&at, Mode::from_bits_truncate(0o755))
            .or_else(|e| if e == Errno::EEXIST { Ok(()) } else { Err(e) })
            .map_err(|source| RootfsError::CreateTarget { path: shown.clone(), source })?;
        bind_one(&b.host, &at, &shown)?;
        // Co-mounted controllers (cpu,cpuacct) also get their single names, as on the host.
        if b.name.contains(',') {
            for part in b.name.split(',') {
                let link = target.join(part);
                match sys.symlink(Path::new(&b.name), &link) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(source) => return Err(RootfsError::Symlink { path: dest.join(part), source }),
                }
            }
        }
    }
    if opts.flags.contains(MsFlags::MS_RDONLY) {
        sys.mount(None, &target, None, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | tmpfs_flags, Some("mode=755"))
            .map_err(|source| RootfsError::Remount { dest: dest.to_path_buf(), source })?;
    }
    apply_propagation(sys, &target, dest, opts)
}

/// runc's default devices: (path, major, minor).
pub const DEFAULT_DEVICES: [(&str, u64, u64); 6] = [
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
];

struct Dev {
    path: PathBuf,
    kind: SFlag,
    major: u64,
    minor: u64,
    mode: u32,
    uid: u32,
    gid: u32,
}

fn create_devices(sys: &dyn Syscall, cfg: &RootfsConfig<'_>) -> Result<(), RootfsError> {
    let mut devs: Vec<Dev> = DEFAULT_DEVICES
        .iter()
        .filter(|(p, _, _)| !cfg.devices.iter().any(|d| d.path() == Path::new(p)))
        .map(|&(p, major, minor)| Dev {
            path: PathBuf::from(p),
            kind: SFlag::S_IFCHR,
            major,
            minor,
            mode: 0o666,
            uid: 0,
            gid: 0,
        })
        .collect();
    for d in cfg.devices {
        let kind = match d.typ() {
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            _ => SFlag::S_IFCHR,
        };
        devs.push(Dev {
            path: d.path().clone(),
            kind,
            major: d.major() as u64,
            minor: d.minor() as u64,
            mode: d.file_mode().unwrap_or(0o666),
            uid: d.uid().unwrap_or(0),
            gid: d.gid().unwrap_or(0),
        });
    }
    for d in devs {
        let err = |source| RootfsError::Device { path: d.path.clone(), source };
        let parent = d.path.parent().unwrap_or(Path::new("/dev"));
        let dir = make_target(sys, cfg.rootfs, parent, TargetKind::Dir)?;
        let name = d.path.file_name().unwrap_or_default();
        let target = dir.join(name);
        if !dir.starts_with(cfg.rootfs) {
            return Err(RootfsError::Escape { path: d.path });
        }
        let made = if cfg.user_ns {
            Err(Errno::EPERM)
        } else {
            match sys.mknod(
                &target,
                d.kind,
                Mode::from_bits_truncate(d.mode & 0o7777),
                libc::makedev(d.major as u32, d.minor as u32),
            ) {
                Err(Errno::EEXIST) => Ok(()),
                r => r,
            }
        };
        match made {
            Ok(()) => sys.lchown(&target, d.uid, d.gid).map_err(err)?,
            Err(Errno::EPERM) => {
                // No mknod (user namespace): bind the host's node onto an empty file.
                sys.create_file(&target, Mode::from_bits_truncate(0o644)).map_err(err)?;
                sys.mount(Some(&d.path), &target, None, MsFlags::MS_BIND, None).map_err(|source| {
                    RootfsError::Mount { source_name: d.path.display().to_string(), dest: d.path.clone(), source }
                })?;
            }
            Err(e) => return Err(err(e)),
        }
    }
    Ok(())
}

fn dev_symlinks(sys: &dyn Syscall, root: &Path) -> Result<(), RootfsError> {
    let mut links = vec![
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
        ("pts/ptmx", "ptmx"),
    ];
    if Path::new("/proc/kcore").exists() {
        links.push(("/proc/kcore", "core"));
    }
    let dev = resolve_in_root(root, Path::new("/dev"))?;
    for (target, name) in links {
        let link = dev.join(name);
        if name == "ptmx" {
            // A ptmx node from the image would shadow the container's devpts instance.
            if let Ok(m) = std::fs::symlink_metadata(&link) {
                if !m.file_type().is_symlink() {
                    let _ = std::fs::remove_file(&link);
                }
            }
        }
        match sys.symlink(Path::new(target), &link) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(source) => return Err(RootfsError::Symlink { path: PathBuf::from("/dev").join(name), source }),
        }
    }
    Ok(())
}

/// Make `rootfs` the root: pivot_root(".", ".") then detach the old root stacked on top, or,
/// with `no_pivot`, move the mount onto `/` and chroot (for ramfs roots where pivot_root fails).
pub fn pivot(sys: &dyn Syscall, rootfs: &Path, no_pivot: bool) -> Result<(), RootfsError> {
    let err = |source| RootfsError::Pivot { path: rootfs.to_path_buf(), source };
    sys.chdir(rootfs).map_err(err)?;
    if no_pivot {
        sys.mount(Some(rootfs), Path::new("/"), None, MsFlags::MS_MOVE, None).map_err(err)?;
        sys.chroot(Path::new(".")).map_err(err)?;
    } else {
        sys.pivot_root(Path::new("."), Path::new(".")).map_err(err)?;
        // The old root is now mounted over the new one at ".": keep its unmount from
        // propagating anywhere, then detach it.
        sys.mount(None, Path::new("."), None, MsFlags::MS_SLAVE | MsFlags::MS_REC, None).map_err(err)?;
        sys.umount2(Path::new("."), MntFlags::MNT_DETACH).map_err(err)?;
    }
    sys.chdir(Path::new("/")).map_err(err)
}

/// Make `rootfs` the root of a container in the host's mount namespace
/// ([`RootfsConfig::host_mounts`]): chroot, as runc does there.
pub fn chroot_into(sys: &dyn Syscall, rootfs: &Path) -> Result<(), RootfsError> {
    let err = |source| RootfsError::Pivot { path: rootfs.to_path_buf(), source };
    sys.chdir(rootfs).map_err(err)?;
    sys.chroot(Path::new(".")).map_err(err)?;
    sys.chdir(Path::new("/")).map_err(err)
}

/// How many mounts are stacked at `root` in this process's mount namespace.
pub fn stacked_at(root: &Path) -> usize {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    crate::mountinfo::parse(&text).iter().filter(|m| m.mount_point == root).count()
}

/// Detaches what a container in the host's mount namespace mounted ([`RootfsConfig::host_mounts`]):
/// the mounts stacked at `root` above the `below` that were there before it was created (its
/// bind of the root, with everything under it).
pub fn unmount_host_mounts(root: &Path, below: usize) -> Result<(), RootfsError> {
    // Bounded: the init stacks one (two with a read-only root remounted in place, which is
    // the same mount).
    for _ in 0..8 {
        if stacked_at(root) <= below {
            return Ok(());
        }
        nix::mount::umount2(root, MntFlags::MNT_DETACH)
            .map_err(|source| RootfsError::Unmount { path: root.to_path_buf(), source })?;
    }
    Ok(())
}

/// After pivot_root: a `rootfsPropagation` of `shared` or `rshared` applied to the new `/`
/// (as runc applies the root's propagation once it is the root). Its peers are the
/// container's own mounts: the namespace was made private before, so nothing it mounts
/// reaches the host, nor the host's its mounts.
pub fn root_propagation(sys: &dyn Syscall, propagation: Option<&str>) -> Result<(), RootfsError> {
    let Some(p @ ("shared" | "rshared")) = propagation else { return Ok(()) };
    let flags = propagation_flags(p).ok_or_else(|| RootfsError::RootPropagation { value: p.to_string() })?;
    sys.mount(None, Path::new("/"), None, flags, None)
        .map_err(|source| RootfsError::Propagation { dest: PathBuf::from("/"), source })
}

/// After pivot_root: masked paths, read-only paths, read-only root. `root` is where the
/// container's `/` is seen (`/` for real; a directory in unit tests).
pub fn finalize(sys: &dyn Syscall, cfg: &RootfsConfig<'_>, root: &Path) -> Result<(), RootfsError> {
    for p in cfg.masked_paths {
        let target = root.join(p.trim_start_matches('/'));
        let Ok(meta) = std::fs::metadata(&target) else {
            continue; // missing ones are ignored
        };
        let shown = PathBuf::from(p);
        let res = if meta.is_dir() {
            sys.mount(Some(Path::new("tmpfs")), &target, Some("tmpfs"), MsFlags::MS_RDONLY, None)
        } else {
            sys.mount(Some(&root.join("dev/null")), &target, None, MsFlags::MS_BIND, None)
        };
        res.map_err(|source| RootfsError::Mask { path: shown, source })?;
    }
    for p in cfg.readonly_paths {
        let target = root.join(p.trim_start_matches('/'));
        if std::fs::symlink_metadata(&target).is_err() {
            continue;
        }
        let err = |source| RootfsError::Readonly { path: PathBuf::from(p), source };
        sys.mount(Some(&target), &target, None, MsFlags::MS_BIND | MsFlags::MS_REC, None).map_err(err)?;
        let keep = sys.mount_flags_of(&target).unwrap_or(MsFlags::empty());
        sys.mount(None, &target, None, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | keep, None)
            .map_err(err)?;
    }
    if cfg.readonly_root {
        let keep = sys.mount_flags_of(root).unwrap_or(MsFlags::empty());
        sys.mount(None, root, None, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | keep, None)
            .map_err(|source| RootfsError::Readonly { path: PathBuf::from("/"), source })?;
    }
    Ok(())
}

/// The cgroup directories of the calling process, per hierarchy, from /proc/self/mountinfo and
/// /proc/self/cgroup (read before unsharing a cgroup namespace, which would hide them).
pub fn cgroup_binds() -> Vec<CgroupBind> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cgroup_binds_from(&mountinfo, &cgroup)
}

/// [`cgroup_binds`] on given file contents.
pub fn cgroup_binds_from(mountinfo: &str, proc_cgroup: &str) -> Vec<CgroupBind> {
    struct CgMount<'a> {
        root: &'a str,
        point: &'a str,
        v2: bool,
        opts: Vec<&'a str>,
    }
    let mut mounts = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let v2 = match post[0] {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        mounts.push(CgMount { root: pre[3], point: pre[4], v2, opts: post[2].split(',').collect() });
    }
    let mut out = Vec::new();
    let v1_present = mounts.iter().any(|m| !m.v2);
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let found = if ctrls.is_empty() {
            mounts.iter().find(|m| m.v2)
        } else {
            let want: Vec<&str> = ctrls.split(',').collect();
            mounts.iter().find(|m| !m.v2 && want.iter().all(|w| m.opts.contains(w)))
        };
        let Some(m) = found else { continue };
        let rel = path.strip_prefix(m.root).unwrap_or(path).trim_start_matches('/');
        let host = if rel.is_empty() { PathBuf::from(m.point) } else { Path::new(m.point).join(rel) };
        let name = if m.v2 && !v1_present {
            String::new()
        } else {
            Path::new(m.point).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        };
        if !out.iter().any(|b: &CgroupBind| b.name == name) {
            out.push(CgroupBind { host, name });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::{Call, RecordingSyscall};
    use oci_spec::runtime::get_default_mounts;

    fn cfg<'a>(root: &'a Path, mounts: &'a [Mount]) -> RootfsConfig<'a> {
        RootfsConfig {
            rootfs: root,
            bundle: root,
            mounts,
            devices: &[],
            propagation: None,
            overlay: None,
            readonly_root: false,
            masked_paths: &[],
            readonly_paths: &[],
            user_ns: false,
            host_mounts: false,
        }
    }

    fn no_cgroups() -> Result<Vec<CgroupBind>, RootfsError> {
        Ok(Vec::new())
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_mount_options() {
        let o = parse_options(
            &strs(&["nosuid", "strictatime", "mode=755", "size=65536k", "ro", "rslave"]),
            Path::new("/dev"),
        )
        .unwrap();
        assert_eq!(o.flags, MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME | MsFlags::MS_RDONLY);
        assert_eq!(o.data_string().as_deref(), Some("mode=755,size=65536k"));
        assert_eq!(o.propagation, vec![MsFlags::MS_SLAVE | MsFlags::MS_REC]);

        let o = parse_options(&strs(&["rbind", "ro", "rw", "nodev"]), Path::new("/x")).unwrap();
        assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_NODEV);
        assert!(o.is_bind());
        assert!(parse_options(&strs(&["idmap"]), Path::new("/x")).is_err());
    }

    #[test]
    fn resolves_inside_root_and_refuses_escapes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("etc/sub")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../etc/sub", root.join("etc/rel")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("etc/out")).unwrap();
        std::os::unix::fs::symlink("loop2", root.join("loop1")).unwrap();
        std::os::unix::fs::symlink("loop1", root.join("loop2")).unwrap();

        let r = |p: &str| resolve_in_root(root, Path::new(p));
        assert_eq!(r("/etc/sub").unwrap(), root.join("etc/sub"));
        // An absolute link restarts at the container root, not the host's.
        assert_eq!(r("/abs/sub/x").unwrap(), root.join("etc/sub/x"));
        assert_eq!(r("/etc/rel/new").unwrap(), root.join("etc/sub/new"));
        assert_eq!(r("/etc/../etc/sub").unwrap(), root.join("etc/sub"));
        assert!(matches!(r("/../etc"), Err(RootfsError::Escape { .. })));
        assert!(matches!(r("/etc/../../x"), Err(RootfsError::Escape { .. })));
        assert!(matches!(r("/etc/out/x"), Err(RootfsError::Escape { .. })));
        assert!(matches!(r("/loop1"), Err(RootfsError::Loop { .. })));
        // Missing components are kept verbatim.
        assert_eq!(r("/new/dir").unwrap(), root.join("new/dir"));
    }

    #[test]
    fn mount_sequence_for_default_spec() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("rootfs");
        std::fs::create_dir_all(root.join("proc")).unwrap();
        let mounts = get_default_mounts();
        let binds = vec![
            CgroupBind { host: "/sys/fs/cgroup/memory/twinbox/c1".into(), name: "memory".into() },
            CgroupBind { host: "/sys/fs/cgroup/unified/twinbox/c1".into(), name: "unified".into() },
        ];
        let c = cfg(&root, &mounts);
        let sys = RecordingSyscall::new();
        let mut joined = 0;
        prepare(&sys, &c, || -> Result<_, RootfsError> {
            joined += 1;
            // Joined at the cgroup mount, after the mounts before it.
            assert_eq!(
                sys.mounts().len(),
                2 + mounts.iter().take_while(|m| m.typ().as_deref() != Some("cgroup")).count()
            );
            Ok(binds.clone())
        })
        .unwrap();
        assert_eq!(joined, 1);
        pivot(&sys, &root, false).unwrap();

        let targets: Vec<(Option<String>, PathBuf)> = sys
            .mounts()
            .into_iter()
            .map(|c| match c {
                Call::Mount { target, fstype, .. } => (fstype, target),
                _ => unreachable!(),
            })
            .collect();
        let t = |s: &str| root.join(s);
        let expected: Vec<(Option<String>, PathBuf)> = vec![
            (None, PathBuf::from("/")),
            (None, root.clone()),
            (Some("proc".into()), t("proc")),
            (Some("tmpfs".into()), t("dev")),
            (Some("devpts".into()), t("dev/pts")),
            (Some("tmpfs".into()), t("dev/shm")),
            (Some("mqueue".into()), t("dev/mqueue")),
            (Some("sysfs".into()), t("sys")),
            (Some("tmpfs".into()), t("sys/fs/cgroup")),
            (None, t("sys/fs/cgroup/memory")),
            (None, t("sys/fs/cgroup/memory")),
            (None, t("sys/fs/cgroup/unified")),
            (None, t("sys/fs/cgroup/unified")),
            (None, t("sys/fs/cgroup")),
            (None, PathBuf::from(".")),
        ];
        assert_eq!(targets, expected);

        let calls = sys.calls();
        // "/" made rprivate first, the rootfs bind-mounted recursively onto itself.
        assert_eq!(
            calls[0],
            Call::Mount {
                source: None,
                target: "/".into(),
                fstype: None,
                flags: MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                data: None
            }
        );
        assert!(calls.contains(&Call::Mount {
            source: Some("tmpfs".into()),
            target: t("dev"),
            fstype: Some("tmpfs".into()),
            flags: MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
            data: Some("mode=755,size=65536k".into()),
        }));
        // Devices and links, then the pivot dance.
        assert!(calls.contains(&Call::Mknod {
            path: t("dev/null"),
            kind: SFlag::S_IFCHR,
            perm: Mode::from_bits_truncate(0o666),
            dev: libc::makedev(1, 3),
        }));
        assert!(calls.contains(&Call::Symlink { target: "pts/ptmx".into(), link: t("dev/ptmx") }));
        let tail = &calls[calls.len() - 5..];
        assert_eq!(
            tail,
            &[
                Call::Chdir(root.clone()),
                Call::PivotRoot { new_root: ".".into(), put_old: ".".into() },
                Call::Mount {
                    source: None,
                    target: ".".into(),
                    fstype: None,
                    flags: MsFlags::MS_SLAVE | MsFlags::MS_REC,
                    data: None
                },
                Call::Umount2 { target: ".".into(), flags: MntFlags::MNT_DETACH },
                Call::Chdir("/".into()),
            ]
        );
    }

    #[test]
    fn in_the_hosts_mount_namespace_only_the_roots_own_bind_changes_propagation() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("rootfs");
        std::fs::create_dir_all(&root).unwrap();
        let mut c = cfg(&root, &[]);
        c.host_mounts = true;
        let sys = RecordingSyscall::new();
        prepare(&sys, &c, no_cgroups).unwrap();
        let calls = sys.calls();
        let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
        assert_eq!(
            calls[..2],
            [
                Call::Mount { source: Some(root.clone()), target: root.clone(), fstype: None, flags: bind, data: None },
                Call::Mount {
                    source: None,
                    target: root.clone(),
                    fstype: None,
                    flags: MsFlags::MS_PRIVATE,
                    data: None
                },
            ],
            "the host's / is left as it is: {calls:?}"
        );
        assert!(!calls.iter().any(|c| matches!(c, Call::Mount { target, .. } if target == Path::new("/"))));
        let sys = RecordingSyscall::new();
        chroot_into(&sys, &root).unwrap();
        assert!(sys.calls().contains(&Call::Chroot(".".into())), "{:?}", sys.calls());
        assert!(!sys.calls().iter().any(|c| matches!(c, Call::PivotRoot { .. })), "{:?}", sys.calls());
    }

    #[test]
    fn a_shared_root_is_made_shared_only_after_pivot_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("rootfs");
        std::fs::create_dir_all(&root).unwrap();
        for p in ["shared", "rshared"] {
            let mut c = cfg(&root, &[]);
            c.propagation = Some(p);
            let sys = RecordingSyscall::new();
            prepare(&sys, &c, no_cgroups).unwrap();
            let first = Call::Mount {
                source: None,
                target: "/".into(),
                fstype: None,
                flags: MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                data: None,
            };
            assert_eq!(sys.calls()[0], first, "{p}: private until pivot_root");
            let sys = RecordingSyscall::new();
            root_propagation(&sys, c.propagation).unwrap();
            let shared = if p == "rshared" { MsFlags::MS_SHARED | MsFlags::MS_REC } else { MsFlags::MS_SHARED };
            let after = Call::Mount { source: None, target: "/".into(), fstype: None, flags: shared, data: None };
            assert_eq!(sys.calls(), vec![after], "{p}");
        }
        // Any other propagation was applied before, and nothing is done after.
        let sys = RecordingSyscall::new();
        root_propagation(&sys, Some("rslave")).unwrap();
        root_propagation(&sys, None).unwrap();
        assert!(sys.calls().is_empty());
    }

    #[test]
    fn overlay_and_bind_with_propagation() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("rootfs");
        std::fs::create_dir_all(&root).unwrap();
        let src_file = tmp.path().join("hosts");
        std::fs::write(&src_file, "x").unwrap();
        let mounts: Vec<Mount> = serde_json::from_str(&format!(
            r#"[{{"destination":"/etc/hosts","type":"bind","source":"{}","options":["rbind","ro","rslave"]}},
                {{"destination":"/data","source":"{}","options":["bind"]}}]"#,
            src_file.display(),
            tmp.path().display()
        ))
        .unwrap();
        let ov = Overlay::parse(r#"{"lower":["/l/top","/l/base"],"upper":"/u","work":"/w"}"#).unwrap();
        let mut c = cfg(&root, &mounts);
        c.overlay = Some(&ov);
        let sys = RecordingSyscall::new();
        prepare(&sys, &c, no_cgroups).unwrap();
        let calls = sys.calls();
        assert_eq!(
            calls[1],
            Call::Mount {
                source: Some("overlay".into()),
                target: root.clone(),
                fstype: Some("overlay".into()),
                flags: MsFlags::empty(),
                data: Some("lowerdir=/l/top:/l/base,upperdir=/u,workdir=/w".into()),
            }
        );
        // File source → file target created; parents as directories.
        assert!(calls.contains(&Call::Mkdir(root.join("etc"))));
        assert!(calls.contains(&Call::CreateFile(root.join("etc/hosts"))));
        let hosts: Vec<&Call> = calls
            .iter()
            .filter(|c| matches!(c, Call::Mount { target, .. } if *target == root.join("etc/hosts")))
            .collect();
        assert_eq!(hosts.len(), 3);
        assert!(matches!(hosts[0], Call::Mount { flags, .. } if *flags == MsFlags::MS_BIND | MsFlags::MS_REC));
        assert!(
            matches!(hosts[1], Call::Mount { flags, .. } if *flags == MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY)
        );
        assert!(matches!(hosts[2], Call::Mount { flags, .. } if *flags == MsFlags::MS_SLAVE | MsFlags::MS_REC));
        assert!(calls.contains(&Call::Mkdir(root.join("data"))));
    }

    #[test]
    fn escaping_destination_is_refused_before_any_mount_of_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("rootfs");
        std::fs::create_dir_all(&root).unwrap();
        let mounts: Vec<Mount> =
            serde_json::from_str(r#"[{"destination":"/../../etc/x","type":"tmpfs","source":"tmpfs"}]"#).unwrap();
        let sys = RecordingSyscall::new();
        let err = prepare(&sys, &cfg(&root, &mounts), no_cgroups).unwrap_err();
        assert!(matches!(err, RootfsError::Escape { .. }), "{err}");
        assert_eq!(sys.mounts().len(), 2); // only "/" propagation and the root bind
    }

    #[test]
    fn devices_fall_back_to_bind_in_user_ns() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("dev")).unwrap();
        let mut c = cfg(root, &[]);
        c.user_ns = true;
        let sys = RecordingSyscall::new();
        create_devices(&sys, &c).unwrap();
        let calls = sys.calls();
        assert!(!calls.iter().any(|c| matches!(c, Call::Mknod { .. })));
        assert!(calls.contains(&Call::Mount {
            source: Some("/dev/null".into()),
            target: root.join("dev/null"),
            fstype: None,
            flags: MsFlags::MS_BIND,
            data: None,
        }));
    }

    #[test]
    fn finalize_masks_and_remounts() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("proc/acpi")).unwrap();
        std::fs::create_dir_all(root.join("proc/sys")).unwrap();
        std::fs::write(root.join("proc/kcore"), "").unwrap();
        let masked = strs(&["/proc/kcore", "/proc/acpi", "/proc/missing"]);
        let ro = strs(&["/proc/sys", "/proc/nothere"]);
        let mut c = cfg(root, &[]);
        c.masked_paths = &masked;
        c.readonly_paths = &ro;
        c.readonly_root = true;
        let sys = RecordingSyscall::new();
        finalize(&sys, &c, root).unwrap();
        let m = sys.mounts();
        assert_eq!(m.len(), 5);
        assert_eq!(
            m[0],
            Call::Mount {
                source: Some(root.join("dev/null")),
                target: root.join("proc/kcore"),
                fstype: None,
                flags: MsFlags::MS_BIND,
                data: None
            }
        );
        assert!(
            matches!(&m[1], Call::Mount { fstype: Some(t), flags, .. } if t == "tmpfs" && *flags == MsFlags::MS_RDONLY)
        );
        assert!(matches!(&m[3], Call::Mount { flags, .. } if flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_REMOUNT)));
        assert!(
            matches!(&m[4], Call::Mount { target, flags, .. } if target == root && flags.contains(MsFlags::MS_RDONLY))
        );
    }

    #[test]
    fn cgroup_binds_from_hybrid_and_v2() {
        let mi = "\
35 27 0:30 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
36 35 0:31 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
37 35 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
38 35 0:33 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
39 35 0:34 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw";
        let cg = "4:memory:/twinbox/c1\n3:cpu,cpuacct:/twinbox/c1\n2:name=systemd:/\n0::/twinbox/c1\n";
        let b = cgroup_binds_from(mi, cg);
        assert_eq!(
            b,
            vec![
                CgroupBind { host: "/sys/fs/cgroup/memory/twinbox/c1".into(), name: "memory".into() },
                CgroupBind { host: "/sys/fs/cgroup/cpu,cpuacct/twinbox/c1".into(), name: "cpu,cpuacct".into() },
                CgroupBind { host: "/sys/fs/cgroup/systemd".into(), name: "systemd".into() },
                CgroupBind { host: "/sys/fs/cgroup/unified/twinbox/c1".into(), name: "unified".into() },
            ]
        );
        let v2 = cgroup_binds_from("30 27 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw", "0::/twinbox/c1\n");
        assert_eq!(v2, vec![CgroupBind { host: "/sys/fs/cgroup/twinbox/c1".into(), name: String::new() }]);
    }
}

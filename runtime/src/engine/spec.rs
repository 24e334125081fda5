//! From an image and `twinbox run` options to an OCI runtime spec, the way Docker does it:
//! the image config gives entrypoint, cmd, env, working dir and user; the run's flags override.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

use super::EngineError;

/// Annotation carrying the overlay layer stack (see runtime/DESIGN.md).
pub const OVERLAY_ANNOTATION: &str = "dev.twinbox.rootfs.overlay";

/// The PATH a container gets when its image sets none (Docker's default).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Docker's default capability set.
pub const DEFAULT_CAPS: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// What `twinbox run` lets the user override. Plain data.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RunOptions {
    /// Image reference.
    pub image: String,
    /// Command (replaces the image's CMD).
    pub cmd: Vec<String>,
    /// Replaces the image's ENTRYPOINT (and drops its CMD unless `cmd` is given).
    pub entrypoint: Option<String>,
    /// Extra environment, `K=V` (or `K`, taken from twinbox's environment).
    pub env: Vec<String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// `uid[:gid]` or `name[:group]`.
    pub user: Option<String>,
    /// Hostname (default: the first 12 characters of the id).
    pub hostname: Option<String>,
    /// Container name.
    pub name: Option<String>,
    /// Memory limit in bytes.
    pub memory: Option<i64>,
    /// CPU limit in CPUs (quota over a 100 ms period).
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    pub pids_limit: Option<i64>,
    /// Mount the root filesystem read-only.
    pub read_only: bool,
    /// Remove everything when the container exits.
    pub rm: bool,
    /// Run in the background.
    pub detach: bool,
    /// Seccomp: `None` for the default profile, `Some("unconfined")`, or a profile file (OCI
    /// `LinuxSeccomp` JSON, as Docker's `--security-opt seccomp=FILE`).
    pub seccomp: Option<PathBuf>,
}

/// The overlay stack for the annotation.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct OverlayStack {
    /// Lower dirs, top-most first.
    pub lower: Vec<PathBuf>,
    /// Upper (the container's copy-on-write layer).
    pub upper: PathBuf,
    /// overlayfs work dir (same filesystem as upper).
    pub work: PathBuf,
}

/// Build the spec for a container of `config` with `opts`, `layers` base first.
pub fn build_spec(
    id: &str,
    config: &ImageConfiguration,
    layers_base_first: &[PathBuf],
    overlay: &OverlayStack,
    opts: &RunOptions,
) -> Result<Spec, EngineError> {
    let image = config.config().clone().unwrap_or_default();
    let mut args: Vec<String> = match &opts.entrypoint {
        Some(e) if e.is_empty() => Vec::new(),
        Some(e) => vec![e.clone()],
        None => image.entrypoint().clone().unwrap_or_default(),
    };
    if !opts.cmd.is_empty() {
        args.extend(opts.cmd.iter().cloned());
    } else if opts.entrypoint.is_none() {
        args.extend(image.cmd().clone().unwrap_or_default());
    }
    if args.is_empty() {
        return Err(EngineError::NoCommand(opts.image.clone()));
    }

    let env = merge_env(image.env().as_deref().unwrap_or_default(), &opts.env, &hostname(id, opts));
    let cwd = opts
        .workdir
        .clone()
        .or_else(|| image.working_dir().clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(EngineError::RelativeWorkdir(cwd));
    }
    let user_spec = opts.user.clone().or_else(|| image.user().clone()).filter(|u| !u.is_empty());
    let (uid, gid, additional) = match &user_spec {
        Some(u) => resolve_user(u, layers_base_first)?,
        None => (0, 0, Vec::new()),
    };

    let caps: std::collections::HashSet<Capability> = DEFAULT_CAPS.into_iter().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(std::collections::HashSet::new())
        .ambient(std::collections::HashSet::new())
        .build()
        .expect("capability sets are complete");
    // Docker gives containers 1048576 open files; never more than twinbox itself may have.
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard.min(1_048_576))
        .unwrap_or(1024);
    let mut user = UserBuilder::default().uid(uid).gid(gid);
    if !additional.is_empty() {
        user = user.additional_gids(additional);
    }
    let process = ProcessBuilder::default()
        .terminal(false)
        .args(args)
        .env(env)
        .cwd(cwd)
        .user(user.build().expect("uid and gid set"))
        .capabilities(capabilities)
        .no_new_privileges(true)
        .rlimits(vec![oci_spec::runtime::PosixRlimitBuilder::default()
            .typ(oci_spec::runtime::PosixRlimitType::RlimitNofile)
            .hard(nofile)
            .soft(nofile)
            .build()
            .expect("rlimit fields set")])
        .build()
        .expect("process fields set");

    let mut resources = LinuxResourcesBuilder::default();
    if let Some(m) = opts.memory {
        // Like Docker: swap limit = memory limit, so the container cannot swap its way out.
        resources = resources.memory(LinuxMemoryBuilder::default().limit(m).swap(m).build().expect("memory set"));
    }
    if let Some(c) = opts.cpus {
        if !(c > 0.0 && c.is_finite()) {
            return Err(EngineError::BadCpus(c));
        }
        let period = 100_000u64;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .period(period)
                .quota((c * period as f64).round() as i64)
                .build()
                .expect("cpu set"),
        );
    }
    if let Some(p) = opts.pids_limit {
        resources = resources.pids(LinuxPidsBuilder::default().limit(p).build().expect("pids set"));
    }
    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Cgroup,
    ]
    .into_iter()
    .map(|t| LinuxNamespaceBuilder::default().typ(t).build().expect("namespace type set"))
    .collect::<Vec<_>>();
    let defaults = oci_spec::runtime::Linux::default();
    let mut linux = LinuxBuilder::default();
    match opts.seccomp.as_deref() {
        Some(p) if p == Path::new("unconfined") => {}
        Some(p) => {
            let text = std::fs::read(p).map_err(|source| EngineError::Io {
                op: "read seccomp profile",
                path: p.to_owned(),
                source,
            })?;
            let profile: oci_spec::runtime::LinuxSeccomp =
                serde_json::from_slice(&text).map_err(|e| EngineError::SeccompProfile(p.to_owned(), e))?;
            linux = linux.seccomp(profile);
        }
        None => linux = linux.seccomp(default_seccomp()),
    }
    let linux = linux
        .namespaces(namespaces)
        .resources(resources.build().expect("resources"))
        .cgroups_path(PathBuf::from(format!("/twinbox/{id}")))
        .masked_paths(defaults.masked_paths().clone().unwrap_or_default())
        .readonly_paths(defaults.readonly_paths().clone().unwrap_or_default())
        .build()
        .expect("linux fields set");

    let mut annotations = BTreeMap::new();
    annotations.insert(
        OVERLAY_ANNOTATION.to_owned(),
        serde_json::to_string(overlay).expect("an overlay stack always serializes"),
    );
    let mut spec = Spec::default();
    spec.set_version("1.2.0".into());
    spec.set_hostname(Some(hostname(id, opts)));
    spec.set_process(Some(process));
    spec.set_root(Some(RootBuilder::default().path("rootfs").readonly(opts.read_only).build().expect("root set")));
    spec.set_linux(Some(linux));
    spec.set_annotations(Some(annotations.into_iter().collect()));
    Ok(spec)
}

/// Syscalls Docker's default profile refuses to a container without extra capabilities:
/// kernel modules, kexec, reboot, clock setting, mounts and namespaces, tracing other
/// processes, keyrings, BPF, perf. Expressed as a deny list (EPERM) over an allow default.
pub const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "sysfs",
    "_sysctl",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

/// The default seccomp profile of `twinbox run`.
pub fn default_seccomp() -> oci_spec::runtime::LinuxSeccomp {
    let rule = oci_spec::runtime::LinuxSyscallBuilder::default()
        .names(DENIED_SYSCALLS.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .action(oci_spec::runtime::LinuxSeccompAction::ScmpActErrno)
        .errno_ret(libc::EPERM as u32)
        .build()
        .expect("rule fields set");
    oci_spec::runtime::LinuxSeccompBuilder::default()
        .default_action(oci_spec::runtime::LinuxSeccompAction::ScmpActAllow)
        .architectures(vec![oci_spec::runtime::Arch::ScmpArchX86_64, oci_spec::runtime::Arch::ScmpArchAarch64])
        .syscalls(vec![rule])
        .build()
        .expect("profile fields set")
}

fn hostname(id: &str, opts: &RunOptions) -> String {
    opts.hostname.clone().unwrap_or_else(|| id.chars().take(12).collect())
}

/// Image env, then `-e` overrides (a bare `K` takes twinbox's own `K`), a default PATH and
/// HOSTNAME when missing. Later values replace earlier ones with the same key.
fn merge_env(image: &[String], overrides: &[String], host: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut set = |kv: String| {
        let key = kv.split('=').next().unwrap_or_default().to_owned();
        out.retain(|e| e.split('=').next() != Some(key.as_str()));
        out.push(kv);
    };
    if !image.iter().any(|e| e.starts_with("PATH=")) {
        set(DEFAULT_PATH.to_owned());
    }
    set(format!("HOSTNAME={host}"));
    for e in image {
        set(e.clone());
    }
    for e in overrides {
        if e.contains('=') {
            set(e.clone());
        } else if let Ok(v) = std::env::var(e) {
            set(format!("{e}={v}"));
        }
    }
    out
}

/// Resolve `uid[:gid]` / `name[:group]` against the image's /etc/passwd and /etc/group (the
/// top-most layer that has them). Returns uid, gid and supplementary groups.
pub fn resolve_user(spec: &str, layers_base_first: &[PathBuf]) -> Result<(u32, u32, Vec<u32>), EngineError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = find_in_layers(layers_base_first, "etc/passwd");
    let groups = find_in_layers(layers_base_first, "etc/group");
    let (uid, mut gid, name) = match user.parse::<u32>() {
        Ok(uid) => {
            let entry = passwd.as_deref().and_then(|p| passwd_lookup(p, |f| f[2].parse() == Ok(uid)));
            (uid, entry.as_ref().map(|e| e.1).unwrap_or(0), entry.map(|e| e.2))
        }
        Err(_) => {
            let Some((uid, gid, name)) = passwd.as_deref().and_then(|p| passwd_lookup(p, |f| f[0] == user)) else {
                return Err(EngineError::UnknownUser(user.to_owned()));
            };
            (uid, gid, Some(name))
        }
    };
    if let Some(g) = group {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups
                .as_deref()
                .and_then(|t| group_entries(t).find(|(n, _, _)| n == g).map(|(_, id, _)| id))
                .ok_or_else(|| EngineError::UnknownGroup(g.to_owned()))?,
        };
    }
    let mut additional: Vec<u32> = match (&name, groups.as_deref()) {
        (Some(n), Some(t)) => {
            group_entries(t).filter(|(_, _, members)| members.iter().any(|m| m == n)).map(|(_, id, _)| id).collect()
        }
        _ => Vec::new(),
    };
    additional.retain(|g| *g != gid);
    Ok((uid, gid, additional))
}

fn passwd_lookup(text: &str, pred: impl Fn(&[&str]) -> bool) -> Option<(u32, u32, String)> {
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .find(|f| pred(f))
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?, f[0].to_owned())))
}

fn group_entries(text: &str) -> impl Iterator<Item = (String, u32, Vec<String>)> + '_ {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 3 {
            return None;
        }
        let members =
            f.get(3).map(|m| m.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect()).unwrap_or_default();
        Some((f[0].to_owned(), f[2].parse().ok()?, members))
    })
}

/// The content of `rel` in the top-most layer that has it as a regular file (a whiteout or any
/// other kind of entry above hides it).
fn find_in_layers(layers_base_first: &[PathBuf], rel: &str) -> Option<String> {
    for layer in layers_base_first.iter().rev() {
        let p: &Path = &layer.join(rel);
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_file() => return std::fs::read_to_string(p).ok(),
            Ok(_) => return None,
            Err(_) => continue,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::{ConfigBuilder, ImageConfigurationBuilder};

    fn image(entry: Option<&[&str]>, cmd: Option<&[&str]>, env: &[&str], user: Option<&str>) -> ImageConfiguration {
        let mut c = ConfigBuilder::default().env(env.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        if let Some(e) = entry {
            c = c.entrypoint(e.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        }
        if let Some(e) = cmd {
            c = c.cmd(e.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        }
        if let Some(u) = user {
            c = c.user(u.to_string());
        }
        ImageConfigurationBuilder::default().config(c.build().unwrap()).build().unwrap()
    }

    fn ov() -> OverlayStack {
        OverlayStack { lower: vec!["/l".into()], upper: "/u".into(), work: "/w".into() }
    }

    fn args(spec: &Spec) -> Vec<String> {
        spec.process().as_ref().unwrap().args().clone().unwrap()
    }

    #[test]
    fn entrypoint_and_cmd_like_docker() {
        let img = image(Some(&["/hello"]), Some(&["greet"]), &[], None);
        let o = |cmd: &[&str], ep: Option<&str>| RunOptions {
            image: "x".into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            entrypoint: ep.map(str::to_owned),
            ..Default::default()
        };
        assert_eq!(args(&build_spec("id", &img, &[], &ov(), &o(&[], None)).unwrap()), ["/hello", "greet"]);
        assert_eq!(args(&build_spec("id", &img, &[], &ov(), &o(&["true"], None)).unwrap()), ["/hello", "true"]);
        assert_eq!(args(&build_spec("id", &img, &[], &ov(), &o(&[], Some("/bin/sh"))).unwrap()), ["/bin/sh"]);
        assert_eq!(
            args(&build_spec("id", &img, &[], &ov(), &o(&["-c", "x"], Some("/bin/sh"))).unwrap()),
            ["/bin/sh", "-c", "x"]
        );
        let none = image(None, None, &[], None);
        assert!(matches!(build_spec("id", &none, &[], &ov(), &o(&[], None)), Err(EngineError::NoCommand(_))));
    }

    #[test]
    fn env_merging_and_limits() {
        let img = image(None, Some(&["sh"]), &["A=1", "PATH=/bin"], None);
        let opts = RunOptions {
            image: "x".into(),
            env: vec!["A=2".into(), "B=3".into()],
            memory: Some(32 << 20),
            cpus: Some(1.5),
            pids_limit: Some(20),
            read_only: true,
            ..Default::default()
        };
        let s = build_spec("0123456789abcdef", &img, &[], &ov(), &opts).unwrap();
        let env = s.process().as_ref().unwrap().env().clone().unwrap();
        assert_eq!(env, ["HOSTNAME=0123456789ab", "PATH=/bin", "A=2", "B=3"]);
        let r = s.linux().as_ref().unwrap().resources().clone().unwrap();
        assert_eq!(r.memory().unwrap().limit(), Some(32 << 20));
        assert_eq!(r.cpu().as_ref().unwrap().quota(), Some(150_000));
        assert_eq!(r.pids().unwrap().limit(), 20);
        assert_eq!(s.root().as_ref().unwrap().readonly(), Some(true));
        let ann = s.annotations().as_ref().unwrap();
        let stack: OverlayStack = serde_json::from_str(&ann[OVERLAY_ANNOTATION]).unwrap();
        assert_eq!(stack, ov());
    }

    #[test]
    fn users_resolved_from_the_top_layer() {
        let d = tempfile::tempdir().unwrap();
        let (base, top) = (d.path().join("base"), d.path().join("top"));
        std::fs::create_dir_all(base.join("etc")).unwrap();
        std::fs::create_dir_all(top.join("etc")).unwrap();
        std::fs::write(base.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::write(top.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
            .unwrap();
        std::fs::write(top.join("etc/group"), "root:x:0:\napp:x:1000:\nwheel:x:10:app\n").unwrap();
        let layers = vec![base, top];
        assert_eq!(resolve_user("app", &layers).unwrap(), (1000, 1000, vec![10]));
        assert_eq!(resolve_user("1000:10", &layers).unwrap(), (1000, 10, vec![]));
        assert_eq!(resolve_user("4242", &layers).unwrap(), (4242, 0, vec![]));
        assert_eq!(resolve_user("app:wheel", &layers).unwrap().1, 10);
        assert!(matches!(resolve_user("nobody", &layers), Err(EngineError::UnknownUser(_))));
        assert!(matches!(resolve_user("app:nogroup", &layers), Err(EngineError::UnknownGroup(_))));
    }
}

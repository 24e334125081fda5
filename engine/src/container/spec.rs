//! From an image and `twinbox run` options to an OCI runtime spec, the way Docker does it:
//! the image config gives entrypoint, cmd, env, working dir and user; the run's flags override.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder,
    ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

use twinbox_image::launch::{self, Launch, Overrides};

use super::EngineError;

/// Annotation carrying the overlay layer stack (see runtime/DESIGN.md).
pub const OVERLAY_ANNOTATION: &str = "dev.twinbox.rootfs.overlay";

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
    /// Command, entrypoint, env, workdir and user over the image's (flattened: a stored
    /// record's JSON has them as top-level fields).
    #[serde(flatten)]
    pub overrides: Overrides,
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
    /// `--network`: none (loopback only), host, container:NAME, or a bridge network.
    #[serde(default)]
    pub network: crate::network::attach::NetworkMode,
    /// `-p`: host ports forwarded to the container's (bridge networks only).
    #[serde(default)]
    pub publish: Vec<crate::network::publish::PortMapping>,
    /// `-P`: also publish every TCP port the image EXPOSEs, each on a free host port.
    #[serde(default)]
    pub publish_all: bool,
    /// `-t`: the workload's stdio is a terminal (a pty of the container's, proxied to ours).
    #[serde(default)]
    pub tty: bool,
    /// `-v`: host paths and named volumes mounted into the instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::volume::VolumeMount>,
}

/// The network namespace a container gets, and the files bound over its `/etc` (hosts,
/// resolv.conf, hostname: `(host file, container path)`), as the engine resolved them.
#[derive(Debug, Clone, Default)]
pub struct NetSetup {
    pub namespace: NetNamespace,
    pub files: Vec<(PathBuf, &'static str)>,
}

/// See [`NetSetup`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NetNamespace {
    /// A new one (loopback only until the engine joins it to a network).
    #[default]
    New,
    /// The host's.
    Host,
    /// Another process's (`/proc/PID/ns/net`).
    Path(PathBuf),
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
    net: &NetSetup,
) -> Result<Spec, EngineError> {
    let Launch { args, env, cwd, uid, gid, additional_gids: additional } =
        launch::resolve(&opts.image, config, layers_base_first, &opts.overrides, &hostname(id, opts))?;

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
        .terminal(opts.tty)
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

    // Docker's and runc's default: no device may be used but the standard ones, which the
    // runtime allows after this rule (with mknod of any device, whose opening this still stops).
    let deny_all_devices = LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .typ(LinuxDeviceType::A)
        .access("rwm")
        .build()
        .expect("rule set");
    let mut resources = LinuxResourcesBuilder::default().devices(vec![deny_all_devices]);
    if let Some(m) = opts.memory {
        // Like Docker: swap limit = memory limit, so the container cannot swap its way out.
        resources = resources.memory(LinuxMemoryBuilder::default().limit(m).swap(m).build().expect("memory set"));
    }
    if let Some(c) = opts.cpus {
        // A quota of at least 1 ms per 100 ms period (the kernel's smallest), and no more
        // CPUs than the host has: anything else used to run unlimited or fail with EINVAL.
        let max = std::thread::available_parallelism().map_or(1, |n| n.get());
        let period = 100_000u64;
        let quota = (c * period as f64).round();
        if !(c.is_finite() && quota >= 1000.0 && c <= max as f64) {
            return Err(EngineError::BadCpus { value: c, max });
        }
        resources =
            resources.cpu(LinuxCpuBuilder::default().period(period).quota(quota as i64).build().expect("cpu set"));
    }
    if let Some(p) = opts.pids_limit {
        resources = resources.pids(LinuxPidsBuilder::default().limit(p).build().expect("pids set"));
    }
    let mut namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Cgroup,
    ]
    .into_iter()
    .map(|t| LinuxNamespaceBuilder::default().typ(t).build().expect("namespace type set"))
    .collect::<Vec<_>>();
    match &net.namespace {
        NetNamespace::New => namespaces
            .push(LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network).build().expect("type set")),
        NetNamespace::Host => {}
        NetNamespace::Path(p) => namespaces.push(
            LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network).path(p.clone()).build().expect("set"),
        ),
    }
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
    if !net.files.is_empty() {
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        for (source, dest) in &net.files {
            mounts.push(
                oci_spec::runtime::MountBuilder::default()
                    .destination(PathBuf::from(dest))
                    .typ("bind")
                    .source(source.clone())
                    .options(vec!["rbind".to_string(), "rprivate".to_string()])
                    .build()
                    .expect("mount fields set"),
            );
        }
        spec.set_mounts(Some(mounts));
    }
    spec.set_annotations(Some(annotations.into_iter().collect()));
    Ok(spec)
}

/// The mount points of `spec`, and its working directory, that lie in the root filesystem
/// itself (not under one of its mounts, as /dev/pts lies under /dev) and that none of `layers`
/// has (the runtime would make them), relative to the
/// root, each with whether it is a directory (a file for a bind mount of a file), parents
/// first. A target whose parent any layer has as something else than a directory (a symlink)
/// is left out, for the runtime to resolve. These go into a small shared lower layer (see
/// `Engine::prepare`), so a container's upper layer stays empty until its workload writes.
pub fn missing_mount_points(spec: &Spec, layers: &[PathBuf]) -> Vec<(PathBuf, bool)> {
    let mounts = spec.mounts().clone().unwrap_or_default();
    let dests: Vec<PathBuf> = mounts.iter().map(|m| m.destination().clone()).collect();
    let mut out: Vec<(PathBuf, bool)> = Vec::new();
    let cwd = spec.process().as_ref().map(|p| (p.cwd().clone(), false));
    let targets = mounts
        .iter()
        .map(|m| {
            let file = m.typ().as_deref() == Some("bind") && m.source().as_ref().is_some_and(|s| s.is_file());
            (m.destination().clone(), file)
        })
        .chain(cwd);
    for (dest, file) in targets {
        let dest = &dest;
        let Ok(rel) = dest.strip_prefix("/") else { continue };
        if rel.as_os_str().is_empty() || dests.iter().any(|d| d != dest && dest.starts_with(d)) {
            continue;
        }
        let mut wanted = Vec::new();
        let mut ok = true;
        let mut at = PathBuf::new();
        let parts: Vec<_> = rel.components().collect();
        for (i, c) in parts.iter().enumerate() {
            let std::path::Component::Normal(c) = c else {
                ok = false;
                break;
            };
            at.push(c);
            let last = i + 1 == parts.len();
            let found: Vec<std::fs::Metadata> =
                layers.iter().filter_map(|l| std::fs::symlink_metadata(l.join(&at)).ok()).collect();
            if found.is_empty() {
                wanted.push((at.clone(), !(last && file)));
            } else if !last && !found.iter().all(|md| md.is_dir()) {
                ok = false;
                break;
            }
        }
        if ok {
            for w in wanted {
                if !out.contains(&w) {
                    out.push(w);
                }
            }
        }
    }
    out
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

pub(crate) fn hostname(id: &str, opts: &RunOptions) -> String {
    opts.hostname.clone().unwrap_or_else(|| id.chars().take(12).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::{ConfigBuilder, ImageConfigurationBuilder};

    #[test]
    fn mount_points_missing_from_the_image_parents_first_never_shadowing_it() {
        let d = tempfile::tempdir().unwrap();
        let (base, top) = (d.path().join("base"), d.path().join("top"));
        std::fs::create_dir_all(base.join("etc")).unwrap();
        std::fs::create_dir_all(top.join("proc")).unwrap();
        std::os::unix::fs::symlink("../run/resolv.conf", base.join("etc/resolv.conf")).unwrap();
        std::os::unix::fs::symlink("usr/lib", top.join("lib")).unwrap();
        let file = d.path().join("hosts");
        std::fs::write(&file, "").unwrap();
        let mount = |dest: &str, typ: &str, source: &Path| {
            oci_spec::runtime::MountBuilder::default()
                .destination(PathBuf::from(dest))
                .typ(typ)
                .source(source.to_owned())
                .build()
                .unwrap()
        };
        let mut spec = Spec::default();
        spec.set_mounts(Some(vec![
            mount("/proc", "proc", Path::new("proc")),
            mount("/dev", "tmpfs", Path::new("tmpfs")),
            mount("/dev/pts", "devpts", Path::new("devpts")),
            mount("/etc/hosts", "bind", &file),
            mount("/etc/resolv.conf", "bind", &file),
            mount("/lib/x", "bind", &file),
            mount("/var/run/x", "bind", &file),
        ]));
        let mut process = spec.process().clone().unwrap();
        process.set_cwd("/srv/app".into());
        spec.set_process(Some(process));
        let want: Vec<(PathBuf, bool)> = [
            ("dev", true),
            ("etc/hosts", false),
            ("var", true),
            ("var/run", true),
            ("var/run/x", false),
            ("srv", true),
            ("srv/app", true),
        ]
        .iter()
        .map(|(p, dir)| (PathBuf::from(p), *dir))
        .collect();
        assert_eq!(missing_mount_points(&spec, &[base, top]), want);
    }

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
            overrides: Overrides {
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                entrypoint: ep.map(str::to_owned),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            args(&build_spec("id", &img, &[], &ov(), &o(&[], None), &NetSetup::default()).unwrap()),
            ["/hello", "greet"]
        );
        assert_eq!(
            args(&build_spec("id", &img, &[], &ov(), &o(&["true"], None), &NetSetup::default()).unwrap()),
            ["/hello", "true"]
        );
        assert_eq!(
            args(&build_spec("id", &img, &[], &ov(), &o(&[], Some("/bin/sh")), &NetSetup::default()).unwrap()),
            ["/bin/sh"]
        );
        assert_eq!(
            args(&build_spec("id", &img, &[], &ov(), &o(&["-c", "x"], Some("/bin/sh")), &NetSetup::default()).unwrap()),
            ["/bin/sh", "-c", "x"]
        );
        let none = image(None, None, &[], None);
        assert!(matches!(
            build_spec("id", &none, &[], &ov(), &o(&[], None), &NetSetup::default()),
            Err(EngineError::Launch(launch::LaunchError::NoCommand(_)))
        ));
    }

    #[test]
    fn env_merging_and_limits() {
        let img = image(None, Some(&["sh"]), &["A=1", "PATH=/bin"], None);
        let opts = RunOptions {
            image: "x".into(),
            overrides: Overrides { env: vec!["A=2".into(), "B=3".into()], ..Default::default() },
            memory: Some(32 << 20),
            cpus: Some(0.5),
            pids_limit: Some(20),
            read_only: true,
            ..Default::default()
        };
        let s = build_spec("0123456789abcdef", &img, &[], &ov(), &opts, &NetSetup::default()).unwrap();
        let env = s.process().as_ref().unwrap().env().clone().unwrap();
        assert_eq!(env, ["HOSTNAME=0123456789ab", "PATH=/bin", "A=2", "B=3"]);
        let r = s.linux().as_ref().unwrap().resources().clone().unwrap();
        assert_eq!(r.memory().unwrap().limit(), Some(32 << 20));
        assert_eq!(r.cpu().as_ref().unwrap().quota(), Some(50_000));
        assert_eq!(r.pids().unwrap().limit(), 20);
        // Every device denied first; the runtime appends the standard ones.
        let rules = r.devices().clone().unwrap();
        assert_eq!(rules.len(), 1);
        assert!(!rules[0].allow() && rules[0].typ() == Some(LinuxDeviceType::A), "{rules:?}");
        assert_eq!(rules[0].access().as_deref(), Some("rwm"));
        assert_eq!(s.root().as_ref().unwrap().readonly(), Some(true));
        let ann = s.annotations().as_ref().unwrap();
        let stack: OverlayStack = serde_json::from_str(&ann[OVERLAY_ANNOTATION]).unwrap();
        assert_eq!(stack, ov());
    }

    #[test]
    fn cpu_limits_the_kernel_cannot_apply_are_refused() {
        let img = image(None, Some(&["sh"]), &[], None);
        let max = std::thread::available_parallelism().map_or(1, |n| n.get());
        let with = |c: f64| {
            let opts = RunOptions { image: "x".into(), cpus: Some(c), ..Default::default() };
            build_spec("id", &img, &[], &ov(), &opts, &NetSetup::default())
        };
        for bad in [0.0, -1.0, 1e-9, 0.0049, f64::NAN, f64::INFINITY, max as f64 + 0.5, 1000.0] {
            let err = with(bad).unwrap_err();
            assert!(matches!(err, EngineError::BadCpus { .. }), "{bad}: {err}");
            assert!(err.to_string().contains(&format!("from 0.01 to {max}")), "{err}");
        }
        let quota = |c| {
            with(c).unwrap().linux().as_ref().unwrap().resources().as_ref().unwrap().cpu().as_ref().unwrap().quota()
        };
        assert_eq!(quota(0.01), Some(1000));
        assert_eq!(quota(max as f64), Some(max as i64 * 100_000));
    }
}

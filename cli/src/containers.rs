//! Container commands: run, ps, logs, stop, kill, rm, start, and the runc-compatible `runtime`.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use twinbox_engine::{Engine, ExecOptions, Phase, RunOptions};

use crate::UserError;

/// Where the OCI runtime keeps container state for containers made by `twinbox run`.
pub const RUNTIME_ROOT: &str = "/run/twinbox/runtime";

pub(crate) fn engine(root: &Path) -> Result<Engine> {
    let store = twinbox_image::Store::open(root).with_context(|| {
        format!("opening the image store at {} (set --root or TWINBOX_ROOT to use another)", root.display())
    })?;
    let runtime_root =
        std::env::var_os("TWINBOX_RUNTIME_ROOT").map(std::path::PathBuf::from).unwrap_or_else(|| RUNTIME_ROOT.into());
    let mut engine = Engine::new(store, runtime_root)?;
    // The store's container monitor runs `twinbox --root ROOT container-launch ID` to start a
    // detached container and `twinbox --root ROOT container-exited ID PID CODE` when it ends,
    // in its own working directory: the root as an absolute path.
    let exe = std::env::current_exe().context("finding the twinbox binary")?;
    let root = std::path::absolute(root).with_context(|| format!("finding the absolute path of {}", root.display()))?;
    engine.set_launcher(vec![exe.clone().into(), "--root".into(), root.clone().into(), "container-launch".into()]);
    engine.set_vm_launcher(vec![exe.clone().into(), "--root".into(), root.clone().into(), "microvm-launch".into()]);
    let mut vmm: Vec<std::ffi::OsString> = vec![exe.clone().into()];
    vmm.extend((0..*crate::VERBOSE.get().unwrap_or(&0)).map(|_| "-v".into()));
    vmm.push("microvm-vmm".into());
    engine.set_vmm_command(vmm);
    engine.set_on_exit(vec![exe.into(), "--root".into(), root.into(), "container-exited".into()]);
    Ok(engine)
}

#[derive(Args, Debug)]
pub struct ExitedArgs {
    /// Container id.
    id: String,
    /// The init the monitor watched.
    pid: i32,
    /// Its exit code (128+N when killed by signal N; -1 when it could not be known).
    #[arg(allow_negative_numbers = true)]
    code: i32,
}

#[derive(Args, Debug)]
pub struct SystemArgs {
    #[command(subcommand)]
    command: SystemCommand,
}

#[derive(clap::Subcommand, Debug)]
enum SystemCommand {
    /// Remove what killed twinbox commands left: containers whose create was cut short (their
    /// init, cgroup, runtime state, name and hold), containers that ended with nobody left to
    /// record it (marked exited with an unknown code; removed when run with --rm), and the RUN
    /// step containers of killed builds; unpins the network namespace jailed VMMs share (the
    /// next VMM makes it again). Says what it did.
    Prune,
}

pub fn system(root: &Path, a: SystemArgs) -> Result<i32> {
    match a.command {
        SystemCommand::Prune => {
            let engine = engine(root)?;
            let mut done = twinbox_engine::build_run::stop_orphan_steps(&engine)?;
            done.extend(engine.reconcile()?);
            // Running VMMs keep it; the next one pins a new one.
            let netns = Path::new(twinbox_microvm::jail::SHARED_NETNS);
            if twinbox_microvm::jail::remove_shared_netns(netns)
                .with_context(|| format!("unpinning the network namespace at {}", netns.display()))?
            {
                done.push(format!("unpinned the network namespace of jailed VMMs ({})", netns.display()));
            }
            let mut out = std::io::stdout().lock();
            for line in &done {
                writeln!(out, "{line}")?;
            }
            if done.is_empty() {
                writeln!(out, "nothing to put right")?;
            }
        }
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Container id.
    id: String,
}

pub fn launch(root: &Path, a: LaunchArgs) -> Result<i32> {
    Ok(engine(root)?.launch(&a.id))
}

/// `microvm-launch ID`: the VMM of a detached microVM, started by `run -d` or `start` with a
/// pipe for its word as descriptor 3.
pub fn launch_microvm(root: &Path, a: LaunchArgs) -> Result<i32> {
    use std::os::fd::FromRawFd;
    // SAFETY: descriptor 3 is the pipe the engine hands the launcher (spawn_orphan puts it
    // there); nothing else in this process owns it.
    let report = unsafe { std::fs::File::from_raw_fd(3) };
    twinbox_microvm::vstate::watchdog::stop_on_signals()?;
    let started = *crate::STARTED.get_or_init(std::time::Instant::now);
    Ok(engine(root)?.launch_microvm(&a.id, started, report))
}

#[derive(Args, Debug)]
pub struct PortArgs {
    /// Container (id, id prefix or name).
    container: String,
}

/// `twinbox port NAME`: its published ports, `80/tcp -> 0.0.0.0:8080`, as Docker prints them.
pub fn port(root: &Path, a: PortArgs) -> Result<i32> {
    let r = engine(root)?.find(&a.container)?;
    for m in &r.ports {
        let ip = m.host_ip.map(|i| i.to_string()).unwrap_or_else(|| "0.0.0.0".into());
        println!("{}/{} -> {ip}:{}", m.container_port, m.protocol(), m.host_port);
    }
    Ok(0)
}

pub fn exited(root: &Path, a: ExitedArgs) -> Result<i32> {
    engine(root)?.exited(&a.id, a.pid, a.code)?;
    Ok(0)
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Remove the container when it exits.
    #[arg(long)]
    rm: bool,
    /// Run in the background and print the container id.
    #[arg(short, long)]
    detach: bool,
    /// Give the workload a terminal (a pty in the container, its size following ours).
    #[arg(short = 't', long)]
    tty: bool,
    /// Keep stdin attached (a foreground run's stdin always is; accepted for `-it`).
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Mount a host path or a named volume: SOURCE:TARGET[:ro|rw] (a microVM takes named
    /// volumes only, each as a disk).
    #[arg(short = 'v', long = "volume")]
    volumes: Vec<String>,
    /// Container name.
    #[arg(long)]
    name: Option<String>,
    /// Set an environment variable (K=V, or K to pass ours).
    #[arg(short, long = "env")]
    env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short, long)]
    workdir: Option<String>,
    /// User (name or uid, optionally :group or :gid).
    #[arg(short, long)]
    user: Option<String>,
    /// Hostname.
    #[arg(long)]
    hostname: Option<String>,
    /// Memory limit (bytes, or with b, k, m, g).
    #[arg(short, long, value_parser = parse_memory)]
    memory: Option<i64>,
    /// CPU limit, in CPUs.
    #[arg(long)]
    cpus: Option<f64>,
    /// Maximum number of processes.
    #[arg(long)]
    pids_limit: Option<i64>,
    /// Mount the root filesystem read-only.
    #[arg(long)]
    read_only: bool,
    /// Override the image's ENTRYPOINT.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Security options: `seccomp=unconfined` or `seccomp=PROFILE.json`.
    #[arg(long = "security-opt")]
    security_opt: Vec<String>,
    /// Publish a container port on the host: `[IP:][HOST_PORT:]CONTAINER_PORT[/tcp|/udp]` (a
    /// free host port when none is given); needs a bridge or CNI network.
    #[arg(short = 'p', long = "publish")]
    publish: Vec<String>,
    /// Publish every port the image EXPOSEs, each on a free host port.
    #[arg(short = 'P', long = "publish-all")]
    publish_all: bool,
    /// Network: a network's name (default `twinbox0`, the default bridge network, made when
    /// first used), `none` (loopback only), `host`, `container:NAME` (another container's), or
    /// `cni:NAME` (a CNI network configuration in /etc/cni/net.d, or TWINBOX_CNI_CONF_DIR).
    /// MicroVMs: a bridge network (their tap on its bridge) or `none`.
    #[arg(long)]
    network: Option<String>,
    /// Isolation model: a container on the host kernel, or a KVM microVM with its own kernel.
    #[arg(long, default_value = "container", value_parser = ["container", "microvm"])]
    isolation: String,
    /// MicroVM only: the guest kernel (default: $TWINBOX_KERNEL, else the one
    /// scripts/build-guest-kernel.sh built).
    #[arg(long)]
    kernel: Option<std::path::PathBuf>,
    /// MicroVM only: stop the VM after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// MicroVM only: `split` (the IOAPIC in twinbox, LAPICs in KVM, no PIT: the default) or
    /// `kernel` (PIC, IOAPIC and PIT in KVM, as Firecracker).
    #[arg(long, value_name = "split|kernel")]
    irqchip: Option<twinbox_microvm::IrqChip>,
    /// MicroVM only: restore the image's warm template (a snapshot of its VM booted to where
    /// the guest agent waits for a workload; made at the first such run, kept in the store)
    /// instead of booting the kernel. `twinbox snapshot ls` lists the templates.
    #[arg(long)]
    snapshot: bool,
    /// MicroVM only, for debugging: run the VMM unconfined. By default, once its VM is built,
    /// the VMM moves into a mount namespace with an empty read-only root, the empty network
    /// namespace jailed VMMs share, a cgroup of its own, an unprivileged uid without
    /// capabilities, and a seccomp allowlist per thread.
    #[arg(long)]
    no_jail: bool,
    /// The image.
    image: String,
    /// Command and arguments (replace the image's CMD).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    cmd: Vec<String>,
}

impl RunArgs {
    /// `--network` (default: the default bridge network) and `-p`, parsed.
    fn network_and_ports(
        &self,
    ) -> Result<(twinbox_engine::network::attach::NetworkMode, Vec<twinbox_engine::network::publish::PortMapping>)>
    {
        let network = self.network.as_deref().unwrap_or(twinbox_engine::network::DEFAULT_NETWORK).parse()?;
        let publish = self.publish.iter().map(|p| p.parse()).collect::<Result<Vec<_>, _>>()?;
        Ok((network, publish))
    }

    /// The command, entrypoint, env, workdir and user flags, moved out (both isolation models
    /// hand them to `twinbox_image::launch` as they are).
    fn take_overrides(&mut self) -> twinbox_image::launch::Overrides {
        twinbox_image::launch::Overrides {
            cmd: std::mem::take(&mut self.cmd),
            entrypoint: self.entrypoint.take(),
            env: std::mem::take(&mut self.env),
            workdir: self.workdir.take(),
            user: self.user.take(),
        }
    }
}

/// Docker's memory sizes: a number with an optional b/k/m/g suffix (binary units).
pub fn parse_memory(s: &str) -> Result<i64, String> {
    parse_bytes(s, "memory limit", 6 << 20)
}

/// A size like `--memory`'s (b/k/m/g, binary units), of at least `min` bytes; `what` names it
/// in errors.
pub fn parse_bytes(s: &str, what: &str, min: i64) -> Result<i64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').filter(|x| x.ends_with(['k', 'm', 'g'])).unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1i64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('b') => (&t[..t.len() - 1], 1),
        _ => (t, 1),
    };
    let n: f64 = num.parse().map_err(|_| format!("invalid {what} {s:?}: use e.g. 512m or 1g"))?;
    let bytes = n * mult as f64;
    // Beyond i64 the limit would silently become "unlimited".
    if !(bytes.is_finite() && bytes < i64::MAX as f64) {
        return Err(format!("{what} {s:?} is too large: give at most 8589934591g (2^63 - 1 bytes)"));
    }
    let bytes = bytes as i64;
    if bytes < min {
        return Err(format!("{what} {s:?} is below the minimum of {}m", min >> 20));
    }
    Ok(bytes)
}

pub fn run(root: &Path, mut a: RunArgs, verbose: bool) -> Result<i32> {
    if a.isolation == "microvm" {
        return run_microvm(root, a, verbose);
    }
    if a.kernel.is_some() || a.timeout.is_some() || a.irqchip.is_some() || a.snapshot || a.no_jail {
        return Err(UserError(
            "--kernel, --timeout, --irqchip, --snapshot and --no-jail are for --isolation microvm".into(),
        )
        .into());
    }
    let (network, publish) = a.network_and_ports()?;
    let volumes = a.volumes.iter().map(|v| v.parse()).collect::<Result<Vec<_>, _>>()?;
    if a.detach && a.rm {
        // Allowed, as in Docker: the monitor removes it on exit.
    }
    if a.tty && a.detach {
        return Err(UserError(
            "-t with -d: a detached container's terminal needs `attach`, which twinbox has not; drop -t, or -d".into(),
        )
        .into());
    }
    let _ = a.interactive;
    let mut seccomp = None;
    for o in &a.security_opt {
        match o.split_once(['=', ':']) {
            Some(("seccomp", v)) => seccomp = Some(std::path::PathBuf::from(v)),
            _ => {
                return Err(UserError(format!(
                    "unsupported --security-opt {o:?}: only seccomp=unconfined or seccomp=FILE"
                ))
                .into())
            }
        }
    }
    let eng = engine(root)?;
    let opts = RunOptions {
        seccomp,
        overrides: a.take_overrides(),
        image: a.image,
        hostname: a.hostname,
        name: a.name,
        memory: a.memory,
        cpus: a.cpus,
        pids_limit: a.pids_limit,
        read_only: a.read_only,
        rm: a.rm,
        detach: a.detach,
        network,
        publish,
        publish_all: a.publish_all,
        tty: a.tty,
        volumes,
    };
    let record = eng.prepare(&opts)?;
    if a.detach {
        let r = eng.run_detached(record)?;
        println!("{}", r.id);
        return Ok(0);
    }
    // A command that is missing (127) or not executable (126) is an error whose code main
    // reports as the workload's, as Docker does.
    let exit = eng.run_foreground(record)?;
    if exit.oom_killed {
        eprintln!("twinbox: the container was killed by the OOM killer (memory limit reached)");
    }
    Ok(exit.code)
}

/// `run --isolation microvm`: the same image and flags, in a VM. `--memory` is the guest's RAM
/// and `--cpus` its vCPU count; what only a container has is refused by name.
fn run_microvm(root: &Path, mut a: RunArgs, verbose: bool) -> Result<i32> {
    let refuse = |flag: &str| -> Result<i32> {
        Err(UserError(format!("{flag} is not supported with --isolation microvm")).into())
    };
    if a.tty {
        return refuse("-t/--tty");
    }
    if a.pids_limit.is_some() {
        return refuse("--pids-limit");
    }
    if !a.security_opt.is_empty() {
        return refuse("--security-opt");
    }
    let (network, publish) = a.network_and_ports()?;
    let volumes = a.volumes.iter().map(|v| v.parse()).collect::<Result<Vec<_>, _>>()?;
    if a.snapshot && !volumes.is_empty() {
        return Err(UserError(
            "--snapshot with -v: a template VM has no volume disks, so it cannot take them; run without --snapshot"
                .into(),
        )
        .into());
    }
    if a.snapshot && a.irqchip == Some(twinbox_microvm::IrqChip::Kernel) {
        return Err(UserError("--snapshot needs the split irqchip (the default): drop --irqchip kernel".into()).into());
    }
    let vcpus = match a.cpus {
        None => None,
        Some(c) if c >= 1.0 && c.fract() == 0.0 && c <= f64::from(u8::MAX) => Some(c as u8),
        Some(c) => {
            return Err(UserError(format!("--cpus {c}: a microVM has a whole number of vCPUs (1, 2, ...)")).into())
        }
    };
    let memory_mib = a.memory.map(|m| u32::try_from(m >> 20).unwrap_or(u32::MAX));
    let timeout_ms = match a.timeout {
        Some(t) if !(t > 0.0 && t.is_finite()) => {
            return Err(UserError(format!("--timeout {t}: give a positive number of seconds")).into())
        }
        t => t.map(|t| ((t * 1000.0) as u64).max(1)),
    };
    let vm = twinbox_engine::microvm::VmOptions {
        memory_mib,
        vcpus,
        kernel: a.kernel.take(),
        timeout_ms,
        irqchip: a.irqchip.unwrap_or_default(),
        verbose,
        snapshot: a.snapshot,
        no_jail: a.no_jail,
    };
    let opts = RunOptions {
        seccomp: None,
        overrides: a.take_overrides(),
        image: a.image,
        hostname: a.hostname,
        name: a.name,
        memory: None,
        cpus: None,
        pids_limit: None,
        read_only: a.read_only,
        rm: a.rm,
        detach: a.detach,
        network,
        publish,
        publish_all: a.publish_all,
        tty: false,
        volumes,
    };
    let eng = engine(root)?;
    if a.detach {
        let r = eng.run_microvm_detached(&opts, &vm)?;
        println!("{}", r.id);
        return Ok(0);
    }
    twinbox_microvm::vstate::watchdog::stop_on_signals()?;
    let started = *crate::STARTED.get_or_init(std::time::Instant::now);
    let exit = eng.run_microvm(&opts, &vm, started)?;
    Ok(exit.code)
}

#[derive(Args, Debug)]
pub struct PsArgs {
    /// Show all containers (default: running ones).
    #[arg(short, long)]
    all: bool,
    /// Only ids.
    #[arg(short, long)]
    quiet: bool,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

pub fn ps(root: &Path, a: PsArgs) -> Result<i32> {
    let eng = engine(root)?;
    let list: Vec<_> =
        eng.records()?.into_iter().filter(|r| a.all || matches!(r.phase, Phase::Running { .. })).collect();
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &list)?;
        writeln!(out)?;
        return Ok(0);
    }
    if a.quiet {
        for r in &list {
            writeln!(out, "{}", &r.id[..12])?;
        }
        return Ok(0);
    }
    writeln!(
        out,
        "{:<14}{:<24}{:<28}{:<24}{:<24}{:<11}NAME",
        "CONTAINER ID", "IMAGE", "COMMAND", "STATUS", "PORTS", "ISOLATION"
    )?;
    for r in &list {
        let status = match &r.phase {
            Phase::Created => "Created".to_string(),
            Phase::Running { .. } => "Up".to_string(),
            Phase::Exited { code, oom_killed: true } => format!("Exited ({code}) OOM"),
            Phase::Exited { code: -1, .. } => "Exited (unknown)".to_string(),
            Phase::Exited { code, .. } => format!("Exited ({code})"),
        };
        let mut cmd = format!("{:?}", r.command.join(" "));
        if cmd.len() > 26 {
            cmd.truncate(24);
            cmd.push_str("…\"");
        }
        let ports = r.ports.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(", ");
        // A long field still leaves a space before the next one.
        writeln!(
            out,
            "{:<14}{:<24}{:<28}{:<24}{:<24}{:<11}{}",
            &r.id[..12],
            r.image,
            cmd,
            status,
            ports + " ",
            r.isolation(),
            r.name
        )?;
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct ContainerArgs {
    /// Containers (id, id prefix or name).
    #[arg(required = true)]
    containers: Vec<String>,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    /// Seconds to wait after SIGTERM before SIGKILL.
    #[arg(short, long, default_value_t = 10)]
    time: u64,
    /// Containers (id, id prefix or name).
    #[arg(required = true)]
    containers: Vec<String>,
}

#[derive(Args, Debug)]
pub struct KillArgs {
    /// Signal (name or number).
    #[arg(short, long, default_value = "KILL")]
    signal: String,
    /// Containers (id, id prefix or name).
    #[arg(required = true)]
    containers: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    /// Kill it first if it is running.
    #[arg(short, long)]
    force: bool,
    /// Containers (id, id prefix or name).
    #[arg(required = true)]
    containers: Vec<String>,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Container (id, id prefix or name).
    container: String,
}

/// Signal by name (`KILL`, `SIGKILL`) or number.
pub fn parse_signal(s: &str) -> Result<nix::sys::signal::Signal> {
    use std::str::FromStr;
    if let Ok(n) = s.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n).map_err(|_| UserError(format!("unknown signal {s}")).into());
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") { up } else { format!("SIG{up}") };
    nix::sys::signal::Signal::from_str(&name).map_err(|_| UserError(format!("unknown signal {s}")).into())
}

/// `f` for each container, going on after a failure; the exit code is the highest of the
/// failures' (125 if twinbox itself failed on one, 1 if each was the user's mistake), else 0.
/// Runs `f` for each key, reporting each failure; the highest failure code, or 0.
pub(crate) fn each(keys: &[String], mut f: impl FnMut(&str) -> Result<()>) -> Result<i32> {
    let mut code = 0;
    for k in keys {
        if let Err(e) = f(k) {
            code = code.max(crate::report(&e));
        }
    }
    Ok(code)
}

pub fn stop(root: &Path, a: StopArgs) -> Result<i32> {
    let eng = engine(root)?;
    each(&a.containers, |k| {
        eng.stop(k, Duration::from_secs(a.time))?;
        println!("{k}");
        Ok(())
    })
}

pub fn kill(root: &Path, a: KillArgs) -> Result<i32> {
    let sig = parse_signal(&a.signal)?;
    let eng = engine(root)?;
    each(&a.containers, |k| {
        eng.kill(k, sig)?;
        println!("{k}");
        Ok(())
    })
}

pub fn rm(root: &Path, a: RmArgs) -> Result<i32> {
    let eng = engine(root)?;
    each(&a.containers, |k| {
        eng.remove(k, a.force)?;
        println!("{k}");
        Ok(())
    })
}

pub fn start(root: &Path, a: ContainerArgs) -> Result<i32> {
    let eng = engine(root)?;
    each(&a.containers, |k| {
        eng.start(k)?;
        println!("{k}");
        Ok(())
    })
}

pub fn logs(root: &Path, a: LogsArgs) -> Result<i32> {
    let eng = engine(root)?;
    let p = eng.log_path(&a.container)?;
    match std::fs::File::open(&p) {
        Ok(mut f) => {
            std::io::copy(&mut f, &mut std::io::stdout().lock())?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("twinbox: {} has no log: the output of a foreground --rm run is not kept", a.container);
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Keep stdin attached (without it the command reads /dev/null).
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Give the command a terminal (a pty in the container, its size following ours).
    #[arg(short = 't', long)]
    tty: bool,
    /// Set an environment variable (K=V).
    #[arg(short, long = "env")]
    env: Vec<String>,
    /// Working directory.
    #[arg(short, long)]
    workdir: Option<String>,
    /// User (name or uid, optionally :group or :gid).
    #[arg(short, long)]
    user: Option<String>,
    /// Container (id, id prefix or name).
    container: String,
    /// Command and arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    cmd: Vec<String>,
}

pub fn exec(root: &Path, a: ExecArgs) -> Result<i32> {
    // Docker's rule: -t alone needs no terminal on our side (the pty gets no input from us),
    // but -it copies our stdin to the pty in raw mode, so that stdin must be a terminal.
    if a.interactive && a.tty && !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return Err(UserError(
            "the input device is not a TTY: -it needs stdin to be a terminal; to pipe input in, drop -t".into(),
        )
        .into());
    }
    let eng = engine(root)?;
    let opts = ExecOptions { env: a.env, workdir: a.workdir, user: a.user, interactive: a.interactive, tty: a.tty };
    Ok(eng.exec(&a.container, &a.cmd, &opts)?)
}

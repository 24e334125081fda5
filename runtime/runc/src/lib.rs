//! The runc-compatible command line: `twinbox-runc` and `twinbox runtime …`.
//!
//! Errors go to stderr (and to `--log`, as runc's JSON lines with `--log-format json`) and the
//! exit code is 1, except when the container's program cannot be found (127) or executed
//! (126). `run` and `exec` in the foreground exit with the process's status (128+signal when
//! killed).

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clap::{Parser, Subcommand, ValueEnum};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxResources, Process};
use twinbox_exit::ExitCode;

use twinbox_runtime::container::{default_root, error_chain, CreateOptions, ExecOptions, Runtime, RuntimeError};
use twinbox_runtime::control::Event;
use twinbox_runtime::kill::parse_signal;
use twinbox_runtime::state::Status;
use twinbox_runtime::terminal::{ConsoleProxy, ConsoleSocket};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

/// An OCI container runtime (runc-compatible).
#[derive(Debug, Parser)]
#[command(name = "twinbox-runc", version, about)]
struct Cli {
    /// Root directory for container state [default: /run/twinbox/runtime for root,
    /// $XDG_RUNTIME_DIR/twinbox-runc for other users].
    #[arg(long, global = true)]
    root: Option<PathBuf>,
    /// Log file (default: stderr).
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Log format.
    #[arg(long = "log-format", global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Debug logging.
    #[arg(long, global = true)]
    debug: bool,
    /// Use systemd cgroups (not supported).
    #[arg(long = "systemd-cgroup", global = true)]
    systemd_cgroup: bool,
    /// Rootless mode: true, false or auto (rootless when not the host's root). A rootless
    /// container that asks for no limits runs without a cgroup where the hierarchies are not
    /// writable. With `spec`: write a rootless config.
    #[arg(long, global = true, num_args = 0..=1, default_missing_value = "true")]
    rootless: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// Bundle directory (holds config.json).
    #[arg(short = 'b', long, default_value = ".")]
    bundle: PathBuf,
    /// File to write the init's pid to.
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// Unix socket that receives the pty master (SCM_RIGHTS).
    #[arg(long = "console-socket")]
    console_socket: Option<PathBuf>,
    /// Do not use pivot_root (MS_MOVE + chroot).
    #[arg(long = "no-pivot")]
    no_pivot: bool,
    /// Do not create a new session keyring.
    #[arg(long = "no-new-keyring")]
    no_new_keyring: bool,
    /// Pass N extra descriptors (3 .. 3+N) to the container.
    #[arg(long = "preserve-fds", default_value_t = 0)]
    preserve_fds: u32,
    /// Container id.
    id: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a container (its init waits for `start`).
    Create(CreateArgs),
    /// Start a created container.
    Start { id: String },
    /// Print a container's state as JSON.
    State { id: String },
    /// Send a signal to a container's init (or all its processes).
    Kill {
        /// Signal every process in the container.
        #[arg(short = 'a', long)]
        all: bool,
        id: String,
        /// Signal name or number.
        #[arg(default_value = "TERM")]
        signal: String,
    },
    /// Delete a container.
    Delete {
        /// Kill a running container first.
        #[arg(short = 'f', long)]
        force: bool,
        id: String,
    },
    /// Create and start a container; in the foreground, wait for it and delete it.
    Run {
        /// Return once started.
        #[arg(short = 'd', long)]
        detach: bool,
        #[command(flatten)]
        create: CreateArgs,
    },
    /// Run a process in a running container.
    Exec(ExecArgs),
    /// List the processes of a container.
    Ps {
        #[arg(short = 'f', long, value_enum, default_value = "table")]
        format: Format,
        id: String,
        /// ps(1) options (ignored).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// List containers.
    List {
        #[arg(short = 'f', long, value_enum, default_value = "table")]
        format: Format,
        /// Only ids.
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// Print the features this runtime supports, as JSON.
    Features,
    /// Write a new config.json (busybox-style `sh`, runc's defaults) into the bundle; with
    /// --rootless, one for the calling user (a user namespace mapping them to root, no
    /// network namespace, /sys bound from the host).
    Spec {
        /// Bundle directory to write config.json into.
        #[arg(short = 'b', long, default_value = ".")]
        bundle: PathBuf,
    },
    /// Freeze every process of a running container.
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// Change a container's cgroup limits.
    Update(UpdateArgs),
    /// Print the container's cgroup counters as JSON events: once with --stats, else every
    /// --interval (with an "oom" event after each OOM kill) until the container stops.
    Events {
        /// Print one stats event and exit.
        #[arg(long)]
        stats: bool,
        /// Time between stats events (e.g. 5s, 500ms, 1m).
        #[arg(long, default_value = "5s", value_parser = parse_interval)]
        interval: std::time::Duration,
        id: String,
    },
}

#[derive(Debug, clap::Args)]
struct UpdateArgs {
    /// A JSON file with the resources (the spec's linux.resources), `-` for stdin; the flags
    /// below override it.
    #[arg(short = 'r', long)]
    resources: Option<PathBuf>,
    /// Memory limit in bytes.
    #[arg(long)]
    memory: Option<i64>,
    /// Memory + swap limit in bytes (-1: unlimited).
    #[arg(long = "memory-swap")]
    memory_swap: Option<i64>,
    /// Memory soft limit in bytes.
    #[arg(long = "memory-reservation")]
    memory_reservation: Option<i64>,
    /// CPU shares (relative weight).
    #[arg(long = "cpu-shares")]
    cpu_shares: Option<u64>,
    /// CPU CFS quota in µs per period (-1: none).
    #[arg(long = "cpu-quota")]
    cpu_quota: Option<i64>,
    /// CPU CFS period in µs.
    #[arg(long = "cpu-period")]
    cpu_period: Option<u64>,
    /// CPUs the container may run on (e.g. 0-1).
    #[arg(long = "cpuset-cpus")]
    cpuset_cpus: Option<String>,
    /// Memory nodes the container may use.
    #[arg(long = "cpuset-mems")]
    cpuset_mems: Option<String>,
    /// Maximum number of tasks (-1: unlimited).
    #[arg(long = "pids-limit")]
    pids_limit: Option<i64>,
    id: String,
}

/// `5s`, `500ms`, `1m`, `2h`, or a plain number of seconds.
fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("invalid interval {s:?} (e.g. 5s, 500ms)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid interval {s:?} (e.g. 5s, 500ms)")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("interval {s:?} must be positive"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[derive(Debug, clap::Args)]
struct ExecArgs {
    /// A process.json to run (instead of CMD and the options below).
    #[arg(short = 'p', long)]
    process: Option<PathBuf>,
    /// Return once the process has started.
    #[arg(short = 'd', long)]
    detach: bool,
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// Allocate a pseudo-TTY (needs --console-socket).
    #[arg(short = 't', long)]
    tty: bool,
    #[arg(long = "console-socket")]
    console_socket: Option<PathBuf>,
    /// Working directory in the container.
    #[arg(long)]
    cwd: Option<PathBuf>,
    /// Extra environment, K=V.
    #[arg(short = 'e', long)]
    env: Vec<String>,
    /// UID[:GID].
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// Extra group ids.
    #[arg(short = 'g', long = "additional-gids")]
    additional_gids: Vec<u32>,
    #[arg(long = "preserve-fds", default_value_t = 0)]
    preserve_fds: u32,
    /// Container id.
    id: String,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Errors of the CLI layer itself.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("--systemd-cgroup is not supported")]
    Systemd,
    #[error("reading {path}")]
    ProcessFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}")]
    ProcessJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid --user {0:?} (want UID[:GID])")]
    User(String),
    #[error("exec needs a command or --process")]
    NoCommand,
    #[error("the container has no process to base exec on")]
    NoBaseProcess,
    #[error("cannot allocate a tty for a detached process without --console-socket")]
    TtyNeedsSocket,
    #[error("console")]
    Console(#[source] std::io::Error),
    #[error("waiting for the container process")]
    Wait(#[source] nix::errno::Errno),
    #[error("writing output")]
    Output(#[source] std::io::Error),
    #[error("invalid --rootless {0:?}: use true, false or auto")]
    Rootless(String),
    #[error("{0} exists; remove it first")]
    SpecExists(PathBuf),
    #[error("writing {path}")]
    SpecWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ExitCode for CliError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        match self {
            CliError::Runtime(e) => e.exit_code(),
            CliError::Systemd
            | CliError::ProcessFile { .. }
            | CliError::ProcessJson { .. }
            | CliError::User(_)
            | CliError::NoCommand
            | CliError::NoBaseProcess
            | CliError::TtyNeedsSocket
            | CliError::Rootless(_)
            | CliError::SpecExists(_)
            | CliError::SpecWrite { .. } => USER_ERROR,
            CliError::Console(_) | CliError::Wait(_) | CliError::Output(_) => INTERNAL,
        }
    }
}

/// runc's convention for an error: 126/127 when the container's program cannot be
/// executed/found, 1 for every other error, the user's or the runtime's alike.
fn runc_exit_code(e: &CliError) -> i32 {
    match e.exit_code() {
        code @ (twinbox_exit::NOT_EXECUTABLE | twinbox_exit::NOT_FOUND) => code,
        _ => 1,
    }
}

/// `spec`: a default config.json in `bundle`, rootless for the calling user when asked.
fn write_spec(bundle: &Path, rootless: bool) -> Result<(), CliError> {
    let path = bundle.join("config.json");
    let mut spec = if rootless {
        oci_spec::runtime::Spec::rootless(nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw())
    } else {
        oci_spec::runtime::Spec::default()
    };
    spec.set_hostname(Some("twinbox".into()));
    let json = serde_json::to_vec_pretty(&spec).expect("a spec always serializes");
    // Never through an existing file or a dangling symlink.
    let mut f = match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(CliError::SpecExists(path)),
        Err(source) => return Err(CliError::SpecWrite { path, source }),
    };
    f.write_all(&json).map_err(|source| CliError::SpecWrite { path, source })
}

/// Run the CLI with `args` (including argv[0]); returns the exit code.
pub fn main(args: Vec<OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 1 } else { 0 };
        }
    };
    let log = LogSink::open(cli.log.as_deref(), cli.log_format);
    init_tracing(cli.debug, &log);
    match dispatch(&cli) {
        Ok(code) => code,
        Err(e) => {
            let msg = error_chain(&e);
            eprintln!("twinbox-runc: {msg}");
            log.error(&msg);
            runc_exit_code(&e)
        }
    }
}

fn dispatch(cli: &Cli) -> Result<i32, CliError> {
    if cli.systemd_cgroup {
        return Err(CliError::Systemd);
    }
    let root = cli.root.clone().unwrap_or_else(default_root);
    let rt = match cli.rootless.as_deref() {
        None | Some("auto") => Runtime::new(root),
        Some("true") => Runtime::new(root).with_rootless(true),
        Some("false") => Runtime::new(root).with_rootless(false),
        Some(other) => return Err(CliError::Rootless(other.to_owned())),
    };
    let out = |s: String| -> Result<i32, CliError> {
        let mut o = std::io::stdout().lock();
        o.write_all(s.as_bytes()).map_err(CliError::Output)?;
        Ok(0)
    };
    match &cli.command {
        Command::Create(c) => {
            rt.create(&c.id, &c.bundle, create_options(c))?;
            Ok(0)
        }
        Command::Start { id } => {
            rt.start(id)?;
            Ok(0)
        }
        Command::State { id } => {
            let st = rt.state(id)?;
            out(format!("{}\n", serde_json::to_string_pretty(&st.oci()).unwrap_or_default()))
        }
        Command::Kill { all, id, signal } => {
            let sig = parse_signal(signal)?;
            rt.kill(id, sig, *all)?;
            Ok(0)
        }
        Command::Delete { force, id } => {
            rt.delete(id, *force)?;
            Ok(0)
        }
        Command::Run { detach, create } => run(&rt, create, *detach),
        Command::Exec(e) => exec(&rt, e),
        Command::Ps { format, id, .. } => {
            let pids = rt.ps(id)?;
            match format {
                Format::Json => {
                    let v: Vec<i32> = pids.iter().map(|p| p.as_raw()).collect();
                    out(format!("{}\n", serde_json::to_string(&v).unwrap_or_default()))
                }
                Format::Table => {
                    let mut s = String::from("PID\tCMD\n");
                    for p in pids {
                        let cmd = std::fs::read(format!("/proc/{p}/cmdline"))
                            .map(|b| String::from_utf8_lossy(&b).trim_end_matches('\0').replace('\0', " "))
                            .unwrap_or_default();
                        s.push_str(&format!("{p}\t{cmd}\n"));
                    }
                    out(s)
                }
            }
        }
        Command::List { format, quiet } => {
            let all = rt.list()?;
            if *quiet {
                return out(all.iter().map(|s| format!("{}\n", s.id)).collect());
            }
            match format {
                Format::Json => {
                    let v: Vec<_> = all
                        .iter()
                        .map(|s| twinbox_runtime::state::OciState { owner: s.owner_name(), ..s.oci() })
                        .collect();
                    out(format!("{}\n", serde_json::to_string(&v).unwrap_or_default()))
                }
                Format::Table => {
                    let mut rows = vec![[
                        "ID".to_string(),
                        "PID".into(),
                        "STATUS".into(),
                        "BUNDLE".into(),
                        "CREATED".into(),
                        "OWNER".into(),
                    ]];
                    for s in &all {
                        let o = s.oci();
                        rows.push([
                            o.id,
                            o.pid.to_string(),
                            o.status.to_string(),
                            o.bundle.display().to_string(),
                            o.created,
                            s.owner_name(),
                        ]);
                    }
                    out(table(&rows))
                }
            }
        }
        Command::Spec { bundle } => {
            write_spec(bundle, rt.is_rootless() && cli.rootless.is_some())?;
            Ok(0)
        }
        Command::Features => out(format!("{}\n", serde_json::to_string_pretty(&features()).unwrap_or_default())),
        Command::Pause { id } => {
            rt.pause(id)?;
            Ok(0)
        }
        Command::Resume { id } => {
            rt.resume(id)?;
            Ok(0)
        }
        Command::Update(u) => {
            rt.update(&u.id, &update_resources(u)?)?;
            Ok(0)
        }
        Command::Events { stats, interval, id } => events(&rt, id, *stats, *interval),
    }
}

/// The resources of `update`: the file (if any), then the flags over it.
fn update_resources(u: &UpdateArgs) -> Result<LinuxResources, CliError> {
    use oci_spec::runtime::LinuxPids;
    let mut r: LinuxResources = match &u.resources {
        None => LinuxResources::default(),
        Some(path) => {
            let bytes = if path.as_os_str() == "-" {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
                    .map_err(|source| CliError::ProcessFile { path: path.clone(), source })?;
                b
            } else {
                std::fs::read(path).map_err(|source| CliError::ProcessFile { path: path.clone(), source })?
            };
            serde_json::from_slice(&bytes).map_err(|source| CliError::ProcessJson { path: path.clone(), source })?
        }
    };
    if u.memory.is_some() || u.memory_swap.is_some() || u.memory_reservation.is_some() {
        let mut m = r.memory().unwrap_or_default();
        if let Some(v) = u.memory {
            m.set_limit(Some(v));
        }
        if let Some(v) = u.memory_swap {
            m.set_swap(Some(v));
        }
        if let Some(v) = u.memory_reservation {
            m.set_reservation(Some(v));
        }
        r.set_memory(Some(m));
    }
    if u.cpu_shares.is_some()
        || u.cpu_quota.is_some()
        || u.cpu_period.is_some()
        || u.cpuset_cpus.is_some()
        || u.cpuset_mems.is_some()
    {
        let mut c = r.cpu().clone().unwrap_or_default();
        if let Some(v) = u.cpu_shares {
            c.set_shares(Some(v));
        }
        if let Some(v) = u.cpu_quota {
            c.set_quota(Some(v));
        }
        if let Some(v) = u.cpu_period {
            c.set_period(Some(v));
        }
        if let Some(v) = &u.cpuset_cpus {
            c.set_cpus(Some(v.clone()));
        }
        if let Some(v) = &u.cpuset_mems {
            c.set_mems(Some(v.clone()));
        }
        r.set_cpu(Some(c));
    }
    if let Some(v) = u.pids_limit {
        let mut p = LinuxPids::default();
        p.set_limit(v);
        r.set_pids(Some(p));
    }
    Ok(r)
}

/// `events`: one stats line with `stats`, else a line every `interval` (and an "oom" line
/// after each OOM kill) until the container stops.
fn events(rt: &Runtime, id: &str, once: bool, interval: std::time::Duration) -> Result<i32, CliError> {
    let print = |e: &Event| -> Result<(), CliError> {
        let line = format!("{}\n", serde_json::to_string(e).unwrap_or_default());
        let mut o = std::io::stdout().lock();
        o.write_all(line.as_bytes()).and_then(|()| o.flush()).map_err(CliError::Output)
    };
    let (event, mut ooms) = rt.stats(id)?;
    print(&event)?;
    if once {
        return Ok(0);
    }
    loop {
        std::thread::sleep(interval);
        let (event, now) = match rt.stats(id) {
            Ok(x) => x,
            // Stopped or deleted meanwhile: the stream ends, as runc's does.
            Err(RuntimeError::NotRunning { .. } | RuntimeError::NotFound { .. }) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        for _ in ooms..now {
            print(&Event { kind: "oom", id: id.to_string(), data: None })?;
        }
        ooms = now;
        print(&event)?;
    }
}

fn create_options(c: &CreateArgs) -> CreateOptions {
    CreateOptions {
        pid_file: c.pid_file.clone(),
        console_socket: c.console_socket.clone(),
        stdio: None,
        no_new_keyring: c.no_new_keyring,
        no_pivot: c.no_pivot,
        preserve_fds: c.preserve_fds,
    }
}

/// The signals `run` and `exec` forward to the container process (plus SIGCHLD to notice its
/// end).
fn forwarded_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
        Signal::SIGCHLD,
    ] {
        set.add(s);
    }
    set
}

/// Wait for `pid` (a child), forwarding signals to it; returns its exit code (128+signal).
/// The signals must already be blocked. With a console, SIGWINCH resizes it instead.
fn wait_forwarding(pid: Pid, set: &SigSet, console: Option<&ConsoleProxy>) -> Result<i32, CliError> {
    twinbox_runtime::wait_forwarding(pid, set, console).map_err(CliError::Wait)
}

/// Does the bundle's config ask for a terminal? Only `process.terminal` is read (`create`
/// parses and checks the whole config next); an unreadable config says no, and `create`
/// reports what is wrong with it.
fn wants_terminal(bundle: &Path) -> bool {
    #[derive(serde::Deserialize)]
    struct Config {
        process: Option<ProcessTerminal>,
    }
    #[derive(serde::Deserialize)]
    struct ProcessTerminal {
        terminal: Option<bool>,
    }
    std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Config>(&b).ok())
        .and_then(|c| c.process?.terminal)
        .unwrap_or(false)
}

/// Block the forwarded signals; returns the previous mask.
fn block_signals(set: &SigSet) -> Result<SigSet, CliError> {
    let mut old = SigSet::empty();
    nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_BLOCK, Some(set), Some(&mut old))
        .map_err(CliError::Wait)?;
    Ok(old)
}

fn run(rt: &Runtime, c: &CreateArgs, detach: bool) -> Result<i32, CliError> {
    let own_console = if !detach && c.console_socket.is_none() && wants_terminal(&c.bundle) {
        Some(ConsoleSocket::listen().map_err(CliError::Console)?)
    } else {
        None
    };
    let set = forwarded_signals();
    let old = if detach { None } else { Some(block_signals(&set)?) };
    let result = (|| {
        let mut opts = create_options(c);
        if let Some(oc) = &own_console {
            opts.console_socket = Some(oc.path.clone());
        }
        let mut st = rt.create(&c.id, &c.bundle, opts)?;
        let proxy = match own_console.as_ref().map(ConsoleSocket::receive) {
            Some(Ok(master)) => Some(ConsoleProxy::start(master)),
            Some(Err(e)) => {
                let _ = rt.delete(&c.id, true);
                return Err(CliError::Console(e));
            }
            None => None,
        };
        let pid = Pid::from_raw(st.pid);
        if let Err(e) = rt.start_created(&mut st) {
            let _ = rt.delete(&c.id, true);
            return Err(e.into());
        }
        if detach {
            return Ok(0);
        }
        let code = wait_forwarding(pid, &set, proxy.as_ref());
        if let Some(p) = proxy {
            p.finish();
        }
        if let Err(e) = rt.delete_created(st, true) {
            tracing::warn!(error = %error_chain(&e), "deleting the container after run");
        }
        code
    })();
    if let Some(old) = old {
        let _ = old.thread_set_mask();
    }
    result
}

fn exec(rt: &Runtime, e: &ExecArgs) -> Result<i32, CliError> {
    let process = exec_process(rt, e)?;
    let terminal = process.terminal().unwrap_or(false);
    if terminal && e.console_socket.is_none() && e.detach {
        return Err(CliError::TtyNeedsSocket);
    }
    let own_console = if terminal && e.console_socket.is_none() {
        Some(ConsoleSocket::listen().map_err(CliError::Console)?)
    } else {
        None
    };
    let opts = ExecOptions {
        pid_file: e.pid_file.clone(),
        console_socket: e.console_socket.clone().or_else(|| own_console.as_ref().map(|c| c.path.clone())),
        stdio: None,
        preserve_fds: e.preserve_fds,
    };
    if e.detach {
        rt.exec(&e.id, &process, opts)?;
        return Ok(0);
    }
    let set = forwarded_signals();
    let old = block_signals(&set)?;
    let result = rt.exec(&e.id, &process, opts).map_err(CliError::from).and_then(|pid| {
        let proxy = match &own_console {
            Some(oc) => Some(ConsoleProxy::start(oc.receive().map_err(CliError::Console)?)),
            None => None,
        };
        let code = wait_forwarding(pid, &set, proxy.as_ref());
        if let Some(p) = proxy {
            p.finish();
        }
        code
    });
    let _ = old.thread_set_mask();
    result
}

/// The process to exec: `--process FILE`, or the container's own process with CMD and the
/// overrides (as runc does).
fn exec_process(rt: &Runtime, e: &ExecArgs) -> Result<Process, CliError> {
    if let Some(path) = &e.process {
        let bytes = std::fs::read(path).map_err(|source| CliError::ProcessFile { path: path.clone(), source })?;
        return serde_json::from_slice(&bytes).map_err(|source| CliError::ProcessJson { path: path.clone(), source });
    }
    if e.command.is_empty() {
        return Err(CliError::NoCommand);
    }
    let st = rt.state(&e.id)?;
    let mut p = st.config.process().clone().ok_or(CliError::NoBaseProcess)?;
    p.set_args(Some(e.command.clone()));
    p.set_terminal(Some(e.tty));
    if let Some(cwd) = &e.cwd {
        p.set_cwd(cwd.clone());
    }
    if !e.env.is_empty() {
        let mut env = p.env().clone().unwrap_or_default();
        for kv in &e.env {
            let key = kv.split('=').next().unwrap_or("");
            env.retain(|old| old.split('=').next() != Some(key));
            env.push(kv.clone());
        }
        p.set_env(Some(env));
    }
    if let Some(u) = &e.user {
        let (uid, gid) = match u.split_once(':') {
            Some((a, b)) => (a, Some(b)),
            None => (u.as_str(), None),
        };
        let uid: u32 = uid.parse().map_err(|_| CliError::User(u.clone()))?;
        let gid: u32 = match gid {
            Some(g) => g.parse().map_err(|_| CliError::User(u.clone()))?,
            None => p.user().gid(),
        };
        let user = p.user_mut();
        user.set_uid(uid);
        user.set_gid(gid);
        user.set_username(None);
    }
    if !e.additional_gids.is_empty() {
        p.user_mut().set_additional_gids(Some(e.additional_gids.clone()));
    }
    if st.status == Status::Stopped {
        return Err(RuntimeError::CannotExec { status: st.status }.into());
    }
    Ok(p)
}

/// Columns separated by at least three spaces (runc uses a tabwriter).
fn table(rows: &[[String; 6]]) -> String {
    let mut widths = [0usize; 6];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut s = String::new();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        s.push('\n');
    }
    s
}

fn features() -> serde_json::Value {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.3.0",
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": [
            "acl", "async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec",
            "iversion", "lazytime", "loud", "mand", "noacl", "noatime", "nodev", "nodiratime",
            "noexec", "noiversion", "nolazytime", "nomand", "norelatime", "nostrictatime",
            "nosuid", "private", "rbind", "relatime", "remount", "ro", "rprivate", "rshared",
            "rslave", "runbindable", "rw", "shared", "silent", "slave", "strictatime", "suid",
            "sync", "tmpcopyup", "unbindable"
        ],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "cgroup": { "v1": true, "v2": true, "systemd": false, "systemdUser": false },
            "seccomp": { "enabled": true },
            "apparmor": { "enabled": false },
            "selinux": { "enabled": false }
        },
        "annotations": {
            twinbox_runtime::rootfs::OVERLAY_ANNOTATION: "overlay rootfs: {\"lower\":[…],\"upper\":…,\"work\":…}"
        }
    })
}

/// Where logs and the final error go: a file (text or runc's JSON lines) or nowhere extra.
#[derive(Clone)]
struct LogSink {
    file: Option<Arc<Mutex<std::fs::File>>>,
    format: LogFormat,
}

impl LogSink {
    fn open(path: Option<&Path>, format: LogFormat) -> LogSink {
        let file = path.and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| eprintln!("twinbox-runc: opening log {}: {e}", p.display()))
                .ok()
        });
        LogSink { file: file.map(|f| Arc::new(Mutex::new(f))), format }
    }

    fn line(&self, level: &str, msg: &str) {
        let Some(f) = &self.file else { return };
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        let line = match self.format {
            LogFormat::Json => format!("{}\n", serde_json::json!({ "level": level, "msg": msg, "time": time })),
            LogFormat::Text => format!("time={time:?} level={level} msg={msg:?}\n"),
        };
        if let Ok(mut f) = f.lock() {
            let _ = f.write_all(line.as_bytes());
        }
    }

    fn error(&self, msg: &str) {
        self.line("error", msg);
    }
}

/// A tracing writer that turns each formatted line ("LEVEL message fields") into a log line.
struct SinkWriter {
    sink: LogSink,
    buf: Vec<u8>,
}

impl Write for SinkWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for SinkWriter {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.buf);
        for line in text.lines() {
            let line = line.trim();
            let (level, msg) = line.split_once(' ').unwrap_or(("info", line));
            self.sink.line(&level.to_ascii_lowercase(), msg.trim());
        }
    }
}

fn init_tracing(debug: bool, log: &LogSink) {
    let level = if debug { tracing::Level::DEBUG } else { tracing::Level::WARN };
    let builder = tracing_subscriber::fmt().with_max_level(level).with_target(false).without_time().with_ansi(false);
    let res = if log.file.is_some() {
        let sink = log.clone();
        builder.with_writer(move || SinkWriter { sink: sink.clone(), buf: Vec::new() }).try_init()
    } else {
        builder.with_writer(std::io::stderr).try_init()
    };
    // Already initialised (a library caller set up tracing): keep theirs.
    let _ = res;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_runc_style_command_lines() {
        let c = Cli::try_parse_from([
            "x",
            "--root",
            "/tmp/r",
            "--log",
            "/tmp/l",
            "--log-format",
            "json",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/p",
            "c1",
        ])
        .unwrap();
        assert_eq!(c.root, Some(PathBuf::from("/tmp/r")));
        assert_eq!(c.log_format, LogFormat::Json);
        match c.command {
            Command::Create(a) => {
                assert_eq!(a.bundle, PathBuf::from("/b"));
                assert_eq!(a.id, "c1");
            }
            other => panic!("{other:?}"),
        }
        let c = Cli::try_parse_from(["x", "kill", "c1", "9"]).unwrap();
        assert!(matches!(c.command, Command::Kill { ref signal, .. } if signal == "9"));
        let c = Cli::try_parse_from(["x", "kill", "--all", "c1"]).unwrap();
        assert!(matches!(c.command, Command::Kill { all: true, ref signal, .. } if signal == "TERM"));
        let c = Cli::try_parse_from(["x", "exec", "-e", "A=1", "c1", "sh", "-c", "echo hi"]).unwrap();
        match c.command {
            Command::Exec(e) => assert_eq!(e.command, ["sh", "-c", "echo hi"]),
            other => panic!("{other:?}"),
        }
        let c = Cli::try_parse_from(["x", "run", "-d", "-b", "/b", "c1"]).unwrap();
        assert!(matches!(c.command, Command::Run { detach: true, .. }));
    }

    #[test]
    fn tables_align() {
        let rows = [
            ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"].map(String::from),
            ["a", "1", "running", "/b", "t", "root"].map(String::from),
        ];
        let t = table(&rows);
        assert!(t.starts_with("ID   PID   STATUS    BUNDLE   CREATED   OWNER\n"));
    }

    #[test]
    fn errors_exit_as_runc() {
        let init = |code| CliError::Runtime(RuntimeError::Init { message: "m".into(), code });
        assert_eq!(runc_exit_code(&init(127)), 127);
        assert_eq!(runc_exit_code(&init(126)), 126);
        assert_eq!(runc_exit_code(&init(125)), 1);
        let console = CliError::Console(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(console.exit_code(), 125, "twinbox's own failure");
        assert_eq!(runc_exit_code(&console), 1, "which runc reports as 1");
        assert_eq!(runc_exit_code(&CliError::NoCommand), 1);
    }
}

//! `twinbox`: a thin adapter over the libraries — parse arguments, call, print errors.
//!
//! `images` (build, images, inspect, tag, rmi, save, load, prune, unpack) and `registry` (pull,
//! push, login, logout) call `twinbox_image`; `containers` (run in either model, ps, logs,
//! stop, kill, rm, start, exec, the monitor's hidden `container-exited`) calls `twinbox_engine`,
//! and `runtime` hands its arguments to `twinbox_runc`; `vm` drives `twinbox_microvm` alone;
//! `bench` calls `twinbox_bench`. Errors print once here, with the exit code their type gives.

mod bench;
mod containers;
mod images;
mod networks;
mod registry;
mod snapshots;
mod vm;
mod volumes;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// One OCI image, two isolation models: containers and KVM microVMs, measured side by side.
#[derive(Parser, Debug)]
#[command(name = "twinbox", version, about, propagate_version = true)]
struct Cli {
    /// Image store root (an OCI image layout).
    #[arg(long, global = true, env = "TWINBOX_ROOT", default_value = twinbox_image::store::DEFAULT_ROOT)]
    root: std::path::PathBuf,
    /// More logging (-v info, -vv debug and, for microVM runs, the guest kernel console and
    /// agent steps); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build an image from a Dockerfile.
    Build(images::BuildArgs),
    /// List images.
    Images(images::ImagesArgs),
    /// Show an image's manifest and config as JSON.
    Inspect(images::InspectArgs),
    /// Give an image another name.
    Tag(images::TagArgs),
    /// Remove images.
    Rmi(images::RmiArgs),
    /// Write images to an OCI archive.
    Save(images::SaveArgs),
    /// Read images from an OCI or docker archive.
    Load(images::LoadArgs),
    /// Remove blobs, layer directories and build cache no image uses.
    Prune(images::PruneArgs),
    /// Write an image's root filesystem (all layers applied) into a directory.
    Unpack(images::UnpackArgs),
    /// Download an image from a registry.
    Pull(registry::PullArgs),
    /// Upload an image to a registry.
    Push(registry::PushArgs),
    /// Check and store credentials for a registry (Docker's config.json).
    Login(registry::LoginArgs),
    /// Remove stored credentials for a registry.
    Logout(registry::LogoutArgs),
    /// Run a command in a new container of an image.
    Run(Box<containers::RunArgs>),
    /// List containers.
    Ps(containers::PsArgs),
    /// Print a detached container's output.
    Logs(containers::LogsArgs),
    /// Stop containers (SIGTERM, then SIGKILL).
    Stop(containers::StopArgs),
    /// Send a signal to containers.
    Kill(containers::KillArgs),
    /// Remove containers.
    Rm(containers::RmArgs),
    /// Run a command in a running container.
    Exec(containers::ExecArgs),
    /// Start stopped containers again, detached.
    Start(containers::ContainerArgs),
    /// Manage networks (create, ls, inspect, rm, prune).
    Network(networks::NetworkArgs),
    /// Manage named volumes (create, ls, inspect, rm).
    Volume(volumes::VolumeArgs),
    /// Put right what killed twinbox commands left (prune).
    System(containers::SystemArgs),
    /// Boot a kernel in a KVM microVM.
    Vm(vm::VmArgs),
    /// Manage the microVM templates `run --snapshot` restores (ls, rm).
    Snapshot(snapshots::SnapshotArgs),
    /// Measure the image as a container and as a microVM beside runc, crun, QEMU and Firecracker; write a report.
    Bench(Box<bench::BenchArgs>),
    /// Show a container's published ports.
    Port(containers::PortArgs),
    /// Run by the store's container monitor to create and start a detached container (started
    /// by run -d and start, not by hand).
    #[command(hide = true)]
    ContainerLaunch(containers::LaunchArgs),
    /// The VMM of a detached microVM (started by run -d and start, not by hand).
    #[command(hide = true)]
    MicrovmLaunch(containers::LaunchArgs),
    /// A microVM's VMM process, started by the instance's monitor with its request on
    /// descriptor 3 (see twinbox_engine::vmm).
    #[command(hide = true)]
    MicrovmVmm {
        /// Instead: enter a VMM's jail and print, per thread kind, what it reaches of the host
        /// kernel (the isolation figures of `twinbox bench`).
        #[arg(long)]
        probe: bool,
    },
    /// Run by a detached container's monitor once the container's init has exited: records
    /// its exit code and removes what it leaves.
    #[command(hide = true)]
    ContainerExited(containers::ExitedArgs),
    /// The OCI runtime with runc's command line (create, start, state, kill, delete, run, exec, ps, list).
    #[command(disable_help_flag = true)]
    Runtime {
        /// runc-style arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// Errors the user can fix (exit 1), as opposed to internal failures (exit 125).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UserError(pub String);

impl twinbox_exit::ExitCode for UserError {
    fn exit_code(&self) -> i32 {
        twinbox_exit::USER_ERROR
    }
}

/// How many `-v` this process got: a microVM's VMM process gets as many (its boot timer's
/// "Guest-boot-time" line, at -v, is how `twinbox bench` sees a guest start its workload).
pub static VERBOSE: std::sync::OnceLock<u8> = std::sync::OnceLock::new();

/// When this process started: what a microVM's boot timer counts from.
pub static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn main() -> ExitCode {
    STARTED.get_or_init(std::time::Instant::now);
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(1),
            };
        }
    };
    if let Command::Runtime { args } = cli.command {
        // runc's own flags, logging and exit codes.
        let mut argv = vec![std::ffi::OsString::from("twinbox runtime")];
        argv.extend(args);
        return ExitCode::from(twinbox_runc::main(argv).clamp(0, 255) as u8);
    }
    init_logging(cli.verbose);
    VERBOSE.get_or_init(|| cli.verbose);
    let root = &cli.root;
    let is_run = matches!(cli.command, Command::Run(_));
    let ok = |r: Result<()>| r.map(|()| 0);
    let result = match cli.command {
        Command::Build(a) => ok(images::build(root, a)),
        Command::Images(a) => ok(images::images(root, a)),
        Command::Inspect(a) => ok(images::inspect(root, a)),
        Command::Tag(a) => ok(images::tag(root, a)),
        Command::Rmi(a) => ok(images::rmi(root, a)),
        Command::Save(a) => ok(images::save(root, a)),
        Command::Load(a) => ok(images::load(root, a)),
        Command::Prune(a) => ok(images::prune(root, a)),
        Command::Unpack(a) => ok(images::unpack(root, a)),
        Command::Pull(a) => ok(registry::pull(root, a)),
        Command::Push(a) => ok(registry::push(root, a)),
        Command::Login(a) => ok(registry::login(a)),
        Command::Logout(a) => ok(registry::logout(a)),
        Command::Run(a) => containers::run(root, *a, cli.verbose > 1),
        Command::Ps(a) => containers::ps(root, a),
        Command::Logs(a) => containers::logs(root, a),
        Command::Stop(a) => containers::stop(root, a),
        Command::Kill(a) => containers::kill(root, a),
        Command::Rm(a) => containers::rm(root, a),
        Command::Start(a) => containers::start(root, a),
        Command::Exec(a) => containers::exec(root, a),
        Command::ContainerExited(a) => containers::exited(root, a),
        Command::ContainerLaunch(a) => containers::launch(root, a),
        Command::MicrovmLaunch(a) => containers::launch_microvm(root, a),
        Command::MicrovmVmm { probe: false } => Ok(twinbox_engine::vmm::serve()),
        Command::MicrovmVmm { probe: true } => twinbox_engine::vmm::probe()
            .map(|json| {
                println!("{json}");
                0
            })
            .map_err(anyhow::Error::from),
        Command::Port(a) => containers::port(root, a),
        Command::Network(a) => networks::network(root, a),
        Command::Volume(a) => volumes::volume(root, a),
        Command::System(a) => containers::system(root, a),
        Command::Vm(a) => vm::vm(a),
        Command::Snapshot(a) => ok(snapshots::snapshot(root, a)),
        Command::Bench(a) => bench::bench(root, *a),
        Command::Runtime { .. } => unreachable!("handled above"),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            let code = report(&e);
            ExitCode::from(if is_run { around_run(code) } else { code }.clamp(0, 255) as u8)
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: logs redirected to a file stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

/// Prints `e` with its whole chain of causes, once, and returns the exit code of the outermost
/// twinbox error in it (the [`twinbox_exit`] policy); a chain without one, such as an I/O error
/// of the command line's own, is twinbox's failure: 125.
pub(crate) fn report(e: &anyhow::Error) -> i32 {
    // Whoever read our output stopped (`twinbox inspect X | head -1`): not an error to print;
    // the code a shell shows for a process that SIGPIPE ended.
    let broken_pipe = e.chain().any(|c| {
        let kind = c
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind)
            .or_else(|| c.downcast_ref::<serde_json::Error>().and_then(serde_json::Error::io_error_kind));
        kind == Some(std::io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        return twinbox_exit::signalled(libc::SIGPIPE);
    }
    eprintln!("twinbox: {e:#}");
    exit_code(e)
}

/// `twinbox run`'s code for an error of code `code`: the user's mistake (a malformed reference
/// or `-p`, a limit out of range, an unknown image or network: refused before anything runs)
/// is 1, as for every command; twinbox's own failure around a run is 125, as `docker run`'s,
/// so that a workload's own failure codes (2, …, 128+N) are not taken for it; a program that
/// cannot be executed (126) or found (127) is reported as the workload's.
fn around_run(code: i32) -> i32 {
    match code {
        twinbox_exit::NOT_EXECUTABLE | twinbox_exit::NOT_FOUND | twinbox_exit::USER_ERROR => code,
        _ => twinbox_exit::INTERNAL,
    }
}

fn exit_code(e: &anyhow::Error) -> i32 {
    e.chain().find_map(twinbox_exit_code).unwrap_or(twinbox_exit::INTERNAL)
}

/// The exit code of `cause` if it is one of the twinbox errors a command can surface.
fn twinbox_exit_code(cause: &(dyn std::error::Error + 'static)) -> Option<i32> {
    use twinbox_exit::ExitCode as _;
    macro_rules! code_of_first {
        ($($error:ty),+ $(,)?) => {
            $(if let Some(e) = cause.downcast_ref::<$error>() {
                return Some(e.exit_code());
            })+
        };
    }
    code_of_first!(
        UserError,
        twinbox_image::StoreError,
        twinbox_image::archive::ArchiveError,
        twinbox_image::build::BuildError,
        twinbox_image::disk::DiskError,
        twinbox_image::digest::DigestError,
        twinbox_image::launch::LaunchError,
        twinbox_image::reference::ReferenceError,
        twinbox_image::registry::RegistryError,
        twinbox_image::unpack::UnpackError,
        twinbox_engine::EngineError,
        twinbox_engine::build_run::BuildRunError,
        twinbox_engine::microvm::ImageRunError,
        twinbox_engine::network::NetworkError,
        twinbox_engine::volume::VolumeError,
        twinbox_engine::network::publish::PortSpecError,
        twinbox_engine::network::publish::PublishError,
        twinbox_runtime::RuntimeError,
        twinbox_runtime::cgroups::CgroupError,
        twinbox_microvm::VmError,
        twinbox_microvm::ConfigError,
        twinbox_microvm::loader::LoaderError,
        twinbox_bench::BenchError,
        twinbox_bench::compare::CompareError,
        twinbox_bench::results::MergeError,
        twinbox_bench::results::ResultsError,
        twinbox_bench::report::ReportError,
    );
    None
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;
    use twinbox_image::StoreError;

    use super::*;

    #[test]
    fn the_outermost_twinbox_error_gives_the_code() {
        let missing: Result<()> = Err(StoreError::NoSuchImage("x:1".into()).into());
        let e = missing.context("resolving x:1").context("inspecting x:1").unwrap_err();
        assert_eq!(exit_code(&e), 1);
        let io: Result<()> = Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied).into());
        let e = io.context("writing the list").context("images").unwrap_err();
        assert_eq!(exit_code(&e), 125, "no twinbox error in the chain");
        // The store's own I/O error decides, not the io::Error it wraps.
        let source = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::new(StoreError::Io { op: "read", path: "/s/index.json".into(), source }).context("x");
        assert_eq!(exit_code(&e), 125);
        // Behind an engine error that forwards its cause's source, the store's code still counts.
        let e = anyhow::Error::new(twinbox_engine::EngineError::Store(StoreError::NoSuchImage("x:1".into())));
        assert_eq!(exit_code(&e.context("exec")), 1);
        assert_eq!(exit_code(&anyhow::Error::new(UserError("bad flag".into()))), 1);
    }

    #[test]
    fn a_run_reports_only_the_workloads_codes() {
        assert_eq!(around_run(1), 1);
        assert_eq!(around_run(2), 125);
        assert_eq!(around_run(125), 125);
        assert_eq!(around_run(126), 126);
        assert_eq!(around_run(127), 127);
        assert_eq!(around_run(130), 125);
    }
}

//! Running an OCI image as a microVM: the same process a container of the image would start
//! (`twinbox_image::launch`), in a guest that boots its own kernel.
//!
//! ```text
//! image ─► launch::resolve (args, env, cwd, user)  ─► GuestConfig ─► initramfs (agent + config)
//!       └► disk::root_disk (ext4, cached by digest) ─► virtio-blk /dev/vda (read-only)
//! VM: kernel + initramfs + disk ─► agent mounts the disk under a tmpfs overlay, execs the
//!     workload (boot-timer byte first), copies its output to the output ports, reports its
//!     exit status on the exit port.
//! ```
//!
//! The kernel console (COM1) is not the workload's output: it is kept (its last lines explain
//! a panic or a hang) and shown only when `verbose`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use twinbox_exit::ExitCode;
use twinbox_image::disk::{self, DiskError};
use twinbox_image::launch::{self, LaunchError, Overrides};
use twinbox_image::{Store, StoreError};

use twinbox_microvm::agent::GuestConfig;
use twinbox_microvm::config::{DiskConfig, IrqChip, NetConfig, VmConfig};
use twinbox_microvm::console::ConsoleLog;
pub use twinbox_microvm::loader::default_kernel;
use twinbox_microvm::{ExitReason, VmError};

/// Kernel command line of an image run: serial console (kept for diagnostics), i8042 reset,
/// no PCI or modules, a panic stops the guest at once, only the first UART probed, and no
/// paravirtual spinlocks (`nopvspin`: a vCPU waiting for a lock spins instead of halting with
/// interrupts off until the holder's kick, which a slow host, a nested L1 under TCG, lost now
/// and then, hanging two-vCPU guests).
pub const IMAGE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule i8042.noaux i8042.nokbd i8042.nopnp \
     8250.nr_uarts=1 nopvspin rdinit=/init";

/// What `twinbox run --isolation microvm` may set. Plain data.
#[derive(Debug, Clone, Default)]
pub struct ImageRunOptions {
    /// Image reference.
    pub image: String,
    /// Command, entrypoint, env, workdir and user overrides, as for a container.
    pub overrides: Overrides,
    /// Guest hostname (default: the first 12 characters of the run id).
    pub hostname: Option<String>,
    /// The workload's root is read-only (`--read-only`).
    pub read_only: bool,
    /// Guest RAM in MiB (default 128).
    pub memory_mib: Option<u32>,
    /// vCPUs (default 1).
    pub vcpus: Option<u8>,
    /// Guest kernel (default: [`default_kernel`]).
    pub kernel: Option<PathBuf>,
    /// Stop the VM after this long.
    pub timeout: Option<Duration>,
    /// Where the IOAPIC (and PIC, PIT) are emulated (default: split).
    pub irqchip: IrqChip,
    /// Show the kernel console (at loglevel 7) and the agent's steps on stderr.
    pub verbose: bool,
}

/// How an image run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageRunExit {
    /// The workload's exit code (128 + N when killed by signal N; 125-127 as `docker run`).
    pub code: i32,
    /// VMM start → the agent's boot-timer write just before exec, when it came.
    pub boot_time: Option<Duration>,
    /// VMM start → the VM stopped.
    pub total: Duration,
}

/// Errors of an image run.
#[derive(Debug, thiserror::Error)]
pub enum ImageRunError {
    /// The image is not in the store, or the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The image and the flags give no process.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// The root disk could not be made.
    #[error("cannot make the VM's root disk")]
    Disk(#[from] DiskError),
    /// No kernel was given and none is built.
    #[error(
        "no guest kernel at {0}; build one with scripts/build-guest-kernel.sh, or pass --kernel / set TWINBOX_KERNEL"
    )]
    NoKernel(PathBuf),
    /// Building or running the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The guest kernel panicked.
    #[error("the guest kernel panicked: {line}\nlast console lines:\n{tail}")]
    Panic {
        /// The panic line.
        line: String,
        /// The console's last lines.
        tail: String,
    },
    /// The guest ran past `--timeout`.
    #[error("the guest is still running after {0:?} (--timeout); stopped it\nlast console lines:\n{1}")]
    Timeout(Duration, String),
    /// The VMM was asked to stop (SIGINT, SIGTERM, SIGHUP) and stopped the guest.
    #[error("stopped the VM on signal {0}")]
    Interrupted(i32),
    /// A warm template could not be made or read.
    #[error("microVM template: {0}")]
    Template(String),
    /// The VMM process failed, or ended without saying how the guest did.
    #[error("{message}")]
    Vmm {
        /// The exit code the failure maps to.
        code: i32,
        /// What happened.
        message: String,
    },
    /// The guest stopped without the agent's exit status.
    #[error("the guest stopped ({reason}) without reporting the workload's exit status\nlast console lines:\n{tail}")]
    NoStatus {
        /// How it stopped.
        reason: ExitReason,
        /// The console's last lines.
        tail: String,
    },
}

impl ExitCode for ImageRunError {
    fn exit_code(&self) -> i32 {
        match self {
            ImageRunError::Store(e) => e.exit_code(),
            ImageRunError::Launch(e) => e.exit_code(),
            ImageRunError::Disk(e) => e.exit_code(),
            ImageRunError::Vm(e) => e.exit_code(),
            ImageRunError::NoKernel(_) => twinbox_exit::USER_ERROR,
            ImageRunError::Interrupted(signal) => twinbox_exit::signalled(*signal),
            ImageRunError::Vmm { code, .. } => *code,
            ImageRunError::Panic { .. }
            | ImageRunError::Timeout(..)
            | ImageRunError::NoStatus { .. }
            | ImageRunError::Template(_) => twinbox_exit::INTERNAL,
        }
    }
}

/// Guest RAM when the run does not say.
pub const DEFAULT_MEMORY_MIB: u32 = 128;

/// What any VMM needs to boot a run of an image: the kernel, the root disk, the guest agent's
/// configuration (for the initramfs) and the kernel command line without the disk entries.
#[derive(Debug, Clone)]
pub struct PreparedRun {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The image's root disk (read-only for the guest).
    pub disk: disk::RootDisk,
    /// The agent's configuration: the same process a container of the image would start.
    pub guest: GuestConfig,
    /// Kernel command line.
    pub cmdline: String,
}

/// Resolves the process, the kernel and the root disk of a run of `image` (`id` names the run;
/// its first 12 characters are the default hostname). Also what the benchmark harness gives
/// QEMU and Firecracker, so every VMM boots the same guest.
pub fn prepare(
    store: &Store,
    image: &twinbox_image::Image,
    opts: &ImageRunOptions,
    id: &str,
) -> Result<PreparedRun, ImageRunError> {
    let hostname = opts.hostname.clone().unwrap_or_else(|| id.chars().take(12).collect());
    // User names are looked up in the image's /etc/passwd, which needs its layers unpacked;
    // a numeric user or none does not.
    let by_name = opts
        .overrides
        .user
        .clone()
        .or_else(|| image.config.config().as_ref().and_then(|c| c.user().clone()))
        .is_some_and(|u| u.split(':').any(|p| !p.is_empty() && p.parse::<u32>().is_err()));
    let layers = if by_name { store.unpacked_layers(image)? } else { Vec::new() };
    let process = launch::resolve(&opts.image, &image.config, &layers, &opts.overrides, &hostname)?;
    let kernel = opts.kernel.clone().unwrap_or_else(default_kernel);
    if !kernel.exists() {
        return Err(ImageRunError::NoKernel(kernel));
    }
    let disk = disk::root_disk(store, image)?;
    let guest = GuestConfig {
        args: process.args,
        env: process.env,
        cwd: process.cwd,
        uid: process.uid,
        gid: process.gid,
        additional_gids: process.additional_gids,
        hostname,
        read_only: opts.read_only,
        verbose: opts.verbose,
        ..GuestConfig::default()
    };
    let quiet = if opts.verbose { "loglevel=7" } else { "quiet loglevel=1" };
    Ok(PreparedRun { kernel, disk, guest, cmdline: format!("{IMAGE_CMDLINE} {quiet}") })
}

/// The VM's shape and boot options, as a record keeps them (the rest of a run is the image's
/// process, as for a container).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmOptions {
    /// Guest RAM in MiB (default [`DEFAULT_MEMORY_MIB`]).
    pub memory_mib: Option<u32>,
    /// vCPUs (default 1).
    pub vcpus: Option<u8>,
    /// Guest kernel (default: [`default_kernel`]).
    pub kernel: Option<PathBuf>,
    /// Stop the VM after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Where the IOAPIC (and PIC, PIT) are emulated.
    #[serde(default)]
    pub irqchip: IrqChip,
    /// Show the kernel console and the agent's steps on stderr.
    #[serde(default)]
    pub verbose: bool,
    /// Restore the image's warm template (see [`crate::template`]) instead of booting.
    #[serde(default)]
    pub snapshot: bool,
    /// Run the VMM unconfined (`--no-jail`, for debugging): see [`twinbox_microvm::jail`].
    #[serde(default)]
    pub no_jail: bool,
}

impl VmOptions {
    /// How the VMM of an instance whose monitor is this process is confined: by default in a
    /// jail with no directory of the host, as uid [`VMM_ID_BASE`] + the monitor's pid (known
    /// before the VMM starts, and unique while the monitor runs).
    ///
    /// [`VMM_ID_BASE`]: twinbox_microvm::jail::VMM_ID_BASE
    pub fn jail(&self) -> Option<twinbox_microvm::jail::JailConfig> {
        (!self.no_jail).then(|| twinbox_microvm::jail::JailConfig {
            uid: Some(twinbox_microvm::jail::VMM_ID_BASE + std::process::id()),
            ..Default::default()
        })
    }
}

/// The VMM's configuration and the initramfs for a prepared run, with network cards `nets`.
pub fn vm_config(prepared: PreparedRun, shape: &VmOptions, nets: Vec<NetConfig>) -> (VmConfig, Vec<u8>) {
    let initrd = twinbox_microvm::initramfs::build(&prepared.guest);
    let config = VmConfig {
        memory_mib: shape.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
        vcpus: shape.vcpus.unwrap_or(1),
        kernel: prepared.kernel,
        initrd: None,
        cmdline: prepared.cmdline,
        disks: vec![DiskConfig { path: prepared.disk.path.clone(), read_only: true }],
        nets,
        vsock: None,
        timeout_ms: shape.timeout_ms,
        irqchip: shape.irqchip,
    };
    (config, initrd)
}

/// Where the workload's stdout and stderr go.
/// A template's snapshot to restore instead of booting.
#[derive(Debug)]
pub struct Restore<'a> {
    /// The snapshot's directory.
    pub dir: &'a std::path::Path,
    /// The workload's `start` in mailbox bytes (see [`twinbox_microvm::agent::MAILBOX_ADDR`]),
    /// when it fits there; else it goes on the control port once the VM runs.
    pub mailbox: Option<Vec<u8>>,
}

/// Boots (or restores) the VM in a VMM process of its own (`vmm`: the command that starts
/// one, see [`crate::vmm`]), confined by `jail`. `attach` runs once the VM is built and
/// confined, before the guest runs (the instance's network and record); its error stops the
/// VMM. The console's last lines explain a guest that failed.
#[allow(clippy::too_many_arguments)]
pub fn boot<E: From<ImageRunError>>(
    vmm: &[std::ffi::OsString],
    config: VmConfig,
    initrd: Vec<u8>,
    restore: Option<Restore<'_>>,
    start: Instant,
    output: crate::vmm::Output,
    verbose: bool,
    jail: Option<twinbox_microvm::jail::JailConfig>,
    attach: impl FnOnce(ConsoleTail) -> Result<(), E>,
) -> Result<ImageRunExit, E> {
    tracing::debug!(disks = ?config.disks, nets = ?config.nets, "starting microVM");
    let echo: Option<Box<dyn Write + Send>> = if verbose { Some(Box::new(std::io::stderr())) } else { None };
    let shared = ConsoleTail(Arc::new(Mutex::new(ConsoleLog::new(echo))));
    let (restore, mailbox, initrd) = match restore {
        Some(Restore { dir, mailbox }) => (Some(dir.to_path_buf()), mailbox.map(hex::encode), Vec::new()),
        None => (None, None, initrd),
    };
    let request = crate::vmm::Request {
        config,
        initrd_len: initrd.len(),
        restore,
        mailbox,
        snapshot_to: None,
        start_monotonic_ns: crate::vmm::monotonic_of(start),
        jail,
        tee_log: matches!(output, crate::vmm::Output::OursAndLog(_)),
        log_only: matches!(output, crate::vmm::Output::Log(_)),
    };
    let mut process = crate::vmm::spawn(vmm, &request, &initrd, output, shared.clone()).map_err(|e| {
        E::from(ImageRunError::Vmm {
            code: twinbox_exit::INTERNAL,
            message: format!("cannot start the VMM process: {e}"),
        })
    })?;
    drop(initrd);
    let first = process.next_status();
    if first != Some(crate::vmm::Status::Built) {
        let exit = process.finish();
        return Err(ended(first, &mut process, exit, &shared, start).unwrap_err().into());
    }
    tracing::debug!(pid = process.pid(), "VM built and its VMM confined");
    if let Err(e) = attach(shared.clone()) {
        process.kill();
        return Err(e);
    }
    let last = process.next_status();
    let exit = process.finish();
    ended(last, &mut process, exit, &shared, start).map_err(E::from)
}

/// Boots a template's VM in a VMM process of its own (confined by `jail`), pauses it when its
/// agent is ready and has the VMM write its snapshot into the new directory `snapshot_to`
/// (in a directory the jailed VMM may write).
pub(crate) fn make_snapshot(
    vmm: &[std::ffi::OsString],
    config: VmConfig,
    initrd: Vec<u8>,
    snapshot_to: &std::path::Path,
    jail: Option<twinbox_microvm::jail::JailConfig>,
) -> Result<(), ImageRunError> {
    let start = Instant::now();
    let shared = ConsoleTail(Arc::new(Mutex::new(ConsoleLog::new(None))));
    let request = crate::vmm::Request {
        config,
        initrd_len: initrd.len(),
        restore: None,
        mailbox: None,
        snapshot_to: Some(snapshot_to.to_path_buf()),
        start_monotonic_ns: crate::vmm::monotonic_of(start),
        jail,
        tee_log: false,
        log_only: true,
    };
    let null = std::fs::File::create("/dev/null")
        .map_err(|e| ImageRunError::Template(format!("cannot open /dev/null: {e}")))?;
    let mut process = crate::vmm::spawn(vmm, &request, &initrd, crate::vmm::Output::Log(null), shared.clone())
        .map_err(|e| ImageRunError::Template(format!("cannot start the VMM process: {e}")))?;
    let mut last = process.next_status();
    if last == Some(crate::vmm::Status::Built) {
        last = process.next_status();
    }
    let exit = process.finish();
    match last {
        Some(crate::vmm::Status::Ended { reason: crate::vmm::ExitReasonWire::Ready, .. }) => Ok(()),
        last => Err(ended(last, &mut process, exit, &shared, start)
            .err()
            .unwrap_or_else(|| ImageRunError::Template("the template's workload ran instead of waiting".into()))),
    }
}

/// How a run ended, from the VMM's last status.
fn ended(
    last: Option<crate::vmm::Status>,
    process: &mut crate::vmm::Vmm,
    exit: std::io::Result<std::process::ExitStatus>,
    shared: &ConsoleTail,
    start: Instant,
) -> Result<ImageRunExit, ImageRunError> {
    use crate::vmm::Status;
    let total = start.elapsed();
    let console = shared.0.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(line) = console.panic_line() {
        return Err(ImageRunError::Panic { line: line.to_owned(), tail: console.tail() });
    }
    match last {
        Some(Status::Ended { reason, boot_time_ns }) => match ExitReason::from(reason) {
            ExitReason::Exited(code) => {
                Ok(ImageRunExit { code, boot_time: boot_time_ns.map(Duration::from_nanos), total })
            }
            reason => Err(ImageRunError::NoStatus { reason, tail: console.tail() }),
        },
        Some(Status::Timeout { ms }) => Err(ImageRunError::Timeout(Duration::from_millis(ms), console.tail())),
        Some(Status::Interrupted { signal }) => Err(ImageRunError::Interrupted(signal)),
        Some(Status::Failed { code, message }) => Err(ImageRunError::Vmm { code, message }),
        Some(Status::Built) => Err(ImageRunError::Vmm {
            code: twinbox_exit::INTERNAL,
            message: "the VMM process reported twice that it was built".into(),
        }),
        None => Err(ImageRunError::Vmm { code: twinbox_exit::INTERNAL, message: process.silent_end(exit) }),
    }
}

/// The console of a running VM, shared with whoever wants its last lines meanwhile (why a
/// guest never brought its agent up).
#[derive(Clone)]
pub struct ConsoleTail(Arc<Mutex<ConsoleLog>>);

impl ConsoleTail {
    /// The last lines, indented for an error message.
    pub fn tail(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).tail()
    }
}

impl Write for ConsoleTail {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

/// A 64-hex-digit id like a container's, for the image hold and the default hostname.
pub fn run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    for i in 0..4u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
        h.write_u32(std::process::id());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_unique_hex() {
        let (a, b) = (run_id(), run_id());
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn exit_codes() {
        use twinbox_microvm::vstate::vm::KvmVmError;
        assert_eq!(ImageRunError::Store(StoreError::NoSuchImage("x:1".into())).exit_code(), 1);
        assert_eq!(ImageRunError::Disk(DiskError::MkfsMissing).exit_code(), 1);
        assert_eq!(ImageRunError::Vm(VmError::Kvm(KvmVmError::PermissionDenied)).exit_code(), 1);
        assert_eq!(ImageRunError::Timeout(Duration::from_secs(1), String::new()).exit_code(), 125);
        assert_eq!(ImageRunError::Interrupted(2).exit_code(), 130);
    }
}

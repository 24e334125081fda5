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
use twinbox_microvm::vstate::vcpu::VcpuError;
use twinbox_microvm::{ExitReason, VmBuilder, VmError};

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
pub type Output = (Box<dyn Write + Send>, Box<dyn Write + Send>);

/// A template's snapshot to restore instead of booting.
#[derive(Debug)]
pub struct Restore<'a> {
    /// The snapshot's directory.
    pub dir: &'a std::path::Path,
    /// The workload's `start` in mailbox bytes (see [`twinbox_microvm::agent::MAILBOX_ADDR`]),
    /// when it fits there; else it goes on the control port once the VM runs.
    pub mailbox: Option<Vec<u8>>,
}

/// Builds the VM (booting `initrd`, or restoring the snapshot `restore`), calls `attach` (its
/// taps exist from then on, until the VM is dropped), runs it with the workload's output going
/// to `output`, and tells how it ended.
#[allow(clippy::too_many_arguments)] // one call site each; a struct would only rename them
pub fn boot<E: From<ImageRunError>>(
    config: VmConfig,
    initrd: Vec<u8>,
    restore: Option<Restore<'_>>,
    start: Instant,
    output: Output,
    verbose: bool,
    attach: impl FnOnce(ConsoleTail) -> Result<(), E>,
) -> Result<ImageRunExit, E> {
    tracing::debug!(disks = ?config.disks, nets = ?config.nets, "starting microVM");
    let echo: Option<Box<dyn Write + Send>> = if verbose { Some(Box::new(std::io::stderr())) } else { None };
    let shared = ConsoleTail(Arc::new(Mutex::new(ConsoleLog::new(echo))));
    let builder = VmBuilder::new(config).start_time(start).output(output.0, output.1);
    let restored = restore.is_some();
    let builder = match restore {
        Some(Restore { dir, mailbox: Some(bytes) }) => builder.restore(dir).mailbox(bytes),
        Some(Restore { dir, mailbox: None }) => builder.restore(dir),
        None => builder.initrd_bytes(initrd),
    };
    let mut vm = builder.build().map_err(|e| E::from(ImageRunError::from(e)))?;
    tracing::debug!(restored, "VM built");
    attach(shared.clone())?;
    let result = vm.run(&mut shared.clone());
    drop(vm);
    let total = start.elapsed();
    let console = shared.0.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(line) = console.panic_line() {
        return Err(ImageRunError::Panic { line: line.to_owned(), tail: console.tail() }.into());
    }
    let exit = match result {
        Ok(exit) => exit,
        Err(VmError::Vcpu(VcpuError::Timeout(t))) => return Err(ImageRunError::Timeout(t, console.tail()).into()),
        Err(VmError::Vcpu(VcpuError::Interrupted(sig))) => return Err(ImageRunError::Interrupted(sig).into()),
        Err(e) => return Err(ImageRunError::from(e).into()),
    };
    match exit.reason {
        ExitReason::Exited(code) => Ok(ImageRunExit { code, boot_time: exit.boot_time, total }),
        reason => Err(ImageRunError::NoStatus { reason, tail: console.tail() }.into()),
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

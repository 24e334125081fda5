//! From `VmConfig` to a running `Vm`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::legacy::i8042::{I8042Device, I8042_PORT_LEN};
use crate::devices::legacy::ioapic::{IoApic, IOAPIC_MMIO_LEN};
use crate::devices::legacy::serial::{SerialDevice, SharedBuffer, SERIAL_PORT_LEN};
use crate::devices::legacy::{EventFdTrigger, COM1_GSI, COM1_PORT, I8042_PORT};
use crate::devices::pseudo::boot_timer::{BootTimer, BOOT_TIMER_ADDR, BOOT_TIMER_LEN};
use crate::devices::pseudo::exit_port::{ExitPort, EXIT_PORT, EXIT_PORT_LEN};
use crate::devices::pseudo::output_port::{OutputPort, OUTPUT_PORT, OUTPUT_PORT_LEN};
use crate::devices::pseudo::process_start_estimate;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::net::{self, parse_mac, Net, Tap};
use crate::devices::virtio::vsock::{self, Vsock};
use crate::devices::virtio::{mmio_slot, MmioTransport, VIRTIO_MMIO_SIZE};
use crate::devices::Bus;
use crate::jail::ThreadKind;
use crate::loader::Initrd;
use crate::mptable::{ioapic_id, setup_mptable, IO_APIC_DEFAULT_BASE};
use crate::snapshot::{self, CpuIdentity, DeviceStates, Shape, SnapshotError, SnapshotState};
use crate::stub::{STUB_LOAD_ADDR, STUB_STACK};
use crate::vstate::memory::create_guest_memory;
use crate::vstate::snapshot::VmClock;
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{KvmVm, MsiRoutes};
use crate::vstate::watchdog::{RunControl, Watchdog};
use crate::{ExitReason, IrqChip, VmConfig, VmError, VmExit};

/// A network card's transport, shared by the MMIO bus and its receive thread.
type NetTransport = Arc<Mutex<MmioTransport<Net, EventFdTrigger>>>;
/// The socket device's transport, likewise.
type VsockTransport = Arc<Mutex<MmioTransport<Vsock, EventFdTrigger>>>;
/// A disk's transport.
type DiskTransport = Arc<Mutex<MmioTransport<Block, EventFdTrigger>>>;
/// The console UART.
type Serial = Arc<Mutex<SerialDevice<EventFdTrigger, SharedBuffer>>>;

/// Where the workload-output ports write: stdout and stderr.
type OutputWriters = (Box<dyn Write + Send>, Box<dyn Write + Send>);

/// Builds a [`Vm`] from a [`VmConfig`], with the options that are not configuration data.
pub struct VmBuilder {
    config: VmConfig,
    start: Option<Instant>,
    stub: Option<Vec<u8>>,
    irqchip: bool,
    initrd: Option<Vec<u8>>,
    output: Option<OutputWriters>,
    restore: Option<PathBuf>,
    mailbox: Option<Vec<u8>>,
    pause_when_ready: bool,
    jail: Option<crate::jail::JailConfig>,
    jail_report: Option<std::os::fd::RawFd>,
}

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("config", &self.config)
            .field("stub", &self.stub.as_ref().map(Vec::len))
            .field("irqchip", &self.irqchip)
            .field("initrd", &self.initrd.as_ref().map(Vec::len))
            .field("restore", &self.restore)
            .field("pause_when_ready", &self.pause_when_ready)
            .field("jail", &self.jail)
            .finish_non_exhaustive()
    }
}

impl VmBuilder {
    /// A builder for `config`.
    pub fn new(config: VmConfig) -> Self {
        VmBuilder {
            config,
            start: None,
            stub: None,
            irqchip: true,
            initrd: None,
            output: None,
            restore: None,
            mailbox: None,
            pause_when_ready: false,
            jail: None,
            jail_report: None,
        }
    }

    /// Instead of booting: restores the snapshot in `dir` (see [`crate::snapshot`]), which
    /// must be of a VM of this configuration's shape, made by this VMM build on this CPU. The
    /// configuration's kernel, initrd and command line are not used; its disks, taps, MACs and
    /// socket are the new VM's.
    pub fn restore(mut self, dir: impl Into<PathBuf>) -> Self {
        self.restore = Some(dir.into());
        self
    }

    /// With [`restore`](Self::restore): `bytes` (a `start` request, see
    /// [`twinbox_agent::control::mailbox`]) go into the restored memory at
    /// [`twinbox_agent::MAILBOX_ADDR`] before any vCPU runs, where the template's agent reads
    /// them as it resumes.
    pub fn mailbox(mut self, bytes: Vec<u8>) -> Self {
        self.mailbox = Some(bytes);
        self
    }

    /// When the guest agent says it waits for its workload, stop every vCPU and return
    /// [`ExitReason::Ready`] from [`Vm::run`]: the VM can then be snapshotted.
    pub fn pause_when_ready(mut self, pause: bool) -> Self {
        self.pause_when_ready = pause;
        self
    }

    /// Confines this process once the VM is built (everything it needs open) and before any
    /// guest code runs: see [`crate::jail`]. The process must be single-threaded then, and
    /// stays confined; [`Vm::run`]'s threads narrow their system calls to their kind's.
    pub fn jail(mut self, jail: Option<crate::jail::JailConfig>) -> Self {
        self.jail = jail;
        self
    }

    /// [`jail`](Self::jail), with a forbidden call reported on `report` instead of stderr.
    pub fn jail_reporting(mut self, jail: Option<crate::jail::JailConfig>, report: std::os::fd::RawFd) -> Self {
        self.jail = jail;
        self.jail_report = Some(report);
        self
    }

    /// An initramfs built in memory; it replaces `config.initrd`.
    pub fn initrd_bytes(mut self, initrd: Vec<u8>) -> Self {
        self.initrd = Some(initrd);
        self
    }

    /// Where the guest agent's workload output goes (the output ports); default: this
    /// process's stdout and stderr.
    pub fn output(mut self, stdout: Box<dyn Write + Send>, stderr: Box<dyn Write + Send>) -> Self {
        self.output = Some((stdout, stderr));
        self
    }

    /// The instant the boot timer counts from (the VMM process start).
    pub fn start_time(mut self, start: Instant) -> Self {
        self.start = Some(start);
        self
    }

    /// Boots raw flat 32-bit code at [`STUB_LOAD_ADDR`] instead of `config.kernel`.
    pub fn stub(mut self, code: Vec<u8>) -> Self {
        self.stub = Some(code);
        self
    }

    /// With `false`, no interrupt controllers at all (neither `config.irqchip` kind): no
    /// interrupts, any `hlt` is final. Only for stub guests (a Linux kernel needs them).
    pub fn interrupts(mut self, irqchip: bool) -> Self {
        self.irqchip = irqchip;
        self
    }

    /// Creates the VM: memory, KVM VM and vCPUs, devices, the guest loaded. A failure drops
    /// whatever was built so far, which closes its fds and unmaps its memory.
    pub fn build(mut self) -> Result<Vm, VmError> {
        let config = std::mem::take(&mut self.config);
        config.validate()?;
        // Disks first: a missing image is the likeliest mistake and the cheapest to report.
        let disks = config
            .disks
            .iter()
            .map(|d| Block::open(&d.path, d.read_only).map_err(|source| VmError::Disk { path: d.path.clone(), source }))
            .collect::<Result<Vec<_>, _>>()?;
        let nets = config
            .nets
            .iter()
            .map(|n| {
                let mac = n.mac.as_deref().map(parse_mac).transpose()?;
                let tap = Tap::open(&n.tap)?;
                Net::new(tap, mac).map_err(|source| crate::devices::virtio::net::NetError::Tap {
                    name: n.tap.clone(),
                    op: "make the receive eventfd",
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vsock_device = config.vsock.as_ref().map(|v| Vsock::new(v.guest_cid, &v.uds_path)).transpose()?;
        let start = self.start.unwrap_or_else(process_start_estimate);
        let saved = match &self.restore {
            Some(dir) => {
                let state = snapshot::load(dir)?;
                state.check_shape(dir, &config)?;
                tracing::debug!(dir = %dir.display(), "snapshot read and checked");
                Some((dir.as_path(), state))
            }
            None => None,
        };
        let memory = match &saved {
            Some((dir, state)) => snapshot::map_memory(dir, state)?,
            None => create_guest_memory(u64::from(config.memory_mib))?,
        };
        let kvm_vm = KvmVm::new(memory, self.irqchip.then_some(config.irqchip))?;
        kvm_vm.check_vcpu_count(usize::from(config.vcpus))?;
        if let Some((dir, state)) = &saved {
            if kvm_vm.irqchip() != Some(IrqChip::Split) {
                return Err(SnapshotError::KernelIrqChip.into());
            }
            state.check_cpu(dir, &CpuIdentity::of(&kvm_vm.supported_cpuid()?))?;
        }

        let console = SharedBuffer::new();
        let serial_evt = if self.irqchip {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
            kvm_vm.register_irqfd(&evt, COM1_GSI)?;
            Some(evt)
        } else {
            None
        };
        let serial_restore = match (&saved, &serial_evt) {
            (Some(_), Some(evt)) => Some(evt.try_clone().map_err(VmError::EventFd)?),
            _ => None,
        };
        let serial: Serial = Arc::new(Mutex::new(SerialDevice::new(EventFdTrigger(serial_evt), console.clone())));
        let boot_timer = Arc::new(Mutex::new(BootTimer::new(start)));
        let mut pio = Bus::new();
        pio.insert(serial.clone(), COM1_PORT, SERIAL_PORT_LEN)?;
        pio.insert(Arc::new(Mutex::new(I8042Device::new())), I8042_PORT, I8042_PORT_LEN)?;
        pio.insert(Arc::new(Mutex::new(ExitPort)), EXIT_PORT, EXIT_PORT_LEN)?;
        let (stdout, stderr) =
            self.output.take().unwrap_or_else(|| (Box::new(std::io::stdout()), Box::new(std::io::stderr())));
        pio.insert(Arc::new(Mutex::new(OutputPort::new(stdout, stderr))), OUTPUT_PORT, OUTPUT_PORT_LEN)?;
        let mut mmio = Bus::new();
        mmio.insert(boot_timer.clone(), BOOT_TIMER_ADDR, BOOT_TIMER_LEN)?;
        let ioapic = if kvm_vm.irqchip() == Some(IrqChip::Split) {
            let ioapic = Arc::new(Mutex::new(IoApic::new(ioapic_id(config.vcpus), kvm_vm.msi_routes())));
            mmio.insert(ioapic.clone(), u64::from(IO_APIC_DEFAULT_BASE), IOAPIC_MMIO_LEN)?;
            Some(ioapic)
        } else {
            None
        };
        let irq = |gsi: u32| -> Result<EventFdTrigger, VmError> {
            if !self.irqchip {
                return Ok(EventFdTrigger(None));
            }
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::InterruptEventFd { gsi, source })?;
            kvm_vm.register_irqfd(&evt, gsi)?;
            Ok(EventFdTrigger(Some(evt)))
        };
        let disk_count = disks.len();
        let mut disk_transports = Vec::with_capacity(disk_count);
        for (i, disk) in disks.into_iter().enumerate() {
            let (base, gsi) = mmio_slot(i);
            let transport: DiskTransport =
                Arc::new(Mutex::new(MmioTransport::new(disk, irq(gsi)?, kvm_vm.memory().clone())));
            mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
            disk_transports.push(transport);
        }
        let mut net_transports = Vec::with_capacity(nets.len());
        for (i, net) in nets.into_iter().enumerate() {
            let (base, gsi) = mmio_slot(disk_count + i);
            let transport: NetTransport =
                Arc::new(Mutex::new(MmioTransport::new(net, irq(gsi)?, kvm_vm.memory().clone())));
            mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
            // Transmit notifications go to the card's I/O thread through an ioeventfd, as
            // QEMU and Firecracker take them: no exit to this process per kick. Without one
            // (KVM refused it) the vCPU serves them after the exit, as before.
            let tx = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VmError::EventFd)?;
            let notify = base + crate::devices::virtio::mmio::QUEUE_NOTIFY_OFFSET;
            let tx = match kvm_vm.register_ioevent(&tx, notify, net::TX_QUEUE as u32) {
                Ok(()) => Some(tx),
                Err(e) => {
                    tracing::warn!(error = %e, "transmit notifications of eth{i} exit to the VMM");
                    None
                }
            };
            net_transports.push((transport, tx));
        }
        let vsock_transport = match vsock_device {
            Some(device) => {
                let (base, gsi) = mmio_slot(disk_count + net_transports.len());
                let transport: VsockTransport =
                    Arc::new(Mutex::new(MmioTransport::new(device, irq(gsi)?, kvm_vm.memory().clone())));
                mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
                Some(transport)
            }
            None => None,
        };

        let supported = kvm_vm.supported_cpuid()?;
        let vcpus = (0..config.vcpus)
            .map(|id| Vcpu::new(&kvm_vm, &supported, id, config.vcpus))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some((dir, state)) = &saved {
            // The clock, the vCPUs, then the devices: a device restored with an interrupt
            // pending raises it into LAPICs that already hold their saved state.
            state.clock.restore(kvm_vm.fd()).map_err(VmError::Clock)?;
            let amd = state.cpu.model.starts_with("AuthenticAMD");
            for (vcpu, saved) in vcpus.iter().zip(&state.vcpus) {
                vcpu.restore_state(saved, amd)?;
            }
            tracing::debug!("vCPUs restored");
            let invalid = |problem: String| VmError::from(SnapshotError::Invalid { dir: dir.to_path_buf(), problem });
            let d = &state.devices;
            if let Some(evt) = serial_restore {
                let restored = SerialDevice::from_state(&d.serial, EventFdTrigger(Some(evt)), console.clone());
                *serial.lock().unwrap_or_else(|e| e.into_inner()) = restored.map_err(invalid)?;
            }
            if let Some(ioapic) = &ioapic {
                ioapic.lock().unwrap_or_else(|e| e.into_inner()).restore(&d.ioapic).map_err(invalid)?;
            }
            let transports = disk_transports
                .iter()
                .zip(&d.disks)
                .map(|(t, s)| t.lock().unwrap_or_else(|e| e.into_inner()).restore(s))
                .chain(
                    net_transports
                        .iter()
                        .zip(&d.nets)
                        .map(|((t, _), s)| t.lock().unwrap_or_else(|e| e.into_inner()).restore(s)),
                )
                .chain(
                    vsock_transport
                        .iter()
                        .zip(&d.vsock)
                        .map(|(t, s)| t.lock().unwrap_or_else(|e| e.into_inner()).restore(s)),
                );
            for restored in transports {
                restored.map_err(invalid)?;
            }
            if let Some(bytes) = self.mailbox.take() {
                if bytes.len() > twinbox_agent::MAILBOX_LEN {
                    return Err(VmError::MailboxTooLarge { len: bytes.len() });
                }
                let at = GuestAddress(twinbox_agent::MAILBOX_ADDR);
                kvm_vm
                    .memory()
                    .write_slice(&bytes, at)
                    .map_err(|e| invalid(format!("cannot fill the mailbox: {e}")))?;
            }
        } else {
            if self.irqchip {
                for vcpu in &vcpus {
                    vcpu.set_lint()?;
                }
            }
            self.load_guest(&kvm_vm, &vcpus, &config)?;
        }
        if let Some(jail) = &self.jail {
            jail.enter(self.jail_report)?;
            tracing::debug!(uid = jail.vmm_id(), root = %jail.root.display(), "VMM confined");
        }

        Ok(Vm {
            shape: Shape::of(&config),
            pause_when_ready: self.pause_when_ready,
            vcpus,
            pio,
            mmio,
            serial,
            ioapic,
            disks: disk_transports,
            nets: net_transports,
            vsock: vsock_transport,
            console,
            boot_timer,
            timeout: config.timeout(),
            kvm_vm,
        })
    }

    /// Loads the stub or the kernel (with its initrd, command line and MP table) and points
    /// the boot vCPU at its entry.
    fn load_guest(&self, kvm_vm: &KvmVm, vcpus: &[Vcpu], config: &VmConfig) -> Result<(), VmError> {
        match &self.stub {
            Some(code) => {
                kvm_vm
                    .memory()
                    .write_slice(code, GuestAddress(STUB_LOAD_ADDR))
                    .map_err(|_| VmError::StubTooLarge { len: code.len() })?;
                vcpus[0].setup_flat_protected(STUB_LOAD_ADDR, STUB_STACK, 0)?;
            }
            None => {
                let initrd = match (&self.initrd, &config.initrd) {
                    (Some(bytes), _) => Some(Initrd::Bytes(bytes)),
                    (None, Some(path)) => Some(Initrd::File(path)),
                    (None, None) => None,
                };
                let boot =
                    crate::loader::load_linux(kvm_vm.memory(), &config.kernel, initrd, &config.kernel_cmdline())?;
                setup_mptable(kvm_vm.memory(), config.vcpus)?;
                vcpus[0].setup_long_mode(kvm_vm.memory(), boot.entry, boot.boot_params)?;
            }
        }
        Ok(())
    }
}

/// A built microVM. Dropping it closes the vCPU and VM fds and unmaps guest memory.
pub struct Vm {
    shape: Shape,
    pause_when_ready: bool,
    // Field order is drop order: vCPUs before the VM, the VM before its memory (inside).
    vcpus: Vec<Vcpu>,
    pio: Bus,
    mmio: Bus,
    serial: Serial,
    ioapic: Option<Arc<Mutex<IoApic<MsiRoutes>>>>,
    disks: Vec<DiskTransport>,
    nets: Vec<(NetTransport, Option<EventFd>)>,
    vsock: Option<VsockTransport>,
    console: SharedBuffer,
    boot_timer: Arc<Mutex<BootTimer>>,
    timeout: Option<Duration>,
    kvm_vm: KvmVm,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.vcpus.len())
            .field("pio", &self.pio)
            .field("mmio", &self.mmio)
            .finish_non_exhaustive()
    }
}

impl TryFrom<VmConfig> for Vm {
    type Error = VmError;

    fn try_from(config: VmConfig) -> Result<Self, Self::Error> {
        VmBuilder::new(config).build()
    }
}

/// Stops the VM when the vCPU thread holding it unwinds from a panic, so the other vCPUs
/// do not run on until the timeout.
struct StopIfPanicking<'a>(&'a RunControl);

impl Drop for StopIfPanicking<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.stop();
        }
    }
}

impl Vm {
    /// Runs the guest until it stops, copying its console to `console`. Every vCPU runs on a
    /// thread of its own (the application processors wait for the guest's INIT/SIPI in the
    /// in-kernel LAPIC), while the calling thread waits; whichever vCPU ends the VM stops the
    /// others, and so does a vCPU thread that panics.
    pub fn run(&mut self, console: &mut (dyn Write + Send)) -> Result<VmExit, VmError> {
        let control = Arc::new(RunControl::new(self.timeout).with_pause_when_ready(self.pause_when_ready));
        let stop_io = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VmError::EventFd)?);
        let receivers = self
            .nets
            .iter_mut()
            .map(|(t, tx)| {
                let handles =
                    net::RxLoop::new(&t.lock().unwrap_or_else(|e| e.into_inner()), stop_io.clone(), tx.take());
                handles.map(|h| (t.clone(), h))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(VmError::EventFd)?;
        let socket = self.vsock.as_ref().map(|t| {
            let handles = vsock::RxLoop::new(&t.lock().unwrap_or_else(|e| e.into_inner()), stop_io.clone());
            (t.clone(), handles)
        });
        let watchdog = Watchdog::start(control.clone())?;
        let buffer = self.console.clone();
        let mut console_err = None;
        let (pio, mmio) = (&self.pio, &self.mmio);
        let (bsp, aps) = self.vcpus.split_first_mut().expect("a VM has at least one vCPU");
        // In a jailed VMM each thread narrows its system calls to its kind's first (see
        // `jail::seccomp`); a thread that cannot fails as its vCPU would.
        let confined = |kind| crate::jail::seccomp::confine_thread(kind).map_err(|e| VcpuError::Confine(e.to_string()));
        let (bsp_result, ap_results) = std::thread::scope(|scope| {
            for (i, (transport, handles)) in receivers.iter().enumerate() {
                let spawned = std::thread::Builder::new().name(format!("net{i}-rx")).spawn_scoped(scope, move || {
                    if let Err(e) = confined(ThreadKind::Io) {
                        tracing::error!(error = %e, "eth{i} receives nothing");
                        return;
                    }
                    net::rx_loop(transport, handles)
                });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a network receive thread; eth{i} receives nothing");
                }
            }
            if let Some((transport, handles)) = &socket {
                let spawned = std::thread::Builder::new().name("vsock-rx".into()).spawn_scoped(scope, move || {
                    if let Err(e) = confined(ThreadKind::Io) {
                        tracing::error!(error = %e, "the vsock device receives nothing");
                        return;
                    }
                    vsock::rx_loop(transport, handles)
                });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start the vsock receive thread; the guest hears nothing");
                }
            }
            let threads: Vec<_> = aps
                .iter_mut()
                .map(|vcpu| {
                    let control = &*control;
                    let id = vcpu.id();
                    let spawned =
                        std::thread::Builder::new().name(format!("vcpu{id}")).spawn_scoped(scope, move || {
                            let _stop = StopIfPanicking(control);
                            confined(ThreadKind::Vcpu)?;
                            vcpu.run(pio, mmio, control, &mut || {})
                        });
                    (id, spawned)
                })
                .collect();
            let console_err = &mut console_err;
            let mut forward = move || {
                if console_err.is_none() {
                    if let Err(e) = buffer.drain_to(console) {
                        *console_err = Some(e);
                    }
                }
            };
            // The boot vCPU on a thread of its own too (confined as a vCPU), so this thread,
            // whose calls a template's snapshot needs, runs no guest-driven code.
            let control_bsp = &*control;
            let bsp_thread = std::thread::Builder::new().name("vcpu0".into()).spawn_scoped(scope, move || {
                let _stop = StopIfPanicking(control_bsp);
                let result = confined(ThreadKind::Vcpu).and_then(|()| bsp.run(pio, mmio, control_bsp, &mut forward));
                control_bsp.stop();
                forward();
                result
            });
            let bsp_result = match bsp_thread {
                Ok(handle) => handle.join().unwrap_or(Err(VcpuError::Panicked(0))),
                Err(e) => {
                    control.stop();
                    Err(VcpuError::Watchdog(e))
                }
            };
            if let Err(e) = stop_io.write(1) {
                tracing::warn!(error = %e, "cannot stop the network receive threads");
            }
            let ap_results: Vec<Result<Option<ExitReason>, VcpuError>> = threads
                .into_iter()
                .map(|(id, t)| match t {
                    Ok(handle) => handle.join().unwrap_or(Err(VcpuError::Panicked(id))),
                    Err(e) => Err(VcpuError::Watchdog(e)),
                })
                .collect();
            (bsp_result, ap_results)
        });
        watchdog.stop();
        if let Some(e) = console_err {
            return Err(VmError::Console(e));
        }
        // The boot vCPU's answer, unless another vCPU ended the VM (then the boot vCPU only
        // saw the stop) or failed.
        let mut reason = bsp_result?;
        for r in ap_results {
            match r {
                Ok(Some(s)) if reason.is_none() => reason = Some(s),
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let Some(reason) = reason else {
            return Err(VmError::Vcpu(VcpuError::UnexpectedExit { id: 0, exit: "stop without a reason" }));
        };
        let timer = self.boot_timer.lock().unwrap_or_else(|e| e.into_inner());
        tracing::debug!(%reason, "VM stopped");
        Ok(VmExit { reason, boot_time: timer.boot_time(), boot_signals: timer.signals() })
    }

    /// Writes a snapshot of this VM to the new directory `dir` (see [`crate::snapshot`]): only
    /// while it is stopped, after [`Vm::run`] returned ([`ExitReason::Ready`], for a template).
    /// The snapshot appears whole or not at all.
    pub fn snapshot(&mut self, dir: &Path) -> Result<(), VmError> {
        let (Some(IrqChip::Split), Some(ioapic)) = (self.kvm_vm.irqchip(), &self.ioapic) else {
            return Err(SnapshotError::KernelIrqChip.into());
        };
        let tmp = snapshot::start(dir)?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for vcpu in &mut self.vcpus {
            vcpu.settle()?;
            vcpus.push(vcpu.save_state()?);
        }
        let clock = VmClock::save(self.kvm_vm.fd()).map_err(VmError::Clock)?;
        let lock = |t: &DiskTransport| t.lock().unwrap_or_else(|e| e.into_inner()).state();
        let devices = DeviceStates {
            serial: self.serial.lock().unwrap_or_else(|e| e.into_inner()).state(),
            ioapic: ioapic.lock().unwrap_or_else(|e| e.into_inner()).state(),
            disks: self.disks.iter().map(lock).collect(),
            nets: self.nets.iter().map(|(t, _)| t.lock().unwrap_or_else(|e| e.into_inner()).state()).collect(),
            vsock: self.vsock.as_ref().map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).state()),
        };
        let (memory_sha256, memory) =
            snapshot::write_memory(self.kvm_vm.memory(), &tmp.path().join(snapshot::MEMORY_FILE))?;
        let state = SnapshotState {
            format: snapshot::FORMAT_VERSION,
            vmm: snapshot::VMM_BUILD.to_owned(),
            cpu: CpuIdentity::of(&self.kvm_vm.supported_cpuid()?),
            shape: self.shape.clone(),
            memory,
            clock,
            vcpus,
            devices,
        };
        snapshot::finish(tmp.path(), dir, &state, &memory_sha256)?;
        tmp.into_done();
        Ok(())
    }

    /// The guest memory size in bytes.
    pub fn memory_bytes(&self) -> u64 {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.kvm_vm.memory().iter().map(|r| r.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskConfig;

    #[test]
    fn missing_disk_is_named_before_kvm_is_touched() {
        let config = VmConfig {
            disks: vec![DiskConfig { path: "/nonexistent/twinbox/root.img".into(), read_only: true }],
            ..VmConfig::default()
        };
        let err = VmBuilder::new(config).stub(vec![0xf4]).build().unwrap_err();
        assert!(matches!(&err, VmError::Disk { path, .. } if path.ends_with("root.img")), "{err:?}");
        assert_eq!(err.to_string(), "cannot attach disk /nonexistent/twinbox/root.img");
        let source = std::error::Error::source(&err).unwrap();
        assert_eq!(source.to_string(), "cannot open the disk image");
    }
}

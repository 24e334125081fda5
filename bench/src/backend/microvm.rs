//! The microVM backends. Every one boots the same guest: the kernel of
//! scripts/build-guest-kernel.sh, an initramfs with twinbox's guest agent and the run's
//! configuration, and the image's ext4 root disk (all from `twinbox_engine::microvm`).
//!
//! - `twinbox-microvm`: `twinbox run --isolation microvm IMAGE …`, the CLI being measured.
//! - `twinbox-microvm-snapshot`: the same with `--snapshot`: each run restores the image's
//!   warm template (a snapshot of its VM booted to where the agent waits for a workload, made
//!   while preparing, not measured) instead of booting the kernel.
//! - `qemu-microvm`: QEMU `-M microvm` with KVM, the same kernel, initramfs and disk; the agent's
//!   exit status ends QEMU through `isa-debug-exit` at the same port (QEMU exits with
//!   `status * 2 + 1`), and the workload's output reaches QEMU's serial console through the
//!   agent's `twinbox.console` mirror (QEMU has nothing at twinbox's output ports).
//! - `firecracker`: listed with the reason when it is not installed (Debian does not package it).
//!
//! Readiness of a background instance: for twinbox the VMM's boot-timer line (the guest wrote
//! the boot-timer byte just before exec'ing the workload), for QEMU the agent's "exec'd" line.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use twinbox_engine::volume::{Driver, Volumes};

use twinbox_engine::microvm::{default_kernel, prepare, run_id, ImageRunOptions, DEFAULT_MEMORY_MIB};
use twinbox_image::launch::Overrides;
use twinbox_image::Store;

use super::{
    own_process_group, Backend, BackendError, Instance, Isolation, PreparedImage, Publish, Unavailable, Workload,
};
use crate::host::{detect_virtualization, which, VirtKind};

/// How long a background microVM may take to start its workload (nested TCG is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Why KVM guests cannot be measured on this host, if they cannot.
fn kvm_problem() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    match detect_virtualization(Path::new("/"), &cpuinfo).kind {
        VirtKind::HardwareKvm | VirtKind::NestedTcg => None,
        VirtKind::Pvm => Some(
            "no hardware KVM: /dev/kvm is PVM (kvm_pvm loaded), which cannot boot a stock Linux guest; \
             scripts/nested-bench.sh measures the microVMs in a nested L1"
                .into(),
        ),
        VirtKind::None => Some("no /dev/kvm on this host".into()),
    }
}

fn kernel_problem(kernel: &Path) -> Option<String> {
    (!kernel.is_file()).then(|| {
        format!(
            "no guest kernel at {} (scripts/build-guest-kernel.sh builds it; or set TWINBOX_KERNEL)",
            kernel.display()
        )
    })
}

fn reasons(r: Vec<String>) -> Result<(), Unavailable> {
    if r.is_empty() {
        Ok(())
    } else {
        Err(Unavailable::new(r.join("; ")))
    }
}

/// Reads `child`'s stream line by line until one contains `needle`; then keeps draining it in
/// the background so the child never blocks on a full pipe. On end of stream or timeout, the
/// last lines it printed, for the error.
fn wait_for_line(stream: impl Read + Send + 'static, needle: &'static str) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stream);
        let mut line = String::new();
        let mut last: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        let mut found = false;
        loop {
            line.clear();
            match lines.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if !found && line.contains(needle) => {
                    found = true;
                    let _ = tx.send(Ok(()));
                }
                Ok(_) if !found => {
                    last.push_back(line.trim_end().to_owned());
                    if last.len() > 8 {
                        last.pop_front();
                    }
                }
                Ok(_) => {}
            }
        }
        if !found {
            let _ = tx.send(Err(Vec::from(last).join(" | ")));
        }
    });
    match rx.recv_timeout(BOOT_TIMEOUT) {
        Ok(r) => r,
        Err(_) => Err(format!("nothing within {} s", BOOT_TIMEOUT.as_secs())),
    }
}

/// Stops a VMM child: SIGTERM (twinbox stops its guest and cleans up; QEMU quits), then
/// SIGKILL if it lingers.
fn stop_child(child: &mut Child) -> Result<(), BackendError> {
    if child.try_wait().ok().flatten().is_some() {
        return Ok(());
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    for _ in 0..500 {
        if child.try_wait().ok().flatten().is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait().map_err(|source| BackendError::Spawn { what: "wait for a VMM".into(), source })?;
    Ok(())
}

fn launch_failed(what: &str, child: &mut Child, output: String) -> BackendError {
    let _ = child.kill();
    let status = child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
    BackendError::Failed {
        what: what.to_owned(),
        status,
        stderr: format!("the guest did not start its workload; last output: {output}"),
    }
}

/// `twinbox run --isolation microvm`, booted or (`snapshot`) restored from a template.
#[derive(Debug)]
pub struct TwinboxMicrovm {
    exe: PathBuf,
    kernel: PathBuf,
    image: Option<PreparedImage>,
    snapshot: bool,
}

impl TwinboxMicrovm {
    /// `exe`: the `twinbox` binary to measure.
    pub fn new(exe: &Path) -> Self {
        TwinboxMicrovm { exe: exe.to_owned(), kernel: default_kernel(), image: None, snapshot: false }
    }

    /// Runs restored from the image's warm template (`run --snapshot`).
    pub fn snapshot(exe: &Path) -> Self {
        TwinboxMicrovm { snapshot: true, ..TwinboxMicrovm::new(exe) }
    }

    fn twinbox(&self, workload: &Workload, verbose: bool) -> Command {
        // Loopback only and removed when it ends, as the container backends' runs.
        self.twinbox_with(workload, verbose, &["--rm", "--network", "none"])
    }

    /// `twinbox [-v] run FLAGS --isolation microvm …` of `workload`.
    fn twinbox_with(&self, workload: &Workload, verbose: bool, flags: &[&str]) -> Command {
        let image = self.image.as_ref().expect("prepare() before use");
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--root").arg(&image.store_root).env_remove("RUST_LOG");
        if verbose {
            cmd.arg("-v");
        }
        cmd.arg("run").args(flags).args(["--isolation", "microvm", "--kernel"]).arg(&self.kernel);
        if self.snapshot {
            cmd.arg("--snapshot");
        }
        if let Workload::Disk { volume: true, .. } = workload {
            cmd.arg("-v").arg(format!("{VM_DISK_VOLUME}:{}", super::DISK_VOLUME_PATH));
        }
        cmd.arg("--memory").arg(format!("{DEFAULT_MEMORY_MIB}m"));
        cmd.arg(&image.reference).args(workload.args());
        own_process_group(&mut cmd);
        cmd
    }
}

impl Backend for TwinboxMicrovm {
    fn name(&self) -> &'static str {
        if self.snapshot {
            "twinbox-microvm-snapshot"
        } else {
            "twinbox-microvm"
        }
    }

    fn host_surface_probe(&self) -> Option<Result<Command, BackendError>> {
        // The VMM jailed as `twinbox run` jails it, probing as each of its thread kinds.
        let mut cmd = Command::new(&self.exe);
        cmd.args(["microvm-vmm", "--probe"]);
        Some(Ok(cmd))
    }

    fn emulated_devices(&self) -> &'static [&'static str] {
        &["8250 UART", "i8042", "I/O APIC", "virtio-blk", "virtio-vsock", "boot timer", "exit port", "output ports"]
    }

    fn isolation(&self) -> Isolation {
        Isolation::MicroVm
    }

    fn available(&self) -> Result<(), Unavailable> {
        let mut r = Vec::new();
        if !self.exe.exists() {
            r.push(format!("{} does not exist", self.exe.display()));
        }
        r.extend(kernel_problem(&self.kernel));
        r.extend(kvm_problem());
        reasons(r)
    }

    fn version(&self) -> Option<String> {
        crate::host::tool_version(&self.exe)
    }

    fn note(&self) -> Option<String> {
        if self.snapshot {
            return Some(format!(
                "`twinbox run --rm --network none --isolation microvm --snapshot --memory {DEFAULT_MEMORY_MIB}m IMAGE …`: \
                 the VM of twinbox-microvm restored from the image's warm template (its memory file mapped \
                 privately, pages loaded on first touch and shared between VMs; the agent handed the workload \
                 over vsock); the templates (with and without a network card) made once, before measuring"
            ));
        }
        Some(format!(
            "`twinbox run --rm --network none --isolation microvm --memory {DEFAULT_MEMORY_MIB}m IMAGE …`: 1 vCPU, kernel {}, \
             the agent's initramfs, the image's ext4 disk (made once, before measuring)",
            self.kernel.display()
        ))
    }

    fn prepare(&mut self, image: &PreparedImage) -> Result<(), BackendError> {
        // The root disk is made once per image and cached; make it now so no measured run
        // pays for mkfs.
        ensure_disk(image)?;
        self.image = Some(image.clone());
        if self.snapshot {
            // The templates, so no measured run pays for one: without a network card (the
            // foreground runs) and with one (the servers, on the default network).
            for flags in [&["--rm", "--network", "none"][..], &["--rm"]] {
                super::run_quiet(
                    self.twinbox_with(&Workload::True, false, flags),
                    "twinbox run --snapshot (template)",
                )?;
            }
        }
        Ok(())
    }

    fn run_command(&self, workload: &Workload, _id: &str) -> Result<Command, BackendError> {
        if let Workload::Disk { volume: true, .. } = workload {
            let image = self.image.as_ref().expect("prepare() before use");
            vm_disk_volume(&image.store_root)?;
        }
        Ok(self.twinbox(workload, false))
    }

    fn disk_note(&self) -> String {
        if self.snapshot {
            return "the guest's root: the image's disk under a tmpfs overlay, so in the guest's memory; no volume: \
                    a template VM has no volume disks, so `--snapshot` refuses -v"
                .into();
        }
        "the guest's root: the image's disk under a tmpfs overlay, so in the guest's memory; a named disk volume \
         (a sparse ext4 file of the host, a virtio-blk disk of the VM)"
            .into()
    }

    fn disk_cleanup(&self) {
        if let Some(image) = &self.image {
            let _ = Volumes::new(&image.store_root).remove(VM_DISK_VOLUME, &[]);
        }
    }

    fn launch(&self, workload: &Workload, id: &str) -> Result<Instance, BackendError> {
        let mut cmd = self.twinbox(workload, true);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| BackendError::Spawn { what: "twinbox run".into(), source })?;
        let stderr = child.stderr.take().expect("stderr is piped");
        // The VMM logs the boot timer (at -v) the moment the guest writes its byte.
        if let Err(output) = wait_for_line(stderr, "Guest-boot-time") {
            return Err(launch_failed("twinbox run --isolation microvm", &mut child, output));
        }
        Ok(Instance { id: id.to_owned(), child: Some(child) })
    }

    fn teardown(&self, instance: &mut Instance) -> Result<(), BackendError> {
        match instance.child.as_mut() {
            Some(child) => stop_child(child),
            // A detached server (`launch_server`).
            None => {
                let image = self.image.as_ref().expect("prepare() before use");
                let mut cmd = Command::new(&self.exe);
                cmd.arg("--root").arg(&image.store_root).args(["rm", "-f", &instance.id]);
                super::run_quiet(cmd, "twinbox rm -f")
            }
        }
    }

    fn serves(&self) -> bool {
        true
    }

    fn launch_server(&self, id: &str, host_port: u16) -> Result<Option<Instance>, BackendError> {
        let publish = format!("127.0.0.1:{host_port}:{}", super::SERVER_PORT);
        let mut cmd =
            self.twinbox_with(&Workload::Serve(super::SERVER_PORT), false, &["-d", "-p", &publish, "--name", id]);
        cmd.stdin(Stdio::null());
        super::run_quiet(cmd, "twinbox run -d -p --isolation microvm")?;
        Ok(Some(Instance { id: id.to_owned(), child: None }))
    }

    fn exec_command(&self, id: &str) -> Option<Command> {
        let image = self.image.as_ref().expect("prepare() before use");
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--root").arg(&image.store_root).args(["exec", id, "/hello", "exit", "0"]);
        Some(cmd)
    }

    fn launch_image(&self, id: &str, publish: Option<Publish>) -> Result<Option<Instance>, BackendError> {
        let mut flags = vec!["-d".to_owned(), "--name".to_owned(), id.to_owned()];
        flags.extend(super::twinbox::publish_flags(publish));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let mut cmd = self.twinbox_with(&Workload::Own, false, &flags);
        cmd.stdin(Stdio::null());
        super::run_quiet(cmd, "twinbox run -d --isolation microvm")?;
        Ok(Some(Instance { id: id.to_owned(), child: None }))
    }

    fn output_path(&self, instance: &Instance) -> Option<PathBuf> {
        super::twinbox::log_path(&self.image.as_ref()?.store_root, &instance.id)
    }

    fn instance_pids(&self, instance: &Instance) -> Vec<u32> {
        match (&instance.child, &self.image) {
            (Some(c), _) => [c.id()].into_iter().filter(|&p| crate::host::running(p)).collect(),
            (None, Some(image)) => super::twinbox::record_pids(&image.store_root, &instance.id),
            (None, None) => Vec::new(),
        }
    }

    fn serve_note(&self) -> String {
        "`twinbox run -d -p 127.0.0.1:PORT:8080 --isolation microvm` on the default bridge network: a virtio-net \
         card on a tap on the bridge (MTU 65520 within the host), DNAT as for containers"
            .into()
    }

    fn run_published(&self, id: &str, host_port: u16) -> Result<Option<Duration>, BackendError> {
        let publish = format!("127.0.0.1:{host_port}:{}", super::SERVER_PORT);
        let cmd = self.twinbox_with(&Workload::True, false, &["--rm", "-p", &publish, "--name", id]);
        super::timed(cmd, "twinbox run --rm -p --isolation microvm").map(Some)
    }
}

/// A failure of `what` (preparing a guest of the image), with its whole cause chain.
fn failed(what: String) -> impl Fn(&dyn std::error::Error) -> BackendError {
    move |e| BackendError::Failed {
        what: what.clone(),
        status: "error".into(),
        stderr: crate::scenario::error_chain(e),
    }
}

/// The image's store and manifest, for the steps that prepare a guest of it.
fn open_image(image: &PreparedImage, what: &str) -> Result<(Store, twinbox_image::Image), BackendError> {
    let fail = failed(format!("{what} of {}", image.reference));
    let store = Store::open(&image.store_root).map_err(|e| fail(&e))?;
    let resolved = store.resolve(&image.reference).map_err(|e| fail(&e))?;
    Ok((store, resolved))
}

fn ensure_disk(image: &PreparedImage) -> Result<twinbox_image::disk::RootDisk, BackendError> {
    let (store, resolved) = open_image(image, "root disk")?;
    twinbox_image::disk::root_disk(&store, &resolved)
        .map_err(|e| failed(format!("root disk of {}", image.reference))(&e))
}

/// QEMU `-M microvm` booting the same guest.
#[derive(Debug)]
pub struct QemuMicrovm {
    kernel: PathBuf,
    image: Option<PreparedImage>,
    /// Servers of the net scenario: instance id → the name their address and rules are
    /// held under.
    served: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

impl Default for QemuMicrovm {
    fn default() -> Self {
        QemuMicrovm { kernel: default_kernel(), image: None, served: Default::default() }
    }
}

/// The disk volume the microVM backends mount for the `disk` scenario (one VM at a time).
const VM_DISK_VOLUME: &str = "twinbox-bench-disk";

/// Its ext4 file, the volume made (sparse, [`super::DISK_VOLUME_SIZE`]) if missing.
fn vm_disk_volume(store_root: &std::path::Path) -> Result<PathBuf, BackendError> {
    let vols = Volumes::new(store_root);
    vols.create(VM_DISK_VOLUME, Driver::Disk, Some(super::DISK_VOLUME_SIZE))
        .map_err(|e| failed("the disk scenario's volume".into())(&e))?;
    Ok(vols.disk_path(VM_DISK_VOLUME))
}

/// A QEMU guest's place on a twinbox network (the net scenario's server).
struct GuestNet {
    tap: String,
    mac: String,
    network: twinbox_microvm::agent::GuestNetwork,
    hosts: String,
}

impl QemuMicrovm {
    /// The initramfs for `workload` (written once per distinct workload) and the disk and
    /// command line, from the same preparation as twinbox's own run.
    fn guest(
        &self,
        workload: &Workload,
        verbose: bool,
        net: Option<&GuestNet>,
    ) -> Result<(PathBuf, PathBuf, String), BackendError> {
        let image = self.image.as_ref().expect("prepare() before use");
        let (store, resolved) = open_image(image, "a guest")?;
        let fail = failed(format!("a guest of {}", image.reference));
        let opts = ImageRunOptions {
            image: image.reference.clone(),
            overrides: Overrides { cmd: workload.args(), ..Overrides::default() },
            kernel: Some(self.kernel.clone()),
            ..ImageRunOptions::default()
        };
        let mut prepared = prepare(&store, &resolved, &opts, &run_id()).map_err(|e| fail(&e))?;
        prepared.guest.verbose = verbose;
        if let Workload::Disk { volume: true, .. } = workload {
            prepared.guest.volumes.push(twinbox_microvm::agent::GuestVolume {
                device: "/dev/vdb".into(),
                target: super::DISK_VOLUME_PATH.into(),
                read_only: false,
            });
        }
        let args = workload.args().join("-").replace('/', "_");
        let mut name = format!("qemu-initrd-{args}{}", if verbose { "-v" } else { "" });
        if let Some(n) = net {
            prepared.guest.network = Some(n.network.clone());
            prepared.guest.hosts = n.hosts.clone();
            name.push_str(&format!("-net-{}", n.network.address));
        }
        name.push_str(".cpio");
        let initrd = image.work.join(name);
        if !initrd.exists() {
            let bytes = twinbox_microvm::initramfs::build(&prepared.guest);
            std::fs::write(&initrd, bytes).map_err(|source| BackendError::Write { path: initrd.clone(), source })?;
        }
        Ok((initrd, prepared.disk.path, format!("{} twinbox.console", prepared.cmdline)))
    }

    /// `workload` in QEMU with a virtio-net card on a tap on twinbox's default bridge: an
    /// address from the same IPAM and the same DNAT for 127.0.0.1:`publish.host` as
    /// twinbox-microvm, so the two VMMs differ only in themselves. The serial console (the
    /// workload's output, mirrored by the agent) and QEMU's complaints go to `output`, else
    /// nowhere.
    fn serve(
        &self,
        workload: &Workload,
        id: &str,
        publish: Publish,
        output: Option<std::fs::File>,
    ) -> Result<Instance, BackendError> {
        use twinbox_engine::network::{attach, publish, Networks, DEFAULT_NETWORK};
        let image = self.image.as_ref().expect("prepare() before use");
        let fail = |what: &str| {
            let what = what.to_owned();
            move |e: &dyn std::error::Error| failed(what.clone())(e)
        };
        let nets = Networks::new(&image.store_root);
        let network = nets.get_or_create_default(DEFAULT_NETWORK).map_err(|e| fail("the bench's network")(&e))?;
        nets.ensure_bridge(&network).map_err(|e| fail("the bench's network")(&e))?;
        let holder = format!("qemu-{id}");
        // Nothing else is gone: addresses of others are not this backend's to free.
        let (network, ip) = nets.allocate(&network.name, &holder, |_| false).map_err(|e| fail("an address")(&e))?;
        self.served.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_owned(), holder.clone());
        let mut endpoint = attach::Endpoint::new(&network, ip, &holder);
        endpoint.host_veth = format!("tbq{}", &run_id()[..8]);
        let net = GuestNet {
            tap: endpoint.host_veth.clone(),
            mac: attach::mac_text(attach::mac_for(ip)),
            network: endpoint.guest_network(),
            hosts: attach::hosts_file("qemu", Some(ip)),
        };
        let mut cmd = self.qemu_on(workload, false, id, Some(&net))?;
        let spawn_err = |source| BackendError::Spawn { what: "qemu".into(), source };
        let (out, err) = match output {
            Some(f) => (Stdio::from(f.try_clone().map_err(spawn_err)?), Stdio::from(f)),
            None => (Stdio::null(), Stdio::null()),
        };
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().map_err(spawn_err)?;
        let mut instance = Instance { id: id.to_owned(), child: Some(child) };
        // QEMU makes the tap as it starts: on the bridge once it is there.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let attached = loop {
            match attach::connect_tap(&endpoint, &network.bridge) {
                Ok(()) => break Ok(()),
                Err(e) if std::time::Instant::now() > deadline => break Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let published = attached.map_err(|e| fail("the tap on the bridge")(&e)).and_then(|()| {
            let port = twinbox_engine::network::publish::PortMapping {
                host_ip: Some(std::net::Ipv4Addr::LOCALHOST.into()),
                host_port: publish.host,
                container_port: publish.port,
                udp: false,
            };
            publish::forward_ports(&image.store_root, &holder, ip, &[port], |_| false)
                .map_err(|e| fail("forwarding the port")(&e))
        });
        if let Err(e) = published {
            let _ = self.teardown(&mut instance);
            return Err(e);
        }
        Ok(instance)
    }

    /// Where the serial console of instance `id` of [`launch_image`](Backend::launch_image)
    /// goes.
    fn output_file(&self, id: &str) -> PathBuf {
        let image = self.image.as_ref().expect("prepare() before use");
        image.work.join(format!("qemu-{id}.out"))
    }

    fn qemu(&self, workload: &Workload, verbose: bool, name: &str) -> Result<Command, BackendError> {
        self.qemu_on(workload, verbose, name, None)
    }

    /// [`qemu`](Self::qemu), with a virtio-net card on tap `net.tap` when given.
    fn qemu_on(
        &self,
        workload: &Workload,
        verbose: bool,
        name: &str,
        net: Option<&GuestNet>,
    ) -> Result<Command, BackendError> {
        let (initrd, disk, cmdline) = self.guest(workload, verbose, net)?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off", "-accel", "kvm", "-cpu", "host"])
            .args(["-m", &format!("{DEFAULT_MEMORY_MIB}M"), "-smp", "1", "-name", name])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-drive")
            .arg(format!("id=root,file={},format=raw,if=none,readonly=on", disk.display()))
            .args(["-device", "virtio-blk-device,drive=root"])
            .args(["-device", "isa-debug-exit,iobase=0x501,iosize=4"])
            .args(["-append", &cmdline]);
        if let Workload::Disk { volume: true, .. } = workload {
            let image = self.image.as_ref().expect("prepare() before use");
            let disk = vm_disk_volume(&image.store_root)?;
            cmd.arg("-drive").arg(format!("id=vol,file={},format=raw,if=none", disk.display()));
            cmd.args(["-device", "virtio-blk-device,drive=vol"]);
        }
        if let Some(n) = net {
            cmd.arg("-netdev")
                .arg(format!("tap,id=n0,ifname={},script=no,downscript=no,vhost=off", n.tap))
                .arg("-device")
                .arg(format!("virtio-net-device,netdev=n0,mac={}", n.mac));
        }
        own_process_group(&mut cmd);
        Ok(cmd)
    }
}

impl Backend for QemuMicrovm {
    fn name(&self) -> &'static str {
        "qemu-microvm"
    }

    fn host_surface_probe(&self) -> Option<Result<Command, BackendError>> {
        // QEMU runs here as a plain root process without -sandbox: the probe, run so, reaches
        // what it reaches.
        let image = self.image.as_ref()?;
        let mut cmd = Command::new(image.workload_on_host());
        cmd.arg("isolation");
        Some(Ok(cmd))
    }

    fn emulated_devices(&self) -> &'static [&'static str] {
        &["8250 UART", "i8259 PIC", "I/O APIC", "i8254 PIT", "isa-debug-exit", "virtio-blk", "fw_cfg"]
    }

    fn isolation(&self) -> Isolation {
        Isolation::MicroVm
    }

    fn available(&self) -> Result<(), Unavailable> {
        let mut r = Vec::new();
        if which("qemu-system-x86_64").is_none() {
            r.push("qemu-system-x86_64 not on PATH (apt-get install qemu-system-x86)".to_owned());
        }
        r.extend(kernel_problem(&self.kernel));
        r.extend(kvm_problem());
        reasons(r)
    }

    fn version(&self) -> Option<String> {
        let out = Command::new("qemu-system-x86_64").arg("--version").output().ok()?;
        String::from_utf8_lossy(&out.stdout).lines().next().map(str::to_owned)
    }

    fn note(&self) -> Option<String> {
        Some(format!(
            "QEMU `-M microvm -accel kvm -cpu host -m {DEFAULT_MEMORY_MIB}M`, the same kernel, agent initramfs and \
             ext4 disk; status through isa-debug-exit (QEMU exits 2×status+1), output through the serial console"
        ))
    }

    fn prepare(&mut self, image: &PreparedImage) -> Result<(), BackendError> {
        ensure_disk(image)?;
        self.image = Some(image.clone());
        Ok(())
    }

    fn run_command(&self, workload: &Workload, id: &str) -> Result<Command, BackendError> {
        // `sh -c` maps isa-debug-exit's 2×status+1 back to the workload's status, so a clean
        // run is a success like every other backend's.
        let qemu = self.qemu(workload, false, id)?;
        let mut words: Vec<String> = vec![qemu.get_program().to_string_lossy().into_owned()];
        words.extend(qemu.get_args().map(|a| a.to_string_lossy().into_owned()));
        let quoted: Vec<String> = words.iter().map(|w| format!("'{}'", w.replace('\'', "'\\''"))).collect();
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!("{}; s=$?; [ $((s % 2)) -eq 1 ] && exit $((s / 2)); exit 125", quoted.join(" ")));
        own_process_group(&mut cmd);
        Ok(cmd)
    }

    fn launch(&self, workload: &Workload, id: &str) -> Result<Instance, BackendError> {
        // The workload's number is QEMU's -name, so the memory scenario finds the process.
        let marker = match workload {
            Workload::Sleep(n) => n.to_string(),
            _ => id.to_owned(),
        };
        let mut cmd = self.qemu(workload, true, &marker)?;
        let spawn_err = |source| BackendError::Spawn { what: "qemu".into(), source };
        // QEMU's own complaints go to an unnamed file, kept for the error.
        let mut errors = tempfile::tempfile().map_err(spawn_err)?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(errors.try_clone().map_err(spawn_err)?);
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let stdout = child.stdout.take().expect("stdout is piped");
        if let Err(output) = wait_for_line(stdout, "exec'd") {
            use std::io::Seek;
            let mut said = String::new();
            let _ = errors.rewind().and_then(|()| errors.read_to_string(&mut said));
            return Err(launch_failed(
                "qemu-system-x86_64 -M microvm",
                &mut child,
                format!("{output} {}", said.trim()),
            ));
        }
        Ok(Instance { id: id.to_owned(), child: Some(child) })
    }

    fn teardown(&self, instance: &mut Instance) -> Result<(), BackendError> {
        let stopped = match instance.child.as_mut() {
            Some(child) => stop_child(child),
            None => Ok(()),
        };
        let holder = self.served.lock().unwrap_or_else(|e| e.into_inner()).remove(&instance.id);
        if let Some(holder) = holder {
            let image = self.image.as_ref().expect("prepare() before use");
            let _ = twinbox_engine::network::Networks::new(&image.store_root).release(&holder);
            let _ = twinbox_engine::network::publish::unforward(&holder);
        }
        stopped
    }

    fn serves(&self) -> bool {
        true
    }

    fn launch_server(&self, id: &str, host_port: u16) -> Result<Option<Instance>, BackendError> {
        let publish = Publish { host: host_port, port: super::SERVER_PORT };
        self.serve(&Workload::Serve(super::SERVER_PORT), id, publish, None).map(Some)
    }

    fn launch_image(&self, id: &str, publish: Option<Publish>) -> Result<Option<Instance>, BackendError> {
        let path = self.output_file(id);
        let output = std::fs::File::create(&path).map_err(|source| BackendError::Write { path, source })?;
        if let Some(p) = publish {
            return self.serve(&Workload::Own, id, p, Some(output)).map(Some);
        }
        let spawn_err = |source| BackendError::Spawn { what: "qemu".into(), source };
        let mut cmd = self.qemu(&Workload::Own, false, id)?;
        cmd.stdin(Stdio::null()).stdout(output.try_clone().map_err(spawn_err)?).stderr(output);
        let child = cmd.spawn().map_err(spawn_err)?;
        Ok(Some(Instance { id: id.to_owned(), child: Some(child) }))
    }

    fn output_path(&self, instance: &Instance) -> Option<PathBuf> {
        self.image.as_ref().map(|_| self.output_file(&instance.id))
    }

    fn disk_note(&self) -> String {
        "the guest's root: the image's disk under a tmpfs overlay, so in the guest's memory; the same ext4 disk \
         volume as twinbox-microvm's, a second virtio-blk disk"
            .into()
    }

    fn disk_cleanup(&self) {
        if let Some(image) = &self.image {
            let _ = Volumes::new(&image.store_root).remove(VM_DISK_VOLUME, &[]);
        }
    }

    fn serve_note(&self) -> String {
        "QEMU `-netdev tap,vhost=off` with a `virtio-net-device` on a tap on the same twinbox bridge: an address \
         from the same IPAM, the same DNAT for 127.0.0.1:PORT"
            .into()
    }
}

fn firecracker_unavailable() -> BackendError {
    BackendError::Failed { what: "firecracker".into(), status: "unavailable".into(), stderr: String::new() }
}

/// Firecracker: measured when installed (not packaged by Debian).
#[derive(Debug, Default)]
pub struct Firecracker;

impl Backend for Firecracker {
    fn name(&self) -> &'static str {
        "firecracker"
    }
    fn isolation(&self) -> Isolation {
        Isolation::MicroVm
    }
    fn available(&self) -> Result<(), Unavailable> {
        let mut r = Vec::new();
        if which("firecracker").is_none() {
            r.push("firecracker not on PATH (not packaged by Debian; install a release binary)".to_owned());
        } else {
            r.push("a firecracker backend is not written yet".to_owned());
        }
        r.extend(kvm_problem());
        reasons(r)
    }
    fn prepare(&mut self, _image: &PreparedImage) -> Result<(), BackendError> {
        Ok(())
    }
    fn run_command(&self, _w: &Workload, _id: &str) -> Result<Command, BackendError> {
        Err(firecracker_unavailable())
    }
    fn launch(&self, _w: &Workload, _id: &str) -> Result<Instance, BackendError> {
        Err(firecracker_unavailable())
    }
    fn teardown(&self, _i: &mut Instance) -> Result<(), BackendError> {
        Ok(())
    }
}

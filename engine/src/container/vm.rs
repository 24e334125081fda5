//! MicroVM instances: `twinbox run --isolation microvm` kept in the store beside the
//! containers, with a record, a name, an address on a bridge network and published ports, so
//! that `ps`, `port`, `logs`, `rm`, `kill`, `stop`, `system prune` and the names between
//! instances treat both models alike.
//!
//! The VM runs in a `twinbox` process that is its VMM and its monitor: the foreground `run`
//! itself, or for `run -d` and `start` a launcher of its own (`microvm-launch`); the record's
//! pid and owner are that process, which records the exit. Its network card is a tap named
//! after the instance ([`attach::tap_name`]) that the VMM makes when it opens it; the kernel
//! removes it when the VMM ends, however it ends, so a SIGKILLed VMM leaves only its address,
//! its forwarding rules and its vsock socket, which `rm` or `system prune` release as for a
//! container. `exec`, `kill` and `stop` reach the workload through the guest agent over the
//! VM's vsock device ([`vsock_path`], `twinbox_agent::control`).

use std::fs;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{
    io_err, new_id, spec, valid_name, wait_gone, DirGuard, Engine, EngineError, Exit, Owner, Phase, Record, RunOptions,
};
use crate::microvm::{self, ImageRunError, VmOptions};
use crate::network::attach::{self, Endpoint, NetworkMode};
use crate::network::{publish, DEFAULT_NETWORK};
use crate::volume::VolumeSource;
use twinbox_microvm::agent::control;
use twinbox_microvm::NetConfig;

/// Where a running microVM's vsock device listens: short, as a UNIX socket's path must be
/// (108 bytes, and guest connections add `_<port>`), and gone at a reboot with the VMs.
pub fn vsock_path(id: &str) -> std::path::PathBuf {
    std::path::Path::new("/run/twinbox/vm").join(format!("{}.sock", &id[..id.len().min(16)]))
}

/// What `microvm::prepare` needs of an instance's options.
fn image_options(opts: &RunOptions, vm: &VmOptions, id: &str) -> microvm::ImageRunOptions {
    microvm::ImageRunOptions {
        image: opts.image.clone(),
        overrides: opts.overrides.clone(),
        hostname: Some(spec::hostname(id, opts)),
        read_only: opts.read_only,
        memory_mib: vm.memory_mib,
        vcpus: vm.vcpus,
        kernel: vm.kernel.clone(),
        timeout: None,
        irqchip: vm.irqchip,
        verbose: vm.verbose,
    }
}

/// The agent of `r` could not be reached or broke off.
fn agent_error(r: &Record, e: &io::Error) -> EngineError {
    EngineError::Agent(format!(
        "cannot reach the guest agent of {} through {}: {e}; is the VM still booting?",
        r.name,
        vsock_path(&r.id).display()
    ))
}

/// How long the guest agent may take to answer a new control connection.
const AGENT_ANSWER: std::time::Duration = std::time::Duration::from_secs(10);

/// What a launcher writes to its report for `e`: `err CODE MESSAGE`, the command that
/// started it then ends with the same code and message.
fn relay(e: &EngineError) -> String {
    format!("err {} {e}", twinbox_exit::ExitCode::exit_code(e))
}

/// Named volumes a microVM takes: a virtio-blk disk each, beside its root disk, card and vsock.
const MAX_VOLUMES: usize = 8;

/// How long a VM's agent may take over a new /etc/hosts (others wait meanwhile).
const HOSTS_ANSWER: std::time::Duration = std::time::Duration::from_secs(2);

/// Signals `kill` passes to a microVM's VMM: they stop the VM (the workload's exit code is then
/// 128 + N, as for a container's init killed by N), or kill the VMM.
const VM_SIGNALS: [Signal; 4] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGKILL];

/// How long a detached microVM's guest agent may take to answer on the control channel after
/// the VM starts: `TWINBOX_AGENT_TIMEOUT` seconds, else 30 s (a guest kernel boots in well
/// under a second on hardware KVM; five at once in the nested L1's emulation take seconds).
fn agent_timeout() -> std::time::Duration {
    std::env::var("TWINBOX_AGENT_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
        .unwrap_or(std::time::Duration::from_secs(30))
}

/// A detached VM's wait for its guest agent (see [`Engine::boot_microvm`]).
#[derive(Default)]
struct AgentWait {
    /// Set once the VM has ended: the wait is over.
    ended: AtomicBool,
    /// Why the agent was given up on; the VM is then stopped.
    failure: Mutex<Option<String>>,
}

impl AgentWait {
    /// Tries the agent until it answers (true), the VM ends or the time is up; `ok PID` to
    /// `report` when it answers; with a report (a detached VM), a timeout notes the failure
    /// and stops the VM (this process).
    fn watch(
        &self,
        socket: &Path,
        name: &str,
        console: &microvm::ConsoleTail,
        report: Option<&Mutex<Option<fs::File>>>,
        me: i32,
    ) -> bool {
        let timeout = agent_timeout();
        let deadline = Instant::now() + timeout;
        while !self.ended.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now()).max(std::time::Duration::from_millis(100));
            let last = match connect_agent(socket, AGENT_ANSWER.min(left)) {
                Ok(_) => {
                    if let Some(mut r) = report.and_then(|r| r.lock().unwrap_or_else(|e| e.into_inner()).take()) {
                        let _ = write!(r, "ok {me}");
                    }
                    return true;
                }
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                // A foreground run (no report) is not stopped for it: its output says the rest.
                if report.is_none() {
                    return false;
                }
                let why = format!(" (last try: {last})");
                *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!(
                    "the guest agent of {name} did not answer within {} s{why}, so the VM was stopped (set \
                     TWINBOX_AGENT_TIMEOUT=SECONDS for a slower host); the guest console's last lines:\n{}",
                    timeout.as_secs_f64(),
                    console.tail()
                ));
                let _ = nix::sys::signal::kill(Pid::from_raw(me), Signal::SIGTERM);
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    }
}

/// Connects to the guest agent behind the VM's vsock socket `path` (`CONNECT 1024`, then the
/// VMM's `OK`), waiting at most `answer` for the VMM's word.
fn connect_agent(path: &Path, answer: std::time::Duration) -> io::Result<UnixStream> {
    let mut conn = UnixStream::connect(path)?;
    conn.set_read_timeout(Some(answer))?;
    conn.write_all(format!("CONNECT {}\n", control::CONTROL_PORT).as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match io::Read::read(&mut conn, &mut byte)? {
            1 if byte[0] == b'\n' => break,
            1 => line.push(byte[0]),
            _ => return Err(io::ErrorKind::ConnectionReset.into()),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(io::Error::other(String::from_utf8_lossy(&line).into_owned()));
    }
    conn.set_read_timeout(None)?;
    Ok(conn)
}

/// The `start` request line (no newline) that makes a VM restored from its template the
/// workload's own: `guest` with fresh entropy and the time (`twinbox_agent::control::StartRequest`).
fn start_line(guest: twinbox_microvm::agent::GuestConfig) -> Result<Vec<u8>, EngineError> {
    let mut entropy = vec![0u8; 64];
    let urandom = Path::new("/dev/urandom");
    fs::File::open(urandom)
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut entropy))
        .map_err(io_err("read", urandom))?;
    let realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let mut guest = guest;
    guest.template = false;
    let request = control::ExecRequest {
        start: Some(control::StartRequest { config: guest, entropy, realtime_ns }),
        ..Default::default()
    };
    Ok(serde_json::to_vec(&request).expect("a request serializes"))
}

/// Hands a VM restored from its template the workload's `start` request `line` (see
/// [`start_line`]) on the control port, when it did not fit the mailbox: the agent behind
/// `socket` answers once the workload runs.
fn start_workload(socket: &Path, mut line: Vec<u8>) -> Result<(), String> {
    line.push(b'\n');
    let json = line;
    // A connection made before the guest took in the restore's transport reset is reset by it
    // (the guest drops every connection it had then): the agent, still waiting, takes the next.
    let mut tries = 0;
    loop {
        tries += 1;
        let result = start_once(socket, &json);
        tracing::debug!(tries, ok = result.is_ok(), "start request to the agent");
        match result {
            Err(StartFailure::Reset(_)) if tries < START_TRIES => {
                std::thread::sleep(std::time::Duration::from_millis(2))
            }
            // The try before was taken after all, and its answer lost with the connection.
            Err(StartFailure::Refused(why)) if tries > 1 && why.contains("already runs its workload") => return Ok(()),
            Err(StartFailure::Reset(why) | StartFailure::Refused(why)) => return Err(why),
            Ok(()) => return Ok(()),
        }
    }
}

/// How many connections a start may take (see [`start_workload`]), 2 ms apart.
const START_TRIES: u32 = 100;

/// Why one try to start the workload failed.
enum StartFailure {
    /// The connection broke before any answer: try again.
    Reset(String),
    /// The agent answered no.
    Refused(String),
}

fn start_once(socket: &Path, request: &[u8]) -> Result<(), StartFailure> {
    let reset = |e: io::Error| StartFailure::Reset(e.to_string());
    let mut conn = connect_agent(socket, agent_timeout())
        .map_err(|e| StartFailure::Reset(format!("cannot connect to {}: {e}", socket.display())))?;
    conn.set_read_timeout(Some(agent_timeout())).map_err(reset)?;
    conn.write_all(request).map_err(reset)?;
    let mut said = String::new();
    loop {
        match control::read_frame(&mut conn) {
            Ok(Some((control::FRAME_ERROR, b))) => said.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some((control::FRAME_EXIT, b))) if b == [0; 4] => return Ok(()),
            Ok(Some((control::FRAME_EXIT, _))) => return Err(StartFailure::Refused(said)),
            Ok(Some(_)) => {}
            Ok(None) if said.is_empty() => return Err(StartFailure::Reset("the agent hung up".into())),
            Ok(None) => return Err(StartFailure::Refused(format!("the agent hung up: {said}"))),
            Err(e) if said.is_empty() => return Err(reset(e)),
            Err(e) => return Err(StartFailure::Refused(format!("{e}: {said}"))),
        }
    }
}

/// Our terminal in raw mode for `exec -it` (keys go to the guest's pty as typed); restored
/// when dropped.
struct RawTerminal(nix::sys::termios::Termios);

impl RawTerminal {
    /// Raw mode on our stdin, if it is a terminal.
    fn enter() -> Option<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let saved = tcgetattr(io::stdin()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(io::stdin(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.0);
    }
}

impl Engine {
    /// Runs `opts.image` as a microVM in this process, as [`run_foreground`] runs a container:
    /// an instance record (named, on its network, its ports published) while it runs; when it
    /// ends, the exit recorded, or everything removed with `--rm`. `start` is when this process
    /// started (the boot timer counts from it). The workload's output goes to our stdout and
    /// stderr (and, without `--rm`, to the instance's log for `twinbox logs`).
    ///
    /// [`run_foreground`]: Engine::run_foreground
    pub fn run_microvm(&self, opts: &RunOptions, vm: &VmOptions, start: Instant) -> Result<Exit, EngineError> {
        let (record, prepared, _vmm) = self.prepare_microvm(opts, vm)?;
        self.boot_microvm(record, prepared, start, None, None)
    }

    /// The lock the VMM of microVM `id` holds while it runs (`<dir>/vmm.lock`): a second
    /// `start` of the same VM at once finds it taken instead of booting the VM twice.
    fn vmm_lock(&self, id: &str) -> Result<nix::fcntl::Flock<fs::File>, EngineError> {
        let path = self.container_dir(id).join("vmm.lock");
        crate::lock_file(&path, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => {
                EngineError::NotForMicrovm(format!("{id} is being started by another command"))
            }
            _ => EngineError::NoSuchContainer(id.to_owned()),
        })
    }

    /// `run -d --isolation microvm`: the instance made here, its VM run by a launcher of its own
    /// (the command of [`set_vm_launcher`](Self::set_vm_launcher)) in a session of its own,
    /// which is then its VMM and monitor: it records the exit when the VM ends. Returns once
    /// the VM runs (its network and ports ready) or failed to start.
    pub fn run_microvm_detached(&self, opts: &RunOptions, vm: &VmOptions) -> Result<Record, EngineError> {
        // Its lock goes with this process's hold: the launcher takes it.
        let (record, _, _) = self.prepare_microvm(opts, vm)?;
        self.launch_detached(record)
    }

    /// Starts the launcher of a prepared (or exited) microVM and waits for its word.
    pub(super) fn launch_detached(&self, record: Record) -> Result<Record, EngineError> {
        let launcher = self.vm_launcher.as_deref().filter(|c| !c.is_empty()).ok_or(EngineError::NoLaunchCommand)?;
        let cdir = self.container_dir(&record.id);
        let outcome = (|| {
            let (mut rd, wr) = io::pipe().map_err(io_err("create pipe for", &cdir))?;
            let mut cmd = std::process::Command::new(&launcher[0]);
            cmd.args(&launcher[1..]).arg(&record.id);
            super::monitor::spawn_orphan(cmd, &[std::os::fd::AsRawFd::as_raw_fd(&wr)])
                .map_err(|e| EngineError::Monitor(format!("cannot start the VM's launcher: {e}")))?;
            drop(wr);
            let mut msg = String::new();
            io::Read::read_to_string(&mut rd, &mut msg).map_err(io_err("read from the launcher of", &cdir))?;
            if msg.starts_with("ok") {
                return Ok(());
            }
            match msg.strip_prefix("err ").and_then(|m| m.split_once(' ')) {
                Some((code, message)) => Err(EngineError::Relayed {
                    code: code.parse().unwrap_or(twinbox_exit::INTERNAL),
                    message: message.to_owned(),
                }),
                None if msg.is_empty() => Err(EngineError::Monitor("the VM's launcher ended without a word".into())),
                None => Err(EngineError::Monitor(msg)),
            }
        })();
        match outcome {
            Ok(()) => self.find(&record.id),
            Err(e) => {
                // A launcher that said why has undone what it made itself (and one that lost
                // the VMM lock to another must leave that one's VM alone). One that died
                // without a word leaves a new VM that never ran: it goes; one started again
                // stays.
                let relayed = matches!(e, EngineError::Relayed { .. });
                if !relayed
                    && record.phase == Phase::Created
                    && self.stored(&record.id).is_some_and(|r| r.phase == Phase::Created)
                {
                    let _ = self.remove_files(&record.id);
                }
                Err(e)
            }
        }
    }

    /// The launcher of a detached microVM `id` (see [`run_microvm_detached`]): runs its VM
    /// in this process, output to its log, and writes `ok` (once it runs) or the error to
    /// `report`. Returns the exit code to end with.
    ///
    /// [`run_microvm_detached`]: Engine::run_microvm_detached
    pub fn launch_microvm(&self, id: &str, start: Instant, mut report: std::fs::File) -> i32 {
        // Held while this process monitors the VM (its VMM is a child process).
        let mut _vmm_lock = None;
        let result = (|| {
            _vmm_lock = Some(self.vmm_lock(id)?);
            let mut record = self.stored(id).ok_or_else(|| EngineError::NoSuchContainer(id.to_owned()))?;
            let vm = record.vm.clone().ok_or_else(|| EngineError::NotForMicrovm(format!("{id} is not a microVM")))?;
            if !matches!(record.phase, Phase::Created | Phase::Exited { .. }) {
                return Err(EngineError::NotForMicrovm(format!("{} is already running", record.name)));
            }
            let image = self.store.resolve(&record.image_digest)?;
            let image_opts = image_options(&record.options, &vm, id);
            let prepared = microvm::prepare(&self.store, &image, &image_opts, id)?;
            let previous = record.phase.clone();
            record.owner = Owner::me();
            record.phase = Phase::Created;
            self.save(&record)?;
            Ok((record, prepared, previous))
        })();
        let (record, prepared, previous) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = write!(report, "{}", relay(&e));
                return twinbox_exit::ExitCode::exit_code(&e);
            }
        };
        let log = self.container_dir(id).join("log");
        match self.boot_microvm(record, prepared, start, Some(report), Some(previous)) {
            Ok(exit) => exit.code,
            Err(e) => {
                // Nobody sees this process's stderr: the log says why the VM ended.
                let text = format!("twinbox: {}", crate::vmm::error_text(&e));
                if let Ok(mut f) = fs::OpenOptions::new().append(true).open(&log) {
                    let _ = writeln!(f, "{text}");
                }
                twinbox_exit::ExitCode::exit_code(&e)
            }
        }
    }

    /// Boots a prepared instance: its network, the VM, and when it ends the exit recorded (or
    /// everything removed with `--rm`). With `report` (a detached VM's launcher) the output
    /// goes to the log only, and `ok` is written there once the guest's agent answers on the
    /// control channel (so `exec` works as soon as `run -d` returns), or the error: the VM
    /// failed, or its agent did not answer within [`agent_timeout`] (the VM is then stopped,
    /// and the error shows the console's last lines).
    fn boot_microvm(
        &self,
        mut record: Record,
        prepared: microvm::PreparedRun,
        start: Instant,
        report: Option<std::fs::File>,
        previous: Option<Phase>,
    ) -> Result<Exit, EngineError> {
        let id = record.id.clone();
        let vm = record.vm.clone().unwrap_or_default();
        let nets = self.networks();
        let mut guest = prepared.guest.clone();
        let ran = std::cell::Cell::new(false);
        let detached = report.is_some();
        let report = Arc::new(Mutex::new(report));
        let waiting = Arc::new(AgentWait::default());
        let mut volume_locks = Vec::new();
        // Removed once this function returns, its VMMs gone.
        let mut vmm_cgroup = None;
        let outcome = std::thread::scope(|sc| {
            (|| {
                let mut cards = Vec::new();
                let mut joined = None;
                let hostname = spec::hostname(&id, &record.options);
                guest.hosts = attach::hosts_file(&hostname, None);
                if let NetworkMode::Bridge(name) = &record.options.network {
                    let network = nets.get_or_create_default(name)?;
                    nets.ensure_bridge(&network)?;
                    let (network, ip) = nets.allocate(&network.name, &id, |c| !self.container_dir(c).exists())?;
                    let mut endpoint = Endpoint::new(&network, ip, &id);
                    endpoint.host_veth = attach::tap_name(&id);
                    guest.network = Some(endpoint.guest_network());
                    let mut others = super::member_names(&self.members(&network, None));
                    others.retain(|(other, _)| *other != ip);
                    guest.hosts = attach::network_hosts_file(&hostname, ip, &others);
                    guest.resolv_conf =
                        attach::resolv_conf(&fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
                    cards.push(NetConfig {
                        tap: endpoint.host_veth.clone(),
                        mac: Some(attach::mac_text(attach::mac_for(ip))),
                    });
                    joined = Some((endpoint, network.bridge.clone()));
                }
                // Named volumes: a disk each after the root disk (vdb, vdc, …), held by this VMM.
                let mut disks = Vec::new();
                for (i, m) in record.options.volumes.iter().enumerate() {
                    let VolumeSource::Named(name) = &m.source else { continue };
                    let path = self.volumes().for_mount(name, true)?;
                    let path = self.volumes().disk_path(&path.name);
                    let file =
                        fs::OpenOptions::new().read(true).write(true).open(&path).map_err(io_err("open", &path))?;
                    let lock =
                        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
                            EngineError::NotForMicrovm(format!(
                                "volume {name} is in use by another microVM; a disk volume goes into one VM at a time"
                            ))
                        })?;
                    volume_locks.push(lock);
                    let letter = char::from(b'b' + i as u8);
                    guest.volumes.push(twinbox_microvm::agent::GuestVolume {
                        device: format!("/dev/vd{letter}"),
                        target: m.target.clone(),
                        read_only: m.read_only,
                    });
                    disks.push(twinbox_microvm::config::DiskConfig { path, read_only: m.read_only });
                }
                let prepared = microvm::PreparedRun { guest: guest.clone(), ..prepared.clone() };
                // The VMMs (the template's, then the instance's) join a cgroup sized for the
                // guest, as part of their jail.
                let vmm_command = self.vmm_command.clone().ok_or(EngineError::NoVmmCommand)?;
                let mut jail = vm.jail();
                if let Some(j) = &mut jail {
                    let memory = vm.memory_mib.unwrap_or(microvm::DEFAULT_MEMORY_MIB);
                    let cgroup = crate::vmm::VmmCgroup::create(&id, memory).map_err(|e| {
                        EngineError::Monitor(format!(
                            "cannot make the cgroup of the VMM: {}",
                            crate::vmm::error_text(&e)
                        ))
                    })?;
                    j.cgroups = cgroup.join_files();
                    vmm_cgroup = Some(cgroup);
                }
                let template = match vm.snapshot {
                    true => Some(crate::template::ensure(
                        &crate::vmm::Launch { command: vmm_command.clone(), jail: jail.clone() },
                        &self.store,
                        &record.image,
                        &record.image_digest,
                        &prepared,
                        &vm,
                        joined.is_some(),
                    )?),
                    false => None,
                };
                // The workload's start, in the restored memory when it fits (the agent has it as
                // it resumes), else on the control port once the VM runs.
                let mut start_later = None;
                let restore = match template.as_deref() {
                    Some(dir) => {
                        let line = start_line(guest.clone())?;
                        let mailbox = control::mailbox(&line);
                        if mailbox.is_none() {
                            start_later = Some(line);
                        }
                        Some(microvm::Restore { dir, mailbox })
                    }
                    None => None,
                };
                let (mut config, initrd) = microvm::vm_config(prepared, &vm, cards);
                config.disks.extend(disks);
                let socket = vsock_path(&id);
                let dir = socket.parent().expect("a path in a directory");
                fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
                // The sockets reach the guests' agents (exec as root in them): root's only.
                fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                    .map_err(io_err("restrict", dir))?;
                // A socket left by a VMM that was killed.
                let _ = fs::remove_file(&socket);
                config.vsock = Some(twinbox_microvm::VsockConfig {
                    guest_cid: crate::template::GUEST_CID,
                    uds_path: socket.clone(),
                });
                let output = self.vm_output(&record, detached)?;
                let me = std::process::id() as i32;
                let booted = microvm::boot(
                    &vmm_command,
                    config,
                    initrd,
                    restore,
                    start,
                    output,
                    vm.verbose,
                    jail,
                    |console| -> Result<(), EngineError> {
                        if let Some((endpoint, bridge)) = &joined {
                            attach::connect_tap(endpoint, bridge)?;
                            record.endpoint = Some(endpoint.clone());
                            self.publish(&mut record, endpoint.ip, me)?;
                        }
                        record.phase = Phase::Running { pid: me };
                        self.save(&record)?;
                        ran.set(true);
                        if let Some((endpoint, _)) = &joined {
                            // The others learn its name; its own /etc/hosts came with its configuration
                            // (its agent is not up yet to take one).
                            self.refresh_hosts(&endpoint.network, Some(&record));
                        }
                        // Wait for the agent: a detached VM's `run -d` returns once it answers, and
                        // on a network it then gets the names of whoever joined while it booted.
                        // (Not for a foreground run: probing a guest through its boot made the
                        // nested L1's emulation stall now and then.)
                        let network = joined.as_ref().map(|(e, _)| e.network.clone());
                        if let Some(line) = start_later.take() {
                            // Restored where its agent waits, its start too large for the
                            // mailbox: hand it the workload (and, for a detached VM, `ok` once
                            // it runs).
                            let (waiting, report, name) = (waiting.clone(), report.clone(), record.name.clone());
                            sc.spawn(move || match start_workload(&socket, line) {
                                Ok(()) => {
                                    if let Some(mut r) = report.lock().unwrap_or_else(|e| e.into_inner()).take() {
                                        let _ = write!(r, "ok {me}");
                                    }
                                    if let Some(n) = network {
                                        self.refresh_hosts(&n, None);
                                    }
                                }
                                Err(why) => {
                                    *waiting.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!(
                                        "cannot hand the workload to the guest agent of {name}, restored from its \
                                         template: {why}; the VM was stopped. The guest console's last lines:\n{}",
                                        console.tail()
                                    ));
                                    let _ = nix::sys::signal::kill(Pid::from_raw(me), Signal::SIGTERM);
                                }
                            });
                        } else if detached {
                            let (waiting, report, name) = (waiting.clone(), report.clone(), record.name.clone());
                            sc.spawn(move || {
                                let report = detached.then_some(&*report);
                                if waiting.watch(&socket, &name, &console, report, me) {
                                    if let Some(n) = network {
                                        self.refresh_hosts(&n, None);
                                    }
                                }
                            });
                        }
                        Ok(())
                    },
                );
                waiting.ended.store(true, Ordering::SeqCst);
                booted
            })()
        });
        waiting.ended.store(true, Ordering::SeqCst);
        let failure = waiting.failure.lock().unwrap_or_else(|e| e.into_inner()).take();
        let outcome = match (failure, outcome) {
            // The agent never answered: the VM was stopped for it.
            (Some(message), _) => Err(Err(EngineError::Agent(message))),
            (None, outcome) => outcome.map_err(|e| match e {
                // Stopped by a signal (`twinbox stop`, Ctrl-C): as a container's init killed by it.
                EngineError::Vm(ImageRunError::Interrupted(sig)) => Ok(128 + sig),
                e => Err(e),
            }),
        };
        let code = match outcome {
            Ok(exit) => {
                if let Some(t) = exit.boot_time {
                    tracing::info!(
                        boot_time_ms = t.as_secs_f64() * 1e3,
                        total_ms = exit.total.as_secs_f64() * 1e3,
                        "microVM"
                    );
                }
                exit.code
            }
            Err(Ok(code)) => code,
            Err(Err(e)) if ran.get() && !matches!(e, EngineError::Agent(_)) => {
                // It ran, then the VM failed: an exit like any other (125, twinbox's own
                // failure), kept for `ps -a` and `logs` unless --rm.
                let stored = self.stored(&id).unwrap_or(record);
                self.finish_microvm(stored, twinbox_exit::INTERNAL)?;
                if let Some(mut r) = report.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = write!(r, "{}", relay(&e));
                }
                return Err(e);
            }
            Err(Err(e)) => {
                match previous {
                    // A new VM that never ran (or whose agent never answered) is removed.
                    None | Some(Phase::Created) => {
                        let _ = self.remove_files(&id);
                    }
                    // One started again stays as it was, without what this start made.
                    Some(phase) => {
                        let mut kept = self.stored(&id).unwrap_or(record);
                        let endpoint = kept.endpoint.take();
                        self.leave_network(&id, endpoint.as_ref(), !kept.options.publish.is_empty());
                        let _ = fs::remove_file(vsock_path(&id));
                        kept.ports.clear();
                        kept.owner = None;
                        kept.phase = phase;
                        let _ = self.save(&kept);
                    }
                }
                // Said once everything is undone: `run -d` returns with nothing left behind.
                if let Some(mut r) = report.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = write!(r, "{}", relay(&e));
                }
                return Err(e);
            }
        };
        let stored = self.stored(&id).unwrap_or(record);
        self.finish_microvm(stored, code)?;
        // A VM that ended before its agent answered ran all the same (a workload that exits
        // at once): `run -d` returns, and `ps -a` shows the exit.
        if let Some(mut r) = report.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = write!(r, "ok {}", std::process::id());
        }
        Ok(Exit { code, oom_killed: false })
    }

    /// The record of a new microVM instance (saved, `Created`, its name claimed and its image
    /// held) and the run it boots. Refuses what a VM cannot do, by name; on error nothing is
    /// left behind.
    fn prepare_microvm(
        &self,
        opts: &RunOptions,
        vm: &VmOptions,
    ) -> Result<(Record, microvm::PreparedRun, nix::fcntl::Flock<fs::File>), EngineError> {
        let refuse = |what: &str| Err(EngineError::NotForMicrovm(what.to_owned()));
        match &opts.network {
            NetworkMode::None | NetworkMode::Bridge(_) => {}
            NetworkMode::Host => {
                return refuse(
                    "--network host is for containers: a microVM has its own kernel and network stack; \
                     use a bridge network and -p",
                )
            }
            NetworkMode::Container(_) => {
                return refuse(
                    "--network container: shares a container's network namespace, which a microVM cannot join",
                )
            }
            NetworkMode::Cni(_) => return refuse("--network cni: is for containers so far; use a twinbox network"),
        }
        if let NetworkMode::Bridge(name) = &opts.network {
            if name != DEFAULT_NETWORK {
                self.networks().get(name)?;
            }
        }
        // Until the record naming them is saved, no `volume rm` of these.
        let _volume_users = if opts.volumes.is_empty() { None } else { Some(self.volumes().users_lock(false)?) };
        if opts.volumes.len() > MAX_VOLUMES {
            return refuse(&format!("a microVM takes at most {MAX_VOLUMES} volumes (a disk each)"));
        }
        for m in &opts.volumes {
            match &m.source {
                VolumeSource::Host(_) => {
                    return refuse(&format!(
                        "-v {m}: a host directory cannot go into a microVM (it has no shared-filesystem device); \
                         use a named volume, which the VM gets as a disk of its own: -v NAME:{}",
                        m.target
                    ))
                }
                VolumeSource::Named(name) => {
                    // Made when the VM boots, once everything else checked out.
                    self.volumes().check_mount(name, true)?;
                    let twice = opts.volumes.iter().filter(|o| o.source == m.source).count() > 1;
                    if twice {
                        return refuse(&format!("volume {name} is given twice: a disk volume goes into a VM once"));
                    }
                }
            }
        }
        let _gc = self.store.writer_guard()?;
        let image = self.store.resolve(&opts.image)?;
        let id = new_id();
        let name = match &opts.name {
            Some(n) if !valid_name(n) => return Err(EngineError::InvalidName(n.clone())),
            Some(n) if self.records()?.iter().any(|r| &r.name == n) => return Err(EngineError::NameInUse(n.clone())),
            Some(n) => n.clone(),
            None => format!("twinbox_{}", &id[..8]),
        };
        let mut opts = opts.clone();
        if opts.publish_all {
            for port in publish::exposed(&image.config) {
                if !opts.publish.iter().any(|m| m.container_port == port.container_port && m.udp == port.udp) {
                    opts.publish.push(port);
                }
            }
        }
        if !opts.publish.is_empty() && opts.network == NetworkMode::None {
            return Err(EngineError::PublishNeedsBridge("none".into()));
        }
        let image_opts = image_options(&opts, vm, &id);
        let prepared = microvm::prepare(&self.store, &image, &image_opts, &id)?;
        let cdir = self.container_dir(&id);
        let guard = DirGuard::new(cdir.clone())?;
        fs::create_dir_all(&cdir).map_err(io_err("create directory", &cdir))?;
        // Before the record exists: a `start` that finds it waits for this command's VMM.
        let lock = self.vmm_lock(&id)?;
        let claim = self.reserve_name(&name, &id)?;
        let record = Record {
            id: id.clone(),
            name,
            image: opts.image.clone(),
            image_digest: image.manifest_digest.to_string(),
            command: prepared.guest.args.clone(),
            options: opts,
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            phase: Phase::Created,
            endpoint: None,
            ports: Vec::new(),
            owner: Owner::me(),
            vm: Some(vm.clone()),
        };
        self.save(&record)?;
        self.store.hold(&id, &image.manifest_digest)?;
        guard.kept();
        claim.keep();
        Ok((record, prepared, lock))
    }

    /// Where the workload's output goes: ours, and the log unless the instance goes with `--rm`;
    /// only the log when `detached`.
    fn vm_output(&self, record: &Record, detached: bool) -> Result<crate::vmm::Output, EngineError> {
        let path = self.container_dir(&record.id).join("log");
        let open = || fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io_err("open", &path));
        if detached {
            return Ok(crate::vmm::Output::Log(open()?));
        }
        if record.options.rm {
            return Ok(crate::vmm::Output::Ours);
        }
        Ok(crate::vmm::Output::OursAndLog(open()?))
    }

    /// After the VM ended with `code`: its network left and the exit recorded, or everything
    /// removed (`--rm`).
    pub(super) fn finish_microvm(&self, mut record: Record, code: i32) -> Result<(), EngineError> {
        // Left by a monitor that was killed (its own run removes it as it returns).
        crate::vmm::VmmCgroup::remove(&record.id);
        // A jailed VMM cannot unlink its socket (its directory is not in the jail).
        let _ = fs::remove_file(vsock_path(&record.id));
        if record.options.rm {
            return self.remove_files(&record.id);
        }
        let endpoint = record.endpoint.take();
        if endpoint.is_some() {
            self.leave_network(&record.id, endpoint.as_ref(), !record.options.publish.is_empty());
        }
        record.ports.clear();
        record.phase = Phase::Exited { code, oom_killed: false };
        record.owner = None;
        self.save(&record)
    }

    /// Sends `sig` to a running microVM's VMM, if it is still the process that started it.
    pub(super) fn signal_vmm(&self, record: &Record, sig: Signal) -> Result<(), EngineError> {
        if !VM_SIGNALS.contains(&sig) {
            return Err(EngineError::NotForMicrovm(format!(
                "{} goes to a microVM's workload through its guest agent, which does not answer; \
                 SIGTERM, SIGINT and SIGHUP stop the VM, SIGKILL kills its VMM",
                sig.as_str()
            )));
        }
        let Phase::Running { pid } = record.phase else { return Err(EngineError::NotRunning(record.name.clone())) };
        if record.owner.is_some_and(|o| o.pid == pid && o.alive()) {
            nix::sys::signal::kill(Pid::from_raw(pid), sig).map_err(|e| EngineError::Sys("signalling the VMM", e))?;
        }
        Ok(())
    }

    /// `twinbox exec` into a running microVM: the request to the guest agent over the vsock
    /// control channel, its output to ours; returns the process's exit code. `-i` sends our
    /// stdin, `-t` gives the process a pty in the guest sized as our terminal.
    pub(super) fn exec_vm(&self, r: &Record, argv: &[String], opts: &super::ExecOptions) -> Result<i32, EngineError> {
        use control::ExecRequest;
        // As for a container: names and ids resolved in the image's /etc/passwd and /etc/group,
        // which the VM's root disk is made of.
        let (uid, gid, groups) = match opts.user.as_deref() {
            None => (None, None, None),
            Some(u) => {
                let image = self.store.resolve(&r.image_digest)?;
                let layers = self.store.unpacked_layers(&image)?;
                let (uid, gid, groups) = twinbox_image::launch::resolve_user(u, &layers)?;
                (Some(uid), Some(gid), Some(groups))
            }
        };
        let mut conn = self.agent(r)?;
        let request = ExecRequest {
            args: argv.to_vec(),
            env: opts.env.clone(),
            cwd: opts.workdir.clone(),
            uid,
            gid,
            groups,
            stdin: opts.interactive,
            tty: opts.tty,
            size: if opts.tty { twinbox_runtime::terminal::our_size() } else { None },
            ..Default::default()
        };
        self.agent_request(r, &mut conn, &request)
    }

    /// Connects to the guest agent of running microVM `r` (see `twinbox_agent::control`).
    fn agent(&self, r: &Record) -> Result<UnixStream, EngineError> {
        connect_agent(&vsock_path(&r.id), AGENT_ANSWER).map_err(|e| agent_error(r, &e))
    }

    /// Sends `request` on `conn` and copies the answer's output to ours; the exit code. With
    /// `request.stdin`, our stdin goes to the process; with `request.tty`, our terminal's size
    /// follows it (SIGWINCH), and with both our terminal is in raw mode meanwhile.
    fn agent_request(
        &self,
        r: &Record,
        conn: &mut UnixStream,
        request: &control::ExecRequest,
    ) -> Result<i32, EngineError> {
        let unreachable = |e: io::Error| agent_error(r, &e);
        let mut json = serde_json::to_vec(request).expect("a request serializes");
        json.push(b'\n');
        conn.write_all(&json).map_err(unreachable)?;
        let _raw = if request.stdin || request.tty {
            self.exec_input(conn, request.stdin, request.tty).map_err(unreachable)?
        } else {
            None
        };
        self.agent_answer(r, conn)
    }

    /// The threads that feed an exec's input: our stdin as [`control::FRAME_STDIN`] frames
    /// (`stdin`), and our terminal's new sizes (`tty`, on SIGWINCH). Neither is joined: they
    /// wait on our stdin and on the signal for as long as this command lives. Returns what
    /// restores our terminal when dropped, if it was put in raw mode.
    fn exec_input(&self, conn: &UnixStream, stdin: bool, tty: bool) -> io::Result<Option<RawTerminal>> {
        let writer = Arc::new(Mutex::new(conn.try_clone()?));
        let send = |w: &Mutex<UnixStream>, bytes: &[u8]| w.lock().unwrap_or_else(|e| e.into_inner()).write_all(bytes);
        let raw = if tty && stdin { RawTerminal::enter() } else { None };
        if tty {
            let mut signals = nix::sys::signal::SigSet::empty();
            signals.add(Signal::SIGWINCH);
            // In raw mode a signal that ends us must give the terminal back first.
            let saved = raw.as_ref().map(|r| r.0.clone());
            if saved.is_some() {
                signals.add(Signal::SIGTERM);
                signals.add(Signal::SIGHUP);
            }
            // Blocked here (and so in the threads made from now on); taken by the one below.
            let _ = signals.thread_block();
            let w = writer.clone();
            std::thread::spawn(move || {
                while let Ok(sig) = signals.wait() {
                    if sig != Signal::SIGWINCH {
                        if let Some(t) = &saved {
                            let _ = nix::sys::termios::tcsetattr(io::stdin(), nix::sys::termios::SetArg::TCSANOW, t);
                        }
                        std::process::exit(128 + sig as i32);
                    }
                    if let Some((rows, cols)) = twinbox_runtime::terminal::our_size() {
                        if send(&w, &control::resize_frame(rows, cols)).is_err() {
                            return;
                        }
                    }
                }
            });
        }
        if stdin {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                let mut input = io::stdin().lock();
                loop {
                    let n = match io::Read::read(&mut input, &mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => 0,
                    };
                    // An empty frame ends the process's input.
                    if send(&writer, &control::frame(control::FRAME_STDIN, &buf[..n])).is_err() || n == 0 {
                        return;
                    }
                }
            });
        }
        Ok(raw)
    }

    /// Copies the agent's answer on `conn` to our stdout and stderr; the exit code.
    fn agent_answer(&self, r: &Record, conn: &mut UnixStream) -> Result<i32, EngineError> {
        let unreachable = |e: io::Error| agent_error(r, &e);
        let (mut out, mut err) = (io::stdout(), io::stderr());
        loop {
            match control::read_frame(conn).map_err(unreachable)? {
                Some((control::FRAME_STDOUT, b)) => {
                    let _ = out.write_all(&b).and_then(|()| out.flush());
                }
                Some((control::FRAME_STDERR, b)) => {
                    let _ = err.write_all(&b);
                }
                Some((control::FRAME_ERROR, b)) => {
                    let _ = writeln!(err, "twinbox: {}", String::from_utf8_lossy(&b));
                }
                Some((control::FRAME_EXIT, b)) if b.len() == 4 => {
                    return Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                }
                Some(_) => {}
                None => return Err(unreachable(io::ErrorKind::UnexpectedEof.into())),
            }
        }
    }

    /// Sends `sig` to the workload of running microVM `r` through its guest agent.
    pub(super) fn signal_workload(&self, r: &Record, sig: Signal) -> Result<(), EngineError> {
        let mut conn = self.agent(r)?;
        // A stuck agent must not hold up `stop`, which then signals the VMM.
        conn.set_read_timeout(Some(AGENT_ANSWER)).map_err(|e| agent_error(r, &e))?;
        let request = control::ExecRequest { signal: Some(sig as i32), ..Default::default() };
        match self.agent_request(r, &mut conn, &request)? {
            0 => Ok(()),
            _ => Err(EngineError::NotForMicrovm(format!(
                "the guest agent of {} could not send {}",
                r.name,
                sig.as_str()
            ))),
        }
    }

    /// Gives running microVM `r` a new /etc/hosts through its guest agent.
    pub(super) fn vm_hosts(&self, r: &Record, text: String) -> Result<(), EngineError> {
        let mut conn = connect_agent(&vsock_path(&r.id), HOSTS_ANSWER).map_err(|e| agent_error(r, &e))?;
        conn.set_read_timeout(Some(HOSTS_ANSWER)).map_err(|e| agent_error(r, &e))?;
        let request = control::ExecRequest { hosts: Some(text), ..Default::default() };
        match self.agent_request(r, &mut conn, &request)? {
            0 => Ok(()),
            _ => Err(EngineError::Agent(format!("the guest agent of {} could not rewrite /etc/hosts", r.name))),
        }
    }

    /// `rm -f` of a running microVM: its VMM killed and gone before the files go.
    pub(super) fn kill_vmm(&self, record: &Record) {
        if let Phase::Running { pid } = record.phase {
            if self.signal_vmm(record, Signal::SIGKILL).is_ok() {
                wait_gone(Pid::from_raw(pid), std::time::Duration::from_secs(10));
            }
        }
    }
}

//! twinbox-agent: pid 1 of the microVM's initramfs. See the library's documentation for the
//! protocol; in order, it
//! 1. takes the I/O ports, mounts /proc /sys /dev, reads the configuration;
//! 2. builds the workload's root: the image's disk read-only under a tmpfs-backed overlay,
//!    with a runc-like /dev and a read-only /sys; sets the hostname; brings lo up and, on a
//!    network, eth0 with its address, MTU and default route, and writes /etc/hosts and
//!    /etc/resolv.conf into the root;
//! 3. forks the workload into new pid and mount namespaces, where it enters the root, mounts
//!    its /proc, becomes the configured user and execs the program, writing the boot-timer
//!    byte just before;
//! 4. forwards its stdout and stderr to the ports until both close, reaps it, and writes its
//!    status to the exit port, which ends the VM.
//!
//! A warm template (`template: true`) stops after the root of step 2 for as long as it takes:
//! 1. it listens on the control port (vsock 1024), writes one byte to the ready port, where the
//!    VMM snapshots the VM, and takes connections one at a time until one brings a valid
//!    `start`, answering the others with an error;
//! 2. in the restored copy that received it: adds the request's entropy to the kernel's pool and
//!    reseeds the CRNG, sets the wall clock to the host's time;
//! 3. goes on from step 2 above with the request's configuration (its hostname, network
//!    with eth0's MAC address), answers the `start` once the workload is spawned (an exit frame
//!    of 0, or an error and 1), and serves exec on the same listener.
//!
//! Anything that fails before the workload runs ends the VM with status 125 and a message on
//! the stderr port (and, after a `start`, on its connection too). Nothing else is ever written
//! to the ports unless `verbose` asks for it.

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod control;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod net;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod ports;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod setup;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod supervise;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod sys;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod template;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod workload;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn main() {
    agent::main()
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn main() {
    eprintln!("twinbox-agent runs only in an x86_64 Linux guest");
    std::process::exit(twinbox_agent::EXIT_SETUP_FAILED);
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod agent {
    use std::error::Error;
    use std::fmt;
    use std::io::{self, Write};
    use std::os::fd::OwnedFd;
    use std::time::Duration;

    use twinbox_agent::control::CONTROL_PORT;
    use twinbox_agent::{exit_code, GuestConfig, EXIT_SETUP_FAILED, READY_PORT, STDERR_PORT};

    use crate::ports::{IoPorts, Ports, Tee};
    use crate::setup::{self, SetupError};
    use crate::supervise::{self, SuperviseError};
    use crate::sys;
    use crate::template::{self, StartAnswer, TemplateError};
    use crate::workload::{self, SpawnError};

    /// Everything that can stop the agent before it has a status to report.
    #[derive(Debug, thiserror::Error)]
    enum AgentError {
        #[error(transparent)]
        Setup(#[from] SetupError),
        #[error(transparent)]
        Net(#[from] crate::net::NetError),
        #[error(transparent)]
        Spawn(#[from] SpawnError),
        #[error(transparent)]
        Supervise(#[from] SuperviseError),
        #[error(transparent)]
        Template(#[from] TemplateError),
    }

    struct Agent {
        ports: Tee<IoPorts>,
        verbose: bool,
    }

    impl Agent {
        /// One line on the stderr port.
        fn say(&mut self, line: &str) {
            self.ports.write_bytes(STDERR_PORT, format!("twinbox-agent: {line}\n").as_bytes());
        }

        /// A step, with the time since boot, when `verbose`.
        fn log(&mut self, what: fmt::Arguments) {
            if self.verbose {
                let line = format!("{:9.3} ms: {what}", sys::ms_since_boot());
                self.say(&line);
            }
        }
    }

    /// "step: cause: errno text", the whole chain on one line.
    fn chain(err: &dyn Error) -> String {
        let mut text = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            text.push_str(": ");
            match cause.downcast_ref::<io::Error>() {
                Some(e) => text.push_str(&sys::errno_text(e)),
                None => text.push_str(&cause.to_string()),
            }
            source = cause.source();
        }
        text
    }

    pub fn main() {
        let started = sys::ms_since_boot();
        if std::process::id() != 1 {
            // It would mount over this system's /proc, /sys and /dev.
            eprintln!("twinbox-agent: not pid 1; it runs only as the init of a twinbox microVM");
            std::process::exit(EXIT_SETUP_FAILED);
        }
        // Modes given to mkdir and mknod are meant exactly.
        sys::umask(0);
        let ports = match IoPorts::grant() {
            Ok(ports) => ports,
            Err(e) => {
                // Nothing can reach the VMM; the console is all there is.
                let _ = writeln!(io::stderr(), "twinbox-agent: cannot get the I/O ports: {}", sys::errno_text(&e));
                halt()
            }
        };
        // A bug must still end the VM with a status, not with "Attempted to kill init!".
        std::panic::set_hook(Box::new(move |info| {
            let mut ports = ports;
            ports.write_bytes(STDERR_PORT, format!("twinbox-agent: internal error: {info}\n").as_bytes());
            supervise::report(&mut ports, EXIT_SETUP_FAILED);
            halt()
        }));
        let mut agent = Agent { ports: Tee::new(ports), verbose: false };
        let status = match run(&mut agent, started) {
            Ok(status) => status,
            Err(e) => {
                agent.say(&chain(&e));
                EXIT_SETUP_FAILED
            }
        };
        agent.log(format_args!("workload ended, status {status}"));
        supervise::report(&mut agent.ports, status);
        halt()
    }

    fn run(agent: &mut Agent, started: f64) -> Result<i32, AgentError> {
        setup::early_mounts()?;
        if setup::console_mirror_wanted() {
            if let Ok(console) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
                agent.ports.mirror_to(console);
            }
        }
        let config = setup::read_config()?;
        agent.verbose = config.verbose;
        agent.log(format_args!("started at {started:.3} ms; /proc /sys /dev mounted, configuration read"));
        if !config.template {
            return boot(agent, &config, None, None, false);
        }
        // The image's root is the same in every copy: made once, before the snapshot.
        setup::root(&config)?;
        crate::net::prepare_template(setup::ROOT)?;
        agent.log(format_args!("template: root ready under an overlay at {}, lo up", setup::ROOT));
        let listener = template::listen()?;
        agent.log(format_args!("template: listening on vsock port {CONTROL_PORT}; ready (port {READY_PORT:#x})"));
        template::ready(&mut agent.ports);
        // From here on, in each copy restored from the VMM's snapshot.
        let (start, answer) = match template::from_mailbox() {
            Some(Ok(taken)) => taken,
            Some(Err((message, code))) => {
                agent.say(&message);
                return Ok(code);
            }
            None => template::wait_for_start(&listener, &mut |line| agent.log(line))?,
        };
        agent.verbose = start.config.verbose;
        agent.log(format_args!("start: {:?}", start.config.args[0]));
        let same_root = start.config.root_device == config.root_device
            && start.config.root_fstype == config.root_fstype
            && start.config.volumes.is_empty();
        if !same_root {
            let e = AgentError::from(template::TemplateError::OtherRoot);
            answer.failed(&chain(&e));
            return Err(e);
        }
        if let Err(e) = template::refresh(&start) {
            let e = AgentError::from(e);
            answer.failed(&chain(&e));
            return Err(e);
        }
        agent.log(format_args!(
            "start: {} bytes of entropy added, CRNG reseeded; clock set to {}.{:09} s since the epoch",
            start.entropy.len(),
            start.realtime_ns / 1_000_000_000,
            start.realtime_ns % 1_000_000_000
        ));
        boot(agent, &start.config, Some(listener), Some(answer), true)
    }

    /// A cold boot from step 2 on (a template's copy once started): the root (unless
    /// `root_ready`), the hostname and the network, the workload, then its output and status.
    /// `listener` is the control port's, when one was made already; `answer`, the `start` to
    /// answer once the workload is spawned.
    fn boot(
        agent: &mut Agent,
        config: &GuestConfig,
        listener: Option<OwnedFd>,
        mut answer: Option<StartAnswer>,
        root_ready: bool,
    ) -> Result<i32, AgentError> {
        let spawned = match spawn(agent, config, root_ready) {
            Ok(spawned) => spawned,
            Err(e) => {
                if let Some(answer) = answer.take() {
                    answer.failed(&chain(&e));
                }
                return Err(e);
            }
        };
        match spawned.failure {
            Some(failure) => {
                let message = failure.message(config);
                if let Some(answer) = answer.take() {
                    answer.failed(&message);
                }
                agent.say(&message);
            }
            None => {
                if let Some(answer) = answer.take() {
                    answer.started();
                }
                agent.log(format_args!("exec'd {:?} (pid {})", config.args[0], spawned.pid));
            }
        }
        let mut control = match listener {
            Some(listener) => crate::control::Control::with_listener(Some(listener), config, spawned.pid),
            None => crate::control::Control::new(config, spawned.pid),
        };
        if control.listening() {
            agent.log(format_args!("serving exec on vsock port {CONTROL_PORT}"));
        }
        let forwarded = supervise::forward_serving(&mut agent.ports, spawned.streams, Some(&mut control));
        let status = forwarded.and_then(|()| supervise::wait_for(spawned.pid));
        if !config.volumes.is_empty() {
            // The VM ends at the exit port: the volumes' file systems must be clean on their
            // disks by then (whatever ended the workload).
            setup::unmount_volumes(&setup::volume_targets(config));
            agent.log(format_args!("volumes unmounted"));
        }
        let status = status?;
        Ok(exit_code(status).unwrap_or(EXIT_SETUP_FAILED))
    }

    /// The workload's root, the hostname, the network, and the workload forked.
    fn spawn(agent: &mut Agent, config: &GuestConfig, root_ready: bool) -> Result<workload::Started, AgentError> {
        if !root_ready {
            setup::root(config)?;
            agent.log(format_args!(
                "root ready: {} ({}) under an overlay at {}{}",
                config.root_device,
                config.root_fstype,
                setup::ROOT,
                if config.read_only { ", read-only" } else { "" }
            ));
        }
        setup::hostname(config)?;
        crate::net::setup(config, setup::ROOT)?;
        if let Some(n) = &config.network {
            let mac = n.mac.as_deref().map(|m| format!(", MAC {m}")).unwrap_or_default();
            agent.log(format_args!("eth0 {}/{} via {}, MTU {}{mac}", n.address, n.prefix_len, n.gateway, n.mtu));
        }
        Ok(workload::spawn(config)?)
    }

    /// After the exit port: the VMM has stopped the VM. In case it did not, reboot, which
    /// ends a twinbox VM too; pid 1 must never return.
    fn halt() -> ! {
        loop {
            let _ = sys::reboot();
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn errors_print_as_one_line_with_the_errno_text() {
            let err = AgentError::from(SetupError::Mount {
                fstype: "ext4 /dev/vda".into(),
                target: "/mnt/lower".into(),
                source: io::Error::from_raw_os_error(libc::ENXIO),
            });
            assert_eq!(chain(&err), "cannot mount ext4 /dev/vda on /mnt/lower: No such device or address");
            let bad = twinbox_agent::GuestConfig::from_json(b"{}").unwrap_err();
            assert_eq!(
                chain(&AgentError::from(SetupError::Config(bad))),
                "invalid /twinbox/config.json: no command to run (args is empty)"
            );
            let clock = TemplateError::Clock(io::Error::from_raw_os_error(libc::EPERM));
            assert_eq!(
                chain(&AgentError::from(clock)),
                "cannot set the wall clock to the host's time: Operation not permitted"
            );
        }
    }
}

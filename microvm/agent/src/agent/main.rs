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
//! Anything that fails before the workload runs ends the VM with status 125 and a message on
//! the stderr port. Nothing else is ever written to the ports unless `verbose` asks for it.

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
    use std::time::Duration;

    use twinbox_agent::{exit_code, EXIT_SETUP_FAILED, STDERR_PORT};

    use crate::ports::{IoPorts, Ports, Tee};
    use crate::setup::{self, SetupError};
    use crate::supervise::{self, SuperviseError};
    use crate::sys;
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
        setup::root(&config)?;
        agent.log(format_args!(
            "root ready: {} ({}) under an overlay at {}{}",
            config.root_device,
            config.root_fstype,
            setup::ROOT,
            if config.read_only { ", read-only" } else { "" }
        ));
        setup::hostname(&config)?;
        crate::net::setup(&config, setup::ROOT)?;
        if let Some(n) = &config.network {
            agent.log(format_args!("eth0 {}/{} via {}, MTU {}", n.address, n.prefix_len, n.gateway, n.mtu));
        }
        let spawned = workload::spawn(&config)?;
        match spawned.failure {
            Some(failure) => agent.say(&failure.message(&config)),
            None => agent.log(format_args!("exec'd {:?} (pid {})", config.args[0], spawned.pid)),
        }
        let mut control = crate::control::Control::new(&config, spawned.pid);
        if control.listening() {
            agent.log(format_args!("serving exec on vsock port {}", twinbox_agent::control::CONTROL_PORT));
        }
        let forwarded = supervise::forward_serving(&mut agent.ports, spawned.streams, Some(&mut control));
        let status = forwarded.and_then(|()| supervise::wait_for(spawned.pid));
        if !config.volumes.is_empty() {
            // The VM ends at the exit port: the volumes' file systems must be clean on their
            // disks by then (whatever ended the workload).
            setup::unmount_volumes(&setup::volume_targets(&config));
            agent.log(format_args!("volumes unmounted"));
        }
        let status = status?;
        Ok(exit_code(status).unwrap_or(EXIT_SETUP_FAILED))
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
        }
    }
}

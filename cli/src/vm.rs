//! `twinbox vm`: boot a kernel in a microVM directly (the lower-level entry point).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use twinbox_microvm::config::DiskConfig;
use twinbox_microvm::console::ConsoleLog;
use twinbox_microvm::vstate::vcpu::VcpuError;
use twinbox_microvm::{VmBuilder, VmConfig, VmError};

#[derive(Args, Debug)]
pub struct VmArgs {
    /// Guest kernel: an uncompressed ELF vmlinux or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Disk image as a virtio-blk device, read-write; `PATH,ro` for read-only. Repeatable: the
    /// guest sees them as /dev/vda, /dev/vdb, ... in order (at most 8).
    #[arg(long, value_name = "PATH[,ro]", value_parser = parse_disk)]
    disk: Vec<DiskConfig>,
    /// A virtio-net card on a tap (made if missing, removed when the VM ends), with the
    /// guest's MAC when given. Repeatable (at most 4): eth0, eth1, ... in order.
    #[arg(long, value_name = "TAP[,mac=MAC]", value_parser = parse_net)]
    net: Vec<twinbox_microvm::NetConfig>,
    /// A virtio-vsock device for guest CID `CID`, its host side on the UNIX socket `PATH`
    /// (Firecracker's: `CONNECT <port>` there reaches a guest port; a guest connecting to host
    /// port P reaches `PATH_P`).
    #[arg(long, value_name = "CID,PATH", value_parser = parse_vsock)]
    vsock: Option<twinbox_microvm::VsockConfig>,
    /// Kernel command line (default: a quiet serial console, reboot=k, panic=1).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory (bytes, or with k, m, g).
    #[arg(short, long, value_parser = crate::containers::parse_memory, default_value = "128m")]
    memory: i64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Stop the VM after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// `split`: the IOAPIC in twinbox, the LAPICs in KVM, no PIT; `kernel`: PIC, IOAPIC and PIT
    /// in KVM.
    #[arg(long, value_name = "split|kernel", default_value = "split")]
    irqchip: twinbox_microvm::IrqChip,
    /// Run the VMM unconfined, for debugging. By default, once the VM is built, the VMM moves
    /// into a mount namespace of its own (a private, empty, read-only root: only the vsock's
    /// socket directory is kept), the empty network namespace jailed VMMs share, an
    /// unprivileged uid/gid with no capabilities, and a seccomp allowlist per thread; a
    /// forbidden call ends it, named.
    #[arg(long)]
    no_jail: bool,
}

/// `PATH`, `PATH,ro` or `PATH,rw`.
fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let (path, read_only) = match s.rsplit_once(',') {
        Some((path, "ro")) => (path, true),
        Some((path, "rw")) => (path, false),
        _ => (s, false),
    };
    if path.is_empty() {
        return Err("a disk needs a path".into());
    }
    Ok(DiskConfig { path: PathBuf::from(path), read_only })
}

/// `CID,PATH`.
fn parse_vsock(s: &str) -> Result<twinbox_microvm::VsockConfig, String> {
    let (cid, path) = s.split_once(',').ok_or("give CID,PATH, e.g. 3,/tmp/vm.sock")?;
    let guest_cid = cid.parse().map_err(|_| format!("invalid CID {cid:?}: give a number from 3"))?;
    // Absolute: a jailed VMM's working directory is its jail's root.
    let uds_path = std::path::absolute(path).map_err(|e| format!("invalid socket path {path:?}: {e}"))?;
    Ok(twinbox_microvm::VsockConfig { guest_cid, uds_path })
}

/// `TAP` or `TAP,mac=MAC`.
fn parse_net(s: &str) -> Result<twinbox_microvm::NetConfig, String> {
    let (tap, mac) = match s.split_once(',') {
        Some((tap, rest)) => match rest.strip_prefix("mac=") {
            Some(mac) => (tap, Some(mac.to_owned())),
            None => return Err(format!("unknown option {rest:?}: give TAP or TAP,mac=MAC")),
        },
        None => (s, None),
    };
    Ok(twinbox_microvm::NetConfig { tap: tap.to_owned(), mac })
}

pub fn vm(a: VmArgs) -> Result<i32> {
    let mut config = VmConfig {
        memory_mib: u32::try_from(a.memory >> 20).unwrap_or(u32::MAX),
        vcpus: a.cpus,
        kernel: a.kernel,
        initrd: a.initrd,
        disks: a.disk,
        nets: a.net,
        vsock: a.vsock,
        timeout_ms: a.timeout.map(|s| (s * 1000.0) as u64),
        irqchip: a.irqchip,
        ..VmConfig::default()
    };
    if let Some(c) = a.cmdline {
        config.cmdline = c;
    }
    twinbox_microvm::vstate::watchdog::stop_on_signals()?;
    let started = *crate::STARTED.get_or_init(std::time::Instant::now);
    // The console goes to stdout as it comes; the log also watches for a kernel panic.
    let mut console = ConsoleLog::new(Some(Box::new(std::io::stdout())));
    let jail = (!a.no_jail).then(|| twinbox_microvm::jail::JailConfig {
        // A guest connecting to host port P reaches the socket `PATH_P` beside the vsock's.
        // (Not when that is /: the jail would hold the whole host.)
        binds: config
            .vsock
            .iter()
            .filter_map(|v| v.uds_path.parent().map(Path::to_path_buf))
            .filter(|dir| dir != Path::new("/"))
            .collect(),
        // Its socket, which it removes when the VM ends.
        owned: config.vsock.iter().map(|v| v.uds_path.clone()).collect(),
        ..Default::default()
    });
    let result = VmBuilder::new(config).start_time(started).jail(jail).build().and_then(|mut vm| vm.run(&mut console));
    if let Some(line) = console.panic_line() {
        anyhow::bail!("the guest kernel panicked: {line} (its console is above)");
    }
    let exit = match result {
        Err(VmError::Vcpu(VcpuError::Interrupted(sig))) => return Ok(128 + sig),
        r => r?,
    };
    if let Some(t) = exit.boot_time {
        tracing::info!(boot_time_us = t.as_micros() as u64, "guest boot timer");
    }
    Ok(exit.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_flags() {
        assert_eq!(parse_disk("/a.img").unwrap(), DiskConfig { path: "/a.img".into(), read_only: false });
        assert_eq!(parse_disk("/a.img,ro").unwrap(), DiskConfig { path: "/a.img".into(), read_only: true });
        assert_eq!(parse_disk("/a,b.img,rw").unwrap(), DiskConfig { path: "/a,b.img".into(), read_only: false });
        assert_eq!(parse_disk("/a,b.img").unwrap(), DiskConfig { path: "/a,b.img".into(), read_only: false });
        assert!(parse_disk(",ro").is_err());
        assert!(parse_disk("").is_err());
    }
}

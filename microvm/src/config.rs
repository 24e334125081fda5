//! `VmConfig`: what a microVM is made of, as plain data (serde) a CLI or a file fills in.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use twinbox_exit::ExitCode;

use crate::devices::virtio::{kernel_cmdline_entry, mmio_slot};

/// x86's COMMAND_LINE_SIZE, including the terminating NUL.
pub const MAX_CMDLINE_LEN: usize = 2048;
/// The MP table, in the first KiB of the EBDA, lists at most 37 processors; a round 32.
pub const MAX_VCPUS: u8 = 32;
/// Default kernel command line: serial console, `reboot=k` so a guest reboot reaches the
/// i8042 (which ends the VM), no PCI, panic reboots at once.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nokbd i8042.nopnp";
/// At most this many disks (virtio-mmio slots 0xd000_0000.., GSIs 5..=12).
pub const MAX_DISKS: usize = 8;

/// At most this many network cards (the slots after the disks').
pub const MAX_NETS: usize = 4;

/// A network card: a virtio-net device whose host end is a tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap's name: made when it does not exist (and removed when the VM ends), else taken.
    pub tap: String,
    /// The guest's MAC address (`02:42:0a:59:00:02`); without it the guest picks a random one.
    #[serde(default)]
    pub mac: Option<String>,
}

/// The socket device: the guest's CID, and the UNIX socket its host side listens on
/// (Firecracker's `vsock` object: `uds_path`, and `<uds_path>_<port>` for guest connections).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// 3 or more.
    pub guest_cid: u64,
    /// Made by the VMM (it must not exist), removed when the VM ends.
    pub uds_path: PathBuf,
}

/// A disk image the guest sees as a virtio block device (`/dev/vda`, `/dev/vdb`, ... in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The image file (or host block device).
    pub path: PathBuf,
    /// Open it read-only and tell the guest so (VIRTIO_BLK_F_RO); writes fail.
    #[serde(default)]
    pub read_only: bool,
}

impl DiskConfig {
    /// A read-write disk.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig { path: path.into(), read_only: false }
    }
}

/// Where the interrupt controllers live. Either way the local APICs are KVM's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IrqChip {
    /// `KVM_CAP_SPLIT_IRQCHIP`: the IOAPIC is emulated by the VMM and programs KVM's MSI routes;
    /// no PIC and no PIT, so the guest's clock events come from the LAPIC's TSC-deadline timer
    /// (CPUID says TSC-deadline and ARAT). Cloud Hypervisor's model. The default: KVM tears a
    /// VM without in-kernel PIC/IOAPIC/PIT down in well under a millisecond, where on PVM the
    /// full in-kernel set costs ≈ 25 ms at every VM's exit.
    #[default]
    Split,
    /// `KVM_CREATE_IRQCHIP` + `KVM_CREATE_PIT2`: PIC, IOAPIC and PIT all in the kernel, as
    /// Firecracker does.
    Kernel,
}

impl std::fmt::Display for IrqChip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IrqChip::Split => "split",
            IrqChip::Kernel => "kernel",
        })
    }
}

impl std::str::FromStr for IrqChip {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "split" => Ok(IrqChip::Split),
            "kernel" => Ok(IrqChip::Kernel),
            other => Err(format!("unknown irqchip {other:?}: use split or kernel")),
        }
    }
}

/// A microVM's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The guest kernel: an uncompressed ELF vmlinux or a bzImage.
    pub kernel: PathBuf,
    /// An initramfs, loaded below 3 GiB at the top of RAM.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// virtio-blk disks, at most [`MAX_DISKS`]; each adds a `virtio_mmio.device=` entry to the
    /// command line the kernel gets (see [`VmConfig::kernel_cmdline`]).
    pub disks: Vec<DiskConfig>,
    /// virtio-net cards (`eth0`, `eth1`, ... in order), at most [`MAX_NETS`], in the
    /// virtio-mmio slots after the disks.
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock device, in the slot after the network cards.
    pub vsock: Option<VsockConfig>,
    /// Stop the VM with an error when it runs longer than this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Where the IOAPIC (and PIC, PIT) are emulated.
    pub irqchip: IrqChip,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            memory_mib: 128,
            vcpus: 1,
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            timeout_ms: None,
            irqchip: IrqChip::default(),
        }
    }
}

/// A configuration that cannot describe a VM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// memory_mib is 0.
    #[error("memory must be at least 1 MiB")]
    NoMemory,
    /// vcpus out of range.
    #[error("{0} vCPUs asked: a microVM has 1 to {MAX_VCPUS}")]
    Vcpus(u8),
    /// The command line (with the virtio-mmio entries for the disks) is too long for x86's boot
    /// protocol.
    #[error("kernel command line is {0} bytes, the limit is {max}", max = MAX_CMDLINE_LEN - 1)]
    CmdlineTooLong(usize),
    /// The command line holds a NUL or a non-printable byte.
    #[error("kernel command line holds a control character")]
    CmdlineControlChar,
    /// timeout_ms is 0.
    #[error("a timeout of 0 ms would stop the VM before it starts")]
    ZeroTimeout,
    /// More disks than virtio-mmio slots.
    #[error("{0} disks asked: a microVM has at most {MAX_DISKS}")]
    TooManyDisks(usize),
    /// More network cards than slots.
    #[error("{0} network cards asked: a microVM has at most {MAX_NETS}")]
    TooManyNets(usize),
    /// The vsock CID is reserved or too large.
    #[error("vsock: invalid guest CID {0}: give 3 to 4294967294")]
    VsockCid(u64),
    /// A card's tap name or MAC address is malformed.
    #[error("network card {index}: {reason}")]
    Net {
        /// Which card.
        index: usize,
        /// What is wrong.
        reason: String,
    },
}

impl ExitCode for ConfigError {
    fn exit_code(&self) -> i32 {
        match self {
            ConfigError::NoMemory
            | ConfigError::Vcpus(_)
            | ConfigError::CmdlineTooLong(_)
            | ConfigError::CmdlineControlChar
            | ConfigError::ZeroTimeout
            | ConfigError::TooManyDisks(_)
            | ConfigError::TooManyNets(_)
            | ConfigError::VsockCid(_)
            | ConfigError::Net { .. } => twinbox_exit::USER_ERROR,
        }
    }
}

impl VmConfig {
    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.memory_mib == 0 {
            return Err(ConfigError::NoMemory);
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks(self.disks.len()));
        }
        if self.nets.len() > MAX_NETS {
            return Err(ConfigError::TooManyNets(self.nets.len()));
        }
        for (index, net) in self.nets.iter().enumerate() {
            let bad = |e: crate::devices::virtio::net::NetError| ConfigError::Net { index, reason: e.to_string() };
            crate::devices::virtio::net::check_tap_name(&net.tap).map_err(bad)?;
            if let Some(mac) = &net.mac {
                crate::devices::virtio::net::parse_mac(mac).map_err(bad)?;
            }
        }
        if let Some(v) = &self.vsock {
            if !(3..u64::from(u32::MAX)).contains(&v.guest_cid) {
                return Err(ConfigError::VsockCid(v.guest_cid));
            }
        }
        let cmdline_len = self.kernel_cmdline().len();
        if cmdline_len >= MAX_CMDLINE_LEN {
            return Err(ConfigError::CmdlineTooLong(cmdline_len));
        }
        if self.cmdline.chars().any(|c| c.is_control()) {
            return Err(ConfigError::CmdlineControlChar);
        }
        if self.timeout_ms == Some(0) {
            return Err(ConfigError::ZeroTimeout);
        }
        Ok(())
    }

    /// The command line the kernel gets: `cmdline`, then ` virtio_mmio.device=4K@<base>:<gsi>`
    /// for each disk, then each network card, then the vsock device, in order.
    pub fn kernel_cmdline(&self) -> String {
        let mut line = self.cmdline.clone();
        for i in 0..self.disks.len() + self.nets.len() + usize::from(self.vsock.is_some()) {
            let (base, gsi) = mmio_slot(i);
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(&kernel_cmdline_entry(base, gsi));
        }
        line
    }

    /// The timeout as a `Duration`.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_ms.map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        VmConfig::default().validate().unwrap();
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        let base = VmConfig::default();
        let cases = [
            (VmConfig { memory_mib: 0, ..base.clone() }, ConfigError::NoMemory),
            (VmConfig { vcpus: 0, ..base.clone() }, ConfigError::Vcpus(0)),
            (VmConfig { vcpus: 255, ..base.clone() }, ConfigError::Vcpus(255)),
            (VmConfig { cmdline: "x".repeat(2048), ..base.clone() }, ConfigError::CmdlineTooLong(2048)),
            (VmConfig { cmdline: "a\0b".into(), ..base.clone() }, ConfigError::CmdlineControlChar),
            (VmConfig { timeout_ms: Some(0), ..base.clone() }, ConfigError::ZeroTimeout),
            (VmConfig { disks: vec![DiskConfig::new("d.img"); 9], ..base.clone() }, ConfigError::TooManyDisks(9)),
            (
                VmConfig { cmdline: "x".repeat(2000), disks: vec![DiskConfig::new("d.img"); 2], ..base.clone() },
                ConfigError::CmdlineTooLong(2000 + 2 * 35),
            ),
        ];
        for (config, want) in cases {
            assert_eq!(config.validate(), Err(want));
        }
    }

    #[test]
    fn serde_round_trip_and_defaults() {
        let c: VmConfig = serde_json::from_str(r#"{"kernel":"/k","memory_mib":256,"timeout_ms":5000}"#).unwrap();
        assert_eq!(c.memory_mib, 256);
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert_eq!(c.timeout(), Some(Duration::from_secs(5)));
        assert_eq!(c.irqchip, IrqChip::Split);
        let k: VmConfig = serde_json::from_str(r#"{"irqchip":"kernel"}"#).unwrap();
        assert_eq!(k.irqchip, IrqChip::Kernel);
        assert!(serde_json::from_str::<VmConfig>(r#"{"irqchip":"userspace"}"#).is_err());
        assert_eq!("kernel".parse::<IrqChip>(), Ok(IrqChip::Kernel));
        assert_eq!(IrqChip::Split.to_string().parse::<IrqChip>(), Ok(IrqChip::Split));
        assert!("pic".parse::<IrqChip>().unwrap_err().contains("split or kernel"));
        let back: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(serde_json::from_str::<VmConfig>(r#"{"memroy_mib":1}"#).is_err());
    }

    #[test]
    fn disks_are_valid_and_named_on_the_kernel_command_line() {
        let config = VmConfig {
            cmdline: "console=ttyS0".into(),
            disks: vec![DiskConfig::new("/a.img"), DiskConfig { path: "/b.img".into(), read_only: true }],
            ..VmConfig::default()
        };
        config.validate().unwrap();
        assert_eq!(
            config.kernel_cmdline(),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        let none = VmConfig { cmdline: "quiet".into(), ..VmConfig::default() };
        assert_eq!(none.kernel_cmdline(), "quiet");
        let eight = VmConfig { disks: vec![DiskConfig::new("d"); MAX_DISKS], ..VmConfig::default() };
        eight.validate().unwrap();
        assert!(eight.kernel_cmdline().ends_with("virtio_mmio.device=4K@0xd0007000:12"));
    }

    #[test]
    fn network_cards_follow_the_disks_and_are_checked() {
        let config = VmConfig {
            cmdline: "quiet".into(),
            disks: vec![DiskConfig::new("/a.img")],
            nets: vec![NetConfig { tap: "tbt0".into(), mac: Some("02:42:0a:59:00:02".into()) }],
            ..VmConfig::default()
        };
        config.validate().unwrap();
        assert_eq!(
            config.kernel_cmdline(),
            "quiet virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        let c: VmConfig = serde_json::from_str(r#"{"nets":[{"tap":"tap0"}]}"#).unwrap();
        assert_eq!(c.nets, vec![NetConfig { tap: "tap0".into(), mac: None }]);
        let bad = |nets: Vec<NetConfig>| VmConfig { nets, ..VmConfig::default() }.validate().unwrap_err();
        let five = vec![NetConfig { tap: "t".into(), mac: None }; MAX_NETS + 1];
        assert_eq!(bad(five), ConfigError::TooManyNets(MAX_NETS + 1));
        for tap in ["", "a/b", "sixteen-chars-xx", "a b"] {
            let e = bad(vec![NetConfig { tap: tap.into(), mac: None }]);
            assert!(e.to_string().starts_with("network card 0: invalid tap name"), "{tap}: {e}");
        }
        let e = bad(vec![NetConfig { tap: "t0".into(), mac: Some("02:42".into()) }]);
        assert!(e.to_string().contains("invalid MAC address \"02:42\""), "{e}");
    }

    #[test]
    fn disk_serde_defaults_and_unknown_fields() {
        let c: VmConfig =
            serde_json::from_str(r#"{"disks":[{"path":"/r.img"},{"path":"/o.img","read_only":true}]}"#).unwrap();
        assert_eq!(c.disks, vec![DiskConfig::new("/r.img"), DiskConfig { path: "/o.img".into(), read_only: true }]);
        assert!(serde_json::from_str::<VmConfig>(r#"{"disks":[{"path":"/r.img","ro":true}]}"#).is_err());
        assert!(serde_json::from_str::<VmConfig>(r#"{"disks":["/r.img"]}"#).is_err());
    }
}

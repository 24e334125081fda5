//! `GuestConfig`: what the agent runs, written by the host into the initramfs as JSON.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The longest hostname Linux accepts (`HOST_NAME_MAX`).
pub const MAX_HOSTNAME_LEN: usize = 64;

/// The workload and its root file system, as the agent reads them from
/// [`CONFIG_PATH`](crate::CONFIG_PATH). Every field has a default; unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestConfig {
    /// argv. `args[0]` is searched in the `PATH` of `env` when it holds no '/', like `execvp`.
    pub args: Vec<String>,
    /// The environment, "K=V", final (the host merged the image's and the user's).
    pub env: Vec<String>,
    /// The working directory, absolute; created (owned by root, 0755) if missing, as runc does.
    pub cwd: String,
    /// User id the workload runs as.
    pub uid: u32,
    /// Group id the workload runs as.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// The guest's hostname; empty keeps the kernel's.
    pub hostname: String,
    /// The image's root disk.
    pub root_device: String,
    /// Its file system type.
    pub root_fstype: String,
    /// The workload's root is read-only (`docker run --read-only`); otherwise writes go to a
    /// tmpfs upper layer and vanish with the VM.
    pub read_only: bool,
    /// The agent logs its steps, with times since boot, on the stderr port ("twinbox-agent: ").
    pub verbose: bool,
    /// eth0's set-up, when the VM is on a network (lo is brought up either way).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<GuestNetwork>,
    /// The workload's /etc/hosts, written over the image's when not empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hosts: String,
    /// The workload's /etc/resolv.conf, written over the image's when not empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub resolv_conf: String,
    /// Disks mounted into the workload's root (named volumes), after the root disk.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<GuestVolume>,
    /// Boot as a warm template: no workload in this configuration (`args` may be empty and is
    /// not run); wait for a `start` request on the control channel
    /// ([`StartRequest`](crate::control::StartRequest)), which brings the workload's own.
    #[serde(default)]
    pub template: bool,
}

/// A disk of the VM mounted at a path of the workload's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestVolume {
    /// Its device node, e.g. /dev/vdb.
    pub device: String,
    /// An ext4 file system's mount point, absolute, made if missing.
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

/// How the agent sets up eth0 (the first virtio-net card): an address, the default route via a
/// gateway, the MTUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestNetwork {
    /// eth0's address.
    pub address: Ipv4Addr,
    /// Its prefix length (24 for a /24).
    pub prefix_len: u8,
    /// The default route's gateway.
    pub gateway: Ipv4Addr,
    /// eth0's MTU.
    pub mtu: u32,
    /// The default route's MTU, when below eth0's (what leaves the host's bridge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_mtu: Option<u32>,
    /// eth0's MAC address, "aa:bb:cc:dd:ee:ff", set before eth0 comes up (a VM restored from a
    /// template's snapshot still has the template's card and its address); without it the
    /// card keeps the one the VMM gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// The six bytes of a MAC address written "aa:bb:cc:dd:ee:ff" (hex digits of either case);
/// None for any other text.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            args: Vec::new(),
            env: Vec::new(),
            cwd: "/".to_string(),
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
            hostname: String::new(),
            root_device: "/dev/vda".to_string(),
            root_fstype: "ext4".to_string(),
            read_only: false,
            verbose: false,
            network: None,
            hosts: String::new(),
            resolv_conf: String::new(),
            volumes: Vec::new(),
            template: false,
        }
    }
}

/// A configuration the agent cannot run.
#[derive(Debug, thiserror::Error)]
pub enum GuestConfigError {
    /// Not JSON, or not this schema.
    #[error("cannot parse the guest configuration")]
    Json(#[source] serde_json::Error),
    /// `args` is empty (and the configuration is not a template's).
    #[error("no command to run (args is empty)")]
    NoArgs,
    /// `cwd` is not absolute.
    #[error("cwd {0:?} is not an absolute path")]
    RelativeCwd(String),
    /// `root_device` is not an absolute path.
    #[error("root_device {0:?} is not an absolute path")]
    RootDevice(String),
    /// `root_fstype` is empty.
    #[error("root_fstype is empty")]
    NoFstype,
    /// `hostname` is too long for Linux.
    #[error("hostname is {0} bytes, the limit is {MAX_HOSTNAME_LEN}")]
    HostnameTooLong(usize),
    /// The network set-up is not one Linux takes.
    #[error("network: {0}")]
    Network(String),
    /// A volume's device is not under /dev or its target is not an absolute path.
    #[error("volume {0}: the device must be under /dev and the target an absolute path without `..`")]
    Volume(String),
    /// A string holds a NUL byte, which no system call can take.
    #[error("{field} holds a NUL byte")]
    Nul {
        /// Which field.
        field: &'static str,
    },
}

impl GuestConfig {
    /// The configuration as the agent reads it (pretty JSON).
    pub fn to_json(&self) -> String {
        // Strings, integers, booleans and lists of them always serialize.
        serde_json::to_string_pretty(self).expect("a GuestConfig always serializes")
    }

    /// Parses and [validates](Self::validate) a configuration.
    pub fn from_json(json: impl AsRef<[u8]>) -> Result<Self, GuestConfigError> {
        let config: GuestConfig = serde_json::from_slice(json.as_ref()).map_err(GuestConfigError::Json)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the agent would otherwise only find out in the guest.
    pub fn validate(&self) -> Result<(), GuestConfigError> {
        if self.args.is_empty() && !self.template {
            return Err(GuestConfigError::NoArgs);
        }
        if !self.cwd.starts_with('/') {
            return Err(GuestConfigError::RelativeCwd(self.cwd.clone()));
        }
        if !self.root_device.starts_with('/') {
            return Err(GuestConfigError::RootDevice(self.root_device.clone()));
        }
        if self.root_fstype.is_empty() {
            return Err(GuestConfigError::NoFstype);
        }
        if self.hostname.len() > MAX_HOSTNAME_LEN {
            return Err(GuestConfigError::HostnameTooLong(self.hostname.len()));
        }
        for v in &self.volumes {
            if !v.device.starts_with("/dev/") || !v.target.starts_with('/') || v.target.split('/').any(|c| c == "..") {
                return Err(GuestConfigError::Volume(format!("{} at {}", v.device, v.target)));
            }
        }
        if let Some(n) = &self.network {
            if n.prefix_len > 32 {
                return Err(GuestConfigError::Network(format!("prefix length {} is above 32", n.prefix_len)));
            }
            for mtu in std::iter::once(n.mtu).chain(n.route_mtu) {
                if !(68..=65535).contains(&mtu) {
                    return Err(GuestConfigError::Network(format!("MTU {mtu} is outside 68..=65535")));
                }
            }
            if let Some(mac) = &n.mac {
                // Linux refuses a multicast or all-zero address for an Ethernet card.
                match parse_mac(mac) {
                    None => {
                        return Err(GuestConfigError::Network(format!(
                            "MAC address {mac:?} is not of the form aa:bb:cc:dd:ee:ff"
                        )))
                    }
                    Some(bytes) if bytes[0] & 1 == 1 || bytes == [0; 6] => {
                        return Err(GuestConfigError::Network(format!("MAC address {mac} is not a unicast address")))
                    }
                    Some(_) => {}
                }
            }
        }
        let fields: [(&'static str, &[String]); 6] = [
            ("args", &self.args),
            ("env", &self.env),
            ("cwd", std::slice::from_ref(&self.cwd)),
            ("hostname", std::slice::from_ref(&self.hostname)),
            ("root_device", std::slice::from_ref(&self.root_device)),
            ("root_fstype", std::slice::from_ref(&self.root_fstype)),
        ];
        for (field, values) in fields {
            if values.iter().any(|v| v.contains('\0')) {
                return Err(GuestConfigError::Nul { field });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GuestConfig {
        GuestConfig {
            args: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["PATH=/usr/bin:/bin".into(), "HOME=/root".into()],
            cwd: "/work".into(),
            uid: 1000,
            gid: 100,
            additional_gids: vec![10, 20],
            hostname: "box".into(),
            read_only: true,
            verbose: true,
            network: Some(GuestNetwork {
                address: Ipv4Addr::new(10, 89, 0, 5),
                prefix_len: 16,
                gateway: Ipv4Addr::new(10, 89, 0, 1),
                mtu: 65520,
                route_mtu: Some(1500),
                mac: Some("02:42:0A:59:00:05".into()),
            }),
            hosts: "127.0.0.1\tlocalhost\n10.89.0.5\tbox\n".into(),
            resolv_conf: "nameserver 10.89.0.1\n".into(),
            ..GuestConfig::default()
        }
    }

    #[test]
    fn round_trips_through_json() {
        let config = sample();
        assert_eq!(GuestConfig::from_json(config.to_json()).unwrap(), config);
    }

    #[test]
    fn defaults_fill_missing_fields() {
        let config = GuestConfig::from_json(r#"{"args": ["/hello"]}"#).unwrap();
        assert_eq!(config.args, ["/hello"]);
        assert_eq!(config.cwd, "/");
        assert_eq!(config.root_device, "/dev/vda");
        assert_eq!(config.root_fstype, "ext4");
        assert!(!config.read_only && !config.verbose && !config.template);
        assert!(!config.to_json().contains("mac"), "no MAC, no field");
        assert_eq!((config.uid, config.gid), (0, 0));
    }

    #[test]
    fn refuses_unknown_fields_and_bad_json() {
        let err = GuestConfig::from_json(r#"{"args": ["x"], "argz": []}"#).unwrap_err();
        assert!(matches!(err, GuestConfigError::Json(_)), "{err:?}");
        assert!(std::error::Error::source(&err).unwrap().to_string().contains("argz"));
        assert!(matches!(GuestConfig::from_json(b"{"), Err(GuestConfigError::Json(_))));
        assert!(matches!(GuestConfig::from_json(r#"{"uid": -1, "args": ["x"]}"#), Err(GuestConfigError::Json(_))));
    }

    #[test]
    fn validation_catches_what_the_guest_could_not_run() {
        let check = |edit: fn(&mut GuestConfig)| {
            let mut c = sample();
            edit(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert_eq!(check(|c| c.args.clear()), "no command to run (args is empty)");
        assert_eq!(check(|c| c.cwd = "work".into()), r#"cwd "work" is not an absolute path"#);
        assert_eq!(check(|c| c.root_device = "vda".into()), r#"root_device "vda" is not an absolute path"#);
        assert_eq!(check(|c| c.root_fstype.clear()), "root_fstype is empty");
        assert_eq!(check(|c| c.hostname = "h".repeat(65)), "hostname is 65 bytes, the limit is 64");
        assert_eq!(check(|c| c.env.push("A=\0".into())), "env holds a NUL byte");
        assert_eq!(check(|c| c.args[2] = "\0".into()), "args holds a NUL byte");
        assert_eq!(check(|c| c.network.as_mut().unwrap().prefix_len = 33), "network: prefix length 33 is above 32");
        assert_eq!(
            check(|c| c.network.as_mut().unwrap().route_mtu = Some(40)),
            "network: MTU 40 is outside 68..=65535"
        );
        assert!(sample().validate().is_ok());
    }

    #[test]
    fn macs_are_checked_when_the_configuration_is() {
        let with_mac = |mac: &str| {
            let mut c = sample();
            c.network.as_mut().unwrap().mac = Some(mac.into());
            c.validate().map_err(|e| e.to_string())
        };
        assert_eq!(with_mac("02:00:0a:59:00:05"), Ok(()));
        assert_eq!(
            with_mac("02:00:0a:59:00"),
            Err(r#"network: MAC address "02:00:0a:59:00" is not of the form aa:bb:cc:dd:ee:ff"#.into())
        );
        for bad in
            ["02-00-0a-59-00-05", "2:00:0a:59:00:05", "02:00:0a:59:00:05:", "02:00:0a:59:00:0g", "+2:00:0a:59:00:05"]
        {
            assert!(with_mac(bad).unwrap_err().contains("is not of the form"), "{bad}");
        }
        assert_eq!(
            with_mac("01:00:5e:00:00:01"),
            Err("network: MAC address 01:00:5e:00:00:01 is not a unicast address".into())
        );
        assert!(with_mac("00:00:00:00:00:00").is_err());
        let json = sample().to_json().replace(r#""02:42:0A:59:00:05""#, r#""02:42:0a:59""#);
        assert!(matches!(GuestConfig::from_json(json), Err(GuestConfigError::Network(_))), "refused when parsed");
    }

    #[test]
    fn mac_text_parses_to_six_bytes() {
        assert_eq!(parse_mac("02:42:0A:59:00:ff"), Some([2, 0x42, 0x0a, 0x59, 0, 0xff]));
        assert_eq!(parse_mac(""), None);
        assert_eq!(parse_mac("02:42:0a:59:00:ff:01"), None);
        assert_eq!(parse_mac("0242:0a:59:00:ff"), None);
    }

    #[test]
    fn a_template_needs_no_command() {
        let template = GuestConfig::from_json(r#"{"template": true}"#).unwrap();
        assert!(template.template && template.args.is_empty());
        assert_eq!(GuestConfig::from_json(template.to_json()).unwrap(), template);
        let err = GuestConfig::from_json(r#"{"template": false}"#).unwrap_err();
        assert!(matches!(err, GuestConfigError::NoArgs), "{err:?}");
        assert!(matches!(GuestConfig::from_json(r#"{"template": 1}"#), Err(GuestConfigError::Json(_))));
    }
}

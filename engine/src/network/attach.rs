//! A container on a bridge network: its network namespace is the one the runtime made for
//! its init (the runtime stays network-agnostic, as runc); once the init exists (created, not
//! started), a veth pair joins it to the bridge: the host end (`tbv<id8>`) on the bridge, the
//! other end as `eth0` in the container with its address and a default route via the gateway.
//! The pair dies with the namespace when the container ends, so only the address has to be
//! given back.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::sched::{setns, CloneFlags};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use super::netlink::{Netlink, NetlinkError};
use super::{Network, NetworkError};

/// How a container is networked (`--network`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode", content = "name")]
pub enum NetworkMode {
    /// Its own namespace with loopback only.
    #[default]
    None,
    /// The host's namespace.
    Host,
    /// The namespace of another container (`container:NAME`), which must be running.
    Container(String),
    /// Its own namespace on a bridge network.
    Bridge(String),
    /// Its own namespace attached by the plugins of a CNI network configuration (`cni:NAME`).
    Cni(String),
}

impl std::str::FromStr for NetworkMode {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "none" => NetworkMode::None,
            "host" => NetworkMode::Host,
            _ => match (s.strip_prefix("container:"), s.strip_prefix("cni:")) {
                (Some(c), _) => NetworkMode::Container(c.to_owned()),
                (_, Some(n)) => NetworkMode::Cni(n.to_owned()),
                _ => NetworkMode::Bridge(s.to_owned()),
            },
        })
    }
}

/// Where a container sits on a bridge network, as its record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub network: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// The host end of the veth pair.
    pub host_veth: String,
    /// The MTU of the veth pair (else the kernel's 1500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The MTU of the container's default route, when it is below the link's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_mtu: Option<u32>,
}

impl Endpoint {
    /// The endpoint container `id` gets on `network` with `ip`.
    pub fn new(network: &Network, ip: Ipv4Addr, id: &str) -> Self {
        Endpoint {
            network: network.name.clone(),
            ip,
            prefix_len: network.subnet.prefix_len,
            gateway: network.gateway,
            host_veth: format!("tbv{}", &id[..id.len().min(8)]),
            mtu: Some(network.mtu.unwrap_or(super::LINK_MTU)),
            route_mtu: network.mtu.is_none().then_some(super::ROUTE_MTU),
        }
    }
}

impl Endpoint {
    /// How a microVM's guest agent sets eth0 up for this endpoint: with the MAC its card has
    /// (which a VM restored from a template's snapshot must be told; the card kept the
    /// template's).
    pub fn guest_network(&self) -> twinbox_microvm::agent::GuestNetwork {
        twinbox_microvm::agent::GuestNetwork {
            mac: Some(mac_text(mac_for(self.ip))),
            address: self.ip,
            prefix_len: self.prefix_len,
            gateway: self.gateway,
            mtu: self.mtu.unwrap_or(1500),
            route_mtu: self.route_mtu,
        }
    }
}

/// Joins the network namespace of process `pid` to `bridge` through a new veth pair. On error
/// the pair is removed again.
pub fn connect(endpoint: &Endpoint, bridge: &str, pid: i32) -> Result<(), NetworkError> {
    let netns_path = format!("/proc/{pid}/ns/net");
    let netns: OwnedFd = nix::fcntl::open(netns_path.as_str(), OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| NetworkError::Io { op: "open", path: netns_path.clone().into(), source: e.into() })?;
    let mut nl = Netlink::open()?;
    let bridge_index = nl.link_index(bridge)?.ok_or_else(|| NetworkError::NoSuchNetwork(endpoint.network.clone()))?;
    // The pair of this container's previous run, if its namespace is not freed yet.
    if let Some(old) = nl.link_index(&endpoint.host_veth)? {
        nl.delete_link(old, &endpoint.host_veth)?;
    }
    nl.add_veth(&endpoint.host_veth, "eth0", mac_for(endpoint.ip), netns.as_raw_fd(), endpoint.mtu)?;
    let joined = (|| {
        let host = nl
            .link_index(&endpoint.host_veth)?
            .ok_or_else(|| NetworkError::NoSuchNetwork(endpoint.host_veth.clone()))?;
        nl.set_controller(host, bridge_index, &endpoint.host_veth)?;
        nl.set_up(host, &endpoint.host_veth)?;
        configure_inside(&netns, endpoint)
    })();
    if let Err(e) = joined {
        if let Ok(Some(i)) = nl.link_index(&endpoint.host_veth) {
            let _ = nl.delete_link(i, &endpoint.host_veth);
        }
        return Err(e);
    }
    Ok(())
}

/// Removes the endpoint's host link if it is still there (a veth whose container end lives in
/// a namespace something else keeps); a microVM's tap went with its VMM.
pub fn disconnect(endpoint: &Endpoint) -> Result<(), NetworkError> {
    let mut nl = Netlink::open()?;
    if let Some(index) = nl.link_index(&endpoint.host_veth)? {
        match nl.delete_link(index, &endpoint.host_veth) {
            // Gone meanwhile, with its namespace.
            Err(e) if e.errno() == Some(libc::ENODEV) => {}
            other => other?,
        }
    }
    Ok(())
}

/// Puts the tap of a microVM on `bridge`: the endpoint's MTU, the bridge, up. The tap is the
/// VMM's (made when it opened it, gone when it ends), so nothing needs undoing on error.
pub fn connect_tap(endpoint: &Endpoint, bridge: &str) -> Result<(), NetworkError> {
    let mut nl = Netlink::open()?;
    let bridge_index = nl.link_index(bridge)?.ok_or_else(|| NetworkError::NoSuchNetwork(endpoint.network.clone()))?;
    let tap = &endpoint.host_veth;
    let index = nl.link_index(tap)?.ok_or_else(|| NetworkError::NoSuchNetwork(tap.clone()))?;
    if let Some(mtu) = endpoint.mtu {
        nl.set_mtu(index, mtu, tap)?;
    }
    nl.set_controller(index, bridge_index, tap)?;
    nl.set_up(index, tap)?;
    Ok(())
}

/// The host link of instance `id` when it is a microVM (its tap), beside the `tbv` veths of
/// containers.
pub fn tap_name(id: &str) -> String {
    format!("tbt{}", &id[..id.len().min(8)])
}

/// `mac` as `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// A container's MAC address, derived from its IPv4 address as Docker does (02:42 and the four
/// bytes of the address; locally administered): a new container that gets a freed address
/// also gets its MAC, so the bridge's neighbours still reach it while the kernel frees the
/// old pair.
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x02, 0x42, a, b, c, d]
}

/// In the container's namespace (from a thread that enters it, so the rest of the process
/// stays where it is): eth0's address, eth0 and lo up, the default route via the gateway.
fn configure_inside(netns: &OwnedFd, endpoint: &Endpoint) -> Result<(), NetworkError> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<(), NetworkError> {
            setns(netns, CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetworkError::Netlink(NetlinkError {
                    what: "enter the container's network namespace".into(),
                    source: e.into(),
                })
            })?;
            let mut nl = Netlink::open()?;
            let eth0 = nl.link_index("eth0")?.ok_or_else(|| NetworkError::NoSuchNetwork("eth0".into()))?;
            nl.add_address(eth0, endpoint.ip, endpoint.prefix_len, "eth0")?;
            nl.set_up(eth0, "eth0")?;
            if let Some(lo) = nl.link_index("lo")? {
                nl.set_up(lo, "lo")?;
            }
            nl.add_default_route(endpoint.gateway, eth0, endpoint.route_mtu)?;
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetworkError::Netlink(NetlinkError {
                what: "configure the container's network".into(),
                source: std::io::Error::other("the thread panicked"),
            }))
        })
    })
}

/// `/etc/hosts` for a container: localhost, and its own name on its address.
pub fn hosts_file(hostname: &str, ip: Option<Ipv4Addr>) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    match ip {
        Some(ip) => s.push_str(&format!("{ip}\t{hostname}\n")),
        None => s.push_str(&format!("127.0.1.1\t{hostname}\n")),
    }
    s
}

/// `/etc/hosts` for a container on a bridge network: [`hosts_file`] with its own address,
/// then every other container of the network by name (and hostname, when it differs), so that
/// containers reach each other by name without a DNS server. `others`: address, names.
pub fn network_hosts_file(hostname: &str, ip: Ipv4Addr, others: &[(Ipv4Addr, Vec<String>)]) -> String {
    let mut s = hosts_file(hostname, Some(ip));
    for (other, names) in others {
        if *other != ip && !names.is_empty() {
            s.push_str(&format!("{other}\t{}\n", names.join(" ")));
        }
    }
    s
}

/// `/etc/resolv.conf` for a container on a bridge network: the host's name servers, without
/// those on its loopback (which the container cannot reach), and its search domains.
pub fn resolv_conf(host: &str) -> String {
    let mut out = String::new();
    for line in host.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["nameserver", addr, ..] => {
                let loopback = addr.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback());
                if !loopback {
                    out.push_str(&format!("nameserver {addr}\n"));
                }
            }
            ["search", ..] | ["domain", ..] | ["options", ..] => {
                out.push_str(line.trim());
                out.push('\n');
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_docker_names_them() {
        assert_eq!("none".parse::<NetworkMode>().unwrap(), NetworkMode::None);
        assert_eq!("host".parse::<NetworkMode>().unwrap(), NetworkMode::Host);
        assert_eq!("container:web".parse::<NetworkMode>().unwrap(), NetworkMode::Container("web".into()));
        assert_eq!("backend".parse::<NetworkMode>().unwrap(), NetworkMode::Bridge("backend".into()));
        let json = serde_json::to_string(&NetworkMode::Bridge("b".into())).unwrap();
        assert_eq!(json, r#"{"mode":"bridge","name":"b"}"#);
        assert_eq!(serde_json::from_str::<NetworkMode>(r#"{"mode":"none"}"#).unwrap(), NetworkMode::None);
    }

    #[test]
    fn macs_follow_addresses() {
        assert_eq!(mac_for(Ipv4Addr::new(10, 89, 0, 2)), [0x02, 0x42, 10, 89, 0, 2]);
        assert_eq!(mac_for(Ipv4Addr::new(10, 89, 0, 2))[0] & 0b11, 0b10, "unicast, locally administered");
    }

    #[test]
    fn etc_files() {
        let h = hosts_file("web", Some(Ipv4Addr::new(10, 89, 0, 2)));
        assert!(h.starts_with("127.0.0.1\tlocalhost\n") && h.ends_with("10.89.0.2\tweb\n"), "{h}");
        assert!(hosts_file("web", None).ends_with("127.0.1.1\tweb\n"));
        let ip = |d| Ipv4Addr::new(10, 89, 0, d);
        let others = [(ip(2), vec!["web".to_string()]), (ip(3), vec!["db".to_string(), "db-host".to_string()])];
        let h = network_hosts_file("web", ip(2), &others);
        assert!(h.ends_with("10.89.0.2\tweb\n10.89.0.3\tdb db-host\n"), "{h}");
        let host = "# generated\nnameserver 127.0.0.53\nnameserver 192.0.2.53\nsearch example.test\noptions edns0\n";
        assert_eq!(resolv_conf(host), "nameserver 192.0.2.53\nsearch example.test\noptions edns0\n");
    }
}

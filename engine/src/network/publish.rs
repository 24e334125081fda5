//! Published ports (`-p [IP:][HOST:]CONTAINER[/tcp|/udp]`): a host port that forwards to a
//! port of a container on a bridge network.
//!
//! How: DNAT, with a proxy in user space holding the ports, as Docker does with its
//! `docker-proxy`. The engine binds every host port itself before the container starts (so a
//! port already taken is refused at once, naming it), then hands the listening sockets to one
//! proxy process per container, which accepts and copies both ways to the container's address.
//! Then it adds the container's nftables rules ([`super::nft::publish_rules`]): a connection
//! to any local address of the host on that port, 127.0.0.1 included (the bridge has
//! `route_localnet`), goes straight to the container and never reaches the proxy, which
//! forwards only when the rules could not be made. The proxy watches the container's init
//! through a pidfd (taken by the engine as soon as the init exists) and exits with it, so a
//! SIGKILLed twinbox leaves no proxy behind; its rules go with `rm` (or the next publish of
//! the store, for a container whose directory is gone). A UDP port is held by the proxy (so it
//! is reserved and a taken one refused alike) and forwarded by DNAT only.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, OwnedFd};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The most ports one container may publish.
pub const MAX_PUBLISHED: usize = 64;

/// One `-p`: where on the host, which container port, and (once bound) the host port it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// The host address to listen on (all of them when absent).
    pub host_ip: Option<IpAddr>,
    /// The host port; 0 asks for a free one.
    pub host_port: u16,
    pub container_port: u16,
    /// UDP rather than TCP.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub udp: bool,
}

impl PortMapping {
    /// `tcp` or `udp`.
    pub fn protocol(&self) -> &'static str {
        if self.udp {
            "udp"
        } else {
            "tcp"
        }
    }
}

/// A `-p` that cannot be understood.
#[derive(Debug, thiserror::Error)]
#[error("invalid port publication {spec:?}: {why}; use [IP:][HOST_PORT:]CONTAINER_PORT[/tcp|/udp], such as 8080:80")]
pub struct PortSpecError {
    pub spec: String,
    pub why: &'static str,
}

impl twinbox_exit::ExitCode for PortSpecError {
    fn exit_code(&self) -> i32 {
        twinbox_exit::USER_ERROR
    }
}

impl FromStr for PortMapping {
    type Err = PortSpecError;

    fn from_str(spec: &str) -> Result<Self, PortSpecError> {
        let bad = |why| PortSpecError { spec: spec.to_owned(), why };
        let (ports, udp) = match spec.rsplit_once('/') {
            Some((p, "tcp")) => (p, false),
            Some((p, "udp")) => (p, true),
            Some(_) => return Err(bad("the protocol must be tcp or udp")),
            None => (spec, false),
        };
        let port = |s: &str, zero_ok: bool| -> Result<u16, PortSpecError> {
            match s.parse::<u16>() {
                Ok(0) if !zero_ok => Err(bad("a port is 1 to 65535")),
                Ok(p) => Ok(p),
                Err(_) => Err(bad("a port is a number from 1 to 65535")),
            }
        };
        let parts: Vec<&str> = ports.rsplitn(3, ':').collect();
        let (host_ip, host_port, container_port) = match parts.as_slice() {
            [c] => (None, 0, port(c, false)?),
            [c, h] => (None, port(h, false)?, port(c, false)?),
            [c, h, ip] => {
                let ip = ip.trim_start_matches('[').trim_end_matches(']');
                let ip: IpAddr = ip.parse().map_err(|_| bad("the host address is not an IP address"))?;
                (Some(ip), if h.is_empty() { 0 } else { port(h, false)? }, port(c, false)?)
            }
            _ => return Err(bad("too many ':'")),
        };
        Ok(PortMapping { host_ip, host_port, container_port, udp })
    }
}

impl std::fmt::Display for PortMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ip = self.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        write!(f, "{ip}:{}->{}/{}", self.host_port, self.container_port, self.protocol())
    }
}

/// The ports an image EXPOSEs (`8080/tcp`, `8080`, `53/udp`), for `-P`: each on a free host
/// port; other protocols (sctp) are left out.
pub fn exposed(config: &oci_spec::image::ImageConfiguration) -> Vec<PortMapping> {
    let ports = config.config().as_ref().and_then(|c| c.exposed_ports().clone()).unwrap_or_default();
    let mut out: Vec<PortMapping> = ports
        .iter()
        .filter_map(|p| {
            let (n, udp) = match p.split_once('/') {
                Some((n, "tcp")) | Some((n, "")) => (n, false),
                Some((n, "udp")) => (n, true),
                Some(_) => return None,
                None => (p.as_str(), false),
            };
            let container_port = n.parse().ok().filter(|p| *p != 0)?;
            Some(PortMapping { host_ip: None, host_port: 0, container_port, udp })
        })
        .collect();
    out.sort_by_key(|m| (m.container_port, m.udp));
    out.dedup();
    out
}

/// Binds every mapping's host port; the sockets (TCP listeners, UDP sockets), and the mappings
/// with the ports they got. A port already taken is an error naming it.
pub fn bind(mappings: &[PortMapping]) -> Result<(Vec<OwnedFd>, Vec<PortMapping>), PublishError> {
    if mappings.len() > MAX_PUBLISHED {
        return Err(PublishError::TooMany(mappings.len()));
    }
    let mut listeners = Vec::new();
    let mut bound = Vec::new();
    for m in mappings {
        let ip = m.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let addr = SocketAddr::new(ip, m.host_port);
        let err = |source| PublishError::Bind { mapping: m.to_string(), source };
        let (fd, port) = if m.udp {
            let s = std::net::UdpSocket::bind(addr).map_err(err)?;
            let port = s.local_addr().map_err(err)?.port();
            (OwnedFd::from(s), port)
        } else {
            let l = TcpListener::bind(addr).map_err(err)?;
            let port = l.local_addr().map_err(err)?.port();
            (OwnedFd::from(l), port)
        };
        bound.push(PortMapping { host_port: port, ..m.clone() });
        listeners.push(fd);
    }
    Ok((listeners, bound))
}

/// Publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot publish {mapping}: the host port is taken or not allowed")]
    Bind {
        mapping: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the port proxy")]
    Proxy(#[source] io::Error),
    #[error("{0} ports to publish; at most {MAX_PUBLISHED}")]
    TooMany(usize),
}

impl twinbox_exit::ExitCode for PublishError {
    fn exit_code(&self) -> i32 {
        match self {
            // As Docker: a port conflict is the daemon's failure to start the container.
            PublishError::Bind { .. } | PublishError::Proxy(_) => twinbox_exit::INTERNAL,
            PublishError::TooMany(_) => twinbox_exit::USER_ERROR,
        }
    }
}

/// A pidfd of process `pid`: readable once it has ended. Taken by the engine right after the
/// init exists, so the proxy watches that very process (not a later holder of its pid).
pub fn pidfd(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a successful pidfd_open returns a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The port proxy (`engine/proxy`, built by engine/build.rs into a small static executable
/// and embedded here): `PROXY container-proxy IP PORT…` with the init's pidfd as descriptor 3
/// and the listeners as 4, 5, … (in PORT order) forwards each listener to IP:its port until
/// the init ends.
pub const PROXY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/twinbox-proxy"));

/// The proxy installed under `dir` (the store's `bin/`), as `twinbox-proxy-HASH`.
pub fn install_proxy(dir: &std::path::Path) -> Result<std::path::PathBuf, crate::container::EngineError> {
    crate::container::monitor::install_program(dir, env!("TWINBOX_PROXY_FILE"), PROXY, "install the port proxy at")
}

/// Instance `id`'s DNAT rules for its `ports` (see [`super::nft::publish_rules`]) in the
/// nftables table of its own, after removing the tables this store left for instances that
/// `gone` says no longer exist (their twinbox was killed). `store` tags the tables as this
/// store's.
pub fn forward_ports(
    store: &std::path::Path,
    id: &str,
    ip: Ipv4Addr,
    ports: &[PortMapping],
    gone: impl Fn(&str) -> bool,
) -> Result<(), super::nft::NftError> {
    use super::nft;
    let store = std::path::absolute(store).unwrap_or_else(|_| store.to_owned());
    let store = store.as_os_str().as_encoded_bytes();
    let mut n = nft::Nft::open()?;
    for (table, owner) in n.tables()? {
        let Some(other) = table.strip_prefix("twinbox-c-") else { continue };
        if owner == store && other != id && gone(other) {
            n.delete_table(&table)?;
        }
    }
    let forwards: Vec<nft::Forward> = ports
        .iter()
        .filter_map(|m| {
            let host_ip = match m.host_ip {
                None => None,
                Some(std::net::IpAddr::V4(a)) if a.is_unspecified() => None,
                Some(std::net::IpAddr::V4(a)) => Some(a),
                Some(std::net::IpAddr::V6(_)) => return None,
            };
            Some(nft::Forward { host_ip, host_port: m.host_port, udp: m.udp, container_port: m.container_port })
        })
        .collect();
    let mut batch = nft::Batch::new();
    nft::publish_rules(&mut batch, id, store, ip, &forwards);
    n.apply(&batch, &format!("forward the published ports of {id}"))
}

/// Removes instance `id`'s DNAT rules, if it has any.
pub fn unforward(id: &str) -> Result<(), super::nft::NftError> {
    let table = super::nft::container_table(id);
    let mut n = super::nft::Nft::open()?;
    if n.has_table(&table)? {
        n.delete_table(&table)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Result<PortMapping, PortSpecError> {
        s.parse()
    }

    #[test]
    fn specs_parse_as_docker_reads_them() {
        assert_eq!(
            m("8080:80").unwrap(),
            PortMapping { host_ip: None, host_port: 8080, container_port: 80, udp: false }
        );
        assert_eq!(m("80").unwrap(), PortMapping { host_ip: None, host_port: 0, container_port: 80, udp: false });
        assert!(m("5353:53/udp").unwrap().udp);
        assert_eq!(m("5353:53/udp").unwrap().to_string(), "0.0.0.0:5353->53/udp");
        assert_eq!(m("80/tcp").unwrap().container_port, 80);
        let local = m("127.0.0.1:18080:8080").unwrap();
        assert_eq!(local.host_ip, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!(local.host_port, 18080);
        assert_eq!(m("127.0.0.1::8080").unwrap().host_port, 0);
        assert_eq!(m("8080:80").unwrap().to_string(), "0.0.0.0:8080->80/tcp");
        for bad in ["", "x", "0", "70000", "8080:80/sctp", "8080:80/", "a:1:2", "1:2:3:4", "8080:"] {
            assert!(m(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exposed_ports() {
        let cfg = oci_spec::image::ConfigBuilder::default()
            .exposed_ports(vec!["8080/tcp".to_string(), "53/udp".to_string(), "80".to_string(), "8080".to_string()])
            .build()
            .unwrap();
        let img = oci_spec::image::ImageConfigurationBuilder::default().config(cfg).build().unwrap();
        let got: Vec<(u16, bool)> = exposed(&img).iter().map(|m| (m.container_port, m.udp)).collect();
        assert_eq!(got, [(53, true), (80, false), (8080, false)]);
    }

    #[test]
    fn a_taken_port_is_named() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let spec: PortMapping = format!("127.0.0.1:{port}:80").parse().unwrap();
        let err = bind(&[spec]).unwrap_err();
        assert!(err.to_string().contains(&format!("127.0.0.1:{port}->80/tcp")), "{err}");
        let (mut listeners, bound) = bind(&["127.0.0.1::80".parse().unwrap()]).unwrap();
        assert_ne!(bound[0].host_port, 0, "a free port was chosen");
        let tcp = TcpListener::from(listeners.remove(0));
        assert_eq!(tcp.local_addr().unwrap().port(), bound[0].host_port);
        // UDP: the same, and a UDP port taken is named with its protocol.
        let udp_taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let uport = udp_taken.local_addr().unwrap().port();
        let err = bind(&[format!("127.0.0.1:{uport}:53/udp").parse().unwrap()]).unwrap_err();
        assert!(err.to_string().contains(&format!("127.0.0.1:{uport}->53/udp")), "{err}");
        let (mut socks, bound) = bind(&["127.0.0.1::53/udp".parse().unwrap()]).unwrap();
        let udp = std::net::UdpSocket::from(socks.remove(0));
        assert_eq!(udp.local_addr().unwrap().port(), bound[0].host_port);
        let kind = nix::sys::socket::getsockopt(&OwnedFd::from(udp), nix::sys::socket::sockopt::SockType).unwrap();
        assert_eq!(kind, nix::sys::socket::SockType::Datagram);
    }
}

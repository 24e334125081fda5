//! Networks shared by both isolation models: each is a Linux bridge with the network's gateway
//! address, recorded in `<store>/networks/<name>.json` together with its address management
//! (which address each container holds). Every change is made under one lock
//! (`<store>/networks/.lock`), so concurrent commands never hand out an address twice.
//!
//! ```text
//! twinbox network create [--subnet CIDR] NAME ─► bridge tb-<id12> with the gateway (first
//!                                                address) on it
//! allocate(network, container) ─► the lowest free address after the gateway
//! ```
//!
//! `host` and `none` are not stored: they are what `--network host|none` means. A subnet is
//! chosen when none is given (`10.89.0.0/16` for the default network, `10.90.N.0/24` for
//! others), never one that overlaps a route of the host or another network.
//!
//! | module | what |
//! |---|---|
//! | [`attach`] | a container on a bridge: veth pair, address, route, `/etc/hosts`, `resolv.conf` |
//! | [`netlink`] | the rtnetlink requests (links, addresses, routes) |
//! | [`nft`] | the nftables tables: outbound masquerade per network, DNAT per published container |
//! | [`publish`] | `-p`: parsing, binding the host ports, the proxy that holds them |
//! | [`cni`] | `--network cni:NAME`: CNI configurations run with their plugins |

pub mod attach;
pub mod cni;
pub mod netlink;
pub mod nft;
pub mod publish;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use netlink::{Netlink, NetlinkError};

/// The network `twinbox run` uses unless told otherwise (Docker's `bridge`), made in a store
/// the first time a container joins it.
pub const DEFAULT_NETWORK: &str = "twinbox0";
/// What `--network` accepts besides stored networks.
pub const BUILTIN: [&str; 2] = ["host", "none"];
/// The default network's subnet when it is free.
const DEFAULT_SUBNET: Subnet = Subnet { addr: Ipv4Addr::new(10, 89, 0, 0), prefix_len: 16 };
/// Where other networks' subnets are taken from, a /24 each.
const POOL: Subnet = Subnet { addr: Ipv4Addr::new(10, 90, 0, 0), prefix_len: 16 };
/// The MTU of a network's links when the network does not set one. Its bridge and veth pairs
/// are links inside this host, as loopback is: with large packets, traffic between the host and
/// its containers and between containers costs a fraction of what 1500-byte packets cost.
pub(crate) const LINK_MTU: u32 = 65520;

/// The MTU of a container's default route when the network does not set one: what leaves the
/// bridge for other hosts goes in packets of Docker's default size, so nothing changes for
/// paths beyond this host (TCP's MSS, UDP fragmentation) against a 1500-byte network.
pub(crate) const ROUTE_MTU: u32 = 1500;

/// The MTUs a network may have (IPv4's minimum to the largest a veth takes).
const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;
/// Prefix of the bridges of networks other than the default one.
pub const BRIDGE_PREFIX: &str = "tb-";

/// Errors of network management.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("no such network: {0}; see `twinbox network ls`")]
    NoSuchNetwork(String),
    #[error("network {0} already exists")]
    Exists(String),
    #[error("invalid network name {0:?}: use letters, digits, '_', '.' and '-', starting with a letter or digit, at most 64")]
    InvalidName(String),
    #[error("network {0} is built in; it cannot be created or removed")]
    Builtin(String),
    #[error("invalid subnet {0:?}: give an IPv4 network as ADDRESS/PREFIX with no host bits set, such as 10.91.0.0/24 (a /8 to a /29)")]
    InvalidSubnet(String),
    #[error("subnet {subnet} overlaps {with}; choose another with --subnet")]
    Overlaps { subnet: Subnet, with: String },
    #[error("network {name} has containers attached ({}); remove them first", containers.join(", "))]
    InUse { name: String, containers: Vec<String> },
    #[error("network {0} has no free address left")]
    Exhausted(String),
    #[error("no free subnet left in {0}; give one with --subnet")]
    NoFreeSubnet(Subnet),
    #[error("invalid MTU {0}: give one from 68 to 65535")]
    InvalidMtu(u32),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Nft(#[from] nft::NftError),
    #[error(transparent)]
    Cni(#[from] cni::CniError),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network record {path} is not valid JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl twinbox_exit::ExitCode for NetworkError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        match self {
            NetworkError::NoSuchNetwork(_)
            | NetworkError::Exists(_)
            | NetworkError::InvalidName(_)
            | NetworkError::Builtin(_)
            | NetworkError::InvalidSubnet(_)
            | NetworkError::Overlaps { .. }
            | NetworkError::InUse { .. }
            | NetworkError::Exhausted(_)
            | NetworkError::NoFreeSubnet(_)
            | NetworkError::InvalidMtu(_) => USER_ERROR,
            NetworkError::Cni(e) => e.exit_code(),
            NetworkError::Netlink(_) | NetworkError::Nft(_) | NetworkError::Io { .. } | NetworkError::Json { .. } => {
                INTERNAL
            }
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> NetworkError + 'a {
    move |source| NetworkError::Io { op, path: path.to_path_buf(), source }
}

/// An IPv4 network, `addr/prefix_len`, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subnet {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Subnet {
    fn mask(prefix_len: u8) -> u32 {
        if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix_len))
        }
    }

    /// The first and last address of the network.
    fn range(&self) -> (u32, u32) {
        let start = u32::from(self.addr);
        (start, start | !Self::mask(self.prefix_len))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let (a, b) = self.range();
        (a..=b).contains(&u32::from(ip))
    }

    pub fn overlaps(&self, other: &Subnet) -> bool {
        let (a, b) = self.range();
        let (c, d) = other.range();
        a <= d && c <= b
    }

    /// The gateway: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.range().0 + 1)
    }

    /// The host addresses after the gateway, lowest first (not the broadcast address).
    fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let (a, b) = self.range();
        (a + 2..b).map(Ipv4Addr::from)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Subnet {
    type Err = NetworkError;

    fn from_str(s: &str) -> Result<Self, NetworkError> {
        let bad = || NetworkError::InvalidSubnet(s.to_owned());
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix_len: u8 = len.parse().map_err(|_| bad())?;
        if !(8..=29).contains(&prefix_len) || u32::from(addr) & !Self::mask(prefix_len) != 0 {
            return Err(bad());
        }
        Ok(Subnet { addr, prefix_len })
    }
}

impl Serialize for Subnet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Subnet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What `<store>/networks/<name>.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    /// 64 hex characters.
    pub id: String,
    /// Always "bridge" for now.
    pub driver: String,
    pub subnet: Subnet,
    pub gateway: Ipv4Addr,
    /// The bridge's link name.
    pub bridge: String,
    pub created: String,
    /// Address → the container (id) that holds it.
    #[serde(default)]
    pub addresses: BTreeMap<Ipv4Addr, String>,
    /// The MTU of its bridge and veth pairs and its containers' routes, when given (`--mtu`).
    /// Else links of `LINK_MTU` within the host and default routes of `ROUTE_MTU` (Docker's
    /// 1500) for what leaves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// The networks of one store.
pub struct Networks {
    dir: PathBuf,
}

impl Networks {
    /// The networks of the store at `store_root`.
    pub fn new(store_root: &Path) -> Self {
        Networks { dir: store_root.join("networks") }
    }

    fn lock(&self) -> Result<Flock<fs::File>, NetworkError> {
        lock_in(&self.dir, ".lock")
    }

    /// The file that says a create of `bridge` is under way.
    fn marker(&self, bridge: &str) -> PathBuf {
        self.dir.join(format!(".{bridge}.creating"))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Every stored network, by name.
    pub fn list(&self) -> Result<Vec<Network>, NetworkError> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(&self.dir) else { return Ok(out) };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_suffix(".json").filter(|n| !n.starts_with('.')) {
                out.push(self.get(n)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Makes `network`'s bridge, with the gateway's address, up, with [`forwarding`] and its
    /// NAT rules (see [`nft`]). Under the host lock.
    /// The caller removes [`marker`](Self::marker), written here before the bridge is made so
    /// that a create killed half way leaves a bridge this store's prune knows to be its own,
    /// once the network's record says so.
    fn make_bridge(&self, nl: &mut Netlink, network: &Network) -> Result<(), NetworkError> {
        let marker = self.marker(&network.bridge);
        fs::write(&marker, b"").map_err(io_err("write", &marker))?;
        if let Err(e) = nl.add_bridge(&network.bridge, network.mtu) {
            let _ = fs::remove_file(&marker);
            return Err(e.into());
        }
        let made = (|| -> Result<(), NetworkError> {
            let index =
                nl.link_index(&network.bridge)?.ok_or_else(|| NetworkError::NoSuchNetwork(network.bridge.clone()))?;
            nl.add_address(index, network.gateway, network.subnet.prefix_len, &network.bridge)?;
            nl.set_up(index, &network.bridge)?;
            forwarding(&network.bridge)?;
            let mut batch = nft::Batch::new();
            nft::network_rules(&mut batch, &network.bridge, network.subnet.addr, network.subnet.prefix_len);
            nft::Nft::open()?.apply(&batch, &format!("add the NAT rules of network {}", network.name))?;
            Ok(())
        })();
        if made.is_err() {
            remove_bridge(nl, &network.bridge);
            let _ = fs::remove_file(&marker);
        }
        made
    }

    /// Makes `network`'s bridge, NAT rules and forwarding settings again if they are gone (the host
    /// rebooted, someone deleted the bridge, flushed the ruleset or turned forwarding off), as
    /// Docker remakes its bridges and rules when it starts.
    pub fn ensure_bridge(&self, network: &Network) -> Result<(), NetworkError> {
        let mut nl = Netlink::open()?;
        let mut nft = nft::Nft::open()?;
        let table = nft::network_table(&network.bridge);
        if nl.link_index(&network.bridge)?.is_some() && forwarding_on(&network.bridge) && nft.has_table(&table)? {
            return Ok(());
        }
        // As `create` and `remove`: the store's lock, then the host's; the network as it is
        // now (a `network rm` may have removed it meanwhile).
        let _lock = self.lock()?;
        let _host = host_lock()?;
        let network = &self.get(&network.name)?;
        if nl.link_index(&network.bridge)?.is_some() {
            forwarding(&network.bridge)?;
            if !nft.has_table(&table)? {
                tracing::info!(network = %network.name, "remaking the network's missing NAT rules");
                let mut batch = nft::Batch::new();
                nft::network_rules(&mut batch, &network.bridge, network.subnet.addr, network.subnet.prefix_len);
                nft.apply(&batch, &format!("add the NAT rules of network {}", network.name))?;
            }
            return Ok(());
        }
        tracing::info!(network = %network.name, bridge = %network.bridge, "remaking the network's missing bridge");
        self.make_bridge(&mut nl, network)?;
        let _ = fs::remove_file(self.marker(&network.bridge));
        Ok(())
    }

    /// The network `name`; the default one is made the first time it is asked for.
    pub fn get_or_create_default(&self, name: &str) -> Result<Network, NetworkError> {
        match self.get(name) {
            Err(NetworkError::NoSuchNetwork(_)) if name == DEFAULT_NETWORK => match self.create(name, None, None) {
                Err(NetworkError::Exists(_)) => self.get(name),
                r => r,
            },
            r => r,
        }
    }

    /// One network by name, or by id or unique id prefix.
    pub fn get(&self, key: &str) -> Result<Network, NetworkError> {
        // Names and ids are plain words: `a/b` or `../x` name no network (nor a file elsewhere).
        if !valid_name(key) {
            return Err(NetworkError::NoSuchNetwork(key.to_owned()));
        }
        let path = self.path(key);
        match fs::read(&path) {
            Ok(bytes) => return serde_json::from_slice(&bytes).map_err(|source| NetworkError::Json { path, source }),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(NetworkError::Io { op: "read", path, source: e })
            }
            Err(_) => {}
        }
        let all = if key.len() >= 3 { self.list()? } else { Vec::new() };
        let mut hits = all.into_iter().filter(|n| n.id.starts_with(key));
        match (hits.next(), hits.next()) {
            (Some(n), None) => Ok(n),
            _ => Err(NetworkError::NoSuchNetwork(key.to_owned())),
        }
    }

    /// Makes a network: its bridge with the gateway address, up, then its record. On error
    /// nothing is left (the bridge is removed again).
    pub fn create(&self, name: &str, subnet: Option<Subnet>, mtu: Option<u32>) -> Result<Network, NetworkError> {
        if let Some(m) = mtu.filter(|m| !(MTU_RANGE).contains(m)) {
            return Err(NetworkError::InvalidMtu(m));
        }
        if BUILTIN.contains(&name) {
            return Err(NetworkError::Builtin(name.to_owned()));
        }
        if !valid_name(name) {
            return Err(NetworkError::InvalidName(name.to_owned()));
        }
        let _lock = self.lock()?;
        if self.path(name).exists() {
            return Err(NetworkError::Exists(name.to_owned()));
        }
        // Routes and bridges are the host's, shared by every store: one create at a time.
        let _host = host_lock()?;
        let mut nl = Netlink::open()?;
        let mut taken: Vec<(Subnet, String)> = Vec::new();
        for n in self.list()? {
            taken.push((n.subnet, format!("network {}", n.name)));
        }
        let ours: BTreeSet<Ipv4Addr> = taken.iter().map(|(s, _)| s.addr).collect();
        for r in nl.routes()? {
            let s = Subnet { addr: r.destination, prefix_len: r.prefix_len };
            // The default route overlaps everything; our own networks' routes are listed above.
            if r.prefix_len > 0 && !ours.contains(&r.destination) {
                taken.push((s, format!("the host's route to {s}")));
            }
        }
        let subnet = match subnet {
            Some(s) => {
                if let Some((_, with)) = taken.iter().find(|(t, _)| t.overlaps(&s)) {
                    return Err(NetworkError::Overlaps { subnet: s, with: with.clone() });
                }
                s
            }
            None => choose_subnet(name, &taken)?,
        };
        let id = crate::container::new_id();
        // By id, the default network's too: every store has its own default network.
        let bridge = format!("{BRIDGE_PREFIX}{}", &id[..12]);
        let network = Network {
            name: name.to_owned(),
            id,
            driver: "bridge".to_owned(),
            subnet,
            gateway: subnet.gateway(),
            bridge,
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            addresses: BTreeMap::new(),
            mtu,
        };
        self.make_bridge(&mut nl, &network)?;
        if let Err(e) = self.save(&network) {
            remove_bridge(&mut nl, &network.bridge);
            let _ = fs::remove_file(self.marker(&network.bridge));
            return Err(e);
        }
        let _ = fs::remove_file(self.marker(&network.bridge));
        tracing::info!(network = %network.name, bridge = %network.bridge, subnet = %network.subnet, "network created");
        Ok(network)
    }

    /// Removes a network with no container attached: its bridge, then its record.
    pub fn remove(&self, key: &str) -> Result<Network, NetworkError> {
        if BUILTIN.contains(&key) {
            return Err(NetworkError::Builtin(key.to_owned()));
        }
        let _lock = self.lock()?;
        let network = self.get(key)?;
        if !network.addresses.is_empty() {
            return Err(NetworkError::InUse {
                name: network.name.clone(),
                containers: network.addresses.values().map(|id| id.chars().take(12).collect()).collect(),
            });
        }
        let mut nl = Netlink::open()?;
        if let Some(index) = nl.link_index(&network.bridge)? {
            nl.delete_link(index, &network.bridge)?;
        }
        nft::Nft::open()?.delete_table(&nft::network_table(&network.bridge))?;
        let path = self.path(&network.name);
        fs::remove_file(&path).map_err(io_err("remove", &path))?;
        Ok(network)
    }

    /// Removes every network no container uses, and the bridges of creates that were killed
    /// before their record was written. Returns the names removed.
    pub fn prune(&self) -> Result<Vec<String>, NetworkError> {
        let mut removed = Vec::new();
        for n in self.list()? {
            if n.addresses.is_empty() {
                match self.remove(&n.name) {
                    Ok(_) => removed.push(n.name),
                    Err(NetworkError::InUse { .. } | NetworkError::NoSuchNetwork(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let _lock = self.lock()?;
        let known: BTreeSet<String> = self.list()?.into_iter().map(|n| n.bridge).collect();
        let mut nl = Netlink::open()?;
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(bridge) = file.strip_prefix('.').and_then(|f| f.strip_suffix(".creating")) else { continue };
            if !known.contains(bridge) && nl.link_index(bridge)?.is_some() {
                remove_bridge(&mut nl, bridge);
                removed.push(bridge.to_owned());
            }
            let _ = fs::remove_file(entry.path());
        }
        Ok(removed)
    }

    /// Calls `f` with network `key` as it is now, under the lock, so that no address is given
    /// or taken back while `f` runs.
    pub fn with_network<T>(&self, key: &str, f: impl FnOnce(&Network) -> T) -> Result<T, NetworkError> {
        let _lock = self.lock()?;
        Ok(f(&self.get(key)?))
    }

    /// Gives `container` the lowest free address of network `key` (the one it holds already,
    /// if any), first freeing, in the same pass, the addresses of containers for which `gone`
    /// says so (their twinbox was killed before it could give them back).
    pub fn allocate(
        &self,
        key: &str,
        container: &str,
        gone: impl Fn(&str) -> bool,
    ) -> Result<(Network, Ipv4Addr), NetworkError> {
        let _lock = self.lock()?;
        let mut network = self.get(key)?;
        let held = network.addresses.len();
        network.addresses.retain(|_, c| c.as_str() == container || !gone(c));
        if let Some((ip, _)) = network.addresses.iter().find(|(_, c)| c.as_str() == container) {
            let ip = *ip;
            if network.addresses.len() != held {
                self.save(&network)?;
            }
            return Ok((network, ip));
        }
        let ip = network
            .subnet
            .hosts()
            .find(|ip| !network.addresses.contains_key(ip))
            .ok_or_else(|| NetworkError::Exhausted(network.name.clone()))?;
        network.addresses.insert(ip, container.to_owned());
        self.save(&network)?;
        Ok((network, ip))
    }

    /// Frees whatever `container` holds on every network.
    pub fn release(&self, container: &str) -> Result<(), NetworkError> {
        self.release_where(|c| c == container)
    }

    /// Frees the addresses held by containers for which `gone` says so (after a crash: the
    /// container's record no longer exists).
    pub fn release_where(&self, gone: impl Fn(&str) -> bool) -> Result<(), NetworkError> {
        if !self.dir.is_dir() {
            return Ok(());
        }
        let _lock = self.lock()?;
        for mut n in self.list()? {
            let before = n.addresses.len();
            n.addresses.retain(|_, c| !gone(c));
            if n.addresses.len() != before {
                self.save(&n)?;
            }
        }
        Ok(())
    }

    fn save(&self, n: &Network) -> Result<(), NetworkError> {
        let path = self.path(&n.name);
        let json = serde_json::to_vec_pretty(n).expect("a network record always serializes");
        twinbox_image::atomic::write(&path, &json, 0o644, false).map_err(io_err("write", &path))
    }
}

/// The host-wide lock around choosing a subnet and making its bridge (`/run/twinbox`).
fn host_lock() -> Result<Flock<fs::File>, NetworkError> {
    lock_in(Path::new("/run/twinbox"), "networks.lock")
}

/// An exclusive flock on `dir/name` (both made when missing), held until dropped.
fn lock_in(dir: &Path, name: &str) -> Result<Flock<fs::File>, NetworkError> {
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let path = dir.join(name);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("open lock file", &path))?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| NetworkError::Io { op: "lock", path, source: e.into() })
}

/// The host forwards IPv4 (as Docker turns on), and `bridge` routes packets with a loopback
/// source (DNAT of published ports on 127.0.0.1).
fn forwarding(bridge: &str) -> Result<(), NetworkError> {
    for (path, value) in [
        ("/proc/sys/net/ipv4/ip_forward".to_owned(), "1"),
        (format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet"), "1"),
    ] {
        fs::write(&path, value).map_err(io_err("write", Path::new(&path)))?;
    }
    Ok(())
}

/// Whether [`forwarding`] is in effect for `bridge` (an administrator, or a network made by
/// an older twinbox, may have it off).
fn forwarding_on(bridge: &str) -> bool {
    let on = |path: &str| fs::read(path).is_ok_and(|v| v.starts_with(b"1"));
    on("/proc/sys/net/ipv4/ip_forward") && on(&format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet"))
}

fn remove_bridge(nl: &mut Netlink, name: &str) {
    if let Err(e) = nft::Nft::open().and_then(|mut n| n.delete_table(&nft::network_table(name))) {
        tracing::warn!(bridge = name, error = %e, "cannot remove the bridge's NAT rules");
    }
    match nl.link_index(name) {
        Ok(Some(index)) => {
            if let Err(e) = nl.delete_link(index, name) {
                tracing::warn!(bridge = name, error = %e, "cannot remove bridge");
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(bridge = name, error = %e, "cannot look up bridge"),
    }
}

/// A network name: Docker's rule, at most 64 bytes.
fn valid_name(name: &str) -> bool {
    crate::valid_name(name, 64)
}

/// The default network's subnet, or the first /24 of the pool that nothing overlaps.
fn choose_subnet(name: &str, taken: &[(Subnet, String)]) -> Result<Subnet, NetworkError> {
    let free = |s: &Subnet| !taken.iter().any(|(t, _)| t.overlaps(s));
    if name == DEFAULT_NETWORK && free(&DEFAULT_SUBNET) {
        return Ok(DEFAULT_SUBNET);
    }
    let (start, end) = POOL.range();
    (start..end)
        .step_by(256)
        .map(|a| Subnet { addr: Ipv4Addr::from(a), prefix_len: 24 })
        .find(free)
        .ok_or(NetworkError::NoFreeSubnet(POOL))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Subnet {
        text.parse().unwrap()
    }

    #[test]
    fn subnets_parse_and_compare() {
        assert_eq!(s("10.90.3.0/24").to_string(), "10.90.3.0/24");
        assert_eq!(s("10.90.3.0/24").gateway(), Ipv4Addr::new(10, 90, 3, 1));
        for bad in ["10.90.3.1/24", "10.90.3.0", "10.90.3.0/33", "10.90.3.0/30", "10.0.0.0/7", "x/24", "10.90.3.0/x"] {
            assert!(matches!(bad.parse::<Subnet>(), Err(NetworkError::InvalidSubnet(_))), "{bad}");
        }
        assert!(s("10.0.0.0/8").overlaps(&s("10.90.3.0/24")));
        assert!(s("10.90.3.0/24").overlaps(&s("10.0.0.0/8")));
        assert!(!s("10.90.3.0/24").overlaps(&s("10.90.4.0/24")));
        assert!(s("10.90.3.0/24").contains(Ipv4Addr::new(10, 90, 3, 255)));
        assert!(!s("10.90.3.0/24").contains(Ipv4Addr::new(10, 90, 4, 0)));
        let hosts: Vec<_> = s("10.90.3.0/29").hosts().collect();
        assert_eq!(hosts.first(), Some(&Ipv4Addr::new(10, 90, 3, 2)), "after the gateway");
        assert_eq!(hosts.last(), Some(&Ipv4Addr::new(10, 90, 3, 6)), "not the broadcast address");
        let json = serde_json::to_string(&s("10.90.3.0/24")).unwrap();
        assert_eq!(json, "\"10.90.3.0/24\"");
        assert!(serde_json::from_str::<Subnet>("\"10.90.3.1/24\"").is_err());
    }

    #[test]
    fn free_subnets_avoid_routes_and_networks() {
        let taken = vec![(s("10.89.0.0/16"), "x".to_string()), (s("10.90.0.0/23"), "y".to_string())];
        assert_eq!(choose_subnet("twinbox0", &taken).unwrap(), s("10.90.2.0/24"), "default taken: from the pool");
        assert_eq!(choose_subnet("twinbox0", &[]).unwrap(), DEFAULT_SUBNET);
        assert_eq!(choose_subnet("web", &[]).unwrap(), s("10.90.0.0/24"));
        let full = vec![(s("10.90.0.0/16"), "z".to_string())];
        assert!(matches!(choose_subnet("web", &full), Err(NetworkError::NoFreeSubnet(_))));
    }

    #[test]
    fn names() {
        for ok in ["web", "a", "my_net.1-x", "0net"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-x", ".x", "a/b", "a b", "ü", &"a".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
        use twinbox_exit::ExitCode;
        assert_eq!(NetworkError::InvalidName("a b".into()).exit_code(), 1);
        let io = NetworkError::Io { op: "write", path: "/x".into(), source: std::io::Error::other("disk") };
        assert_eq!(io.exit_code(), 125);
    }

    /// Address management on records alone (no bridge): the lowest free address, the same one
    /// again for the same container, freed on release, and none when the subnet is full.
    #[test]
    fn addresses_are_allocated_once_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let nets = Networks::new(dir.path());
        fs::create_dir_all(&nets.dir).unwrap();
        let subnet = s("10.90.9.0/29");
        let n = Network {
            name: "t".into(),
            id: "ab".repeat(32),
            driver: "bridge".into(),
            subnet,
            gateway: subnet.gateway(),
            bridge: "tb-abababababab".into(),
            created: String::new(),
            addresses: BTreeMap::new(),
            mtu: None,
        };
        nets.save(&n).unwrap();
        let ip = |c: &str| nets.allocate("t", c, |_| false).map(|(_, ip)| ip);
        assert_eq!(ip("c1").unwrap(), Ipv4Addr::new(10, 90, 9, 2));
        assert_eq!(ip("c2").unwrap(), Ipv4Addr::new(10, 90, 9, 3));
        assert_eq!(ip("c1").unwrap(), Ipv4Addr::new(10, 90, 9, 2), "the one it holds");
        nets.release("c1").unwrap();
        assert_eq!(ip("c3").unwrap(), Ipv4Addr::new(10, 90, 9, 2), "freed and reused");
        for c in ["c4", "c5", "c6"] {
            ip(c).unwrap();
        }
        assert!(matches!(ip("c7"), Err(NetworkError::Exhausted(_))));
        nets.release_where(|c| c != "c2").unwrap();
        assert_eq!(nets.get("t").unwrap().addresses.values().collect::<Vec<_>>(), ["c2"]);
        assert_eq!(nets.get(&"ab".repeat(3)).unwrap().name, "t", "by id prefix");
        assert!(matches!(nets.get("nope"), Err(NetworkError::NoSuchNetwork(_))));
        fs::write(dir.path().join("outside.json"), serde_json::to_vec(&nets.get("t").unwrap()).unwrap()).unwrap();
        for bad in ["../outside", "a/b", ""] {
            assert!(matches!(nets.get(bad), Err(NetworkError::NoSuchNetwork(_))), "{bad}");
        }
        assert!(matches!(nets.remove("t"), Err(NetworkError::InUse { .. })));
        assert!(matches!(nets.create("host", None, None), Err(NetworkError::Builtin(_))));
        assert!(matches!(nets.create("bad name", None, None), Err(NetworkError::InvalidName(_))));
    }
}

//! The few rtnetlink requests networks need, over a synchronous `NETLINK_ROUTE` socket
//! (netlink-sys) with messages built and parsed by netlink-packet-route: make a bridge, give it
//! an address, bring it up, remove a link, find a link, list the IPv4 routes.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// A netlink request that failed: what was asked and the kernel's answer.
#[derive(Debug, thiserror::Error)]
#[error("netlink: {what}")]
pub struct NetlinkError {
    pub what: String,
    #[source]
    pub source: std::io::Error,
}

impl NetlinkError {
    fn new(what: impl Into<String>, source: std::io::Error) -> Self {
        NetlinkError { what: what.into(), source }
    }

    /// The kernel's errno, when it answered with one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// One IPv4 route of the main table: destination and prefix length (0.0.0.0/0 for a default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub destination: Ipv4Addr,
    pub prefix_len: u8,
}

/// A connected `NETLINK_ROUTE` socket.
pub struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl Netlink {
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| NetlinkError::new("open a NETLINK_ROUTE socket", e))?;
        socket.bind_auto().map_err(|e| NetlinkError::new("bind the netlink socket", e))?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(|e| NetlinkError::new("connect the netlink socket", e))?;
        Ok(Netlink { socket, sequence: 0 })
    }

    /// Makes a bridge named `name`, with `mtu` when given.
    pub fn add_bridge(&mut self, name: &str, mtu: Option<u32>) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::IfName(name.to_owned()));
        link.attributes.extend(mtu.map(LinkAttribute::Mtu));
        link.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]));
        self.request(RouteNetlinkMessage::NewLink(link), NLM_F_CREATE | NLM_F_EXCL, &format!("create bridge {name}"))
            .map(drop)
    }

    /// Makes a veth pair: `host` here, `peer` (with MAC address `peer_mac`) in the network
    /// namespace `netns` (a descriptor of it); both ends with `mtu` when given.
    pub fn add_veth(
        &mut self,
        host: &str,
        peer: &str,
        peer_mac: [u8; 6],
        netns: RawFd,
        mtu: Option<u32>,
    ) -> Result<(), NetlinkError> {
        let mut peer_msg = LinkMessage::default();
        peer_msg.attributes.push(LinkAttribute::IfName(peer.to_owned()));
        peer_msg.attributes.extend(mtu.map(LinkAttribute::Mtu));
        peer_msg.attributes.push(LinkAttribute::Address(peer_mac.to_vec()));
        peer_msg.attributes.push(LinkAttribute::NetNsFd(netns));
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::IfName(host.to_owned()));
        link.attributes.extend(mtu.map(LinkAttribute::Mtu));
        link.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        self.request(RouteNetlinkMessage::NewLink(link), NLM_F_CREATE | NLM_F_EXCL, &format!("create veth pair {host}"))
            .map(drop)
    }

    /// Puts link `index` on the bridge `controller` (its master).
    pub fn set_controller(&mut self, index: u32, controller: u32, name: &str) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.attributes.push(LinkAttribute::Controller(controller));
        self.request(RouteNetlinkMessage::SetLink(link), 0, &format!("put {name} on its bridge")).map(drop)
    }

    /// The default route via `gateway` out of link `oif`; with `mtu`, packets on it are at most
    /// that large whatever the link's MTU (the route's own MTU metric).
    pub fn add_default_route(&mut self, gateway: Ipv4Addr, oif: u32, mtu: Option<u32>) -> Result<(), NetlinkError> {
        let mut route = RouteMessage::default();
        route.header.address_family = AddressFamily::Inet;
        route.header.table = RouteHeader::RT_TABLE_MAIN;
        route.header.protocol = RouteProtocol::Boot;
        route.header.scope = RouteScope::Universe;
        route.header.kind = RouteType::Unicast;
        route.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        route.attributes.push(RouteAttribute::Oif(oif));
        if let Some(mtu) = mtu {
            route.attributes.push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
        }
        self.request(
            RouteNetlinkMessage::NewRoute(route),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add default route via {gateway}"),
        )
        .map(drop)
    }

    /// The index of the link named `name`, `None` when there is none.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>, NetlinkError> {
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.request(RouteNetlinkMessage::GetLink(link), 0, &format!("look up link {name}")) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets link `index`'s MTU.
    pub fn set_mtu(&mut self, index: u32, mtu: u32, name: &str) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(RouteNetlinkMessage::SetLink(link), 0, &format!("set {name}'s MTU to {mtu}")).map(drop)
    }

    /// Brings link `index` up.
    pub fn set_up(&mut self, index: u32, name: &str) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(link), 0, &format!("bring {name} up")).map(drop)
    }

    /// Gives link `index` the address `addr/prefix_len`.
    pub fn add_address(&mut self, index: u32, addr: Ipv4Addr, prefix_len: u8, name: &str) -> Result<(), NetlinkError> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix_len;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(IpAddr::V4(addr)));
        msg.attributes.push(AddressAttribute::Address(IpAddr::V4(addr)));
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add address {addr}/{prefix_len} to {name}"),
        )
        .map(drop)
    }

    /// Removes link `index` (with a bridge, its ports are detached; a veth takes its peer).
    pub fn delete_link(&mut self, index: u32, name: &str) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(link), 0, &format!("remove link {name}")).map(drop)
    }

    /// The IPv4 routes of the main table.
    pub fn routes(&mut self) -> Result<Vec<Route>, NetlinkError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let replies = self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_DUMP, "list routes")?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) if r.header.table == RouteHeader::RT_TABLE_MAIN => {
                    let destination = r
                        .attributes
                        .iter()
                        .find_map(|a| match a {
                            RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                            _ => None,
                        })
                        .unwrap_or(Ipv4Addr::UNSPECIFIED);
                    Some(Route { destination, prefix_len: r.header.destination_prefix_length })
                }
                _ => None,
            })
            .collect())
    }

    /// Sends one request and collects its replies until the ACK (or the end of a dump).
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
        what: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(|e| NetlinkError::new(what, e))?;
        let mut replies = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(|e| NetlinkError::new(what, e))?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..]).map_err(|e| {
                    NetlinkError::new(what, std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
                })?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += len;
                if reply.header.sequence_number != self.sequence {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(replies),
                            Some(code) => Err(NetlinkError::new(what, std::io::Error::from_raw_os_error(-code.get()))),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    _ => {}
                }
            }
        }
    }
}

//! The nftables rules networks need, sent to the kernel's nf_tables over a `NETLINK_NETFILTER`
//! socket (netlink-sys) as one atomic batch per change:
//!
//! - per network, a table `twinbox-<bridge>` with a `postrouting` NAT chain: masquerade what
//!   the network's containers send anywhere but their own bridge (outbound NAT), and what
//!   reaches the bridge from the host's loopback addresses (published ports on 127.0.0.1);
//! - per container with published ports, a table `twinbox-c-<id>` whose `prerouting` and
//!   `output` NAT chains send connections to a local address of the host on a published port
//!   to the container (DNAT, `fib daddr type local`, as Docker's `--dst-type LOCAL`), so they
//!   never pass through a process. The table's user data names the store, so that a store
//!   removes only its own leftovers ([`Nft::tables`]).
//!
//! nftables, not iptables: it is Debian 12's default, and a table of our own is removed with
//! everything in it in one message. The messages are built here: the field's crates for this
//! are a binding to the C libnftnl without the `fib` expression (nftnl) and a GPL-3.0 one
//! (rustables). The attribute numbers are the kernel's, from `linux/netfilter/nf_tables.h`.

use std::net::Ipv4Addr;

use netlink_sys::{Socket, SocketAddr};

const NETLINK_NETFILTER: isize = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 1 << 15;
const NFPROTO_IPV4: u8 = 2;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_USERDATA: u16 = 6;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;

/// The first 16-byte data register (NFT_REG_1), and the second.
const REG_1: u32 = 1;
const REG_2: u32 = 2;

/// Hooks (NF_INET_*) the chains attach to.
#[derive(Debug, Clone, Copy)]
pub enum Hook {
    Prerouting = 0,
    Output = 3,
    Postrouting = 4,
}

/// An nftables request that failed: what was asked and the kernel's answer.
#[derive(Debug, thiserror::Error)]
#[error("nftables: {what}")]
pub struct NftError {
    pub what: String,
    #[source]
    pub source: std::io::Error,
}

fn err(what: &str, source: std::io::Error) -> NftError {
    NftError { what: what.to_owned(), source }
}

/// One expression of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// Load a meta key (NFT_META_*) into a register.
    Meta { key: u32, dreg: u32 },
    /// Compare a register with `data` (NFT_CMP_EQ 0, NEQ 1).
    Cmp { sreg: u32, op: u32, data: Vec<u8> },
    /// Load `len` bytes at `offset` of a header (NFT_PAYLOAD_NETWORK_HEADER 1, TRANSPORT 2).
    Payload { base: u32, offset: u32, len: u32, dreg: u32 },
    /// `reg = (reg & mask) ^ xor`.
    Bitwise { reg: u32, mask: Vec<u8>, xor: Vec<u8> },
    /// Put `data` into a register.
    Immediate { dreg: u32, data: Vec<u8> },
    /// Look up the route of the packet's destination address; its type (RTN_*) into a register.
    FibDaddrType { dreg: u32 },
    /// Source NAT to the outgoing interface's address.
    Masquerade,
    /// Destination NAT to the address in `addr` and the port in `port`.
    Dnat { addr: u32, port: u32 },
}

const NFT_META_OIFNAME: u32 = 7;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const RTN_LOCAL: u32 = 2;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

impl Expr {
    fn name(&self) -> &'static str {
        match self {
            Expr::Meta { .. } => "meta",
            Expr::Cmp { .. } => "cmp",
            Expr::Payload { .. } => "payload",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Immediate { .. } => "immediate",
            Expr::FibDaddrType { .. } => "fib",
            Expr::Masquerade => "masq",
            Expr::Dnat { .. } => "nat",
        }
    }

    /// The expression's attributes (NFTA_<NAME>_*, numbered as in nf_tables.h).
    fn data(&self, m: &mut Message) {
        match self {
            Expr::Meta { key, dreg } => {
                m.u32(1, *dreg); // NFTA_META_DREG
                m.u32(2, *key); // NFTA_META_KEY
            }
            Expr::Cmp { sreg, op, data } => {
                m.u32(1, *sreg); // NFTA_CMP_SREG
                m.u32(2, *op); // NFTA_CMP_OP
                m.nest(3, |m| m.bytes(NFTA_DATA_VALUE, data)); // NFTA_CMP_DATA
            }
            Expr::Payload { base, offset, len, dreg } => {
                m.u32(1, *dreg); // NFTA_PAYLOAD_DREG
                m.u32(2, *base);
                m.u32(3, *offset);
                m.u32(4, *len);
            }
            Expr::Bitwise { reg, mask, xor } => {
                m.u32(1, *reg); // NFTA_BITWISE_SREG
                m.u32(2, *reg); // NFTA_BITWISE_DREG
                m.u32(3, mask.len() as u32); // NFTA_BITWISE_LEN
                m.nest(4, |m| m.bytes(NFTA_DATA_VALUE, mask));
                m.nest(5, |m| m.bytes(NFTA_DATA_VALUE, xor));
            }
            Expr::Immediate { dreg, data } => {
                m.u32(1, *dreg); // NFTA_IMMEDIATE_DREG
                m.nest(2, |m| m.bytes(NFTA_DATA_VALUE, data));
            }
            Expr::FibDaddrType { dreg } => {
                m.u32(1, *dreg); // NFTA_FIB_DREG
                m.u32(2, 3); // NFTA_FIB_RESULT: NFT_FIB_RESULT_ADDRTYPE
                m.u32(3, 1 << 1); // NFTA_FIB_FLAGS: NFTA_FIB_F_DADDR
            }
            Expr::Masquerade => {}
            Expr::Dnat { addr, port } => {
                m.u32(1, 1); // NFTA_NAT_TYPE: NFT_NAT_DNAT
                m.u32(2, u32::from(NFPROTO_IPV4)); // NFTA_NAT_FAMILY
                m.u32(3, *addr); // NFTA_NAT_REG_ADDR_MIN
                m.u32(5, *port); // NFTA_NAT_REG_PROTO_MIN
            }
        }
    }

    fn encode(&self, m: &mut Message) {
        m.nest(NFTA_LIST_ELEM, |m| {
            m.string(NFTA_EXPR_NAME, self.name());
            m.nest(NFTA_EXPR_DATA, |m| self.data(m));
        });
    }
}

/// A netlink message under construction: header, nfgenmsg, attributes.
struct Message {
    buf: Vec<u8>,
}

impl Message {
    fn new(kind: u16, flags: u16, family: u8, seq: u32, res_id: u16) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Message { buf }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn bytes(&mut self, kind: u16, data: &[u8]) {
        self.attr(kind, data);
    }

    fn string(&mut self, kind: u16, s: &str) {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(kind, &data);
    }

    /// nftables takes its integer attributes in network byte order.
    fn u32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_be_bytes());
    }

    fn nest(&mut self, kind: u16, body: impl FnOnce(&mut Message)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        body(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.buf[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// Changes applied together or not at all.
pub struct Batch {
    messages: Vec<(u16, u16, Vec<u8>)>,
}

fn kind(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

impl Batch {
    pub fn new() -> Self {
        Batch { messages: Vec::new() }
    }

    fn push(&mut self, msg: u16, flags: u16, body: impl FnOnce(&mut Message)) {
        let mut m = Message::new(kind(msg), 0, NFPROTO_IPV4, 0, 0);
        body(&mut m);
        self.messages.push((kind(msg), flags, m.finish()));
    }

    /// Table `name` made empty: made if missing, then removed and made again, so that
    /// whatever it held is gone (nft's `add table; delete table; add table`).
    pub fn fresh_table(&mut self, name: &str, userdata: &[u8]) {
        self.push(NFT_MSG_NEWTABLE, NLM_F_CREATE, |m| m.string(NFTA_TABLE_NAME, name));
        self.delete_table(name);
        self.push(NFT_MSG_NEWTABLE, NLM_F_CREATE, |m| {
            m.string(NFTA_TABLE_NAME, name);
            m.bytes(NFTA_TABLE_USERDATA, userdata);
        });
    }

    /// Removes table `name` with everything in it.
    pub fn delete_table(&mut self, name: &str) {
        self.push(NFT_MSG_DELTABLE, 0, |m| m.string(NFTA_TABLE_NAME, name));
    }

    /// A NAT base chain, accepting by default.
    pub fn nat_chain(&mut self, table: &str, name: &str, hook: Hook, priority: i32) {
        self.push(NFT_MSG_NEWCHAIN, NLM_F_CREATE, |m| {
            m.string(NFTA_CHAIN_TABLE, table);
            m.string(NFTA_CHAIN_NAME, name);
            m.nest(NFTA_CHAIN_HOOK, |m| {
                m.u32(NFTA_HOOK_HOOKNUM, hook as u32);
                m.u32(NFTA_HOOK_PRIORITY, priority as u32);
            });
            m.u32(NFTA_CHAIN_POLICY, 1); // NF_ACCEPT
            m.string(NFTA_CHAIN_TYPE, "nat");
        });
    }

    pub fn rule(&mut self, table: &str, chain: &str, exprs: &[Expr]) {
        self.push(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, |m| {
            m.string(NFTA_RULE_TABLE, table);
            m.string(NFTA_RULE_CHAIN, chain);
            m.nest(NFTA_RULE_EXPRESSIONS, |m| {
                for e in exprs {
                    e.encode(m);
                }
            });
        });
    }
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

/// The name of network `bridge`'s table.
pub fn network_table(bridge: &str) -> String {
    format!("twinbox-{bridge}")
}

/// The name of container `id`'s table.
pub fn container_table(id: &str) -> String {
    format!("twinbox-c-{id}")
}

/// Matches packets from `subnet` (address and prefix length).
fn from_subnet(addr: Ipv4Addr, prefix_len: u8) -> Vec<Expr> {
    let mask = if prefix_len == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix_len)) };
    vec![
        Expr::Payload { base: NFT_PAYLOAD_NETWORK_HEADER, offset: 12, len: 4, dreg: REG_1 },
        Expr::Bitwise { reg: REG_1, mask: mask.to_be_bytes().to_vec(), xor: vec![0; 4] },
        Expr::Cmp { sreg: REG_1, op: NFT_CMP_EQ, data: (u32::from(addr) & mask).to_be_bytes().to_vec() },
    ]
}

/// Matches the outgoing interface's name (`equal` or not).
fn out_interface(name: &str, equal: bool) -> Vec<Expr> {
    let mut data = name.as_bytes().to_vec();
    data.resize(16, 0); // IFNAMSIZ
    vec![
        Expr::Meta { key: NFT_META_OIFNAME, dreg: REG_1 },
        Expr::Cmp { sreg: REG_1, op: if equal { NFT_CMP_EQ } else { NFT_CMP_NEQ }, data },
    ]
}

/// Network `bridge`'s rules: masquerade what its subnet sends elsewhere, and what the host
/// sends into it from a loopback address.
pub fn network_rules(batch: &mut Batch, bridge: &str, subnet: Ipv4Addr, prefix_len: u8) {
    let table = network_table(bridge);
    batch.fresh_table(&table, b"twinbox");
    batch.nat_chain(&table, "postrouting", Hook::Postrouting, 100);
    let mut outbound = from_subnet(subnet, prefix_len);
    outbound.extend(out_interface(bridge, false));
    outbound.push(Expr::Masquerade);
    batch.rule(&table, "postrouting", &outbound);
    let mut from_loopback = from_subnet(Ipv4Addr::new(127, 0, 0, 0), 8);
    from_loopback.extend(out_interface(bridge, true));
    from_loopback.push(Expr::Masquerade);
    batch.rule(&table, "postrouting", &from_loopback);
}

/// One published port as DNAT sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    /// Only connections to this host address; any local address when None.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub udp: bool,
    pub container_port: u16,
}

/// Container `id`'s table: its published ports sent to `ip` from the host's own addresses,
/// arriving (prerouting) or made here (output). `store` goes into the table's user data.
pub fn publish_rules(batch: &mut Batch, id: &str, store: &[u8], ip: Ipv4Addr, ports: &[Forward]) {
    let table = container_table(id);
    batch.fresh_table(&table, store);
    for (chain, hook) in [("prerouting", Hook::Prerouting), ("output", Hook::Output)] {
        batch.nat_chain(&table, chain, hook, -100);
        for f in ports {
            let mut e = vec![
                Expr::FibDaddrType { dreg: REG_1 },
                Expr::Cmp { sreg: REG_1, op: NFT_CMP_EQ, data: RTN_LOCAL.to_ne_bytes().to_vec() },
            ];
            if let Some(h) = f.host_ip {
                e.push(Expr::Payload { base: NFT_PAYLOAD_NETWORK_HEADER, offset: 16, len: 4, dreg: REG_1 });
                e.push(Expr::Cmp { sreg: REG_1, op: NFT_CMP_EQ, data: h.octets().to_vec() });
            }
            e.extend([
                Expr::Meta { key: NFT_META_L4PROTO, dreg: REG_1 },
                Expr::Cmp { sreg: REG_1, op: NFT_CMP_EQ, data: vec![if f.udp { IPPROTO_UDP } else { IPPROTO_TCP }] },
                Expr::Payload { base: NFT_PAYLOAD_TRANSPORT_HEADER, offset: 2, len: 2, dreg: REG_1 },
                Expr::Cmp { sreg: REG_1, op: NFT_CMP_EQ, data: f.host_port.to_be_bytes().to_vec() },
                Expr::Immediate { dreg: REG_1, data: ip.octets().to_vec() },
                Expr::Immediate { dreg: REG_2, data: f.container_port.to_be_bytes().to_vec() },
                Expr::Dnat { addr: REG_1, port: REG_2 },
            ]);
            batch.rule(&table, chain, &e);
        }
    }
}

/// A connected `NETLINK_NETFILTER` socket.
pub struct Nft {
    socket: Socket,
    sequence: u32,
}

impl Nft {
    pub fn open() -> Result<Self, NftError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| err("open a NETLINK_NETFILTER socket", e))?;
        socket.bind_auto().map_err(|e| err("bind the netlink socket", e))?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(|e| err("connect the netlink socket", e))?;
        Ok(Nft { socket, sequence: 0 })
    }

    /// Applies `batch` atomically: all of it, or nothing and the kernel's error.
    pub fn apply(&mut self, batch: &Batch, what: &str) -> Result<(), NftError> {
        if batch.messages.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        let first = self.sequence.wrapping_add(1);
        self.sequence = first;
        buf.extend(Message::new(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, first, NFNL_SUBSYS_NFTABLES).finish());
        let mut pending = Vec::new();
        for (_, flags, m) in &batch.messages {
            self.sequence = self.sequence.wrapping_add(1);
            let mut m = m.clone();
            m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
            m[8..12].copy_from_slice(&self.sequence.to_ne_bytes());
            pending.push(self.sequence);
            buf.extend(m);
        }
        self.sequence = self.sequence.wrapping_add(1);
        buf.extend(Message::new(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, self.sequence, NFNL_SUBSYS_NFTABLES).finish());
        self.socket.send(&buf, 0).map_err(|e| err(what, e))?;
        // One acknowledgement per message, or an error (the kernel then applies nothing).
        while !pending.is_empty() {
            let (data, _) = self.socket.recv_from_full().map_err(|e| err(what, e))?;
            for (kind, seq, payload) in messages(&data) {
                if kind != NLMSG_ERROR || payload.len() < 4 {
                    continue;
                }
                let code = i32::from_ne_bytes(payload[..4].try_into().expect("four bytes"));
                if code != 0 {
                    return Err(err(what, std::io::Error::from_raw_os_error(-code)));
                }
                pending.retain(|s| *s != seq);
            }
        }
        Ok(())
    }

    /// Removes table `name` (nothing when it does not exist).
    pub fn delete_table(&mut self, name: &str) -> Result<(), NftError> {
        let mut batch = Batch::new();
        batch.delete_table(name);
        match self.apply(&batch, &format!("remove table {name}")) {
            Err(e) if e.source.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r,
        }
    }

    /// Whether table `name` exists.
    pub fn has_table(&mut self, name: &str) -> Result<bool, NftError> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut m =
            Message::new(kind(1 /* NFT_MSG_GETTABLE */), NLM_F_REQUEST | NLM_F_ACK, NFPROTO_IPV4, self.sequence, 0);
        m.string(NFTA_TABLE_NAME, name);
        self.socket.send(&m.finish(), 0).map_err(|e| err("look up a table", e))?;
        let mut found = false;
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(|e| err("look up a table", e))?;
            for (k, seq, payload) in messages(&data) {
                if seq != self.sequence {
                    continue;
                }
                if k == kind(NFT_MSG_NEWTABLE) {
                    found = true;
                } else if k == NLMSG_ERROR {
                    let code = payload.get(..4).map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("four bytes")));
                    return match code {
                        0 => Ok(found),
                        c if -c == libc::ENOENT => Ok(false),
                        c => Err(err("look up a table", std::io::Error::from_raw_os_error(-c))),
                    };
                }
            }
        }
    }

    /// The IPv4 tables: each one's name and user data.
    pub fn tables(&mut self) -> Result<Vec<(String, Vec<u8>)>, NftError> {
        self.sequence = self.sequence.wrapping_add(1);
        let m =
            Message::new(kind(1 /* NFT_MSG_GETTABLE */), NLM_F_REQUEST | NLM_F_DUMP, NFPROTO_IPV4, self.sequence, 0);
        self.socket.send(&m.finish(), 0).map_err(|e| err("list tables", e))?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(|e| err("list tables", e))?;
            for (k, seq, payload) in messages(&data) {
                if seq != self.sequence {
                    continue;
                }
                match k {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code =
                            payload.get(..4).map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("four bytes")));
                        if code != 0 {
                            return Err(err("list tables", std::io::Error::from_raw_os_error(-code)));
                        }
                        return Ok(out);
                    }
                    _ if k == kind(NFT_MSG_NEWTABLE) && payload.len() >= 4 => {
                        let (mut name, mut userdata) = (None, Vec::new());
                        for (t, v) in attributes(&payload[4..]) {
                            match t {
                                NFTA_TABLE_NAME => {
                                    name = Some(
                                        String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(v)).into_owned(),
                                    )
                                }
                                NFTA_TABLE_USERDATA => userdata = v.to_vec(),
                                _ => {}
                            }
                        }
                        out.extend(name.map(|n| (n, userdata)));
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The netlink messages in `data`: type, sequence number, payload.
fn messages(data: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= data.len() {
        let len = u32::from_ne_bytes(data[at..at + 4].try_into().expect("four bytes")) as usize;
        if len < 16 || at + len > data.len() {
            break;
        }
        let kind = u16::from_ne_bytes(data[at + 4..at + 6].try_into().expect("two bytes"));
        let seq = u32::from_ne_bytes(data[at + 8..at + 12].try_into().expect("four bytes"));
        out.push((kind, seq, &data[at + 16..at + len]));
        at += (len + 3) & !3;
    }
    out
}

/// The attributes in `data`: type (flags cleared) and value.
fn attributes(data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= data.len() {
        let len = u16::from_ne_bytes([data[at], data[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([data[at + 2], data[at + 3]]) & 0x3fff;
        if len < 4 || at + len > data.len() {
            break;
        }
        out.push((kind, &data[at + 4..at + len]));
        at += (len + 3) & !3;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nests_flagged() {
        let mut m = Message::new(kind(NFT_MSG_NEWTABLE), 0, NFPROTO_IPV4, 7, 0);
        m.string(NFTA_TABLE_NAME, "ab");
        m.nest(NFTA_CHAIN_HOOK, |m| m.u32(NFTA_HOOK_HOOKNUM, 4));
        let b = m.finish();
        assert_eq!(u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize, b.len());
        assert_eq!(b.len() % 4, 0);
        // nlmsghdr, nfgenmsg (family, version, res_id), then "ab\0" padded to 4.
        assert_eq!(&b[16..20], &[NFPROTO_IPV4, 0, 0, 0]);
        assert_eq!(&b[20..28], &[7, 0, 1, 0, b'a', b'b', 0, 0]);
        // The nest: 12 bytes, NLA_F_NESTED | 4, holding the hook number in network byte order.
        assert_eq!(&b[28..32], &[12, 0, 4, 0x80]);
        assert_eq!(&b[32..40], &[8, 0, 1, 0, 0, 0, 0, 4]);
        let parsed = attributes(&b[20..]);
        assert_eq!(parsed[0], (NFTA_TABLE_NAME, &b"ab\0"[..]));
        assert_eq!(parsed[1].0, NFTA_CHAIN_HOOK);
        assert_eq!(messages(&b), [(kind(NFT_MSG_NEWTABLE), 7, &b[16..])]);
    }

    #[test]
    fn subnet_match_masks_the_source_address() {
        let e = from_subnet(Ipv4Addr::new(10, 89, 3, 7), 16);
        assert_eq!(e[1], Expr::Bitwise { reg: REG_1, mask: vec![255, 255, 0, 0], xor: vec![0; 4] });
        assert_eq!(e[2], Expr::Cmp { sreg: REG_1, op: NFT_CMP_EQ, data: vec![10, 89, 0, 0] });
        let all = from_subnet(Ipv4Addr::new(1, 2, 3, 4), 0);
        assert_eq!(all[2], Expr::Cmp { sreg: REG_1, op: NFT_CMP_EQ, data: vec![0; 4] });
    }
}

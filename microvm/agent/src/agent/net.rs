//! The guest's network: lo up always; with a configuration, eth0's MAC address (while it is
//! still down), MTU, address and link, the default route (with its own MTU, through rtnetlink: the route ioctl cannot set one), and
//! the workload's /etc/hosts and /etc/resolv.conf.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use twinbox_agent::config::parse_mac;
use twinbox_agent::{GuestConfig, GuestNetwork};

/// A step of the network set-up failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what}")]
pub struct NetError {
    what: String,
    #[source]
    source: io::Error,
}

fn fail(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let what = what.into();
    move |source| NetError { what, source }
}

/// `struct ifreq` with the union as an int (flags, MTU), an IPv4 `sockaddr_in` or a hardware
/// address's `sockaddr`.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Self {
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
        let n = name.len().min(libc::IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        req
    }

    fn set_int(&mut self, value: i32) {
        self.data[..4].copy_from_slice(&value.to_ne_bytes());
    }

    fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }

    /// A `sockaddr_in` for `addr` (family, port 0, address in network order).
    fn set_addr(&mut self, addr: Ipv4Addr) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&addr.octets());
    }

    /// A `sockaddr` for Ethernet address `mac` (family ARPHRD_ETHER, the six bytes).
    fn set_hwaddr(&mut self, mac: [u8; 6]) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
        self.data[2..8].copy_from_slice(&mac);
    }
}

fn socket(domain: libc::c_int, kind: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl(sock: &OwnedFd, request: libc::c_ulong, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: every request used here (SIOC[GS]IFFLAGS, SIOCSIFMTU, SIOCSIFADDR,
    // SIOCSIFNETMASK, SIOCSIFHWADDR) reads or writes one `struct ifreq`, which `req` is,
    // exclusively borrowed.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn link_up(sock: &OwnedFd, name: &str) -> Result<(), NetError> {
    let mut req = IfReq::new(name);
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req).map_err(fail(format!("read {name}'s flags")))?;
    if req.int() & libc::IFF_UP != 0 {
        // Up already (a template brought lo up before its snapshot).
        return Ok(());
    }
    req.set_int(req.int() | libc::IFF_UP);
    ioctl(sock, libc::SIOCSIFFLAGS, &mut req).map_err(fail(format!("bring {name} up")))
}

/// The netmask of a /`prefix_len`.
pub fn netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::MAX.checked_shl(32 - u32::from(prefix_len.min(32))).unwrap_or(0);
    Ipv4Addr::from(bits)
}

/// What a template does of [`setup`] before its snapshot, the same for every copy: lo up, and
/// `root`'s /etc/hosts and /etc/resolv.conf copied up into the overlay's upper layer (opened for
/// writing, unchanged), so that a copy's own are rewrites of a file in memory.
pub fn prepare_template(root: &str) -> Result<(), NetError> {
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0).map_err(fail("open a socket for interface ioctls"))?;
    link_up(&sock, "lo")?;
    for name in ["hosts", "resolv.conf"] {
        // Not there, or a symlink (which a copy replaces): nothing to copy up.
        let _ =
            std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(format!("{root}/etc/{name}"));
    }
    Ok(())
}

/// lo up, and eth0 as `config.network` says; then /etc/hosts and /etc/resolv.conf under
/// `root` when the configuration has them.
pub fn setup(config: &GuestConfig, root: &str) -> Result<(), NetError> {
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0).map_err(fail("open a socket for interface ioctls"))?;
    link_up(&sock, "lo")?;
    if let Some(n) = &config.network {
        eth0(&sock, n)?;
    }
    let etc = format!("{root}/etc");
    for (name, text) in [("hosts", &config.hosts), ("resolv.conf", &config.resolv_conf)] {
        if text.is_empty() {
            continue;
        }
        std::fs::create_dir_all(&etc).map_err(fail(format!("create {etc}")))?;
        let path = format!("{etc}/{name}");
        // A symlink in the image (resolv.conf → /run/...) is replaced, not followed; a file is
        // rewritten in place.
        if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
            let _ = std::fs::remove_file(&path);
        }
        std::fs::write(&path, text).map_err(fail(format!("write {path}")))?;
    }
    Ok(())
}

fn eth0(sock: &OwnedFd, n: &GuestNetwork) -> Result<(), NetError> {
    if let Some(mac) = &n.mac {
        // Before the link is up: most drivers take a new address only while it is down.
        let what = format!("set eth0's MAC address to {mac}");
        // The configuration's validation refused any other text.
        let bytes = parse_mac(mac).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)).map_err(fail(&what))?;
        let mut req = IfReq::new("eth0");
        req.set_hwaddr(bytes);
        ioctl(sock, libc::SIOCSIFHWADDR, &mut req).map_err(fail(what))?;
    }
    let mut req = IfReq::new("eth0");
    req.set_int(i32::try_from(n.mtu).unwrap_or(i32::MAX));
    ioctl(sock, libc::SIOCSIFMTU, &mut req).map_err(fail(format!("set eth0's MTU to {}", n.mtu)))?;
    let mut req = IfReq::new("eth0");
    req.set_addr(n.address);
    ioctl(sock, libc::SIOCSIFADDR, &mut req).map_err(fail(format!("give eth0 the address {}", n.address)))?;
    let mut req = IfReq::new("eth0");
    req.set_addr(netmask(n.prefix_len));
    ioctl(sock, libc::SIOCSIFNETMASK, &mut req).map_err(fail(format!("set eth0's prefix /{}", n.prefix_len)))?;
    link_up(sock, "eth0")?;
    let index = if_index("eth0").map_err(fail("find eth0's index"))?;
    add_default_route(n.gateway, index, n.route_mtu).map_err(fail(format!("add the default route via {}", n.gateway)))
}

fn if_index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a NUL-terminated string alive for the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

const NLMSG_HDR: usize = 16;
/// `RTAX_MTU` of linux/rtnetlink.h (libc has no RTAX_* constants).
const RTAX_MTU: u16 = 2;
const RTMSG: usize = 12;

/// An RTM_NEWROUTE request for the default route via `gateway` out of link `oif`, with an
/// RTAX_MTU metric when `mtu` is given, as sequence number 1.
pub fn default_route_message(gateway: Ipv4Addr, oif: u32, mtu: Option<u32>) -> Vec<u8> {
    fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        out.extend_from_slice(&(len as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    let mut m = vec![0u8; NLMSG_HDR];
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags (u32).
    m.extend_from_slice(&[
        libc::AF_INET as u8,
        0,
        0,
        0,
        libc::RT_TABLE_MAIN,
        libc::RTPROT_BOOT,
        libc::RT_SCOPE_UNIVERSE,
        libc::RTN_UNICAST,
    ]);
    m.extend_from_slice(&0u32.to_ne_bytes());
    debug_assert_eq!(m.len(), NLMSG_HDR + RTMSG);
    attr(&mut m, libc::RTA_GATEWAY, &gateway.octets());
    attr(&mut m, libc::RTA_OIF, &oif.to_ne_bytes());
    if let Some(mtu) = mtu {
        let mut metrics = Vec::new();
        attr(&mut metrics, RTAX_MTU, &mtu.to_ne_bytes());
        attr(&mut m, libc::RTA_METRICS, &metrics);
    }
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&libc::RTM_NEWROUTE.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&1u32.to_ne_bytes());
    m
}

fn add_default_route(gateway: Ipv4Addr, oif: u32, mtu: Option<u32>) -> io::Result<()> {
    let sock = socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE)?;
    let msg = default_route_message(gateway, oif, mtu);
    // SAFETY: send reads `msg.len()` bytes from `msg`, which is alive for the call.
    let sent = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 512];
    // SAFETY: recv writes at most `buf.len()` bytes into `buf`, which is alive for the call.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    ack_error(&buf[..n as usize])
}

/// The kernel's answer to a request with NLM_F_ACK: an NLMSG_ERROR whose code is 0 or -errno.
pub fn ack_error(answer: &[u8]) -> io::Result<()> {
    if answer.len() < NLMSG_HDR + 4 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "short netlink answer"));
    }
    let kind = u16::from_ne_bytes([answer[4], answer[5]]);
    if kind != libc::NLMSG_ERROR as u16 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("netlink answered type {kind}")));
    }
    let code = i32::from_ne_bytes([answer[16], answer[17], answer[18], answer[19]]);
    match code {
        0 => Ok(()),
        c => Err(io::Error::from_raw_os_error(-c)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks() {
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(16), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
    }

    #[test]
    fn hardware_addresses_are_ethernet_sockaddrs() {
        let mut req = IfReq::new("eth0");
        req.set_int(-1);
        req.set_hwaddr([0x02, 0x42, 0x0a, 0x59, 0x00, 0x05]);
        assert_eq!(&req.name[..5], b"eth0\0");
        assert_eq!(&req.data[..2], &1u16.to_ne_bytes(), "ARPHRD_ETHER");
        assert_eq!(&req.data[2..8], &[0x02, 0x42, 0x0a, 0x59, 0x00, 0x05]);
        assert!(req.data[8..].iter().all(|b| *b == 0));
        assert_eq!(std::mem::size_of::<IfReq>(), 40, "struct ifreq");
    }

    /// The message is what `ip route add default via 10.89.0.1 dev <7> mtu 1500` sends, laid
    /// out by hand: header, rtmsg, gateway, oif, and the metrics nest.
    #[test]
    fn route_message_layout() {
        let m = default_route_message(Ipv4Addr::new(10, 89, 0, 1), 7, Some(1500));
        assert_eq!(m.len(), 16 + 12 + 8 + 8 + 12);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize, m.len());
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), libc::RTM_NEWROUTE);
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[20], libc::RT_TABLE_MAIN);
        assert_eq!(&m[28..36], &[8, 0, libc::RTA_GATEWAY as u8, 0, 10, 89, 0, 1]);
        assert_eq!(&m[36..44], &[8, 0, libc::RTA_OIF as u8, 0, 7, 0, 0, 0]);
        assert_eq!(&m[44..48], &[12, 0, libc::RTA_METRICS as u8, 0]);
        assert_eq!(&m[48..56], &[8, 0, RTAX_MTU as u8, 0, 0xdc, 0x05, 0, 0]);
        assert_eq!(default_route_message(Ipv4Addr::new(10, 0, 0, 1), 2, None).len(), 16 + 12 + 16);
    }

    #[test]
    fn acks_and_errors() {
        let mut ack = vec![0u8; 36];
        ack[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        assert!(ack_error(&ack).is_ok());
        ack[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        assert_eq!(ack_error(&ack).unwrap_err().raw_os_error(), Some(libc::EEXIST));
        assert!(ack_error(&ack[..10]).is_err());
    }

    /// The whole set-up for real, in a network namespace of the test's own with a veth end
    /// named eth0: lo and eth0 up, eth0's MAC address, address, prefix and MTU, the default
    /// route with its MTU, and the two files.
    #[test]
    fn sets_up_eth0_in_a_private_namespace() {
        let test = "sets_up_eth0_in_a_private_namespace";
        // SAFETY: geteuid takes nothing and cannot fail.
        if !twinbox_testutil::require(unsafe { libc::geteuid() } == 0, test, "needs root (a network namespace)")
            || !twinbox_testutil::require(std::process::Command::new("ip").arg("-V").output().is_ok(), test, "no `ip`")
        {
            return;
        }
        let root = std::env::temp_dir().join(format!("twinbox-agent-net-{}", std::process::id()));
        let root_str = root.to_str().unwrap().to_owned();
        let out = std::thread::spawn(move || {
            // SAFETY: unshare changes only this thread's network namespace; it takes no pointers.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let ip = |args: &[&str]| {
                let o = std::process::Command::new("ip").args(args).output().unwrap();
                assert!(o.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
                String::from_utf8_lossy(&o.stdout).into_owned()
            };
            ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "peer0"]);
            let config = GuestConfig {
                args: vec!["x".into()],
                network: Some(GuestNetwork {
                    address: Ipv4Addr::new(10, 89, 0, 5),
                    prefix_len: 16,
                    gateway: Ipv4Addr::new(10, 89, 0, 1),
                    mtu: 9000,
                    route_mtu: Some(1500),
                    mac: Some("02:42:0A:59:00:05".into()),
                }),
                hosts: "10.89.0.5\tweb\n".into(),
                resolv_conf: "nameserver 10.89.0.1\n".into(),
                ..GuestConfig::default()
            };
            setup(&config, &root_str).unwrap();
            [
                ip(&["-o", "link", "show", "lo"]),
                ip(&["-o", "-4", "addr", "show", "eth0"]),
                ip(&["-o", "link", "show", "eth0"]),
                ip(&["route", "show", "default"]),
            ]
        })
        .join()
        .unwrap();
        let hosts = std::fs::read_to_string(root.join("etc/hosts"));
        let resolv = std::fs::read_to_string(root.join("etc/resolv.conf"));
        std::fs::remove_dir_all(&root).unwrap();
        assert!(out[0].contains("UP"), "{}", out[0]);
        assert!(out[1].contains("inet 10.89.0.5/16"), "{}", out[1]);
        assert!(out[2].contains("mtu 9000") && out[2].contains(",UP"), "{}", out[2]);
        assert!(out[2].contains("link/ether 02:42:0a:59:00:05 "), "{}", out[2]);
        assert!(out[3].contains("default via 10.89.0.1 dev eth0") && out[3].contains("mtu 1500"), "{}", out[3]);
        assert_eq!(hosts.unwrap(), "10.89.0.5\tweb\n");
        assert_eq!(resolv.unwrap(), "nameserver 10.89.0.1\n");
    }
}

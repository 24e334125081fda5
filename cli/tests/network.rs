//! `twinbox network`, end to end as root: each network is a bridge holding its gateway
//! address, made and removed through netlink; bad input is refused before anything is made;
//! nothing is left behind. Traffic goes only to 127.0.0.1 and to addresses of the bridges and
//! network namespaces the tests make.

mod common;

use std::path::Path;

use common::{require_root, Env};

/// Tests here create bridges machine-wide: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The IPv4 addresses (with prefix) on link `name`, from /proc (no tool needed).
fn addresses(name: &str) -> Vec<String> {
    let out = std::process::Command::new("ip").args(["-4", "-o", "addr", "show", "dev", name]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1).map(str::to_owned))
        .collect()
}

fn bridge_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).join("bridge").is_dir()
}

fn our_bridges() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tb-"))
        .collect()
}

#[test]
fn networks_are_bridges_with_their_gateway() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !require_root() || !common::require_tool("ip") {
        return;
    }
    let before = our_bridges();
    let env = Env::new();
    let id = env.ok(&["network", "create", "web"]);
    let id = id.trim();
    assert_eq!(id.len(), 64, "{id}");
    let inspect: serde_json::Value = serde_json::from_str(&env.ok(&["network", "inspect", "web"])).unwrap();
    let net = &inspect[0];
    assert_eq!(net["id"], id);
    let bridge = net["bridge"].as_str().unwrap().to_owned();
    assert_eq!(bridge, format!("tb-{}", &id[..12]));
    assert!(bridge_exists(&bridge), "{bridge}");
    let subnet = net["subnet"].as_str().unwrap().to_owned();
    let (_, prefix) = subnet.split_once('/').unwrap();
    assert_eq!(addresses(&bridge), [format!("{}/{prefix}", net["gateway"].as_str().unwrap())]);
    assert_eq!(
        std::fs::read_to_string(format!("/sys/class/net/{bridge}/flags"))
            .map(|f| { u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).unwrap() & 1 })
            .unwrap(),
        1,
        "up"
    );
    // --mtu: the bridge's and its containers' interfaces'; out of range refused.
    env.ok(&["network", "create", "--mtu", "9000", "jumbo"]);
    let jumbo: serde_json::Value = serde_json::from_str(&env.ok(&["network", "inspect", "jumbo"])).unwrap();
    assert_eq!(jumbo[0]["mtu"], 9000);
    let jumbo_bridge = jumbo[0]["bridge"].as_str().unwrap().to_owned();
    assert_eq!(std::fs::read_to_string(format!("/sys/class/net/{jumbo_bridge}/mtu")).unwrap().trim(), "9000");
    let o = env.run(&["network", "create", "--mtu", "40", "tiny"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid MTU 40"), "{}", String::from_utf8_lossy(&o.stderr));
    env.ok(&["network", "rm", "jumbo"]);
    let ls = env.ok(&["network", "ls"]);
    assert!(ls.contains("web") && ls.contains(&subnet) && ls.contains("host") && ls.contains("none"), "{ls}");

    // A given subnet; then refusals, each leaving nothing: the same name, an overlap with a
    // network, with a route of the host, a malformed subnet, a bad or built-in name.
    env.ok(&["network", "create", "--subnet", "10.91.7.0/24", "db"]);
    let db: serde_json::Value = serde_json::from_str(&env.ok(&["network", "inspect", "db"])).unwrap();
    assert_eq!(db[0]["gateway"], "10.91.7.1");
    let refused = |args: &[&str], code: i32, says: &str| {
        let o = env.run(args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    };
    let n = our_bridges().len();
    refused(&["network", "create", "web"], 1, "network web already exists");
    refused(&["network", "create", "--subnet", "10.91.7.128/25", "db2"], 1, "overlaps network db");
    // A route of the host's own (not one of the bridges made here), as `ip route` shows it.
    let routes = std::process::Command::new("ip").args(["-4", "route", "show", "table", "main"]).output().unwrap();
    let host_route = String::from_utf8_lossy(&routes.stdout)
        .lines()
        .filter(|l| !l.starts_with("default") && !l.contains(" dev tb-"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .find(|dest| dest.split_once('/').is_some_and(|(_, p)| p.parse::<u8>().is_ok_and(|p| (8..=29).contains(&p))));
    match host_route {
        Some(s) => refused(&["network", "create", "--subnet", &s, "clash"], 1, "overlaps the host's route"),
        None => eprintln!("(part) no host route to clash with here"),
    }
    refused(&["network", "create", "--subnet", "10.91.8.1/24", "x"], 1, "invalid subnet");
    refused(&["network", "create", "bad name"], 1, "invalid network name");
    refused(&["network", "create", "host"], 1, "built in");
    refused(&["network", "rm", "nope"], 1, "no such network: nope");
    assert_eq!(our_bridges().len(), n, "a refused create made no bridge");

    env.ok(&["network", "rm", "web", "db"]);
    assert!(!bridge_exists(&bridge));
    assert_eq!(env.ok(&["network", "ls", "-q"]).trim(), "");
    // A create killed after making its bridge, before writing its record (here: the record
    // removed, the marker it wrote first put back): prune removes the bridge, as its own.
    env.ok(&["network", "create", "orphan"]);
    let orphan: serde_json::Value = serde_json::from_str(&env.ok(&["network", "inspect", "orphan"])).unwrap();
    let orphan_bridge = orphan[0]["bridge"].as_str().unwrap().to_owned();
    std::fs::remove_file(env.root().join("networks/orphan.json")).unwrap();
    std::fs::write(env.root().join(format!("networks/.{orphan_bridge}.creating")), "").unwrap();
    assert!(bridge_exists(&orphan_bridge));
    assert!(env.ok(&["network", "prune"]).contains(&orphan_bridge));
    assert!(!bridge_exists(&orphan_bridge));
    assert_eq!(our_bridges(), before, "no bridge left behind");
}

/// A busybox image in `env`'s store, with the applets the network tests use.
fn busybox(env: &Env) -> bool {
    let ctx = env.path("busybox");
    let applets = ["sh", "ip", "ping", "cat", "sleep", "ls", "hostname", "grep", "httpd", "mkdir", "true"];
    if !common::busybox_rootfs(&ctx, &applets) {
        return false;
    }
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\n").unwrap();
    env.ok(&["build", "-q", "-t", "busybox:latest", ctx.to_str().unwrap()]);
    true
}

/// Host links made for containers (the host ends of their veth pairs).
fn veths() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tbv"))
        .collect()
}

/// No veth but those there before the test (which may go meanwhile: the kernel frees an
/// earlier test's namespaces a little later).
fn only_old_veths(before: &[String]) -> bool {
    veths().iter().all(|v| before.contains(v))
}

/// `--network NAME`: eth0 with an address of the network, a default route via its gateway,
/// /etc/hosts naming the container; the gateway (the bridge this test made) and another
/// container answer ping. `host`, `container:NAME` and an unknown network behave as Docker's.
/// After removal no veth is left and every address is free again.
#[test]
fn containers_join_bridge_networks() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !require_root() || !common::require_tool("ip") {
        return;
    }
    let veths_before = veths();
    let env = Env::new();
    if !busybox(&env) {
        return;
    }
    let tb = |args: &[&str]| env.twinbox(args);
    env.ok(&["network", "create", "tnet"]);
    let net: serde_json::Value = serde_json::from_str(&env.ok(&["network", "inspect", "tnet"])).unwrap();
    let gateway = net[0]["gateway"].as_str().unwrap().to_owned();
    let subnet = net[0]["subnet"].as_str().unwrap().to_owned();
    let prefix = subnet.rsplit_once('.').unwrap().0.to_owned();

    let script = format!(
        "ip -4 -o addr show dev eth0; ip route; grep web /etc/hosts; hostname; ping -c 1 -W 3 {gateway} >/dev/null && echo gateway-answers"
    );
    let (code, out, err) =
        tb(&["run", "--rm", "--network", "tnet", "--hostname", "web", "busybox", "sh", "-c", &script]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("inet {prefix}.2/24")), "{out}");
    let (_, mac, _) = tb(&["run", "--rm", "--network", "tnet", "busybox", "cat", "/sys/class/net/eth0/address"]);
    env.ok(&["network", "create", "--mtu", "9000", "tjumbo"]);
    let (code, mtu, err) = tb(&["run", "--rm", "--network", "tjumbo", "busybox", "cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!((code, mtu.trim()), (0, "9000"), "{err}");
    env.ok(&["network", "rm", "tjumbo"]);
    let octets: Vec<u8> = format!("{prefix}.2").split('.').map(|o| o.parse().unwrap()).collect();
    let want = format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", octets[0], octets[1], octets[2], octets[3]);
    assert_eq!(mac.trim(), want, "the MAC follows the address");
    assert!(out.contains(&format!("default via {gateway} dev eth0")), "{out}");
    assert!(out.contains(&format!("{prefix}.2\tweb")), "{out}");
    assert!(out.contains("gateway-answers"), "{out}{err}");
    // A network whose bridge is gone (as after a reboot) gets it back at the next run.
    let bridge = net[0]["bridge"].as_str().unwrap().to_owned();
    let del = std::process::Command::new("ip").args(["link", "del", &bridge]).status().unwrap();
    assert!(del.success() && !bridge_exists(&bridge));
    let (code, out, err) = tb(&["run", "--rm", "--network", "tnet", "busybox", "sh", "-c", &script]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("gateway-answers") && bridge_exists(&bridge), "{out}{err}");
    // The same for its forwarding settings, turned off by someone (or never on: a network of
    // an older twinbox), which published ports on 127.0.0.1 need.
    let localnet = format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet");
    std::fs::write(&localnet, "0").unwrap();
    assert_eq!(tb(&["run", "--rm", "--network", "tnet", "busybox", "true"]).0, 0);
    assert_eq!(std::fs::read_to_string(&localnet).unwrap().trim(), "1");
    let after: serde_json::Value = serde_json::from_str(&env.ok(&["network", "inspect", "tnet"])).unwrap();
    assert_eq!(after[0]["addresses"], serde_json::json!({}), "the --rm container's address is free");

    // Two containers on one network reach each other; a third joins the first's namespace.
    let (code, _, err) = tb(&["run", "-d", "--network", "tnet", "--name", "a", "busybox", "sleep", "60"]);
    assert_eq!(code, 0, "{err}");
    // Links inside the host are large (65520) and what leaves by the default route is not
    // (Docker's 1500), on a network that sets no MTU.
    assert_eq!(tb(&["exec", "a", "cat", "/sys/class/net/eth0/mtu"]).1.trim(), "65520");
    let routes: Vec<String> = processes_with(&["sleep", "60"])
        .iter()
        .filter_map(|pid| {
            let o = std::process::Command::new("nsenter")
                .args(["-t", &pid.to_string(), "-n", "ip", "-4", "route", "show", "default"])
                .output()
                .ok()?;
            Some(String::from_utf8_lossy(&o.stdout).into_owned())
        })
        .collect();
    assert!(routes.iter().any(|r| r.contains("mtu 1500")), "{routes:?}");
    let held: serde_json::Value = serde_json::from_str(&env.ok(&["network", "inspect", "tnet"])).unwrap();
    let a_ip = held[0]["addresses"].as_object().unwrap().keys().next().unwrap().clone();
    let (code, out, err) = tb(&[
        "run",
        "--rm",
        "--network",
        "tnet",
        "busybox",
        "sh",
        "-c",
        &format!("ping -c 1 -W 3 {a_ip} >/dev/null && echo a-answers"),
    ]);
    assert_eq!((code, out.trim()), (0, "a-answers"), "{err}");
    // By name: each container's /etc/hosts names the others on its network, kept up to date.
    let (code, out, err) = tb(&[
        "run",
        "--rm",
        "--network",
        "tnet",
        "busybox",
        "sh",
        "-c",
        "ping -c 1 -W 3 a >/dev/null && echo a-by-name",
    ]);
    assert_eq!((code, out.trim()), (0, "a-by-name"), "{err}");
    let (code, _, err) =
        tb(&["run", "-d", "--network", "tnet", "--name", "b", "--hostname", "bee", "busybox", "sleep", "60"]);
    assert_eq!(code, 0, "{err}");
    let hosts_of_a = || tb(&["exec", "a", "cat", "/etc/hosts"]).1;
    assert!(hosts_of_a().lines().any(|l| l.ends_with("\tb bee")), "{}", hosts_of_a());
    assert_eq!(tb(&["rm", "-f", "b"]).0, 0);
    assert!(!hosts_of_a().contains("bee"), "{}", hosts_of_a());
    let (code, out, err) =
        tb(&["run", "--rm", "--network", "container:a", "busybox", "ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("inet {a_ip}/")), "{out}");
    let refused = tb(&["network", "rm", "tnet"]);
    assert_eq!(refused.0, 1, "a network in use stays: {}", refused.2);
    assert!(refused.2.contains("has containers attached"), "{}", refused.2);

    // host: the host's links; an unknown network: refused, nothing made.
    let (code, out, err) = tb(&["run", "--rm", "--network", "host", "busybox", "ls", "/sys/class/net"]);
    assert_eq!(code, 0, "{err}");
    let bridge = net[0]["bridge"].as_str().unwrap();
    assert!(out.lines().any(|l| l == bridge), "the host's bridge is visible: {out}");
    let (code, _, err) = tb(&["run", "--rm", "--network", "nope", "busybox", "true"]);
    assert_eq!(code, 1, "the user's mistake is 1: {err}");
    assert!(err.contains("no such network: nope"), "{err}");

    // A container in a's namespace loses eth0 (and a's released address) when a goes.
    let (code, _, err) = tb(&["run", "-d", "--network", "container:a", "--name", "dep", "busybox", "sleep", "60"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = tb(&["rm", "-f", "a"]);
    assert_eq!(code, 0, "{err}");
    let (code, links, err) = tb(&["exec", "dep", "ls", "/sys/class/net"]);
    assert_eq!((code, links.trim()), (0, "lo"), "{err}");
    assert_eq!(tb(&["rm", "-f", "dep"]).0, 0);
    let after: serde_json::Value = serde_json::from_str(&env.ok(&["network", "inspect", "tnet"])).unwrap();
    assert_eq!(after[0]["addresses"], serde_json::json!({}));
    assert_eq!(tb(&["ps", "-aq"]).1.trim(), "");
    // The veth pairs go with the containers' namespaces, which the kernel frees shortly after.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !only_old_veths(&veths_before) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(only_old_veths(&veths_before), "no veth left: {:?} (before: {veths_before:?})", veths());
    env.ok(&["network", "rm", "tnet"]);
}

/// An HTTP GET of `/` from `addr`, bounded in time; the body.
fn get(addr: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or(out))
}

/// The page at `addr` once the server there answers (a server may take a moment to listen:
/// 50 tries, 100 ms apart).
fn page(addr: &str) -> String {
    let mut last = Err(std::io::Error::other("not tried"));
    for _ in 0..50 {
        last = get(addr);
        if last.as_ref().is_ok_and(|b| b.contains("page-of-")) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    last.unwrap_or_else(|e| panic!("GET {addr}: {e}"))
}

/// A listener on `port` of 127.0.0.1 can be made (nothing holds the port).
fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// `-p`: a container's HTTP server answers through the published port on 127.0.0.1 and on a
/// host address (the network's gateway, on the bridge this test made); `twinbox port` and `ps`
/// show the port; a port already taken fails with 125 and the port named, leaving nothing; after
/// removal the port is free again and no proxy is left.
#[test]
fn published_ports_answer_on_the_host() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !require_root() || !common::require_tool("ip") {
        return;
    }
    let env = Env::new();
    if !busybox(&env) {
        return;
    }
    let tb = |args: &[&str]| env.twinbox(args);
    env.ok(&["network", "create", "pnet"]);
    let net: serde_json::Value = serde_json::from_str(&env.ok(&["network", "inspect", "pnet"])).unwrap();
    let gateway = net[0]["gateway"].as_str().unwrap().to_owned();
    let serve = "mkdir -p /www && echo page-of-$(hostname) > /www/index.html && exec httpd -f -p 8080 -h /www";
    let (code, _, err) = tb(&[
        "run",
        "-d",
        "--network",
        "pnet",
        "-p",
        "8080",
        "--hostname",
        "web",
        "--name",
        "web",
        "busybox",
        "sh",
        "-c",
        serve,
    ]);
    assert_eq!(code, 0, "{err}");
    let (_, ports, _) = tb(&["port", "web"]);
    let host_port: u16 = ports.trim().rsplit_once(':').expect("8080/tcp -> 0.0.0.0:PORT").1.parse().unwrap();
    assert!(ports.starts_with("8080/tcp -> 0.0.0.0:"), "{ports}");
    assert!(tb(&["ps"]).1.contains(&format!("0.0.0.0:{host_port}->8080/tcp")));
    assert_eq!(page(&format!("127.0.0.1:{host_port}")).trim(), "page-of-web");
    assert_eq!(get(&format!("{gateway}:{host_port}")).unwrap().trim(), "page-of-web", "on a host address too");
    // Those went to the container by DNAT, not through the proxy: without it they still do.
    let store = std::path::absolute(env.root()).unwrap();
    let (_, json, _) = tb(&["ps", "--json"]);
    let ps: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let web_id = ps[0]["id"].as_str().unwrap().to_owned();
    let web_ip = ps[0]["endpoint"]["ip"].as_str().unwrap().to_owned();
    assert!(container_tables(&store).contains(&format!("twinbox-c-{web_id}")), "{:?}", container_tables(&store));
    let proxies = processes_with(&["container-proxy", &web_ip]);
    assert_eq!(proxies.len(), 1, "{proxies:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(proxies[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !processes_with(&["container-proxy", &web_ip]).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(processes_with(&["container-proxy", &web_ip]).is_empty());
    assert_eq!(page(&format!("127.0.0.1:{host_port}")).trim(), "page-of-web", "DNAT on loopback");
    assert_eq!(get(&format!("{gateway}:{host_port}")).unwrap().trim(), "page-of-web", "DNAT on a host address");

    // UDP: `hello serve` echoes datagrams on its port; published /udp, by DNAT.
    let hello = env.path("hello");
    if common::hello_context(&hello) {
        env.ok(&["build", "-q", "-t", "hello:latest", hello.to_str().unwrap()]);
        let (code, _, err) = tb(&[
            "run",
            "-d",
            "--network",
            "pnet",
            "-p",
            "127.0.0.1::8080/udp",
            "--name",
            "echo",
            "hello",
            "serve",
            "8080",
        ]);
        assert_eq!(code, 0, "{err}");
        let (_, ports, _) = tb(&["port", "echo"]);
        assert!(ports.starts_with("8080/udp -> 127.0.0.1:"), "{ports}");
        let udp_port: u16 = ports.trim().rsplit_once(':').unwrap().1.parse().unwrap();
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_millis(300))).unwrap();
        let mut echoed = None;
        // Bounded: until the server inside is up, a datagram may go unanswered.
        for _ in 0..30 {
            sock.send_to(b"ping-udp", ("127.0.0.1", udp_port)).unwrap();
            let mut buf = [0u8; 64];
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                echoed = Some(buf[..n].to_vec());
                break;
            }
        }
        assert_eq!(echoed.as_deref(), Some(&b"ping-udp"[..]), "the datagram came back through the published port");
        assert_eq!(tb(&["rm", "-f", "echo"]).0, 0);
    }

    // A host port already taken: 125, the port named, nothing made.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = taken.local_addr().unwrap().port();
    let (code, _, err) =
        tb(&["run", "-d", "--network", "pnet", "-p", &format!("127.0.0.1:{p}:8080"), "busybox", "true"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains(&format!("cannot publish 127.0.0.1:{p}->8080/tcp")), "{err}");
    assert_eq!(tb(&["ps", "-aq"]).1.lines().count(), 1, "only web");
    // -p without a bridge network, and a malformed -p: refused before anything runs.
    let (code, _, err) = tb(&["run", "--rm", "--network", "none", "-p", "80", "busybox", "true"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("ports can be published only from a bridge network"), "{err}");
    let (code, _, err) = tb(&["run", "--rm", "--network", "pnet", "-p", "80:x", "busybox", "true"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("invalid port publication \"80:x\""), "{err}");

    // -P: every port the image EXPOSEs, on a free host port.
    let ctx = env.path("exposing");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM busybox\nEXPOSE 8080/tcp\n").unwrap();
    env.ok(&["build", "-q", "-t", "exposing:1", ctx.to_str().unwrap()]);
    let (code, _, err) = tb(&[
        "run",
        "-d",
        "--network",
        "pnet",
        "-P",
        "--hostname",
        "web2",
        "--name",
        "web2",
        "exposing:1",
        "sh",
        "-c",
        serve,
    ]);
    assert_eq!(code, 0, "{err}");
    let ports2 = tb(&["port", "web2"]).1;
    let p2: u16 = ports2.trim().rsplit_once(':').expect("a published port").1.parse().unwrap();
    assert_eq!(page(&format!("127.0.0.1:{p2}")).trim(), "page-of-web2");
    assert_eq!(tb(&["rm", "-f", "web2"]).0, 0);

    // A start that cannot publish (its port taken meanwhile) fails and keeps the container.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hp = held.local_addr().unwrap().port();
    drop(held);
    let (code, _, err) = tb(&[
        "run",
        "-d",
        "--network",
        "pnet",
        "-p",
        &format!("127.0.0.1:{hp}:8080"),
        "--name",
        "w3",
        "busybox",
        "true",
    ]);
    assert_eq!(code, 0, "{err}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !tb(&["ps", "-a"]).1.lines().any(|l| l.contains("w3") && l.contains("Exited (0)"))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let taken = std::net::TcpListener::bind(("127.0.0.1", hp)).unwrap();
    let (code, _, err) = tb(&["start", "w3"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains(&format!("cannot publish 127.0.0.1:{hp}->8080/tcp")), "{err}");
    let ps = tb(&["ps", "-a"]).1;
    assert!(ps.lines().any(|l| l.contains("w3") && l.contains("Exited (0)")), "kept, as it was: {ps}");
    drop(taken);
    assert_eq!(tb(&["start", "w3"]).0, 0, "starts once the port is free");
    assert_eq!(tb(&["rm", "-f", "w3"]).0, 0);

    assert_eq!(tb(&["rm", "-f", "web"]).0, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !port_free(host_port) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(port_free(host_port), "the proxy let the port go");
    let after: serde_json::Value = serde_json::from_str(&env.ok(&["network", "inspect", "pnet"])).unwrap();
    assert_eq!(after[0]["addresses"], serde_json::json!({}));
    assert_eq!(container_tables(&store), Vec::<String>::new(), "no forwarding rule left");
    let bridge = after[0]["bridge"].as_str().unwrap().to_owned();
    assert!(all_tables().contains(&format!("twinbox-{bridge}")));
    env.ok(&["network", "rm", "pnet"]);
    assert!(!all_tables().contains(&format!("twinbox-{bridge}")), "the network's NAT table goes with it");
}

/// The nftables tables of the host.
fn all_tables() -> Vec<String> {
    let mut nft = twinbox_engine::network::nft::Nft::open().unwrap();
    nft.tables().unwrap().into_iter().map(|(name, _)| name).collect()
}

/// The port forwarding tables the store at `store` has made.
fn container_tables(store: &Path) -> Vec<String> {
    let mut nft = twinbox_engine::network::nft::Nft::open().unwrap();
    nft.tables()
        .unwrap()
        .into_iter()
        .filter(|(name, owner)| name.starts_with("twinbox-c-") && owner == store.as_os_str().as_encoded_bytes())
        .map(|(name, _)| name)
        .collect()
}

/// The pids of the processes whose arguments include all of `words`.
fn processes_with(words: &[&str]) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> =
                cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            words.iter().all(|w| args.iter().any(|a| a == w)).then_some(pid)
        })
        .collect()
}

/// A container on a bridge network reaches what the host reaches, its connections leaving
/// with the host's address (masquerade): here a TCP server in a network namespace the test
/// makes and routes to, which answers with the address it sees the connection come from.
/// Without NAT the container's address would arrive, and the namespace has no route back.
#[test]
fn containers_reach_the_hosts_networks_through_nat() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !require_root() || !common::require_tool("ip") {
        return;
    }
    let env = Env::new();
    if !busybox(&env) {
        return;
    }
    let ns = format!("tbnat{}", std::process::id());
    let (host_end, ns_end) = (format!("tbh{}", std::process::id()), format!("tbn{}", std::process::id()));
    let ip = |args: &[&str]| {
        let st = std::process::Command::new("ip").args(args).status().unwrap();
        assert!(st.success(), "ip {args:?}");
    };
    struct Cleanup(String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
            let _ = std::process::Command::new("ip").args(["link", "del", &self.1]).status();
        }
    }
    let _cleanup = Cleanup(ns.clone(), host_end.clone());
    ip(&["netns", "add", &ns]);
    ip(&["link", "add", &host_end, "type", "veth", "peer", "name", &ns_end, "netns", &ns]);
    ip(&["addr", "add", "10.250.77.1/30", "dev", &host_end]);
    ip(&["link", "set", &host_end, "up"]);
    ip(&["-n", &ns, "addr", "add", "10.250.77.2/30", "dev", &ns_end]);
    ip(&["-n", &ns, "link", "set", &ns_end, "up"]);
    ip(&["-n", &ns, "link", "set", "lo", "up"]);

    // The server: a thread in the namespace, one connection, bounded by a timeout.
    let ns_file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let listener = std::net::TcpListener::bind("10.250.77.2:9000").unwrap();
        listener.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match listener.accept() {
                Ok((mut conn, peer)) => {
                    use std::io::Write;
                    let _ = writeln!(conn, "seen-from-{}", peer.ip());
                    return Some(peer.ip());
                }
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(_) => return None,
            }
        }
    });
    ready_rx.recv().unwrap();
    let (code, out, err) = env.twinbox(&["run", "--rm", "busybox", "sh", "-c", "nc -w 5 10.250.77.2 9000 </dev/null"]);
    let seen = server.join().unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), "seen-from-10.250.77.1", "{err}");
    assert_eq!(seen, Some("10.250.77.1".parse().unwrap()));
}

/// Twenty containers with distinct published ports, started eight at a time, all answer; after
/// their removal, and after a `twinbox run -p` killed with SIGKILL and then `rm -f`, no veth,
/// proxy, nftables rule or address is left.
#[test]
fn twenty_published_containers_and_a_killed_run_leave_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !require_root() || !common::require_tool("ip") {
        return;
    }
    let veths_before = veths();
    let env = Env::new();
    if !busybox(&env) {
        return;
    }
    let tb = |args: &[String]| env.twinbox(args);
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let serve = "mkdir -p /www && echo page-of-$(hostname) > /www/index.html && exec httpd -f -p 8080 -h /www";
    let names: Vec<String> = (0..20).map(|i| format!("w{i}")).collect();
    for batch in names.chunks(8) {
        std::thread::scope(|scope| {
            for n in batch {
                let args = s(&[
                    "run",
                    "-d",
                    "-p",
                    "127.0.0.1::8080",
                    "--hostname",
                    n,
                    "--name",
                    n,
                    "busybox",
                    "sh",
                    "-c",
                    serve,
                ]);
                let tb = &tb;
                scope.spawn(move || {
                    let (code, _, err) = tb(&args);
                    assert_eq!(code, 0, "{n}: {err}");
                });
            }
        });
    }
    let mut ports = Vec::new();
    for n in &names {
        let (_, out, _) = tb(&s(&["port", n]));
        let port: u16 = out.trim().rsplit_once(':').expect("a published port").1.parse().unwrap();
        ports.push(port);
    }
    let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
    assert_eq!(distinct.len(), 20, "{ports:?}");
    for (n, p) in names.iter().zip(&ports) {
        assert_eq!(page(&format!("127.0.0.1:{p}")).trim(), format!("page-of-{n}"));
    }
    let mut rm = s(&["rm", "-f"]);
    rm.extend(names.iter().cloned());
    assert_eq!(tb(&rm).0, 0);

    // A foreground `run -p` killed with SIGKILL while its container runs, then rm -f.
    let mut cmd = env.cmd();
    cmd.env("TWINBOX_RUNTIME_ROOT", env.path("runtime"));
    let mut child = cmd
        .args(["run", "-p", "127.0.0.1::8080", "--name", "killed", "busybox", "sleep", "60"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !tb(&s(&["ps"])).1.contains("killed") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (_, out, _) = tb(&s(&["port", "killed"]));
    let killed_port: u16 = out.trim().rsplit_once(':').expect("a published port").1.parse().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(tb(&s(&["rm", "-f", "killed"])).0, 0);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let free = |p: &u16| port_free(*p);
    while !(only_old_veths(&veths_before) && ports.iter().all(free) && port_free(killed_port))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(only_old_veths(&veths_before), "no veth left: {:?} (before: {veths_before:?})", veths());
    assert!(ports.iter().all(free) && port_free(killed_port), "every proxy let its port go");
    let net: serde_json::Value = serde_json::from_str(&env.ok(&["network", "inspect", "twinbox0"])).unwrap();
    assert_eq!(net[0]["addresses"], serde_json::json!({}), "every address free");
    assert_eq!(tb(&s(&["ps", "-aq"])).1.trim(), "");
    let store = std::path::absolute(env.root()).unwrap();
    assert_eq!(container_tables(&store), Vec::<String>::new(), "no forwarding rule left");
}

/// `--network cni:NAME`: a CNI configuration list (bridge + host-local + portmap, Debian's
/// plugins) attaches the container and publishes its port; `rm` runs the plugins' DEL, which
/// leaves no address reserved, no masquerade chain and no kept namespace.
#[test]
fn cni_networks_attach_publish_and_leave_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !require_root()
        || !common::require_tool("iptables")
        || !common::require(
            Path::new("/usr/lib/cni/portmap").exists(),
            "the CNI plugins are not installed (apt-get install containernetworking-plugins)",
        )
    {
        return;
    }
    let env = Env::new();
    if !busybox(&env) {
        return;
    }
    let conf_dir = env.path("cni");
    let ipam = env.path("ipam");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let bridge = format!("tbcni{}", std::process::id() % 100_000);
    let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "tbtest", "plugins": [
        {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": true,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.78.9.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}],
                  "dataDir": ipam}},
        {"type": "portmap", "capabilities": {"portMappings": true}}
    ]});
    std::fs::write(conf_dir.join("10-tbtest.conflist"), conf.to_string()).unwrap();
    struct RemoveBridge(String);
    impl Drop for RemoveBridge {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
    let _bridge = RemoveBridge(bridge.clone());
    let tb = |args: &[&str]| {
        let o = env
            .cmd()
            .env("TWINBOX_RUNTIME_ROOT", env.path("runtime"))
            .env("TWINBOX_CNI_CONF_DIR", &conf_dir)
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, out, err) =
        tb(&["run", "--rm", "--network", "cni:tbtest", "busybox", "sh", "-c", "ip -4 -o addr show dev eth0; ip route"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("inet 10.78.9.") && out.contains("default via 10.78.9.1"), "{out}");

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let serve = "mkdir -p /www && echo page-of-cni > /www/index.html && exec httpd -f -p 8080 -h /www";
    let publish = format!("127.0.0.1:{port}:8080");
    let (code, _, err) =
        tb(&["run", "-d", "--network", "cni:tbtest", "-p", &publish, "--name", "cweb", "busybox", "sh", "-c", serve]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(page(&format!("127.0.0.1:{port}")).trim(), "page-of-cni");
    assert_eq!(tb(&["port", "cweb"]).1.trim(), format!("8080/tcp -> 127.0.0.1:{port}"));
    assert_eq!(tb(&["rm", "-f", "cweb"]).0, 0);

    let reserved: Vec<String> = std::fs::read_dir(ipam.join("tbtest"))
        .map(|d| {
            d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("10.")).collect()
        })
        .unwrap_or_default();
    assert_eq!(reserved, Vec::<String>::new(), "every address given back");
    let nat = std::process::Command::new("iptables").args(["-t", "nat", "-S"]).output().unwrap();
    let nat = String::from_utf8_lossy(&nat.stdout);
    assert!(!nat.contains("10.78.9."), "no masquerade or DNAT rule left:\n{nat}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains("/run/twinbox/netns/"), "no namespace kept");

    // An unknown CNI network, and -p without a host port: refused, nothing made.
    let (code, _, err) = tb(&["run", "--rm", "--network", "cni:nope", "busybox", "true"]);
    assert_ne!(code, 0);
    assert!(err.contains("no CNI network \"nope\""), "{err}");
    let (code, _, err) = tb(&["run", "--rm", "--network", "cni:tbtest", "-p", "80", "busybox", "true"]);
    assert_ne!(code, 0);
    assert!(err.contains("needs the host port"), "{err}");
    assert_eq!(tb(&["ps", "-aq"]).1.trim(), "");
}

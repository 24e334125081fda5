//! runc's and crun's network, attached the way their users attach it: a network namespace
//! made for the container, then the CNI `loopback`, `bridge` (with `host-local` addresses and
//! IP masquerade) and `portmap` (the published port, 127.0.0.1 included) plugins, run as a CNI
//! runtime runs them (containerd, podman, nerdctl; here the engine's [`cni`] runner, which
//! `twinbox run --network cni:NAME` uses), removed in reverse order. Debian's
//! containernetworking-plugins live in /usr/lib/cni.
//!
//! The namespace is made here, without a tool: a thread unshares its network namespace and
//! bind-mounts it at `<work>/netns/<id>`.

use std::path::{Path, PathBuf};

use twinbox_engine::network::cni;
use twinbox_engine::network::publish::PortMapping;

use super::BackendError;

/// Where Debian's (and most distributions') CNI plugins are.
pub const PLUGIN_DIR: &str = "/usr/lib/cni";
/// The bridge and subnet of the peers' network: apart from twinbox's 10.89.0.0/16 and
/// 10.90.0.0/16.
const BRIDGE: &str = "tb-bench-cni";
const SUBNET: &str = "10.77.0.0/24";

/// Whether the plugins this needs are here; the reason when not.
pub fn available() -> Result<(), String> {
    for p in ["bridge", "host-local", "portmap", "loopback"] {
        if !Path::new(PLUGIN_DIR).join(p).is_file() {
            return Err(format!("no CNI plugin {PLUGIN_DIR}/{p} (apt-get install containernetworking-plugins)"));
        }
    }
    Ok(())
}

/// One container's network: its namespace and the plugins' results, for the removal.
#[derive(Debug)]
pub struct Attachment {
    pub netns: PathBuf,
    id: String,
    loopback: Option<cni::Attachment>,
    network: Option<cni::Attachment>,
}

/// The peers' network: the bridge plugin with host-local addresses and masquerade, then
/// portmap, as a CNI configuration list.
fn config(work: &Path) -> cni::NetworkConfig {
    cni::NetworkConfig {
        name: "twinbox-bench".into(),
        cni_version: "1.0.0".into(),
        plugins: vec![
            serde_json::json!({
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": work.join("cni-ipam"),
                },
            }),
            serde_json::json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
        ],
    }
}

/// The loopback plugin on its own (what brings `lo` up in a namespace made here).
fn loopback() -> cni::NetworkConfig {
    cni::NetworkConfig {
        name: "twinbox-bench-lo".into(),
        cni_version: "1.0.0".into(),
        plugins: vec![serde_json::json!({"type": "loopback"})],
    }
}

fn failed(e: cni::CniError) -> BackendError {
    BackendError::Failed { what: "CNI".into(), status: "failed".into(), stderr: e.to_string() }
}

/// A new network namespace for `id`, bind-mounted at `<work>/netns/<id>`.
fn make_netns(work: &Path, id: &str) -> Result<PathBuf, BackendError> {
    let dir = work.join("netns");
    let path = dir.join(id);
    let write_err = |source| BackendError::Write { path: path.clone(), source };
    std::fs::create_dir_all(&dir).map_err(write_err)?;
    std::fs::File::create(&path).map_err(write_err)?;
    let target = path.clone();
    // A thread of its own: unshare(CLONE_NEWNET) changes only the calling thread's namespace,
    // and the thread ends right after.
    let made = std::thread::spawn(move || -> nix::Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
    })
    .join()
    .expect("the namespace thread does not panic");
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(write_err(e.into()));
    }
    Ok(path)
}

fn remove_netns(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(path);
}

/// Attaches a new namespace for `id` to the peers' bridge and publishes `host_port` on
/// 127.0.0.1 to its `container_port`. On error nothing is left.
pub fn attach(work: &Path, id: &str, host_port: u16, container_port: u16) -> Result<Attachment, BackendError> {
    let netns = make_netns(work, id)?;
    let mut a = Attachment { netns, id: id.to_owned(), loopback: None, network: None };
    let port = PortMapping {
        host_ip: Some(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        host_port,
        container_port,
        udp: false,
    };
    let added = (|| {
        a.loopback = Some(cni::add(&loopback(), id, &a.netns, "lo", &[]).map_err(failed)?);
        a.network = Some(cni::add(&config(work), id, &a.netns, "eth0", &[port]).map_err(failed)?);
        Ok(())
    })();
    if let Err(e) = added {
        detach(a);
        return Err(e);
    }
    Ok(a)
}

/// Removes what [`attach`] made, in reverse order.
pub fn detach(a: Attachment) {
    if let Some(n) = &a.network {
        cni::del(n, &a.id, Some(&a.netns), "eth0");
    }
    if let Some(l) = &a.loopback {
        cni::del(l, &a.id, Some(&a.netns), "lo");
    }
    remove_netns(&a.netns);
}

/// The peers' bridge, once no container uses it (the bridge plugin leaves it), and the
/// masquerade rules its `ipMasq` left (they go with their container's DEL).
pub fn remove_bridge() {
    use twinbox_engine::network::netlink::Netlink;
    let removed = Netlink::open().and_then(|mut nl| match nl.link_index(BRIDGE)? {
        Some(index) => nl.delete_link(index, BRIDGE),
        None => Ok(()),
    });
    if let Err(e) = removed {
        tracing::warn!("cannot remove the CNI bridge {BRIDGE}: {e}");
    }
}

//! runc's and crun's network, attached the way their users attach it: a network namespace
//! made for the container, then the CNI `bridge` plugin (with `host-local` addresses and IP
//! masquerade) and the `portmap` plugin (the published port, 127.0.0.1 included), run as a
//! CNI runtime runs them (containerd, podman, nerdctl): the plugin binary with the `CNI_*`
//! environment and its network configuration on stdin, `portmap` chained on `bridge`'s
//! result, removed in reverse order. Debian's containernetworking-plugins live in
//! /usr/lib/cni.
//!
//! The namespace is made here, without a tool: a thread unshares its network namespace and
//! bind-mounts it at `<work>/netns/<id>`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
    work: PathBuf,
    bridge_result: Option<serde_json::Value>,
    portmap: Option<serde_json::Value>,
}

fn bridge_conf(work: &Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "twinbox-bench",
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
    })
}

fn portmap_conf(prev: &serde_json::Value, host_port: u16, container_port: u16) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "twinbox-bench",
        "type": "portmap",
        "capabilities": {"portMappings": true},
        "snat": true,
        "runtimeConfig": {"portMappings": [
            {"hostPort": host_port, "containerPort": container_port, "protocol": "tcp", "hostIP": "127.0.0.1"}
        ]},
        "prevResult": prev,
    })
}

/// Runs plugin `kind` with `command` (ADD, DEL) for container `id` in `netns`; its result.
fn plugin(
    kind: &str,
    command: &str,
    id: &str,
    netns: &Path,
    conf: &serde_json::Value,
) -> Result<Vec<u8>, BackendError> {
    let what = format!("CNI {kind} {command}");
    let spawn_err = |source| BackendError::Spawn { what: what.clone(), source };
    let mut child = Command::new(Path::new(PLUGIN_DIR).join(kind))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", PLUGIN_DIR)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let conf = serde_json::to_vec(conf).expect("a configuration serializes");
    child.stdin.take().expect("piped").write_all(&conf).map_err(spawn_err)?;
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        return Err(BackendError::Failed { what, status: out.status.to_string(), stderr: said });
    }
    Ok(out.stdout)
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
    let mut a = Attachment { netns, id: id.to_owned(), work: work.to_owned(), bridge_result: None, portmap: None };
    let added = (|| {
        let lo = serde_json::json!({"cniVersion": "1.0.0", "name": "twinbox-bench-lo", "type": "loopback"});
        plugin("loopback", "ADD", id, &a.netns, &lo)?;
        let out = plugin("bridge", "ADD", id, &a.netns, &bridge_conf(work))?;
        let result: serde_json::Value = serde_json::from_slice(&out).map_err(|e| BackendError::Failed {
            what: "CNI bridge ADD".into(),
            status: "unreadable result".into(),
            stderr: e.to_string(),
        })?;
        a.bridge_result = Some(result.clone());
        let pm = portmap_conf(&result, host_port, container_port);
        plugin("portmap", "ADD", id, &a.netns, &pm)?;
        a.portmap = Some(pm);
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
    if let Some(pm) = &a.portmap {
        if let Err(e) = plugin("portmap", "DEL", &a.id, &a.netns, pm) {
            tracing::warn!("{e}");
        }
    }
    if a.bridge_result.is_some() {
        if let Err(e) = plugin("bridge", "DEL", &a.id, &a.netns, &bridge_conf(&a.work)) {
            tracing::warn!("{e}");
        }
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

//! CNI networks (`--network cni:NAME`): a network configured for containerd, podman or
//! Kubernetes in `/etc/cni/net.d` (`TWINBOX_CNI_CONF_DIR` to look elsewhere), attached the way
//! a CNI runtime attaches it: each plugin of the configuration list run in order with the
//! `CNI_*` environment and its configuration on stdin (the previous plugin's result as
//! `prevResult`, published ports as the `portMappings` runtime configuration of the plugins
//! that declare that capability), removed in reverse order with the last result. Plugins are
//! looked up in `CNI_PATH`, else `/usr/lib/cni` (Debian's containernetworking-plugins) and
//! `/opt/cni/bin`. What twinbox keeps to remove it later is `<container>/cni.json`.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use super::publish::PortMapping;

/// CNI versions whose result format (`ips[].address`) this reads.
const RESULT_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no CNI network {name:?} in {dirs}; see `ls {dirs}`, or set TWINBOX_CNI_CONF_DIR")]
    NoSuchNetwork { name: String, dirs: String },
    #[error("CNI configuration {path}: {why}")]
    BadConfig { path: PathBuf, why: String },
    #[error(
        "no CNI plugin {kind:?} in {dirs}; install it (apt-get install containernetworking-plugins) or set CNI_PATH"
    )]
    NoPlugin { kind: String, dirs: String },
    #[error("CNI plugin {kind} {command} failed: {message}")]
    Plugin { kind: String, command: &'static str, message: String },
    #[error("-p with CNI network {0} needs a plugin with the portMappings capability (portmap) in its configuration")]
    NoPortMap(String),
    #[error("-p with a CNI network needs the host port ({0}): the portmap plugin does not choose one")]
    NeedsHostPort(String),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl twinbox_exit::ExitCode for CniError {
    fn exit_code(&self) -> i32 {
        match self {
            CniError::NoSuchNetwork { .. }
            | CniError::BadConfig { .. }
            | CniError::NoPlugin { .. }
            | CniError::NoPortMap(_)
            | CniError::NeedsHostPort(_) => twinbox_exit::USER_ERROR,
            CniError::Plugin { .. } | CniError::Io { .. } => twinbox_exit::INTERNAL,
        }
    }
}

/// A network configuration list: its name, version and plugins, as found on disk.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NetworkConfig {
    pub name: String,
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub plugins: Vec<Value>,
}

/// Where network configurations are looked up.
pub fn conf_dir() -> PathBuf {
    std::env::var_os("TWINBOX_CNI_CONF_DIR").map(PathBuf::from).unwrap_or_else(|| "/etc/cni/net.d".into())
}

/// Where plugins are looked up, in order.
pub fn plugin_dirs() -> Vec<PathBuf> {
    match std::env::var_os("CNI_PATH") {
        Some(p) => std::env::split_paths(&p).collect(),
        None => vec!["/usr/lib/cni".into(), "/opt/cni/bin".into()],
    }
}

fn shown(dirs: &[PathBuf]) -> String {
    dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":")
}

/// The configuration named `name` in [`conf_dir`]: a `.conflist`, or a single plugin's `.conf`
/// or `.json` (a list of one), the first in file name order, as libcni picks.
pub fn find(name: &str) -> Result<NetworkConfig, CniError> {
    find_in(&conf_dir(), name)
}

fn find_in(dir: &Path, name: &str) -> Result<NetworkConfig, CniError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist" || x == "conf" || x == "json"))
        .collect();
    files.sort();
    for path in files {
        let bad = |why: String| CniError::BadConfig { path: path.clone(), why };
        let Ok(bytes) = std::fs::read(&path) else { continue };
        let Ok(v) = serde_json::from_slice::<Value>(&bytes) else { continue };
        if v.get("name").and_then(Value::as_str) != Some(name) {
            continue;
        }
        let version = v.get("cniVersion").and_then(Value::as_str).unwrap_or("0.4.0").to_owned();
        let plugins = match v.get("plugins") {
            Some(Value::Array(list)) => list.clone(),
            Some(_) => return Err(bad("\"plugins\" is not a list".into())),
            // A single plugin's configuration.
            None => vec![v.clone()],
        };
        if plugins.is_empty() || plugins.iter().any(|p| p.get("type").and_then(Value::as_str).is_none()) {
            return Err(bad("every plugin needs a \"type\"".into()));
        }
        if !RESULT_VERSIONS.contains(&version.as_str()) {
            return Err(bad(format!("cniVersion {version}: twinbox reads results of {}", RESULT_VERSIONS.join(", "))));
        }
        return Ok(NetworkConfig { name: name.to_owned(), cni_version: version, plugins });
    }
    Err(CniError::NoSuchNetwork { name: name.to_owned(), dirs: dir.display().to_string() })
}

/// Where a container's network namespace is kept while it is attached to a CNI network.
const NETNS_DIR: &str = "/run/twinbox/netns";

/// Keeps the network namespace of process `pid` (container `id`'s init) as a file, bind
/// mounted, as containerd and podman keep theirs: the plugins' DEL needs it to find what to
/// undo (the bridge plugin's masquerade rules are found from the interface's addresses), and
/// the init may be gone by then. Released by [`release_netns`]; a SIGKILLed twinbox's is
/// released by the container's `rm`.
pub fn keep_netns(id: &str, pid: i32) -> Result<PathBuf, CniError> {
    let io = |op, path: &Path| {
        let path = path.to_owned();
        move |source| CniError::Io { op, path, source }
    };
    let path = Path::new(NETNS_DIR).join(id);
    std::fs::create_dir_all(NETNS_DIR).map_err(io("create directory", Path::new(NETNS_DIR)))?;
    std::fs::File::create(&path).map_err(io("create", &path))?;
    let source = format!("/proc/{pid}/ns/net");
    if let Err(e) =
        nix::mount::mount(Some(source.as_str()), &path, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>)
    {
        let _ = std::fs::remove_file(&path);
        return Err(io("bind-mount the network namespace at", &path)(e.into()));
    }
    Ok(path)
}

/// The namespace [`keep_netns`] kept for container `id`, if any.
pub fn kept_netns(id: &str) -> Option<PathBuf> {
    let path = Path::new(NETNS_DIR).join(id);
    path.exists().then_some(path)
}

/// Lets go of what [`keep_netns`] kept (nothing when there is nothing).
pub fn release_netns(id: &str) {
    let path = Path::new(NETNS_DIR).join(id);
    if path.exists() {
        let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&path);
    }
}

/// What a container's attachment needs for its removal: the configuration, the ports and the
/// final result. Kept as `<container>/cni.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub config: NetworkConfig,
    pub ports: Vec<PortMapping>,
    pub result: Value,
    /// How many plugins' ADD succeeded (the DEL runs for those).
    pub added: usize,
}

impl Attachment {
    /// The container's IPv4 address and prefix length, from the result.
    pub fn ipv4(&self) -> Option<(Ipv4Addr, u8)> {
        self.result.get("ips")?.as_array()?.iter().find_map(|ip| {
            let (addr, len) = ip.get("address")?.as_str()?.split_once('/')?;
            Some((addr.parse().ok()?, len.parse().ok()?))
        })
    }
}

/// The `portMappings` runtime configuration of `ports`.
fn port_mappings(ports: &[PortMapping]) -> Value {
    Value::Array(
        ports
            .iter()
            .map(|m| {
                let mut v =
                    json!({"hostPort": m.host_port, "containerPort": m.container_port, "protocol": m.protocol()});
                if let Some(ip) = m.host_ip {
                    v["hostIP"] = json!(ip.to_string());
                }
                v
            })
            .collect(),
    )
}

fn wants_ports(plugin: &Value) -> bool {
    plugin.pointer("/capabilities/portMappings").and_then(Value::as_bool) == Some(true)
}

/// Plugin `i`'s configuration: its own, with the list's name and version, the previous
/// result and the runtime configuration it asks for.
fn plugin_conf(config: &NetworkConfig, i: usize, prev: Option<&Value>, ports: &[PortMapping]) -> Value {
    let mut conf = config.plugins[i].clone();
    conf["name"] = json!(config.name);
    conf["cniVersion"] = json!(config.cni_version);
    if let Some(p) = prev {
        conf["prevResult"] = p.clone();
    }
    if wants_ports(&config.plugins[i]) && !ports.is_empty() {
        conf["runtimeConfig"] = json!({"portMappings": port_mappings(ports)});
    }
    conf
}

/// Attaches the network namespace at `netns` (of container `id`) to `config` as `ifname`,
/// publishing `ports`. On error the plugins that succeeded are run with DEL.
pub fn add(
    config: &NetworkConfig,
    id: &str,
    netns: &Path,
    ifname: &str,
    ports: &[PortMapping],
) -> Result<Attachment, CniError> {
    if !ports.is_empty() {
        if !config.plugins.iter().any(wants_ports) {
            return Err(CniError::NoPortMap(config.name.clone()));
        }
        if let Some(m) = ports.iter().find(|m| m.host_port == 0) {
            return Err(CniError::NeedsHostPort(m.to_string()));
        }
    }
    let mut a = Attachment { config: config.clone(), ports: ports.to_vec(), result: Value::Null, added: 0 };
    for i in 0..config.plugins.len() {
        let prev = (i > 0).then_some(&a.result);
        let conf = plugin_conf(config, i, prev, ports);
        match run(&conf, "ADD", id, Some(netns), ifname) {
            Ok(out) => {
                a.added = i + 1;
                a.result = serde_json::from_slice(&out).map_err(|e| CniError::Plugin {
                    kind: plugin_type(&conf),
                    command: "ADD",
                    message: format!("its result is not JSON: {e}"),
                })?;
            }
            Err(e) => {
                del(&a, id, Some(netns), ifname);
                return Err(e);
            }
        }
    }
    Ok(a)
}

/// Removes what [`add`] made, last plugin first; `netns` None once the namespace is gone (the
/// plugins then release what they hold on the host). Failures are logged: a removal goes on.
pub fn del(a: &Attachment, id: &str, netns: Option<&Path>, ifname: &str) {
    for i in (0..a.added).rev() {
        let conf = plugin_conf(&a.config, i, Some(&a.result), &a.ports);
        if let Err(e) = run(&conf, "DEL", id, netns, ifname) {
            tracing::warn!(container = id, error = %e, "CNI DEL");
        }
    }
}

fn plugin_type(conf: &Value) -> String {
    conf.get("type").and_then(Value::as_str).unwrap_or("?").to_owned()
}

/// Runs one plugin; its stdout. A plugin's error result (`{"code", "msg"}`) is the message.
fn run(conf: &Value, command: &'static str, id: &str, netns: Option<&Path>, ifname: &str) -> Result<Vec<u8>, CniError> {
    let kind = plugin_type(conf);
    let dirs = plugin_dirs();
    let exe = dirs
        .iter()
        .map(|d| d.join(&kind))
        .find(|p| p.is_file())
        .ok_or_else(|| CniError::NoPlugin { kind: kind.clone(), dirs: shown(&dirs) })?;
    let failed = |message: String| CniError::Plugin { kind: kind.clone(), command, message };
    let mut child = Command::new(&exe)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns.map(Path::as_os_str).unwrap_or_default())
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", std::env::join_paths(&dirs).unwrap_or_default())
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot run {}: {e}", exe.display())))?;
    let bytes = serde_json::to_vec(conf).expect("a configuration serializes");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&bytes);
    }
    let out = child.wait_with_output().map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        let said = serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.get("msg").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| {
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
            });
        return Err(failed(format!("{} ({})", said.trim(), out.status)));
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NetworkConfig {
        NetworkConfig {
            name: "n".into(),
            cni_version: "1.0.0".into(),
            plugins: vec![
                json!({"type": "bridge", "bridge": "b0"}),
                json!({"type": "portmap", "capabilities": {"portMappings": true}}),
            ],
        }
    }

    #[test]
    fn plugins_get_the_list_name_previous_result_and_ports() {
        let ports = vec!["127.0.0.1:8080:80".parse::<PortMapping>().unwrap(), "5353:53/udp".parse().unwrap()];
        let prev = json!({"ips": [{"address": "10.1.2.3/24"}]});
        let first = plugin_conf(&config(), 0, None, &ports);
        assert_eq!(first["name"], "n");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert!(first.get("prevResult").is_none() && first.get("runtimeConfig").is_none());
        let second = plugin_conf(&config(), 1, Some(&prev), &ports);
        assert_eq!(second["prevResult"], prev);
        assert_eq!(
            second["runtimeConfig"]["portMappings"],
            json!([
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"},
                {"hostPort": 5353, "containerPort": 53, "protocol": "udp"}
            ])
        );
        let a = Attachment { config: config(), ports, result: prev, added: 2 };
        assert_eq!(a.ipv4(), Some((Ipv4Addr::new(10, 1, 2, 3), 24)));
    }

    #[test]
    fn configurations_are_found_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("10-a.conflist"),
            r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("20-b.conf"), r#"{"cniVersion":"0.4.0","name":"b","type":"ptp"}"#).unwrap();
        std::fs::write(
            dir.path().join("30-c.conflist"),
            r#"{"cniVersion":"0.3.1","name":"c","plugins":[{"type":"x"}]}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("junk.conf"), "not json").unwrap();
        let find = |name| find_in(dir.path(), name);
        assert_eq!(find("a").unwrap().plugins.len(), 1);
        let b = find("b").unwrap();
        assert_eq!((b.cni_version.as_str(), b.plugins[0]["type"].as_str()), ("0.4.0", Some("ptp")));
        assert!(matches!(find("c"), Err(CniError::BadConfig { .. })), "an old result format is refused");
        assert!(matches!(find("nope"), Err(CniError::NoSuchNetwork { .. })));
        // -p needs a portmap plugin and a host port.
        let no_pm = NetworkConfig { plugins: vec![json!({"type": "bridge"})], ..config() };
        let p: Vec<PortMapping> = vec!["8080:80".parse().unwrap()];
        assert!(matches!(add(&no_pm, "x", Path::new("/nonexistent"), "eth0", &p), Err(CniError::NoPortMap(_))));
        let any: Vec<PortMapping> = vec!["80".parse().unwrap()];
        assert!(matches!(
            add(&config(), "x", Path::new("/nonexistent"), "eth0", &any),
            Err(CniError::NeedsHostPort(_))
        ));
    }
}

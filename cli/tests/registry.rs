//! `twinbox pull/push/login/logout` against a real registry (Debian's docker-registry, started
//! here on 127.0.0.1 under a temp dir), skopeo on the other side, and small fake registries for
//! the failures a real one does not produce (a blob with the wrong digest, a broken-off
//! download, an unknown manifest type).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{require, require_tool, sh, Env};
use oci_spec::image::{
    ConfigBuilder, Descriptor, ImageConfigurationBuilder, ImageIndexBuilder, MediaType, PlatformBuilder, RootFsBuilder,
};
use twinbox_image::{Digest, Reference, Store};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A docker-registry process serving a temp dir on 127.0.0.1; killed (by PID) on drop.
struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Start one, optionally with htpasswd Basic auth for `user:pass`; `None` (skip) when the
    /// docker-registry package is not installed.
    fn start(auth: Option<(&str, &str)>) -> Option<Self> {
        if !require(
            Path::new(REGISTRY_BIN).exists(),
            "docker-registry is not installed (apt-get install docker-registry; scripts/test.sh should install it)",
        ) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut config = format!(
            "version: 0.1\nlog: {{level: error, accesslog: {{disabled: true}}}}\n\
             storage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\n\
             http: {{addr: 127.0.0.1:{port}}}\n",
            dir.path().join("data").display()
        );
        if let Some((user, pass)) = auth {
            let hash = bcrypt::hash(pass, 5).unwrap();
            std::fs::write(dir.path().join("htpasswd"), format!("{user}:{hash}\n")).unwrap();
            config += &format!(
                "auth: {{htpasswd: {{realm: twinbox-test, path: {}}}}}\n",
                dir.path().join("htpasswd").display()
            );
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut reg = Self { child, port, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = http_status(port, "/v2/") {
                assert!(status == 200 || status == 401, "registry answered /v2/ with {status}");
                return Some(reg);
            }
            if let Ok(Some(st)) = reg.child.try_wait() {
                let log = std::fs::read_to_string(reg._dir.path().join("log")).unwrap_or_default();
                panic!("docker-registry exited with {st}: {log}");
            }
            assert!(Instant::now() < deadline, "docker-registry did not answer on port {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status of a plain `GET path` on 127.0.0.1:port, or `None` if nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A tar layer of regular files.
fn layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Store an image of gzipped layers for `arch` and return its manifest descriptor.
fn put_image(store: &Store, arch: &str, layers: &[Vec<u8>]) -> Descriptor {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        let (d, size) = store.put_blob(&gzip(l)).unwrap();
        descs.push(Descriptor::new(MediaType::ImageLayerGzip, size, &d));
        diff_ids.push(Digest::of(l).to_string());
    }
    let config = ImageConfigurationBuilder::default()
        .architecture(arch)
        .os("linux")
        .rootfs(RootFsBuilder::default().typ("layers").diff_ids(diff_ids).build().unwrap())
        .config(ConfigBuilder::default().cmd(vec!["/hello".to_string()]).build().unwrap())
        .build()
        .unwrap();
    store.put_image(&config, descs).unwrap()
}

fn host_arch() -> String {
    twinbox_image::store::host_platform().split('/').nth(1).unwrap().to_owned()
}

/// A two-layer image tagged `name` in the env's store; returns (manifest, config) digests.
fn small_image(env: &Env, name: &str, salt: &str) -> (Digest, Digest) {
    let store = env.store();
    let l1 = layer(&[("etc/greeting", b"hello from the registry\n"), ("salt", salt.as_bytes())]);
    let l2 = layer(&[("bin/tool", &vec![7u8; 300_000])]);
    let desc = put_image(&store, &host_arch(), &[l1, l2]);
    store.set_tag(&name.parse::<Reference>().unwrap(), &desc).unwrap();
    let img = store.resolve(name).unwrap();
    (img.manifest_digest, img.config_digest)
}

/// Every file under `root` with its contents' sha256.
fn tree(root: &Path) -> BTreeMap<String, String> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let rel = e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned();
            (rel, Digest::of(&std::fs::read(e.path()).unwrap()).to_string())
        })
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn blob_count(root: &Path) -> usize {
    std::fs::read_dir(root.join("blobs/sha256")).map_or(0, |d| d.count())
}

fn tmp_is_empty(root: &Path) -> bool {
    std::fs::read_dir(root.join("tmp")).map_or(true, |mut d| d.next().is_none())
}

/// An env whose twinbox commands use `docker_config` as DOCKER_CONFIG.
fn run_with(env: &Env, docker_config: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = env.cmd();
    c.env("DOCKER_CONFIG", docker_config).args(args);
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

#[test]
fn push_rmi_pull_round_trip() {
    let Some(reg) = Registry::start(None) else { return };
    let env = Env::new();
    let dc = env.path("docker");
    let name = format!("{}/team/app:1", reg.host());
    let (manifest, config) = small_image(&env, &name, "a");
    env.ok(&["unpack", &name, env.path("before").to_str().unwrap()]);

    let o = run_with(&env, &dc, &["push", &name], None);
    assert!(o.status.success(), "push: {}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&manifest.to_string()) && out.contains("3 uploaded"), "{out}");

    // Pushing again uploads nothing.
    let o = run_with(&env, &dc, &["push", &name], None);
    assert!(String::from_utf8_lossy(&o.stdout).contains("3 already there"), "{}", stderr(&o));

    env.ok(&["rmi", &name]);
    env.ok(&["prune"]);
    assert!(env.store().resolve(&name).is_err());
    let o = run_with(&env, &dc, &["pull", &name], None);
    assert!(o.status.success(), "pull: {}", stderr(&o));
    assert!(stderr(&o).contains(&format!("Digest: {manifest}")), "{}", stderr(&o));
    let img = env.store().resolve(&name).unwrap();
    assert_eq!((img.manifest_digest, img.config_digest), (manifest.clone(), config));
    env.ok(&["unpack", &name, env.path("after").to_str().unwrap()]);
    assert_eq!(tree(&env.path("before")), tree(&env.path("after")));
    assert!(env.store().verify_all().unwrap().is_empty());

    // Up to date the second time; by digest works too.
    let o = run_with(&env, &dc, &["pull", &name], None);
    assert!(stderr(&o).contains("up to date"), "{}", stderr(&o));
    let by_digest = format!("{}/team/app@{manifest}", reg.host());
    let o = run_with(&env, &dc, &["pull", &by_digest], None);
    assert!(o.status.success(), "{}", stderr(&o));

    // Another repository of the same registry: blobs are mounted, not uploaded.
    let other = format!("{}/other/app:2", reg.host());
    env.ok(&["tag", &name, &other]);
    let o = run_with(&env, &dc, &["push", &other], None);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("3 mounted"), "{out}{}", stderr(&o));

    // A fresh store pulls it from the other repository.
    let env2 = Env::new();
    let o = run_with(&env2, &dc, &["pull", &other], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(env2.store().resolve(&other).unwrap().manifest_digest, manifest);
}

#[test]
fn chunked_upload_of_a_larger_layer() {
    let Some(reg) = Registry::start(None) else { return };
    let env = Env::new();
    let dc = env.path("docker");
    let name = format!("{}/big/app:1", reg.host());
    // ~3 MB of incompressible data: several 1 MiB chunks.
    let mut data = vec![0u8; 3_000_000];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let store = env.store();
    let desc = put_image(&store, &host_arch(), &[layer(&[("data", &data)])]);
    store.set_tag(&name.parse::<Reference>().unwrap(), &desc).unwrap();
    let o = run_with(&env, &dc, &["push", "--chunk-size", "1", &name], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let env2 = Env::new();
    let o = run_with(&env2, &dc, &["pull", &name], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(env2.store().resolve(&name).unwrap().manifest_digest, Digest::try_from(desc.digest()).unwrap());
}

#[test]
fn skopeo_interop_both_ways() {
    if !require_tool("skopeo") {
        return;
    }
    let Some(reg) = Registry::start(None) else { return };
    let env = Env::new();
    let dc = env.path("docker");
    // skopeo pushes from our store; we pull it into another.
    let (_, config) = small_image(&env, "local/app:1", "skopeo");
    sh(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:local/app:1", env.root().display()),
        &format!("docker://{}/sk/app:1", reg.host()),
    ]));
    let env2 = Env::new();
    let pulled = format!("{}/sk/app:1", reg.host());
    let o = run_with(&env2, &dc, &["pull", &pulled], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(env2.store().resolve(&pulled).unwrap().config_digest, config, "same image id");
    env.ok(&["unpack", "local/app:1", env.path("a").to_str().unwrap()]);
    env2.ok(&["unpack", &pulled, env.path("b").to_str().unwrap()]);
    assert_eq!(tree(&env.path("a")), tree(&env.path("b")));

    // We push; skopeo copies it out of the registry and sees our manifest digest.
    let ours = format!("{}/tw/app:1", reg.host());
    let (manifest, _) = small_image(&env, &ours, "twinbox");
    let o = run_with(&env, &dc, &["push", &ours], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = env.path("oci-out");
    sh(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{ours}"),
        &format!("oci:{}:copied", out.display()),
    ]));
    let v: serde_json::Value =
        serde_json::from_str(&sh(Command::new("skopeo").args(["inspect", &format!("oci:{}:copied", out.display())])))
            .unwrap();
    assert_eq!(v["Digest"], manifest.to_string());
    let v: serde_json::Value = serde_json::from_str(&sh(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{ours}"),
    ])))
    .unwrap();
    assert_eq!(v["Digest"], manifest.to_string());
}

#[test]
fn multi_platform_index_pushed_by_skopeo_pulls_the_right_platform() {
    if !require_tool("skopeo") {
        return;
    }
    let Some(reg) = Registry::start(None) else { return };
    let env = Env::new();
    let dc = env.path("docker");
    let store = env.store();
    let mut entries = Vec::new();
    for arch in ["amd64", "arm64"] {
        let mut d = put_image(&store, arch, &[layer(&[("arch", arch.as_bytes())])]);
        d.set_platform(Some(PlatformBuilder::default().os("linux").architecture(arch).build().unwrap()));
        entries.push(d);
    }
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(entries)
        .build()
        .unwrap();
    let (id, size) = store.put_json(&index).unwrap();
    store.set_tag(&"multi:1".parse().unwrap(), &Descriptor::new(MediaType::ImageIndex, size, &id)).unwrap();
    sh(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi:1", env.root().display()),
        &format!("docker://{}/multi/app:1", reg.host()),
    ]));
    let name = format!("{}/multi/app:1", reg.host());
    for (platform, arch) in [("linux/arm64", "arm64"), ("linux/amd64", "amd64")] {
        let env2 = Env::new();
        let o = run_with(&env2, &dc, &["pull", "--platform", platform, &name], None);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains(&format!("Digest: {id}")), "the index digest is reported: {}", stderr(&o));
        let img = env2.store().resolve(&name).unwrap();
        assert_eq!(img.config.architecture().to_string(), arch);
        env2.ok(&["unpack", &name, env2.path("r").to_str().unwrap()]);
        assert_eq!(std::fs::read_to_string(env2.path("r/arch")).unwrap(), arch);
    }
    // Default: the host's platform.
    let env3 = Env::new();
    let o = run_with(&env3, &dc, &["pull", &name], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(env3.store().resolve(&name).unwrap().config.architecture().to_string(), host_arch());
    // A platform the index does not have is a user error naming what it has.
    let o = run_with(&env3, &dc, &["pull", "--platform", "linux/s390x", &name], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("linux/amd64") && stderr(&o).contains("linux/arm64"), "{}", stderr(&o));
}

#[test]
fn basic_auth_login_push_logout() {
    let Some(reg) = Registry::start(Some(("alice", "s3cret"))) else { return };
    let env = Env::new();
    let dc = env.path("docker");
    let name = format!("{}/team/private:1", reg.host());
    small_image(&env, &name, "auth");

    // No credentials: a clear error, exit 1.
    let o = run_with(&env, &dc, &["push", &name], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("twinbox login"), "{}", stderr(&o));

    // Wrong password: exit 1, nothing written.
    let o = run_with(&env, &dc, &["login", "-u", "alice", "--password-stdin", &reg.host()], Some("wrong\n"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("authentication"), "{}", stderr(&o));
    assert!(!dc.join("config.json").exists());

    let o = run_with(&env, &dc, &["login", "-u", "alice", "--password-stdin", &reg.host()], Some("s3cret\n"));
    assert!(o.status.success(), "{}", stderr(&o));
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(dc.join("config.json")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dc.join("config.json")).unwrap()).unwrap();
    assert!(cfg["auths"][reg.host()]["auth"].is_string(), "{cfg}");

    let o = run_with(&env, &dc, &["push", &name], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let env2 = Env::new();
    let o = run_with(&env2, &dc, &["pull", &name], None);
    assert!(o.status.success(), "{}", stderr(&o));

    let o = run_with(&env, &dc, &["logout", &reg.host()], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let env3 = Env::new();
    let o = run_with(&env3, &dc, &["pull", &name], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(blob_count(&env3.root()), 0);
}

#[test]
fn registry_down_and_unknown_image_are_user_errors() {
    let env = Env::new();
    let dc = env.path("docker");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let o = run_with(&env, &dc, &["pull", &format!("127.0.0.1:{port}/x/y:1")], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("cannot reach registry 127.0.0.1:{port}")), "{}", stderr(&o));
    let o = run_with(&env, &dc, &["pull", "127.0.0.1:5000/Bad/Name"], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));

    let Some(reg) = Registry::start(None) else { return };
    let o = run_with(&env, &dc, &["pull", &format!("{}/no/such:1", reg.host())], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("no such image in the registry"), "{}", stderr(&o));
    let o = run_with(&env, &dc, &["push", &format!("{}/not/local:1", reg.host())], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(blob_count(&env.root()), 0);
}

// ---- a fake registry for what a real one does not do ----

/// One canned answer: status line, headers, body, and how many body bytes to send before
/// closing the connection (all when `None`).
struct Reply {
    status: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    cut_after: Option<usize>,
}

impl Reply {
    fn ok(content_type: &str, body: Vec<u8>) -> Self {
        Self { status: "200 OK", headers: vec![("Content-Type".into(), content_type.into())], body, cut_after: None }
    }
    fn not_found() -> Self {
        Self { status: "404 Not Found", headers: vec![], body: vec![], cut_after: None }
    }
}

type Handler = dyn Fn(&str, &str, &BTreeMap<String, String>) -> Reply + Send + Sync;

/// Serve `handler` on 127.0.0.1 (one request per connection) from a background thread.
fn fake_registry(handler: Arc<Handler>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let handler = handler.clone();
            std::thread::spawn(move || serve_one(stream, &*handler));
        }
    });
    port
}

fn serve_one(stream: TcpStream, handler: &Handler) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let reply = handler(method, path, &headers);
    let mut out = stream;
    let mut head =
        format!("HTTP/1.1 {}\r\nContent-Length: {}\r\nConnection: close\r\n", reply.status, reply.body.len());
    for (k, v) in &reply.headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    let _ = out.write_all(head.as_bytes());
    if method != "HEAD" {
        let n = reply.cut_after.unwrap_or(reply.body.len()).min(reply.body.len());
        let _ = out.write_all(&reply.body[..n]);
    }
    let _ = out.flush();
    let _ = out.shutdown(std::net::Shutdown::Both);
}

/// A config, one layer and an OCI manifest naming them, as bytes.
fn canned_image(layer_bytes: &[u8]) -> (Vec<u8>, Digest, Vec<u8>, Digest, Vec<u8>) {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": host_arch(), "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [Digest::of(layer_bytes).to_string()]},
        "config": {}
    }))
    .unwrap();
    let cd = Digest::of(&config);
    let ld = Digest::of(layer_bytes);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld.to_string(), "size": layer_bytes.len()}]
    }))
    .unwrap();
    (manifest, cd, config, ld, layer_bytes.to_vec())
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[test]
fn a_blob_with_the_wrong_digest_is_refused_and_nothing_is_stored() {
    let l = layer(&[("f", b"the real content")]);
    let (manifest, cd, config, ld, _) = canned_image(&l);
    let evil = layer(&[("f", b"something else!!")]);
    assert_eq!(evil.len(), l.len());
    let ld_hex = ld.to_string();
    let port = fake_registry(Arc::new(move |_m, path, _h| {
        if path == "/v2/" {
            Reply::ok("application/json", b"{}".to_vec())
        } else if path.ends_with("/manifests/1") {
            Reply::ok(OCI_MANIFEST, manifest.clone())
        } else if path.ends_with(&cd.to_string()) {
            Reply::ok("application/octet-stream", config.clone())
        } else if path.ends_with(&ld_hex) {
            Reply::ok("application/octet-stream", evil.clone())
        } else {
            Reply::not_found()
        }
    }));
    let env = Env::new();
    let o = run_with(&env, &env.path("docker"), &["pull", &format!("127.0.0.1:{port}/evil/app:1")], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("expected {ld}")) && stderr(&o).contains("nothing was stored"),
        "{}",
        stderr(&o)
    );
    let store = env.store();
    assert!(store.verify_all().unwrap().is_empty());
    assert!(!store.has_blob(&ld), "the bad layer is not stored");
    assert!(store.images().unwrap().is_empty(), "nothing is tagged");
    assert!(tmp_is_empty(&env.root()), "no temp file is left");
}

#[test]
fn a_manifest_with_the_wrong_digest_or_an_unknown_type_is_refused() {
    let l = layer(&[("f", b"x")]);
    let (manifest, ..) = canned_image(&l);
    let wrong = Digest::of(b"not the manifest");
    let port = fake_registry(Arc::new(move |_m, path, _h| {
        if path.ends_with("/manifests/lying") {
            let mut r = Reply::ok(OCI_MANIFEST, manifest.clone());
            r.headers.push(("Docker-Content-Digest".into(), wrong.to_string()));
            r
        } else if path.ends_with("/manifests/old") {
            Reply::ok(
                "application/vnd.docker.distribution.manifest.v1+prettyjws",
                br#"{"schemaVersion":1,"name":"x","tag":"old","fsLayers":[]}"#.to_vec(),
            )
        } else {
            Reply::not_found()
        }
    }));
    let env = Env::new();
    let o = run_with(&env, &env.path("docker"), &["pull", &format!("127.0.0.1:{port}/a/b:lying")], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("hashes to"), "{}", stderr(&o));
    let o = run_with(&env, &env.path("docker"), &["pull", &format!("127.0.0.1:{port}/a/b:old")], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("unsupported manifest media type"), "{}", stderr(&o));
    assert_eq!(blob_count(&env.root()), 0);
}

#[test]
fn a_broken_off_download_is_resumed_with_range() {
    let mut data = vec![0u8; 2_000_000];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    let l = layer(&[("big", &data)]);
    let (manifest, cd, config, ld, layer_bytes) = canned_image(&l);
    let gets = Arc::new(AtomicUsize::new(0));
    let ranges = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (g, rs) = (gets.clone(), ranges.clone());
    let ld_hex = ld.to_string();
    let port = fake_registry(Arc::new(move |_m, path, h| {
        if path.ends_with("/manifests/1") {
            Reply::ok(OCI_MANIFEST, manifest.clone())
        } else if path.ends_with(&cd.to_string()) {
            Reply::ok("application/octet-stream", config.clone())
        } else if path.ends_with(&ld_hex) {
            let n = g.fetch_add(1, Ordering::SeqCst);
            match h.get("range") {
                Some(r) => {
                    rs.lock().unwrap().push(r.clone());
                    let start: usize = r.trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
                    let mut reply = Reply::ok("application/octet-stream", layer_bytes[start..].to_vec());
                    reply.status = "206 Partial Content";
                    reply.headers.push((
                        "Content-Range".into(),
                        format!("bytes {start}-{}/{}", layer_bytes.len() - 1, layer_bytes.len()),
                    ));
                    reply
                }
                None => {
                    let mut reply = Reply::ok("application/octet-stream", layer_bytes.clone());
                    if n == 0 {
                        reply.cut_after = Some(layer_bytes.len() / 3);
                    }
                    reply
                }
            }
        } else {
            Reply::not_found()
        }
    }));
    let env = Env::new();
    let name = format!("127.0.0.1:{port}/resume/app:1");
    let o = run_with(&env, &env.path("docker"), &["pull", &name], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming"), "{}", stderr(&o));
    let ranges = ranges.lock().unwrap().clone();
    assert_eq!(ranges.len(), 1, "one ranged request: {ranges:?}");
    assert_ne!(ranges[0], "bytes=0-");
    let store = env.store();
    assert!(store.has_blob(&ld));
    assert!(store.verify_all().unwrap().is_empty());
    env.ok(&["unpack", &name, env.path("r").to_str().unwrap()]);
    assert_eq!(std::fs::read(env.path("r/big")).unwrap(), data);
}

#[test]
fn bearer_token_flow_from_the_challenge() {
    // A registry that answers 401 with a Bearer challenge, and its token server: the token
    // is only issued with the right Basic credentials and the scope the challenge named, and
    // every registry request must carry it.
    let l = layer(&[("f", b"behind a token")]);
    let (manifest, cd, config, ld, _) = canned_image(&l);
    let token_requests = Arc::new(AtomicUsize::new(0));
    let seen = token_requests.clone();
    let token_port = fake_registry(Arc::new(move |_m, path, h| {
        seen.fetch_add(1, Ordering::SeqCst);
        let basic = format!("Basic {}", base64_of("alice:s3cret"));
        let scope_ok = path.contains("service=test-registry")
            && (path.contains("scope=repository%3Atok%2Fapp%3Apull") || path.contains("scope=repository:tok/app:pull"));
        if h.get("authorization") == Some(&basic) && scope_ok {
            Reply::ok("application/json", br#"{"token":"tok-123","expires_in":300}"#.to_vec())
        } else {
            Reply { status: "401 Unauthorized", headers: vec![], body: vec![], cut_after: None }
        }
    }));
    let realm = format!("http://127.0.0.1:{token_port}/token");
    let port = fake_registry(Arc::new(move |_m, path, h| {
        if h.get("authorization").map(String::as_str) != Some("Bearer tok-123") {
            let scope = if path == "/v2/" { String::new() } else { ",scope=\"repository:tok/app:pull\"".to_owned() };
            return Reply {
                status: "401 Unauthorized",
                headers: vec![(
                    "WWW-Authenticate".into(),
                    format!("Bearer realm=\"{realm}\",service=\"test-registry\"{scope}"),
                )],
                body: vec![],
                cut_after: None,
            };
        }
        if path == "/v2/" {
            Reply::ok("application/json", b"{}".to_vec())
        } else if path.ends_with("/manifests/1") {
            Reply::ok(OCI_MANIFEST, manifest.clone())
        } else if path.ends_with(&cd.to_string()) {
            Reply::ok("application/octet-stream", config.clone())
        } else if path.ends_with(&ld.to_string()) {
            Reply::ok("application/octet-stream", l.clone())
        } else {
            Reply::not_found()
        }
    }));
    let env = Env::new();
    let docker = env.path("docker");
    let r = format!("127.0.0.1:{port}/tok/app:1");
    // Without credentials the token server refuses: a clear user error.
    let o = run_with(&env, &docker, &["pull", &r], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // With them (written as `docker login` would), the pull goes through the token.
    std::fs::create_dir_all(&docker).unwrap();
    let auth = format!(r#"{{"auths":{{"127.0.0.1:{port}":{{"auth":"{}"}}}}}}"#, base64_of("alice:s3cret"));
    std::fs::write(docker.join("config.json"), auth).unwrap();
    let o = run_with(&env, &docker, &["pull", &r], None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(token_requests.load(Ordering::SeqCst) >= 2, "the token server was asked");
    assert!(env.store().resolve(&r).is_ok());
}

fn base64_of(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

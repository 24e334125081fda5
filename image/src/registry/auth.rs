//! Credentials and challenges: the Docker `config.json` format (`auths.<registry>.auth`, base64
//! of `user:password`; `DOCKER_CONFIG` names its directory) and `WWW-Authenticate` parsing.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{Map, Value};

use super::{RegistryError, Result};

/// The key Docker files Docker Hub credentials under.
pub const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or access token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

impl Credentials {
    /// The value of a Basic `Authorization` header.
    pub fn basic_header(&self) -> String {
        format!("Basic {}", B64.encode(format!("{}:{}", self.username, self.password)))
    }
}

/// Where Docker keeps its config: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn default_config_path() -> PathBuf {
    let dir = match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => PathBuf::from(d),
        None => std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root")).join(".docker"),
    };
    dir.join("config.json")
}

/// The registry a config key or reference domain stands for, in one form: `docker.io` for
/// Docker Hub's aliases, else host[:port] without scheme or path.
pub fn normalize_registry(key: &str) -> String {
    let k = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".to_owned(),
        h => h.to_owned(),
    }
}

/// A Docker `config.json`, kept whole so that fields twinbox does not know survive a rewrite.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    path: PathBuf,
    doc: Map<String, Value>,
}

impl DockerConfig {
    /// Read the config at `path`; a missing file is an empty config.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let doc = match fs::read(&path) {
            Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Map::new(),
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| RegistryError::ConfigJson { path: path.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Map::new(),
            Err(source) => return Err(RegistryError::Config { op: "read", path, source }),
        };
        Ok(Self { path, doc })
    }

    /// Read the default config ([`default_config_path`]).
    pub fn load_default() -> Result<Self> {
        Self::load(default_config_path())
    }

    /// The file this config is read from and written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn auths(&self) -> Option<&Map<String, Value>> {
        self.doc.get("auths").and_then(Value::as_object)
    }

    /// The credentials stored for `registry` (host[:port] or `docker.io`), if any.
    pub fn credentials(&self, registry: &str) -> Result<Option<Credentials>> {
        let want = normalize_registry(registry);
        let Some(auths) = self.auths() else { return Ok(None) };
        for (key, entry) in auths {
            if normalize_registry(key) != want {
                continue;
            }
            if let Some(auth) = entry.get("auth").and_then(Value::as_str).filter(|a| !a.is_empty()) {
                let bad = || RegistryError::ConfigAuth(key.clone());
                let decoded = B64.decode(auth.trim()).map_err(|_| bad())?;
                let text = String::from_utf8(decoded).map_err(|_| bad())?;
                let (u, p) = text.split_once(':').ok_or_else(bad)?;
                return Ok(Some(Credentials { username: u.to_owned(), password: p.to_owned() }));
            }
            let user = entry.get("username").and_then(Value::as_str);
            let pass = entry.get("password").and_then(Value::as_str);
            if let (Some(u), Some(p)) = (user, pass) {
                return Ok(Some(Credentials { username: u.to_owned(), password: p.to_owned() }));
            }
        }
        if self.doc.get("credHelpers").and_then(|h| h.get(&want)).is_some() || self.doc.contains_key("credsStore") {
            tracing::warn!(registry = %want, path = %self.path.display(), "credential helpers are not supported; using no stored credentials");
        }
        Ok(None)
    }

    /// Store credentials for `registry` (replacing any under another spelling of its name).
    pub fn set(&mut self, registry: &str, creds: &Credentials) {
        self.remove(registry);
        let key = match normalize_registry(registry).as_str() {
            "docker.io" => DOCKER_HUB_KEY.to_owned(),
            r => r.to_owned(),
        };
        let auth = B64.encode(format!("{}:{}", creds.username, creds.password));
        let auths = self.doc.entry("auths").or_insert_with(|| Value::Object(Map::new()));
        if !auths.is_object() {
            *auths = Value::Object(Map::new());
        }
        let entry: BTreeMap<&str, Value> = [("auth", Value::String(auth))].into();
        auths.as_object_mut().expect("made an object above").insert(key, serde_json::json!(entry));
    }

    /// Remove the credentials for `registry`; whether there were any.
    pub fn remove(&mut self, registry: &str) -> bool {
        let want = normalize_registry(registry);
        let Some(auths) = self.doc.get_mut("auths").and_then(Value::as_object_mut) else { return false };
        let before = auths.len();
        auths.retain(|k, _| normalize_registry(k) != want);
        auths.len() != before
    }

    /// Write the config back: directory 0700, file 0600, replaced atomically.
    pub fn save(&self) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let io = |op, path: &Path| {
            let path = path.to_owned();
            move |source| RegistryError::Config { op, path, source }
        };
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io("create directory", dir))?;
        let mut bytes = serde_json::to_vec_pretty(&self.doc).expect("a JSON map always serializes");
        bytes.push(b'\n');
        crate::atomic::write(&self.path, &bytes, 0o600, true).map_err(io("replace", &self.path))
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `basic`, `bearer`… (lowercased).
    pub scheme: String,
    /// The auth-params (`realm`, `service`, `scope`…), names lowercased.
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    /// Parse the first challenge of a `WWW-Authenticate` value.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let (scheme, mut rest) = match header.find(char::is_whitespace) {
            Some(i) => (&header[..i], header[i..].trim_start()),
            None => (header, ""),
        };
        if scheme.is_empty() {
            return None;
        }
        let mut params = BTreeMap::new();
        while !rest.is_empty() {
            let Some(eq) = rest.find('=') else { break };
            let name = rest[..eq].trim().to_ascii_lowercase();
            rest = rest[eq + 1..].trim_start();
            let value;
            if let Some(quoted) = rest.strip_prefix('"') {
                let mut v = String::new();
                let mut chars = quoted.char_indices();
                let mut end = quoted.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                v.push(n);
                            }
                        }
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => v.push(c),
                    }
                }
                value = v;
                rest = &quoted[end.min(quoted.len())..];
            } else {
                let end = rest.find(',').unwrap_or(rest.len());
                value = rest[..end].trim().to_owned();
                rest = &rest[end..];
            }
            params.insert(name, value);
            rest = rest.trim_start().trim_start_matches(',').trim_start();
        }
        Some(Self { scheme: scheme.to_ascii_lowercase(), params })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/busybox:pull,push");
        let c = Challenge::parse(r#"Basic realm="a \"quoted\" realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], r#"a "quoted" realm"#);
        let c = Challenge::parse("Basic").unwrap();
        assert!(c.params.is_empty());
        let c = Challenge::parse("Bearer realm=http://x/token, service=reg").unwrap();
        assert_eq!(c.params["realm"], "http://x/token");
        assert_eq!(c.params["service"], "reg");
    }

    #[test]
    fn config_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.json");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(
            &path,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"other:5000":{"username":"a","password":"b"}},"psFormat":"x"}"#,
        )
        .unwrap();
        let mut c = DockerConfig::load(&path).unwrap();
        let hub = c.credentials("docker.io").unwrap().unwrap();
        assert_eq!((hub.username.as_str(), hub.password.as_str()), ("u", "p"));
        assert_eq!(c.credentials("other:5000").unwrap().unwrap().password, "b");
        assert!(c.credentials("nowhere:1").unwrap().is_none());
        let creds = Credentials { username: "me".into(), password: "pa:ss".into() };
        c.set("http://127.0.0.1:5000", &creds);
        c.save().unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let mut c = DockerConfig::load(&path).unwrap();
        assert_eq!(c.credentials("127.0.0.1:5000").unwrap(), Some(creds));
        assert!(c.doc.contains_key("psFormat"));
        assert!(c.remove("127.0.0.1:5000"));
        assert!(!c.remove("127.0.0.1:5000"));
        assert!(c.credentials("127.0.0.1:5000").unwrap().is_none());
        let missing = DockerConfig::load(dir.path().join("none.json")).unwrap();
        assert!(missing.credentials("docker.io").unwrap().is_none());
    }
}

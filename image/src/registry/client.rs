//! One registry repository over HTTP: requests with auth retried once after a challenge
//! (Basic from stored credentials, or a Bearer token from the challenge's realm), and the
//! distribution API's endpoints as methods.

use std::io::{self, Read};
use std::sync::Mutex;
use std::time::Duration;

use ureq::http::Response;
use ureq::Body;

use super::auth::{Challenge, Credentials};
use super::{is_loopback, RegistryError, Result, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use crate::digest::Digest;

/// The Accept header for manifests: every type [`super::pull`] handles.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// How to reach a registry.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Plain HTTP even when the registry is not on this machine.
    pub insecure: bool,
    /// Credentials to answer challenges with.
    pub credentials: Option<Credentials>,
    /// How long a connection may take to open.
    pub connect_timeout: Duration,
    /// How long the registry may stay silent: waiting for a response, or for the next bytes
    /// of one (a slow but steady download is never cut).
    pub read_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure: false,
            credentials: None,
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(30),
        }
    }
}

/// A connection to one repository of one registry.
pub struct Client {
    agent: ureq::Agent,
    registry: String,
    base: String,
    repository: String,
    scope: Option<String>,
    creds: Option<Credentials>,
    auth: Mutex<Option<String>>,
    /// Connect and read timeouts, for messages.
    timeouts: (Duration, Duration),
}

/// What a mount request did.
#[derive(Debug)]
pub enum Mount {
    /// The blob is now in the repository.
    Mounted,
    /// The registry opened an upload instead, at this location.
    Upload(String),
}

/// The API host of a registry name (`docker.io` is served from `registry-1.docker.io`).
pub fn api_host(registry: &str) -> &str {
    match registry {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        r => r,
    }
}

impl Client {
    /// A client for `repository` on `registry` (host[:port]), asking tokens for `actions`
    /// (`pull`, `pull,push`) on it. An empty repository asks for no scope (`login`).
    pub fn new(registry: &str, repository: &str, actions: &str, opts: &ClientOptions) -> Self {
        let host = api_host(registry);
        let plain = opts.insecure || is_loopback(host);
        let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::PlatformVerifier).build();
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(opts.connect_timeout))
            .timeout_per_read(Some(opts.read_timeout))
            .timeout_per_write(Some(opts.read_timeout))
            .max_idle_connections_per_host(8)
            .user_agent(concat!("twinbox/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls);
        if is_loopback(host) {
            // A proxy from the environment cannot reach our loopback.
            config = config.proxy(None);
        }
        let agent: ureq::Agent = config.build().into();
        let scheme = if plain { "http" } else { "https" };
        Self {
            agent,
            registry: registry.to_owned(),
            base: format!("{scheme}://{host}"),
            repository: repository.to_owned(),
            scope: (!repository.is_empty()).then(|| format!("repository:{repository}:{actions}")),
            creds: opts.credentials.clone(),
            auth: Mutex::new(None),
            timeouts: (opts.connect_timeout, opts.read_timeout),
        }
    }

    /// The registry (host[:port]) as named in references.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository within the registry.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.repository)
    }

    /// Make an absolute URL of an upload `Location`.
    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_owned()
        } else if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            format!("{}/{location}", self.base)
        }
    }

    fn transport(&self, method: &'static str, url: &str, e: ureq::Error) -> RegistryError {
        let unreachable = match &e {
            ureq::Error::Io(io) => matches!(
                io.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
                    | io::ErrorKind::AddrNotAvailable
            ),
            ureq::Error::ConnectionFailed | ureq::Error::HostNotFound | ureq::Error::Timeout(_) => true,
            _ => false,
        };
        if let ureq::Error::Timeout(t) = &e {
            let (which, after) = match t {
                ureq::Timeout::Connect | ureq::Timeout::Resolve => ("connect", self.timeouts.0),
                _ => ("read", self.timeouts.1),
            };
            return RegistryError::TimedOut { registry: self.registry.clone(), which, after, source: e };
        }
        if unreachable {
            RegistryError::Unreachable { registry: self.registry.clone(), source: e }
        } else {
            RegistryError::Http { method, url: url.to_owned(), source: e }
        }
    }

    /// Run a request, answering one 401 challenge. `f` builds and sends the request with the
    /// given `Authorization` value; it is called again after authenticating, so bodies must be
    /// made inside it. `extra_scope` is added to token requests (cross-repository mounts).
    fn exec<F>(&self, method: &'static str, url: &str, extra_scope: Option<&str>, f: F) -> Result<Response<Body>>
    where
        F: Fn(&ureq::Agent, Option<&str>) -> Result<Response<Body>, ureq::Error>,
    {
        let current = self.auth.lock().expect("auth lock poisoned").clone();
        let resp = f(&self.agent, current.as_deref()).map_err(|e| self.transport(method, url, e))?;
        if resp.status() != 401 {
            return Ok(resp);
        }
        let header = resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let challenge = Challenge::parse(&header).unwrap_or(Challenge { scheme: "basic".into(), params: [].into() });
        let auth = self.authenticate(&challenge, extra_scope)?;
        *self.auth.lock().expect("auth lock poisoned") = Some(auth.clone());
        let resp = f(&self.agent, Some(&auth)).map_err(|e| self.transport(method, url, e))?;
        if resp.status() == 401 {
            return Err(self.unauthorized());
        }
        Ok(resp)
    }

    fn unauthorized(&self) -> RegistryError {
        let hint = match &self.creds {
            None => format!("it needs credentials; run `twinbox login {}`", self.registry),
            Some(c) => format!(
                "wrong user name or password for {:?}; run `twinbox login {}` with the right ones",
                c.username, self.registry
            ),
        };
        RegistryError::Unauthorized { registry: self.registry.clone(), hint }
    }

    /// The `Authorization` value that answers `challenge`.
    fn authenticate(&self, challenge: &Challenge, extra_scope: Option<&str>) -> Result<String> {
        match challenge.scheme.as_str() {
            "basic" => match &self.creds {
                Some(c) => Ok(c.basic_header()),
                None => Err(self.unauthorized()),
            },
            "bearer" => {
                let realm = challenge.params.get("realm").cloned().unwrap_or_default();
                if realm.is_empty() {
                    return Err(RegistryError::Token { realm, reason: "the challenge names no realm" });
                }
                let mut req = self.agent.get(&realm);
                if let Some(s) = challenge.params.get("service") {
                    req = req.query("service", s);
                }
                for s in self.scope.iter().map(String::as_str).chain(extra_scope) {
                    req = req.query("scope", s);
                }
                if let Some(c) = &self.creds {
                    req = req.header("Authorization", c.basic_header());
                }
                let mut resp = req.call().map_err(|e| self.transport("GET", &realm, e))?;
                match resp.status().as_u16() {
                    200 => {}
                    401 | 403 => return Err(self.unauthorized()),
                    _ => return Err(RegistryError::Token { realm, reason: "the token endpoint refused" }),
                }
                let body = resp
                    .body_mut()
                    .with_config()
                    .limit(1 << 20)
                    .read_to_vec()
                    .map_err(|e| RegistryError::Http { method: "GET", url: realm.clone(), source: e })?;
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Token = serde_json::from_slice(&body).map_err(|source| RegistryError::Json {
                    what: "token response",
                    registry: self.registry.clone(),
                    source,
                })?;
                match t.token.or(t.access_token).filter(|t| !t.is_empty()) {
                    Some(t) => Ok(format!("Bearer {t}")),
                    None => Err(RegistryError::Token { realm, reason: "the answer holds no token" }),
                }
            }
            other => Err(RegistryError::AuthScheme { registry: self.registry.clone(), scheme: other.to_owned() }),
        }
    }

    /// An error for a status we did not expect, with the registry's message if it sent one.
    fn status(&self, method: &'static str, url: &str, mut resp: Response<Body>) -> RegistryError {
        let status = resp.status().as_u16();
        let body = resp.body_mut().with_config().limit(64 << 10).read_to_vec().unwrap_or_default();
        let message = registry_message(&body);
        if status == 403 {
            return RegistryError::Denied {
                registry: self.registry.clone(),
                repository: self.repository.clone(),
                message,
            };
        }
        RegistryError::Status { method, url: url.to_owned(), status, message }
    }

    /// `GET /v2/`: whether the registry answers and accepts our credentials.
    pub fn ping(&self) -> Result<()> {
        let url = format!("{}/v2/", self.base);
        let resp = self.exec("GET", &url, None, |a, auth| with_auth(a.get(&url), auth).call())?;
        match resp.status().as_u16() {
            200 => Ok(()),
            _ => Err(self.status("GET", &url, resp)),
        }
    }

    /// Fetch a manifest by tag or digest: its bytes, media type (from `Content-Type`, else the
    /// document's `mediaType`) and the `Docker-Content-Digest` header, if any.
    pub fn get_manifest(&self, reference: &str, display: &str) -> Result<(Vec<u8>, String, Option<String>)> {
        let url = self.url(&format!("manifests/{reference}"));
        let mut resp = self
            .exec("GET", &url, None, |a, auth| with_auth(a.get(&url), auth).header("Accept", MANIFEST_ACCEPT).call())?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Err(RegistryError::ManifestUnknown { reference: display.to_owned() }),
            _ => return Err(self.status("GET", &url, resp)),
        }
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let content_type = header("content-type").map(|c| c.split(';').next().unwrap_or("").trim().to_owned());
        let digest = header("docker-content-digest");
        let mut bytes = Vec::new();
        resp.body_mut().as_reader().take(super::MAX_MANIFEST + 1).read_to_end(&mut bytes).map_err(|source| {
            RegistryError::Read { what: format!("manifest {display}"), registry: self.registry.clone(), source }
        })?;
        if bytes.len() as u64 > super::MAX_MANIFEST {
            return Err(RegistryError::ManifestTooLarge(display.to_owned()));
        }
        let known = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST];
        let media_type = match content_type.filter(|c| known.contains(&c.as_str())) {
            Some(c) => c,
            None => document_media_type(&bytes).unwrap_or_default(),
        };
        Ok((bytes, media_type, digest))
    }

    /// `HEAD` a blob: whether the repository has it.
    pub fn has_blob(&self, digest: &Digest) -> Result<bool> {
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self.exec("HEAD", &url, None, |a, auth| with_auth(a.head(&url), auth).call())?;
        match resp.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(self.status("HEAD", &url, resp)),
        }
    }

    /// `GET` a blob from byte `offset` on. Returns the body and whether the registry honoured
    /// the range (206); a 200 means the whole blob follows.
    pub fn get_blob(&self, digest: &Digest, offset: u64) -> Result<(impl Read + Send + 'static, bool)> {
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self.exec("GET", &url, None, |a, auth| {
            let mut req = with_auth(a.get(&url), auth);
            if offset > 0 {
                req = req.header("Range", format!("bytes={offset}-"));
            }
            req.call()
        })?;
        let partial = match resp.status().as_u16() {
            200 => false,
            206 if offset > 0 => true,
            404 => {
                return Err(RegistryError::BlobUnknown { repository: self.repository.clone(), digest: digest.clone() })
            }
            _ => return Err(self.status("GET", &url, resp)),
        };
        Ok((resp.into_body().into_reader(), partial))
    }

    /// Try to mount `digest` from repository `from` of the same registry.
    pub fn mount(&self, digest: &Digest, from: &str) -> Result<Mount> {
        let url = self.url("blobs/uploads/");
        let extra = format!("repository:{from}:pull");
        let resp = self.exec("POST", &url, Some(&extra), |a, auth| {
            with_auth(a.post(&url), auth).query("mount", digest.to_string()).query("from", from).send_empty()
        })?;
        match resp.status().as_u16() {
            201 => Ok(Mount::Mounted),
            202 => Ok(Mount::Upload(self.location(&resp)?)),
            _ => Err(self.status("POST", &url, resp)),
        }
    }

    /// Open an upload session; returns its location.
    pub fn start_upload(&self) -> Result<String> {
        let url = self.url("blobs/uploads/");
        let resp = self.exec("POST", &url, None, |a, auth| with_auth(a.post(&url), auth).send_empty())?;
        match resp.status().as_u16() {
            202 => self.location(&resp),
            _ => Err(self.status("POST", &url, resp)),
        }
    }

    fn location(&self, resp: &Response<Body>) -> Result<String> {
        resp.headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .filter(|l| !l.is_empty())
            .map(|l| self.absolute(l))
            .ok_or_else(|| RegistryError::Location { registry: self.registry.clone() })
    }

    /// Finish an upload with a `PUT ?digest=`, sending `size` bytes from `body()` (none for a
    /// chunked upload whose chunks are all sent).
    pub fn put_upload<R: Read>(
        &self,
        location: &str,
        digest: &Digest,
        size: u64,
        body: impl Fn() -> Result<R, io::Error>,
    ) -> Result<()> {
        let url = with_query(location, "digest", &digest.to_string().replace(':', "%3A"));
        let resp = self.exec("PUT", &url, None, |a, auth| {
            let mut r = body().map_err(ureq::Error::Io)?;
            with_auth(a.put(&url), auth)
                .header("Content-Type", "application/octet-stream")
                .header("Content-Length", size.to_string())
                .send(ureq::SendBody::from_reader(&mut r))
        })?;
        match resp.status().as_u16() {
            201 | 204 => Ok(()),
            _ => Err(self.status("PUT", &url, resp)),
        }
    }

    /// Send one chunk of a chunked upload (`PATCH` with `Content-Range`); returns the location
    /// for the next request.
    pub fn patch_chunk(&self, location: &str, start: u64, chunk: &[u8]) -> Result<String> {
        let end = start + chunk.len() as u64 - 1;
        let resp = self.exec("PATCH", location, None, |a, auth| {
            with_auth(a.patch(location), auth)
                .header("Content-Type", "application/octet-stream")
                .header("Content-Range", format!("{start}-{end}"))
                .send(chunk)
        })?;
        match resp.status().as_u16() {
            202 => self.location(&resp),
            _ => Err(self.status("PATCH", location, resp)),
        }
    }

    /// `PUT` a manifest under a tag or digest; returns the digest the registry reports.
    pub fn put_manifest(&self, reference: &str, media_type: &str, bytes: &[u8]) -> Result<Option<String>> {
        let url = self.url(&format!("manifests/{reference}"));
        let resp = self.exec("PUT", &url, None, |a, auth| {
            with_auth(a.put(&url), auth).header("Content-Type", media_type).send(bytes)
        })?;
        match resp.status().as_u16() {
            200..=202 => {
                Ok(resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_owned))
            }
            _ => Err(self.status("PUT", &url, resp)),
        }
    }
}

fn with_auth<B>(req: ureq::RequestBuilder<B>, auth: Option<&str>) -> ureq::RequestBuilder<B> {
    match auth {
        Some(a) => req.header("Authorization", a),
        None => req,
    }
}

fn with_query(url: &str, key: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{key}={value}")
}

/// The `mediaType` field of a JSON manifest, if it has one.
pub fn document_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Doc>(bytes).ok()?.media_type
}

/// The messages of a registry error body (`{"errors":[{"code":…,"message":…}]}`).
fn registry_message(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        code: Option<String>,
        message: Option<String>,
    }
    let e: Errors = serde_json::from_slice(body).ok()?;
    let parts: Vec<String> = e
        .errors
        .into_iter()
        .map(|x| match (x.code, x.message) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (c, m) => c.or(m).unwrap_or_default(),
        })
        .filter(|s| !s.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry that accepts the connection and never answers: the read timeout ends the
    /// wait, and the message names it (it used to wait 311 s and say "cannot reach").
    #[test]
    fn a_silent_registry_ends_with_the_read_timeout_named() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let held = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_secs(3));
            drop(conn);
        });
        let opts = ClientOptions { read_timeout: Duration::from_millis(500), ..Default::default() };
        let client = Client::new(&addr.to_string(), "x", "pull", &opts);
        let started = std::time::Instant::now();
        let err = client.ping().unwrap_err();
        assert!(matches!(&err, RegistryError::TimedOut { which: "read", .. }), "{err:?}");
        assert!(err.to_string().contains("the read timeout (500ms) expired"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3), "ended by the timeout, not by the server");
        held.join().unwrap();
    }

    #[test]
    fn urls() {
        let c = Client::new("127.0.0.1:5000", "team/app", "pull", &ClientOptions::default());
        assert_eq!(c.url("manifests/1"), "http://127.0.0.1:5000/v2/team/app/manifests/1");
        assert_eq!(c.absolute("/v2/x/blobs/uploads/u?_state=s"), "http://127.0.0.1:5000/v2/x/blobs/uploads/u?_state=s");
        assert_eq!(with_query("http://h/u?_state=s", "digest", "d"), "http://h/u?_state=s&digest=d");
        let c = Client::new("docker.io", "library/busybox", "pull", &ClientOptions::default());
        assert_eq!(c.url("tags/list"), "https://registry-1.docker.io/v2/library/busybox/tags/list");
        assert_eq!(
            registry_message(br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#).as_deref(),
            Some("MANIFEST_UNKNOWN: manifest unknown")
        );
    }
}

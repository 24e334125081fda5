//! A client of the OCI distribution API (registry v2): `pull`, `push`, `login`.
//!
//! ```text
//! Reference ─► Client (one registry + repository; Basic or Bearer auth from the challenge)
//!   pull: GET manifest ─► verify digest ─► [index: pick platform, GET child] ─► blobs (HEAD-skip,
//!         parallel, Range-resumed) through Store::blob_writer ─► manifest blob ─► set_tag
//!   push: per blob HEAD ─► mount from a sibling repository ─► POST + PUT (or PATCH chunks)
//!         ─► PUT manifest (the stored bytes, with their media type)
//! ```
//!
//! Every blob and manifest goes through the store's verifying writer, so a wrong byte from the
//! registry is an error and nothing is stored under its digest. Tags are set only once every
//! blob an image needs is present. Plain HTTP is used only for loopback registries or when the
//! caller asks for it (`insecure`); HTTPS uses rustls with the system's roots.
//!
//! The HTTP client is `ureq` (blocking, rustls) rather than `oci-client` (async, tokio +
//! reqwest): the store's API is blocking (`BlobWriter` is `io::Write`, the writer guard is an
//! flock), and owning the requests keeps Range resume, chunked uploads, cross-repository mounts
//! and per-blob progress simple.

pub mod auth;
pub mod client;
mod pool;
pub mod pull;
pub mod push;

use std::io;
use std::path::PathBuf;

use twinbox_exit::ExitCode;

use crate::digest::{Digest, DigestError};
use crate::reference::ReferenceError;
use crate::store::StoreError;

pub use auth::{Credentials, DockerConfig};
pub use client::{Client, ClientOptions};
pub use pull::{pull, PullOptions, PullReport};
pub use push::{push, PushOptions, PushReport};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub use crate::store::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST};

/// The largest manifest or index we accept (the distribution spec's suggested limit).
pub const MAX_MANIFEST: u64 = 4 << 20;

/// Errors from talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Connection refused, host not found, timeout: nothing answered.
    #[error("cannot reach registry {registry}; is it running and is the address right?")]
    Unreachable {
        /// host[:port].
        registry: String,
        /// The transport's error.
        #[source]
        source: ureq::Error,
    },
    /// The registry did not answer in time.
    #[error(
        "registry {registry} did not answer: the {which} timeout ({after:?}) expired; is the address right, and \
         the registry up and not overloaded?"
    )]
    TimedOut {
        /// host[:port].
        registry: String,
        /// "connect" or "read".
        which: &'static str,
        /// The timeout that expired.
        after: std::time::Duration,
        /// The transport's error.
        #[source]
        source: ureq::Error,
    },
    /// The HTTP exchange failed after the connection was made.
    #[error("{method} {url}")]
    Http {
        /// The request method.
        method: &'static str,
        /// The request URL.
        url: String,
        /// The transport's error.
        #[source]
        source: ureq::Error,
    },
    /// Reading a response body failed midway.
    #[error("reading {what} from {registry}")]
    Read {
        /// What was being read.
        what: String,
        /// host[:port].
        registry: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// 401 after trying the credentials we have (or with none).
    #[error("authentication to {registry} failed: {hint}")]
    Unauthorized {
        /// host[:port].
        registry: String,
        /// What to do about it.
        hint: String,
    },
    /// 403: the credentials are fine but do not allow this.
    #[error("access to {repository} on {registry} denied{}", fmt_msg(.message))]
    Denied {
        /// host[:port].
        registry: String,
        /// The repository.
        repository: String,
        /// The registry's message.
        message: Option<String>,
    },
    /// 404 on a manifest.
    #[error("no such image in the registry: {reference}")]
    ManifestUnknown {
        /// What was asked for.
        reference: String,
    },
    /// 404 on a blob a manifest names.
    #[error("the registry has no blob {digest} in {repository}, although a manifest names it")]
    BlobUnknown {
        /// The repository.
        repository: String,
        /// The blob.
        digest: Digest,
    },
    /// Any other status we did not expect.
    #[error("{method} {url}: the registry answered {status}{}", fmt_msg(.message))]
    Status {
        /// The request method.
        method: &'static str,
        /// The request URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The registry's error message, if it sent one.
        message: Option<String>,
    },
    /// A manifest of a media type we do not handle (schema 1, artifacts…).
    #[error("unsupported manifest media type {0:?}: twinbox handles OCI manifests and indexes and Docker schema 2 manifests and lists")]
    MediaType(String),
    /// What the registry sent does not hash to the digest it should have.
    #[error("{what} from the registry hashes to {actual}, expected {expected}; nothing was stored")]
    DigestMismatch {
        /// Which manifest or blob.
        what: String,
        /// The digest it should have.
        expected: Digest,
        /// The digest it has.
        actual: Digest,
    },
    /// A blob of another size than its descriptor says.
    #[error("blob {digest} from the registry is {actual} bytes, its descriptor says {expected}; nothing was stored")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// Size in the descriptor.
        expected: u64,
        /// Bytes received.
        actual: u64,
    },
    /// A manifest larger than [`MAX_MANIFEST`].
    #[error("manifest {0} is larger than 4 MiB")]
    ManifestTooLarge(String),
    /// A JSON document from the registry (manifest, token) is invalid.
    #[error("invalid {what} from {registry}")]
    Json {
        /// What it was.
        what: &'static str,
        /// host[:port].
        registry: String,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A digest in a manifest or header did not parse.
    #[error("bad digest from the registry")]
    Digest(#[from] DigestError),
    /// An index had no manifest for the platform.
    #[error("{reference} has no manifest for platform {platform}; available: {available}")]
    NoPlatform {
        /// The image.
        reference: String,
        /// What was asked for.
        platform: String,
        /// What the index offers.
        available: String,
    },
    /// A challenge of a scheme we do not speak.
    #[error("registry {registry} asks for {scheme} authentication, which twinbox does not support")]
    AuthScheme {
        /// host[:port].
        registry: String,
        /// The scheme.
        scheme: String,
    },
    /// The token endpoint refused or answered nonsense.
    #[error("getting a token from {realm}: {reason}")]
    Token {
        /// The realm URL.
        realm: String,
        /// What went wrong.
        reason: &'static str,
    },
    /// The Location header of an upload is missing or unusable.
    #[error("registry {registry} answered an upload without a usable Location header")]
    Location {
        /// host[:port].
        registry: String,
    },
    /// Reading or writing the Docker config file.
    #[error("{op} {path}")]
    Config {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The Docker config file is not valid JSON of the expected shape.
    #[error("{path} is not a valid Docker config file")]
    ConfigJson {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A credential entry that is not base64 of `user:password`.
    #[error("the credentials for {0} in the Docker config file are not base64 of user:password")]
    ConfigAuth(String),
    /// A reference that cannot be pushed or pulled as given.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// The store refused something.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn fmt_msg(m: &Option<String>) -> String {
    m.as_deref().map(|m| format!(": {m}")).unwrap_or_default()
}

impl ExitCode for RegistryError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        match self {
            // A registry that is not there, refuses the user or serves nonsense: the user's to
            // fix (the address, the credentials, the image name), not twinbox's.
            Self::Unreachable { .. }
            | Self::TimedOut { .. }
            | Self::Http { .. }
            | Self::Unauthorized { .. }
            | Self::Denied { .. }
            | Self::ManifestUnknown { .. }
            | Self::BlobUnknown { .. }
            | Self::Status { .. }
            | Self::MediaType(_)
            | Self::DigestMismatch { .. }
            | Self::SizeMismatch { .. }
            | Self::ManifestTooLarge(_)
            | Self::Json { .. }
            | Self::NoPlatform { .. }
            | Self::AuthScheme { .. }
            | Self::Token { .. }
            | Self::ConfigJson { .. }
            | Self::ConfigAuth(_) => USER_ERROR,
            Self::Read { .. } | Self::Location { .. } | Self::Config { .. } => INTERNAL,
            Self::Digest(e) => e.exit_code(),
            Self::Reference(e) => e.exit_code(),
            Self::Store(e) => e.exit_code(),
        }
    }
}

/// Result alias for this module.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// What happened to one blob, for progress display.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// A blob transfer is starting.
    Start {
        /// The blob.
        digest: &'a Digest,
        /// Its size in bytes.
        size: u64,
    },
    /// Bytes moved so far (total for this blob).
    Progress {
        /// The blob.
        digest: &'a Digest,
        /// Bytes moved so far.
        done: u64,
    },
    /// The blob is done.
    Done {
        /// The blob.
        digest: &'a Digest,
        /// How.
        how: Outcome,
    },
    /// A download broke off and is resumed from `offset`.
    Resume {
        /// The blob.
        digest: &'a Digest,
        /// Bytes already received.
        offset: u64,
    },
}

/// How a blob got where it needed to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Already there (in the store, or in the registry).
    Exists,
    /// Mounted from another repository of the same registry.
    Mounted,
    /// Transferred.
    Transferred,
}

/// A progress callback; called from several threads.
pub type Progress<'a> = &'a (dyn Fn(Event<'_>) + Sync);

/// A progress callback that ignores everything.
pub fn no_progress(_: Event<'_>) {}

/// Check `credentials` against `registry` (`GET /v2/`, answering its challenge with them).
pub fn login(registry: &str, credentials: Credentials, insecure: bool) -> Result<()> {
    let opts = ClientOptions { insecure, credentials: Some(credentials), ..Default::default() };
    Client::new(registry, "", "", &opts).ping()
}

/// Whether `host` (host[:port]) is this machine: plain HTTP is allowed there.
pub fn is_loopback(registry: &str) -> bool {
    if registry.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
        return true;
    }
    let host = match registry.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.is_empty() => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback() {
        for yes in ["localhost", "localhost:5000", "127.0.0.1:5000", "127.0.0.1", "[::1]:5000", "::1"] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in ["docker.io", "10.0.0.1:5000", "ghcr.io", "localhost.example.com"] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn exit_codes() {
        assert_eq!(RegistryError::ManifestUnknown { reference: "r/a:1".into() }.exit_code(), 1);
        assert_eq!(RegistryError::Location { registry: "r".into() }.exit_code(), 125);
        assert_eq!(RegistryError::Store(StoreError::NoSuchImage("r/a:1".into())).exit_code(), 1);
        assert_eq!(RegistryError::Store(StoreError::MissingBlob(Digest::of(b"x"))).exit_code(), 125);
        assert_eq!(RegistryError::Reference(ReferenceError::Empty).exit_code(), 1);
    }
}

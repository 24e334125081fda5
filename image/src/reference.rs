//! Image references parsed the way Docker parses them: `name`, `name:tag`,
//! `registry:port/ns/name:tag`, `name@sha256:…`, `name:tag@sha256:…`.
//!
//! References are kept in their familiar form: `docker.io/library/busybox` is `busybox`,
//! `docker.io/team/app` is `team/app`. A reference with neither tag nor digest gets `latest`.

use std::fmt;
use std::str::FromStr;

use twinbox_exit::ExitCode;

use crate::digest::{Digest, DigestError};

/// The registry a reference without a domain belongs to.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag a reference without a tag or digest gets.
pub const DEFAULT_TAG: &str = "latest";

/// Why a reference was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// Empty input.
    #[error("empty image reference")]
    Empty,
    /// Upper case, spaces, doubled separators and the like in the repository name.
    #[error(
        "invalid repository name {0:?}: use lowercase letters, digits and . _ - separators, components joined by /"
    )]
    Name(String),
    /// Tag longer than 128 characters or with characters outside `[A-Za-z0-9_.-]`.
    #[error("invalid tag {0:?}: use up to 128 characters from A-Z a-z 0-9 _ . - not starting with . or -")]
    Tag(String),
    /// The digest part did not parse.
    #[error("invalid digest in reference {reference:?}")]
    Digest {
        /// The whole reference.
        reference: String,
        /// Why the digest was refused.
        #[source]
        source: DigestError,
    },
    /// A domain that is not a host name with an optional port.
    #[error("invalid registry {0:?}: expected host[:port]")]
    Domain(String),
    /// Longer than Docker's limit of 255 characters for the name.
    #[error("repository name {0:?} is longer than 255 characters")]
    TooLong(String),
}

impl ExitCode for ReferenceError {
    fn exit_code(&self) -> i32 {
        match self {
            ReferenceError::Empty
            | ReferenceError::Name(_)
            | ReferenceError::Tag(_)
            | ReferenceError::Domain(_)
            | ReferenceError::TooLong(_) => twinbox_exit::USER_ERROR,
            ReferenceError::Digest { source, .. } => source.exit_code(),
        }
    }
}

/// A parsed image reference.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    domain: Option<String>,
    path: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parse like Docker does (see the module docs).
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        s.parse()
    }

    /// The registry host[:port], `docker.io` when none was given.
    pub fn registry(&self) -> &str {
        self.domain.as_deref().unwrap_or(DEFAULT_REGISTRY)
    }

    /// The registry given in the reference, if any.
    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    /// The repository path within the registry (`library/busybox` for `busybox`).
    pub fn repository(&self) -> String {
        if self.domain.is_none() && !self.path.contains('/') {
            format!("library/{}", self.path)
        } else {
            self.path.clone()
        }
    }

    /// The familiar name without tag or digest (`busybox`, `localhost:5000/team/app`).
    pub fn name(&self) -> String {
        match &self.domain {
            Some(d) => format!("{d}/{}", self.path),
            None => self.path.clone(),
        }
    }

    /// The tag; `latest` when the reference has neither tag nor digest.
    pub fn tag(&self) -> Option<&str> {
        match (&self.tag, &self.digest) {
            (Some(t), _) => Some(t),
            (None, None) => Some(DEFAULT_TAG),
            (None, Some(_)) => None,
        }
    }

    /// The pinned digest, if any.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The same repository with another tag (and no digest).
    pub fn with_tag(&self, tag: &str) -> Result<Self, ReferenceError> {
        check_tag(tag)?;
        Ok(Self { tag: Some(tag.to_owned()), digest: None, ..self.clone() })
    }

    /// The same repository pinned to a digest (tag dropped).
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self { tag: None, digest: Some(digest), ..self.clone() }
    }
}

fn check_tag(tag: &str) -> Result<(), ReferenceError> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .enumerate()
            .all(|(i, b)| b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && (b == b'.' || b == b'-')));
    if ok {
        Ok(())
    } else {
        Err(ReferenceError::Tag(tag.to_owned()))
    }
}

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn valid_domain(d: &str) -> bool {
    let (host, port) = match d.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    let host_ok = if host.starts_with('[') && host.ends_with(']') {
        host[1..host.len() - 1].parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.split('.').all(|l| {
                !l.is_empty()
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let digest = d.parse().map_err(|source| ReferenceError::Digest { reference: s.to_owned(), source })?;
                (r, Some(digest))
            }
            None => (s, None),
        };
        // A tag is a ':' after the last '/', so that a port is not taken for a tag.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            check_tag(t)?;
        }
        let (mut domain, mut path) = match name.split_once('/') {
            Some((first, rest)) if looks_like_domain(first) => {
                if !valid_domain(first) {
                    return Err(ReferenceError::Domain(first.to_owned()));
                }
                (Some(first.to_owned()), rest.to_owned())
            }
            _ => (None, name.to_owned()),
        };
        if path.is_empty() || !path.split('/').all(valid_component) {
            return Err(ReferenceError::Name(name.to_owned()));
        }
        // Keep the familiar form: docker.io/library/x is x, unless the path would then read
        // as a reference to another registry (docker.io/ghcr.io/x is not ghcr.io/x).
        if matches!(domain.as_deref(), Some("docker.io" | "index.docker.io")) {
            if path.split_once('/').is_some_and(|(first, _)| looks_like_domain(first)) {
                domain = Some(DEFAULT_REGISTRY.to_owned());
            } else {
                domain = None;
                if let Some(p) = path.strip_prefix("library/") {
                    if !p.contains('/') {
                        path = p.to_owned();
                    }
                }
            }
        }
        if name.len() > 255 {
            return Err(ReferenceError::TooLong(name.to_owned()));
        }
        Ok(Self { domain, path, tag: tag.map(str::to_owned), digest })
    }
}

/// Whether the first component of a name is a registry (as Docker decides): it has a dot or a
/// port, is `localhost`, or has capitals (which a repository path may not).
fn looks_like_domain(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost" || first.bytes().any(|b| b.is_ascii_uppercase())
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())?;
        if let Some(t) = self.tag() {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_forms() {
        let r = p("busybox");
        assert_eq!((r.registry(), r.repository().as_str(), r.tag()), ("docker.io", "library/busybox", Some("latest")));
        assert_eq!(r.to_string(), "busybox:latest");
        let r = p("docker.io/library/busybox:1.36");
        assert_eq!(r.to_string(), "busybox:1.36");
        let r = p("localhost:5000/team/hello:1");
        assert_eq!((r.registry(), r.repository().as_str(), r.tag()), ("localhost:5000", "team/hello", Some("1")));
        let r = p("localhost/hello");
        assert_eq!(r.registry(), "localhost");
        let r = p("ghcr.io/a/b/c");
        assert_eq!(r.name(), "ghcr.io/a/b/c");
        let r = p("team/app:v1.2-rc_3");
        assert_eq!(r.repository(), "team/app");
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let r = p(&format!("hello@{d}"));
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().to_string(), d);
        assert_eq!(r.to_string(), format!("hello@{d}"));
        let r = p(&format!("hello:1@{d}"));
        assert_eq!(r.to_string(), format!("hello:1@{d}"));
        let r = p("127.0.0.1:5000/x:y");
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(p("a__b-c---d/e.f_g").name(), "a__b-c---d/e.f_g");
        // Found by the reference fuzz target: Docker Hub's repository `ler.io/x` keeps its
        // registry, or it would print as (and mean) the registry ler.io's `x`.
        let r = p("docker.io/ler.io/x");
        assert_eq!((r.registry(), r.repository().as_str()), ("docker.io", "ler.io/x"));
        assert_eq!(r.to_string(), "docker.io/ler.io/x:latest");
        assert_eq!(p(&r.to_string()).to_string(), r.to_string());
    }

    #[test]
    fn refuses_bad_forms() {
        for bad in [
            "",
            "Hello",
            "hello:",
            ":tag",
            "hello:-x",
            "hello@sha256:xyz",
            "hello@md5:00",
            "a//b",
            "a/",
            "/a",
            "hello world",
            "a..b",
            "a___b",
            "-a",
            "a-",
            "host:port/x",
            "hello:t/x",
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad:?} should be refused");
        }
        assert!(matches!("x:".parse::<Reference>(), Err(ReferenceError::Tag(_))));
        let long = "a".repeat(129);
        assert!(format!("x:{long}").parse::<Reference>().is_err());
    }
}

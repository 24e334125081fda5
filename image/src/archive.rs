//! Image archives: `twinbox save` writes an OCI archive (a tar of an OCI image layout, as
//! `skopeo copy … oci-archive:` makes); `twinbox load` reads OCI archives and docker archives
//! (`docker save`, legacy `<id>/layer.tar` layout and the Docker 25+ layout), plain or gzipped.
//!
//! Loading is one streaming pass: every blob goes through the store's verified, atomic blob
//! writer as it is read, and the names are added to `index.json` only at the end, once every
//! blob an image needs is present. A load killed midway leaves only unnamed blobs (each
//! complete and correct) and temp files, which `twinbox prune` removes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use serde::Deserialize;
use twinbox_exit::ExitCode;

use crate::digest::{Digest, HashingReader};
use crate::reference::{Reference, ReferenceError};
use crate::store::{canonical_json, Store, StoreError, REF_NAME};
use crate::unpack::Compression;

/// Annotation containerd and Docker 25+ put the full image name in.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The largest JSON document (index.json, manifest.json) an archive may hold.
const MAX_JSON: u64 = 64 << 20;

/// Errors from saving or loading archives.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading or writing the archive stream failed.
    #[error("{op} archive")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The store refused something.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Neither an OCI archive (oci-layout + index.json) nor a docker archive (manifest.json).
    #[error("not an image archive: it has neither index.json nor manifest.json; expected an OCI archive or `docker save` output")]
    NotAnArchive,
    /// A JSON document in the archive is invalid.
    #[error("invalid {0} in archive")]
    Json(&'static str, #[source] serde_json::Error),
    /// The archive names a file or blob that it does not contain.
    #[error("archive is incomplete: {0} is referenced but missing")]
    Missing(String),
    /// A name in the archive is not a valid reference.
    #[error("archive names an image {name:?} that is not a valid reference")]
    Name {
        /// The name.
        name: String,
        /// Why.
        #[source]
        source: ReferenceError,
    },
    /// A JSON document is larger than we are willing to hold in memory.
    #[error("{0} in archive is larger than 64 MiB")]
    TooLarge(String),
    /// A descriptor in the archive gives a size its blob does not have.
    #[error("archive describes {digest} as {claimed} bytes, but it is {actual}; the archive is damaged or forged")]
    SizeMismatch { digest: String, claimed: u64, actual: u64 },
    /// An image in the archive whose manifest or config is not valid; nothing was tagged.
    #[error("image {name} in the archive cannot be loaded; nothing was tagged")]
    BadImage {
        /// The name it would have had.
        name: String,
        /// What is wrong with it.
        #[source]
        source: StoreError,
    },
}

impl ExitCode for ArchiveError {
    fn exit_code(&self) -> i32 {
        match self {
            // The archive is the user's file: unreadable, truncated or not an archive at all.
            ArchiveError::Io { .. }
            | ArchiveError::NotAnArchive
            | ArchiveError::Json(..)
            | ArchiveError::Missing(_)
            | ArchiveError::TooLarge(_)
            | ArchiveError::BadImage { .. }
            | ArchiveError::SizeMismatch { .. } => twinbox_exit::USER_ERROR,
            ArchiveError::Name { source, .. } => source.exit_code(),
            ArchiveError::Store(e) => e.exit_code(),
        }
    }
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> ArchiveError {
    move |source| ArchiveError::Io { op, source }
}

/// Write the images named by `refs` to `out` as an OCI archive.
pub fn save(store: &Store, refs: &[String], out: impl Write) -> Result<(), ArchiveError> {
    let mut entries: Vec<Descriptor> = Vec::new();
    let mut blobs: BTreeSet<Digest> = BTreeSet::new();
    for r in refs {
        let img = store.resolve(r)?;
        let mut desc =
            Descriptor::new(img.descriptor.media_type().clone(), img.descriptor.size(), &img.manifest_digest);
        if let Some(name) = &img.reference {
            if name.tag().is_some() {
                desc.set_annotations(Some([(REF_NAME.to_owned(), name.to_string())].into()));
            }
        }
        entries.push(desc);
        blobs.insert(img.manifest_digest.clone());
        blobs.insert(img.config_digest.clone());
        blobs.extend(img.layer_digests()?);
    }
    let index = oci_spec::image::ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(entries)
        .build()
        .expect("an index with manifests has all required fields");
    let mut tar = tar::Builder::new(out);
    let put_bytes = |tar: &mut tar::Builder<_>, path: &str, bytes: &[u8]| {
        let mut h = file_header(bytes.len() as u64);
        tar.append_data(&mut h, path, bytes).map_err(io_err("write"))
    };
    put_bytes(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    put_bytes(&mut tar, "index.json", &canonical_json(&index))?;
    let mut dir = tar::Header::new_ustar();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_mtime(0);
    for d in ["blobs/", "blobs/sha256/"] {
        tar.append_data(&mut dir.clone(), d, io::empty()).map_err(io_err("write"))?;
    }
    for d in &blobs {
        let path = store.blob_path(d);
        let size = std::fs::metadata(&path).map_err(|_| StoreError::MissingBlob(d.clone()))?.len();
        let mut h = file_header(size);
        // The blob is verified as it is copied: a corrupt store fails the save.
        tar.append_data(&mut h, format!("blobs/sha256/{}", d.hex()), store.open_blob(d)?).map_err(io_err("write"))?;
    }
    tar.into_inner().map_err(io_err("finish"))?.flush().map_err(io_err("flush"))?;
    Ok(())
}

/// Write an OCI archive of `refs` to `path`. A regular file (or a new one) is replaced
/// atomically: written beside it, synced, renamed over it, so it is never half written. Anything
/// else that exists there (a device such as /dev/stdout, a FIFO, a symlink to one of those) is
/// written into as it is, never replaced.
pub fn save_to_path(store: &Store, refs: &[String], path: &Path) -> Result<(), ArchiveError> {
    let regular_or_new = match std::fs::metadata(path) {
        Ok(m) => m.is_file(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => return Err(ArchiveError::Io { op: "inspect", source: e }),
    };
    if !regular_or_new {
        let f = std::fs::OpenOptions::new().write(true).truncate(true).open(path).map_err(io_err("open"))?;
        let mut w = io::BufWriter::with_capacity(1 << 20, f);
        save(store, refs, &mut w)?;
        return w.flush().map_err(io_err("write"));
    }
    // Through a symlink, the file it names is replaced (beside it), not the link.
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let path = real.as_path();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new().prefix(".twinbox-save-").tempfile_in(dir).map_err(io_err("create"))?;
    let mut w = io::BufWriter::with_capacity(1 << 20, tmp);
    save(store, refs, &mut w)?;
    let tmp = w.into_inner().map_err(|e| ArchiveError::Io { op: "write", source: e.into_error() })?;
    tmp.as_file().sync_all().map_err(io_err("sync"))?;
    tmp.persist(path).map_err(|e| ArchiveError::Io { op: "rename", source: e.error })?;
    Ok(())
}

fn file_header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(size);
    h.set_mtime(0);
    h
}

/// Docker's `manifest.json` entry.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// What `load` found and stored.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Names given to loaded images.
    pub tagged: Vec<Reference>,
    /// Manifest digests of images that came without a name.
    pub untagged: Vec<Digest>,
    /// Blobs written.
    pub blobs: usize,
}

/// Read an OCI archive or a docker archive (optionally gzip- or zstd-compressed) into the store.
pub fn load(store: &Store, input: impl Read) -> Result<LoadReport, ArchiveError> {
    let _guard = store.writer_guard()?;
    let mut buffered = BufReader::with_capacity(1 << 20, input);
    let head = buffered.fill_buf().map_err(io_err("read"))?;
    let compression = Compression::detect(head);
    let stream = crate::unpack::decompress(buffered, compression)
        .map_err(|e| ArchiveError::Io { op: "decompress", source: io::Error::new(io::ErrorKind::InvalidData, e) })?;
    let mut archive = tar::Archive::new(stream);
    let mut index_json: Option<Vec<u8>> = None;
    let mut manifest_json: Option<Vec<u8>> = None;
    // Docker archive paths (`<id>/layer.tar`, `<hex>.json`) → the blob they were stored as.
    let mut files: BTreeMap<String, (Digest, u64)> = BTreeMap::new();
    let mut links: BTreeMap<String, String> = BTreeMap::new();
    let mut report = LoadReport::default();
    for entry in archive.entries().map_err(io_err("read"))? {
        let mut entry = entry.map_err(io_err("read"))?;
        let path = entry.path().map_err(io_err("read"))?.to_string_lossy().trim_start_matches("./").to_owned();
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            if let Ok(Some(target)) = entry.link_name() {
                let target = target.to_string_lossy().into_owned();
                let base = Path::new(&path).parent().unwrap_or(Path::new(""));
                let resolved = if kind.is_symlink() { normalize(&base.join(&target)) } else { target };
                links.insert(path, resolved);
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        match path.as_str() {
            "index.json" => index_json = Some(read_small(&mut entry, &path)?),
            "manifest.json" => manifest_json = Some(read_small(&mut entry, &path)?),
            "oci-layout" | "repositories" => {}
            p => {
                let expected = p.strip_prefix("blobs/sha256/").and_then(|h| Digest::from_hex(h).ok());
                let stored = if expected.as_ref().is_some_and(|d| store.has_blob(d)) {
                    // Already present: still hash what we skip, so a corrupt archive is noticed.
                    let mut h = HashingReader::new(&mut entry);
                    io::copy(&mut h, &mut io::sink()).map_err(io_err("read"))?;
                    let (d, n) = h.finish();
                    if Some(&d) != expected.as_ref() {
                        return Err(StoreError::DigestMismatch {
                            what: format!("archive entry {p}"),
                            expected: expected.expect("checked above"),
                            actual: d,
                        }
                        .into());
                    }
                    (d, n)
                } else {
                    report.blobs += 1;
                    store.put_blob_from(&mut entry, expected.as_ref())?
                };
                files.insert(p.to_owned(), stored);
            }
        }
    }
    let lookup = |p: &str| -> Result<(Digest, u64), ArchiveError> {
        let p = p.trim_start_matches("./");
        let p = links.get(p).map(String::as_str).unwrap_or(p);
        files.get(p).cloned().ok_or_else(|| ArchiveError::Missing(p.to_owned()))
    };
    if let Some(bytes) = index_json {
        let index: ImageIndex = serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Json("index.json", e))?;
        let mut named = Vec::new();
        for desc in index.manifests() {
            let digest = Digest::try_from(desc.digest()).map_err(StoreError::from)?;
            check_complete(store, desc)?;
            let ann = desc.annotations().clone().unwrap_or_default();
            let name =
                ann.get(CONTAINERD_NAME).or_else(|| ann.get(REF_NAME)).filter(|n| n.contains(':') || n.contains('/'));
            match name {
                Some(n) => {
                    let r: Reference = n.parse().map_err(|source| ArchiveError::Name { name: n.clone(), source })?;
                    let mut clean = Descriptor::new(desc.media_type().clone(), desc.size(), &digest);
                    clean.set_platform(desc.platform().clone());
                    named.push((r, clean));
                }
                None => report.untagged.push(digest),
            }
        }
        check_images(store, &named)?;
        for (r, d) in named {
            store.set_tag(&r, &d)?;
            report.tagged.push(r);
        }
        return Ok(report);
    }
    let Some(bytes) = manifest_json else { return Err(ArchiveError::NotAnArchive) };
    let entries: Vec<DockerEntry> =
        serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Json("manifest.json", e))?;
    let mut named = Vec::new();
    for e in entries {
        let (cd, cs) = lookup(&e.config)?;
        let mut layers = Vec::new();
        for l in &e.layers {
            let (ld, ls) = lookup(l)?;
            let mut head = [0u8; 4];
            let n = store.open_blob(&ld)?.read(&mut head).map_err(io_err("read"))?;
            let mt = match Compression::detect(&head[..n]) {
                Compression::Gzip => MediaType::ImageLayerGzip,
                Compression::Zstd => MediaType::ImageLayerZstd,
                Compression::None => MediaType::ImageLayer,
            };
            layers.push(Descriptor::new(mt, ls, &ld));
        }
        let desc = store.put_manifest(Descriptor::new(MediaType::ImageConfig, cs, &cd), layers)?;
        let manifest_digest = Digest::try_from(desc.digest()).map_err(StoreError::from)?;
        let tags = e.repo_tags.unwrap_or_default();
        if tags.is_empty() {
            report.untagged.push(manifest_digest);
        }
        for t in tags {
            let r: Reference = t.parse().map_err(|source| ArchiveError::Name { name: t.clone(), source })?;
            named.push((r, desc.clone()));
        }
    }
    check_images(store, &named)?;
    for (r, d) in named {
        store.set_tag(&r, &d)?;
        report.tagged.push(r);
    }
    Ok(report)
}

/// Every image about to be tagged must be usable: its manifests (each platform's, for an index)
/// and configs parse as what they claim to be. One that does not would fail every command
/// that lists the store.
fn check_images(store: &Store, named: &[(Reference, Descriptor)]) -> Result<(), ArchiveError> {
    fn check(store: &Store, desc: &Descriptor) -> Result<(), StoreError> {
        let digest = Digest::try_from(desc.digest())?;
        let is_index = matches!(desc.media_type(), MediaType::ImageIndex)
            || matches!(desc.media_type(), MediaType::Other(s) if s == crate::store::DOCKER_MANIFEST_LIST);
        if is_index {
            let index: ImageIndex = store.read_json(&digest, "image index")?;
            return index.manifests().iter().try_for_each(|child| check(store, child));
        }
        store.image_from_descriptor(desc.clone(), None, None).map(drop)
    }
    for (r, d) in named {
        check(store, d).map_err(|source| ArchiveError::BadImage { name: r.to_string(), source })?;
    }
    Ok(())
}

/// Every blob an index entry needs must be in the store before it is named.
fn check_complete(store: &Store, desc: &Descriptor) -> Result<(), ArchiveError> {
    let d = Digest::try_from(desc.digest()).map_err(StoreError::from)?;
    check_blob(store, desc, &d)?;
    let is_index = match desc.media_type() {
        MediaType::ImageIndex => true,
        MediaType::Other(s) => s == crate::store::DOCKER_MANIFEST_LIST,
        _ => false,
    };
    match is_index {
        true => {
            let index: ImageIndex = store.read_json(&d, "image index")?;
            for m in index.manifests() {
                check_complete(store, m)?;
            }
        }
        false => {
            let m: ImageManifest = store.read_json(&d, "image manifest")?;
            for b in std::iter::once(m.config()).chain(m.layers()) {
                let bd = Digest::try_from(b.digest()).map_err(StoreError::from)?;
                check_blob(store, b, &bd)?;
            }
        }
    }
    Ok(())
}

/// The blob a descriptor names is there and has the size the descriptor says, as its digest
/// already had to match: a wrong size would be stored, shown and saved again.
fn check_blob(store: &Store, desc: &Descriptor, d: &Digest) -> Result<(), ArchiveError> {
    let actual = match std::fs::metadata(store.blob_path(d)) {
        Ok(m) => m.len(),
        Err(_) => return Err(ArchiveError::Missing(d.to_string())),
    };
    if desc.size() != actual {
        return Err(ArchiveError::SizeMismatch { digest: d.to_string(), claimed: desc.size(), actual });
    }
    Ok(())
}

fn read_small(r: &mut impl Read, name: &str) -> Result<Vec<u8>, ArchiveError> {
    let mut buf = Vec::new();
    r.take(MAX_JSON + 1).read_to_end(&mut buf).map_err(io_err("read"))?;
    if buf.len() as u64 > MAX_JSON {
        return Err(ArchiveError::TooLarge(name.to_owned()));
    }
    Ok(buf)
}

/// Lexically normalise an archive-internal path (`a/../b/./c` → `b/c`).
fn normalize(p: &Path) -> String {
    let mut out: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(s) => out.push(s.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    out.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(ArchiveError::NotAnArchive.exit_code(), 1);
        assert_eq!(ArchiveError::Store(StoreError::NoSuchImage("x:1".into())).exit_code(), 1);
        let missing = StoreError::MissingBlob(crate::Digest::of(b"x"));
        assert_eq!(ArchiveError::Store(missing).exit_code(), 125);
        let name = ArchiveError::Name { name: "Bad".into(), source: ReferenceError::Name("Bad".into()) };
        assert_eq!(name.exit_code(), 1);
    }
}

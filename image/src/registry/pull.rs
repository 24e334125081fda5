//! `pull`: manifest (an index resolved to one platform), then the config and layers the store
//! lacks, in parallel, each through the store's verifying writer; the tag comes last.

use std::collections::{BTreeSet, VecDeque};
use std::io::{self, Read, Write};
use std::time::Duration;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};

use super::client::{Client, ClientOptions};
use super::{
    Event, Outcome, Progress, RegistryError, Result, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST,
};
use crate::digest::Digest;
use crate::reference::Reference;
use crate::store::{Store, StoreError};

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// `os/arch[/variant]` to pick from an index; the host's when `None`.
    pub platform: Option<String>,
    /// How to reach the registry.
    pub client: ClientOptions,
    /// Blobs downloaded at once.
    pub parallel: usize,
    /// How many times a broken-off download is resumed (with `Range`) before giving up.
    pub retries: u32,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self { platform: None, client: ClientOptions::default(), parallel: 3, retries: 3 }
    }
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullReport {
    /// The name the image was stored under.
    pub reference: Reference,
    /// The digest the registry serves the reference as (an index's, for multi-platform images).
    pub digest: Digest,
    /// The image manifest stored and tagged (the platform's, for an index).
    pub manifest: Digest,
    /// Blobs downloaded.
    pub downloaded: usize,
    /// Bytes downloaded.
    pub bytes: u64,
    /// Whether everything was already in the store.
    pub up_to_date: bool,
}

/// Pull `reference` into `store` and tag it there under the same name.
pub fn pull(store: &Store, reference: &Reference, opts: &PullOptions, progress: Progress) -> Result<PullReport> {
    let _guard = store.writer_guard()?;
    let client = Client::new(reference.registry(), &reference.repository(), "pull", &opts.client);
    let display = reference.to_string();
    let top = match (reference.digest(), reference.tag()) {
        (Some(d), _) => d.to_string(),
        (None, Some(t)) => t.to_owned(),
        (None, None) => crate::reference::DEFAULT_TAG.to_owned(),
    };
    let (bytes, media_type, header) = client.get_manifest(&top, &display)?;
    let top_digest = verify_manifest(&bytes, reference.digest(), header.as_deref(), &display)?;
    let (bytes, media_type, digest) = match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => (bytes, media_type, top_digest.clone()),
        OCI_INDEX | DOCKER_MANIFEST_LIST => {
            let index: ImageIndex = parse(&bytes, "image index", &client)?;
            let child = select_platform(&index, opts.platform.as_deref(), &display)?;
            let child_digest = Digest::try_from(child.digest())?;
            let (bytes, mt, header) = client.get_manifest(&child_digest.to_string(), &display)?;
            let what = format!("manifest {child_digest} of {display}");
            let d = verify_manifest(&bytes, Some(&child_digest), header.as_deref(), &what)?;
            if !matches!(mt.as_str(), OCI_MANIFEST | DOCKER_MANIFEST) {
                return Err(RegistryError::MediaType(mt));
            }
            (bytes, mt, d)
        }
        _ => return Err(RegistryError::MediaType(media_type)),
    };
    let manifest: ImageManifest = parse(&bytes, "image manifest", &client)?;
    let mut seen = BTreeSet::new();
    let wanted: VecDeque<Descriptor> = std::iter::once(manifest.config())
        .chain(manifest.layers())
        .filter(|d| seen.insert(d.digest().to_string()))
        .filter(|d| Digest::try_from(d.digest()).map_or(true, |d| !store.has_blob(&d)))
        .cloned()
        .collect();
    let up_to_date = wanted.is_empty() && store.has_blob(&digest);
    let downloaded = wanted.len();
    let bytes_total: u64 = wanted.iter().map(Descriptor::size).sum();
    fetch_all(store, &client, wanted, opts, progress)?;
    let mut w = store.blob_writer()?;
    w.write_all(&bytes).map_err(|source| StoreError::Io { op: "write blob to", path: store.tmp_dir(), source })?;
    w.commit(Some(&digest))?;
    let desc = Descriptor::new(MediaType::from(media_type.as_str()), bytes.len() as u64, &digest);
    // The store must be able to use what it is about to name (config parses, layers line up).
    let image = store.image_from_descriptor(desc.clone(), Some(reference.clone()), None)?;
    image.diff_ids()?;
    store.set_tag(reference, &desc)?;
    tracing::info!(reference = %reference, digest = %digest, blobs = downloaded, "pulled");
    Ok(PullReport {
        reference: reference.clone(),
        digest: top_digest,
        manifest: digest,
        downloaded,
        bytes: bytes_total,
        up_to_date,
    })
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &'static str, client: &Client) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| RegistryError::Json {
        what,
        registry: client.registry().to_owned(),
        source,
    })
}

/// The manifest's digest, checked against the reference's digest and the registry's header.
fn verify_manifest(bytes: &[u8], pinned: Option<&Digest>, header: Option<&str>, what: &str) -> Result<Digest> {
    let actual = Digest::of(bytes);
    let claimed = header.and_then(|h| h.parse::<Digest>().ok());
    for expected in pinned.into_iter().chain(claimed.as_ref()) {
        if *expected != actual {
            return Err(RegistryError::DigestMismatch {
                what: format!("manifest of {what}"),
                expected: expected.clone(),
                actual,
            });
        }
    }
    Ok(actual)
}

/// The index entry for `platform` (`os/arch` or `os/arch/variant`; the host's by default).
pub fn select_platform(index: &ImageIndex, platform: Option<&str>, image: &str) -> Result<Descriptor> {
    crate::store::find_platform(index, platform).map_err(|(platform, available)| RegistryError::NoPlatform {
        reference: image.to_owned(),
        platform,
        available,
    })
}

/// Download `wanted` with `opts.parallel` workers; the first error stops the others.
fn fetch_all(
    store: &Store,
    client: &Client,
    wanted: VecDeque<Descriptor>,
    opts: &PullOptions,
    progress: Progress,
) -> Result<()> {
    super::pool::run(wanted, opts.parallel, |desc| fetch_blob(store, client, &desc, opts.retries, progress))
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
    TooLong,
}

/// Download one blob into the store, resuming with `Range` when the connection breaks; the
/// blob is committed only if the whole of it hashes to its digest.
fn fetch_blob(store: &Store, client: &Client, desc: &Descriptor, retries: u32, progress: Progress) -> Result<()> {
    let digest = Digest::try_from(desc.digest())?;
    let size = desc.size();
    progress(Event::Start { digest: &digest, size });
    let mut attempts = 0;
    let mut w = store.blob_writer()?;
    let mut done = 0u64;
    loop {
        let (mut body, partial) = client.get_blob(&digest, done)?;
        if done > 0 && !partial {
            // The registry ignored the range: start over.
            w = store.blob_writer()?;
            done = 0;
        }
        match copy(&mut body, &mut w, &mut done, size, &digest, progress) {
            Ok(()) => break,
            Err(CopyError::TooLong) => {
                return Err(RegistryError::SizeMismatch { digest, expected: size, actual: done });
            }
            Err(CopyError::Write(source)) => {
                return Err(StoreError::Io { op: "write blob to", path: store.tmp_dir(), source }.into());
            }
            Err(CopyError::Read(e)) if attempts < retries => {
                attempts += 1;
                tracing::info!(digest = %digest, offset = done, error = %e, "download broke off; resuming");
                progress(Event::Resume { digest: &digest, offset: done });
                std::thread::sleep(Duration::from_millis(200 * u64::from(attempts)));
            }
            Err(CopyError::Read(source)) => {
                return Err(RegistryError::Read {
                    what: format!("blob {digest}"),
                    registry: client.registry().to_owned(),
                    source,
                });
            }
        }
    }
    if done != size {
        return Err(RegistryError::SizeMismatch { digest, expected: size, actual: done });
    }
    match w.commit(Some(&digest)) {
        Ok(_) => {}
        Err(StoreError::DigestMismatch { expected, actual, .. }) => {
            return Err(RegistryError::DigestMismatch { what: format!("blob {digest}"), expected, actual });
        }
        Err(e) => return Err(e.into()),
    }
    progress(Event::Done { digest: &digest, how: Outcome::Transferred });
    Ok(())
}

/// Copy `body` into `w`, counting into `done`, refusing more than `size` bytes in all.
fn copy(
    body: &mut impl Read,
    w: &mut impl Write,
    done: &mut u64,
    size: u64,
    digest: &Digest,
    progress: Progress,
) -> Result<(), CopyError> {
    let mut buf = vec![0u8; 256 << 10];
    let mut last_report = 0u64;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        if *done + n as u64 > size {
            *done += n as u64;
            return Err(CopyError::TooLong);
        }
        w.write_all(&buf[..n]).map_err(CopyError::Write)?;
        *done += n as u64;
        if *done - last_report >= 1 << 20 || *done == size {
            last_report = *done;
            progress(Event::Progress { digest, done: *done });
        }
    }
}

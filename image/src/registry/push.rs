//! `push`: every blob the image needs is made present in the repository (already there after a
//! `HEAD`, mounted from a sibling repository of the same registry, or uploaded: monolithic, or
//! in chunks), then the stored manifest bytes are `PUT` under the tag.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use super::client::{document_media_type, Client, ClientOptions, Mount};
use super::{Event, Outcome, Progress, RegistryError, Result, DOCKER_MANIFEST_LIST, OCI_INDEX};
use crate::digest::Digest;
use crate::reference::Reference;
use crate::store::{Store, StoreError, REF_NAME};

/// How to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// How to reach the registry.
    pub client: ClientOptions,
    /// Blobs uploaded at once.
    pub parallel: usize,
    /// Upload blobs larger than this in chunks of this size (`PATCH`); monolithic when `None`.
    pub chunk_size: Option<u64>,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self { client: ClientOptions::default(), parallel: 3, chunk_size: None }
    }
}

/// What a push did.
#[derive(Debug, Clone, Default)]
pub struct PushReport {
    /// The digest of the manifest (or index) pushed under the tag.
    pub digest: Option<Digest>,
    /// Its size in bytes.
    pub size: u64,
    /// Blobs uploaded.
    pub uploaded: usize,
    /// Blobs mounted from another repository.
    pub mounted: usize,
    /// Blobs the repository already had.
    pub existing: usize,
}

/// Push the image the store names `reference` to the registry and repository it names.
pub fn push(store: &Store, reference: &Reference, opts: &PushOptions, progress: Progress) -> Result<PushReport> {
    let top = local_descriptor(store, reference)?;
    let top_digest = Digest::try_from(top.digest())?;
    let top_bytes = store.read_blob(&top_digest)?;
    let top_type = document_media_type(&top_bytes).unwrap_or_else(|| top.media_type().to_string());
    // Image manifests to push before the top one (an index's children), and every blob.
    let mut children: Vec<(Digest, Vec<u8>, String)> = Vec::new();
    let manifests: Vec<ImageManifest> = if matches!(top_type.as_str(), OCI_INDEX | DOCKER_MANIFEST_LIST) {
        let index: ImageIndex = json(&top_bytes, &top_digest)?;
        let mut out = Vec::new();
        for m in index.manifests() {
            let d = Digest::try_from(m.digest())?;
            let bytes = store.read_blob(&d)?;
            let mt = document_media_type(&bytes).unwrap_or_else(|| m.media_type().to_string());
            out.push(json(&bytes, &d)?);
            children.push((d, bytes, mt));
        }
        out
    } else {
        vec![json(&top_bytes, &top_digest)?]
    };
    let mut seen = BTreeSet::new();
    let mut blobs = VecDeque::new();
    for m in &manifests {
        for b in std::iter::once(m.config()).chain(m.layers()) {
            let d = Digest::try_from(b.digest())?;
            if !store.has_blob(&d) {
                return Err(StoreError::MissingBlob(d).into());
            }
            if seen.insert(d.clone()) {
                blobs.push_back((d, b.size()));
            }
        }
    }
    let client = Client::new(reference.registry(), &reference.repository(), "pull,push", &opts.client);
    let sources = mount_sources(store, reference);
    let counts = [AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0)];
    super::pool::run(blobs, opts.parallel, |(d, size)| {
        let from = sources.get(&d).map(Vec::as_slice).unwrap_or_default();
        let how = push_blob(store, &client, &d, size, from, opts, progress)?;
        let i = match how {
            Outcome::Transferred => 0,
            Outcome::Mounted => 1,
            Outcome::Exists => 2,
        };
        counts[i].fetch_add(1, Ordering::Relaxed);
        Ok::<(), RegistryError>(())
    })?;
    for (d, bytes, mt) in &children {
        put_manifest(&client, &d.to_string(), mt, bytes, d)?;
    }
    let target = match (reference.tag(), reference.digest()) {
        (Some(t), _) => t.to_owned(),
        (None, Some(d)) => d.to_string(),
        (None, None) => crate::reference::DEFAULT_TAG.to_owned(),
    };
    put_manifest(&client, &target, &top_type, &top_bytes, &top_digest)?;
    tracing::info!(reference = %reference, digest = %top_digest, "pushed");
    Ok(PushReport {
        digest: Some(top_digest),
        size: top_bytes.len() as u64,
        uploaded: counts[0].load(Ordering::Relaxed),
        mounted: counts[1].load(Ordering::Relaxed),
        existing: counts[2].load(Ordering::Relaxed),
    })
}

fn json<T: serde::de::DeserializeOwned>(bytes: &[u8], digest: &Digest) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|source| StoreError::Json { what: "manifest", digest: digest.to_string(), source }.into())
}

/// What the store names `reference`: the `index.json` entry itself (an index stays an index),
/// else whatever [`Store::resolve`] finds (a digest).
fn local_descriptor(store: &Store, reference: &Reference) -> Result<Descriptor> {
    let name = reference.to_string();
    let index = store.index()?;
    let found = index
        .manifests()
        .iter()
        .find(|d| d.annotations().as_ref().and_then(|a| a.get(REF_NAME)).is_some_and(|n| *n == name));
    match found {
        Some(d) => Ok(d.clone()),
        None => Ok(store.resolve(&name)?.descriptor),
    }
}

/// Blobs that images tagged for other repositories of the same registry hold: candidates for
/// a cross-repository mount.
fn mount_sources(store: &Store, reference: &Reference) -> BTreeMap<Digest, Vec<String>> {
    let mut out: BTreeMap<Digest, Vec<String>> = BTreeMap::new();
    let Ok(index) = store.index() else { return out };
    for d in index.manifests() {
        let Some(name) = d.annotations().as_ref().and_then(|a| a.get(REF_NAME)) else { continue };
        let Ok(r) = name.parse::<Reference>() else { continue };
        if r.registry() != reference.registry() || r.repository() == reference.repository() {
            continue;
        }
        let Ok(img) = store.image_from_descriptor(d.clone(), None, None) else { continue };
        let repo = r.repository();
        for b in std::iter::once(img.config_digest.clone()).chain(img.layer_digests().unwrap_or_default()) {
            let v = out.entry(b).or_default();
            if !v.contains(&repo) {
                v.push(repo.clone());
            }
        }
    }
    out
}

/// Make one blob present in the repository.
fn push_blob(
    store: &Store,
    client: &Client,
    digest: &Digest,
    size: u64,
    from: &[String],
    opts: &PushOptions,
    progress: Progress,
) -> Result<Outcome> {
    progress(Event::Start { digest, size });
    if client.has_blob(digest)? {
        progress(Event::Done { digest, how: Outcome::Exists });
        return Ok(Outcome::Exists);
    }
    // One mount attempt: a registry that cannot mount opens an upload session instead (202),
    // which is then used for the upload.
    let location = match from.first() {
        Some(repo) => match client.mount(digest, repo)? {
            Mount::Mounted => {
                tracing::debug!(digest = %digest, from = %repo, "mounted");
                progress(Event::Done { digest, how: Outcome::Mounted });
                return Ok(Outcome::Mounted);
            }
            Mount::Upload(l) => l,
        },
        None => client.start_upload()?,
    };
    let open = || store.open_blob(digest).map_err(io::Error::other);
    match opts.chunk_size {
        Some(chunk) if chunk > 0 && size > chunk => {
            let mut r = store.open_blob(digest)?;
            let mut loc = location;
            let mut buf = vec![0u8; chunk as usize];
            let mut sent = 0u64;
            loop {
                let n = crate::pipeline::read_full(&mut r, &mut buf).map_err(|source| StoreError::Io {
                    op: "read blob",
                    path: store.blob_path(digest),
                    source,
                })?;
                if n == 0 {
                    break;
                }
                loc = client.patch_chunk(&loc, sent, &buf[..n])?;
                sent += n as u64;
                progress(Event::Progress { digest, done: sent });
            }
            client.put_upload(&loc, digest, 0, || Ok(io::empty()))?;
        }
        _ => {
            client.put_upload(&location, digest, size, || {
                Ok(Counting { inner: open()?, done: 0, last: 0, digest, progress })
            })?;
        }
    }
    progress(Event::Done { digest, how: Outcome::Transferred });
    Ok(Outcome::Transferred)
}

fn put_manifest(client: &Client, target: &str, media_type: &str, bytes: &[u8], digest: &Digest) -> Result<()> {
    let answered = client.put_manifest(target, media_type, bytes)?;
    if let Some(actual) = answered.and_then(|a| a.parse::<Digest>().ok()) {
        if actual != *digest {
            return Err(RegistryError::DigestMismatch {
                what: format!("manifest pushed as {target}"),
                expected: digest.clone(),
                actual,
            });
        }
    }
    Ok(())
}

/// A reader that reports how much of a blob has been sent.
struct Counting<'a, R> {
    inner: R,
    done: u64,
    last: u64,
    digest: &'a Digest,
    progress: Progress<'a>,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done - self.last >= 1 << 20 {
            self.last = self.done;
            (self.progress)(Event::Progress { digest: self.digest, done: self.done });
        }
        Ok(n)
    }
}

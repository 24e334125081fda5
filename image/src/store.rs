//! The image store: an OCI image layout on disk (`oci-layout`, `index.json`, `blobs/sha256/…`)
//! that skopeo and umoci read, plus twinbox's own directories beside it:
//!
//! ```text
//! ROOT/oci-layout, index.json, blobs/sha256/<hex>   the OCI layout; tags are ref.name annotations
//! ROOT/layers/<diff-id hex>/                        unpacked layers, overlayfs lowers, shared by images
//! ROOT/holds/<holder>                               "this container/VM uses manifest X" (blocks rmi)
//! ROOT/build-cache/<key>                            builder layer cache records
//! ROOT/tmp/                                         blobs and layers being written
//! ROOT/index.lock, ROOT/gc.lock                     flock files
//! ```
//!
//! Every blob is written to `tmp/` while it is hashed, checked against the expected digest,
//! synced and renamed into place, so a kill at any moment leaves no half blob under a digest.
//! `index.json` is replaced the same way. Writers hold `gc.lock` shared for the whole operation
//! (a load, a build), so a concurrent `prune` cannot remove blobs they have written but not
//! yet tagged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageIndexBuilder, ImageManifest, MediaType};
use serde::de::DeserializeOwned;
use serde::Serialize;
use twinbox_exit::ExitCode;

use crate::digest::{Digest, DigestError, HashingWriter, VerifyingReader};
use crate::reference::Reference;
use crate::unpack::{self, Compression, UnpackError, UnpackOptions};

/// The annotation that names an image in `index.json` (what `skopeo inspect oci:ROOT:NAME` looks for).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Default store root when neither `--root` nor `TWINBOX_ROOT` is given.
pub const DEFAULT_ROOT: &str = "/var/lib/twinbox";

/// Errors from the image store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation on the store failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Content did not hash to the digest it was written or read under.
    #[error("content of {what} hashes to {actual}, expected {expected}")]
    DigestMismatch {
        /// Which blob or layer.
        what: String,
        /// The digest it should have.
        expected: Digest,
        /// The digest it has.
        actual: Digest,
    },
    /// A blob that a manifest or the caller needs is not in the store.
    #[error("blob {0} is not in the store; pull or load the image again")]
    MissingBlob(Digest),
    /// No image under that name or digest.
    #[error("no such image: {0}; see `twinbox images` for what is in the store")]
    NoSuchImage(String),
    /// A short id matched several images.
    #[error("image id {0} is ambiguous; give more characters")]
    Ambiguous(String),
    /// What names the image is neither a reference nor an image id.
    #[error("{input:?} is not an image reference or id")]
    InvalidReference {
        input: String,
        #[source]
        source: crate::reference::ReferenceError,
    },
    /// A JSON document in the store is invalid.
    #[error("invalid {what} {digest}")]
    Json {
        /// manifest, index, config…
        what: &'static str,
        /// Where it is.
        digest: String,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// `index.json` or `oci-layout` is not valid.
    #[error("{path} is not a valid OCI layout file; is {root} an OCI image layout?", root = .path.parent().map(|p| p.display().to_string()).unwrap_or_default())]
    Layout {
        /// The bad file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// `index.json` is gone but the store holds blobs: treating it as empty would lose every
    /// image (and a prune would then delete them).
    #[error(
        "{root} holds {blobs} blobs but no index.json, which names its images; restore index.json \
         (from a backup, or `skopeo copy` the images in again), or move the store aside to start an empty one; \
         nothing was changed"
    )]
    IndexMissing {
        /// The store's root.
        root: PathBuf,
        /// How many blobs it holds.
        blobs: usize,
    },
    /// A digest string in a manifest or index did not parse.
    #[error("bad digest in the store")]
    Digest(#[from] DigestError),
    /// A manifest of a media type the store cannot use as an image.
    #[error("unsupported manifest media type {0}")]
    MediaType(String),
    /// An index had no manifest for this platform.
    #[error("image {image} has no manifest for platform {platform}; available: {available}")]
    NoPlatform {
        /// The image.
        image: String,
        /// The platform asked for.
        platform: String,
        /// What the index offers.
        available: String,
    },
    /// The config's diff_ids do not match the manifest's layers.
    #[error("image config lists {diff_ids} diff_ids but the manifest has {layers} layers")]
    LayerCount {
        /// Number of diff ids.
        diff_ids: usize,
        /// Number of layers.
        layers: usize,
    },
    /// Unpacking a layer failed.
    #[error("unpacking layer {layer}")]
    Unpack {
        /// The layer's blob digest.
        layer: Digest,
        /// Why.
        #[source]
        source: UnpackError,
    },
    /// The image is used by a container or VM.
    #[error("image {image} is in use by {holders}; stop and remove them first, or use --force")]
    InUse {
        /// The image.
        image: String,
        /// Who holds it.
        holders: String,
    },
}

impl ExitCode for StoreError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        match self {
            StoreError::NoSuchImage(_)
            | StoreError::Ambiguous(_)
            | StoreError::InvalidReference { .. }
            | StoreError::NoPlatform { .. }
            | StoreError::InUse { .. }
            // The message asks whether --root names an image layout.
            | StoreError::Layout { .. }
            // The message says how to restore it.
            | StoreError::IndexMissing { .. } => USER_ERROR,
            StoreError::Io { .. }
            | StoreError::DigestMismatch { .. }
            | StoreError::MissingBlob(_)
            | StoreError::Json { .. }
            | StoreError::MediaType(_)
            | StoreError::LayerCount { .. } => INTERNAL,
            // Not the digest's own code: that digest was read from the store's files, which
            // are then corrupt, whereas a digest the user typed would be the user's mistake.
            StoreError::Digest(_) => INTERNAL,
            StoreError::Unpack { source, .. } => source.exit_code(),
        }
    }
}

fn io_err(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Io { op, path, source }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Serialize with object keys sorted, so the same value always gives the same bytes (and digest).
pub fn canonical_json<T: Serialize>(v: &T) -> Vec<u8> {
    let value = serde_json::to_value(v).expect("OCI documents always serialize to JSON");
    serde_json::to_vec(&value).expect("a JSON value always serializes")
}

/// An image resolved from the store: its manifest and config.
#[derive(Debug, Clone)]
pub struct Image {
    /// The name it was found under, if it was found by name.
    pub reference: Option<Reference>,
    /// The manifest's descriptor.
    pub descriptor: Descriptor,
    /// Digest of the manifest (what `@sha256:` pins).
    pub manifest_digest: Digest,
    /// The manifest.
    pub manifest: ImageManifest,
    /// Digest of the config blob (Docker's "image id").
    pub config_digest: Digest,
    /// The config.
    pub config: ImageConfiguration,
}

impl Image {
    /// Layer digests, base first.
    pub fn layer_digests(&self) -> Result<Vec<Digest>> {
        self.manifest.layers().iter().map(|l| Ok(Digest::try_from(l.digest())?)).collect()
    }

    /// Uncompressed layer digests (diff ids), base first.
    pub fn diff_ids(&self) -> Result<Vec<Digest>> {
        let ids = self.config.rootfs().diff_ids();
        if ids.len() != self.manifest.layers().len() {
            return Err(StoreError::LayerCount { diff_ids: ids.len(), layers: self.manifest.layers().len() });
        }
        ids.iter().map(|d| Ok(d.parse::<Digest>()?)).collect()
    }

    /// Sum of the manifest, config and layer blob sizes.
    pub fn size(&self) -> u64 {
        self.descriptor.size()
            + self.manifest.config().size()
            + self.manifest.layers().iter().map(|l| l.size()).sum::<u64>()
    }
}

/// One row of `twinbox images`.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSummary {
    /// The tag.
    pub reference: String,
    /// Manifest digest.
    pub digest: String,
    /// Config digest (image id).
    pub id: String,
    /// Creation time from the config.
    pub created: Option<String>,
    /// Bytes in the store (compressed layers + config + manifest).
    pub size: u64,
}

/// What `prune` removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PruneReport {
    /// Blobs removed.
    pub blobs: usize,
    /// Unpacked layer directories removed.
    pub layer_dirs: usize,
    /// Temporary files and directories removed.
    pub temp: usize,
    /// Build cache records removed.
    pub cache_records: usize,
    /// MicroVM root disks removed.
    pub disks: usize,
    /// Bytes freed in blobs.
    pub bytes: u64,
}

/// An open image store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// The largest manifest looked up by digest alone (an ID); a larger blob is a layer.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// A held `flock`; released on drop.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// A blob being written: hashed as it is written, renamed into place by [`BlobWriter::commit`],
/// removed if dropped without commit.
pub struct BlobWriter<'s> {
    store: &'s Store,
    inner: HashingWriter<io::BufWriter<tempfile::NamedTempFile>>,
}

impl Write for BlobWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl BlobWriter<'_> {
    /// Finish the blob: check it against `expected` (if given), sync it and move it under its
    /// digest. On a mismatch nothing is stored.
    pub fn commit(self, expected: Option<&Digest>) -> Result<(Digest, u64)> {
        let (digest, size, buf) = self.inner.finish();
        let tmp = buf.into_inner().map_err(|e| StoreError::Io {
            op: "write blob to",
            path: self.store.root.join("tmp"),
            source: e.into_error(),
        })?;
        if let Some(exp) = expected {
            if *exp != digest {
                return Err(StoreError::DigestMismatch {
                    what: format!("blob {exp}"),
                    expected: exp.clone(),
                    actual: digest,
                });
            }
        }
        let dest = self.store.blob_path(&digest);
        if dest.exists() {
            return Ok((digest, size));
        }
        tmp.as_file().sync_all().map_err(io_err("sync", tmp.path()))?;
        tmp.persist(&dest).map_err(|e| StoreError::Io { op: "rename blob to", path: dest.clone(), source: e.error })?;
        Ok((digest, size))
    }
}

impl Store {
    /// The root from `TWINBOX_ROOT`, else `/var/lib/twinbox`.
    pub fn default_root() -> PathBuf {
        std::env::var_os("TWINBOX_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
    }

    /// Open the store at `root`, creating an empty OCI layout there if it has none.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for d in ["blobs/sha256", "layers", "holds", "build-cache", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err("create directory", &p))?;
        }
        let store = Self { root };
        let layout = store.root.join("oci-layout");
        if !layout.exists() {
            store.write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = store.root.join("index.json");
        if !index.exists() {
            let _l = store.lock_index()?;
            if !index.exists() {
                let blobs_dir = store.root.join("blobs/sha256");
                let blobs = fs::read_dir(&blobs_dir).map_err(io_err("list", &blobs_dir))?.count();
                if blobs > 0 {
                    return Err(StoreError::IndexMissing { root: store.root.clone(), blobs });
                }
                let empty = ImageIndexBuilder::default()
                    .schema_version(2u32)
                    .media_type(MediaType::ImageIndex)
                    .manifests(Vec::<Descriptor>::new())
                    .build()
                    .expect("an empty index has all required fields");
                store.write_atomic(&index, &canonical_json(&empty))?;
            }
        }
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with this digest lives (whether or not it exists).
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    /// Whether the blob is present (not verified).
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).exists()
    }

    /// Where the unpacked layer with this diff id lives (whether or not it exists).
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers").join(diff_id.hex())
    }

    /// Directory for in-progress files, on the same filesystem as the blobs.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Directory for build cache records.
    pub fn build_cache_dir(&self) -> PathBuf {
        self.root.join("build-cache")
    }

    fn flock(&self, name: &str, exclusive: bool) -> Result<StoreLock> {
        let path = self.root.join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("open lock file", &path))?;
        let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
        loop {
            // SAFETY: flock on a file descriptor we own; it has no memory-safety preconditions.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                break;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(StoreError::Io { op: "lock", path, source: err });
            }
        }
        Ok(StoreLock { _file: file })
    }

    fn lock_index(&self) -> Result<StoreLock> {
        self.flock("index.lock", true)
    }

    /// Held exclusively while nothing that writes to the store may run: no build, load or
    /// container create is under way while it is held (what `prune` itself takes).
    pub fn exclusive_guard(&self) -> Result<StoreLock> {
        self.flock("gc.lock", true)
    }

    /// Held (shared) by operations that write blobs before tagging them, so that a concurrent
    /// prune waits for them.
    pub fn writer_guard(&self) -> Result<StoreLock> {
        self.flock("gc.lock", false)
    }

    /// Write `bytes` to `path` through a temp file and a rename.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        crate::atomic::write(path, bytes, 0o644, true).map_err(io_err("replace", path))
    }

    // ---- blobs ----

    /// Start writing a blob.
    pub fn blob_writer(&self) -> Result<BlobWriter<'_>> {
        let tmp = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(self.tmp_dir())
            .map_err(io_err("create temp file in", self.tmp_dir()))?;
        Ok(BlobWriter { store: self, inner: HashingWriter::new(io::BufWriter::with_capacity(1 << 20, tmp)) })
    }

    /// Store `bytes` as a blob.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<(Digest, u64)> {
        let d = Digest::of(bytes);
        if self.has_blob(&d) {
            return Ok((d, bytes.len() as u64));
        }
        let mut w = self.blob_writer()?;
        w.write_all(bytes).map_err(io_err("write blob to", self.tmp_dir()))?;
        w.commit(Some(&d))
    }

    /// Copy a reader into a blob, checking the digest if one is expected.
    pub fn put_blob_from(&self, mut r: impl Read, expected: Option<&Digest>) -> Result<(Digest, u64)> {
        let mut w = self.blob_writer()?;
        io::copy(&mut r, &mut w).map_err(io_err("write blob to", self.tmp_dir()))?;
        w.commit(expected)
    }

    /// Store a JSON document (canonical form) as a blob.
    pub fn put_json<T: Serialize>(&self, v: &T) -> Result<(Digest, u64)> {
        self.put_blob(&canonical_json(v))
    }

    /// Open a blob for reading; reading it to the end verifies its digest.
    pub fn open_blob(&self, d: &Digest) -> Result<VerifyingReader<BufReader<File>>> {
        let p = self.blob_path(d);
        let f = File::open(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StoreError::MissingBlob(d.clone())
            } else {
                StoreError::Io { op: "open blob", path: p.clone(), source: e }
            }
        })?;
        Ok(VerifyingReader::new(BufReader::with_capacity(1 << 20, f), d.clone()))
    }

    /// Read a whole blob, verified.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let p = self.blob_path(d);
        let bytes = fs::read(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StoreError::MissingBlob(d.clone())
            } else {
                StoreError::Io { op: "read blob", path: p.clone(), source: e }
            }
        })?;
        let actual = Digest::of(&bytes);
        if actual != *d {
            return Err(StoreError::DigestMismatch {
                what: format!("blob {}", p.display()),
                expected: d.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Read and parse a JSON blob, verified.
    pub fn read_json<T: DeserializeOwned>(&self, d: &Digest, what: &'static str) -> Result<T> {
        let bytes = self.read_blob(d)?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Json { what, digest: d.to_string(), source })
    }

    /// Check every blob against its name; returns the digests that do not match.
    pub fn verify_all(&self) -> Result<Vec<Digest>> {
        let mut bad = Vec::new();
        for d in self.blob_digests()? {
            let mut r = self.open_blob(&d)?;
            if io::copy(&mut r, &mut io::sink()).is_err() {
                bad.push(d);
            }
        }
        Ok(bad)
    }

    fn blob_digests(&self) -> Result<Vec<Digest>> {
        let dir = self.root.join("blobs/sha256");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let e = e.map_err(io_err("list", &dir))?;
            if let Some(d) = e.file_name().to_str().and_then(|n| Digest::from_hex(n).ok()) {
                out.push(d);
            }
        }
        Ok(out)
    }

    // ---- index and tags ----

    /// The store's `index.json`.
    pub fn index(&self) -> Result<ImageIndex> {
        let p = self.root.join("index.json");
        let bytes = fs::read(&p).map_err(io_err("read", &p))?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Layout { path: p, source })
    }

    fn update_index(&self, f: impl FnOnce(&mut Vec<Descriptor>)) -> Result<()> {
        let _l = self.lock_index()?;
        let mut index = self.index()?;
        let mut manifests = index.manifests().clone();
        f(&mut manifests);
        index.set_manifests(manifests);
        self.write_atomic(&self.root.join("index.json"), &canonical_json(&index))
    }

    /// Name a manifest: add (or move) the `ref.name` entry for `r` in `index.json`.
    pub fn set_tag(&self, r: &Reference, manifest: &Descriptor) -> Result<()> {
        let name = r.to_string();
        let mut desc = manifest.clone();
        let mut ann = desc.annotations().clone().unwrap_or_default();
        ann.insert(REF_NAME.to_owned(), name.clone());
        desc.set_annotations(Some(ann));
        self.update_index(|m| {
            m.retain(|d| ref_name(d) != Some(name.as_str()));
            m.push(desc);
        })
    }

    /// Remove the tag `r`; returns the descriptor it pointed to.
    pub fn remove_tag(&self, r: &Reference) -> Result<Descriptor> {
        let name = r.to_string();
        let mut removed = None;
        self.update_index(|m| {
            if let Some(i) = m.iter().position(|d| ref_name(d) == Some(name.as_str())) {
                removed = Some(m.remove(i));
            }
        })?;
        removed.ok_or(StoreError::NoSuchImage(name))
    }

    /// Every named image in the store, sorted by name.
    pub fn images(&self) -> Result<Vec<ImageSummary>> {
        let mut out = Vec::new();
        for desc in self.index()?.manifests() {
            let Some(name) = ref_name(desc) else { continue };
            let Ok(reference) = name.parse::<Reference>() else { continue };
            // One unreadable image must not hide the others.
            let img = match self.image_from_descriptor(desc.clone(), Some(reference), None) {
                Ok(img) => img,
                Err(e) => {
                    tracing::warn!(image = name, error = %e, "cannot read this image; `twinbox rmi -f` removes it");
                    continue;
                }
            };
            out.push(ImageSummary {
                reference: name.to_owned(),
                digest: img.manifest_digest.to_string(),
                id: img.config_digest.to_string(),
                created: img.config.created().clone(),
                size: img.size(),
            });
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Find an image by reference (`name:tag`, `name@sha256:…`), by manifest or config digest,
    /// or by a unique prefix of at least 4 hex characters of either (like Docker image ids).
    pub fn resolve(&self, s: &str) -> Result<Image> {
        let index = self.index()?;
        let hexish = s.strip_prefix("sha256:").unwrap_or(s);
        let looks_like_id = hexish.len() >= 4 && hexish.bytes().all(|b| b.is_ascii_hexdigit());
        let parsed = s.parse::<Reference>();
        if let Ok(r) = &parsed {
            let r = r.clone();
            let name = r.to_string();
            if let Some(desc) = index.manifests().iter().find(|d| ref_name(d) == Some(name.as_str())) {
                return self.image_from_descriptor(desc.clone(), Some(r), None);
            }
            if let (Some(d), None) = (r.digest(), r.tag()) {
                if self.has_blob(d) {
                    let bytes = self.read_blob(d)?;
                    let desc = Descriptor::new(MediaType::ImageManifest, bytes.len() as u64, d);
                    return self.image_from_descriptor(desc, Some(r.clone()), None);
                }
            }
            // `sha256:<hex>` parses as a name and a tag; it is an image ID all the same.
            if !looks_like_id || (s.contains(':') && !s.starts_with("sha256:")) {
                return Err(StoreError::NoSuchImage(s.to_owned()));
            }
        }
        if looks_like_id {
            let mut found: Vec<Image> = Vec::new();
            for desc in index.manifests() {
                // An unreadable entry is none of these (the listing warns about it).
                let Ok(img) =
                    self.image_from_descriptor(desc.clone(), ref_name(desc).and_then(|n| n.parse().ok()), None)
                else {
                    continue;
                };
                let hit = img.manifest_digest.hex().starts_with(hexish) || img.config_digest.hex().starts_with(hexish);
                if hit && !found.iter().any(|f| f.manifest_digest == img.manifest_digest) {
                    found.push(img);
                }
            }
            if found.is_empty() && hexish.len() == 64 {
                // The full digest of a manifest the store holds but no tag names any more (a
                // container's image after `rmi` of its tag).
                // Only a blob of a manifest's size is read: the digest may be a layer's.
                let size = format!("sha256:{hexish}")
                    .parse::<Digest>()
                    .ok()
                    .and_then(|d| Some((fs::metadata(self.blob_path(&d)).ok()?.len(), d)));
                if let Some((len, d)) = size.filter(|(len, _)| *len <= MAX_MANIFEST_BYTES) {
                    let desc = Descriptor::new(MediaType::ImageManifest, len, &d);
                    if let Ok(img) = self.image_from_descriptor(desc, None, None) {
                        return Ok(img);
                    }
                }
            }
            return match found.len() {
                0 => Err(StoreError::NoSuchImage(s.to_owned())),
                1 => Ok(found.remove(0)),
                _ => Err(StoreError::Ambiguous(s.to_owned())),
            };
        }
        match parsed {
            Err(source) => Err(StoreError::InvalidReference { input: s.to_owned(), source }),
            Ok(_) => Err(StoreError::NoSuchImage(s.to_owned())),
        }
    }

    /// Load the manifest and config a descriptor points to. An image index is resolved to the
    /// manifest for `platform` (`os/arch`, default the host's).
    pub fn image_from_descriptor(
        &self,
        desc: Descriptor,
        reference: Option<Reference>,
        platform: Option<&str>,
    ) -> Result<Image> {
        let digest = Digest::try_from(desc.digest())?;
        match desc.media_type() {
            MediaType::ImageManifest => {}
            MediaType::Other(s) if s == DOCKER_MANIFEST => {}
            MediaType::ImageIndex => {
                let index: ImageIndex = self.read_json(&digest, "image index")?;
                let child = select_platform(&index, platform, &reference)?;
                return self.image_from_descriptor(child, reference, platform);
            }
            MediaType::Other(s) if s == DOCKER_MANIFEST_LIST => {
                let index: ImageIndex = self.read_json(&digest, "manifest list")?;
                let child = select_platform(&index, platform, &reference)?;
                return self.image_from_descriptor(child, reference, platform);
            }
            other => return Err(StoreError::MediaType(other.to_string())),
        }
        let manifest: ImageManifest = self.read_json(&digest, "image manifest")?;
        let config_digest = Digest::try_from(manifest.config().digest())?;
        let config: ImageConfiguration = self.read_json(&config_digest, "image config")?;
        Ok(Image { reference, descriptor: desc, manifest_digest: digest, manifest, config_digest, config })
    }

    /// Store a config and a manifest over already-stored layers; returns the manifest descriptor.
    pub fn put_image(&self, config: &ImageConfiguration, layers: Vec<Descriptor>) -> Result<Descriptor> {
        let (cd, cs) = self.put_json(config)?;
        self.put_manifest(Descriptor::new(MediaType::ImageConfig, cs, &cd), layers)
    }

    /// Store a manifest for a stored config and layers; returns its descriptor.
    pub fn put_manifest(&self, config: Descriptor, layers: Vec<Descriptor>) -> Result<Descriptor> {
        let manifest = oci_spec::image::ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(config)
            .layers(layers)
            .build()
            .expect("a manifest with config and layers has all required fields");
        let (md, ms) = self.put_json(&manifest)?;
        Ok(Descriptor::new(MediaType::ImageManifest, ms, &md))
    }

    // ---- holds (images in use) ----

    /// Record that `holder` (a container or VM id) uses the image with this manifest.
    pub fn hold(&self, holder: &str, manifest: &Digest) -> Result<()> {
        let p = self.root.join("holds").join(sanitize(holder));
        self.write_atomic(&p, manifest.to_string().as_bytes())
    }

    /// Drop `holder`'s hold, if any.
    pub fn release(&self, holder: &str) -> Result<()> {
        let p = self.root.join("holds").join(sanitize(holder));
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StoreError::Io { op: "remove", path: p, source: e }),
            _ => Ok(()),
        }
    }

    /// Holders of each held manifest.
    pub fn holds(&self) -> Result<BTreeMap<Digest, Vec<String>>> {
        let dir = self.root.join("holds");
        let mut out: BTreeMap<Digest, Vec<String>> = BTreeMap::new();
        for e in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let e = e.map_err(io_err("list", &dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                continue;
            }
            let Ok(text) = fs::read_to_string(e.path()) else { continue };
            if let Ok(d) = text.trim().parse::<Digest>() {
                out.entry(d).or_default().push(name);
            }
        }
        Ok(out)
    }

    /// Untag an image (`twinbox rmi`). Refuses when a container or VM holds the image, unless
    /// `force`. When no tag refers to the manifest any more, its blobs and layer directories
    /// are removed (unless another image shares them).
    pub fn remove_image(&self, s: &str, force: bool) -> Result<(Image, PruneReport)> {
        let img = self.resolve(s)?;
        if !force {
            if let Some(holders) = self.holds()?.get(&img.manifest_digest) {
                return Err(StoreError::InUse { image: s.to_owned(), holders: holders.join(", ") });
            }
        }
        match &img.reference {
            Some(r) if r.tag().is_some() => {
                self.remove_tag(r)?;
            }
            _ => {
                // By id or digest: remove every tag that points at it.
                let d = img.manifest_digest.to_string();
                self.update_index(|m| m.retain(|x| x.digest().to_string() != d))?;
            }
        }
        let report = self.gc(false)?;
        Ok((img, report))
    }

    // ---- layers ----

    /// Unpack each layer of `image` into its cached directory (once per diff id) and return the
    /// directories base first: the overlayfs lowers of a container of this image.
    pub fn unpacked_layers(&self, image: &Image) -> Result<Vec<PathBuf>> {
        let diff_ids = image.diff_ids()?;
        let mut dirs = Vec::with_capacity(diff_ids.len());
        for (layer, diff_id) in image.manifest.layers().iter().zip(&diff_ids) {
            dirs.push(self.unpack_layer(layer, diff_id)?);
        }
        Ok(dirs)
    }

    /// Unpack one layer blob for overlayfs into `layers/<diff id>/` unless it is there already.
    /// The blob's digest and the uncompressed stream's diff id are both checked; the directory
    /// appears (by rename) only when the whole layer is unpacked and verified.
    pub fn unpack_layer(&self, layer: &Descriptor, diff_id: &Digest) -> Result<PathBuf> {
        let dest = self.layer_dir(diff_id);
        if dest.is_dir() {
            return Ok(dest);
        }
        let layer_digest = Digest::try_from(layer.digest())?;
        let wrap = |source| StoreError::Unpack { layer: layer_digest.clone(), source };
        let tmp = tempfile::Builder::new()
            .prefix("layer-")
            .tempdir_in(self.tmp_dir())
            .map_err(io_err("create temp dir in", self.tmp_dir()))?;
        let compression = Compression::from_media_type(layer.media_type().as_ref()).map_err(wrap)?;
        let blob = self.open_blob(&layer_digest)?;
        let mut stream =
            crate::digest::HashingReader::new(crate::pipeline::decompress_in_background(blob, compression));
        let opts = UnpackOptions::new(unpack::Mode::Overlay);
        unpack::unpack(&mut stream, tmp.path(), &opts).map_err(wrap)?;
        // Read what the tar reader left (end-of-archive padding) so the diff id covers it all.
        io::copy(&mut stream, &mut io::sink()).map_err(io_err("read layer", self.blob_path(&layer_digest)))?;
        let (actual, _) = stream.finish();
        if actual != *diff_id {
            return Err(StoreError::DigestMismatch {
                what: format!("layer {layer_digest} (uncompressed)"),
                expected: diff_id.clone(),
                actual,
            });
        }
        let staged = tmp.keep();
        match fs::rename(&staged, &dest) {
            Ok(()) => Ok(dest),
            Err(_) if dest.is_dir() => {
                // Someone else unpacked it at the same time; theirs is as good as ours.
                let _ = fs::remove_dir_all(&staged);
                Ok(dest)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&staged);
                Err(StoreError::Io { op: "rename layer to", path: dest, source: e })
            }
        }
    }

    // ---- garbage collection ----

    /// Remove blobs and layer directories that no tag, hold or build cache record (unless
    /// `drop_build_cache`) reaches, and leftovers in `tmp/`.
    pub fn gc(&self, drop_build_cache: bool) -> Result<PruneReport> {
        let _gc = self.flock("gc.lock", true)?;
        let mut report = PruneReport::default();
        let cache_dir = self.build_cache_dir();
        if drop_build_cache {
            for e in fs::read_dir(&cache_dir).map_err(io_err("list", &cache_dir))?.flatten() {
                if fs::remove_file(e.path()).is_ok() {
                    report.cache_records += 1;
                }
            }
        }
        let mut live_blobs: BTreeSet<Digest> = BTreeSet::new();
        let mut live_layers: BTreeSet<String> = BTreeSet::new();
        let mut roots: Vec<Descriptor> = self.index()?.manifests().clone();
        for d in self.holds()?.into_keys() {
            roots.push(Descriptor::new(MediaType::ImageManifest, 0, &d));
        }
        for d in roots {
            self.mark(&d, &mut live_blobs, &mut live_layers);
        }
        for e in fs::read_dir(&cache_dir).map_err(io_err("list", &cache_dir))?.flatten() {
            // A cache record lists the blobs it needs, one digest per line after its header.
            if let Ok(text) = fs::read_to_string(e.path()) {
                for d in text
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == ':'))
                    .filter_map(|w| w.parse::<Digest>().ok())
                {
                    live_blobs.insert(d);
                }
            }
        }
        for d in self.blob_digests()? {
            if !live_blobs.contains(&d) {
                let p = self.blob_path(&d);
                let size = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&p).map_err(io_err("remove", &p))?;
                report.blobs += 1;
                report.bytes += size;
            }
        }
        let layers = self.root.join("layers");
        for e in fs::read_dir(&layers).map_err(io_err("list", &layers))?.flatten() {
            if !live_layers.contains(&e.file_name().to_string_lossy().into_owned()) {
                remove_tree(&e.path())?;
                report.layer_dirs += 1;
            }
        }
        report.disks = crate::disk::remove_unreferenced(self, &live_blobs)?;
        let tmp = self.tmp_dir();
        for e in fs::read_dir(&tmp).map_err(io_err("list", &tmp))?.flatten() {
            remove_tree(&e.path())?;
            report.temp += 1;
        }
        Ok(report)
    }

    fn mark(&self, desc: &Descriptor, blobs: &mut BTreeSet<Digest>, layers: &mut BTreeSet<String>) {
        let Ok(d) = Digest::try_from(desc.digest()) else { return };
        if !blobs.insert(d.clone()) {
            return;
        }
        let Ok(bytes) = fs::read(self.blob_path(&d)) else { return };
        // Manifests and indexes alike: follow whatever descriptors they hold.
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return };
        if let Ok(index) = serde_json::from_value::<ImageIndex>(v.clone()) {
            for m in index.manifests() {
                self.mark(m, blobs, layers);
            }
        }
        if let Ok(m) = serde_json::from_value::<ImageManifest>(v) {
            for l in m.layers() {
                if let Ok(ld) = Digest::try_from(l.digest()) {
                    blobs.insert(ld);
                }
            }
            if let Ok(cd) = Digest::try_from(m.config().digest()) {
                blobs.insert(cd.clone());
                if let Ok(cfg) = self.read_json::<ImageConfiguration>(&cd, "image config") {
                    for id in cfg.rootfs().diff_ids() {
                        if let Ok(id) = id.parse::<Digest>() {
                            layers.insert(id.hex().to_owned());
                        }
                    }
                }
            }
        }
    }
}

/// Remove a file or a directory tree, making read-only directories writable first (layer
/// trees keep the modes their tar gave them).
pub fn remove_tree(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::Io { op: "stat", path: p.to_owned(), source: e }),
        Ok(m) if !m.is_dir() => return fs::remove_file(p).map_err(io_err("remove", p)),
        Ok(_) => {}
    }
    if fs::remove_dir_all(p).is_ok() {
        return Ok(());
    }
    use std::os::unix::fs::PermissionsExt;
    for e in walkdir::WalkDir::new(p).into_iter().flatten() {
        if e.file_type().is_dir() {
            let _ = fs::set_permissions(e.path(), fs::Permissions::from_mode(0o700));
        }
    }
    fs::remove_dir_all(p).map_err(io_err("remove", p))
}

/// Docker's schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker's manifest list media type.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations().as_ref()?.get(REF_NAME).map(String::as_str)
}

fn sanitize(holder: &str) -> String {
    holder.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
}

/// The host platform in OCI terms (`linux/amd64`).
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    };
    format!("linux/{arch}")
}

/// The entry of `index` for `platform` (`os/arch` or `os/arch/variant`; the host's when
/// `None`). On a miss: the platform asked for and the ones offered (comma-separated, or
/// "none"), for the caller's error.
pub fn find_platform(index: &ImageIndex, platform: Option<&str>) -> std::result::Result<Descriptor, (String, String)> {
    let want = platform.map(str::to_owned).unwrap_or_else(host_platform);
    let mut available = Vec::new();
    for m in index.manifests() {
        let Some(p) = m.platform() else { continue };
        let os_arch = format!("{}/{}", p.os(), p.architecture());
        let full = match p.variant() {
            Some(v) => format!("{os_arch}/{v}"),
            None => os_arch.clone(),
        };
        if want == os_arch || want == full {
            return Ok(m.clone());
        }
        // Attestation manifests (buildkit) carry unknown/unknown: not a platform to offer.
        if os_arch != "unknown/unknown" {
            available.push(full);
        }
    }
    // Single-entry indexes without a platform (as some tools write) mean "this one".
    if index.manifests().len() == 1 && index.manifests()[0].platform().is_none() {
        return Ok(index.manifests()[0].clone());
    }
    Err((want, if available.is_empty() { "none".into() } else { available.join(", ") }))
}

fn select_platform(index: &ImageIndex, platform: Option<&str>, reference: &Option<Reference>) -> Result<Descriptor> {
    find_platform(index, platform).map_err(|(platform, available)| StoreError::NoPlatform {
        image: reference.as_ref().map(|r| r.to_string()).unwrap_or_default(),
        platform,
        available,
    })
}

/// Group index entries by manifest digest: `digest → [names]` (for `images` and `save`).
pub fn names_by_manifest(index: &ImageIndex) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for d in index.manifests() {
        if let Some(n) = ref_name(d) {
            out.entry(d.digest().to_string()).or_default().push(n.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let io = || io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(StoreError::NoSuchImage("x:1".into()).exit_code(), 1);
        assert_eq!(StoreError::InUse { image: "x:1".into(), holders: "c1".into() }.exit_code(), 1);
        assert_eq!(StoreError::Io { op: "read", path: "/s/index.json".into(), source: io() }.exit_code(), 125);
        // A bad digest in the store's own files is a corrupt store, not a typo of the user's.
        assert_eq!(StoreError::Digest(DigestError::Malformed("sha256:x".into())).exit_code(), 125);
        // Unpacking asks the unpacker.
        let layer = Digest::of(b"layer");
        assert_eq!(StoreError::Unpack { layer: layer.clone(), source: UnpackError::OverlayNeedsRoot }.exit_code(), 1);
        assert_eq!(StoreError::Unpack { layer, source: UnpackError::Read(io()) }.exit_code(), 125);
    }
}

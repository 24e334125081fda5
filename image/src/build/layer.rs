//! Layers the builder writes, and what it knows of the layers below.
//!
//! A [`LayerPlan`] is the content of one layer: entries by path. [`write_layer`] turns it into
//! a deterministic `tar+gzip` blob in one pass (tar → diff-id hash → gzip → blob writer):
//! entries sorted by path, the times, owners and modes the plan says, no user or group names,
//! a gzip header without time or file name.
//!
//! [`LowerFs`] indexes the directories and symlinks of the layers under the one being built,
//! so that a `COPY` into `/bin` follows a `/bin -> usr/bin` symlink of the base image instead
//! of shadowing it, and so that parent directories keep their existing modes (`/tmp` stays
//! 1777). It also keeps `/etc/passwd` and `/etc/group` for `--chown=NAME`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use flate2::GzBuilder;
use oci_spec::image::{Descriptor, MediaType};
use twinbox_exit::ExitCode;

use crate::digest::{Digest, HashingWriter};
use crate::store::{Store, StoreError};
use crate::unpack::{self, Compression, UnpackError};

/// Media type of the layers the builder writes.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// How many symlinks a path may go through before resolution gives up.
const MAX_SYMLINK_HOPS: usize = 40;
/// Files of the lower layers kept in memory for `--chown=NAME`.
const KEPT_FILES: [&str; 2] = ["etc/passwd", "etc/group"];
/// Largest kept file.
const KEPT_FILE_MAX: u64 = 4 << 20;

/// Why a layer could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The store refused a blob.
    #[error("storing the layer")]
    Store(#[source] Box<StoreError>),
    /// Writing the tar stream failed.
    #[error("writing the layer tar")]
    Write(#[source] io::Error),
    /// A file to put in the layer could not be read.
    #[error("cannot read {}", path.display())]
    ReadSource {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file changed size while the layer was written.
    #[error("{} changed while it was being copied; build again", path.display())]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// A layer of the image below could not be read.
    #[error("reading layer {layer} of the base image")]
    ReadLower {
        /// The layer blob.
        layer: Digest,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A layer of the image below has a media type that cannot be read.
    #[error("layer {layer} of the base image")]
    LowerMediaType {
        /// The layer blob.
        layer: Digest,
        /// Why.
        #[source]
        source: UnpackError,
    },
    /// An `ADD` archive could not be read.
    #[error("cannot read archive {}", archive.display())]
    Archive {
        /// The archive.
        archive: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An `ADD` archive could not be decompressed.
    #[error("cannot decompress archive {}", archive.display())]
    Decompress {
        /// The archive.
        archive: PathBuf,
        /// Why.
        #[source]
        source: UnpackError,
    },
    /// An archive entry that would land outside the destination.
    #[error("archive {} has entry {entry:?}, which leaves the destination (absolute or with ..); refusing to extract it", archive.display())]
    ArchiveEscape {
        /// The archive.
        archive: PathBuf,
        /// The entry name.
        entry: String,
    },
    /// An archive hardlink whose target is not an earlier entry.
    #[error("archive {} has hardlink {entry:?} to {target:?}, which is not an earlier file of the archive", archive.display())]
    ArchiveLink {
        /// The archive.
        archive: PathBuf,
        /// The entry.
        entry: String,
        /// Its target.
        target: String,
    },
    /// An archive entry of a type a layer cannot hold.
    #[error("archive {} has entry {entry:?} of unsupported type {kind:?}", archive.display())]
    ArchiveType {
        /// The archive.
        archive: PathBuf,
        /// The entry.
        entry: String,
        /// The tar type byte.
        kind: char,
    },
}

impl ExitCode for LayerError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        match self {
            LayerError::Store(e) => e.exit_code(),
            LayerError::LowerMediaType { source, .. } => source.exit_code(),
            LayerError::Write(_) | LayerError::ReadLower { .. } => INTERNAL,
            // A file of the build context or an `ADD` archive: the user's.
            LayerError::ReadSource { .. }
            | LayerError::Changed { .. }
            | LayerError::Archive { .. }
            | LayerError::ArchiveEscape { .. }
            | LayerError::ArchiveLink { .. }
            | LayerError::ArchiveType { .. } => USER_ERROR,
            // Not the unpacker's own code: what does not decompress is the user's archive here,
            // where it would be a layer of the store's.
            LayerError::Decompress { .. } => USER_ERROR,
        }
    }
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file whose content is read from `source` when the layer is written.
    /// Files with the same `link` key become hardlinks to the first of them (by path).
    File {
        /// Where the content is.
        source: PathBuf,
        /// Its size.
        size: u64,
        /// Hardlink group.
        link: Option<(u64, u64)>,
    },
    /// A symlink.
    Symlink {
        /// The target.
        target: String,
    },
    /// A named pipe.
    Fifo,
    /// A character device.
    Char {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    Block {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// An OCI whiteout marker, written as an empty regular file: its path is `DIR/.wh.NAME`
    /// (NAME is deleted from the layers below) or `DIR/.wh..wh..opq` (DIR is emptied of what
    /// the layers below put there).
    Whiteout,
}

/// Extended attributes by name (without the `SCHILY.xattr.` prefix).
pub type Xattrs = Vec<(String, Vec<u8>)>;

/// One entry of a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits (with setuid/setgid/sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time.
    pub mtime: u64,
    /// Extended attributes (`security.capability`, `user.*`, …), written as PAX
    /// `SCHILY.xattr.NAME` records in name order. Hardlinks after the first carry none (they
    /// share the first one's inode).
    pub xattrs: Xattrs,
}

impl Entry {
    /// An entry without xattrs.
    pub fn new(kind: EntryKind, mode: u32, uid: u64, gid: u64, mtime: u64) -> Self {
        Entry { kind, mode, uid, gid, mtime, xattrs: Vec::new() }
    }
}

/// The content of one layer: entries by path (relative, no leading or trailing `/`).
#[derive(Debug, Clone, Default)]
pub struct LayerPlan {
    entries: BTreeMap<String, Entry>,
}

impl LayerPlan {
    /// Add or replace an entry. A non-directory replacing a directory takes its contents
    /// with it.
    pub fn insert(&mut self, path: String, entry: Entry) {
        if entry.kind != EntryKind::Dir && self.entries.get(&path).is_some_and(|e| e.kind == EntryKind::Dir) {
            remove_below(&mut self.entries, &path);
        }
        self.entries.insert(path, entry);
    }

    /// The entry at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// Entries sorted by path.
    pub fn entries(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.entries.iter()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the plan is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Add every missing parent directory, with the metadata `parent` gives for it.
    pub fn add_parents(&mut self, mut parent: impl FnMut(&str) -> Entry) {
        let mut missing = BTreeSet::new();
        for path in self.entries.keys() {
            let mut p = path.as_str();
            while let Some((up, _)) = p.rsplit_once('/') {
                if !self.entries.contains_key(up) {
                    missing.insert(up.to_owned());
                }
                p = up;
            }
        }
        for m in missing {
            let e = parent(&m);
            self.entries.insert(m, e);
        }
    }
}

fn remove_below<V>(map: &mut BTreeMap<String, V>, dir: &str) {
    let prefix = format!("{dir}/");
    let doomed: Vec<String> =
        map.range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix)).map(|(k, _)| k.clone()).collect();
    for k in doomed {
        map.remove(&k);
    }
}

/// A layer written to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// Digest of the compressed blob.
    pub digest: Digest,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
    /// Size of the blob.
    pub size: u64,
}

impl LayerBlob {
    /// The manifest descriptor of this layer.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(MediaType::ImageLayerGzip, self.size, &self.digest)
    }
}

/// A reader that fails unless it yields exactly `remaining` bytes.
struct Exact<R> {
    inner: R,
    remaining: u64,
    path: PathBuf,
    changed: bool,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let max = buf.len().min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            self.changed = true;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while being copied", self.path.display()),
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Write `plan` as a gzip-compressed layer blob.
pub fn write_layer(store: &Store, plan: &LayerPlan) -> Result<LayerBlob, LayerError> {
    let blob = store.blob_writer().map_err(|e| LayerError::Store(Box::new(e)))?;
    let gz = GzBuilder::new().mtime(0).write(blob, flate2::Compression::default());
    let mut tar = tar::Builder::new(HashingWriter::new(gz));
    let mut first_link: HashMap<(u64, u64), &str> = HashMap::new();
    for (path, e) in plan.entries() {
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode & 0o7777);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        h.set_size(0);
        let w = LayerError::Write;
        let hardlink = matches!(&e.kind, EntryKind::File { link: Some(k), .. } if first_link.contains_key(k));
        if !e.xattrs.is_empty() && !hardlink {
            let mut xattrs: Vec<(String, &[u8])> =
                e.xattrs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice())).collect();
            xattrs.sort();
            tar.append_pax_extensions(xattrs.iter().map(|(k, v)| (k.as_str(), *v))).map_err(w)?;
        }
        match &e.kind {
            EntryKind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                tar.append_data(&mut h, format!("{path}/"), io::empty()).map_err(w)?;
            }
            EntryKind::File { source, size, link } => {
                if let Some(first) = link.and_then(|k| first_link.get(&k)) {
                    h.set_entry_type(tar::EntryType::Link);
                    tar.append_link(&mut h, path, first).map_err(w)?;
                    continue;
                }
                if let Some(k) = link {
                    first_link.insert(*k, path);
                }
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(*size);
                let f = File::open(source).map_err(|e| LayerError::ReadSource { path: source.clone(), source: e })?;
                let mut data = Exact {
                    inner: BufReader::with_capacity(1 << 20, f),
                    remaining: *size,
                    path: source.clone(),
                    changed: false,
                };
                if let Err(err) = tar.append_data(&mut h, path, &mut data) {
                    if data.changed {
                        return Err(LayerError::Changed { path: source.clone() });
                    }
                    return Err(LayerError::Write(err));
                }
                // A file that grew is cut at its old size; say so rather than store half a change.
                let mut probe = [0u8; 1];
                if data.inner.read(&mut probe).map(|n| n > 0).unwrap_or(false) {
                    return Err(LayerError::Changed { path: source.clone() });
                }
            }
            EntryKind::Symlink { target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                tar.append_link(&mut h, path, target).map_err(w)?;
            }
            EntryKind::Fifo => {
                h.set_entry_type(tar::EntryType::Fifo);
                // Zeros, not blanks: readers (ours included) parse a fifo's device fields.
                h.set_device_major(0).map_err(w)?;
                h.set_device_minor(0).map_err(w)?;
                tar.append_data(&mut h, path, io::empty()).map_err(w)?;
            }
            EntryKind::Char { major, minor } | EntryKind::Block { major, minor } => {
                let t =
                    if matches!(e.kind, EntryKind::Char { .. }) { tar::EntryType::Char } else { tar::EntryType::Block };
                h.set_entry_type(t);
                h.set_device_major(*major).map_err(w)?;
                h.set_device_minor(*minor).map_err(w)?;
                tar.append_data(&mut h, path, io::empty()).map_err(w)?;
            }
            EntryKind::Whiteout => {
                h.set_entry_type(tar::EntryType::Regular);
                tar.append_data(&mut h, path, io::empty()).map_err(w)?;
            }
        }
    }
    let hashing = tar.into_inner().map_err(LayerError::Write)?;
    let (diff_id, _, gz) = hashing.finish();
    let blob = gz.finish().map_err(LayerError::Write)?;
    let (digest, size) = blob.commit(None).map_err(|e| LayerError::Store(Box::new(e)))?;
    Ok(LayerBlob { digest, diff_id, size })
}

/// What a lower path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LowerKind {
    /// A directory.
    Dir,
    /// A symlink to this target.
    Symlink(String),
    /// Anything else.
    Other,
}

/// A path of the lower layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LowerNode {
    /// What it is.
    pub kind: LowerKind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
}

/// The merged view of the layers below the one being built (paths, kinds, owners; file
/// contents only for `/etc/passwd` and `/etc/group`).
#[derive(Debug, Default)]
pub struct LowerFs {
    nodes: BTreeMap<String, LowerNode>,
    files: HashMap<String, Vec<u8>>,
    applied: usize,
}

/// Clean a tar entry name: no leading `./` or `/`, no trailing `/`; `None` for the root or a
/// name with `..`.
fn clean_entry_name(name: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

impl LowerFs {
    /// How many layers have been applied.
    pub fn applied(&self) -> usize {
        self.applied
    }

    /// Apply the layers of `layers` not applied yet.
    pub fn catch_up(&mut self, store: &Store, layers: &[Descriptor]) -> Result<(), LayerError> {
        while self.applied < layers.len() {
            self.apply_blob(store, &layers[self.applied])?;
        }
        Ok(())
    }

    fn apply_blob(&mut self, store: &Store, layer: &Descriptor) -> Result<(), LayerError> {
        let digest =
            Digest::try_from(layer.digest()).map_err(|e| LayerError::Store(Box::new(StoreError::Digest(e))))?;
        let compression = Compression::from_media_type(layer.media_type().as_ref())
            .map_err(|source| LayerError::LowerMediaType { layer: digest.clone(), source })?;
        let blob = store.open_blob(&digest).map_err(|e| LayerError::Store(Box::new(e)))?;
        let stream = unpack::decompress(blob, compression)
            .map_err(|source| LayerError::LowerMediaType { layer: digest.clone(), source })?;
        let read_err = |source| LayerError::ReadLower { layer: digest.clone(), source };
        let mut archive = tar::Archive::new(stream);
        let mut whiteouts: Vec<(String, bool)> = Vec::new();
        let mut added: Vec<(String, LowerNode)> = Vec::new();
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            let raw = entry.path().map_err(read_err)?.to_string_lossy().into_owned();
            let Some(path) = clean_entry_name(&raw) else { continue };
            let (dir, base) = match path.rsplit_once('/') {
                Some((d, b)) => (d.to_owned(), b),
                None => (String::new(), path.as_str()),
            };
            if base == ".wh..wh..opq" {
                whiteouts.push((dir, true));
                continue;
            }
            if base.starts_with(".wh..wh.") {
                continue;
            }
            if let Some(name) = base.strip_prefix(".wh.") {
                whiteouts.push((if dir.is_empty() { name.to_owned() } else { format!("{dir}/{name}") }, false));
                continue;
            }
            let h = entry.header();
            let kind = match h.entry_type() {
                tar::EntryType::Directory => LowerKind::Dir,
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(read_err)?
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    LowerKind::Symlink(target)
                }
                _ => LowerKind::Other,
            };
            let node = LowerNode {
                kind,
                mode: h.mode().map_err(read_err)? & 0o7777,
                uid: h.uid().unwrap_or(0),
                gid: h.gid().unwrap_or(0),
            };
            if KEPT_FILES.contains(&path.as_str())
                && entry.header().entry_type().is_file()
                && entry.size() <= KEPT_FILE_MAX
            {
                let mut buf = Vec::new();
                entry.read_to_end(&mut buf).map_err(read_err)?;
                files.push((path.clone(), buf));
            }
            added.push((path, node));
        }
        // Whiteouts hide what the lower layers have, not what this layer adds.
        for (path, opaque) in whiteouts {
            if !opaque {
                self.nodes.remove(&path);
                self.files.remove(&path);
            }
            remove_below(&mut self.nodes, &path);
            if path.is_empty() {
                self.nodes.clear();
            }
        }
        let nodes = &self.nodes;
        self.files.retain(|p, _| nodes.contains_key(p));
        for (path, node) in added {
            self.put(path, node);
        }
        for (path, data) in files {
            self.files.insert(path, data);
        }
        self.applied += 1;
        Ok(())
    }

    fn put(&mut self, path: String, node: LowerNode) {
        if node.kind != LowerKind::Dir {
            remove_below(&mut self.nodes, &path);
        }
        self.files.remove(&path);
        self.nodes.insert(path, node);
    }

    /// Apply a layer this build just wrote (as the next layer).
    pub fn apply_plan(&mut self, plan: &LayerPlan) {
        // Whiteouts hide what the lower layers have, not what this layer adds.
        for (path, e) in plan.entries() {
            if e.kind != EntryKind::Whiteout {
                continue;
            }
            let (dir, base) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
            if base == ".wh..wh..opq" {
                remove_below(&mut self.nodes, dir);
                if dir.is_empty() {
                    self.nodes.clear();
                }
            } else if let Some(name) = base.strip_prefix(".wh.") {
                let victim = if dir.is_empty() { name.to_owned() } else { format!("{dir}/{name}") };
                self.nodes.remove(&victim);
                remove_below(&mut self.nodes, &victim);
            }
        }
        let nodes = &self.nodes;
        self.files.retain(|p, _| nodes.contains_key(p));
        for (path, e) in plan.entries() {
            if e.kind == EntryKind::Whiteout {
                continue;
            }
            let kind = match &e.kind {
                EntryKind::Dir => LowerKind::Dir,
                EntryKind::Symlink { target } => LowerKind::Symlink(target.clone()),
                _ => LowerKind::Other,
            };
            self.put(path.clone(), LowerNode { kind, mode: e.mode, uid: e.uid, gid: e.gid });
            if let EntryKind::File { source, size, .. } = &e.kind {
                if KEPT_FILES.contains(&path.as_str()) && *size <= KEPT_FILE_MAX {
                    if let Ok(data) = fs::read(source) {
                        self.files.insert(path.clone(), data);
                    }
                }
            }
        }
        self.applied += 1;
    }

    /// The node at a path (not following symlinks).
    pub fn get(&self, path: &str) -> Option<&LowerNode> {
        self.nodes.get(path)
    }

    /// Content of a kept file (`etc/passwd`, `etc/group`).
    pub fn file(&self, path: &str) -> Option<&[u8]> {
        self.files.get(path).map(Vec::as_slice)
    }

    /// Resolve `path` (relative to the root) through the lower symlinks, scoped to the root as
    /// a container would see it. The last component is followed only if `follow_last`.
    pub fn resolve(&self, path: &str, follow_last: bool) -> String {
        let mut todo: VecDeque<String> = path.split('/').filter(|c| !c.is_empty()).map(str::to_owned).collect();
        let mut out: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(c) = todo.pop_front() {
            match c.as_str() {
                "." => continue,
                ".." => {
                    out.pop();
                    continue;
                }
                _ => {}
            }
            out.push(c);
            if todo.is_empty() && !follow_last {
                break;
            }
            if let Some(LowerNode { kind: LowerKind::Symlink(target), .. }) = self.nodes.get(&out.join("/")) {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    break;
                }
                out.pop();
                if target.starts_with('/') {
                    out.clear();
                }
                let mut next: VecDeque<String> =
                    target.split('/').filter(|c| !c.is_empty()).map(str::to_owned).collect();
                next.extend(todo);
                todo = next;
            }
        }
        out.join("/")
    }

    /// Whether `path` is a directory, following symlinks.
    pub fn is_dir(&self, path: &str) -> bool {
        let p = self.resolve(path, true);
        p.is_empty() || self.nodes.get(&p).is_some_and(|n| n.kind == LowerKind::Dir)
    }
}

/// Whether a file is a tar archive (plain, gzip or zstd); its compression if so.
pub fn archive_compression(path: &Path) -> Result<Option<Compression>, LayerError> {
    let err = |source| LayerError::Archive { archive: path.to_owned(), source };
    let mut f = File::open(path).map_err(err)?;
    let mut magic = [0u8; 8];
    let n = crate::pipeline::read_full(&mut f, &mut magic).map_err(err)?;
    let compression = Compression::detect(&magic[..n]);
    let f = File::open(path).map_err(err)?;
    let Ok(mut stream) = unpack::decompress(f, compression) else { return Ok(None) };
    let mut block = [0u8; 512];
    match crate::pipeline::read_full(&mut stream, &mut block) {
        Ok(512) => Ok(is_tar_header(&block).then_some(compression)),
        // Not decompressible or shorter than a header: an ordinary file.
        _ => Ok(None),
    }
}

/// A tar header block: a valid checksum over a non-zero block.
fn is_tar_header(block: &[u8; 512]) -> bool {
    if block.iter().all(|&b| b == 0) {
        return false;
    }
    let field = &block[148..156];
    let digits: String = field.iter().take_while(|&&b| b != 0 && b != b' ').map(|&b| b as char).collect();
    let digits = digits.trim_start();
    let Ok(stored) = u32::from_str_radix(digits, 8) else { return false };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| if (148..156).contains(&i) { u32::from(b' ') } else { u32::from(b) })
        .sum();
    sum == stored
}

/// An entry of an `ADD` archive, relative to the destination.
#[derive(Debug, Clone)]
pub struct ArchiveEntry {
    /// Path below the destination.
    pub path: String,
    /// The entry (file contents spooled into the spool directory).
    pub entry: Entry,
}

/// Read a local tar archive for `ADD`, spooling file contents into `spool` (they are needed
/// again, in sorted order, when the layer is written). Entries that would leave the
/// destination are refused.
pub fn read_archive(archive: &Path, compression: Compression, spool: &Path) -> Result<Vec<ArchiveEntry>, LayerError> {
    let err = |source| LayerError::Archive { archive: archive.to_owned(), source };
    let f = File::open(archive).map_err(err)?;
    let stream = unpack::decompress(BufReader::with_capacity(1 << 20, f), compression)
        .map_err(|source| LayerError::Decompress { archive: archive.to_owned(), source })?;
    let mut tar = tar::Archive::new(stream);
    let mut out: Vec<ArchiveEntry> = Vec::new();
    let mut files: HashMap<String, (PathBuf, u64, (u64, u64))> = HashMap::new();
    for (index, entry) in tar.entries().map_err(err)?.enumerate() {
        let mut entry = entry.map_err(err)?;
        let raw = entry.path().map_err(err)?.to_string_lossy().into_owned();
        if raw.starts_with('/') || raw.split('/').any(|c| c == "..") {
            return Err(LayerError::ArchiveEscape { archive: archive.to_owned(), entry: raw });
        }
        let Some(path) = clean_entry_name(&raw) else { continue };
        let h = entry.header();
        // Some archivers leave owner and time fields blank; read those as 0.
        let (mode, uid, gid, mtime) =
            (h.mode().map_err(err)? & 0o7777, h.uid().unwrap_or(0), h.gid().unwrap_or(0), h.mtime().unwrap_or(0));
        let t = h.entry_type();
        let kind = match t {
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let file = spool.join(index.to_string());
                let mut w = File::create(&file).map_err(err)?;
                let size = io::copy(&mut entry, &mut w).map_err(err)?;
                w.flush().map_err(err)?;
                let key = (u64::MAX, index as u64);
                files.insert(path.clone(), (file.clone(), size, key));
                EntryKind::File { source: file, size, link: Some(key) }
            }
            tar::EntryType::Link => {
                let target =
                    entry.link_name().map_err(err)?.map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
                let found = clean_entry_name(&target).and_then(|t| files.get(&t).cloned());
                let Some((source, size, key)) = found else {
                    return Err(LayerError::ArchiveLink { archive: archive.to_owned(), entry: raw, target });
                };
                files.insert(path.clone(), (source.clone(), size, key));
                EntryKind::File { source, size, link: Some(key) }
            }
            tar::EntryType::Symlink => {
                let target =
                    entry.link_name().map_err(err)?.map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
                EntryKind::Symlink { target }
            }
            tar::EntryType::Fifo => EntryKind::Fifo,
            tar::EntryType::Char | tar::EntryType::Block => {
                let major = h.device_major().map_err(err)?.unwrap_or(0);
                let minor = h.device_minor().map_err(err)?.unwrap_or(0);
                if t == tar::EntryType::Char {
                    EntryKind::Char { major, minor }
                } else {
                    EntryKind::Block { major, minor }
                }
            }
            other => {
                return Err(LayerError::ArchiveType {
                    archive: archive.to_owned(),
                    entry: raw,
                    kind: char::from(other.as_byte()),
                });
            }
        };
        out.push(ArchiveEntry { path, entry: Entry::new(kind, mode, uid, gid, mtime) });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(kind: LowerKind) -> LowerNode {
        LowerNode { kind, mode: 0o755, uid: 0, gid: 0 }
    }

    #[test]
    fn resolves_lower_symlinks_inside_the_root() {
        let mut fs = LowerFs::default();
        fs.put("usr".into(), node(LowerKind::Dir));
        fs.put("usr/bin".into(), node(LowerKind::Dir));
        fs.put("bin".into(), node(LowerKind::Symlink("usr/bin".into())));
        fs.put("abs".into(), node(LowerKind::Symlink("/usr".into())));
        fs.put("up".into(), node(LowerKind::Symlink("../../../usr".into())));
        fs.put("loop".into(), node(LowerKind::Symlink("loop".into())));
        assert_eq!(fs.resolve("bin/x", false), "usr/bin/x");
        assert_eq!(fs.resolve("bin", false), "bin");
        assert_eq!(fs.resolve("bin", true), "usr/bin");
        assert_eq!(fs.resolve("abs/bin/y", false), "usr/bin/y");
        assert_eq!(fs.resolve("up/lib", false), "usr/lib", ".. stops at the root");
        assert!(fs.is_dir("bin"));
        assert!(!fs.is_dir("loop"));
        let _ = fs.resolve("loop/x", false);
    }

    #[test]
    fn plan_replacing_a_dir_drops_its_contents() {
        let e = |kind| Entry::new(kind, 0o644, 0, 0, 0);
        let mut p = LayerPlan::default();
        p.insert("a".into(), e(EntryKind::Dir));
        p.insert("a/b".into(), e(EntryKind::Fifo));
        p.insert("ab".into(), e(EntryKind::Fifo));
        p.insert("a".into(), e(EntryKind::Symlink { target: "x".into() }));
        assert_eq!(p.entries().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["a", "ab"]);
        p.insert("d/e/f".into(), e(EntryKind::Fifo));
        p.add_parents(|_| e(EntryKind::Dir));
        assert_eq!(p.entries().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["a", "ab", "d", "d/e", "d/e/f"]);
    }

    #[test]
    fn tar_header_detection() {
        let mut h = tar::Header::new_ustar();
        h.set_path("x").unwrap();
        h.set_size(0);
        h.set_cksum();
        let mut block = [0u8; 512];
        block.copy_from_slice(h.as_bytes());
        assert!(is_tar_header(&block));
        block[0] = b'y';
        assert!(!is_tar_header(&block));
        assert!(!is_tar_header(&[0u8; 512]));
    }
}

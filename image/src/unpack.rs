//! Unpacking OCI layer tarballs into a directory, safely.
//!
//! The tar stream is treated as hostile. Every filesystem operation is done relative to a
//! directory file descriptor that was reached from the target one component at a time with
//! `O_NOFOLLOW | O_DIRECTORY`, and every name handed to a `*at` syscall is a single path
//! component that is neither empty, `.`, `..`, nor contains `/`. So nothing outside the
//! target can be created, removed, chmod'ed, chown'ed or touched, even if the archive (or a
//! concurrent process) swaps a directory for a symlink between two entries.
//!
//! Two modes represent OCI whiteouts:
//! - [`Mode::Flatten`] applies a layer on top of the lower layers already in the target;
//! - [`Mode::Overlay`] writes one layer alone as an overlayfs lower directory (whiteout
//!   character devices and `trusted.overlay.opaque`).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::{Dir, Type as DirType};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, fstatat, futimens, makedev, mkdirat, mknodat, utimensat, FchmodatFlags, Mode as Perm, SFlag,
    UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, geteuid, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use twinbox_exit::ExitCode;

/// Size of the input buffer and of the copy buffer for file contents.
const BUF_SIZE: usize = 1 << 20;
/// Prefix of a whiteout file name.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Name of the opaque-directory marker.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Prefix of aufs metadata entries (`.wh..wh.plnk`, ...), which are not whiteouts.
const AUFS_META_PREFIX: &[u8] = b".wh..wh.";
/// PAX record prefix carrying extended attributes.
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";
/// The xattr overlayfs reads to hide a lower directory's content.
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// How whiteouts are represented in the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Apply the layer onto `target`, which may already hold the lower layers: `.wh.NAME`
    /// deletes NAME, `.wh..wh..opq` empties the directory of what lower layers put there
    /// (entries of this same layer, before or after the marker, are kept). The result is a
    /// flattened rootfs.
    #[default]
    Flatten,
    /// `target` is an empty directory for this layer alone, to be stacked as an overlayfs
    /// lower: `.wh.NAME` becomes a 0/0 character device NAME and `.wh..wh..opq` sets
    /// `trusted.overlay.opaque=y` on its directory. Needs root.
    Overlay,
}

/// Options for [`unpack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackOptions {
    /// How whiteouts are represented.
    pub mode: Mode,
    /// Give entries the uid/gid recorded in the tar (needs root). Without it, entries are
    /// owned by the calling user.
    pub same_owner: bool,
}

impl UnpackOptions {
    /// Options for `mode`, keeping ownership exactly when running as root.
    pub fn new(mode: Mode) -> Self {
        UnpackOptions { mode, same_owner: geteuid().is_root() }
    }
}

impl UnpackOptions {
    /// [`Mode::Flatten`], ownership kept when root.
    pub fn flatten() -> Self {
        UnpackOptions::new(Mode::Flatten)
    }

    /// [`Mode::Overlay`], ownership kept when root.
    pub fn overlay() -> Self {
        UnpackOptions::new(Mode::Overlay)
    }
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions::new(Mode::Flatten)
    }
}

/// What an unpack did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Tar entries processed (whiteouts included, extension headers not).
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    /// Whiteout and opaque markers applied.
    pub whiteouts: u64,
}

/// Compression of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (possibly several members).
    Gzip,
    /// zstd (possibly several frames).
    Zstd,
}

impl Compression {
    /// The compression named by a layer media type (OCI, OCI non-distributable, Docker v2).
    pub fn from_media_type(mt: &str) -> Result<Self, UnpackError> {
        let c = match mt {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar" => Compression::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Compression::Zstd,
            other => return Err(UnpackError::UnsupportedMediaType(other.to_owned())),
        };
        Ok(c)
    }

    /// Guess the compression from the first bytes of a blob.
    pub fn detect(first_bytes: &[u8]) -> Self {
        if first_bytes.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if first_bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Why unpacking failed. Variants about a tar entry carry the entry's path as written in
/// the archive.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("cannot start {kind:?} decompression")]
    Decompressor {
        kind: Compression,
        #[source]
        source: io::Error,
    },
    #[error("cannot open unpack target {}", path.display())]
    Target {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "overlay-mode unpacking needs root (CAP_MKNOD for whiteout devices, CAP_SYS_ADMIN for trusted.overlay xattrs)"
    )]
    OverlayNeedsRoot,
    #[error("reading the layer tar stream")]
    Read(#[source] io::Error),
    #[error("tar entry #{index} has an empty name")]
    EmptyName { index: u64 },
    #[error("tar entry {}: name contains a NUL byte", entry.display())]
    NulInName { entry: PathBuf },
    #[error("tar entry {}: absolute path", entry.display())]
    AbsolutePath { entry: PathBuf },
    #[error("tar entry {}: path contains `..`", entry.display())]
    DotDot { entry: PathBuf },
    #[error("tar entry {}: parent {} is a symlink", entry.display(), parent.display())]
    ParentIsSymlink { entry: PathBuf, parent: PathBuf },
    #[error("tar entry {}: parent {} is not a directory", entry.display(), parent.display())]
    ParentNotDirectory { entry: PathBuf, parent: PathBuf },
    #[error("tar entry {}: only a directory may stand for the root", entry.display())]
    RootNotDirectory { entry: PathBuf },
    #[error("tar entry {}: whiteout does not name a sibling", entry.display())]
    BadWhiteout { entry: PathBuf },
    #[error("tar entry {}: link target is empty or contains a NUL byte", entry.display())]
    BadLinkTarget { entry: PathBuf },
    #[error("tar entry {}: symlink target {} climbs above the root", entry.display(), target.display())]
    SymlinkEscapes { entry: PathBuf, target: PathBuf },
    #[error("tar entry {}: hardlink target {} is absolute", entry.display(), target.display())]
    HardlinkAbsolute { entry: PathBuf, target: PathBuf },
    #[error("tar entry {}: hardlink target {} climbs above the root", entry.display(), target.display())]
    HardlinkEscapes { entry: PathBuf, target: PathBuf },
    #[error("tar entry {}: hardlink target {} goes through symlink {}", entry.display(), target.display(), via.display())]
    HardlinkThroughSymlink { entry: PathBuf, target: PathBuf, via: PathBuf },
    #[error("tar entry {}: hardlink target {} does not exist", entry.display(), target.display())]
    HardlinkMissing { entry: PathBuf, target: PathBuf },
    #[error("tar entry {}: device nodes can only be created as root", entry.display())]
    DeviceNeedsRoot { entry: PathBuf },
    #[error("tar entry {}: unsupported entry type {:?}", entry.display(), char::from(*kind))]
    UnsupportedType { entry: PathBuf, kind: u8 },
    #[error("tar entry {}: malformed header", entry.display())]
    Header {
        entry: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("tar entry {}: reading content", entry.display())]
    Content {
        entry: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("tar entry {}: {op}", entry.display())]
    Fs {
        entry: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("tar entry {}: setting xattr {name:?}", entry.display())]
    Xattr {
        entry: PathBuf,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tar entry {}: creating an overlay whiteout is not permitted", entry.display())]
    WhiteoutNotPermitted {
        entry: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("finishing directory {}: {op}", dir.display())]
    FinishDir {
        dir: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

impl ExitCode for UnpackError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        use UnpackError::*;
        match self {
            // Run as root.
            OverlayNeedsRoot | DeviceNeedsRoot { .. } => USER_ERROR,
            // A layer that is corrupt or hostile, or the filesystem failing under it.
            UnsupportedMediaType(_)
            | Decompressor { .. }
            | Target { .. }
            | Read(_)
            | EmptyName { .. }
            | NulInName { .. }
            | AbsolutePath { .. }
            | DotDot { .. }
            | ParentIsSymlink { .. }
            | ParentNotDirectory { .. }
            | RootNotDirectory { .. }
            | BadWhiteout { .. }
            | BadLinkTarget { .. }
            | SymlinkEscapes { .. }
            | HardlinkAbsolute { .. }
            | HardlinkEscapes { .. }
            | HardlinkThroughSymlink { .. }
            | HardlinkMissing { .. }
            | UnsupportedType { .. }
            | Header { .. }
            | Content { .. }
            | Fs { .. }
            | Xattr { .. }
            | WhiteoutNotPermitted { .. }
            | FinishDir { .. } => INTERNAL,
        }
    }
}

impl UnpackError {
    /// The tar entry this error is about, if any.
    pub fn entry(&self) -> Option<&Path> {
        use UnpackError::*;
        match self {
            NulInName { entry }
            | AbsolutePath { entry }
            | DotDot { entry }
            | ParentIsSymlink { entry, .. }
            | ParentNotDirectory { entry, .. }
            | RootNotDirectory { entry }
            | BadWhiteout { entry }
            | BadLinkTarget { entry }
            | SymlinkEscapes { entry, .. }
            | HardlinkAbsolute { entry, .. }
            | HardlinkEscapes { entry, .. }
            | HardlinkThroughSymlink { entry, .. }
            | HardlinkMissing { entry, .. }
            | DeviceNeedsRoot { entry }
            | UnsupportedType { entry, .. }
            | Header { entry, .. }
            | Content { entry, .. }
            | Fs { entry, .. }
            | Xattr { entry, .. }
            | WhiteoutNotPermitted { entry, .. } => Some(entry),
            UnsupportedMediaType(_)
            | Decompressor { .. }
            | Target { .. }
            | OverlayNeedsRoot
            | Read(_)
            | EmptyName { .. }
            | FinishDir { .. } => None,
        }
    }
}

/// Wrap a reader with the right decompressor.
pub fn decompress<'a, R: Read + 'a>(r: R, c: Compression) -> Result<Box<dyn Read + 'a>, UnpackError> {
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(r).map_err(|source| UnpackError::Decompressor { kind: c, source })?,
        ),
    })
}

/// Unpack an uncompressed tar stream into `target`, an existing directory.
///
/// Directory modes and times are applied at the end, deepest first. On error, `target` may
/// hold a partial layer (but nothing outside it was touched).
pub fn unpack<R: Read>(tar: R, target: &Path, opts: &UnpackOptions) -> Result<UnpackStats, UnpackError> {
    let is_root = geteuid().is_root();
    if opts.mode == Mode::Overlay && !is_root {
        return Err(UnpackError::OverlayNeedsRoot);
    }
    let root = nix::fcntl::open(target, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Perm::empty())
        .map_err(|e| UnpackError::Target { path: target.to_owned(), source: e.into() })?;
    let mut u = Unpacker {
        root,
        mode: opts.mode,
        same_owner: opts.same_owner,
        is_root,
        parents: DirStack::default(),
        links: DirStack::default(),
        layer_paths: HashSet::new(),
        dirs: Vec::new(),
        dir_index: HashMap::new(),
        buf: vec![0; BUF_SIZE],
        stats: UnpackStats::default(),
    };
    let mut archive = tar::Archive::new(BufReader::with_capacity(BUF_SIZE, tar));
    let entries = archive.entries().map_err(UnpackError::Read)?;
    for (index, entry) in (0u64..).zip(entries) {
        let mut entry = entry.map_err(UnpackError::Read)?;
        u.entry(&mut entry, index)?;
    }
    u.finish_dirs()?;
    Ok(u.stats)
}

/// A failed syscall, before it is attributed to an entry.
#[derive(Debug, Clone, Copy)]
struct Fail {
    op: &'static str,
    errno: Errno,
}

fn fail(op: &'static str) -> impl Fn(Errno) -> Fail {
    move |errno| Fail { op, errno }
}

impl Fail {
    fn into_error(self, entry: &Path) -> UnpackError {
        UnpackError::Fs { entry: entry.to_owned(), op: self.op, source: self.errno.into() }
    }
}

/// Why walking to a directory failed, with the index of the component at fault.
#[derive(Debug, Clone, Copy)]
enum WalkError {
    Symlink(usize),
    NotDir(usize),
    Missing(usize),
    Io(Errno),
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

/// Open directory `name` under `dir` without following a symlink; classify failures.
fn open_subdir(dir: BorrowedFd<'_>, name: &[u8], create: bool) -> Result<OwnedFd, WalkKind> {
    match nix::fcntl::openat(dir, name, DIR_FLAGS, Perm::empty()) {
        Ok(fd) => Ok(fd),
        Err(Errno::ENOENT) if create => {
            match mkdirat(dir, name, Perm::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(WalkKind::Io(e)),
            }
            // Re-open without following: a symlink raced in here is caught as ELOOP.
            nix::fcntl::openat(dir, name, DIR_FLAGS, Perm::empty()).map_err(|e| classify_open_error(dir, name, e))
        }
        Err(e) => Err(classify_open_error(dir, name, e)),
    }
}

#[derive(Debug, Clone, Copy)]
enum WalkKind {
    Symlink,
    NotDir,
    Missing,
    Io(Errno),
}

impl WalkKind {
    fn at(self, i: usize) -> WalkError {
        match self {
            WalkKind::Symlink => WalkError::Symlink(i),
            WalkKind::NotDir => WalkError::NotDir(i),
            WalkKind::Missing => WalkError::Missing(i),
            WalkKind::Io(e) => WalkError::Io(e),
        }
    }
}

fn classify_open_error(dir: BorrowedFd<'_>, name: &[u8], e: Errno) -> WalkKind {
    match e {
        Errno::ENOENT => WalkKind::Missing,
        Errno::ELOOP | Errno::ENOTDIR => match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => WalkKind::Symlink,
            Ok(_) => WalkKind::NotDir,
            Err(Errno::ENOENT) => WalkKind::Missing,
            Err(e) => WalkKind::Io(e),
        },
        e => WalkKind::Io(e),
    }
}

/// Open directory fds along the last path walked, so that consecutive entries in the same
/// directory (the usual tar order) cost no extra `openat`.
///
/// Invariant: after `resolve(comps)`, the stack holds exactly the ancestors of the entry
/// being processed. An entry only ever changes itself and what lies below it, so the cached
/// fds stay valid for the next entry; any cached directory that is not an ancestor of the
/// next entry is dropped by the next `resolve`.
#[derive(Default)]
struct DirStack {
    names: Vec<Vec<u8>>,
    fds: Vec<OwnedFd>,
}

impl DirStack {
    fn resolve<'a>(
        &'a mut self,
        root: &'a OwnedFd,
        comps: &[&[u8]],
        create: bool,
    ) -> Result<BorrowedFd<'a>, WalkError> {
        let mut keep = 0;
        while keep < self.names.len() && keep < comps.len() && self.names[keep] == comps[keep] {
            keep += 1;
        }
        self.names.truncate(keep);
        self.fds.truncate(keep);
        for (i, comp) in comps.iter().enumerate().skip(keep) {
            let cur = self.fds.last().unwrap_or(root).as_fd();
            let fd = open_subdir(cur, comp, create).map_err(|k| k.at(i))?;
            self.names.push(comp.to_vec());
            self.fds.push(fd);
        }
        Ok(self.fds.last().unwrap_or(root).as_fd())
    }

    /// Record a just-opened child of the directory `resolve` returned last.
    fn push(&mut self, name: &[u8], fd: OwnedFd) {
        self.names.push(name.to_vec());
        self.fds.push(fd);
    }

    fn clear(&mut self) {
        self.names.clear();
        self.fds.clear();
    }
}

/// A borrowed fd usable with the `xattr` crate's fd-based calls.
struct XattrFd<'a>(BorrowedFd<'a>);

impl AsRawFd for XattrFd<'_> {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl xattr::FileExt for XattrFd<'_> {}

/// Where to set an xattr.
enum XattrTarget<'a> {
    /// An open file or directory.
    Fd(BorrowedFd<'a>),
    /// A symlink or special file: `name` in the directory `dir`, never followed.
    At(BorrowedFd<'a>, &'a [u8]),
}

/// Metadata of one entry, read from its header and PAX records.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    atime: TimeSpec,
    mtime: TimeSpec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What an entry asks for.
enum Kind {
    File,
    Dir,
    Symlink(Vec<u8>),
    Hardlink(Vec<u8>),
    Node(SFlag, u32, u32),
}

/// A directory whose mode and times are applied at the end.
struct DeferredDir {
    path: Vec<u8>,
    entry: PathBuf,
    mode: u32,
    atime: TimeSpec,
    mtime: TimeSpec,
}

struct Unpacker {
    root: OwnedFd,
    mode: Mode,
    same_owner: bool,
    is_root: bool,
    /// Ancestors of the current entry.
    parents: DirStack,
    /// Ancestors of the current hardlink target (walked fresh each time).
    links: DirStack,
    /// Flatten mode: every path this layer put in the tree, with all its ancestors.
    layer_paths: HashSet<Vec<u8>>,
    dirs: Vec<DeferredDir>,
    dir_index: HashMap<Vec<u8>, usize>,
    buf: Vec<u8>,
    stats: UnpackStats,
}

/// Normalized form of an entry path: components joined by `/`, without `.`, empty
/// components, or leading/trailing slashes. Empty means the root itself.
fn normalize_entry_path(raw: &[u8], index: u64, entry: &Path) -> Result<Vec<u8>, UnpackError> {
    if raw.is_empty() {
        return Err(UnpackError::EmptyName { index });
    }
    if raw.contains(&0) {
        return Err(UnpackError::NulInName { entry: entry.to_owned() });
    }
    if raw[0] == b'/' {
        return Err(UnpackError::AbsolutePath { entry: entry.to_owned() });
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err(UnpackError::DotDot { entry: entry.to_owned() }),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

fn split_path(path: &[u8]) -> Vec<&[u8]> {
    if path.is_empty() {
        Vec::new()
    } else {
        path.split(|&b| b == b'/').collect()
    }
}

fn join(comps: &[&[u8]]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(&comps.join(&b'/')))
}

fn bytes_path(b: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(b))
}

/// Whether a relative symlink placed in a directory `depth` levels below the root climbs
/// above the root when read lexically.
fn symlink_escapes(depth: usize, target: &[u8]) -> bool {
    if target.first() == Some(&b'/') {
        return false;
    }
    let mut depth = depth;
    for comp in target.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return true,
            },
            _ => depth += 1,
        }
    }
    false
}

/// Parse a PAX time (`secs[.frac]`, possibly negative).
fn parse_pax_time(v: &[u8]) -> Option<TimeSpec> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut secs: i64 = int.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += i64::from(d - b'0') * 10i64.pow(8 - i as u32);
    }
    if neg {
        secs = -secs;
        if nanos > 0 {
            secs -= 1;
            nanos = 1_000_000_000 - nanos;
        }
    }
    Some(TimeSpec::new(secs, nanos))
}

/// Remove whatever is at `name` in `dir` (a whole tree for a directory). Absent is fine.
fn remove_existing(dir: BorrowedFd<'_>, name: &[u8]) -> Result<(), Fail> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EISDIR) | Err(Errno::EPERM) => {
            let st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(fail("stat"))?;
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                remove_tree(dir, name)
            } else {
                Err(Fail { op: "unlink", errno: Errno::EPERM })
            }
        }
        Err(e) => Err(fail("unlink")(e)),
    }
}

/// A name read from a directory, with its type when the filesystem reports it.
type DirName = (Vec<u8>, Option<DirType>);

/// Read the names in a directory (without `.` and `..`), with their types when known.
fn read_dir_names(dir: OwnedFd) -> Result<Vec<DirName>, Fail> {
    let mut d = Dir::from_fd(dir).map_err(fail("opendir"))?;
    let mut names = Vec::new();
    for e in d.iter() {
        let e = e.map_err(fail("readdir"))?;
        let n = e.file_name().to_bytes();
        if n == b"." || n == b".." {
            continue;
        }
        names.push((n.to_vec(), e.file_type()));
    }
    Ok(names)
}

/// Remove the directory `name` in `dir` and everything below it, never following symlinks.
fn remove_tree(dir: BorrowedFd<'_>, name: &[u8]) -> Result<(), Fail> {
    let fd = match nix::fcntl::openat(dir, name, DIR_FLAGS, Perm::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        // Not a directory (any more): plain unlink.
        Err(Errno::ENOTDIR) | Err(Errno::ELOOP) => {
            return match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => Ok(()),
                Err(e) => Err(fail("unlink")(e)),
            }
        }
        Err(e) => return Err(fail("open directory")(e)),
    };
    let sub = fd
        .try_clone()
        .map_err(|e| Fail { op: "dup", errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)) })?;
    for (child, ty) in read_dir_names(sub)? {
        if ty == Some(DirType::Directory) {
            remove_tree(fd.as_fd(), &child)?;
        } else {
            remove_existing(fd.as_fd(), &child)?;
        }
    }
    drop(fd);
    match unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(fail("rmdir")(e)),
    }
}

/// Create something at `name` in `dir` with `create`; if something is already there,
/// remove it (never following it) and try once more.
fn create_replacing<T>(
    dir: BorrowedFd<'_>,
    name: &[u8],
    op: &'static str,
    mut create: impl FnMut() -> nix::Result<T>,
) -> Result<T, Fail> {
    match create() {
        Ok(t) => Ok(t),
        Err(Errno::EEXIST) => {
            remove_existing(dir, name)?;
            create().map_err(fail(op))
        }
        Err(e) => Err(fail(op)(e)),
    }
}

/// Flatten mode: remove from directory `dir` (at `dir_path`) everything that this layer did
/// not put there, recursing into directories this layer has content in.
fn clear_lower(dir: BorrowedFd<'_>, dir_path: &[u8], layer_paths: &HashSet<Vec<u8>>) -> Result<(), Fail> {
    let own = nix::fcntl::openat(dir, ".", DIR_FLAGS, Perm::empty()).map_err(fail("open"))?;
    let mut child_path = dir_path.to_vec();
    if !child_path.is_empty() {
        child_path.push(b'/');
    }
    let base = child_path.len();
    for (name, ty) in read_dir_names(own)? {
        child_path.truncate(base);
        child_path.extend_from_slice(&name);
        if !layer_paths.contains(&child_path) {
            remove_existing(dir, &name)?;
            continue;
        }
        let is_dir = match ty {
            Some(t) => t == DirType::Directory,
            None => fstatat(dir, name.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
                .map_err(fail("stat"))?,
        };
        if is_dir {
            let sub = nix::fcntl::openat(dir, name.as_slice(), DIR_FLAGS, Perm::empty()).map_err(fail("open"))?;
            clear_lower(sub.as_fd(), &child_path, layer_paths)?;
        }
    }
    Ok(())
}

fn header_err(entry: &Path) -> impl Fn(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Header { entry: entry.to_owned(), source }
}

fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>, name: &Path) -> Result<Meta, UnpackError> {
    let h = entry.header();
    let mode = h.mode().map_err(header_err(name))?;
    let bad_id = || io::Error::new(io::ErrorKind::InvalidData, "uid/gid out of range");
    let uid = u32::try_from(h.uid().map_err(header_err(name))?).map_err(|_| header_err(name)(bad_id()))?;
    let gid = u32::try_from(h.gid().map_err(header_err(name))?).map_err(|_| header_err(name)(bad_id()))?;
    let secs = i64::try_from(h.mtime().map_err(header_err(name))?).unwrap_or(i64::MAX);
    let mut mtime = TimeSpec::new(secs, 0);
    let mut atime = None;
    let mut xattrs = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(header_err(name))? {
        for rec in pax {
            let rec = rec.map_err(header_err(name))?;
            let key = rec.key_bytes();
            if let Some(xname) = key.strip_prefix(PAX_XATTR_PREFIX) {
                xattrs.push((xname.to_vec(), rec.value_bytes().to_vec()));
            } else if key == b"mtime" {
                if let Some(t) = parse_pax_time(rec.value_bytes()) {
                    mtime = t;
                }
            } else if key == b"atime" {
                atime = parse_pax_time(rec.value_bytes());
            }
        }
    }
    Ok(Meta { mode: mode & 0o7777, uid, gid, atime: atime.unwrap_or(mtime), mtime, xattrs })
}

fn is_permission_like(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EOPNOTSUPP))
}

/// Set the entry's xattrs. Overlay metadata from the tar is dropped: whiteouts and opaque
/// directories come only from `.wh.` markers. Namespaces the filesystem or our privileges
/// do not allow are skipped.
fn apply_xattrs(target: XattrTarget<'_>, meta: &Meta, entry: &Path) -> Result<(), UnpackError> {
    for (name, value) in &meta.xattrs {
        if name.is_empty() || name.contains(&0) {
            return Err(UnpackError::Xattr {
                entry: entry.to_owned(),
                name: String::from_utf8_lossy(name).into_owned(),
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        if name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.") {
            tracing::debug!(entry = %entry.display(), xattr = %String::from_utf8_lossy(name),
                "dropping overlayfs xattr from layer");
            continue;
        }
        let os_name = OsStr::from_bytes(name);
        let res = match target {
            XattrTarget::Fd(fd) => xattr::FileExt::set_xattr(&XattrFd(fd), os_name, value),
            XattrTarget::At(dir, child) => {
                // The magic link pins the directory; the last component is not followed.
                let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
                p.push(OsStr::from_bytes(child));
                xattr::set(&p, os_name, value)
            }
        };
        match res {
            Ok(()) => {}
            Err(e) if is_permission_like(&e) => {
                tracing::debug!(entry = %entry.display(), xattr = %String::from_utf8_lossy(name),
                    error = %e, "xattr not permitted here, skipped");
            }
            Err(source) => {
                return Err(UnpackError::Xattr {
                    entry: entry.to_owned(),
                    name: String::from_utf8_lossy(name).into_owned(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// The error for an entry whose parent directory could not be reached.
fn walk_error(entry: &Path, comps: &[&[u8]], e: WalkError) -> UnpackError {
    match e {
        WalkError::Symlink(i) => UnpackError::ParentIsSymlink { entry: entry.to_owned(), parent: join(&comps[..=i]) },
        WalkError::NotDir(i) | WalkError::Missing(i) => {
            UnpackError::ParentNotDirectory { entry: entry.to_owned(), parent: join(&comps[..=i]) }
        }
        WalkError::Io(errno) => Fail { op: "open parent directory", errno }.into_error(entry),
    }
}

impl Unpacker {
    fn owner(&self, meta: &Meta) -> (Option<Uid>, Option<Gid>) {
        (Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)))
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, index: u64) -> Result<(), UnpackError> {
        let raw = entry.path_bytes().into_owned();
        let name = bytes_path(&raw);
        let ty = entry.header().entry_type();
        if ty.is_pax_global_extensions() {
            tracing::debug!(entry = %name.display(), "ignoring PAX global header");
            return Ok(());
        }
        let path = normalize_entry_path(&raw, index, &name)?;
        let comps = split_path(&path);
        self.stats.entries += 1;

        // Whiteouts, by name, whatever their type.
        if let Some(last) = comps.last() {
            if last.starts_with(WHITEOUT_PREFIX) {
                return self.whiteout(entry, &name, &comps);
            }
        }

        let kind = match ty {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                // Old tars mark directories with a trailing slash only.
                if raw.ends_with(b"/") {
                    Kind::Dir
                } else {
                    Kind::File
                }
            }
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = match entry.link_name_bytes() {
                    Some(t) if !t.is_empty() && !t.contains(&0) => t.into_owned(),
                    _ => return Err(UnpackError::BadLinkTarget { entry: name }),
                };
                if ty == tar::EntryType::Symlink {
                    Kind::Symlink(target)
                } else {
                    Kind::Hardlink(target)
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let h = entry.header();
                let major = h.device_major().map_err(header_err(&name))?.unwrap_or(0);
                let minor = h.device_minor().map_err(header_err(&name))?.unwrap_or(0);
                let flag = match ty {
                    tar::EntryType::Char => SFlag::S_IFCHR,
                    tar::EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                if flag != SFlag::S_IFIFO && !self.is_root {
                    return Err(UnpackError::DeviceNeedsRoot { entry: name });
                }
                Kind::Node(flag, major, minor)
            }
            other => return Err(UnpackError::UnsupportedType { entry: name, kind: other.as_byte() }),
        };

        if comps.is_empty() {
            return match kind {
                Kind::Dir => {
                    let meta = read_meta(entry, &name)?;
                    self.root_dir(&name, &meta)
                }
                _ => Err(UnpackError::RootNotDirectory { entry: name }),
            };
        }

        let meta = read_meta(entry, &name)?;
        match kind {
            Kind::File => self.file(entry, &name, &comps, &meta)?,
            Kind::Dir => self.dir(&name, &path, &comps, &meta)?,
            Kind::Symlink(target) => self.symlink(&name, &comps, &target, &meta)?,
            Kind::Hardlink(target) => self.hardlink(&name, &comps, &target)?,
            Kind::Node(flag, major, minor) => {
                self.node(&name, &comps, flag, makedev(major.into(), minor.into()), &meta)?
            }
        }
        if self.mode == Mode::Flatten {
            self.record_layer_path(&path);
        }
        Ok(())
    }

    /// Note `path` and its ancestors as content of this layer.
    fn record_layer_path(&mut self, path: &[u8]) {
        let mut end = path.len();
        loop {
            if !self.layer_paths.insert(path[..end].to_vec()) {
                break;
            }
            match path[..end].iter().rposition(|&b| b == b'/') {
                Some(slash) => end = slash,
                None => break,
            }
        }
    }

    fn whiteout<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &Path,
        comps: &[&[u8]],
    ) -> Result<(), UnpackError> {
        let (last, parent_comps) = comps.split_last().expect("whiteout has a name");
        let opaque = *last == OPAQUE_MARKER;
        if !opaque && last.starts_with(AUFS_META_PREFIX) {
            tracing::debug!(entry = %name.display(), "ignoring aufs metadata entry");
            return Ok(());
        }
        let victim = &last[WHITEOUT_PREFIX.len()..];
        if !opaque && matches!(victim, b"" | b"." | b"..") {
            return Err(UnpackError::BadWhiteout { entry: name.to_owned() });
        }
        self.stats.whiteouts += 1;
        match self.mode {
            Mode::Flatten => {
                let parent = match self.parents.resolve(&self.root, parent_comps, false) {
                    Ok(fd) => fd,
                    Err(WalkError::Missing(_)) | Err(WalkError::NotDir(_)) => {
                        tracing::debug!(entry = %name.display(), "whiteout in a missing directory");
                        return Ok(());
                    }
                    Err(e) => return Err(walk_error(name, comps, e)),
                };
                let parent_path = parent_comps.join(&b'/');
                if opaque {
                    clear_lower(parent, &parent_path, &self.layer_paths).map_err(|f| f.into_error(name))?;
                } else {
                    let mut victim_path = parent_path;
                    if !victim_path.is_empty() {
                        victim_path.push(b'/');
                    }
                    victim_path.extend_from_slice(victim);
                    if self.layer_paths.contains(&victim_path) {
                        tracing::debug!(entry = %name.display(),
                            "whiteout of an entry of the same layer ignored");
                        return Ok(());
                    }
                    remove_existing(parent, victim).map_err(|f| f.into_error(name))?;
                }
                Ok(())
            }
            Mode::Overlay => {
                let meta = read_meta(entry, name)?;
                let owner = self.owner(&meta);
                let parent =
                    self.parents.resolve(&self.root, parent_comps, true).map_err(|e| walk_error(name, comps, e))?;
                if opaque {
                    xattr::FileExt::set_xattr(&XattrFd(parent), OVERLAY_OPAQUE_XATTR, b"y").map_err(|source| {
                        if is_permission_like(&source) {
                            UnpackError::WhiteoutNotPermitted { entry: name.to_owned(), source }
                        } else {
                            UnpackError::Xattr { entry: name.to_owned(), name: OVERLAY_OPAQUE_XATTR.to_owned(), source }
                        }
                    })?;
                    return Ok(());
                }
                create_replacing(parent, victim, "mknod", || {
                    mknodat(parent, victim, SFlag::S_IFCHR, Perm::empty(), makedev(0, 0))
                })
                .map_err(|f| match f.errno {
                    Errno::EPERM => {
                        UnpackError::WhiteoutNotPermitted { entry: name.to_owned(), source: f.errno.into() }
                    }
                    _ => f.into_error(name),
                })?;
                if self.same_owner {
                    fchownat(parent, victim, owner.0, owner.1, AtFlags::AT_SYMLINK_NOFOLLOW)
                        .map_err(|e| fail("chown")(e).into_error(name))?;
                }
                utimensat(parent, victim, &meta.atime, &meta.mtime, UtimensatFlags::NoFollowSymlink)
                    .map_err(|e| fail("set times")(e).into_error(name))?;
                Ok(())
            }
        }
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &Path,
        comps: &[&[u8]],
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        let (last, parent_comps) = comps.split_last().expect("non-root entry");
        let owner = self.owner(meta);
        let parent = self.parents.resolve(&self.root, parent_comps, true).map_err(|e| walk_error(name, comps, e))?;
        // O_EXCL: never write through an existing symlink or into an existing (hard-linked)
        // inode; whatever is there is removed first.
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = create_replacing(parent, last, "create file", || {
            nix::fcntl::openat(parent, *last, flags, Perm::from_bits_truncate(0o600))
        })
        .map_err(|f| f.into_error(name))?;
        let mut file = File::from(fd);
        let mut written = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(UnpackError::Content { entry: name.to_owned(), source }),
            };
            file.write_all(&self.buf[..n]).map_err(|source| UnpackError::Fs {
                entry: name.to_owned(),
                op: "write",
                source,
            })?;
            written += n as u64;
        }
        self.stats.bytes += written;
        // chown clears set-id bits and security.capability, so it goes first.
        if self.same_owner {
            fchown(&file, owner.0, owner.1).map_err(|e| fail("chown")(e).into_error(name))?;
        }
        fchmod(&file, Perm::from_bits_truncate(meta.mode)).map_err(|e| fail("chmod")(e).into_error(name))?;
        apply_xattrs(XattrTarget::Fd(file.as_fd()), meta, name)?;
        futimens(&file, &meta.atime, &meta.mtime).map_err(|e| fail("set times")(e).into_error(name))?;
        Ok(())
    }

    fn dir(&mut self, name: &Path, path: &[u8], comps: &[&[u8]], meta: &Meta) -> Result<(), UnpackError> {
        let (last, parent_comps) = comps.split_last().expect("non-root entry");
        let owner = self.owner(meta);
        let parent = self.parents.resolve(&self.root, parent_comps, true).map_err(|e| walk_error(name, comps, e))?;
        // Owner-only until the end, so that we can always fill it; the real mode is
        // applied in `finish_dirs`.
        let initial = Perm::from_bits_truncate(0o700);
        match mkdirat(parent, *last, initial) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                let st = fstatat(parent, *last, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(|e| fail("stat")(e).into_error(name))?;
                if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    remove_existing(parent, last).map_err(|f| f.into_error(name))?;
                    mkdirat(parent, *last, initial).map_err(|e| fail("mkdir")(e).into_error(name))?;
                }
            }
            Err(e) => return Err(fail("mkdir")(e).into_error(name)),
        }
        let fd = nix::fcntl::openat(parent, *last, DIR_FLAGS, Perm::empty())
            .map_err(|e| fail("open directory")(e).into_error(name))?;
        if self.same_owner {
            fchown(&fd, owner.0, owner.1).map_err(|e| fail("chown")(e).into_error(name))?;
        }
        apply_xattrs(XattrTarget::Fd(fd.as_fd()), meta, name)?;
        self.parents.push(last, fd);
        self.defer_dir(name, path, meta);
        Ok(())
    }

    fn root_dir(&mut self, name: &Path, meta: &Meta) -> Result<(), UnpackError> {
        if self.same_owner {
            let owner = self.owner(meta);
            fchown(&self.root, owner.0, owner.1).map_err(|e| fail("chown")(e).into_error(name))?;
        }
        apply_xattrs(XattrTarget::Fd(self.root.as_fd()), meta, name)?;
        self.defer_dir(name, b"", meta);
        Ok(())
    }

    fn defer_dir(&mut self, name: &Path, path: &[u8], meta: &Meta) {
        let d = DeferredDir {
            path: path.to_vec(),
            entry: name.to_owned(),
            mode: meta.mode,
            atime: meta.atime,
            mtime: meta.mtime,
        };
        match self.dir_index.get(path) {
            Some(&i) => self.dirs[i] = d,
            None => {
                self.dir_index.insert(path.to_vec(), self.dirs.len());
                self.dirs.push(d);
            }
        }
    }

    fn symlink(&mut self, name: &Path, comps: &[&[u8]], target: &[u8], meta: &Meta) -> Result<(), UnpackError> {
        let (last, parent_comps) = comps.split_last().expect("non-root entry");
        if symlink_escapes(parent_comps.len(), target) {
            return Err(UnpackError::SymlinkEscapes { entry: name.to_owned(), target: bytes_path(target) });
        }
        let owner = self.owner(meta);
        let parent = self.parents.resolve(&self.root, parent_comps, true).map_err(|e| walk_error(name, comps, e))?;
        create_replacing(parent, last, "symlink", || symlinkat(OsStr::from_bytes(target), parent, *last))
            .map_err(|f| f.into_error(name))?;
        if self.same_owner {
            fchownat(parent, *last, owner.0, owner.1, AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| fail("chown")(e).into_error(name))?;
        }
        apply_xattrs(XattrTarget::At(parent, last), meta, name)?;
        utimensat(parent, *last, &meta.atime, &meta.mtime, UtimensatFlags::NoFollowSymlink)
            .map_err(|e| fail("set times")(e).into_error(name))?;
        Ok(())
    }

    fn hardlink(&mut self, name: &Path, comps: &[&[u8]], target: &[u8]) -> Result<(), UnpackError> {
        let target_path = bytes_path(target);
        if target[0] == b'/' {
            return Err(UnpackError::HardlinkAbsolute { entry: name.to_owned(), target: target_path });
        }
        // Lexical normalization; `..` may not climb above the root.
        let mut tcomps: Vec<&[u8]> = Vec::new();
        for c in target.split(|&b| b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => {
                    if tcomps.pop().is_none() {
                        return Err(UnpackError::HardlinkEscapes { entry: name.to_owned(), target: target_path });
                    }
                }
                c => tcomps.push(c),
            }
        }
        let Some((tlast, tparent)) = tcomps.split_last() else {
            return Err(UnpackError::BadLinkTarget { entry: name.to_owned() });
        };
        let (last, parent_comps) = comps.split_last().expect("non-root entry");
        let missing = || UnpackError::HardlinkMissing { entry: name.to_owned(), target: bytes_path(target) };

        // The cached fds of this stack may be stale (entries since may have replaced
        // directories), so walk from the root every time.
        self.links.clear();
        let tdir = match self.links.resolve(&self.root, tparent, false) {
            Ok(fd) => fd,
            Err(WalkError::Symlink(i)) => {
                return Err(UnpackError::HardlinkThroughSymlink {
                    entry: name.to_owned(),
                    target: target_path,
                    via: join(&tcomps[..=i]),
                })
            }
            Err(WalkError::Missing(_)) | Err(WalkError::NotDir(_)) => return Err(missing()),
            Err(WalkError::Io(errno)) => return Err(fail("open link target directory")(errno).into_error(name)),
        };
        let st = match fstatat(tdir, *tlast, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Err(missing()),
            Err(e) => return Err(fail("stat link target")(e).into_error(name)),
        };
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            // A hard link to a symlink is a symlink at a new depth: check it again there.
            let lt = nix::fcntl::readlinkat(tdir, *tlast).map_err(|e| fail("readlink")(e).into_error(name))?;
            if symlink_escapes(parent_comps.len(), lt.as_bytes()) {
                return Err(UnpackError::SymlinkEscapes { entry: name.to_owned(), target: PathBuf::from(lt) });
            }
        }
        if tcomps.as_slice() == comps {
            // A link to itself: it exists, nothing to do.
            return Ok(());
        }
        let parent = self.parents.resolve(&self.root, parent_comps, true).map_err(|e| walk_error(name, comps, e))?;
        create_replacing(parent, last, "link", || linkat(tdir, *tlast, parent, *last, AtFlags::empty())).map_err(
            |f| match f.errno {
                Errno::ENOENT => missing(),
                _ => f.into_error(name),
            },
        )?;
        Ok(())
    }

    fn node(
        &mut self,
        name: &Path,
        comps: &[&[u8]],
        flag: SFlag,
        dev: libc::dev_t,
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        let (last, parent_comps) = comps.split_last().expect("non-root entry");
        let owner = self.owner(meta);
        let parent = self.parents.resolve(&self.root, parent_comps, true).map_err(|e| walk_error(name, comps, e))?;
        create_replacing(parent, last, "mknod", || mknodat(parent, *last, flag, Perm::from_bits_truncate(0o600), dev))
            .map_err(|f| f.into_error(name))?;
        if self.same_owner {
            fchownat(parent, *last, owner.0, owner.1, AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| fail("chown")(e).into_error(name))?;
        }
        fchmodat(parent, *last, Perm::from_bits_truncate(meta.mode), FchmodatFlags::NoFollowSymlink)
            .map_err(|e| fail("chmod")(e).into_error(name))?;
        apply_xattrs(XattrTarget::At(parent, last), meta, name)?;
        utimensat(parent, *last, &meta.atime, &meta.mtime, UtimensatFlags::NoFollowSymlink)
            .map_err(|e| fail("set times")(e).into_error(name))?;
        Ok(())
    }

    /// Apply directory modes and times, deepest first, so that filling a directory cannot
    /// disturb its times and a restrictive mode cannot block filling it. Directories removed
    /// or replaced later in the archive are skipped.
    fn finish_dirs(&mut self) -> Result<(), UnpackError> {
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by(|a, b| {
            let depth = |p: &[u8]| {
                if p.is_empty() {
                    0
                } else {
                    1 + p.iter().filter(|&&c| c == b'/').count()
                }
            };
            depth(&b.path).cmp(&depth(&a.path)).then_with(|| a.path.cmp(&b.path))
        });
        let finish_err = |d: &DeferredDir, op: &'static str, e: Errno| UnpackError::FinishDir {
            dir: d.entry.clone(),
            op,
            source: e.into(),
        };
        for d in &dirs {
            let comps = split_path(&d.path);
            let perm = Perm::from_bits_truncate(d.mode);
            let Some((last, parent_comps)) = comps.split_last() else {
                fchmod(&self.root, perm).map_err(|e| finish_err(d, "chmod", e))?;
                futimens(&self.root, &d.atime, &d.mtime).map_err(|e| finish_err(d, "set times", e))?;
                continue;
            };
            let parent = match self.parents.resolve(&self.root, parent_comps, false) {
                Ok(fd) => fd,
                Err(WalkError::Io(e)) => return Err(finish_err(d, "open parent", e)),
                Err(_) => {
                    tracing::debug!(dir = %d.entry.display(), "directory gone, not finished");
                    continue;
                }
            };
            let fd = match nix::fcntl::openat(parent, *last, DIR_FLAGS, Perm::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) | Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => {
                    tracing::debug!(dir = %d.entry.display(), "directory gone, not finished");
                    continue;
                }
                Err(e) => return Err(finish_err(d, "open", e)),
            };
            fchmod(&fd, perm).map_err(|e| finish_err(d, "chmod", e))?;
            futimens(&fd, &d.atime, &d.mtime).map_err(|e| finish_err(d, "set times", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_refuses_paths() {
        let e = Path::new("x");
        assert_eq!(normalize_entry_path(b"./a//b/./c/", 0, e).unwrap(), b"a/b/c");
        assert_eq!(normalize_entry_path(b"./", 0, e).unwrap(), b"");
        assert!(matches!(normalize_entry_path(b"", 3, e), Err(UnpackError::EmptyName { index: 3 })));
        assert!(matches!(normalize_entry_path(b"/etc", 0, e), Err(UnpackError::AbsolutePath { .. })));
        assert!(matches!(normalize_entry_path(b"a/../b", 0, e), Err(UnpackError::DotDot { .. })));
        assert!(matches!(normalize_entry_path(b"a\0b", 0, e), Err(UnpackError::NulInName { .. })));
    }

    #[test]
    fn symlink_escape_is_lexical() {
        assert!(!symlink_escapes(0, b"/bin/busybox"));
        assert!(!symlink_escapes(2, b"../../etc"));
        assert!(symlink_escapes(2, b"../../../etc"));
        assert!(symlink_escapes(0, b".."));
        assert!(!symlink_escapes(0, b"a/../b"));
        assert!(symlink_escapes(1, b"a/../../../b"));
    }

    #[test]
    fn pax_times() {
        let t = parse_pax_time(b"1700000000.25").unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (1_700_000_000, 250_000_000));
        let t = parse_pax_time(b"-1.5").unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (-2, 500_000_000));
        assert!(parse_pax_time(b"12x").is_none());
        assert!(parse_pax_time(b"").is_none());
    }
}

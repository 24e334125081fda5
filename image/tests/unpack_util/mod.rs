//! Helpers shared by the unpack integration tests: a raw tar writer (so that hostile names
//! the `tar` crate's builder refuses can be written), a sandbox with a sentinel outside the
//! unpack target, and a privilege check that fails under CI instead of skipping.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Type flags of the entries we write.
pub const REGULAR: u8 = b'0';
pub const HARDLINK: u8 = b'1';
pub const SYMLINK: u8 = b'2';
pub const CHAR: u8 = b'3';
pub const BLOCK: u8 = b'4';
pub const DIR: u8 = b'5';
pub const FIFO: u8 = b'6';
pub const PAX: u8 = b'x';
pub const GNU_LONGNAME: u8 = b'L';
pub const GNU_LONGLINK: u8 = b'K';

/// One tar header's fields.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: Vec<u8>,
    pub kind: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub link: Vec<u8>,
    pub major: u32,
    pub minor: u32,
    pub data: Vec<u8>,
}

impl Entry {
    pub fn new(name: impl AsRef<[u8]>, kind: u8) -> Self {
        Entry {
            name: name.as_ref().to_vec(),
            kind,
            mode: if kind == DIR { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            link: Vec::new(),
            major: 0,
            minor: 0,
            data: Vec::new(),
        }
    }
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }
    pub fn link(mut self, link: impl AsRef<[u8]>) -> Self {
        self.link = link.as_ref().to_vec();
        self
    }
    pub fn dev(mut self, major: u32, minor: u32) -> Self {
        self.major = major;
        self.minor = minor;
        self
    }
    pub fn data(mut self, data: impl AsRef<[u8]>) -> Self {
        self.data = data.as_ref().to_vec();
        self
    }
}

/// Write `value` as zero-padded octal filling `field` but its last byte (a NUL).
fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let s = format!("{value:0width$o}");
    assert!(s.len() <= width, "{value} does not fit in {width} octal digits");
    field[..width].copy_from_slice(s.as_bytes());
    field[width] = 0;
}

/// A 512-byte ustar header, checksum included, with the name bytes copied verbatim.
pub fn header(e: &Entry) -> [u8; 512] {
    assert!(e.name.len() <= 100, "use a PAX or GNU long name for long names");
    assert!(e.link.len() <= 100, "use a PAX or GNU long link for long links");
    let mut h = [0u8; 512];
    h[..e.name.len()].copy_from_slice(&e.name);
    octal(&mut h[100..108], u64::from(e.mode));
    octal(&mut h[108..116], e.uid);
    octal(&mut h[116..124], e.gid);
    octal(&mut h[124..136], e.data.len() as u64);
    octal(&mut h[136..148], e.mtime);
    h[156] = e.kind;
    h[157..157 + e.link.len()].copy_from_slice(&e.link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    octal(&mut h[329..337], u64::from(e.major));
    octal(&mut h[337..345], u64::from(e.minor));
    // Checksum: byte sum with the checksum field counted as eight spaces.
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// A tar stream written block by block.
#[derive(Default)]
pub struct RawTar {
    buf: Vec<u8>,
}

impl RawTar {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, e: Entry) -> &mut Self {
        self.buf.extend_from_slice(&header(&e));
        self.buf.extend_from_slice(&e.data);
        let pad = (512 - e.data.len() % 512) % 512;
        self.buf.resize(self.buf.len() + pad, 0);
        self
    }

    pub fn file(&mut self, name: impl AsRef<[u8]>, data: impl AsRef<[u8]>) -> &mut Self {
        self.push(Entry::new(name, REGULAR).data(data))
    }

    pub fn dir(&mut self, name: impl AsRef<[u8]>) -> &mut Self {
        self.push(Entry::new(name, DIR))
    }

    pub fn symlink(&mut self, name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> &mut Self {
        self.push(Entry::new(name, SYMLINK).mode(0o777).link(target))
    }

    pub fn hardlink(&mut self, name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> &mut Self {
        self.push(Entry::new(name, HARDLINK).link(target))
    }

    /// A PAX extended header for the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (key, value) in records {
            // "LEN KEY=VALUE\n", where LEN counts itself.
            let body = key.len() + value.len() + 3;
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        self.push(Entry::new("./PaxHeaders/x", PAX).data(data))
    }

    /// A GNU long-name header for the next entry.
    pub fn gnu_longname(&mut self, name: impl AsRef<[u8]>) -> &mut Self {
        let mut data = name.as_ref().to_vec();
        data.push(0);
        self.push(Entry::new("././@LongLink", GNU_LONGNAME).data(data))
    }

    /// A GNU long-link header for the next entry.
    pub fn gnu_longlink(&mut self, link: impl AsRef<[u8]>) -> &mut Self {
        let mut data = link.as_ref().to_vec();
        data.push(0);
        self.push(Entry::new("././@LongLink", GNU_LONGLINK).data(data))
    }

    pub fn finish(&self) -> Vec<u8> {
        let mut out = self.buf.clone();
        out.resize(out.len() + 1024, 0);
        out
    }
}

/// `sandbox/root` is the unpack target; `sandbox/outside` holds things a hostile tar
/// must not reach.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub outside: PathBuf,
}

pub const SENTINEL: &[u8] = b"sentinel content\n";

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("unpack-sandbox-").tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::create_dir(outside.join("dir")).unwrap();
        fs::write(outside.join("sentinel"), SENTINEL).unwrap();
        fs::set_permissions(outside.join("sentinel"), fs::Permissions::from_mode(0o640)).unwrap();
        fs::write(outside.join("dir/inner"), b"inner\n").unwrap();
        Sandbox { dir, root, outside }
    }

    /// Absolute path of something outside the target, as bytes for a tar header.
    pub fn outside_abs(&self, rel: &str) -> Vec<u8> {
        let p = if rel.is_empty() { self.outside.clone() } else { self.outside.join(rel) };
        p.into_os_string().into_encoded_bytes()
    }

    /// Everything in the sandbox but the target's content: type, mode, owner, size, ctime
    /// (which any change to an inode bumps), mtime, and content or link target.
    pub fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        for e in walkdir::WalkDir::new(self.dir.path()).follow_links(false) {
            let e = e.unwrap();
            let p = e.path();
            if p.starts_with(&self.root) && p != self.root {
                continue;
            }
            let m = fs::symlink_metadata(p).unwrap();
            let content = if m.file_type().is_symlink() {
                format!("-> {:?}", fs::read_link(p).unwrap())
            } else if m.is_file() {
                format!("{:?}", fs::read(p).unwrap())
            } else {
                String::new()
            };
            // The target itself may legitimately change (a `./` entry sets its metadata).
            let meta = if p == self.root {
                String::from("target")
            } else {
                format!(
                    "mode={:o} uid={} gid={} size={} ctime={}.{} mtime={}.{} nlink={}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.size(),
                    m.ctime(),
                    m.ctime_nsec(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.nlink()
                )
            };
            out.insert(p.to_owned(), format!("{meta} {content}"));
        }
        out
    }

    /// Panic with a diff if anything outside the target differs from `before`.
    pub fn assert_outside_unchanged(&self, before: &BTreeMap<PathBuf, String>, case: &str) {
        let after = self.snapshot();
        if &after != before {
            let mut diff = String::new();
            for (p, v) in before {
                match after.get(p) {
                    None => diff += &format!("  removed {}\n", p.display()),
                    Some(w) if w != v => diff += &format!("  changed {}\n    {v}\n    {w}\n", p.display()),
                    _ => {}
                }
            }
            for p in after.keys().filter(|p| !before.contains_key(*p)) {
                diff += &format!("  created {}\n", p.display());
            }
            panic!("case {case}: the sandbox outside the target changed:\n{diff}");
        }
        assert_eq!(fs::read(self.outside.join("sentinel")).unwrap(), SENTINEL);
        let mode = fs::metadata(self.outside.join("sentinel")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o640, "case {case}: sentinel mode changed");
    }
}

/// Whether the test may use root. Without root, print why the test is skipped; under
/// `CI=true` a missing privilege is a failure, not a skip.
pub fn have_root(test: &str) -> bool {
    twinbox_testutil::require_root(test, "unpack as the layers' owners")
}

/// Whether `dir`'s filesystem accepts `user.*` xattrs.
pub fn user_xattrs_supported(dir: &Path) -> bool {
    let probe = dir.join(".xattr-probe");
    fs::write(&probe, b"").unwrap();
    let ok = xattr::set(&probe, "user.probe", b"1").is_ok();
    fs::remove_file(&probe).unwrap();
    ok
}

//! The microVM's initramfs: the guest agent as `/init`, its configuration, and the few
//! directories and device nodes it needs, as an uncompressed newc cpio archive (the format the
//! kernel unpacks into its rootfs).
//!
//! ```text
//! /dev  /dev/console (c 5 1)  /proc  /sys  /mnt  /tmp  /twinbox
//! /twinbox/config.json        GuestConfig, read by the agent
//! /init                       the agent (static x86_64 ELF, built by build.rs)
//! ```

use twinbox_agent::{GuestConfig, CONFIG_PATH};

/// The guest agent, a static x86_64 Linux executable (see `build.rs`).
pub const AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/twinbox-agent"));

/// newc's magic (no checksums).
const MAGIC: &[u8; 6] = b"070701";
/// The name that ends an archive.
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// An entry the writer cannot encode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpioError {
    /// The name is empty, absolute, has a NUL, or a "." or ".." component.
    #[error("{0:?} is not a relative path of normal components")]
    Name(String),
    /// Data over newc's 32-bit size field.
    #[error("{name}: {len} bytes do not fit a newc entry (4 GiB at most)")]
    TooLarge {
        /// The entry.
        name: String,
        /// Its size.
        len: usize,
    },
    /// Mode bits beyond the permission bits (type bits are the writer's business).
    #[error("{name}: mode {mode:#o} has bits beyond 0o7777")]
    Mode {
        /// The entry.
        name: String,
        /// The mode asked for.
        mode: u32,
    },
}

/// Writes a newc ("070701") cpio archive into memory: owner root, mtime 0, one inode per entry.
/// Parents must be added before their children, as the kernel creates entries in order.
#[derive(Debug)]
pub struct CpioWriter {
    out: Vec<u8>,
    next_ino: u32,
}

impl Default for CpioWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl CpioWriter {
    /// An empty archive.
    pub fn new() -> Self {
        CpioWriter { out: Vec::new(), next_ino: 1 }
    }

    /// A directory.
    pub fn dir(&mut self, name: &str, mode: u32) -> Result<&mut Self, CpioError> {
        self.entry(name, S_IFDIR, mode, 2, (0, 0), b"")
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<&mut Self, CpioError> {
        self.entry(name, S_IFREG, mode, 1, (0, 0), data)
    }

    /// A character device node.
    pub fn char_device(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> Result<&mut Self, CpioError> {
        self.entry(name, S_IFCHR, mode, 1, (major, minor), b"")
    }

    /// A symbolic link to `target` (stored as the entry's data, mode 0777).
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<&mut Self, CpioError> {
        if target.is_empty() || target.contains('\0') {
            return Err(CpioError::Name(target.to_string()));
        }
        self.entry(name, S_IFLNK, 0o777, 1, (0, 0), target.as_bytes())
    }

    /// The archive, with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.header(0, 0, 1, 0, (0, 0), TRAILER);
        self.out
    }

    fn entry(
        &mut self,
        name: &str,
        kind: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<&mut Self, CpioError> {
        check_name(name)?;
        if mode & !0o7777 != 0 {
            return Err(CpioError::Mode { name: name.to_string(), mode });
        }
        let len =
            u32::try_from(data.len()).map_err(|_| CpioError::TooLarge { name: name.to_string(), len: data.len() })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(ino, kind | mode, nlink, len, rdev, name);
        self.out.extend_from_slice(data);
        self.pad();
        Ok(self)
    }

    /// The 110-byte header, then the NUL-terminated name, padded to 4 bytes.
    fn header(&mut self, ino: u32, mode: u32, nlink: u32, filesize: u32, rdev: (u32, u32), name: &str) {
        let namesize = name.len() as u32 + 1;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rdev.0, rdev.1, namesize, 0];
        self.out.extend_from_slice(MAGIC);
        for field in fields {
            self.out.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        let padded = self.out.len().next_multiple_of(4);
        self.out.resize(padded, 0);
    }
}

fn check_name(name: &str) -> Result<(), CpioError> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name.contains('\0')
        || name.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        Err(CpioError::Name(name.to_string()))
    } else {
        Ok(())
    }
}

/// The initramfs that runs `config` (see the module documentation), uncompressed.
pub fn build(config: &GuestConfig) -> Vec<u8> {
    let config_name = CONFIG_PATH.trim_start_matches('/');
    let mut cpio = CpioWriter::new();
    // The names and modes are constants that the writer accepts, and the configuration and
    // the agent are far below 4 GiB.
    (|| -> Result<(), CpioError> {
        cpio.dir("dev", 0o755)?
            .char_device("dev/console", 0o600, 5, 1)?
            .dir("proc", 0o555)?
            .dir("sys", 0o555)?
            .dir("mnt", 0o755)?
            .dir("tmp", 0o1777)?
            .dir("twinbox", 0o755)?
            .file(config_name, 0o644, config.to_json().as_bytes())?
            .file("init", 0o755, AGENT)?;
        Ok(())
    })()
    .expect("the initramfs layout is valid");
    cpio.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::process::{Command, Stdio};

    /// Runs `cpio ARGS` with `archive` on stdin; `None` (after saying why) when cpio is not
    /// installed, which CI must not accept.
    fn cpio(args: &[&str], dir: &std::path::Path, archive: &[u8]) -> Option<(String, String)> {
        use std::io::Write;
        let child = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                twinbox_testutil::require(false, "initramfs", "cpio is not installed");
                return None;
            }
            Err(e) => panic!("cannot run cpio: {e}"),
        };
        child.stdin.take().unwrap().write_all(archive).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "cpio {args:?} failed: {stderr}");
        Some((String::from_utf8_lossy(&out.stdout).into_owned(), stderr))
    }

    fn is_root() -> bool {
        // SAFETY: geteuid cannot fail and touches no memory.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn generic_entries_extract_with_their_modes() {
        let mut w = CpioWriter::new();
        w.dir("a", 0o750).unwrap().dir("a/b", 0o700).unwrap();
        w.file("a/b/odd-length name.txt", 0o640, b"hello, cpio").unwrap();
        w.file("a/empty", 0o600, b"").unwrap();
        w.symlink("a/link", "b/odd-length name.txt").unwrap();
        w.char_device("a/null", 0o666, 1, 3).unwrap();
        let archive = w.finish();
        assert_eq!(archive.len() % 4, 0);

        let tmp = tempfile::tempdir().unwrap();
        let Some((listing, _)) = cpio(&["-itv"], tmp.path(), &archive) else { return };
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 6, "{listing}");
        assert!(lines[0].starts_with("drwxr-x---") && lines[0].ends_with(" a"), "{listing}");
        assert!(lines[2].starts_with("-rw-r-----") && lines[2].contains(" 11 "), "{listing}");
        assert!(lines[4].starts_with("lrwxrwxrwx") && lines[4].ends_with("a/link -> b/odd-length name.txt"));
        assert!(lines[5].starts_with("crw-rw-rw-") && lines[5].contains("1,   3"), "{listing}");

        if !is_root() {
            eprintln!("not root: extracting everything but the device node");
        }
        let args: &[&str] = if is_root() { &["-idv"] } else { &["-idv", "--nonmatching", "a/null"] };
        cpio(args, tmp.path(), &archive).unwrap();
        let root = tmp.path();
        let mode = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(std::fs::read(root.join("a/b/odd-length name.txt")).unwrap(), b"hello, cpio");
        assert_eq!(std::fs::read(root.join("a/empty")).unwrap(), b"");
        assert_eq!(std::fs::read_link(root.join("a/link")).unwrap().to_str(), Some("b/odd-length name.txt"));
        assert_eq!((mode("a/b/odd-length name.txt"), mode("a/empty")), (0o640, 0o600));
        // cpio applies the directory modes after writing their contents.
        assert_eq!((mode("a"), mode("a/b")), (0o750, 0o700));
        if is_root() {
            let meta = std::fs::symlink_metadata(root.join("a/null")).unwrap();
            assert!(meta.file_type().is_char_device());
            assert_eq!((libc::major(meta.rdev()), libc::minor(meta.rdev())), (1, 3));
        }
    }

    #[test]
    fn header_fields_are_newc() {
        let mut w = CpioWriter::new();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        let archive = w.finish();
        let field =
            |i: usize| u32::from_str_radix(std::str::from_utf8(&archive[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap();
        assert_eq!(&archive[..6], b"070701");
        assert_eq!(field(1), 0o020600, "mode: S_IFCHR | 0600");
        assert_eq!((field(9), field(10)), (5, 1), "rdev");
        assert_eq!(field(11), 12, "namesize counts the NUL");
        assert_eq!(&archive[110..122], b"dev/console\0");
        // 110 + 12 = 122, padded to 124; then the trailer.
        assert_eq!(&archive[124..130], b"070701");
        assert_eq!(&archive[124 + 110..124 + 121], b"TRAILER!!!\0");
        assert_eq!(archive.len(), 124 + 110 + 11 + 3);
    }

    #[test]
    fn bad_names_and_modes_are_refused() {
        let mut w = CpioWriter::new();
        for name in ["", "/abs", "a//b", "a/../b", "./a", "a/", "nul\0"] {
            assert_eq!(w.dir(name, 0o755).unwrap_err(), CpioError::Name(name.to_string()));
        }
        assert!(matches!(w.file("f", 0o100644, b""), Err(CpioError::Mode { .. })));
        assert!(matches!(w.symlink("l", ""), Err(CpioError::Name(_))));
        assert_eq!(w.finish().len(), 124, "nothing but the trailer was written");
    }

    #[test]
    fn the_initramfs_holds_the_agent_and_its_config() {
        let config = GuestConfig { args: vec!["/hello".into()], hostname: "vm".into(), ..GuestConfig::default() };
        let archive = build(&config);
        let tmp = tempfile::tempdir().unwrap();
        let Some((listing, _)) = cpio(&["-itv"], tmp.path(), &archive) else { return };
        let names: Vec<&str> = listing.lines().map(|l| l.rsplit(' ').next().unwrap()).collect();
        assert_eq!(
            names,
            ["dev", "dev/console", "proc", "sys", "mnt", "tmp", "twinbox", "twinbox/config.json", "init"]
        );
        let console = listing.lines().nth(1).unwrap();
        assert!(console.starts_with("crw-------") && console.contains("5,   1"), "{console}");
        assert!(listing.lines().nth(5).unwrap().starts_with("drwxrwxrwt"), "{listing}");

        let args: &[&str] = if is_root() { &["-id"] } else { &["-id", "--nonmatching", "dev/console"] };
        cpio(args, tmp.path(), &archive).unwrap();
        let root = tmp.path();
        let json = std::fs::read(root.join("twinbox/config.json")).unwrap();
        assert_eq!(GuestConfig::from_json(json).unwrap(), config);
        let init = std::fs::metadata(root.join("init")).unwrap();
        assert_eq!(init.permissions().mode() & 0o7777, 0o755);
        assert_eq!(std::fs::read(root.join("init")).unwrap(), AGENT);
        if is_root() {
            let meta = std::fs::symlink_metadata(root.join("dev/console")).unwrap();
            assert!(meta.file_type().is_char_device());
            assert_eq!((libc::major(meta.rdev()), libc::minor(meta.rdev())), (5, 1));
        }
    }

    /// Program header types of a 64-bit little-endian ELF (a second, independent reading of
    /// what build.rs checks).
    fn program_headers(elf: &[u8]) -> Vec<u32> {
        let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
        let phentsize = u16::from_le_bytes([elf[0x36], elf[0x37]]) as usize;
        let phnum = u16::from_le_bytes([elf[0x38], elf[0x39]]) as usize;
        (0..phnum)
            .map(|i| phoff + i * phentsize)
            .map(|at| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()))
            .collect()
    }

    #[test]
    fn the_agent_is_a_static_x86_64_executable() {
        assert_eq!(&AGENT[..4], b"\x7fELF");
        assert_eq!((AGENT[4], AGENT[5]), (2, 1), "ELF64, little-endian");
        assert_eq!(u16::from_le_bytes([AGENT[0x12], AGENT[0x13]]), 62, "EM_X86_64");
        let kind = u16::from_le_bytes([AGENT[0x10], AGENT[0x11]]);
        assert!(kind == 2 || kind == 3, "ET_EXEC or ET_DYN (static-pie), got {kind}");
        let headers = program_headers(AGENT);
        assert!(headers.contains(&1), "has PT_LOAD segments");
        assert!(!headers.contains(&3), "no PT_INTERP: it needs no loader");
    }

    #[test]
    fn the_agent_refuses_to_run_outside_a_vm() {
        // Not pid 1: it must say so and stop before touching any mount of this system.
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("twinbox-agent");
        std::fs::write(&path, AGENT).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = Command::new(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(125));
        assert!(String::from_utf8_lossy(&out.stderr).contains("not pid 1"), "{out:?}");
    }
}

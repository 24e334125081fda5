//! A corpus of hostile layer tarballs. Each is unpacked into `sandbox/root`; each must be
//! refused with an error naming the offending entry (or, for the few "not refused but safe"
//! cases, unpacked without touching anything it must not), and nothing anywhere in the
//! sandbox outside `sandbox/root` may appear, disappear or change.

mod unpack_util;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use twinbox_image::unpack::{unpack, Mode, UnpackError, UnpackOptions};
use unpack_util::*;

/// What a case must lead to.
enum Expect {
    /// Refused with an error about `entry` (`None`: the entry has no name to give), of the
    /// kind `is_kind` accepts.
    Refused { entry: Option<PathBuf>, is_kind: fn(&UnpackError) -> bool },
    /// Not refused; `check` asserts the result inside the target is the safe one.
    Safe(fn(&Sandbox)),
}

struct Case {
    name: &'static str,
    mode: Mode,
    /// A trusted lower layer unpacked before the hostile one (Flatten mode only).
    lower: Option<fn(&Sandbox) -> Vec<u8>>,
    build: fn(&Sandbox) -> (Vec<u8>, Expect),
}

fn refused(entry: impl AsRef<[u8]>, is_kind: fn(&UnpackError) -> bool) -> Expect {
    use std::os::unix::ffi::OsStrExt;
    Expect::Refused { entry: Some(PathBuf::from(std::ffi::OsStr::from_bytes(entry.as_ref()))), is_kind }
}

fn parent_symlink(e: &UnpackError) -> bool {
    matches!(e, UnpackError::ParentIsSymlink { .. })
}

fn dot_dot(e: &UnpackError) -> bool {
    matches!(e, UnpackError::DotDot { .. })
}

fn cases() -> Vec<Case> {
    let flat = Mode::Flatten;
    vec![
        Case {
            name: "absolute path",
            mode: flat,
            lower: None,
            build: |s| {
                let name = s.outside_abs("evil");
                let tar = RawTar::new().file(&name, "pwned").finish();
                (tar, refused(&name, |e| matches!(e, UnpackError::AbsolutePath { .. })))
            },
        },
        Case {
            name: "absolute path to an existing file",
            mode: flat,
            lower: None,
            build: |s| {
                let name = s.outside_abs("sentinel");
                let tar = RawTar::new().file(&name, "pwned").finish();
                (tar, refused(&name, |e| matches!(e, UnpackError::AbsolutePath { .. })))
            },
        },
        Case {
            name: ".. at start",
            mode: flat,
            lower: None,
            build: |_| {
                let tar = RawTar::new().file("../outside/evil", "pwned").finish();
                (tar, refused("../outside/evil", dot_dot))
            },
        },
        Case {
            name: ".. in the middle",
            mode: flat,
            lower: None,
            build: |_| {
                let tar = RawTar::new().dir("a/").file("a/../../outside/sentinel", "pwned").finish();
                (tar, refused("a/../../outside/sentinel", dot_dot))
            },
        },
        Case {
            name: ".. at the end (file)",
            mode: flat,
            lower: None,
            build: |_| {
                let tar = RawTar::new().dir("a/").file("a/..", "pwned").finish();
                (tar, refused("a/..", dot_dot))
            },
        },
        Case {
            name: ".. at the end (directory)",
            mode: flat,
            lower: None,
            build: |_| {
                let tar = RawTar::new().push(Entry::new("x/../..", DIR).mode(0o777)).finish();
                (tar, refused("x/../..", dot_dot))
            },
        },
        Case {
            name: "symlink (absolute) then write through it",
            mode: flat,
            lower: None,
            build: |s| {
                let tar = RawTar::new().symlink("l", s.outside_abs("")).file("l/evil", "pwned").finish();
                (tar, refused("l/evil", parent_symlink))
            },
        },
        Case {
            name: "symlink (relative, in-root) then write through it",
            mode: flat,
            lower: None,
            build: |_| {
                let tar = RawTar::new().dir("d/").symlink("l", "d").file("l/evil", "pwned").finish();
                (tar, refused("l/evil", parent_symlink))
            },
        },
        Case {
            name: "directory replaced by a symlink mid-archive",
            mode: flat,
            lower: None,
            build: |s| {
                let tar = RawTar::new()
                    .dir("a/")
                    .file("a/ok", "fine")
                    .symlink("a", s.outside_abs(""))
                    .file("a/sentinel", "pwned")
                    .finish();
                (tar, refused("a/sentinel", parent_symlink))
            },
        },
        Case {
            name: "nested directory replaced by a symlink, then a file into it",
            mode: flat,
            lower: None,
            build: |s| {
                let tar = RawTar::new()
                    .dir("d/")
                    .dir("d/sub/")
                    .file("d/sub/ok", "fine")
                    .symlink("d/sub", s.outside_abs("dir"))
                    .file("d/sub/inner", "pwned")
                    .finish();
                (tar, refused("d/sub/inner", parent_symlink))
            },
        },
        Case {
            name: "directory replaced by a symlink, then a directory into it",
            mode: flat,
            lower: None,
            build: |s| {
                let tar = RawTar::new()
                    .dir("a/")
                    .symlink("a", s.outside_abs(""))
                    .push(Entry::new("a/newdir/", DIR).mode(0o777))
                    .finish();
                (tar, refused("a/newdir/", parent_symlink))
            },
        },
        Case {
            name: "hardlink to an absolute path",
            mode: flat,
            lower: None,
            build: |s| {
                let tar = RawTar::new().hardlink("h", s.outside_abs("sentinel")).finish();
                (tar, refused("h", |e| matches!(e, UnpackError::HardlinkAbsolute { .. })))
            },
        },
        Case {
            name: "hardlink with .. above the root",
            mode: flat,
            lower: None,
            build: |_| {
                let tar = RawTar::new().dir("a/").hardlink("a/h", "a/../../outside/sentinel").finish();
                (tar, refused("a/h", |e| matches!(e, UnpackError::HardlinkEscapes { .. })))
            },
        },
        Case {
            name: "hardlink through a symlinked directory",
            mode: flat,
            lower: None,
            build: |s| {
                let tar = RawTar::new().symlink("l", s.outside_abs("")).hardlink("h", "l/sentinel").finish();
                (
                    tar,
                    refused(
                        "h",
                        |e| matches!(e, UnpackError::HardlinkThroughSymlink { via, .. } if via == Path::new("l")),
                    ),
                )
            },
        },
        Case {
            name: "hardlink to a symlink that escapes at the link's depth",
            mode: flat,
            lower: None,
            build: |_| {
                // `a/b/s -> ../../outside` stays inside from a/b; a hard link `h` at the root
                // is the same symlink one level up, where it would climb out.
                let tar = RawTar::new()
                    .dir("a/")
                    .dir("a/b/")
                    .symlink("a/b/s", "../../outside")
                    .hardlink("h", "a/b/s")
                    .finish();
                (tar, refused("h", |e| matches!(e, UnpackError::SymlinkEscapes { .. })))
            },
        },
        Case {
            name: "relative symlink escaping the root",
            mode: flat,
            lower: None,
            build: |_| {
                let tar = RawTar::new().dir("x/").symlink("x/y", "../../outside/sentinel").finish();
                (tar, refused("x/y", |e| matches!(e, UnpackError::SymlinkEscapes { .. })))
            },
        },
        Case {
            name: "chained symlinks then write through",
            mode: flat,
            lower: None,
            build: |s| {
                let tar = RawTar::new()
                    .symlink("l1", s.outside_abs(""))
                    .symlink("l2", "l1")
                    .dir("l3/")
                    .symlink("l3/l4", "../l2")
                    .file("l3/l4/evil", "pwned")
                    .finish();
                (tar, refused("l3/l4/evil", parent_symlink))
            },
        },
        Case {
            name: "whiteout with ..",
            mode: flat,
            lower: None,
            build: |_| {
                let tar = RawTar::new().file("../outside/.wh.sentinel", "").finish();
                (tar, refused("../outside/.wh.sentinel", dot_dot))
            },
        },
        Case {
            name: "whiteout of .. (.wh...)",
            mode: flat,
            lower: Some(|_| RawTar::new().dir("d/").file("d/f", "x").finish()),
            build: |_| {
                let tar = RawTar::new().file("d/.wh...", "").finish();
                (tar, refused("d/.wh...", |e| matches!(e, UnpackError::BadWhiteout { .. })))
            },
        },
        Case {
            name: "whiteout of . (.wh..)",
            mode: flat,
            lower: Some(|_| RawTar::new().dir("d/").file("d/f", "x").finish()),
            build: |_| {
                let tar = RawTar::new().file("d/.wh..", "").finish();
                (tar, refused("d/.wh..", |e| matches!(e, UnpackError::BadWhiteout { .. })))
            },
        },
        Case {
            name: "whiteout through a symlinked parent",
            mode: flat,
            lower: None,
            build: |s| {
                let tar = RawTar::new().symlink("l", s.outside_abs("")).file("l/.wh.sentinel", "").finish();
                (tar, refused("l/.wh.sentinel", parent_symlink))
            },
        },
        Case {
            name: "opaque marker under a symlinked parent (flatten)",
            mode: flat,
            lower: None,
            build: |s| {
                let tar = RawTar::new().symlink("l", s.outside_abs("")).file("l/.wh..wh..opq", "").finish();
                (tar, refused("l/.wh..wh..opq", parent_symlink))
            },
        },
        Case {
            name: "opaque marker under a symlinked parent (overlay)",
            mode: Mode::Overlay,
            lower: None,
            build: |s| {
                let tar = RawTar::new().symlink("l", s.outside_abs("dir")).file("l/.wh..wh..opq", "").finish();
                (tar, refused("l/.wh..wh..opq", parent_symlink))
            },
        },
        Case {
            name: "overlay whiteout device through a symlinked parent",
            mode: Mode::Overlay,
            lower: None,
            build: |s| {
                let tar = RawTar::new().symlink("l", s.outside_abs("")).file("l/.wh.sentinel", "").finish();
                (tar, refused("l/.wh.sentinel", parent_symlink))
            },
        },
        Case {
            name: "symlink planted by a lower layer, written through by this one",
            mode: flat,
            lower: Some(|s| RawTar::new().symlink("var", s.outside_abs("")).finish()),
            build: |_| {
                let tar = RawTar::new().file("var/sentinel", "pwned").finish();
                (tar, refused("var/sentinel", parent_symlink))
            },
        },
        Case {
            name: "PAX path with ..",
            mode: flat,
            lower: None,
            build: |_| {
                let tar = RawTar::new().pax(&[("path", b"../outside/sentinel")]).file("innocent", "pwned").finish();
                (tar, refused("../outside/sentinel", dot_dot))
            },
        },
        Case {
            name: "PAX path that is absolute",
            mode: flat,
            lower: None,
            build: |s| {
                let name = s.outside_abs("evil");
                let tar = RawTar::new().pax(&[("path", name.as_slice())]).file("innocent", "pwned").finish();
                (tar, refused(&name, |e| matches!(e, UnpackError::AbsolutePath { .. })))
            },
        },
        Case {
            name: "PAX path with a NUL byte",
            mode: flat,
            lower: None,
            build: |_| {
                let tar = RawTar::new().pax(&[("path", b"ok\0/../../outside/evil")]).file("innocent", "pwned").finish();
                (tar, refused(b"ok\0/../../outside/evil", |e| matches!(e, UnpackError::NulInName { .. })))
            },
        },
        Case {
            name: "PAX linkpath of a hardlink with ..",
            mode: flat,
            lower: None,
            build: |_| {
                let tar = RawTar::new().pax(&[("linkpath", b"../outside/sentinel")]).hardlink("h", "innocent").finish();
                (tar, refused("h", |e| matches!(e, UnpackError::HardlinkEscapes { .. })))
            },
        },
        Case {
            name: "GNU long name with ..",
            mode: flat,
            lower: None,
            build: |_| {
                let long = format!("{}/../../../outside/evil", "d/".repeat(60));
                let tar = RawTar::new().gnu_longname(&long).file("innocent", "pwned").finish();
                (tar, refused(&long, dot_dot))
            },
        },
        Case {
            name: "GNU long link name escaping (symlink)",
            mode: flat,
            lower: None,
            build: |_| {
                let long = format!("{}outside/sentinel", "../".repeat(40));
                let tar = RawTar::new().gnu_longlink(&long).symlink("s", "innocent").finish();
                (tar, refused("s", |e| matches!(e, UnpackError::SymlinkEscapes { .. })))
            },
        },
        Case {
            name: "empty name",
            mode: flat,
            lower: None,
            build: |_| {
                let tar = RawTar::new().file("", "pwned").finish();
                (tar, Expect::Refused { entry: None, is_kind: |e| matches!(e, UnpackError::EmptyName { index: 0 }) })
            },
        },
        Case {
            name: "file below a regular file",
            mode: flat,
            lower: None,
            build: |_| {
                let tar = RawTar::new().file("f", "x").file("f/evil", "pwned").finish();
                (tar, refused("f/evil", |e| matches!(e, UnpackError::ParentNotDirectory { .. })))
            },
        },
        Case {
            name: "file named like an existing symlink (absolute target)",
            mode: flat,
            lower: None,
            build: |s| {
                let tar = RawTar::new()
                    .symlink("s", s.outside_abs("sentinel"))
                    .push(Entry::new("s", REGULAR).mode(0o777).data("replaced"))
                    .finish();
                (
                    tar,
                    Expect::Safe(|s| {
                        let p = s.root.join("s");
                        let m = fs::symlink_metadata(&p).unwrap();
                        assert!(m.is_file(), "the symlink was not replaced by a file");
                        assert_eq!(fs::read(&p).unwrap(), b"replaced");
                        assert_eq!(m.mode() & 0o7777, 0o777);
                    }),
                )
            },
        },
        Case {
            name: "file named like a relative in-root symlink to a lower file",
            mode: flat,
            lower: Some(|_| RawTar::new().file("target", "lower").symlink("s", "target").finish()),
            build: |_| {
                let tar = RawTar::new().file("s", "replaced").finish();
                (
                    tar,
                    Expect::Safe(|s| {
                        assert_eq!(fs::read(s.root.join("target")).unwrap(), b"lower");
                        assert!(fs::symlink_metadata(s.root.join("s")).unwrap().is_file());
                    }),
                )
            },
        },
        Case {
            name: "file named like a hard link of a lower file",
            mode: flat,
            lower: Some(|_| RawTar::new().file("a", "lower").hardlink("b", "a").finish()),
            build: |_| {
                let tar = RawTar::new().file("b", "replaced").finish();
                (
                    tar,
                    Expect::Safe(|s| {
                        assert_eq!(fs::read(s.root.join("a")).unwrap(), b"lower");
                        assert_eq!(fs::read(s.root.join("b")).unwrap(), b"replaced");
                    }),
                )
            },
        },
        Case {
            name: "directory entry named like a symlink to outside",
            mode: flat,
            lower: None,
            build: |s| {
                let tar =
                    RawTar::new().symlink("d", s.outside_abs("dir")).push(Entry::new("d/", DIR).mode(0o777)).finish();
                (
                    tar,
                    Expect::Safe(|s| {
                        let m = fs::symlink_metadata(s.root.join("d")).unwrap();
                        assert!(m.is_dir(), "the symlink was not replaced by a directory");
                        assert_eq!(m.mode() & 0o7777, 0o777);
                    }),
                )
            },
        },
        Case {
            name: "absolute symlink followed by a whiteout of it",
            mode: flat,
            lower: Some(|s| RawTar::new().symlink("s", s.outside_abs("sentinel")).finish()),
            build: |_| {
                let tar = RawTar::new().file(".wh.s", "").finish();
                (
                    tar,
                    Expect::Safe(|s| {
                        assert!(fs::symlink_metadata(s.root.join("s")).is_err());
                    }),
                )
            },
        },
    ]
}

fn run_case(case: &Case) -> Result<bool, String> {
    let sb = Sandbox::new();
    let opts = UnpackOptions { mode: case.mode, ..UnpackOptions::default() };
    if let Some(lower) = case.lower {
        unpack(lower(&sb).as_slice(), &sb.root, &UnpackOptions::default())
            .map_err(|e| format!("lower layer failed: {e}"))?;
    }
    let (tar, expect) = (case.build)(&sb);
    let before = sb.snapshot();
    let result = unpack(tar.as_slice(), &sb.root, &opts);
    sb.assert_outside_unchanged(&before, case.name);
    match (expect, result) {
        (Expect::Refused { entry, is_kind }, Err(e)) => {
            if !is_kind(&e) {
                return Err(format!("refused with the wrong error: {e:?}"));
            }
            if e.entry() != entry.as_deref() {
                return Err(format!("error names {:?}, expected {entry:?}", e.entry()));
            }
            let msg = e.to_string();
            if let Some(entry) = &entry {
                if !msg.contains(&entry.display().to_string()) {
                    return Err(format!("message {msg:?} does not name the entry"));
                }
            }
            Ok(true)
        }
        (Expect::Refused { .. }, Ok(stats)) => Err(format!("not refused: {stats:?}")),
        (Expect::Safe(check), Ok(_)) => {
            check(&sb);
            Ok(false)
        }
        (Expect::Safe(_), Err(e)) => Err(format!("refused a safe archive: {e}")),
    }
}

#[test]
fn hostile_corpus() {
    let cases = cases();
    let mut refusals = 0;
    let mut safe = 0;
    let mut failures = Vec::new();
    for case in &cases {
        if case.mode == Mode::Overlay && !have_root(case.name) {
            continue;
        }
        match run_case(case) {
            Ok(true) => refusals += 1,
            Ok(false) => safe += 1,
            Err(why) => failures.push(format!("{}: {why}", case.name)),
        }
    }
    assert!(failures.is_empty(), "failed cases:\n{}", failures.join("\n"));
    eprintln!("hostile corpus: {refusals} refused, {safe} safe-but-not-refused");
    assert!(refusals >= 20, "only {refusals} refusals ran");
    assert!(refusals + safe >= 22);
}

/// The unprivileged half of the tests below, run in a child process as `nobody`.
#[test]
#[ignore = "helper: run by the tests below in an unprivileged child process"]
fn unprivileged_child() {
    let tar = fs::read(std::env::var("UNPACK_CHILD_TAR").unwrap()).unwrap();
    let root = PathBuf::from(std::env::var("UNPACK_CHILD_ROOT").unwrap());
    assert!(!nix::unistd::geteuid().is_root());
    check_device_refused(&tar, &root);
}

fn check_device_refused(tar: &[u8], root: &Path) {
    let err = unpack(tar, root, &UnpackOptions::default()).unwrap_err();
    assert!(matches!(&err, UnpackError::DeviceNeedsRoot { entry } if entry == Path::new("dev/evil")), "{err:?}");
    assert!(err.to_string().contains("dev/evil"));
    assert!(fs::symlink_metadata(root.join("dev/evil")).is_err());
}

fn device_tar() -> Vec<u8> {
    RawTar::new().dir("dev/").push(Entry::new("dev/evil", BLOCK).mode(0o666).dev(8, 0)).finish()
}

/// Device nodes are refused when not root. As root, the refusal is checked in a child
/// process running as `nobody`, and device creation itself is checked too.
#[test]
fn device_node_when_not_root() {
    let sb = Sandbox::new();
    let tar = device_tar();
    if !nix::unistd::geteuid().is_root() {
        let before = sb.snapshot();
        check_device_refused(&tar, &sb.root);
        sb.assert_outside_unchanged(&before, "device node when not root");
        return;
    }
    let nobody = 65534;
    fs::set_permissions(sb.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&sb.root, Some(nobody), Some(nobody)).unwrap();
    let tar_path = sb.dir.path().join("layer.tar");
    fs::write(&tar_path, &tar).unwrap();
    let before = sb.snapshot();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "unprivileged_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("UNPACK_CHILD_TAR", &tar_path)
        .env("UNPACK_CHILD_ROOT", &sb.root)
        .uid(nobody)
        .gid(nobody)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{log}");
    assert!(log.contains("1 passed"), "child ran no test:\n{log}");
    sb.assert_outside_unchanged(&before, "device node when not root");

    // And as root, devices are created.
    let sb = Sandbox::new();
    unpack(tar.as_slice(), &sb.root, &UnpackOptions::default()).unwrap();
    let m = fs::symlink_metadata(sb.root.join("dev/evil")).unwrap();
    assert!(m.file_type().is_block_device());
    assert_eq!(m.rdev(), nix::sys::stat::makedev(8, 0));
}

//! What a well-formed layer unpacks to: whiteouts in both modes, links, modes, owners,
//! times, xattrs, long names, compression and media types.

mod unpack_util;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use twinbox_image::unpack::{decompress, unpack, Compression, UnpackError, UnpackOptions, UnpackStats};
use unpack_util::*;

fn flatten(tar: &[u8], root: &Path) -> UnpackStats {
    unpack(tar, root, &UnpackOptions::default()).unwrap()
}

fn exists(p: impl AsRef<Path>) -> bool {
    fs::symlink_metadata(p).is_ok()
}

fn mode_of(p: impl AsRef<Path>) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn flatten_whiteouts_and_opaque_directories() {
    let sb = Sandbox::new();
    let r = &sb.root;
    let lower = RawTar::new()
        .dir("a/")
        .file("a/x", "lower")
        .file("a/y", "lower")
        .dir("a/sub/")
        .file("a/sub/old", "lower")
        .dir("b/")
        .file("b/z", "lower")
        .file("c", "lower")
        .file("keep", "lower")
        .dir("e/")
        .file("e/f", "lower")
        .finish();
    flatten(&lower, r);

    let upper = RawTar::new()
        .file(".wh.b", "")
        .file(".wh.c", "")
        .file(".wh.never-existed", "")
        .dir("a/")
        .file("a/before", "upper")
        .file("a/.wh..wh..opq", "")
        .dir("a/sub/")
        .file("a/sub/new", "upper")
        .file("a/after", "upper")
        // A whiteout only hides lower layers: this layer's own `e/g` stays.
        .file("e/g", "upper")
        .file("e/.wh.g", "")
        .file("e/.wh.f", "")
        .finish();
    let stats = flatten(&upper, r);
    assert_eq!(stats.whiteouts, 6);

    assert!(!exists(r.join("b")), "whiteout of a directory");
    assert!(!exists(r.join("c")), "whiteout of a file");
    assert!(!exists(r.join(".wh.b")) && !exists(r.join(".wh.c")));
    assert_eq!(fs::read(r.join("keep")).unwrap(), b"lower");
    // Opaque: the lower content of a/ is gone, this layer's (before and after) stays.
    assert!(!exists(r.join("a/x")) && !exists(r.join("a/y")));
    assert!(!exists(r.join("a/sub/old")), "opaque hides lower content below too");
    assert_eq!(fs::read(r.join("a/before")).unwrap(), b"upper");
    assert_eq!(fs::read(r.join("a/after")).unwrap(), b"upper");
    assert_eq!(fs::read(r.join("a/sub/new")).unwrap(), b"upper");
    assert!(!exists(r.join("a/.wh..wh..opq")));
    assert_eq!(fs::read(r.join("e/g")).unwrap(), b"upper");
    assert!(!exists(r.join("e/f")));
}

#[test]
fn overlay_mode_whiteouts_are_devices_and_xattrs() {
    let sb = Sandbox::new();
    let tar = RawTar::new()
        .dir("d/")
        .file("d/.wh..wh..opq", "")
        .file("d/kept", "x")
        .file(".wh.gone", "")
        .pax(&[("SCHILY.xattr.trusted.overlay.redirect", b"/etc")])
        .file("sneaky", "x")
        .finish();
    if !nix::unistd::geteuid().is_root() {
        let err = unpack(tar.as_slice(), &sb.root, &UnpackOptions::overlay()).unwrap_err();
        assert!(matches!(err, UnpackError::OverlayNeedsRoot), "{err:?}");
        have_root("overlay_mode_whiteouts_are_devices_and_xattrs");
        return;
    }
    let stats = unpack(tar.as_slice(), &sb.root, &UnpackOptions::overlay()).unwrap();
    assert_eq!(stats.whiteouts, 2);
    let m = fs::symlink_metadata(sb.root.join("gone")).unwrap();
    assert!(m.file_type().is_char_device(), "whiteout is a char device");
    assert_eq!(m.rdev(), 0, "whiteout device is 0/0");
    assert!(!exists(sb.root.join(".wh.gone")));
    assert_eq!(xattr::get(sb.root.join("d"), "trusted.overlay.opaque").unwrap(), Some(b"y".to_vec()));
    assert!(!exists(sb.root.join("d/.wh..wh..opq")));
    assert!(exists(sb.root.join("d/kept")));
    // Overlay metadata only comes from whiteout markers, never from the tar's xattrs.
    assert_eq!(xattr::get(sb.root.join("sneaky"), "trusted.overlay.redirect").unwrap(), None);
}

/// The unprivileged half of the overlay test, run in a child process as `nobody`.
#[test]
#[ignore = "helper: run by overlay_mode_needs_root in an unprivileged child process"]
fn unprivileged_overlay_child() {
    let root = PathBuf::from(std::env::var("UNPACK_CHILD_ROOT").unwrap());
    assert!(!nix::unistd::geteuid().is_root());
    let tar = RawTar::new().file(".wh.x", "").finish();
    let err = unpack(tar.as_slice(), &root, &UnpackOptions::overlay()).unwrap_err();
    assert!(matches!(err, UnpackError::OverlayNeedsRoot), "{err:?}");
    assert!(err.to_string().contains("needs root"));
}

#[test]
fn overlay_mode_needs_root() {
    if !nix::unistd::geteuid().is_root() {
        // The in-process branch of the test above covers it.
        let sb = Sandbox::new();
        let tar = RawTar::new().file(".wh.x", "").finish();
        let err = unpack(tar.as_slice(), &sb.root, &UnpackOptions::overlay()).unwrap_err();
        assert!(matches!(err, UnpackError::OverlayNeedsRoot), "{err:?}");
        return;
    }
    let sb = Sandbox::new();
    fs::set_permissions(sb.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&sb.root, Some(65534), Some(65534)).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "unprivileged_overlay_child", "--ignored", "--nocapture"])
        .env("UNPACK_CHILD_ROOT", &sb.root)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{log}");
    assert!(log.contains("1 passed"), "child ran no test:\n{log}");
    assert_eq!(fs::read_dir(&sb.root).unwrap().count(), 0);
}

#[test]
fn hardlinks_share_an_inode() {
    let sb = Sandbox::new();
    let tar =
        RawTar::new().dir("a/").file("a/f", "content").hardlink("a/g", "a/f").hardlink("h", "./a/../a/f").finish();
    flatten(&tar, &sb.root);
    let f = fs::metadata(sb.root.join("a/f")).unwrap();
    let g = fs::metadata(sb.root.join("a/g")).unwrap();
    let h = fs::metadata(sb.root.join("h")).unwrap();
    assert_eq!(f.ino(), g.ino());
    assert_eq!(f.ino(), h.ino());
    assert_eq!(f.nlink(), 3);
}

#[test]
fn hardlink_to_a_missing_target_is_an_error() {
    let sb = Sandbox::new();
    let tar = RawTar::new().hardlink("h", "nothing").finish();
    let err = unpack(tar.as_slice(), &sb.root, &UnpackOptions::default()).unwrap_err();
    assert!(matches!(&err, UnpackError::HardlinkMissing { entry, .. } if entry == Path::new("h")), "{err:?}");
}

#[test]
fn symlinks_are_kept_verbatim() {
    let sb = Sandbox::new();
    let tar = RawTar::new()
        .dir("bin/")
        .symlink("bin/sh", "/bin/busybox")
        .dir("usr/")
        .dir("usr/lib/")
        .dir("lib/")
        .symlink("lib/x", "../usr/lib/x")
        .symlink("dangling", "does/not/exist")
        .symlink("dots", "./a/../b//c")
        .finish();
    flatten(&tar, &sb.root);
    let link = |p: &str| fs::read_link(sb.root.join(p)).unwrap();
    assert_eq!(link("bin/sh"), Path::new("/bin/busybox"));
    assert_eq!(link("lib/x"), Path::new("../usr/lib/x"));
    assert_eq!(link("dangling"), Path::new("does/not/exist"));
    assert_eq!(link("dots"), Path::new("./a/../b//c"));
}

#[test]
fn modes_including_special_bits() {
    let sb = Sandbox::new();
    let tar = RawTar::new()
        .push(Entry::new("suid", REGULAR).mode(0o4755).data("x"))
        .push(Entry::new("sgid", REGULAR).mode(0o2711).data("x"))
        .push(Entry::new("private", REGULAR).mode(0o600).data("x"))
        .push(Entry::new("none", REGULAR).mode(0o000).data("x"))
        .push(Entry::new("tmp/", DIR).mode(0o1777))
        // A read-only directory that still receives children after its entry.
        .push(Entry::new("ro/", DIR).mode(0o555))
        .push(Entry::new("ro/child", REGULAR).mode(0o444).data("x"))
        .push(Entry::new("ro/sub/", DIR).mode(0o500))
        .push(Entry::new("ro/sub/leaf", REGULAR).mode(0o640).data("x"))
        .push(Entry::new("pipe", FIFO).mode(0o640))
        .finish();
    flatten(&tar, &sb.root);
    let r = &sb.root;
    assert_eq!(mode_of(r.join("suid")), 0o4755);
    assert_eq!(mode_of(r.join("sgid")), 0o2711);
    assert_eq!(mode_of(r.join("private")), 0o600);
    assert_eq!(mode_of(r.join("none")), 0o000);
    assert_eq!(mode_of(r.join("tmp")), 0o1777);
    assert_eq!(mode_of(r.join("ro")), 0o555);
    assert_eq!(mode_of(r.join("ro/child")), 0o444);
    assert_eq!(mode_of(r.join("ro/sub")), 0o500);
    assert_eq!(mode_of(r.join("ro/sub/leaf")), 0o640);
    let pipe = fs::symlink_metadata(r.join("pipe")).unwrap();
    assert!(pipe.file_type().is_fifo());
    assert_eq!(pipe.mode() & 0o7777, 0o640);
}

#[test]
fn ownership_when_root() {
    if !have_root("ownership_when_root") {
        return;
    }
    let sb = Sandbox::new();
    let tar = RawTar::new()
        .push(Entry::new("d/", DIR).owner(1000, 1001).mode(0o2775))
        .push(Entry::new("d/suid", REGULAR).owner(1234, 5678).mode(0o6755).data("x"))
        .push(Entry::new("l", SYMLINK).owner(42, 43).link("/nowhere"))
        .push(Entry::new("p", FIFO).owner(7, 8))
        .push(Entry::new("dev/", DIR))
        .push(Entry::new("dev/null", CHAR).owner(0, 5).mode(0o666).dev(1, 3))
        .finish();
    flatten(&tar, &sb.root);
    let own = |p: &str| {
        let m = fs::symlink_metadata(sb.root.join(p)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(own("d"), (1000, 1001));
    assert_eq!(own("d/suid"), (1234, 5678));
    // chown must not have cleared the set-id bits.
    assert_eq!(mode_of(sb.root.join("d/suid")), 0o6755);
    assert_eq!(mode_of(sb.root.join("d")), 0o2775);
    assert_eq!(own("l"), (42, 43), "symlink itself chowned (lchown)");
    assert_eq!(own("p"), (7, 8));
    assert_eq!(own("dev/null"), (0, 5));
    let m = fs::symlink_metadata(sb.root.join("dev/null")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), nix::sys::stat::makedev(1, 3));
    assert_eq!(m.mode() & 0o7777, 0o666);

    // Without same_owner, everything belongs to us.
    let sb = Sandbox::new();
    let opts = UnpackOptions { same_owner: false, ..UnpackOptions::default() };
    unpack(tar.as_slice(), &sb.root, &opts).unwrap();
    assert_eq!(fs::metadata(sb.root.join("d/suid")).unwrap().uid(), 0);
}

#[test]
fn mtimes_of_files_dirs_and_symlinks() {
    let sb = Sandbox::new();
    let tar = RawTar::new()
        .push(Entry::new("d/", DIR).mtime(1_000_000_000))
        .push(Entry::new("d/e/", DIR).mtime(1_100_000_000))
        // Children written after their directories' entries.
        .push(Entry::new("d/e/f", REGULAR).mtime(1_200_000_000).data("x"))
        .push(Entry::new("d/late", REGULAR).mtime(1_300_000_000).data("x"))
        .push(Entry::new("d/l", SYMLINK).mtime(1_400_000_000).link("e/f"))
        .pax(&[("mtime", b"1500000000.123456789")])
        .push(Entry::new("precise", REGULAR).mtime(1).data("x"))
        .push(Entry::new("./", DIR).mtime(1_600_000_000).mode(0o711))
        .finish();
    flatten(&tar, &sb.root);
    let mtime = |p: &Path| {
        let m = fs::symlink_metadata(p).unwrap();
        (m.mtime(), m.mtime_nsec())
    };
    let r = &sb.root;
    assert_eq!(mtime(&r.join("d")), (1_000_000_000, 0));
    assert_eq!(mtime(&r.join("d/e")), (1_100_000_000, 0));
    assert_eq!(mtime(&r.join("d/e/f")), (1_200_000_000, 0));
    assert_eq!(mtime(&r.join("d/late")), (1_300_000_000, 0));
    assert_eq!(mtime(&r.join("d/l")), (1_400_000_000, 0), "lutimes on the symlink");
    assert_eq!(mtime(&r.join("d/e/f")), (1_200_000_000, 0), "not through the link");
    assert_eq!(mtime(&r.join("precise")), (1_500_000_000, 123_456_789));
    assert_eq!(mtime(r), (1_600_000_000, 0), "a ./ entry sets the root's times");
    assert_eq!(mode_of(r), 0o711);
}

#[test]
fn xattrs_round_trip() {
    let sb = Sandbox::new();
    if !twinbox_testutil::require(
        user_xattrs_supported(&sb.root),
        "xattrs_round_trip",
        "the temp filesystem rejects user.* xattrs",
    ) {
        return;
    }
    let tar = RawTar::new()
        .pax(&[("SCHILY.xattr.user.comment", b"hello \x00\xff world"), ("SCHILY.xattr.user.empty", b"")])
        .file("f", "x")
        .pax(&[("SCHILY.xattr.user.dir", b"yes")])
        .dir("d/")
        // Not permitted on a symlink (user.*), or for non-root (trusted.*): skipped.
        .pax(&[("SCHILY.xattr.user.onlink", b"no")])
        .symlink("l", "f")
        .pax(&[("SCHILY.xattr.trusted.thing", b"t")])
        .file("t", "x")
        .finish();
    flatten(&tar, &sb.root);
    let get = |p: &str, n: &str| xattr::get(sb.root.join(p), n).unwrap();
    assert_eq!(get("f", "user.comment"), Some(b"hello \x00\xff world".to_vec()));
    assert_eq!(get("f", "user.empty"), Some(Vec::new()));
    assert_eq!(get("d", "user.dir"), Some(b"yes".to_vec()));
    if nix::unistd::geteuid().is_root() {
        assert_eq!(get("t", "trusted.thing"), Some(b"t".to_vec()));
    }
}

#[test]
fn long_names_and_long_link_names() {
    let sb = Sandbox::new();
    let deep = format!("{}/file", ["segment"; 30].join("/"));
    let deep_dir = ["segment"; 30].join("/");
    let long_target = format!("/{}", "t".repeat(200));
    let tar = RawTar::new()
        .gnu_longname(&deep)
        .file("short-gnu", "gnu")
        .pax(&[("path", format!("{deep_dir}/pax").as_bytes())])
        .file("short-pax", "pax")
        .gnu_longlink(&long_target)
        .symlink("ll", "short")
        .pax(&[("linkpath", deep.as_bytes())])
        .hardlink("hl", "short")
        .finish();
    flatten(&tar, &sb.root);
    assert_eq!(fs::read(sb.root.join(&deep)).unwrap(), b"gnu");
    assert_eq!(fs::read(sb.root.join(&deep_dir).join("pax")).unwrap(), b"pax");
    assert_eq!(fs::read_link(sb.root.join("ll")).unwrap(), Path::new(&long_target));
    assert_eq!(fs::metadata(sb.root.join("hl")).unwrap().ino(), fs::metadata(sb.root.join(&deep)).unwrap().ino());
    assert!(!exists(sb.root.join("short-gnu")) && !exists(sb.root.join("short-pax")));
}

#[test]
fn replacing_existing_entries() {
    let sb = Sandbox::new();
    let r = &sb.root;
    let lower = RawTar::new()
        .dir("keep/")
        .file("keep/child", "lower")
        .file("was-file", "lower")
        .dir("was-dir/")
        .file("was-dir/child", "lower")
        .symlink("was-link", "keep")
        .finish();
    flatten(&lower, r);
    let keep_ino = fs::metadata(r.join("keep")).unwrap().ino();
    let upper = RawTar::new()
        .push(Entry::new("keep/", DIR).mode(0o700))
        .dir("was-file/")
        .file("was-dir", "now a file")
        .dir("was-link/")
        .file("was-link/inside", "x")
        .finish();
    flatten(&upper, r);
    let keep = fs::metadata(r.join("keep")).unwrap();
    assert_eq!(keep.ino(), keep_ino, "an existing directory is kept");
    assert_eq!(keep.mode() & 0o7777, 0o700, "and its metadata updated");
    assert_eq!(fs::read(r.join("keep/child")).unwrap(), b"lower");
    assert!(fs::symlink_metadata(r.join("was-file")).unwrap().is_dir());
    assert_eq!(fs::read(r.join("was-dir")).unwrap(), b"now a file");
    assert!(fs::symlink_metadata(r.join("was-link")).unwrap().is_dir());
    assert!(!exists(r.join("keep/inside")), "not written through the old symlink");
}

#[test]
fn implicit_parents_and_stats() {
    let sb = Sandbox::new();
    let tar = RawTar::new().file("x/y/z", "12345").file("x/w", "678").dir("x/").finish();
    let stats = flatten(&tar, &sb.root);
    assert_eq!(fs::read(sb.root.join("x/y/z")).unwrap(), b"12345");
    assert_eq!(stats, UnpackStats { entries: 3, bytes: 8, whiteouts: 0 });
}

/// A larger file than the copy buffer, to cross buffer boundaries.
fn sample_layer() -> (Vec<u8>, Vec<u8>) {
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let header = |kind, mode, size| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h
    };
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    b.append_data(&mut h, "dir/", std::io::empty()).unwrap();
    let mut h = header(tar::EntryType::Regular, 0o644, big.len() as u64);
    b.append_data(&mut h, "dir/big", big.as_slice()).unwrap();
    (b.into_inner().unwrap(), big)
}

#[test]
fn gzip_zstd_and_plain_layers() {
    let (tar, big) = sample_layer();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(tar.as_slice(), 3).unwrap();
    // Two gzip members back to back are one valid gzip stream.
    let (first, second) = tar.split_at(10_000);
    let mut multi = Vec::new();
    for part in [first, second] {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(part).unwrap();
        multi.extend(e.finish().unwrap());
    }
    for (blob, kind) in
        [(&tar, Compression::None), (&gz, Compression::Gzip), (&zst, Compression::Zstd), (&multi, Compression::Gzip)]
    {
        assert_eq!(Compression::detect(&blob[..8]), kind);
        let sb = Sandbox::new();
        let mut stream = decompress(blob.as_slice(), kind).unwrap();
        let stats = unpack(&mut stream, &sb.root, &UnpackOptions::default()).unwrap();
        assert_eq!(stats.bytes, big.len() as u64, "{kind:?}");
        assert_eq!(fs::read(sb.root.join("dir/big")).unwrap(), big, "{kind:?}");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.iter().all(|&b| b == 0), "only end-of-archive padding left");
    }
    // A corrupt stream is an error, not a silent partial unpack.
    let mut bad = gz.clone();
    let mid = bad.len() / 2;
    bad[mid..mid + 64].fill(0x55);
    let sb = Sandbox::new();
    let stream = decompress(bad.as_slice(), Compression::Gzip).unwrap();
    assert!(unpack(stream, &sb.root, &UnpackOptions::default()).is_err());
}

#[test]
fn compression_from_media_type() {
    let cases = [
        ("application/vnd.oci.image.layer.v1.tar", Compression::None),
        ("application/vnd.oci.image.layer.v1.tar+gzip", Compression::Gzip),
        ("application/vnd.oci.image.layer.v1.tar+zstd", Compression::Zstd),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar", Compression::None),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", Compression::Gzip),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", Compression::Zstd),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", Compression::Gzip),
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", Compression::Gzip),
    ];
    for (mt, want) in cases {
        assert_eq!(Compression::from_media_type(mt).unwrap(), want, "{mt}");
    }
    for bad in ["application/vnd.oci.image.layer.v1.tar+bzip2", "application/vnd.oci.image.config.v1+json", ""] {
        let err = Compression::from_media_type(bad).unwrap_err();
        assert!(matches!(&err, UnpackError::UnsupportedMediaType(m) if m == bad), "{err:?}");
    }
    assert_eq!(Compression::detect(b"ustar"), Compression::None);
    assert_eq!(Compression::detect(b""), Compression::None);
}

#[test]
fn missing_target_is_an_error() {
    let sb = Sandbox::new();
    let tar = RawTar::new().file("f", "x").finish();
    let err = unpack(tar.as_slice(), &sb.root.join("nope"), &UnpackOptions::default()).unwrap_err();
    assert!(matches!(err, UnpackError::Target { .. }), "{err:?}");
}

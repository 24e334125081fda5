//! Root disks for microVMs: an image built into a temp store becomes an ext4 image made by
//! mkfs.ext4; its contents are read back with e2fsprogs' debugfs (no mount, no root needed).

mod build_common;

use std::os::unix::fs::symlink;
use std::process::Command;

use build_common::*;
use twinbox_image::disk::{disk_path, root_disk};

fn tool(name: &str) -> bool {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {name} || test -x /usr/sbin/{name}")).output();
    let ok = found.map(|o| o.status.success()).unwrap_or(false);
    twinbox_testutil::require(ok, "disk tests", &format!("{name} is not installed (apt-get install e2fsprogs)"))
}

/// Serialises the tests: one of them hides mkfs.ext4 by changing PATH, process-wide.
static PATH_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn debugfs(disk: &std::path::Path, request: &str) -> String {
    let out = Command::new("debugfs").arg("-R").arg(request).arg(disk).output().expect("run debugfs");
    assert!(out.status.success(), "debugfs -R {request}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn image_becomes_a_cached_ext4_disk_that_prune_removes_with_the_image() {
    let _path = PATH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !tool("mkfs.ext4") || !tool("debugfs") {
        return;
    }
    let ctx = context(&[("hello", "#!/bin/sh\necho hello\n"), ("etc/passwd", "root:x:0:0::/root:/bin/sh\n")]);
    chmod(ctx.path(), "hello", 0o4755);
    // A symlink inside a copied directory stays a symlink (a top-level COPY source is followed).
    symlink("passwd", ctx.path().join("etc/link")).unwrap();
    let dockerfile = "FROM scratch\nCOPY hello /\nCOPY etc /etc\nCOPY --chown=1000:1000 hello /home/app/h\n\
                      CMD [\"/hello\"]\n";
    let (_d, store) = store();
    build_ok(&store, ctx.path(), dockerfile, &["disk:1"]);
    let image = store.resolve("disk:1").unwrap();

    let disk = root_disk(&store, &image).unwrap();
    assert!(disk.created);
    assert_eq!(disk.path, disk_path(&store, &image.manifest_digest));
    assert_eq!(std::fs::metadata(&disk.path).unwrap().len(), disk.size);
    assert_eq!(std::fs::read_dir(store.tmp_dir()).unwrap().count(), 0, "the work dir is gone");

    assert_eq!(debugfs(&disk.path, "cat /hello"), "#!/bin/sh\necho hello\n");
    assert_eq!(debugfs(&disk.path, "cat /etc/passwd"), "root:x:0:0::/root:/bin/sh\n");
    let stat = debugfs(&disk.path, "stat /hello");
    assert!(stat.contains("Mode:  04755"), "setuid kept: {stat}");
    let stat = debugfs(&disk.path, "stat /home/app/h");
    assert!(stat.contains("User:  1000") && stat.contains("Group:  1000"), "owner kept: {stat}");
    let stat = debugfs(&disk.path, "stat /etc/link");
    assert!(stat.contains("Type: symlink") && stat.contains("Fast link dest: \"passwd\""), "{stat}");
    let root = debugfs(&disk.path, "stat /");
    assert!(root.contains("User:     0"), "root dir owned by root: {root}");

    let again = root_disk(&store, &image).unwrap();
    assert!(!again.created, "the second VM reuses the disk");
    assert_eq!(again.path, disk.path);

    // Another tag keeps it; removing the last one takes the disk with the image.
    store.remove_image("disk:1", false).unwrap();
    assert!(!disk.path.exists(), "prune removed the disk of an image no tag reaches");
}

#[test]
fn missing_mkfs_is_a_clear_error_and_leaves_nothing() {
    let _path = PATH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = context(&[("a", "a")]);
    let (_d, store) = store();
    build_ok(&store, ctx.path(), "FROM scratch\nCOPY a /a\n", &["x:1"]);
    let image = store.resolve("x:1").unwrap();
    // An empty PATH hides mkfs.ext4 (Command searches PATH for a bare name).
    let saved = std::env::var_os("PATH");
    std::env::set_var("PATH", "/nonexistent");
    let err = root_disk(&store, &image).unwrap_err();
    match saved {
        Some(p) => std::env::set_var("PATH", p),
        None => std::env::remove_var("PATH"),
    }
    assert!(err.to_string().contains("install e2fsprogs"), "{err}");
    assert!(!disk_path(&store, &image.manifest_digest).exists());
    assert_eq!(std::fs::read_dir(store.tmp_dir()).unwrap().count(), 0, "no temp left behind");
}

//! The image store through the `twinbox` CLI, checked against real OCI tools (skopeo, umoci).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::{hello_context, require_root, require_tool, sh, Env};
use oci_spec::image::{ConfigBuilder, Descriptor, ImageConfigurationBuilder, MediaType, RootFsBuilder};
use twinbox_image::{Digest, Reference};

/// A tar layer built in memory: (path, kind).
enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32),
    Link(&'a str, &'a str),
    Hard(&'a str, &'a str),
}

fn layer_tar(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            E::Dir(p, m) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*m);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            }
            E::File(p, data, m) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*m);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            E::Link(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
            E::Hard(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// Store an image made of these uncompressed layers under `name`; returns the manifest digest.
fn put_layers_image(store: &twinbox_image::Store, name: &str, layers: &[Vec<u8>]) -> Digest {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        let (d, size) = store.put_blob(l).unwrap();
        descs.push(Descriptor::new(MediaType::ImageLayer, size, &d));
        diff_ids.push(d.to_string());
    }
    let config = ImageConfigurationBuilder::default()
        .architecture(oci_spec::image::Arch::Amd64)
        .os(oci_spec::image::Os::Linux)
        .rootfs(RootFsBuilder::default().typ("layers").diff_ids(diff_ids).build().unwrap())
        .config(ConfigBuilder::default().cmd(vec!["/bin/sh".to_string()]).build().unwrap())
        .build()
        .unwrap();
    let desc = store.put_image(&config, descs).unwrap();
    store.set_tag(&name.parse::<Reference>().unwrap(), &desc).unwrap();
    Digest::try_from(desc.digest()).unwrap()
}

fn two_layer_image(env: &Env, name: &str) -> Digest {
    let l1 = layer_tar(&[
        E::Dir("etc", 0o755),
        E::File("etc/hostname", b"twinbox\n", 0o644),
        E::File("etc/gone", b"deleted by layer 2\n", 0o600),
        E::Dir("data", 0o750),
        E::File("data/old", b"hidden by the opaque marker\n", 0o644),
        E::Dir("bin", 0o755),
        E::File("bin/tool", b"#!/bin/sh\necho tool\n", 0o4755),
        E::Hard("bin/tool-hard", "bin/tool"),
        E::Link("bin/sh", "/bin/busybox"),
        E::Link("etc/rel", "../bin/tool"),
    ]);
    let l2 = layer_tar(&[
        E::File("etc/.wh.gone", b"", 0o644),
        E::Dir("data", 0o750),
        E::File("data/.wh..wh..opq", b"", 0o644),
        E::File("data/new", b"only this one\n", 0o640),
        E::Dir("empty", 0o1777),
    ]);
    put_layers_image(&env.store(), name, &[l1, l2])
}

/// A comparable description of a tree: path → (kind, mode, uid, gid, content or target, mtime).
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let m = e.path().symlink_metadata().unwrap();
        let what = if m.file_type().is_symlink() {
            format!("link {}", std::fs::read_link(e.path()).unwrap().display())
        } else if m.is_dir() {
            "dir".to_string()
        } else {
            format!("file {} nlink {}", hex::encode(sha2_of(&std::fs::read(e.path()).unwrap())), m.nlink())
        };
        let mtime = if m.file_type().is_symlink() || m.is_dir() { String::new() } else { m.mtime().to_string() };
        out.insert(rel, format!("{what} mode {:o} {}:{} {mtime}", m.mode() & 0o7777, m.uid(), m.gid()));
    }
    out
}

fn sha2_of(b: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::digest(b).to_vec()
}

#[test]
fn skopeo_reads_our_store_and_round_trips_an_oci_archive() {
    if !require_tool("skopeo") {
        return;
    }
    let env = Env::new();
    let digest = two_layer_image(&env, "multi:1");
    let root = env.root();
    let out = sh(Command::new("skopeo").arg("inspect").arg(format!("oci:{}:multi:1", root.display())));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Digest"], digest.to_string(), "skopeo sees our manifest digest");
    assert_eq!(v["Layers"].as_array().unwrap().len(), 2);

    // skopeo copies our image into an OCI archive; we load it into a fresh store unchanged.
    let archive = env.path("from-skopeo.tar");
    sh(Command::new("skopeo")
        .arg("copy")
        .arg("-q")
        .arg(format!("oci:{}:multi:1", root.display()))
        .arg(format!("oci-archive:{}:multi:copied", archive.display())));
    let other = Env::new();
    let loaded = other.ok(&["load", "-i", archive.to_str().unwrap()]);
    assert!(loaded.contains("Loaded image: multi:copied"), "{loaded}");
    // skopeo re-encodes the manifest and gzips our plain layers; the config (with its diff
    // ids) comes through byte for byte and the unpacked trees are the same.
    let copied: serde_json::Value = serde_json::from_str(&other.ok(&["inspect", "multi:copied"])).unwrap();
    let original: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "multi:1"])).unwrap();
    assert_eq!(copied[0]["Id"], original[0]["Id"]);
    let (a, b) = (env.path("a"), env.path("b"));
    env.ok(&["unpack", "multi:1", a.to_str().unwrap()]);
    other.ok(&["unpack", "multi:copied", b.to_str().unwrap()]);
    assert_eq!(tree(&a), tree(&b));

    // Our own save is an archive skopeo reads too.
    let ours = env.path("ours.tar");
    env.ok(&["save", "-o", ours.to_str().unwrap(), "multi:1"]);
    let out = sh(Command::new("skopeo").arg("inspect").arg(format!("oci-archive:{}:multi:1", ours.display())));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Digest"], digest.to_string());
}

#[test]
fn umoci_unpack_gives_the_same_tree_as_ours() {
    if !require_tool("umoci") || !require_root() {
        return;
    }
    let env = Env::new();
    two_layer_image(&env, "multi:1");
    let bundle = env.path("bundle");
    sh(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:multi:1", env.root().display()))
        .arg(&bundle));
    let ours = env.path("ours");
    env.ok(&["unpack", "multi:1", ours.to_str().unwrap()]);
    let theirs = tree(&bundle.join("rootfs"));
    let mine = tree(&ours);
    assert_eq!(mine, theirs, "twinbox unpack and umoci unpack differ");
    assert!(!mine.contains_key("etc/gone"), "whiteout applied");
    assert!(!mine.contains_key("data/old"), "opaque dir applied");
    assert!(mine["bin/tool"].contains("mode 4755"));
    assert!(mine["bin/tool"].contains("nlink 2"), "hardlink kept: {}", mine["bin/tool"]);
}

#[test]
fn an_image_made_by_umoci_is_loaded_and_inspected() {
    if !require_tool("umoci") || !require_tool("skopeo") {
        return;
    }
    let env = Env::new();
    let layout = env.path("umoci-layout");
    let l = layout.to_str().unwrap();
    sh(Command::new("umoci").args(["init", "--layout", l]));
    sh(Command::new("umoci").args(["new", "--image", &format!("{l}:v1")]));
    let bundle = env.path("b");
    sh(Command::new("umoci").args(["unpack", "--rootless", "--image", &format!("{l}:v1"), bundle.to_str().unwrap()]));
    std::fs::write(bundle.join("rootfs/greeting"), "made by umoci\n").unwrap();
    sh(Command::new("umoci").args(["repack", "--image", &format!("{l}:v1"), bundle.to_str().unwrap()]));
    sh(Command::new("umoci").args(["config", "--image", &format!("{l}:v1"), "--config.cmd", "/greeting"]));
    let archive = env.path("umoci.tar");
    sh(Command::new("skopeo")
        .arg("copy")
        .arg("-q")
        .arg(format!("oci:{l}:v1"))
        .arg(format!("oci-archive:{}:umoci/made:v1", archive.display())));
    let out = env.ok(&["load", "-i", archive.to_str().unwrap()]);
    assert!(out.contains("umoci/made:v1"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "umoci/made:v1"])).unwrap();
    assert_eq!(v[0]["Config"]["Cmd"][0], "/greeting");
    let dir = env.path("rootfs");
    env.ok(&["unpack", "umoci/made:v1", dir.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(dir.join("greeting")).unwrap(), "made by umoci\n");
}

#[test]
fn building_the_hello_example_twice_gives_the_same_digest() {
    let env = Env::new();
    let ctx = env.path("hello");
    if !hello_context(&ctx) {
        return;
    }
    let first = env.ok(&["build", "-t", "hello:latest", ctx.to_str().unwrap()]);
    let other = Env::new();
    let second = other.ok(&["build", "-t", "hello:latest", ctx.to_str().unwrap()]);
    assert_eq!(first.trim(), second.trim());
    assert!(first.trim().starts_with("sha256:"), "{first}");
    let images = env.ok(&["images"]);
    assert!(images.contains("hello") && images.contains("latest"), "{images}");
}

#[test]
fn docker_archive_is_loaded() {
    let env = Env::new();
    let layer = layer_tar(&[E::Dir("app", 0o755), E::File("app/run", b"echo hi\n", 0o755)]);
    let diff_id = Digest::of(&layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/app/run"], "Env": ["A=1"]},
        "container_config": {"Hostname": "legacy"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
    });
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = Digest::of(&config_bytes);
    // The legacy `docker save` layout: <id>/layer.tar, <config hex>.json, manifest.json.
    let manifest = serde_json::json!([{
        "Config": format!("{}.json", config_digest.hex()),
        "RepoTags": ["legacy/app:2"],
        "Layers": ["abc/layer.tar"],
    }]);
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |p: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, p, data).unwrap();
    };
    add(&format!("{}.json", config_digest.hex()), &config_bytes);
    add("abc/VERSION", b"1.0");
    add("abc/json", b"{}");
    add("abc/layer.tar", &layer);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    add("repositories", b"{}");
    let bytes = b.into_inner().unwrap();
    // Gzipped, as `docker save | gzip` gives.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&bytes).unwrap();
    let path = env.path("docker.tar.gz");
    std::fs::write(&path, gz.finish().unwrap()).unwrap();
    let out = env.ok(&["load", "-i", path.to_str().unwrap()]);
    assert!(out.contains("Loaded image: legacy/app:2"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "legacy/app:2"])).unwrap();
    assert_eq!(v[0]["Id"], config_digest.to_string(), "config kept byte for byte");
    assert_eq!(v[0]["Config"]["Env"][0], "A=1");
    let dir = env.path("rootfs");
    env.ok(&["unpack", "legacy/app:2", dir.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(dir.join("app/run")).unwrap(), "echo hi\n");
}

#[test]
fn tag_rmi_and_prune() {
    let env = Env::new();
    let digest = two_layer_image(&env, "multi:1");
    env.ok(&["tag", "multi:1", "localhost:5000/team/multi:2"]);
    let images = env.ok(&["images"]);
    assert!(images.contains("localhost:5000/team/multi"), "{images}");

    // A container holds the image: rmi refuses (exit 1) and names the holder; -f overrides.
    env.store().hold("ctr-1", &digest).unwrap();
    let o = env.run(&["rmi", "multi:1"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("in use by ctr-1"), "{err}");
    env.ok(&["rmi", "-f", "multi:1"]);
    // The other tag still needs the blobs.
    assert_eq!(env.store().verify_all().unwrap(), Vec::<Digest>::new());
    env.store().release("ctr-1").unwrap();
    let blobs_before = std::fs::read_dir(env.root().join("blobs/sha256")).unwrap().count();
    assert_eq!(blobs_before, 4, "manifest, config, two layers");
    env.ok(&["rmi", "localhost:5000/team/multi:2"]);
    let blobs_after = std::fs::read_dir(env.root().join("blobs/sha256")).unwrap().count();
    assert_eq!(blobs_after, 0, "last tag gone: blobs removed");

    // prune removes blobs nothing names.
    env.store().put_blob(b"orphan").unwrap();
    std::fs::write(env.root().join("tmp/blob-stale"), b"half").unwrap();
    let out = env.ok(&["prune"]);
    assert!(out.contains("Deleted 1 blobs"), "{out}");
    assert_eq!(std::fs::read_dir(env.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn errors_name_the_thing_and_exit_1() {
    let env = Env::new();
    for (args, needle) in [
        (vec!["inspect", "nothere:1"], "no such image: nothere:1"),
        (vec!["rmi", "nothere"], "no such image"),
        (vec!["tag", "nothere", "x:1"], "no such image"),
        (vec!["tag", "x", "Bad Name"], "invalid target name"),
        (vec!["load", "-i", "/nonexistent/file.tar"], "/nonexistent/file.tar"),
        (vec!["build", "-t", "x", "/nonexistent/ctx"], "/nonexistent/ctx"),
        (vec!["frobnicate"], "unrecognized subcommand"),
    ] {
        let o = env.run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // Loading something that is not an archive leaves nothing behind.
    let junk = env.path("junk.tar");
    std::fs::write(&junk, vec![0u8; 4096]).unwrap();
    let o = env.run(&["load", "-i", junk.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_dir(env.root().join("blobs/sha256")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(env.root().join("tmp")).unwrap().count(), 0);
}

/// `save` writes to standard output without `-o` (or with `-o -`), and into whatever an
/// existing non-regular path is (a device, a FIFO) instead of replacing it: `save -o
/// /dev/full` used to replace the host's /dev/full with a tar file.
#[test]
fn save_writes_into_devices_and_fifos_and_to_stdout() {
    let env = Env::new();
    two_layer_image(&env, "two:1");
    let file = env.path("two.tar");
    env.ok(&["save", "-o", file.to_str().unwrap(), "two:1"]);
    let archive = std::fs::read(&file).unwrap();
    let to_stdout = env.run(&["save", "two:1"]);
    assert!(to_stdout.status.success(), "{}", String::from_utf8_lossy(&to_stdout.stderr));
    assert_eq!(to_stdout.stdout, archive, "the same archive on standard output");
    assert_eq!(env.run(&["save", "-o", "-", "two:1"]).stdout, archive);

    // A FIFO stays a FIFO and carries the archive.
    let fifo = env.path("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    env.ok(&["save", "-o", fifo.to_str().unwrap(), "two:1"]);
    assert_eq!(reader.join().unwrap(), archive);
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&std::fs::metadata(&fifo).unwrap().file_type()));

    // A device that refuses the data (a node of /dev/full's numbers, made here, so that a
    // regression cannot replace the host's): an error, and the node is still the device.
    let full = env.path("full");
    if nix::unistd::geteuid().is_root() {
        let kind = nix::sys::stat::SFlag::S_IFCHR;
        nix::sys::stat::mknod(
            &full,
            kind,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 7),
        )
        .unwrap();
        let o = env.run(&["save", "-o", full.to_str().unwrap(), "two:1"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("No space left on device"), "{err}");
        let after = std::fs::metadata(&full).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(&after.file_type()), "the device was replaced");
    }
    // Nothing half-written is left beside a regular file when the image is unknown.
    let o = env.run(&["save", "-o", env.path("x.tar").to_str().unwrap(), "nothere:1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!env.path("x.tar").exists());
    assert!(!std::fs::read_dir(env.path(""))
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(".twinbox-save-")));
}

/// A store whose index.json is gone is refused, not taken for an empty one: `images` used to
/// write an empty index, and `prune` then deleted every blob.
#[test]
fn a_store_without_its_index_is_refused_and_kept() {
    let env = Env::new();
    two_layer_image(&env, "two:1");
    let blobs = |env: &Env| std::fs::read_dir(env.root().join("blobs/sha256")).unwrap().count();
    let before = blobs(&env);
    assert!(before >= 4);
    std::fs::remove_file(env.root().join("index.json")).unwrap();
    for args in [vec!["images"], vec!["prune"], vec!["inspect", "two:1"]] {
        let o = env.run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(&format!("holds {before} blobs but no index.json")), "{args:?}: {err}");
    }
    assert_eq!(blobs(&env), before, "no blob deleted");
    assert!(!env.root().join("index.json").exists(), "no empty index written");
}

/// A docker archive of one image whose config has `cmd` as its `Cmd`.
fn docker_archive_with_cmd(env: &Env, tag: &str, cmd: serde_json::Value) -> std::path::PathBuf {
    let layer = layer_tar(&[E::Dir("app", 0o755)]);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [Digest::of(&layer).to_string()]},
    });
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_name = format!("{}.json", Digest::of(&config_bytes).hex());
    let manifest = serde_json::json!([{ "Config": config_name, "RepoTags": [tag], "Layers": ["l/layer.tar"] }]);
    let mut b = tar::Builder::new(Vec::new());
    for (p, data) in [
        (config_name.as_str(), config_bytes.as_slice()),
        ("l/layer.tar", layer.as_slice()),
        ("manifest.json", &serde_json::to_vec(&manifest).unwrap()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, p, data).unwrap();
    }
    let path = env.path(&format!("{}.tar", tag.replace([':', '/'], "_")));
    std::fs::write(&path, b.into_inner().unwrap()).unwrap();
    path
}

/// An image whose config is not a valid image config is refused at load, with nothing tagged;
/// it used to load, after which `images`, `inspect` and `rmi` failed for every image.
#[test]
fn a_bad_config_is_refused_at_load_and_poisons_nothing() {
    let env = Env::new();
    let good = docker_archive_with_cmd(&env, "good:1", serde_json::json!(["/app/run"]));
    env.ok(&["load", "-i", good.to_str().unwrap()]);
    let bad = docker_archive_with_cmd(&env, "bad:1", serde_json::json!("notalist"));
    let o = env.run(&["load", "-i", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("image bad:1 in the archive cannot be loaded; nothing was tagged"), "{err}");
    assert!(err.contains("image config"), "{err}");
    let images = env.ok(&["images"]);
    assert!(images.contains("good") && !images.contains("bad"), "{images}");
    env.ok(&["inspect", "good:1"]);
    env.ok(&["rmi", "good:1"]);
}

/// An OCI archive whose index.json gives a manifest the wrong size is refused (it used to load,
/// and `images` showed 1000 TB); the sizes are checked as the digests already were.
#[test]
fn an_archive_with_a_lying_size_is_refused() {
    let env = Env::new();
    two_layer_image(&env, "two:1");
    let good = env.path("good.tar");
    env.ok(&["save", "-o", good.to_str().unwrap(), "two:1"]);
    for lie in [10u64, 1_000_000_000_000_000] {
        let mut out = tar::Builder::new(Vec::new());
        let mut archive = tar::Archive::new(std::fs::File::open(&good).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            if path == Path::new("index.json") {
                let mut index: serde_json::Value = serde_json::from_slice(&data).unwrap();
                index["manifests"][0]["size"] = serde_json::json!(lie);
                data = serde_json::to_vec(&index).unwrap();
            }
            let mut h = entry.header().clone();
            h.set_size(data.len() as u64);
            h.set_cksum();
            out.append_data(&mut h, &path, data.as_slice()).unwrap();
        }
        let bad = env.path("bad.tar");
        std::fs::write(&bad, out.into_inner().unwrap()).unwrap();
        let fresh = Env::new();
        let o = fresh.run(&["load", "-i", bad.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("as {lie} bytes, but it is")), "{err}");
        assert!(fresh.ok(&["images"]).lines().count() <= 1, "nothing tagged");
    }
}

/// A reader that stops reading (`twinbox inspect X | head -1`) is not an error to print: the
/// command ends as one that SIGPIPE stopped, quietly (it printed "Broken pipe (os error 32)").
#[test]
fn a_closed_output_ends_quietly() {
    let env = Env::new();
    two_layer_image(&env, "two:1");
    // Its reader gone before it starts, so it cannot finish writing first (it did, now and
    // then, when the reader was closed after the spawn).
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out =
        env.cmd().args(["inspect", "two:1"]).stdout(writer).stderr(std::process::Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(141), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

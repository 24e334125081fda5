//! A `twinbox load` killed with SIGKILL at any moment leaves a consistent store.

mod common;

use std::process::Stdio;
use std::time::Instant;

use common::Env;
use oci_spec::image::{Descriptor, ImageConfigurationBuilder, MediaType, RootFsBuilder};
use twinbox_image::{Digest, Reference};

/// A ≈96 MB image in four uncompressed layers of poorly compressible data.
fn big_image(env: &Env) {
    let store = env.store();
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for n in 0..4u64 {
        let mut data = Vec::with_capacity(24 << 20);
        let mut x = 0x2545_F491_4F6C_DD1D ^ n;
        while data.len() < 24 << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, format!("blob{n}"), data.as_slice()).unwrap();
        let tar = b.into_inner().unwrap();
        let (d, size) = store.put_blob(&tar).unwrap();
        layers.push(Descriptor::new(MediaType::ImageLayer, size, &d));
        diff_ids.push(d.to_string());
    }
    let config = ImageConfigurationBuilder::default()
        .rootfs(RootFsBuilder::default().typ("layers").diff_ids(diff_ids).build().unwrap())
        .build()
        .unwrap();
    let desc = store.put_image(&config, layers).unwrap();
    store.set_tag(&"big:1".parse::<Reference>().unwrap(), &desc).unwrap();
}

#[test]
fn load_killed_midway_leaves_a_consistent_store() {
    let src = Env::new();
    big_image(&src);
    let archive = src.path("big.tar");
    src.ok(&["save", "-o", archive.to_str().unwrap(), "big:1"]);

    // How long a whole load takes here, to aim the kills inside it.
    let probe = Env::new();
    let t = Instant::now();
    probe.ok(&["load", "-i", archive.to_str().unwrap()]);
    let full = t.elapsed();

    let env = Env::new();
    env.ok(&["images"]);
    let mut interrupted = 0;
    for frac in [0.1, 0.3, 0.5, 0.7, 0.9] {
        let mut child = env
            .cmd()
            .args(["load", "-i", archive.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(full.mul_f64(frac));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if status.code().is_none() {
            interrupted += 1;
        }
        // The store is usable and every blob matches its name.
        let images = env.ok(&["images"]);
        let bad: Vec<Digest> = env.store().verify_all().unwrap();
        assert!(bad.is_empty(), "after a kill at {frac}: corrupt blobs {bad:?}");
        // A name appears only with every blob it needs.
        if images.contains("big") {
            env.ok(&["inspect", "big:1"]);
            let img = env.store().resolve("big:1").unwrap();
            for d in img.layer_digests().unwrap() {
                assert!(env.store().has_blob(&d), "big:1 tagged but {d} missing");
            }
        }
        // Anything outside blobs/ and tmp/ is the layout itself.
        let blob_count = std::fs::read_dir(env.root().join("blobs/sha256")).unwrap().count();
        assert!(blob_count <= 6, "{blob_count} blobs");
    }
    assert!(interrupted >= 2, "only {interrupted} of 5 loads were killed midway; the test did not test");

    // The next load completes, and prune clears what the killed ones left in tmp/.
    env.ok(&["load", "-i", archive.to_str().unwrap()]);
    assert!(env.ok(&["images"]).contains("big"));
    env.ok(&["prune", "--keep-build-cache"]);
    assert_eq!(std::fs::read_dir(env.root().join("tmp")).unwrap().count(), 0);
    assert!(env.store().verify_all().unwrap().is_empty());
    let dir = env.path("rootfs");
    env.ok(&["unpack", "big:1", dir.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(dir.join("blob3")).unwrap().len(), 24 << 20);
}

#[test]
fn a_corrupt_blob_is_refused_on_read_and_on_load() {
    let env = Env::new();
    big_image(&env);
    let archive = env.path("big.tar");
    env.ok(&["save", "-o", archive.to_str().unwrap(), "big:1"]);
    // Flip one byte in the middle of the first large blob's content.
    let mut bytes = std::fs::read(&archive).unwrap();
    let mut ar = tar::Archive::new(bytes.as_slice());
    let at = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.size() > 1 << 20)
        .map(|e| (e.raw_file_position() + e.size() / 2) as usize)
        .unwrap();
    bytes[at] ^= 0xff;
    let bad = env.path("bad.tar");
    std::fs::write(&bad, &bytes).unwrap();
    let other = Env::new();
    let o = other.run(&["load", "-i", bad.to_str().unwrap()]);
    assert_ne!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("hashes to"), "{err}");
    assert!(!other.ok(&["images"]).contains("big"), "nothing named after a failed load");
    assert!(other.store().verify_all().unwrap().is_empty());
    assert_eq!(std::fs::read_dir(other.root().join("tmp")).unwrap().count(), 0, "temp blob removed");

    // A blob corrupted on disk is caught when read.
    let img = env.store().resolve("big:1").unwrap();
    let layer = img.layer_digests().unwrap()[0].clone();
    let path = env.store().blob_path(&layer);
    let mut b = std::fs::read(&path).unwrap();
    b[1000] ^= 1;
    std::fs::write(&path, b).unwrap();
    assert_eq!(env.store().verify_all().unwrap(), vec![layer]);
    let dir = env.path("rootfs");
    let o = env.run(&["unpack", "big:1", dir.to_str().unwrap()]);
    assert_ne!(o.status.code(), Some(0));
    assert!(!dir.exists(), "a failed unpack removes what it made");
}

//! Unpack throughput of a ≈200 MB image: twinbox's flattening unpacker vs `umoci unpack` of the
//! same OCI layout, measured in one run (removing the previous tree is not timed).
//!
//! `cargo bench -p twinbox-image --bench unpack` (as root, for ownership; umoci from apt).
//! Set `TWINBOX_BENCH_MB` to change the image size.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use oci_spec::image::{Descriptor, ImageConfigurationBuilder, MediaType, RootFsBuilder};
use twinbox_image::{rootfs, Digest, Reference, Store};

/// Deterministic, poorly compressible bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A layer shaped like a distro image: many small files in nested dirs, some large ones,
/// symlinks; half of each file compressible text, half noise.
fn layer(total: usize, seed: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::with_capacity(total + total / 8));
    let mut written = 0usize;
    let mut i = 0u64;
    while written < total {
        let dir = format!("usr/lib/pkg{:03}/sub{}", i / 40, i % 3);
        let size = if i.is_multiple_of(200) { 4 << 20 } else { 512 + (i as usize * 7919) % 48_000 };
        let mut data = noise(seed + i, size / 2);
        data.extend(std::iter::repeat_n(b"text line of a config file\n".as_slice(), size / 54).flatten());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, format!("{dir}/file{i}.so"), data.as_slice()).unwrap();
        if i.is_multiple_of(25) {
            let mut l = tar::Header::new_gnu();
            l.set_entry_type(tar::EntryType::Symlink);
            l.set_size(0);
            l.set_mode(0o777);
            l.set_uid(0);
            l.set_gid(0);
            l.set_mtime(1_700_000_000);
            b.append_link(&mut l, format!("{dir}/link{i}"), format!("file{i}.so")).unwrap();
        }
        written += data.len() + 512;
        i += 1;
    }
    b.into_inner().unwrap()
}

fn make_image(store: &Store, mb: usize) {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (n, share) in [(0u64, 6usize), (1, 3), (2, 1)] {
        let tar = layer((mb * share / 10) << 20, n * 1_000_003);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let (d, size) = store.put_blob(&gz).unwrap();
        layers.push(Descriptor::new(MediaType::ImageLayerGzip, size, &d));
        diff_ids.push(Digest::of(&tar).to_string());
    }
    let config = ImageConfigurationBuilder::default()
        .rootfs(RootFsBuilder::default().typ("layers").diff_ids(diff_ids).build().unwrap())
        .build()
        .unwrap();
    let desc = store.put_image(&config, layers).unwrap();
    store.set_tag(&"bench:1".parse::<Reference>().unwrap(), &desc).unwrap();
}

fn have_umoci() -> bool {
    Command::new("umoci").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn clear(p: &Path) {
    let _ = twinbox_image::store::remove_tree(p);
}

fn unpack(c: &mut Criterion) {
    let mb: usize = std::env::var("TWINBOX_BENCH_MB").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    make_image(&store, mb);
    let image = store.resolve("bench:1").unwrap();
    let out = dir.path().join("out");

    let mut g = c.benchmark_group("unpack");
    g.sample_size(10).measurement_time(Duration::from_secs(30)).throughput(Throughput::Bytes((mb as u64) << 20));
    g.bench_function(format!("twinbox {mb}MB"), |b| {
        b.iter_batched(|| clear(&out), |()| rootfs::flatten(&store, &image, &out).unwrap(), BatchSize::PerIteration)
    });
    if have_umoci() {
        let src = format!("{}:bench:1", store.root().display());
        g.bench_function(format!("umoci {mb}MB"), |b| {
            b.iter_batched(
                || clear(&out),
                |()| {
                    let st = Command::new("umoci").args(["unpack", "--image", &src]).arg(&out).status().unwrap();
                    assert!(st.success());
                },
                BatchSize::PerIteration,
            )
        });
    } else {
        eprintln!("umoci not installed: only twinbox measured (apt-get install umoci)");
    }
    g.finish();
    clear(&out);
}

criterion_group!(benches, unpack);
criterion_main!(benches);

//! The image crate's hot paths besides unpacking (see `unpack.rs`): hashing a layer-sized
//! stream into its digest, and resolving the process a run starts (what every `twinbox run`
//! of either isolation model does first).
//!
//! `cargo bench -p twinbox-image --bench hot_paths`

use std::hint::black_box;
use std::io::Write;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use oci_spec::image::{ConfigBuilder, ImageConfigurationBuilder};
use twinbox_image::digest::HashingWriter;
use twinbox_image::launch::{resolve, Overrides};

fn hashing(c: &mut Criterion) {
    let data: Vec<u8> = (0..64u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut g = c.benchmark_group("digest");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("sha256 of 64 MiB, written in 1 MiB chunks", |b| {
        b.iter(|| {
            let mut w = HashingWriter::new(std::io::sink());
            for chunk in data.chunks(1 << 20) {
                w.write_all(chunk).unwrap();
            }
            black_box(w.finish())
        })
    });
    g.finish();
}

fn launch(c: &mut Criterion) {
    let config = ImageConfigurationBuilder::default()
        .config(
            ConfigBuilder::default()
                .entrypoint(vec!["/hello".to_string()])
                .cmd(vec!["greet".to_string()])
                .env(vec!["PATH=/usr/bin:/bin".to_string(), "LANG=C.UTF-8".to_string()])
                .working_dir("/srv".to_string())
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let overrides = Overrides {
        cmd: vec!["spin".into(), "1000".into()],
        env: vec!["A=1".into(), "B=2".into()],
        user: Some("1000:1000".into()),
        ..Overrides::default()
    };
    c.bench_function("launch::resolve (entrypoint, cmd, env, numeric user)", |b| {
        b.iter(|| black_box(resolve("hello", black_box(&config), &[], &overrides, "box").unwrap()))
    });
}

criterion_group!(benches, hashing, launch);
criterion_main!(benches);

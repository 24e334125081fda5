//! Bundle generation, the runtime's part of every `twinbox run` before any namespace exists:
//! the image config and the run's flags → an OCI runtime spec (Docker's defaults: 14
//! capabilities, the default seccomp profile, rlimits, namespaces, cgroup limits) → config.json.
//!
//! `cargo bench -p twinbox-engine --bench bundle`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use oci_spec::image::{ConfigBuilder, ImageConfigurationBuilder};
use twinbox_engine::container::spec::{build_spec, NetSetup, OverlayStack};
use twinbox_engine::RunOptions;

fn bundle(c: &mut Criterion) {
    let config = ImageConfigurationBuilder::default()
        .config(
            ConfigBuilder::default()
                .entrypoint(vec!["/hello".to_string()])
                .cmd(vec!["greet".to_string()])
                .env(vec!["PATH=/usr/bin:/bin".to_string()])
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let layers = vec!["/var/lib/twinbox/layers/a".into(), "/var/lib/twinbox/layers/b".into()];
    let overlay = OverlayStack {
        lower: layers.clone(),
        upper: "/run/twinbox/c/upper".into(),
        work: "/run/twinbox/c/work".into(),
    };
    let opts = RunOptions {
        image: "hello:latest".into(),
        overrides: twinbox_image::launch::Overrides { cmd: vec!["true".into()], ..Default::default() },
        memory: Some(64 << 20),
        pids_limit: Some(100),
        cpus: Some(1.0),
        ..RunOptions::default()
    };
    let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    c.bench_function("build_spec (image config + flags → OCI spec)", |b| {
        b.iter(|| {
            black_box(build_spec(id, black_box(&config), &layers, &overlay, &opts, &NetSetup::default()).unwrap())
        })
    });
    let spec = build_spec(id, &config, &layers, &overlay, &opts, &NetSetup::default()).unwrap();
    c.bench_function("config.json serialisation", |b| {
        b.iter(|| black_box(serde_json::to_vec(black_box(&spec)).unwrap()))
    });
}

criterion_group!(benches, bundle);
criterion_main!(benches);

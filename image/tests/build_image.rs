//! Building images into a temp store: reproducibility, the layer cache, layer contents and
//! building on a local image.

mod build_common;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;

use build_common::*;
use twinbox_image::build::BuildOptions;
use twinbox_image::Store;

const HELLO: &str = "FROM scratch\nCOPY hello /hello\nCOPY dir /opt/dir\nCOPY link /opt/\nCMD [\"/hello\"]\n";

fn hello_context() -> tempfile::TempDir {
    let ctx = context(&[("hello", "#!/bin/sh\necho hello\n"), ("dir/sub/a.txt", "a"), ("dir/b.txt", "b")]);
    chmod(ctx.path(), "hello", 0o755);
    symlink("hello", ctx.path().join("link")).unwrap();
    ctx
}

#[test]
fn same_input_same_digest_in_fresh_stores() {
    let ctx1 = hello_context();
    let ctx2 = hello_context();
    // Different mtimes on the second context must not matter.
    let old = filetime::FileTime::from_unix_time(1_000_000, 0);
    filetime::set_file_mtime(ctx2.path().join("hello"), old).unwrap();
    filetime::set_file_mtime(ctx2.path().join("dir/sub"), old).unwrap();
    let (_d1, s1) = store();
    let (_d2, s2) = store();
    let a = build_ok(&s1, ctx1.path(), HELLO, &["hello:1"]);
    let b = build_ok(&s2, ctx2.path(), HELLO, &["hello:1"]);
    assert_eq!(a.manifest_digest, b.manifest_digest);
    assert_eq!(a.config_digest, b.config_digest);
    assert_eq!(a.steps, 5);
    assert_eq!(s1.resolve("hello:1").unwrap().manifest_digest, a.manifest_digest, "the tag points at the build");

    // One byte changed: another image.
    fs::write(ctx2.path().join("dir/sub/a.txt"), "A").unwrap();
    let (_d3, s3) = store();
    let c = build_ok(&s3, ctx2.path(), HELLO, &["hello:1"]);
    assert_ne!(a.manifest_digest, c.manifest_digest);
    // A mode change too.
    chmod(ctx1.path(), "hello", 0o700);
    let (_d4, s4) = store();
    let d = build_ok(&s4, ctx1.path(), HELLO, &[]);
    assert_ne!(a.manifest_digest, d.manifest_digest);
}

#[test]
fn source_date_epoch_sets_times_and_created() {
    let ctx = hello_context();
    let (_d, store) = store();
    let mut opts = options(ctx.path(), HELLO, &["t:1"]);
    opts.source_date_epoch = Some(1_700_000_000);
    let (out, _) = run(&store, &opts).unwrap();
    let img = store.resolve("t:1").unwrap();
    assert_eq!(img.config.created().as_deref(), Some("2023-11-14T22:13:20Z"));
    for h in img.config.history().as_ref().unwrap() {
        assert_eq!(h.created().as_deref(), Some("2023-11-14T22:13:20Z"));
    }
    for l in img.manifest.layers() {
        for (p, e) in layer_entries(&store, l) {
            assert_eq!(e.mtime, 1_700_000_000, "{p}");
        }
    }
    // Through the build arg, as BuildKit takes it.
    let mut opts2 = options(ctx.path(), HELLO, &["t:1"]);
    opts2.source_date_epoch = None;
    opts2.build_args.insert("SOURCE_DATE_EPOCH".into(), "1700000000".into());
    let (_d2, store2) = build_common::store();
    let (out2, lines) = run(&store2, &opts2).unwrap();
    assert_eq!(out.manifest_digest, out2.manifest_digest);
    assert!(!lines.iter().any(|l| l.contains("warning")), "{lines:?}");
    // keep_mtimes keeps the sources' times.
    let old = filetime::FileTime::from_unix_time(1_234_567, 0);
    filetime::set_file_mtime(ctx.path().join("hello"), old).unwrap();
    let mut opts3 = options(ctx.path(), HELLO, &["t:1"]);
    opts3.keep_mtimes = true;
    run(&store, &opts3).unwrap();
    let img = store.resolve("t:1").unwrap();
    let first = layer_map(&store, &img.manifest.layers()[0]);
    assert_eq!(first["hello"].mtime, 1_234_567);
}

#[test]
fn unchanged_rebuild_is_cached_and_a_change_invalidates_later_steps() {
    let ctx = context(&[("a", "a"), ("b", "b"), ("c", "c")]);
    let df = "FROM scratch\nCOPY a /a\nCOPY b /b\nLABEL x=y\nCOPY c /c\n";
    let (_d, store) = store();
    let opts = options(ctx.path(), df, &["c:1"]);
    let (first, lines) = run(&store, &opts).unwrap();
    assert_eq!((first.steps, first.cached_steps), (5, 0));
    assert_eq!(lines.iter().filter(|l| l.starts_with("--> sha256:")).count(), 4, "3 layers + manifest: {lines:?}");
    assert!(lines.contains(&"STEP 2/5: COPY a /a".to_owned()), "{lines:?}");

    let (second, lines) = run(&store, &opts).unwrap();
    assert_eq!(second.cached_steps, 3);
    assert_eq!(lines.iter().filter(|l| *l == "--> cached").count(), 3, "{lines:?}");
    assert_eq!(second.manifest_digest, first.manifest_digest);

    // no_cache rebuilds every layer, to the same bytes.
    let mut fresh = opts.clone();
    fresh.no_cache = true;
    let (third, _) = run(&store, &fresh).unwrap();
    assert_eq!((third.cached_steps, third.manifest_digest.clone()), (0, first.manifest_digest.clone()));

    // Changing b invalidates its step and every later one, not the one before.
    let before = store.resolve("c:1").unwrap();
    fs::write(ctx.path().join("b"), "B").unwrap();
    let (changed, lines) = run(&store, &opts).unwrap();
    assert_eq!(changed.cached_steps, 1, "{lines:?}");
    assert_ne!(changed.manifest_digest, first.manifest_digest);
    let after = store.resolve("c:1").unwrap();
    let (l0, l1) = (before.manifest.layers(), after.manifest.layers());
    assert_eq!(l0[0].digest(), l1[0].digest());
    assert_ne!(l0[1].digest(), l1[1].digest());
    assert_eq!(l0[2].digest(), l1[2].digest(), "same content gives the same layer bytes");

    // A change in an earlier instruction's text (the destination) also invalidates.
    let opts2 = options(ctx.path(), "FROM scratch\nCOPY a /a2\nCOPY b /b\nLABEL x=y\nCOPY c /c\n", &[]);
    let (moved, _) = run(&store, &opts2).unwrap();
    assert_eq!(moved.cached_steps, 0);
}

#[test]
fn cache_records_keep_layers_through_prune() {
    let ctx = context(&[("a", "a"), ("b", "b")]);
    let (_d, store) = store();
    let opts = options(ctx.path(), "FROM scratch\nCOPY a /a\nCOPY b /b\n", &[]);
    let (first, _) = run(&store, &opts).unwrap();
    // Untagged: prune drops the manifest and config, not the cached layers.
    let report = store.gc(false).unwrap();
    assert!(report.blobs >= 2, "{report:?}");
    assert!(!store.has_blob(&first.manifest_digest));
    let (second, _) = run(&store, &opts).unwrap();
    assert_eq!(second.cached_steps, 2);
    assert_eq!(second.manifest_digest, first.manifest_digest);
    // Dropping the cache drops the layers, and the next build is cold.
    store.gc(true).unwrap();
    let (third, _) = run(&store, &opts).unwrap();
    assert_eq!(third.cached_steps, 0);
}

#[test]
fn a_missing_cached_blob_is_rebuilt() {
    let ctx = context(&[("a", "a")]);
    let (_d, store) = store();
    let opts = options(ctx.path(), "FROM scratch\nCOPY a /a\n", &["m:1"]);
    run(&store, &opts).unwrap();
    let img = store.resolve("m:1").unwrap();
    let layer = img.layer_digests().unwrap().remove(0);
    fs::remove_file(store.blob_path(&layer)).unwrap();
    let (out, _) = run(&store, &opts).unwrap();
    assert_eq!(out.cached_steps, 0);
    assert!(store.has_blob(&layer));
}

fn tar_gz(entries: &[(&str, u32, u64, &str)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    for (path, mode, uid, content) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(*mode);
        h.set_uid(*uid);
        h.set_mtime(99);
        if path.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            b.append_data(&mut h, path, std::io::empty()).unwrap();
        } else {
            h.set_size(content.len() as u64);
            b.append_data(&mut h, path, content.as_bytes()).unwrap();
        }
    }
    b.into_inner().unwrap().finish().unwrap()
}

#[test]
fn layer_contents() {
    let ctx = context(&[
        ("app/main.sh", "#!/bin/sh\n"),
        ("app/data/x.txt", "secret"),
        ("conf.txt", "k=v\n"),
        ("README.md", "readme"),
        ("NOTES.md", "notes"),
        ("other.txt", "other"),
    ]);
    let root = ctx.path();
    chmod(root, "app/main.sh", 0o4755);
    chmod(root, "app/data/x.txt", 0o600);
    chmod(root, "app/data", 0o700);
    symlink("main.sh", root.join("app/link")).unwrap();
    fs::hard_link(root.join("app/main.sh"), root.join("app/hard")).unwrap();
    fs::write(
        root.join("pkg.tar.gz"),
        tar_gz(&[("pkg/", 0o755, 5, ""), ("pkg/bin/run", 0o755, 5, "run"), ("pkg/README", 0o644, 5, "r")]),
    )
    .unwrap();
    let mut plain = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(5);
    h.set_mode(0o640);
    plain.append_data(&mut h, "inner.txt", &b"plain"[..]).unwrap();
    fs::write(root.join("plain.tar"), plain.into_inner().unwrap()).unwrap();
    fs::write(root.join("fake.tar.gz"), "not an archive").unwrap();

    let df = "FROM scratch\n\
              COPY --chown=1000:1000 app /srv/app\n\
              COPY --chmod=0640 conf.txt /etc/conf/\n\
              ADD pkg.tar.gz /opt/\n\
              ADD plain.tar fake.tar.gz /plain/\n\
              WORKDIR /docs\n\
              COPY *.md ./\n\
              COPY other.txt renamed.txt\n";
    let (_d, store) = store();
    let mut opts = options(root, df, &["layers:1"]);
    opts.source_date_epoch = Some(42);
    run(&store, &opts).unwrap();
    let img = store.resolve("layers:1").unwrap();
    let layers = img.manifest.layers();
    assert_eq!(layers.len(), 6);
    assert_eq!(img.config.rootfs().diff_ids().len(), 6);

    // COPY --chown app /srv/app: parents root 0755, the rest 1000:1000 with source modes.
    let l = layer_entries(&store, &layers[0]);
    let paths: Vec<&str> = l.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        ["srv/", "srv/app/", "srv/app/data/", "srv/app/data/x.txt", "srv/app/hard", "srv/app/link", "srv/app/main.sh"],
        "sorted, parents first"
    );
    let m: HashMap<_, _> = l.into_iter().collect();
    assert_eq!((m["srv/"].kind, m["srv/"].mode, m["srv/"].uid, m["srv/"].gid), ("dir", 0o755, 0, 0));
    assert_eq!((m["srv/app/data/"].mode, m["srv/app/data/"].uid), (0o700, 1000));
    let x = &m["srv/app/data/x.txt"];
    assert_eq!((x.kind, x.mode, x.uid, x.gid, x.content.as_slice()), ("file", 0o600, 1000, 1000, &b"secret"[..]));
    assert_eq!((m["srv/app/hard"].kind, m["srv/app/hard"].mode), ("file", 0o4755), "setuid kept");
    assert_eq!(m["srv/app/main.sh"].kind, "link", "a hardlink within one COPY stays a hardlink");
    assert_eq!(m["srv/app/main.sh"].link.as_deref(), Some("srv/app/hard"));
    assert_eq!((m["srv/app/link"].kind, m["srv/app/link"].link.as_deref()), ("symlink", Some("main.sh")));
    for (p, e) in &m {
        assert_eq!(e.mtime, 42, "{p}");
        assert_eq!((e.uname.as_str(), e.gname.as_str()), ("", ""), "{p}");
    }

    // COPY --chmod into a directory.
    let m = layer_map(&store, &layers[1]);
    assert_eq!(m.keys().collect::<Vec<_>>(), ["etc/", "etc/conf/", "etc/conf/conf.txt"]);
    assert_eq!((m["etc/conf/conf.txt"].mode, m["etc/conf/conf.txt"].uid), (0o640, 0));

    // ADD extracts a .tar.gz, keeping its owners and modes, and does not store the archive.
    let m = layer_map(&store, &layers[2]);
    assert_eq!(m.keys().collect::<Vec<_>>(), ["opt/", "opt/pkg/", "opt/pkg/README", "opt/pkg/bin/", "opt/pkg/bin/run"]);
    assert_eq!(
        (m["opt/pkg/bin/run"].mode, m["opt/pkg/bin/run"].uid, m["opt/pkg/bin/run"].content.as_slice()),
        (0o755, 5, &b"run"[..])
    );
    assert_eq!(m["opt/pkg/bin/"].mode, 0o755, "a parent missing from the archive is 0755");
    assert_eq!(m["opt/pkg/README"].mtime, 42);

    // A plain tar is extracted too; a file that only looks like an archive is copied.
    let m = layer_map(&store, &layers[3]);
    assert_eq!(m.keys().collect::<Vec<_>>(), ["plain/", "plain/fake.tar.gz", "plain/inner.txt"]);
    assert_eq!(m["plain/inner.txt"].content, b"plain");
    assert_eq!(m["plain/fake.tar.gz"].content, b"not an archive");

    // Globs, relative to WORKDIR; a file to a new name.
    let m = layer_map(&store, &layers[4]);
    assert_eq!(m.keys().collect::<Vec<_>>(), ["docs/", "docs/NOTES.md", "docs/README.md"]);
    let m = layer_map(&store, &layers[5]);
    assert_eq!(m.keys().collect::<Vec<_>>(), ["docs/", "docs/renamed.txt"]);

    let history = img.config.history().clone().unwrap();
    let empty: Vec<bool> = history.iter().map(|h| h.empty_layer().unwrap_or(false)).collect();
    assert_eq!(empty, [false, false, false, false, true, false, false]);
    assert_eq!(history[0].created_by().as_deref(), Some("COPY --chown=1000:1000 app /srv/app"));
}

#[test]
fn dockerignore_and_whole_context_copy() {
    let ctx = context(&[
        ("src/main.rs", "fn main() {}"),
        ("debug.log", "log"),
        ("src/deep/trace.log", "log"),
        ("secret/key", "k"),
        ("secret/ok", "ok"),
        (".dockerignore", "# ignore logs\n**/*.log\nsecret\n!secret/ok\nDockerfile\n"),
    ]);
    symlink("/etc/passwd", ctx.path().join("passwd-link")).unwrap();
    let (_d, store) = store();
    let out = build_ok(&store, ctx.path(), "FROM scratch\nCOPY . /ctx\n", &["ign:1"]);
    let img = store.resolve("ign:1").unwrap();
    let m = layer_map(&store, &img.manifest.layers()[0]);
    assert_eq!(
        m.keys().collect::<Vec<_>>(),
        [
            "ctx/",
            "ctx/.dockerignore",
            "ctx/passwd-link",
            "ctx/secret/",
            "ctx/secret/ok",
            "ctx/src/",
            "ctx/src/deep/",
            "ctx/src/main.rs"
        ]
    );
    // A symlink inside a copied directory is stored as a symlink, never followed.
    assert_eq!(m["ctx/passwd-link"].link.as_deref(), Some("/etc/passwd"));
    assert_eq!(out.steps, 2);

    // An ignored file cannot be named directly either.
    let err = run(&store, &options(ctx.path(), "FROM scratch\nCOPY debug.log /\n", &[])).unwrap_err();
    assert!(chain(&err).contains("excluded by .dockerignore"), "{}", chain(&err));
}

#[test]
fn metadata_instructions_and_build_args() {
    let ctx = context(&[("a", "a")]);
    let df = "ARG BASE=scratch\n\
              ARG V=global\n\
              FROM $BASE\n\
              ARG V\n\
              ARG W=w-$V\n\
              ENV HOME=/root PATH=/usr/bin\n\
              ENV PATH=$PATH:/extra OLD=$HOME\n\
              LABEL \"org.example.v\"=\"$V\" w=${W} spaced=\"a b\"\n\
              EXPOSE 80 53/udp 8000-8001/TCP\n\
              WORKDIR /app\n\
              WORKDIR sub\n\
              USER 1000:1000\n\
              VOLUME /data\n\
              STOPSIGNAL SIGINT\n\
              CMD [\"serve\"]\n\
              ENTRYPOINT [\"/app/run\"]\n\
              COPY a .\n";
    let (_d, store) = store();
    let mut opts = options(ctx.path(), df, &["meta:1"]);
    opts.build_args.insert("V".into(), "override".into());
    opts.build_args.insert("UNUSED".into(), "x".into());
    let (_, lines) = run(&store, &opts).unwrap();
    assert!(lines.iter().any(|l| l.contains("warning") && l.contains("UNUSED")), "{lines:?}");
    let img = store.resolve("meta:1").unwrap();
    let c = img.config.config().clone().unwrap();
    assert_eq!(c.env().clone().unwrap(), ["PATH=/usr/bin:/extra", "HOME=/root", "OLD=/root"]);
    let labels = c.labels().clone().unwrap();
    assert_eq!(labels["org.example.v"], "override");
    assert_eq!(labels["w"], "w-override", "ARG defaults see earlier ARGs and build args");
    assert_eq!(labels["spaced"], "a b");
    let mut ports = c.exposed_ports().clone().unwrap();
    ports.sort();
    assert_eq!(ports, ["53/udp", "80/tcp", "8000/tcp", "8001/tcp"]);
    assert_eq!(c.working_dir().as_deref(), Some("/app/sub"));
    assert_eq!(c.user().as_deref(), Some("1000:1000"));
    assert_eq!(c.volumes().clone().unwrap(), ["/data"]);
    assert_eq!(c.stop_signal().as_deref(), Some("SIGINT"));
    assert_eq!(c.entrypoint().clone().unwrap(), ["/app/run"]);
    assert_eq!(c.cmd().clone().unwrap(), ["serve"], "a CMD of this Dockerfile survives a later ENTRYPOINT");
    let m = layer_map(&store, &img.manifest.layers()[0]);
    assert!(m.contains_key("app/sub/a"), "COPY to . lands in WORKDIR: {:?}", m.keys());
    let raw = fs::read(store.blob_path(&img.config_digest)).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(json["architecture"], if cfg!(target_arch = "x86_64") { "amd64" } else { "arm64" });
    assert_eq!(json["os"], "linux");

    // Shell-form CMD through SHELL.
    let (_d2, store2) = build_common::store();
    build_ok(
        &store2,
        ctx.path(),
        "FROM scratch\nCMD echo hi\nSHELL [\"/bin/bash\", \"-c\"]\nENTRYPOINT exec app\n",
        &["sh:1"],
    );
    let c = store2.resolve("sh:1").unwrap().config.config().clone().unwrap();
    assert_eq!(c.cmd().clone().unwrap(), ["/bin/sh", "-c", "echo hi"]);
    assert_eq!(c.entrypoint().clone().unwrap(), ["/bin/bash", "-c", "exec app"]);
}

/// A base image with a merged-/usr layout, a sticky /tmp, an /etc/passwd and config to inherit.
fn base_image(store: &Store) -> tempfile::TempDir {
    let ctx = context(&[
        ("rootfs/usr/bin/sh", "sh"),
        ("rootfs/etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234::/home/app:/bin/sh\n"),
        ("rootfs/etc/group", "root:x:0:\nstaff:x:50:\n"),
        ("rootfs/tmp/.keep", ""),
    ]);
    chmod(ctx.path(), "rootfs/tmp", 0o1777);
    symlink("usr/bin", ctx.path().join("rootfs/bin")).unwrap();
    build_ok(
        store,
        ctx.path(),
        "FROM scratch\nCOPY rootfs/ /\nENV A=1 PATH=/usr/bin\nLABEL base=yes\nCMD [\"/bin/sh\"]\n",
        &["base:1"],
    );
    ctx
}

#[test]
fn from_a_local_image() {
    let (_d, store) = store();
    let _base_ctx = base_image(&store);
    let base = store.resolve("base:1").unwrap();
    let ctx = context(&[("tool", "tool"), ("b", "b")]);
    let df = "ARG TAG=1\nFROM base:$TAG\nENV B=$A-2\nCOPY tool /bin/tool\nCOPY --chown=app:staff b /tmp/b\nENTRYPOINT [\"/bin/tool\"]\n";
    let out = build_ok(&store, ctx.path(), df, &["derived:1"]);
    assert_eq!((out.steps, out.cached_steps), (5, 0));
    let img = store.resolve("derived:1").unwrap();
    let layers = img.manifest.layers();
    assert_eq!(layers.len(), 3);
    assert_eq!(layers[0], base.manifest.layers()[0], "the base layer is reused as is");
    let c = img.config.config().clone().unwrap();
    assert_eq!(c.env().clone().unwrap(), ["PATH=/usr/bin", "A=1", "B=1-2"], "PATH from scratch replaced in place");
    assert_eq!(c.labels().clone().unwrap()["base"], "yes");
    assert_eq!(c.cmd(), &None, "ENTRYPOINT resets the CMD inherited from the base");
    let base_history = base.config.history().clone().unwrap();
    let history = img.config.history().clone().unwrap();
    assert_eq!(history.len(), base_history.len() + 4);
    assert_eq!(history[..base_history.len()], base_history[..]);
    assert_eq!(history.iter().filter(|h| !h.empty_layer().unwrap_or(false)).count(), 3);

    // /bin is a symlink to usr/bin in the base: the file goes through it, and the layer
    // does not shadow the symlink with a directory.
    let m = layer_map(&store, &layers[1]);
    assert_eq!(m.keys().collect::<Vec<_>>(), ["usr/", "usr/bin/", "usr/bin/tool"]);
    // Parents keep the base's metadata: /tmp stays sticky and world-writable; names resolve
    // through the base's /etc/passwd and /etc/group.
    let m = layer_map(&store, &layers[2]);
    assert_eq!(m["tmp/"].mode, 0o1777);
    assert_eq!((m["tmp/b"].uid, m["tmp/b"].gid), (1234, 50));

    // An unknown name is a clear error.
    let err = run(&store, &options(ctx.path(), "FROM base:1\nCOPY --chown=nobody b /b\n", &[])).unwrap_err();
    let msg = chain(&err);
    assert!(msg.contains("line 2") && msg.contains("nobody") && msg.contains("numeric"), "{msg}");
    // On scratch there is no /etc/passwd at all.
    let err = run(&store, &options(ctx.path(), "FROM scratch\nCOPY --chown=app b /b\n", &[])).unwrap_err();
    assert!(chain(&err).contains("/etc/passwd"), "{}", chain(&err));

    // A CMD given in the same Dockerfile before ENTRYPOINT is kept.
    build_ok(&store, ctx.path(), "FROM base:1\nCMD [\"x\"]\nENTRYPOINT [\"/bin/tool\"]\n", &["derived:2"]);
    let c = store.resolve("derived:2").unwrap().config.config().clone().unwrap();
    assert_eq!(c.cmd().clone().unwrap(), ["x"]);

    // By digest too.
    let by_digest = format!("base@{}", base.manifest_digest);
    build_ok(&store, ctx.path(), &format!("FROM {by_digest}\nCOPY b /b\n"), &["derived:3"]);
    assert_eq!(store.resolve("derived:3").unwrap().manifest.layers().len(), 2);
}

#[test]
fn warm_rebuild_skips_compression() {
    // Incompressible-ish content so gzip has real work to do.
    let ctx = tempfile::tempdir().unwrap();
    let mut f = fs::File::create(ctx.path().join("big")).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = Vec::with_capacity(8 << 20);
    while buf.len() < 8 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf.extend_from_slice(&x.to_le_bytes());
    }
    f.write_all(&buf).unwrap();
    drop(f);
    let (_d, store) = store();
    let opts: BuildOptions = options(ctx.path(), "FROM scratch\nCOPY big /big\n", &["big:1"]);
    let t = std::time::Instant::now();
    let (cold, _) = run(&store, &opts).unwrap();
    let cold_time = t.elapsed();
    let t = std::time::Instant::now();
    let (warm, _) = run(&store, &opts).unwrap();
    let warm_time = t.elapsed();
    assert_eq!(warm.cached_steps, 1);
    assert_eq!(warm.manifest_digest, cold.manifest_digest);
    eprintln!("cold {cold_time:?}, warm {warm_time:?}");
    assert!(warm_time < cold_time, "cold {cold_time:?}, warm {warm_time:?}");
}

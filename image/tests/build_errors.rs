//! What the builder refuses, and that its errors name the Dockerfile line and say what to do.

mod build_common;

use std::fs;
use std::os::unix::fs::symlink;

use build_common::*;
use twinbox_image::build::context::ContextError;
use twinbox_image::build::dockerfile::DockerfileError;
use twinbox_image::build::layer::LayerError;
use twinbox_image::build::BuildError;

fn fails(files: &[(&str, &str)], dockerfile: &str) -> (BuildError, String) {
    let ctx = context(files);
    fails_in(ctx.path(), dockerfile)
}

fn fails_in(ctx: &std::path::Path, dockerfile: &str) -> (BuildError, String) {
    let (_d, store) = store();
    let err = run(&store, &options(ctx, dockerfile, &["x:1"])).expect_err("the build should fail");
    let msg = chain(&err);
    // Nothing is tagged after a failed build.
    assert!(store.resolve("x:1").is_err());
    (err, msg)
}

#[test]
fn run_is_refused_before_any_work() {
    let (err, msg) = fails(&[("a", "a")], "FROM scratch\nCOPY a /a\nRUN echo hi\n");
    assert!(matches!(err, BuildError::RunNotSupported { line: 3 }), "{msg}");
    assert!(msg.starts_with("line 3: RUN needs root"), "{msg}");
    assert!(msg.contains("COPY/ADD"), "{msg}");
}

#[test]
fn parse_errors_carry_the_path_and_line() {
    let (err, msg) = fails(&[], "FROM scratch\nCOPY a /a\nFROBNICATE x\n");
    assert!(
        matches!(err, BuildError::Parse { source: DockerfileError::UnknownInstruction { line: 3, .. }, .. }),
        "{msg}"
    );
    assert!(msg.contains("Dockerfile: line 3: unknown instruction FROBNICATE"), "{msg}");
    let (err, msg) = fails(&[], "LABEL a=b\n");
    assert!(matches!(err, BuildError::Parse { source: DockerfileError::BeforeFrom { line: 1, .. }, .. }), "{msg}");
    let (err, _) = fails(&[], "# nothing\n");
    assert!(matches!(err, BuildError::Parse { source: DockerfileError::NoFrom, .. }));
    let (_d, store) = store();
    let ctx = context(&[]);
    let mut opts = options(ctx.path(), "FROM scratch\n", &[]);
    opts.dockerfile = Some("/nonexistent/Dockerfile".into());
    assert!(matches!(run(&store, &opts).unwrap_err(), BuildError::ReadDockerfile { .. }));
}

#[test]
fn missing_sources() {
    let (err, msg) = fails(&[("a", "a")], "FROM scratch\n\nCOPY a missing /dest/\n");
    assert!(matches!(err, BuildError::Context { line: 3, source: ContextError::NotFound { .. }, .. }), "{msg}");
    assert!(msg.contains("line 3: COPY a missing /dest/") && msg.contains("missing not found"), "{msg}");
    let (err, msg) = fails(&[("a", "a")], "FROM scratch\nCOPY *.txt /dest/\n");
    assert!(matches!(err, BuildError::Context { line: 2, source: ContextError::NoMatch { .. }, .. }), "{msg}");
    let (err, msg) = fails(&[("a", "a")], "FROM scratch\nCOPY a/b /dest/\n");
    assert!(matches!(err, BuildError::Context { source: ContextError::NotFound { .. }, .. }), "{msg}");
}

#[test]
fn sources_cannot_leave_the_context() {
    let outer = tempfile::tempdir().unwrap();
    write(outer.path(), "outside", "secret");
    write(outer.path(), "ctx/a", "a");
    let ctx = outer.path().join("ctx");

    let (err, msg) = fails_in(&ctx, "FROM scratch\nCOPY ../outside /\n");
    assert!(matches!(err, BuildError::Context { line: 2, source: ContextError::Outside { .. }, .. }), "{msg}");
    let (err, _) = fails_in(&ctx, "FROM scratch\nCOPY a/../../outside /\n");
    assert!(matches!(err, BuildError::Context { source: ContextError::Outside { .. }, .. }));
    // An absolute source means the context root, as in Docker: /outside is not the host's.
    let (err, msg) = fails_in(&ctx, &format!("FROM scratch\nCOPY {} /\n", outer.path().join("outside").display()));
    assert!(matches!(err, BuildError::Context { source: ContextError::NotFound { .. }, .. }), "{msg}");

    // Symlinks out of the context, relative or absolute, as the source or on the way to it.
    symlink("../outside", ctx.join("rel-link")).unwrap();
    symlink(outer.path().join("outside"), ctx.join("abs-link")).unwrap();
    symlink("..", ctx.join("up")).unwrap();
    symlink("/nonexistent/dangling", ctx.join("dangling")).unwrap();
    for (src, what) in
        [("rel-link", "rel-link"), ("abs-link", "abs-link"), ("up/outside", "up"), ("dangling", "dangling")]
    {
        let (err, msg) = fails_in(&ctx, &format!("FROM scratch\nCOPY {src} /x\n"));
        assert!(
            matches!(&err, BuildError::Context { line: 2, source: ContextError::SymlinkEscapes { path, .. }, .. } if path == what),
            "{src}: {msg}"
        );
        assert!(msg.contains("outside the build context"), "{msg}");
    }
    // A glob does not pick up escaping links silently either.
    let (err, _) = fails_in(&ctx, "FROM scratch\nCOPY *-link /x/\n");
    assert!(matches!(err, BuildError::Context { source: ContextError::SymlinkEscapes { .. }, .. }));

    // A symlink that stays inside is followed for a source.
    symlink("a", ctx.join("inside")).unwrap();
    let (_d, store) = store();
    build_ok(&store, &ctx, "FROM scratch\nCOPY inside /x\n", &["in:1"]);
    let img = store.resolve("in:1").unwrap();
    let m = layer_map(&store, &img.manifest.layers()[0]);
    assert_eq!((m["x"].kind, m["x"].content.as_slice()), ("file", &b"a"[..]));
}

#[test]
fn unsupported_features_say_so() {
    let (err, msg) = fails(&[], "FROM scratch\nADD https://example.com/x.tar.gz /\n");
    assert!(matches!(err, BuildError::AddUrl { line: 2, .. }), "{msg}");
    assert!(msg.contains("ADD from a URL is not supported"), "{msg}");
    let (err, msg) = fails(&[("a", "a")], "FROM scratch AS build\nCOPY a /a\nFROM scratch\nCOPY --from=build /a /a\n");
    assert!(matches!(err, BuildError::MultiStage { line: 3 }), "{msg}");
    let (err, msg) = fails(&[("a", "a")], "FROM scratch\nCOPY --from=other /a /a\n");
    assert!(matches!(err, BuildError::CopyFrom { line: 2 }), "{msg}");
    assert!(msg.contains("not supported"), "{msg}");
    let (err, _) = fails(&[], "FROM scratch\nHEALTHCHECK CMD true\n");
    assert!(matches!(err, BuildError::Unsupported { line: 2, instruction: "HEALTHCHECK" }));
    let (err, msg) = fails(&[], "FROM nosuchimage:1\n");
    assert!(matches!(err, BuildError::BaseImage { line: 1, .. }), "{msg}");
    assert!(msg.contains("no such image"), "{msg}");
    let (err, _) = fails(&[], "FROM --platform=linux/s390x scratch\n");
    assert!(matches!(err, BuildError::Platform { line: 1, .. }));
    // A here-document is named as such (it used to be "unknown instruction" on its next line).
    let (_, msg) = fails(&[], "FROM scratch\nRUN <<EOF\necho hi\nEOF\n");
    assert!(msg.contains("line 2: RUN <<EOF: here-documents are not supported"), "{msg}");
}

/// Arguments that start as the exec form must be a JSON array (`CMD [` used to become the
/// shell form silently); a shell command that starts with `[` stays one.
#[test]
fn a_broken_exec_form_is_an_error() {
    for (df, line) in [
        ("FROM scratch\nCMD [\n", 2),
        ("FROM scratch\nENTRYPOINT [\"/bin/sh\", -c]\n", 2),
        ("FROM scratch\nCMD [\"a\"\n", 2),
    ] {
        let (_, msg) = fails(&[], df);
        assert!(
            msg.contains(&format!("line {line}: ")) && msg.contains("starts as a JSON array but is not one"),
            "{df}: {msg}"
        );
    }
    let ok = twinbox_image::build::dockerfile::parse("FROM scratch\nCMD [ -f /x ] && echo yes\nENTRYPOINT []\n");
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn bad_arguments() {
    let files = [("a", "a"), ("b", "b")];
    let (err, msg) = fails(&files, "FROM scratch\nCOPY a b /dest\n");
    assert!(matches!(err, BuildError::DestNotDir { line: 2, .. }), "{msg}");
    let (err, _) = fails(&files, "FROM scratch\nCOPY * /dest\n");
    assert!(matches!(err, BuildError::DestNotDir { .. }), "a glob with several matches needs a directory");
    let (err, msg) = fails(&files, "FROM scratch\nCOPY --chmod=u+x a /a\n");
    assert!(matches!(err, BuildError::Chmod { line: 2, .. }), "{msg}");
    let (err, _) = fails(&files, "FROM scratch\nCOPY --chown=a:b:c a /a\n");
    assert!(matches!(err, BuildError::Chown { line: 2, .. }));
    let (err, _) = fails(&files, "FROM scratch\nEXPOSE 80/icmp\n");
    assert!(matches!(err, BuildError::Port { line: 2, .. }));
    let (err, _) = fails(&files, "FROM scratch\nEXPOSE 70000\n");
    assert!(matches!(err, BuildError::Port { .. }));
    let (err, _) = fails(&files, "FROM scratch\nSTOPSIGNAL not a signal\n");
    assert!(matches!(err, BuildError::Signal { line: 2, .. }));
    let (err, msg) = fails(&files, "FROM scratch\nENV A=\"${B:?must be set}\"\n");
    assert!(matches!(err, BuildError::Expand { line: 2, .. }), "{msg}");
    assert!(msg.contains("B: must be set"), "{msg}");
    let (err, _) = fails(&files, "FROM scratch\nCOPY a \"/b\n");
    assert!(matches!(err, BuildError::Expand { .. }));
    let (_d, store) = store();
    let ctx = context(&files);
    let mut opts = options(ctx.path(), "FROM scratch\n", &[]);
    opts.source_date_epoch = None;
    opts.build_args.insert("SOURCE_DATE_EPOCH".into(), "yesterday".into());
    assert!(matches!(run(&store, &opts).unwrap_err(), BuildError::Epoch { .. }));
}

#[test]
fn archives_cannot_escape_their_destination() {
    for name in ["../evil", "/etc/evil", "a/../../evil"] {
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(0o644);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, &b"evil"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let zstd = zstd::encode_all(&tar[..], 3).unwrap();
        let ctx = context(&[]);
        fs::write(ctx.path().join("evil.tar.zst"), zstd).unwrap();
        let (err, msg) = fails_in(ctx.path(), "FROM scratch\nADD evil.tar.zst /opt/\n");
        match &err {
            BuildError::Layer { line: 2, source, .. } => {
                assert!(matches!(**source, LayerError::ArchiveEscape { .. }), "{msg}")
            }
            _ => panic!("{name}: {msg}"),
        }
        assert!(msg.contains("refusing"), "{msg}");
    }
}

//! `RUN` in the builder, without a container runtime: an upper directory made by hand turned
//! into a layer (whiteouts, opaque directories, hardlinks, devices, xattrs), and builds whose
//! `RUN` steps a fake [`RunStep`] answers (what it is asked, the cache, failures, cleanup).

mod build_common;

use std::cell::RefCell;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use build_common::*;
use twinbox_image::build::layer::{write_layer, EntryKind};
use twinbox_image::build::upper::plan_from_upper;
use twinbox_image::build::{build_with, BuildError, BuildOptions, BuildOutput, RunRequest, RunStep, RunStepError};
use twinbox_image::{Digest, Store};

/// Skip (printing why) unless root; under CI=true a missing root is a failure.
fn root_or_skip(what: &str) -> bool {
    twinbox_testutil::require_root(what, "make device nodes and unpack as root")
}

fn mknod(path: &Path, kind: nix::sys::stat::SFlag, major: u64, minor: u64) {
    nix::sys::stat::mknod(
        path,
        kind,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
        nix::sys::stat::makedev(major, minor),
    )
    .unwrap_or_else(|e| panic!("mknod {}: {e}", path.display()));
}

/// PAX xattrs of a layer's entries, by path.
fn layer_xattrs(store: &Store, desc: &oci_spec::image::Descriptor) -> Vec<(String, String, Vec<u8>)> {
    let d = Digest::try_from(desc.digest()).unwrap();
    let bytes = fs::read(store.blob_path(&d)).unwrap();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let mut out = Vec::new();
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        if let Some(pax) = e.pax_extensions().unwrap() {
            for x in pax {
                let x = x.unwrap();
                if let Some(name) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    out.push((path.clone(), name.to_owned(), x.value_bytes().to_vec()));
                }
            }
        }
    }
    out
}

#[test]
fn upper_dir_becomes_a_layer() {
    if !root_or_skip("making whiteout devices and trusted.overlay xattrs") {
        return;
    }
    use nix::sys::stat::SFlag;
    let d = tempfile::tempdir().unwrap();
    let up = d.path().join("upper");
    fs::create_dir_all(up.join("app")).unwrap();
    fs::create_dir_all(up.join("bin")).unwrap();
    fs::create_dir_all(up.join("d/sub")).unwrap();
    fs::create_dir_all(up.join("dev")).unwrap();
    fs::write(up.join("app/out"), "built\n").unwrap();
    fs::set_permissions(up.join("app/out"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(up.join("app/out"), Some(1000), Some(1001)).unwrap();
    fs::hard_link(up.join("app/out"), up.join("app/same")).unwrap();
    std::os::unix::fs::symlink("out", up.join("app/link")).unwrap();
    nix::unistd::mkfifo(&up.join("app/fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    mknod(&up.join("dev/null2"), SFlag::S_IFCHR, 1, 3);
    mknod(&up.join("dev/blk"), SFlag::S_IFBLK, 7, 1);
    // What overlayfs leaves for `rm /bin/cat` and for `rm -rf /d && mkdir -p /d/sub`.
    mknod(&up.join("bin/cat"), SFlag::S_IFCHR, 0, 0);
    fs::write(up.join("d/b"), "b").unwrap();
    xattr::set(up.join("d"), "trusted.overlay.opaque", b"y").unwrap();
    // overlayfs's own bookkeeping is dropped; other xattrs are kept.
    xattr::set(up.join("bin"), "trusted.overlay.impure", b"y").unwrap();
    xattr::set(up.join("app/out"), "trusted.overlay.origin", b"\0\x01").unwrap();
    let user_xattrs = xattr::set(up.join("app/out"), "user.note", b"hi").is_ok();
    xattr::set(up.join("app/out"), "trusted.twinbox", b"kept").unwrap();
    let future = filetime::FileTime::from_unix_time(4_000_000_000, 0);
    filetime::set_symlink_file_times(up.join("app/out"), future, future).unwrap();

    let plan = plan_from_upper(&up, Some(1_700_000_000)).unwrap();
    let paths: Vec<&str> = plan.entries().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "app",
            "app/fifo",
            "app/link",
            "app/out",
            "app/same",
            "bin",
            "bin/.wh.cat",
            "d",
            "d/.wh..wh..opq",
            "d/b",
            "d/sub",
            "dev",
            "dev/blk",
            "dev/null2"
        ]
    );
    assert_eq!(plan.get("bin/.wh.cat").unwrap().kind, EntryKind::Whiteout);
    assert_eq!(plan.get("dev/null2").unwrap().kind, EntryKind::Char { major: 1, minor: 3 });
    assert_eq!(plan.get("dev/blk").unwrap().kind, EntryKind::Block { major: 7, minor: 1 });
    assert_eq!(plan.get("app/out").unwrap().mtime, 1_700_000_000, "clamped to SOURCE_DATE_EPOCH");

    let (_s, store) = store();
    let blob = write_layer(&store, &plan).unwrap();
    let layer = layer_map(&store, &blob.descriptor());
    let out = &layer["app/out"];
    assert_eq!((out.kind, out.mode, out.uid, out.gid, &out.content[..]), ("file", 0o640, 1000, 1001, &b"built\n"[..]));
    assert_eq!((layer["app/same"].kind, layer["app/same"].link.as_deref()), ("link", Some("app/out")));
    assert_eq!((layer["app/link"].kind, layer["app/link"].link.as_deref()), ("symlink", Some("out")));
    assert_eq!(layer["app/fifo"].kind, "fifo");
    assert_eq!(layer["dev/null2"].kind, "other");
    let wh = &layer["bin/.wh.cat"];
    assert_eq!((wh.kind, wh.mode, wh.content.len()), ("file", 0o600, 0));
    let opq = &layer["d/.wh..wh..opq"];
    assert_eq!((opq.kind, opq.mode, opq.content.len()), ("file", 0o755, 0));
    assert!(layer.contains_key("d/") && layer.contains_key("d/sub/"));

    let xattrs = layer_xattrs(&store, &blob.descriptor());
    assert!(xattrs.iter().all(|(_, n, _)| !n.starts_with("trusted.overlay.")), "{xattrs:?}");
    assert!(xattrs.contains(&("app/out".into(), "trusted.twinbox".into(), b"kept".to_vec())), "{xattrs:?}");
    if user_xattrs {
        assert!(xattrs.contains(&("app/out".into(), "user.note".into(), b"hi".to_vec())), "{xattrs:?}");
    }
    assert!(!xattrs.iter().any(|(p, _, _)| p == "app/same"), "a hardlink shares its first name's xattrs");

    // And back: unpacked as an overlay lower, the layer is the upper we started from.
    let dir = store.unpack_layer(&blob.descriptor(), &blob.diff_id).unwrap();
    let cat = fs::symlink_metadata(dir.join("bin/cat")).unwrap();
    assert!(cat.file_type().is_char_device() && cat.rdev() == 0);
    assert_eq!(xattr::get(dir.join("d"), "trusted.overlay.opaque").unwrap().as_deref(), Some(&b"y"[..]));
    assert!(!dir.join("d/.wh..wh..opq").exists());
    assert_eq!(fs::read(dir.join("d/b")).unwrap(), b"b");
    assert_eq!(xattr::get(dir.join("app/out"), "trusted.twinbox").unwrap().as_deref(), Some(&b"kept"[..]));
    let (a, b) = (fs::metadata(dir.join("app/out")).unwrap(), fs::metadata(dir.join("app/same")).unwrap());
    assert_eq!(a.ino(), b.ino());
}

#[test]
fn overlay_features_that_leave_changes_outside_the_upper_are_refused() {
    if !root_or_skip("setting trusted.overlay xattrs") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("moved")).unwrap();
    xattr::set(d.path().join("moved"), "trusted.overlay.redirect", b"/old").unwrap();
    let err = plan_from_upper(d.path(), None).unwrap_err();
    assert!(err.to_string().contains("redirect_dir=off"), "{err}");
}

/// What the fake runner was asked, and the upper directories it handed out.
#[derive(Debug, Clone)]
struct Asked {
    argv: Vec<String>,
    env: Vec<String>,
    workdir: String,
    user: String,
    lowers: Vec<PathBuf>,
    upper: PathBuf,
}

/// Answers each step by running `make(n, upper)` (n counts from 0); exits with `code` when
/// `fail_on` matches the argv's last word.
struct FakeRunner {
    scratch: PathBuf,
    asked: Rc<RefCell<Vec<Asked>>>,
    fail: Option<(String, i32)>,
    make: fn(usize, &Path),
}

impl RunStep for FakeRunner {
    fn run(&mut self, r: &RunRequest<'_>) -> Result<PathBuf, RunStepError> {
        let n = self.asked.borrow().len();
        let upper = self.scratch.join(format!("upper-{n}"));
        fs::create_dir_all(&upper).unwrap();
        self.asked.borrow_mut().push(Asked {
            argv: r.argv.to_vec(),
            env: r.env.to_vec(),
            workdir: r.workdir.to_owned(),
            user: r.user.to_owned(),
            lowers: r.lowers.to_vec(),
            upper: upper.clone(),
        });
        if let Some((last, code)) = &self.fail {
            if r.argv.last() == Some(last) {
                fs::remove_dir_all(&upper).unwrap();
                return Err(RunStepError::Exit { code: *code });
            }
        }
        (self.make)(n, &upper);
        Ok(upper)
    }
}

fn fake(make: fn(usize, &Path)) -> (tempfile::TempDir, FakeRunner, Rc<RefCell<Vec<Asked>>>) {
    let scratch = tempfile::tempdir().unwrap();
    let asked = Rc::new(RefCell::new(Vec::new()));
    let r = FakeRunner { scratch: scratch.path().to_owned(), asked: asked.clone(), fail: None, make };
    (scratch, r, asked)
}

fn run_with(
    store: &Store,
    opts: &BuildOptions,
    runner: &mut FakeRunner,
) -> Result<(BuildOutput, Vec<String>), BuildError> {
    let mut lines = Vec::new();
    let out = build_with(store, opts, &mut |l| lines.push(l.to_owned()), Some(runner))?;
    Ok((out, lines))
}

fn write_out(n: usize, upper: &Path) {
    fs::write(upper.join(format!("out{n}")), format!("step {n}\n")).unwrap();
}

#[test]
fn run_gets_env_args_workdir_user_and_shell() {
    // FROM scratch and one RUN: no lower layer to unpack, so no root needed.
    let ctx = context(&[]);
    let df = "FROM scratch\nARG A=1\nARG X=from-arg\nARG UNSET\nENV X=from-env Y=y\nWORKDIR /srv\nUSER 1000:1000\n\
              SHELL [\"/bin/bash\", \"-ec\"]\nRUN make $A\n";
    let (_d, store) = store();
    let (_s, mut runner, asked) = fake(write_out);
    let (out, lines) = run_with(&store, &options(ctx.path(), df, &["r:1"]), &mut runner).unwrap();
    let a = asked.borrow()[0].clone();
    assert_eq!(a.argv, ["/bin/bash", "-ec", "make $A"], "the shell expands, not the builder");
    assert_eq!(
        a.env,
        ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "X=from-env", "Y=y", "A=1"],
        "ENV wins over an ARG of the same name; an ARG without a value is not passed"
    );
    assert_eq!((a.workdir.as_str(), a.user.as_str()), ("/srv", "1000:1000"));
    assert!(a.lowers.is_empty());
    assert!(!a.upper.exists(), "the builder removes the upper dir it was given");
    let img = store.resolve("r:1").unwrap();
    assert_eq!(img.manifest.layers().len(), 1);
    let layer = layer_map(&store, &img.manifest.layers()[0]);
    assert_eq!(layer["out0"].content, b"step 0\n");
    assert_eq!(layer["out0"].mtime, 0, "clamped to SOURCE_DATE_EPOCH=0");
    let history = img.config.history().clone().unwrap();
    let last = history.last().unwrap();
    assert_eq!(last.created_by().as_deref(), Some("RUN |2 A=1 X=from-arg /bin/bash -ec make $A"));
    assert_eq!(last.empty_layer(), None);
    assert_eq!(out.cached_steps, 0);
    assert!(lines.iter().any(|l| l == "STEP 9/9: RUN make $A"), "{lines:?}");

    // Exec form: as given, and shown as JSON.
    let (_s, mut runner, asked) = fake(|_, _| {});
    run_with(&store, &options(ctx.path(), "FROM scratch\nRUN [\"/bin/tool\", \"a b\"]\n", &["e:1"]), &mut runner)
        .unwrap();
    assert_eq!(asked.borrow()[0].argv, ["/bin/tool", "a b"]);
    assert_eq!(asked.borrow()[0].workdir, "/");
    let img = store.resolve("e:1").unwrap();
    let h = img.config.history().clone().unwrap();
    assert_eq!(h.last().unwrap().created_by().as_deref(), Some(r#"RUN ["/bin/tool","a b"]"#));
    assert_eq!(img.manifest.layers().len(), 1, "a step that changed nothing still makes a layer, as Docker does");
    assert!(layer_entries(&store, &img.manifest.layers()[0]).is_empty());
}

#[test]
fn run_layers_are_cached_on_command_env_and_parent() {
    let ctx = context(&[]);
    let df = "FROM scratch\nENV V=1\nRUN one\n";
    let (_d, store) = store();
    let (_s, mut runner, asked) = fake(write_out);
    let (first, _) = run_with(&store, &options(ctx.path(), df, &["c:1"]), &mut runner).unwrap();
    let (second, lines) = run_with(&store, &options(ctx.path(), df, &["c:1"]), &mut runner).unwrap();
    assert_eq!(asked.borrow().len(), 1, "the second build did not run the step");
    assert_eq!(second.cached_steps, 1);
    assert!(lines.contains(&"--> cached".to_owned()), "{lines:?}");
    assert_eq!(first.manifest_digest, second.manifest_digest);
    // The environment is part of the key even though the command text is the same.
    run_with(&store, &options(ctx.path(), "FROM scratch\nENV V=2\nRUN one\n", &["c:2"]), &mut runner).unwrap();
    assert_eq!(asked.borrow().len(), 2);
    // So are build args.
    let mut opts = options(ctx.path(), "FROM scratch\nARG B=1\nRUN one\n", &["c:3"]);
    run_with(&store, &opts, &mut runner).unwrap();
    opts.build_args.insert("B".into(), "2".into());
    run_with(&store, &opts, &mut runner).unwrap();
    assert_eq!(asked.borrow().len(), 4);
    // --no-cache runs it again.
    let mut opts = options(ctx.path(), df, &["c:1"]);
    opts.no_cache = true;
    run_with(&store, &opts, &mut runner).unwrap();
    assert_eq!(asked.borrow().len(), 5);
}

#[test]
fn later_runs_see_the_layers_below_unpacked() {
    if !root_or_skip("unpacking layers as overlay lowers") {
        return;
    }
    let ctx = context(&[("a", "a")]);
    let df = "FROM scratch\nCOPY a /a\nRUN one\nRUN two\nCOPY a /b/\n";
    let (_d, store) = store();
    let (_s, mut runner, asked) = fake(write_out);
    run_with(&store, &options(ctx.path(), df, &["l:1"]), &mut runner).unwrap();
    let asked = asked.borrow();
    let img = store.resolve("l:1").unwrap();
    let ids = img.diff_ids().unwrap();
    assert_eq!(ids.len(), 4);
    assert_eq!(asked[0].lowers, [store.layer_dir(&ids[0])]);
    assert_eq!(asked[1].lowers, [store.layer_dir(&ids[0]), store.layer_dir(&ids[1])], "base first");
    assert_eq!(fs::read(store.layer_dir(&ids[1]).join("out0")).unwrap(), b"step 0\n");
}

#[test]
fn a_failing_run_fails_the_build_like_docker() {
    let ctx = context(&[]);
    let (_d, store) = store();
    let (_s, mut runner, _) = fake(write_out);
    runner.fail = Some(("false".into(), 1));
    let err = run_with(&store, &options(ctx.path(), "FROM scratch\nENV A=1\nRUN false\n", &["f:1"]), &mut runner)
        .unwrap_err();
    assert!(matches!(err, BuildError::RunFailed { line: 3, code: 1, .. }), "{err:?}");
    assert_eq!(chain(&err), "line 3: The command '/bin/sh -c false' returned a non-zero code: 1");
    assert!(store.resolve("f:1").is_err(), "nothing tagged");
    assert_eq!(fs::read_dir(store.build_cache_dir()).unwrap().count(), 0, "no cache record for a failed step");

    // A runner that cannot run at all.
    struct Broken;
    impl RunStep for Broken {
        fn run(&mut self, _: &RunRequest<'_>) -> Result<PathBuf, RunStepError> {
            Err(RunStepError::Runtime { code: twinbox_exit::INTERNAL, source: "no cgroup for you".into() })
        }
    }
    let mut lines = Vec::new();
    let opts = options(ctx.path(), "FROM scratch\nRUN true\n", &["f:1"]);
    let err = build_with(&store, &opts, &mut |l| lines.push(l.to_owned()), Some(&mut Broken)).unwrap_err();
    assert_eq!(chain(&err), "line 2: RUN true: running the step in a container: no cgroup for you");
    assert_eq!(twinbox_exit::ExitCode::exit_code(&err), twinbox_exit::INTERNAL, "the runner's failure, not the user's");
    assert!(store.resolve("f:1").is_err());
}

#[test]
fn without_a_runner_run_is_refused_and_says_root() {
    let ctx = context(&[]);
    let (_d, store) = store();
    let err = run(&store, &options(ctx.path(), "FROM scratch\nRUN true\n", &["n:1"])).unwrap_err();
    assert!(matches!(err, BuildError::RunNotSupported { line: 2 }));
    assert!(err.to_string().contains("RUN needs root"), "{err}");
}

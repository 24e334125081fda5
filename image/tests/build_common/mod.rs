//! Helpers shared by the `build_*` integration tests: temp stores, temp contexts, and a
//! reader for the layers the builder wrote.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use oci_spec::image::Descriptor;
use twinbox_image::build::{build, BuildError, BuildOptions, BuildOutput};
use twinbox_image::{Digest, Reference, Store};

/// A fresh store in a temp dir.
pub fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    (dir, store)
}

/// A temp context with these files (`path`, `content`); parents are created.
pub fn context(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (p, content) in files {
        write(dir.path(), p, content);
    }
    dir
}

/// Write a file under `root`, creating its parents.
pub fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, content).unwrap();
}

/// Set a path's permission bits.
pub fn chmod(root: &Path, rel: &str, mode: u32) {
    fs::set_permissions(root.join(rel), fs::Permissions::from_mode(mode)).unwrap();
}

/// Options for building `ctx` with the given Dockerfile text (written to `ctx/Dockerfile`).
pub fn options(ctx: &Path, dockerfile: &str, tags: &[&str]) -> BuildOptions {
    fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    BuildOptions {
        context: ctx.to_owned(),
        tags: tags.iter().map(|t| t.parse::<Reference>().unwrap()).collect(),
        source_date_epoch: Some(0),
        ..BuildOptions::default()
    }
}

/// Build and collect the progress lines.
pub fn run(store: &Store, opts: &BuildOptions) -> Result<(BuildOutput, Vec<String>), BuildError> {
    let mut lines = Vec::new();
    let out = build(store, opts, &mut |l| lines.push(l.to_owned()))?;
    Ok((out, lines))
}

/// Build `dockerfile` in `ctx` into `store`, expecting success.
pub fn build_ok(store: &Store, ctx: &Path, dockerfile: &str, tags: &[&str]) -> BuildOutput {
    run(store, &options(ctx, dockerfile, tags)).unwrap_or_else(|e| panic!("build failed: {}", chain(&e))).0
}

/// An error with its sources, as the CLI prints it.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// One entry of a layer tar, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    /// Kind: `dir`, `file`, `symlink`, `link`, `fifo`, ...
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub uname: String,
    pub gname: String,
    /// Symlink or hardlink target.
    pub link: Option<String>,
    pub content: Vec<u8>,
}

/// Read a gzip layer blob back: entries by path as written in the tar (dirs end in `/`),
/// in archive order.
pub fn layer_entries(store: &Store, desc: &Descriptor) -> Vec<(String, TarEntry)> {
    assert_eq!(desc.media_type().to_string(), "application/vnd.oci.image.layer.v1.tar+gzip");
    let d = Digest::try_from(desc.digest()).unwrap();
    let bytes = fs::read(store.blob_path(&d)).unwrap();
    assert_eq!(Digest::of(&bytes), d, "blob content matches its digest");
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let mut out = Vec::new();
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        let h = e.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => "dir",
            tar::EntryType::Regular => "file",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Link => "link",
            tar::EntryType::Fifo => "fifo",
            _ => "other",
        };
        let link = e.link_name().unwrap().map(|l| l.to_string_lossy().into_owned());
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        out.push((
            path,
            TarEntry {
                kind,
                mode: h.mode().unwrap(),
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                mtime: h.mtime().unwrap(),
                uname: h.username().unwrap().unwrap_or_default().to_owned(),
                gname: h.groupname().unwrap().unwrap_or_default().to_owned(),
                link,
                content,
            },
        ));
    }
    out
}

/// [`layer_entries`] as a map.
pub fn layer_map(store: &Store, desc: &Descriptor) -> BTreeMap<String, TarEntry> {
    layer_entries(store, desc).into_iter().collect()
}

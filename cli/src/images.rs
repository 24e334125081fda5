//! Image commands: build, images, inspect, tag, rmi, save, load, prune, unpack.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use twinbox_image::{archive, build, rootfs, Reference, Store};

use crate::UserError;

pub fn open(root: &Path) -> Result<Store> {
    Store::open(root).with_context(|| {
        format!("opening the image store at {} (set --root or TWINBOX_ROOT to use another)", root.display())
    })
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Name and optionally tag (NAME:TAG); may be repeated.
    #[arg(short = 't', long = "tag")]
    tags: Vec<String>,
    /// Dockerfile path (default: CONTEXT/Dockerfile).
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Build-time variable (KEY=VALUE, or KEY to take it from the environment).
    #[arg(long = "build-arg")]
    build_args: Vec<String>,
    /// Do not use the layer cache.
    #[arg(long)]
    no_cache: bool,
    /// Only print the image id.
    #[arg(short, long)]
    quiet: bool,
    /// Build context directory.
    context: PathBuf,
}

pub fn build(root: &Path, a: BuildArgs) -> Result<()> {
    let tags = a
        .tags
        .iter()
        .map(|t| t.parse::<Reference>().with_context(|| format!("invalid tag {t:?}")))
        .collect::<Result<Vec<_>>>()?;
    let mut build_args = BTreeMap::new();
    for kv in &a.build_args {
        match kv.split_once('=') {
            Some((k, v)) => build_args.insert(k.to_owned(), v.to_owned()),
            None => match std::env::var(kv) {
                Ok(v) => build_args.insert(kv.clone(), v),
                Err(_) => continue,
            },
        };
    }
    if !a.context.is_dir() {
        return Err(UserError(format!("build context {} is not a directory", a.context.display())).into());
    }
    let store = open(root)?;
    let opts = build::BuildOptions {
        context: a.context.clone(),
        dockerfile: a.file.clone(),
        tags,
        build_args,
        no_cache: a.no_cache,
        ..Default::default()
    };
    let quiet = a.quiet;
    let mut progress = |line: &str| {
        if !quiet {
            eprintln!("{line}");
        }
    };
    // RUN steps run in containers, which need root; without root the builder refuses RUN.
    let out = if nix::unistd::geteuid().is_root() {
        let runtime_root = std::env::var_os("TWINBOX_RUNTIME_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::containers::RUNTIME_ROOT.into());
        let engine = twinbox_engine::Engine::new(store.clone(), runtime_root)?;
        let mut runner = twinbox_engine::build_run::BuildRunner::new(&engine);
        build::build_with(&store, &opts, &mut progress, Some(&mut runner))?
    } else {
        build::build(&store, &opts, &mut progress)?
    };
    if quiet {
        println!("{}", out.config_digest);
    } else {
        eprintln!("{} steps, {} cached", out.steps, out.cached_steps);
        for t in &opts.tags {
            eprintln!("Successfully tagged {t}");
        }
        println!("{}", out.manifest_digest);
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ImagesArgs {
    /// Only show image ids.
    #[arg(short, long)]
    quiet: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Show full digests.
    #[arg(long)]
    no_trunc: bool,
}

pub fn images(root: &Path, a: ImagesArgs) -> Result<()> {
    let store = open(root)?;
    let list = store.images()?;
    let mut out = io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &list)?;
        writeln!(out)?;
        return Ok(());
    }
    let id = |d: &str| -> String {
        let hex = d.trim_start_matches("sha256:");
        if a.no_trunc {
            d.to_owned()
        } else {
            hex[..12].to_owned()
        }
    };
    if a.quiet {
        for i in &list {
            writeln!(out, "{}", id(&i.id))?;
        }
        return Ok(());
    }
    writeln!(out, "{:<40} {:<16} {:<14} {:<22} {:>10}", "REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE")?;
    for i in &list {
        let r: Reference = i.reference.parse()?;
        writeln!(
            out,
            "{:<40} {:<16} {:<14} {:<22} {:>10}",
            r.name(),
            r.tag().unwrap_or("<none>"),
            id(&i.id),
            i.created.as_deref().unwrap_or("-"),
            human_size(i.size)
        )?;
    }
    Ok(())
}

/// Bytes as Docker prints them (decimal units).
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.3}{}", UNITS[u]).replace(".000", "")
    }
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Images (name:tag, name@digest, or id).
    #[arg(required = true)]
    images: Vec<String>,
}

pub fn inspect(root: &Path, a: InspectArgs) -> Result<()> {
    let store = open(root)?;
    let index = store.index()?;
    let names = twinbox_image::store::names_by_manifest(&index);
    let mut out = Vec::new();
    for s in &a.images {
        let img = store.resolve(s)?;
        let tags = names.get(&img.manifest_digest.to_string()).cloned().unwrap_or_default();
        out.push(serde_json::json!({
            "Id": img.config_digest.to_string(),
            "Digest": img.manifest_digest.to_string(),
            "RepoTags": tags,
            "Created": img.config.created(),
            "Architecture": img.config.architecture().to_string(),
            "Os": img.config.os().to_string(),
            "Size": img.size(),
            "Config": img.config.config(),
            "RootFS": img.config.rootfs(),
            "History": img.config.history(),
            "Manifest": img.manifest,
        }));
    }
    let mut o = io::stdout().lock();
    serde_json::to_writer_pretty(&mut o, &out)?;
    writeln!(o)?;
    Ok(())
}

#[derive(Args, Debug)]
pub struct TagArgs {
    /// Existing image.
    source: String,
    /// New name (NAME[:TAG]).
    target: String,
}

pub fn tag(root: &Path, a: TagArgs) -> Result<()> {
    let target: Reference = a.target.parse().with_context(|| format!("invalid target name {:?}", a.target))?;
    if target.digest().is_some() {
        return Err(UserError(format!("cannot tag with a digest ({}): give NAME:TAG", a.target)).into());
    }
    let store = open(root)?;
    let img = store.resolve(&a.source)?;
    store.set_tag(&target, &img.descriptor)?;
    Ok(())
}

#[derive(Args, Debug)]
pub struct RmiArgs {
    /// Remove even if a container or VM uses the image.
    #[arg(short, long)]
    force: bool,
    /// Images to remove.
    #[arg(required = true)]
    images: Vec<String>,
}

pub fn rmi(root: &Path, a: RmiArgs) -> Result<()> {
    let store = open(root)?;
    let mut failed = None;
    for s in &a.images {
        match store.remove_image(s, a.force) {
            Ok((img, report)) => {
                println!(
                    "Untagged: {}",
                    img.reference.map(|r| r.to_string()).unwrap_or_else(|| img.manifest_digest.to_string())
                );
                if report.blobs > 0 {
                    println!("Deleted: {} blobs, {} layer dirs", report.blobs, report.layer_dirs);
                }
            }
            Err(e) => {
                eprintln!("twinbox: {e}");
                failed = Some(e);
            }
        }
    }
    match failed {
        Some(e) => Err(anyhow::Error::new(e).context("some images were not removed")),
        None => Ok(()),
    }
}

#[derive(Args, Debug)]
pub struct SaveArgs {
    /// Output file (an OCI archive); standard output when absent or `-`. An existing device
    /// or FIFO is written into, never replaced.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Images to save.
    #[arg(required = true)]
    images: Vec<String>,
}

pub fn save(root: &Path, a: SaveArgs) -> Result<()> {
    let store = open(root)?;
    match a.output.filter(|p| p.as_os_str() != "-") {
        Some(path) => {
            archive::save_to_path(&store, &a.images, &path).with_context(|| format!("saving to {}", path.display()))
        }
        None => {
            let stdout = io::stdout();
            if io::IsTerminal::is_terminal(&stdout) {
                return Err(UserError(
                    "refusing to write an archive to a terminal; give -o FILE or redirect the output".into(),
                )
                .into());
            }
            let mut out = io::BufWriter::with_capacity(1 << 20, stdout.lock());
            archive::save(&store, &a.images, &mut out).context("saving to standard output")?;
            io::Write::flush(&mut out).context("saving to standard output")
        }
    }
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Input archive (OCI archive or docker archive, optionally gzipped); stdin if absent.
    #[arg(short, long)]
    input: Option<PathBuf>,
}

pub fn load(root: &Path, a: LoadArgs) -> Result<()> {
    let store = open(root)?;
    let report = match &a.input {
        Some(p) => {
            let f = std::fs::File::open(p).map_err(|e| UserError(format!("cannot open {}: {e}", p.display())))?;
            archive::load(&store, f).with_context(|| format!("loading {}", p.display()))?
        }
        None => archive::load(&store, io::stdin().lock()).context("loading from standard input")?,
    };
    for r in &report.tagged {
        println!("Loaded image: {r}");
    }
    for d in &report.untagged {
        println!("Loaded image ID: {d}");
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Keep the build cache (by default it is dropped too).
    #[arg(long)]
    keep_build_cache: bool,
}

pub fn prune(root: &Path, a: PruneArgs) -> Result<()> {
    let store = open(root)?;
    // First the RUN step containers of killed builds, whose directories this removes.
    if nix::unistd::geteuid().is_root() {
        let runtime_root = std::env::var_os("TWINBOX_RUNTIME_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::containers::RUNTIME_ROOT.into());
        let engine = twinbox_engine::Engine::new(store.clone(), runtime_root)?;
        for line in twinbox_engine::build_run::stop_orphan_steps(&engine)? {
            println!("{line}");
        }
    }
    let r = store.gc(!a.keep_build_cache)?;
    // Templates of images no longer here, and what killed template makers left.
    let digests: std::collections::HashSet<String> = store.images()?.into_iter().map(|i| i.digest).collect();
    let templates = twinbox_engine::template::prune(&store, |d| digests.contains(d));
    println!(
        "Deleted {} blobs ({}), {} layer dirs, {} VM root disks, {} temp files, {} build cache records, {} microVM templates",
        r.blobs,
        human_size(r.bytes),
        r.layer_dirs,
        r.disks,
        r.temp,
        r.cache_records,
        templates.len()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct UnpackArgs {
    /// Image to unpack.
    image: String,
    /// Target directory (created; must be empty if it exists).
    dir: PathBuf,
}

pub fn unpack(root: &Path, a: UnpackArgs) -> Result<()> {
    if a.dir.exists() && std::fs::read_dir(&a.dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(
            UserError(format!("{} exists and is not empty; give a new or empty directory", a.dir.display())).into()
        );
    }
    let store = open(root)?;
    let img = store.resolve(&a.image)?;
    let created = !a.dir.exists();
    match rootfs::flatten(&store, &img, &a.dir) {
        Ok(stats) => {
            eprintln!("{} entries, {} bytes", stats.entries, stats.bytes);
            Ok(())
        }
        Err(e) => {
            if created {
                let _ = twinbox_image::store::remove_tree(&a.dir);
            }
            Err(e.into())
        }
    }
}

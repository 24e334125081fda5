//! The image builder: `twinbox build -t NAME:TAG [-f Dockerfile] [--build-arg K=V] DIR`.
//!
//! ```text
//! Dockerfile ─► dockerfile::parse ─► instructions ─► per step:
//!   FROM              base image (layers, config, history) from the Store, or scratch
//!   ARG ENV LABEL …   config only (history entry with empty_layer)
//!   COPY / ADD        Context (sources, .dockerignore) ─► cache key ─► hit: reuse the layer
//!                                                                 └► miss: LayerPlan ─► tar+gzip blob
//!   RUN               cache key ─► hit: reuse the layer
//!                               └► miss: unpack the layers so far ─► RunStep (a container over
//!                                  them) ─► its overlayfs upper dir ─► upper::plan_from_upper ─► blob
//! ─► config + manifest in the Store ─► tags
//! ```
//!
//! Builds are reproducible: entries are sorted, times are `SOURCE_DATE_EPOCH` (or 0), owners
//! are 0 unless `--chown`, and the config's `created` is the same epoch, so the same context
//! and Dockerfile give the same manifest digest on any machine.
//!
//! The layer cache maps a key — the diff ids below the step, the step after substitution,
//! and a hash of every source's path, type, mode, link target and content — to the layer blob
//! it produced (`build-cache/<key>` in the store, a JSON record naming the blob, which keeps it
//! alive through `prune`). An unchanged step only hashes its sources.
//!
//! `RUN` needs a container runtime, which this crate does not have: [`build_with`] takes a
//! [`RunStep`] (the runtime crate's `engine::build_run::BuildRunner`); [`build`] has none and
//! refuses `RUN` before doing any work. A `RUN` step runs its command (`SHELL` + the line for
//! the shell form, as given for the exec form) with the image's `ENV` plus the `ARG` values in
//! effect (an `ENV` of the same name wins), its `WORKDIR` and `USER`, no network, stdout and
//! stderr going to the build's. What it changed becomes a layer, even when it changed nothing
//! (an empty layer, as Docker makes). A `RUN` layer is only as reproducible as its command:
//! file times are kept, or clamped to `SOURCE_DATE_EPOCH` when one is given. Its cache key is
//! the diff ids below it, the command, the environment, working directory and user.

pub mod context;
pub mod dockerfile;
pub mod layer;
pub mod shell;
pub mod upper;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{Config, Descriptor, History, HistoryBuilder, ImageConfiguration};
use serde::{Deserialize, Serialize};
use twinbox_exit::ExitCode;

use crate::digest::{Digest, HashingWriter};
use crate::reference::Reference;
use crate::store::{host_platform, Store, StoreError};
use crate::unpack::Compression;

use context::{Context, ContextError, Item, ItemKind, Source};
use dockerfile::{ArgDecl, Command, CommandLine, CopyArgs, DockerfileError, Instruction};
use layer::{Entry, EntryKind, LayerBlob, LayerError, LayerPlan, LowerFs, LowerKind, LAYER_MEDIA_TYPE};
use shell::ShellError;

/// Version of the cache key and layer layout; bump it when either changes.
const CACHE_VERSION: u32 = 1;
/// `PATH` of an image built `FROM scratch`, as Docker sets it.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// The context directory.
    pub context: PathBuf,
    /// The Dockerfile; `CONTEXT/Dockerfile` when `None`.
    pub dockerfile: Option<PathBuf>,
    /// Names to tag the image with.
    pub tags: Vec<Reference>,
    /// `--build-arg K=V` values (override `ARG` defaults).
    pub build_args: BTreeMap<String, String>,
    /// Do not look layers up in the build cache (they are still recorded).
    pub no_cache: bool,
    /// Keep the source files' modification times instead of the fixed epoch.
    pub keep_mtimes: bool,
    /// Timestamp for file times and `created`; when `None`, the `SOURCE_DATE_EPOCH` build arg
    /// or environment variable, else 0.
    pub source_date_epoch: Option<u64>,
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildOutput {
    /// The manifest's descriptor (what the tags point to).
    pub manifest: Descriptor,
    /// Digest of the manifest.
    pub manifest_digest: Digest,
    /// Digest of the config (the image id).
    pub config_digest: Digest,
    /// Instructions from `FROM` on.
    pub steps: usize,
    /// `COPY`/`ADD`/`RUN` steps whose layer came from the cache.
    pub cached_steps: usize,
}

/// What a `RUN` step asks of a container runtime.
#[derive(Debug, Clone)]
pub struct RunRequest<'a> {
    /// The unpacked layers of the image so far, base first (overlayfs lowers).
    pub lowers: &'a [PathBuf],
    /// The command (`SHELL` + the line for the shell form).
    pub argv: &'a [String],
    /// `KEY=VALUE` environment (ENV and ARG values).
    pub env: &'a [String],
    /// Working directory (absolute; it may not exist yet, the runner creates it).
    pub workdir: &'a str,
    /// User (`USER`), empty for root.
    pub user: &'a str,
}

/// How `RUN` is executed: run the command in a container over `lowers` and return the
/// directory holding what it changed (an overlayfs upper directory: whiteouts as 0/0
/// character devices, opaque directories with `trusted.overlay.opaque=y`). The builder owns
/// that directory from then on: it turns it into a layer and removes it. Whatever else the
/// step made (bundle, work dir, runtime state, cgroup) the runner removes before it returns,
/// whether the step succeeded or not.
pub trait RunStep {
    /// Run one step; returns the upper directory.
    fn run(&mut self, request: &RunRequest<'_>) -> Result<PathBuf, RunStepError>;
}

/// Why a [`RunStep`] produced no layer.
#[derive(Debug, thiserror::Error)]
pub enum RunStepError {
    /// The command ran and exited with a non-zero code (128+N when killed by signal N).
    #[error("the command exited with code {code}")]
    Exit {
        /// The exit code.
        code: i32,
    },
    /// The step could not be run (the runtime's own error).
    #[error("running the step in a container")]
    Runtime {
        /// The exit code the error calls for (its [`ExitCode::exit_code`]), kept apart because
        /// the error itself is the runner's type, unknown here.
        code: i32,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl RunStepError {
    /// The runner's own error, with the exit code it calls for.
    pub fn runtime<E: ExitCode + Send + Sync + 'static>(error: E) -> Self {
        RunStepError::Runtime { code: error.exit_code(), source: Box::new(error) }
    }
}

impl ExitCode for RunStepError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{NOT_EXECUTABLE, NOT_FOUND, USER_ERROR};
        match self {
            // The Dockerfile's command failed, or names a program the image cannot run.
            RunStepError::Exit { .. } => USER_ERROR,
            RunStepError::Runtime { code: NOT_EXECUTABLE | NOT_FOUND, .. } => USER_ERROR,
            RunStepError::Runtime { code, .. } => *code,
        }
    }
}

/// Why a build failed. Errors about an instruction name its Dockerfile line.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Dockerfile could not be read.
    #[error("cannot read the Dockerfile {}", path.display())]
    ReadDockerfile {
        /// Its path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The Dockerfile does not parse.
    #[error("{}", path.display())]
    Parse {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: DockerfileError,
    },
    /// The context directory is unusable.
    #[error("opening the build context")]
    OpenContext(#[source] ContextError),
    /// `RUN` without a container runtime (the CLI has one only when it runs as root).
    #[error("line {line}: RUN needs root: it runs the command in a container, and twinbox runs containers only as root; run the build as root (sudo), or build with COPY/ADD only")]
    RunNotSupported {
        /// Where.
        line: usize,
    },
    /// A `RUN` command exited non-zero (Docker's wording).
    #[error("line {line}: The command '{command}' returned a non-zero code: {code}")]
    RunFailed {
        /// Where.
        line: usize,
        /// The command, its words joined by spaces.
        command: String,
        /// Its exit code (128+N when killed by signal N).
        code: i32,
    },
    /// A `RUN` step could not be run.
    #[error("line {line}: {instruction}")]
    Run {
        /// Where.
        line: usize,
        /// The instruction.
        instruction: String,
        /// Why.
        #[source]
        source: RunStepError,
    },
    /// The layers under a `RUN` step could not be unpacked for it.
    #[error("line {line}: {instruction}: unpacking the layers below it")]
    UnpackLowers {
        /// Where.
        line: usize,
        /// The instruction.
        instruction: String,
        /// Why.
        #[source]
        source: Box<StoreError>,
    },
    /// What a `RUN` step changed could not be turned into a layer.
    #[error("line {line}: {instruction}: storing what the command changed")]
    Upper {
        /// Where.
        line: usize,
        /// The instruction.
        instruction: String,
        /// Why.
        #[source]
        source: upper::UpperError,
    },
    /// A second `FROM`.
    #[error("line {line}: a second FROM: multi-stage builds are not supported yet; build each stage as its own image and use FROM IMAGE")]
    MultiStage {
        /// Where.
        line: usize,
    },
    /// `COPY --from`.
    #[error(
        "line {line}: COPY --from is not supported (no multi-stage builds yet); copy from the build context instead"
    )]
    CopyFrom {
        /// Where.
        line: usize,
    },
    /// An instruction the builder does not implement.
    #[error("line {line}: {instruction} is not supported by twinbox build; remove it")]
    Unsupported {
        /// Where.
        line: usize,
        /// Which.
        instruction: &'static str,
    },
    /// `ADD https://…`.
    #[error("line {line}: ADD from a URL is not supported ({url}); download it into the build context and COPY it")]
    AddUrl {
        /// Where.
        line: usize,
        /// The URL.
        url: String,
    },
    /// Variable substitution failed.
    #[error("line {line}: {instruction}")]
    Expand {
        /// Where.
        line: usize,
        /// The instruction.
        instruction: String,
        /// Why.
        #[source]
        source: ShellError,
    },
    /// `FROM --platform` for another platform.
    #[error("line {line}: FROM --platform={platform}: only the host platform {host} can be built")]
    Platform {
        /// Where.
        line: usize,
        /// Asked for.
        platform: String,
        /// The host's.
        host: String,
    },
    /// The base image is not in the store.
    #[error("line {line}: FROM {image}")]
    BaseImage {
        /// Where.
        line: usize,
        /// The image.
        image: String,
        /// Why.
        #[source]
        source: Box<StoreError>,
    },
    /// A source could not be read from the context.
    #[error("line {line}: {instruction}")]
    Context {
        /// Where.
        line: usize,
        /// The instruction.
        instruction: String,
        /// Why.
        #[source]
        source: ContextError,
    },
    /// Several sources and a destination that is not a directory.
    #[error("line {line}: {instruction}: with several sources the destination must be a directory ending in /")]
    DestNotDir {
        /// Where.
        line: usize,
        /// The instruction.
        instruction: String,
    },
    /// Writing the layer failed.
    #[error("line {line}: {instruction}")]
    Layer {
        /// Where.
        line: usize,
        /// The instruction.
        instruction: String,
        /// Why.
        #[source]
        source: Box<LayerError>,
    },
    /// `--chmod` that is not an octal mode.
    #[error("line {line}: --chmod={value}: give an octal mode such as 755 or 0644")]
    Chmod {
        /// Where.
        line: usize,
        /// The value.
        value: String,
    },
    /// `--chown` that is not `USER[:GROUP]`.
    #[error("line {line}: --chown={value}: give USER[:GROUP], by name or numeric id")]
    Chown {
        /// Where.
        line: usize,
        /// The value.
        value: String,
    },
    /// A `--chown` name the image's `/etc/passwd` or `/etc/group` does not have.
    #[error("line {line}: --chown: {kind} {name:?} is not in the image's /etc/{file}; use a numeric id")]
    UnknownOwner {
        /// Where.
        line: usize,
        /// `user` or `group`.
        kind: &'static str,
        /// `passwd` or `group`.
        file: &'static str,
        /// The name.
        name: String,
    },
    /// `EXPOSE` with something that is not a port.
    #[error("line {line}: EXPOSE {port}: give PORT[/tcp|/udp|/sctp] or a range START-END[/PROTO]")]
    Port {
        /// Where.
        line: usize,
        /// What was given.
        port: String,
    },
    /// `STOPSIGNAL` with something that is not a signal.
    #[error("line {line}: STOPSIGNAL {signal:?}: give a signal name (SIGTERM) or number (15)")]
    Signal {
        /// Where.
        line: usize,
        /// What was given.
        signal: String,
    },
    /// `SOURCE_DATE_EPOCH` that is not a number.
    #[error("SOURCE_DATE_EPOCH={value:?} is not a number of seconds since 1970")]
    Epoch {
        /// What was given.
        value: String,
    },
    /// A `-t` reference with a digest.
    #[error("cannot tag {reference}: a tag cannot carry a digest; use NAME:TAG")]
    TagWithDigest {
        /// The reference.
        reference: String,
    },
    /// A file of the builder's own could not be written.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Storing the config, manifest or tags failed.
    #[error("storing the image")]
    Store(#[source] Box<StoreError>),
}

impl ExitCode for BuildError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        match self {
            BuildError::Parse { source, .. } => source.exit_code(),
            BuildError::OpenContext(e) | BuildError::Context { source: e, .. } => e.exit_code(),
            BuildError::Run { source, .. } => source.exit_code(),
            BuildError::UnpackLowers { source, .. } | BuildError::BaseImage { source, .. } => source.exit_code(),
            BuildError::Store(e) => e.exit_code(),
            BuildError::Upper { source, .. } => source.exit_code(),
            BuildError::Expand { source, .. } => source.exit_code(),
            BuildError::Layer { source, .. } => source.exit_code(),
            // What the Dockerfile, the context or the flags ask for.
            BuildError::ReadDockerfile { .. }
            | BuildError::RunNotSupported { .. }
            | BuildError::RunFailed { .. }
            | BuildError::MultiStage { .. }
            | BuildError::CopyFrom { .. }
            | BuildError::Unsupported { .. }
            | BuildError::AddUrl { .. }
            | BuildError::Platform { .. }
            | BuildError::DestNotDir { .. }
            | BuildError::Chmod { .. }
            | BuildError::Chown { .. }
            | BuildError::UnknownOwner { .. }
            | BuildError::Port { .. }
            | BuildError::Signal { .. }
            | BuildError::Epoch { .. }
            | BuildError::TagWithDigest { .. } => USER_ERROR,
            BuildError::Io { .. } => INTERNAL,
        }
    }
}

/// Build the image `opts` describes into `store`, without a container runtime: a Dockerfile
/// with `RUN` is refused ([`BuildError::RunNotSupported`]). `progress` receives one line per
/// step (`STEP 2/6: COPY hello /hello`) and per layer (`--> cached`, `--> sha256:…`).
pub fn build(store: &Store, opts: &BuildOptions, progress: &mut dyn FnMut(&str)) -> Result<BuildOutput, BuildError> {
    build_with(store, opts, progress, None)
}

/// [`build`], with `runner` executing `RUN` steps. A failing step fails the build
/// ([`BuildError::RunFailed`]) and nothing is tagged.
pub fn build_with(
    store: &Store,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(&str),
    runner: Option<&mut dyn RunStep>,
) -> Result<BuildOutput, BuildError> {
    for t in &opts.tags {
        if t.digest().is_some() {
            return Err(BuildError::TagWithDigest { reference: t.to_string() });
        }
    }
    let path = opts.dockerfile.clone().unwrap_or_else(|| opts.context.join("Dockerfile"));
    let text = fs::read_to_string(&path).map_err(|source| BuildError::ReadDockerfile { path: path.clone(), source })?;
    let df = dockerfile::parse(&text).map_err(|source| BuildError::Parse { path: path.clone(), source })?;
    preflight(&df.instructions, runner.is_some())?;
    let ctx = Context::open(&opts.context).map_err(BuildError::OpenContext)?;
    let (epoch, epoch_given) = match source_date_epoch(opts)? {
        Some(e) => (e, true),
        None => (0, false),
    };
    // Hold the store's writer lock so a concurrent prune waits for our untagged blobs.
    let _guard = store.writer_guard().map_err(|e| BuildError::Store(Box::new(e)))?;
    let mut b = Builder {
        store,
        opts,
        ctx,
        escape: df.escape,
        epoch,
        epoch_given,
        // Re-borrowed so that its trait object's lifetime can shrink to the builder's.
        runner: runner.map(|r| r as &mut dyn RunStep),
        created: rfc3339(epoch),
        progress,
        config: ImageConfiguration::default(),
        run: Config::default(),
        layers: Vec::new(),
        diff_ids: Vec::new(),
        history: Vec::new(),
        global_args: BTreeMap::new(),
        args: BTreeMap::new(),
        used_args: BTreeSet::new(),
        cmd_set: false,
        shell: default_shell(),
        lower: None,
        cached_steps: 0,
    };
    if opts.build_args.contains_key("SOURCE_DATE_EPOCH") {
        b.used_args.insert("SOURCE_DATE_EPOCH".into());
    }
    let first_from = df.instructions.iter().position(|i| matches!(i.command, Command::From { .. })).unwrap_or(0);
    let (globals, stage) = df.instructions.split_at(first_from);
    for ins in globals {
        if let Command::Arg(decls) = &ins.command {
            b.global_arg(ins, decls)?;
        }
    }
    let total = stage.len();
    for (n, ins) in stage.iter().enumerate() {
        (b.progress)(&format!("STEP {}/{total}: {}", n + 1, ins.text));
        b.step(ins)?;
    }
    let unused: Vec<&str> = opts.build_args.keys().filter(|k| !b.used_args.contains(*k)).map(String::as_str).collect();
    if !unused.is_empty() {
        (b.progress)(&format!("[warning] build args not used by any ARG: {}", unused.join(", ")));
    }
    b.finish(total)
}

/// Refuse what cannot be built before doing any work.
fn preflight(instructions: &[Instruction], can_run: bool) -> Result<(), BuildError> {
    let mut froms = 0;
    for ins in instructions {
        match &ins.command {
            Command::From { .. } => {
                froms += 1;
                if froms > 1 {
                    return Err(BuildError::MultiStage { line: ins.line });
                }
            }
            Command::Run(_) if !can_run => return Err(BuildError::RunNotSupported { line: ins.line }),
            Command::Copy(CopyArgs { from: Some(_), .. }) => return Err(BuildError::CopyFrom { line: ins.line }),
            Command::Healthcheck(_) | Command::Onbuild(_) => {
                return Err(BuildError::Unsupported { line: ins.line, instruction: ins.keyword() })
            }
            _ => {}
        }
    }
    Ok(())
}

/// The build's `SOURCE_DATE_EPOCH`, if it has one.
fn source_date_epoch(opts: &BuildOptions) -> Result<Option<u64>, BuildError> {
    if let Some(e) = opts.source_date_epoch {
        return Ok(Some(e));
    }
    let value = match opts.build_args.get("SOURCE_DATE_EPOCH") {
        Some(v) => v.clone(),
        None => match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) if !v.trim().is_empty() => v,
            _ => return Ok(None),
        },
    };
    value.trim().parse().map(Some).map_err(|_| BuildError::Epoch { value })
}

fn rfc3339(epoch: u64) -> String {
    let secs = i64::try_from(epoch).unwrap_or(i64::MAX);
    chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn default_shell() -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into()]
}

/// The values of `ARG TARGETOS` and friends when declared without a value.
fn automatic_arg(name: &str) -> Option<String> {
    let platform = host_platform();
    let (os, arch) = platform.split_once('/').unwrap_or(("linux", "amd64"));
    match name {
        "TARGETPLATFORM" | "BUILDPLATFORM" => Some(platform.clone()),
        "TARGETOS" | "BUILDOS" => Some(os.to_owned()),
        "TARGETARCH" | "BUILDARCH" => Some(arch.to_owned()),
        "TARGETVARIANT" | "BUILDVARIANT" => Some(String::new()),
        _ => None,
    }
}

/// The layer-cache record for one `COPY`/`ADD`/`RUN` step.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CacheRecord {
    version: u32,
    created_by: String,
    /// The layer blob; the store's gc keeps every `sha256:` digest a record mentions.
    layer: String,
    media_type: String,
    size: u64,
    diff_id: String,
}

struct Builder<'a> {
    store: &'a Store,
    opts: &'a BuildOptions,
    ctx: Context,
    escape: char,
    /// File times of `COPY`/`ADD` and `created`: `SOURCE_DATE_EPOCH`, else 0.
    epoch: u64,
    /// Whether `SOURCE_DATE_EPOCH` was given (then `RUN` layers' times are clamped to it).
    epoch_given: bool,
    runner: Option<&'a mut dyn RunStep>,
    created: String,
    progress: &'a mut dyn FnMut(&str),
    config: ImageConfiguration,
    run: Config,
    layers: Vec<Descriptor>,
    diff_ids: Vec<Digest>,
    history: Vec<History>,
    global_args: BTreeMap<String, Option<String>>,
    args: BTreeMap<String, Option<String>>,
    used_args: BTreeSet<String>,
    cmd_set: bool,
    shell: Vec<String>,
    lower: Option<LowerFs>,
    cached_steps: usize,
}

/// A resolved `COPY`/`ADD` source with what it holds.
struct Matched {
    source: Source,
    items: Vec<Item>,
    archive: Option<Compression>,
}

impl Builder<'_> {
    fn env_value(&self, name: &str) -> Option<String> {
        let env = self.run.env().as_ref()?;
        env.iter().rev().find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=').map(str::to_owned))
    }

    fn lookup(&self, name: &str) -> Option<String> {
        self.env_value(name).or_else(|| self.args.get(name).cloned().flatten())
    }

    fn expand(&self, ins: &Instruction, word: &str) -> Result<String, BuildError> {
        shell::expand(word, self.escape, &|n| self.lookup(n)).map_err(|source| self.expand_err(ins, source))
    }

    fn expand_err(&self, ins: &Instruction, source: ShellError) -> BuildError {
        BuildError::Expand { line: ins.line, instruction: ins.text.clone(), source }
    }

    fn global_arg(&mut self, ins: &Instruction, decls: &[ArgDecl]) -> Result<(), BuildError> {
        for d in decls {
            let value = match self.opts.build_args.get(&d.name) {
                Some(v) => Some(v.clone()),
                None => match &d.default {
                    Some(w) => {
                        let globals = &self.global_args;
                        let v = shell::expand(w, self.escape, &|n| globals.get(n).cloned().flatten())
                            .map_err(|source| self.expand_err(ins, source))?;
                        Some(v)
                    }
                    None => automatic_arg(&d.name),
                },
            };
            self.used_args.insert(d.name.clone());
            self.global_args.insert(d.name.clone(), value);
        }
        Ok(())
    }

    fn push_history(&mut self, created_by: String, empty_layer: bool) {
        let mut h = HistoryBuilder::default().created(self.created.clone()).created_by(created_by);
        if empty_layer {
            h = h.empty_layer(true);
        }
        self.history.push(h.build().expect("history has no required fields"));
    }

    fn step(&mut self, ins: &Instruction) -> Result<(), BuildError> {
        match &ins.command {
            Command::From { image, platform, .. } => self.from(ins, image, platform.as_deref()),
            Command::Arg(decls) => {
                for d in decls {
                    let value = match self.opts.build_args.get(&d.name) {
                        Some(v) => Some(v.clone()),
                        None => match &d.default {
                            Some(w) => Some(self.expand(ins, w)?),
                            None => self.global_args.get(&d.name).cloned().flatten().or_else(|| automatic_arg(&d.name)),
                        },
                    };
                    self.used_args.insert(d.name.clone());
                    self.args.insert(d.name.clone(), value);
                }
                self.push_history(ins.text.clone(), true);
                Ok(())
            }
            Command::Env(pairs) => {
                // All values see the environment from before this instruction, as in Docker.
                let mut set = Vec::new();
                for (k, v) in pairs {
                    set.push((self.expand(ins, k)?, self.expand(ins, v)?));
                }
                let mut env = self.run.env().clone().unwrap_or_default();
                for (k, v) in &set {
                    let kv = format!("{k}={v}");
                    match env.iter_mut().find(|e| e.split_once('=').map_or(e.as_str(), |(n, _)| n) == k) {
                        Some(e) => *e = kv,
                        None => env.push(kv),
                    }
                }
                self.run.set_env(Some(env));
                let text = set.iter().map(|(k, v)| format!("{k}={}", quote_if_needed(v))).collect::<Vec<_>>().join(" ");
                self.push_history(format!("ENV {text}"), true);
                Ok(())
            }
            Command::Label(pairs) => {
                let mut set = Vec::new();
                for (k, v) in pairs {
                    set.push((self.expand(ins, k)?, self.expand(ins, v)?));
                }
                let mut labels = self.run.labels().clone().unwrap_or_default();
                for (k, v) in &set {
                    labels.insert(k.clone(), v.clone());
                }
                self.run.set_labels(Some(labels));
                let text = set
                    .iter()
                    .map(|(k, v)| format!("{}={}", quote_if_needed(k), quote_if_needed(v)))
                    .collect::<Vec<_>>()
                    .join(" ");
                self.push_history(format!("LABEL {text}"), true);
                Ok(())
            }
            Command::Copy(args) => self.copy(ins, args, false),
            Command::Add(args) => self.copy(ins, args, true),
            Command::Run(cl) => self.run_step(ins, cl),
            Command::Cmd(cl) => {
                let argv = self.argv(cl);
                self.run.set_cmd(Some(argv.clone()));
                self.cmd_set = true;
                self.push_history(format!("CMD {}", json_list(&argv)), true);
                Ok(())
            }
            Command::Entrypoint(cl) => {
                let argv = self.argv(cl);
                self.run.set_entrypoint(Some(argv.clone()));
                // Docker: an ENTRYPOINT resets a CMD inherited from the base image.
                if !self.cmd_set {
                    self.run.set_cmd(None);
                }
                self.push_history(format!("ENTRYPOINT {}", json_list(&argv)), true);
                Ok(())
            }
            Command::Workdir(w) => {
                let w = self.expand(ins, w)?;
                let base = self.run.working_dir().clone().unwrap_or_else(|| "/".into());
                let joined = if w.starts_with('/') { w } else { format!("{base}/{w}") };
                let dir = format!("/{}", clean_path(&joined));
                self.run.set_working_dir(Some(dir.clone()));
                self.push_history(format!("WORKDIR {dir}"), true);
                Ok(())
            }
            Command::User(u) => {
                let u = self.expand(ins, u)?;
                self.run.set_user(Some(u.clone()));
                self.push_history(format!("USER {u}"), true);
                Ok(())
            }
            Command::Expose(words) => {
                let mut ports: BTreeSet<String> =
                    self.run.exposed_ports().clone().unwrap_or_default().into_iter().collect();
                let mut added = Vec::new();
                for w in words {
                    for p in self.expand(ins, w)?.split_whitespace() {
                        let expanded =
                            parse_ports(p).ok_or_else(|| BuildError::Port { line: ins.line, port: p.to_owned() })?;
                        added.extend(expanded.iter().cloned());
                        ports.extend(expanded);
                    }
                }
                self.run.set_exposed_ports(Some(ports.into_iter().collect()));
                self.push_history(format!("EXPOSE {}", added.join(" ")), true);
                Ok(())
            }
            Command::Volume(words) => {
                let mut vols: BTreeSet<String> = self.run.volumes().clone().unwrap_or_default().into_iter().collect();
                let mut added = Vec::new();
                for w in words {
                    let v = self.expand(ins, w)?;
                    if v.is_empty() {
                        continue;
                    }
                    added.push(v.clone());
                    vols.insert(v);
                }
                self.run.set_volumes(Some(vols.into_iter().collect()));
                self.push_history(format!("VOLUME {}", json_list(&added)), true);
                Ok(())
            }
            Command::StopSignal(s) => {
                let s = self.expand(ins, s)?;
                if !valid_signal(&s) {
                    return Err(BuildError::Signal { line: ins.line, signal: s });
                }
                self.run.set_stop_signal(Some(s.clone()));
                self.push_history(format!("STOPSIGNAL {s}"), true);
                Ok(())
            }
            Command::Shell(argv) => {
                self.shell = argv.clone();
                self.push_history(format!("SHELL {}", json_list(argv)), true);
                Ok(())
            }
            Command::Maintainer(m) => {
                let m = shell::unquote(m, self.escape).map_err(|source| self.expand_err(ins, source))?;
                self.config.set_author(Some(m.clone()));
                self.push_history(format!("MAINTAINER {m}"), true);
                Ok(())
            }
            Command::Healthcheck(_) | Command::Onbuild(_) => {
                Err(BuildError::Unsupported { line: ins.line, instruction: ins.keyword() })
            }
        }
    }

    fn argv(&self, cl: &CommandLine) -> Vec<String> {
        match cl {
            CommandLine::Exec(v) => v.clone(),
            CommandLine::Shell(s) => {
                let mut v = self.shell.clone();
                v.push(s.clone());
                v
            }
        }
    }

    fn from(&mut self, ins: &Instruction, image: &str, platform: Option<&str>) -> Result<(), BuildError> {
        let globals = &self.global_args;
        let global = |n: &str| globals.get(n).cloned().flatten();
        let image = shell::expand(image, self.escape, &global).map_err(|source| self.expand_err(ins, source))?;
        if let Some(p) = platform {
            let p = shell::expand(p, self.escape, &global).map_err(|source| self.expand_err(ins, source))?;
            if p != host_platform() {
                return Err(BuildError::Platform { line: ins.line, platform: p, host: host_platform() });
            }
        }
        if image == "scratch" {
            self.config = ImageConfiguration::default();
            self.run = Config::default();
            self.run.set_env(Some(vec![DEFAULT_PATH.to_owned()]));
            return Ok(());
        }
        let base = self.store.resolve(&image).map_err(|source| BuildError::BaseImage {
            line: ins.line,
            image: image.clone(),
            source: Box::new(source),
        })?;
        let diff_ids = base.diff_ids().map_err(|source| BuildError::BaseImage {
            line: ins.line,
            image: image.clone(),
            source: Box::new(source),
        })?;
        self.layers = base.manifest.layers().clone();
        self.diff_ids = diff_ids;
        self.config = base.config.clone();
        self.run = base.config.config().clone().unwrap_or_default();
        self.history = match base.config.history() {
            Some(h) => h.clone(),
            // Keep history and layers in step for tools that pair them up.
            None => (0..self.layers.len())
                .map(|_| {
                    HistoryBuilder::default()
                        .created_by(format!("layer of {image}"))
                        .build()
                        .expect("no required fields")
                })
                .collect(),
        };
        (self.progress)(&format!("--> {}", base.manifest_digest));
        Ok(())
    }

    fn layer_err(&self, ins: &Instruction, source: LayerError) -> BuildError {
        BuildError::Layer { line: ins.line, instruction: ins.text.clone(), source: Box::new(source) }
    }

    fn ctx_err(&self, ins: &Instruction, source: ContextError) -> BuildError {
        BuildError::Context { line: ins.line, instruction: ins.text.clone(), source }
    }

    fn copy(&mut self, ins: &Instruction, args: &CopyArgs, add: bool) -> Result<(), BuildError> {
        let keyword = ins.keyword();
        let chown = args.chown.as_deref().map(|c| self.expand(ins, c)).transpose()?;
        let chmod_text = args.chmod.as_deref().map(|c| self.expand(ins, c)).transpose()?;
        let chmod = match &chmod_text {
            Some(t) => Some(parse_chmod(t).ok_or_else(|| BuildError::Chmod { line: ins.line, value: t.clone() })?),
            None => None,
        };
        if let Some(c) = &chown {
            if !valid_chown(c) {
                return Err(BuildError::Chown { line: ins.line, value: c.clone() });
            }
        }
        let sources = args.sources.iter().map(|s| self.expand(ins, s)).collect::<Result<Vec<_>, _>>()?;
        let dest = self.expand(ins, &args.dest)?;
        if add {
            if let Some(url) = sources.iter().find(|s| is_url(s)) {
                return Err(BuildError::AddUrl { line: ins.line, url: url.clone() });
            }
        }
        let workdir = self.run.working_dir().clone().unwrap_or_else(|| "/".into());
        let dir_hint = dest.ends_with('/') || dest == "." || dest.ends_with("/.") || dest.is_empty();
        let abs = if dest.starts_with('/') { dest.clone() } else { format!("{workdir}/{dest}") };
        let dest_path = clean_path(&abs);

        let mut matched = Vec::new();
        for s in &sources {
            for source in self.ctx.resolve(s).map_err(|e| self.ctx_err(ins, e))? {
                let items = self.ctx.items(&source).map_err(|e| self.ctx_err(ins, e))?;
                let archive = if add && !source.is_dir {
                    layer::archive_compression(&source.real).map_err(|e| self.layer_err(ins, e))?
                } else {
                    None
                };
                matched.push(Matched { source, items, archive });
            }
        }
        if matched.len() > 1 && !dir_hint {
            return Err(BuildError::DestNotDir { line: ins.line, instruction: ins.text.clone() });
        }

        let mut created_by = keyword.to_owned();
        if let Some(c) = &chown {
            created_by.push_str(&format!(" --chown={c}"));
        }
        if let Some(c) = &chmod_text {
            created_by.push_str(&format!(" --chmod={c}"));
        }
        for s in &sources {
            created_by.push(' ');
            created_by.push_str(s);
        }
        created_by.push(' ');
        created_by.push_str(&dest);

        let key = self.cache_key(ins, &created_by, &dest_path, dir_hint, chown.as_deref(), chmod, &matched)?;
        let record_path = self.store.build_cache_dir().join(key.hex());
        let cached = if self.opts.no_cache { None } else { self.cache_lookup(&record_path) };
        let blob = match cached {
            Some(blob) => {
                self.cached_steps += 1;
                (self.progress)("--> cached");
                blob
            }
            None => {
                let spool =
                    tempfile::Builder::new().prefix("build-").tempdir_in(self.store.tmp_dir()).map_err(|source| {
                        BuildError::Io { op: "create a temporary directory in", path: self.store.tmp_dir(), source }
                    })?;
                let mut lower = self.lower.take().unwrap_or_default();
                let plan = (|| {
                    lower.catch_up(self.store, &self.layers).map_err(|e| self.layer_err(ins, e))?;
                    let ids = chown.as_deref().map(|c| resolve_chown(ins.line, c, &lower)).transpose()?;
                    self.plan(ins, &lower, &matched, &dest_path, dir_hint, ids, chmod, spool.path())
                })();
                let plan = match plan {
                    Ok(p) => p,
                    Err(e) => {
                        self.lower = Some(lower);
                        return Err(e);
                    }
                };
                let blob = layer::write_layer(self.store, &plan).map_err(|e| self.layer_err(ins, e));
                if blob.is_ok() {
                    lower.apply_plan(&plan);
                }
                self.lower = Some(lower);
                let blob = blob?;
                self.write_record(&record_path, &created_by, &blob)?;
                (self.progress)(&format!("--> {}", blob.digest));
                blob
            }
        };
        self.layers.push(blob.descriptor());
        self.diff_ids.push(blob.diff_id.clone());
        self.push_history(created_by, false);
        Ok(())
    }

    /// The environment of a `RUN` step, and the `ARG` values in effect: the image's `ENV`,
    /// then those `ARG` values that no `ENV` of the same name overrides (Docker's rule).
    fn run_env(&self) -> (Vec<String>, Vec<String>) {
        let key = |kv: &str| kv.split_once('=').map_or(kv, |(k, _)| k).to_owned();
        let mut env = self.run.env().clone().unwrap_or_default();
        let set: BTreeSet<String> = env.iter().map(|kv| key(kv)).collect();
        let args: Vec<String> = self.args.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}"))).collect();
        env.extend(args.iter().filter(|kv| !set.contains(&key(kv))).cloned());
        (env, args)
    }

    fn run_step(&mut self, ins: &Instruction, cl: &CommandLine) -> Result<(), BuildError> {
        let argv = self.argv(cl);
        let (env, args) = self.run_env();
        let workdir = self.run.working_dir().clone().filter(|w| !w.is_empty()).unwrap_or_else(|| "/".into());
        let user = self.run.user().clone().unwrap_or_default();
        // Docker's history text: `RUN |2 A=1 B=2 /bin/sh -c make` when ARGs are in effect.
        let mut created_by = "RUN ".to_owned();
        if !args.is_empty() {
            created_by.push_str(&format!("|{} {} ", args.len(), args.join(" ")));
        }
        created_by.push_str(&match cl {
            CommandLine::Shell(_) => argv.join(" "),
            CommandLine::Exec(_) => json_list(&argv),
        });
        let key = {
            let mut h = KeyHasher(HashingWriter::new(io::sink()));
            h.field(format!("twinbox build cache v{CACHE_VERSION}"));
            h.field(format!("run epoch={} given={}", self.epoch, self.epoch_given));
            for d in &self.diff_ids {
                h.field(d.to_string());
            }
            h.field(&created_by);
            h.field(json_list(&argv));
            h.field(json_list(&env));
            h.field(format!("workdir={workdir}"));
            h.field(format!("user={user}"));
            h.0.finish().0
        };
        let record_path = self.store.build_cache_dir().join(key.hex());
        let cached = if self.opts.no_cache { None } else { self.cache_lookup(&record_path) };
        let blob = match cached {
            Some(blob) => {
                self.cached_steps += 1;
                (self.progress)("--> cached");
                blob
            }
            None => {
                let req = RunRequest { lowers: &[], argv: &argv, env: &env, workdir: &workdir, user: &user };
                let blob = self.run_fresh(ins, req)?;
                self.write_record(&record_path, &created_by, &blob)?;
                (self.progress)(&format!("--> {}", blob.digest));
                blob
            }
        };
        self.layers.push(blob.descriptor());
        self.diff_ids.push(blob.diff_id.clone());
        self.push_history(created_by, false);
        Ok(())
    }

    /// Run a `RUN` step (`req` without its lowers) and store what it changed as a layer.
    fn run_fresh(&mut self, ins: &Instruction, req: RunRequest<'_>) -> Result<LayerBlob, BuildError> {
        let mut lowers = Vec::with_capacity(self.layers.len());
        for (desc, diff_id) in self.layers.iter().zip(&self.diff_ids) {
            let dir = self.store.unpack_layer(desc, diff_id).map_err(|e| BuildError::UnpackLowers {
                line: ins.line,
                instruction: ins.text.clone(),
                source: Box::new(e),
            })?;
            lowers.push(dir);
        }
        let req = RunRequest { lowers: &lowers, ..req };
        let runner = self.runner.as_deref_mut().expect("preflight refuses RUN without a runner");
        let upper = match runner.run(&req) {
            Ok(dir) => UpperDir(dir),
            Err(RunStepError::Exit { code }) => {
                return Err(BuildError::RunFailed { line: ins.line, command: req.argv.join(" "), code })
            }
            Err(source) => return Err(BuildError::Run { line: ins.line, instruction: ins.text.clone(), source }),
        };
        let clamp = self.epoch_given.then_some(self.epoch);
        let plan = upper::plan_from_upper(&upper.0, clamp).map_err(|source| BuildError::Upper {
            line: ins.line,
            instruction: ins.text.clone(),
            source,
        })?;
        let blob = layer::write_layer(self.store, &plan).map_err(|e| self.layer_err(ins, e))?;
        drop(upper);
        Ok(blob)
    }

    #[allow(clippy::too_many_arguments)]
    fn cache_key(
        &self,
        ins: &Instruction,
        created_by: &str,
        dest: &str,
        dir_hint: bool,
        chown: Option<&str>,
        chmod: Option<u32>,
        matched: &[Matched],
    ) -> Result<Digest, BuildError> {
        let mut h = KeyHasher(HashingWriter::new(io::sink()));
        h.field(format!("twinbox build cache v{CACHE_VERSION}"));
        h.field(format!("epoch={} keep_mtimes={}", self.epoch, self.opts.keep_mtimes));
        for d in &self.diff_ids {
            h.field(d.to_string());
        }
        h.field(created_by);
        h.field(format!("dest={dest} dir={dir_hint} chown={chown:?} chmod={chmod:?}"));
        // Hardlink groups by the first member's place, not by inode numbers (which differ
        // between checkouts); one map for the whole step, as the layer links across sources.
        let mut groups: HashMap<(u64, u64), String> = HashMap::new();
        for (i, m) in matched.iter().enumerate() {
            let src = &m.source;
            h.field(format!("source {} dir={} archive={:?}", src.name, src.is_dir, m.archive));
            if src.is_dir {
                let meta = fs::metadata(&src.real).map_err(|source| {
                    self.ctx_err(ins, ContextError::Io { op: "stat", path: src.real.clone(), source })
                })?;
                h.field(format!("mode={:o}", std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777));
                if self.opts.keep_mtimes {
                    h.field(format!("mtime={}", std::os::unix::fs::MetadataExt::mtime(&meta)));
                }
            }
            for item in &m.items {
                let link = item.inode.map(|k| groups.entry(k).or_insert_with(|| format!("{i}:{}", item.rel)).clone());
                let mtime = if self.opts.keep_mtimes { item.mtime } else { 0 };
                h.field(format!("{:?} {:o} {mtime} {:?} {link:?}", item.rel, item.mode, item.kind));
                if let ItemKind::File { .. } = item.kind {
                    let mut f = File::open(&item.real).map_err(|source| {
                        self.ctx_err(ins, ContextError::Io { op: "read", path: item.real.clone(), source })
                    })?;
                    let mut w = HashingWriter::new(io::sink());
                    io::copy(&mut f, &mut w).map_err(|source| {
                        self.ctx_err(ins, ContextError::Io { op: "read", path: item.real.clone(), source })
                    })?;
                    h.field(w.finish().0.to_string());
                }
            }
        }
        Ok(h.0.finish().0)
    }

    fn cache_lookup(&self, path: &Path) -> Option<LayerBlob> {
        let bytes = fs::read(path).ok()?;
        let rec: CacheRecord = serde_json::from_slice(&bytes).ok()?;
        if rec.version != CACHE_VERSION || rec.media_type != LAYER_MEDIA_TYPE {
            return None;
        }
        let blob = LayerBlob { digest: rec.layer.parse().ok()?, diff_id: rec.diff_id.parse().ok()?, size: rec.size };
        self.store.has_blob(&blob.digest).then_some(blob)
    }

    fn write_record(&self, path: &Path, created_by: &str, blob: &LayerBlob) -> Result<(), BuildError> {
        let rec = CacheRecord {
            version: CACHE_VERSION,
            created_by: created_by.to_owned(),
            layer: blob.digest.to_string(),
            media_type: LAYER_MEDIA_TYPE.to_owned(),
            size: blob.size,
            diff_id: blob.diff_id.to_string(),
        };
        let json = serde_json::to_vec_pretty(&rec).expect("a cache record serializes");
        crate::atomic::write(path, &json, 0o644, false).map_err(|source| BuildError::Io {
            op: "write",
            path: path.to_owned(),
            source,
        })
    }

    /// The layer a `COPY`/`ADD` step writes.
    #[allow(clippy::too_many_arguments)]
    fn plan(
        &self,
        ins: &Instruction,
        lower: &LowerFs,
        matched: &[Matched],
        dest: &str,
        dir_hint: bool,
        owner: Option<(u64, u64)>,
        chmod: Option<u32>,
        spool: &Path,
    ) -> Result<LayerPlan, BuildError> {
        let (uid, gid) = owner.unwrap_or((0, 0));
        let epoch = self.epoch;
        let keep = self.opts.keep_mtimes;
        let mut plan = LayerPlan::default();
        let into_dir = dir_hint || matched.len() > 1 || lower.is_dir(dest);
        // The destination directory for "into a directory" copies, created if it is new.
        let ensure_dir = |plan: &mut LayerPlan, dir: &str| {
            if !dir.is_empty() && !lower.is_dir(dir) && plan.get(dir).is_none() {
                plan.insert(dir.to_owned(), Entry::new(EntryKind::Dir, 0o755, uid, gid, epoch));
            }
        };
        let from_item = |item: &Item| {
            let kind = match &item.kind {
                ItemKind::Dir => EntryKind::Dir,
                ItemKind::File { size } => EntryKind::File { source: item.real.clone(), size: *size, link: item.inode },
                ItemKind::Symlink { target } => EntryKind::Symlink { target: target.clone() },
                ItemKind::Fifo => EntryKind::Fifo,
            };
            let mode = match (&kind, chmod) {
                (EntryKind::Symlink { .. }, _) => 0o777,
                (_, Some(m)) => m,
                (_, None) => item.mode,
            };
            Entry::new(kind, mode, uid, gid, if keep { item.mtime } else { epoch })
        };
        for m in matched {
            let src = &m.source;
            if src.is_dir {
                let target = lower.resolve(dest, true);
                if !target.is_empty() {
                    let meta = fs::metadata(&src.real).map_err(|source| {
                        self.ctx_err(ins, ContextError::Io { op: "stat", path: src.real.clone(), source })
                    })?;
                    let mode = chmod.unwrap_or(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777);
                    let mtime = if keep { std::os::unix::fs::MetadataExt::mtime(&meta).max(0) as u64 } else { epoch };
                    plan.insert(target.clone(), Entry::new(EntryKind::Dir, mode, uid, gid, mtime));
                }
                for item in &m.items {
                    let path = place(lower, &join(&target, &item.rel), item.kind == ItemKind::Dir);
                    plan.insert(path, from_item(item));
                }
            } else if let Some(compression) = m.archive {
                let target = lower.resolve(dest, true);
                ensure_dir(&mut plan, &target);
                let entries = layer::read_archive(&src.real, compression, spool).map_err(|e| self.layer_err(ins, e))?;
                for a in entries {
                    let is_dir = a.entry.kind == EntryKind::Dir;
                    let mut e = a.entry;
                    if let Some((u, g)) = owner {
                        e.uid = u;
                        e.gid = g;
                    }
                    if let (Some(m), false) = (chmod, matches!(e.kind, EntryKind::Symlink { .. })) {
                        e.mode = m;
                    }
                    if !keep {
                        e.mtime = epoch;
                    }
                    plan.insert(place(lower, &join(&target, &a.path), is_dir), e);
                }
            } else {
                let item = m.items.first().expect("a file source is one item");
                let path = if into_dir {
                    let target = lower.resolve(dest, true);
                    ensure_dir(&mut plan, &target);
                    join(&target, &src.name)
                } else {
                    place(lower, dest, false)
                };
                plan.insert(path, from_item(item));
            }
        }
        plan.add_parents(|p| match lower.get(p) {
            Some(n) if n.kind == LowerKind::Dir => Entry::new(EntryKind::Dir, n.mode, n.uid, n.gid, epoch),
            _ => Entry::new(EntryKind::Dir, 0o755, 0, 0, epoch),
        });
        Ok(plan)
    }

    fn finish(mut self, steps: usize) -> Result<BuildOutput, BuildError> {
        let mut config = std::mem::take(&mut self.config);
        config.set_created(Some(self.created.clone()));
        config.set_config(Some(std::mem::take(&mut self.run)));
        let mut rootfs = config.rootfs().clone();
        rootfs.set_typ("layers".to_owned());
        rootfs.set_diff_ids(self.diff_ids.iter().map(ToString::to_string).collect());
        config.set_rootfs(rootfs);
        config.set_history(Some(std::mem::take(&mut self.history)));
        let manifest =
            self.store.put_image(&config, self.layers.clone()).map_err(|e| BuildError::Store(Box::new(e)))?;
        let manifest_digest =
            Digest::try_from(manifest.digest()).map_err(|e| BuildError::Store(Box::new(StoreError::Digest(e))))?;
        let config_digest = Digest::of(&crate::store::canonical_json(&config));
        for t in &self.opts.tags {
            self.store.set_tag(t, &manifest).map_err(|e| BuildError::Store(Box::new(e)))?;
            (self.progress)(&format!("COMMIT {t}"));
        }
        (self.progress)(&format!("--> {manifest_digest}"));
        Ok(BuildOutput { manifest, manifest_digest, config_digest, steps, cached_steps: self.cached_steps })
    }
}

/// A `RUN` step's upper directory, which the builder owns once the runner returns it: removed
/// when dropped, whether or not it became a layer.
struct UpperDir(PathBuf);

impl Drop for UpperDir {
    fn drop(&mut self) {
        if let Err(e) = crate::store::remove_tree(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove a RUN step's upper directory; `twinbox prune` will");
        }
    }
}

/// Feeds length-prefixed fields into a hash, so that field boundaries are unambiguous.
struct KeyHasher(HashingWriter<io::Sink>);

impl KeyHasher {
    fn field(&mut self, s: impl AsRef<[u8]>) {
        let s = s.as_ref();
        // Writing to a sink cannot fail.
        let _ = self.0.write_all(&(s.len() as u64).to_le_bytes());
        let _ = self.0.write_all(s);
    }
}

/// Where a copied item lands: its parent resolved through the lower symlinks, and the item
/// itself too when it is a directory landing on a symlink to a directory (`/bin -> usr/bin`).
fn place(lower: &LowerFs, path: &str, is_dir: bool) -> String {
    let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
    let p = join(&lower.resolve(parent, true), name);
    if is_dir && matches!(lower.get(&p), Some(n) if matches!(n.kind, LowerKind::Symlink(_))) && lower.is_dir(&p) {
        lower.resolve(&p, true)
    } else {
        p
    }
}

fn join(dir: &str, rel: &str) -> String {
    match (dir.is_empty(), rel.is_empty()) {
        (true, _) => rel.to_owned(),
        (_, true) => dir.to_owned(),
        _ => format!("{dir}/{rel}"),
    }
}

/// Clean an absolute path lexically; the result has no leading `/` (`""` is the root).
fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

fn is_url(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("git@") || lower.contains("://")
}

fn parse_chmod(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(s, 8).ok()
}

fn valid_chown(s: &str) -> bool {
    let ok = |p: &str| !p.is_empty() && !p.contains(char::is_whitespace) && !p.contains(':');
    match s.split_once(':') {
        Some((u, g)) => ok(u) && ok(g),
        None => ok(s),
    }
}

/// `--chown=USER[:GROUP]` to ids. A name is looked up in the image's `/etc/passwd` or
/// `/etc/group`; without a group the gid is the uid (Docker's rule).
fn resolve_chown(line: usize, spec: &str, lower: &LowerFs) -> Result<(u64, u64), BuildError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let lookup = |name: &str, file: &'static str, kind: &'static str| -> Result<u64, BuildError> {
        if let Ok(id) = name.parse::<u64>() {
            return Ok(id);
        }
        let unknown = || BuildError::UnknownOwner { line, kind, file, name: name.to_owned() };
        let text = lower.file(&format!("etc/{file}")).ok_or_else(unknown)?;
        let text = String::from_utf8_lossy(text);
        text.lines()
            .filter_map(|l| {
                let mut f = l.split(':');
                let n = f.next()?;
                let id = f.nth(1)?;
                (n == name).then(|| id.parse::<u64>().ok()).flatten()
            })
            .next()
            .ok_or_else(unknown)
    };
    let uid = lookup(user, "passwd", "user")?;
    let gid = match group {
        Some(g) => lookup(g, "group", "group")?,
        None => uid,
    };
    Ok((uid, gid))
}

/// `80`, `80/tcp`, `53/UDP`, `8000-8002/tcp` to `80/tcp`-style keys.
fn parse_ports(s: &str) -> Option<Vec<String>> {
    let (ports, proto) = match s.split_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (s, "tcp".to_owned()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return None;
    }
    let port = |p: &str| p.parse::<u16>().ok();
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => (port(ports)?, port(ports)?),
    };
    if lo > hi {
        return None;
    }
    Some((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

fn valid_signal(s: &str) -> bool {
    if let Ok(n) = s.parse::<u32>() {
        return (1..=64).contains(&n);
    }
    let name = s.strip_prefix("SIG").unwrap_or(s);
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'+' || b == b'-')
}

fn json_list(v: &[String]) -> String {
    serde_json::to_string(v).expect("strings serialize")
}

fn quote_if_needed(s: &str) -> String {
    if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '\\' || c == '$') {
        serde_json::to_string(s).expect("strings serialize")
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_ask_the_cause() {
        let base = |source| BuildError::BaseImage { line: 1, image: "b:1".into(), source: Box::new(source) };
        assert_eq!(base(StoreError::NoSuchImage("b:1".into())).exit_code(), 1);
        assert_eq!(base(StoreError::MissingBlob(Digest::of(b"x"))).exit_code(), 125);
        let run = |code| BuildError::Run {
            line: 2,
            instruction: "RUN x".into(),
            source: RunStepError::Runtime { code, source: "failed".into() },
        };
        assert_eq!(run(125).exit_code(), 125);
        assert_eq!(run(1).exit_code(), 1);
        // A RUN program that is missing or not executable is the Dockerfile's mistake.
        assert_eq!(run(127).exit_code(), 1);
        assert_eq!(run(126).exit_code(), 1);
        let parse = BuildError::Parse { path: "Dockerfile".into(), source: DockerfileError::NoFrom };
        assert_eq!(parse.exit_code(), 1);
        let io = BuildError::Io { op: "write", path: "/s/tmp/x".into(), source: io::Error::other("disk full") };
        assert_eq!(io.exit_code(), 125);
    }
}

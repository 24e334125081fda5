//! `RUN` steps of `twinbox build`, each in a throwaway container of this runtime: the
//! [`RunStep`] the image builder calls.
//!
//! ```text
//! RunRequest ─► <store>/tmp/run-<hex>/        bundle/config.json, bundle/rootfs, work/
//!               <store>/tmp/run-<hex>.upper/  the overlay's upper: handed to the builder
//!            ─► Runtime::create + start (stdin /dev/null, stdout and stderr: the build's stderr)
//!            ─► wait ─► Runtime::delete (kills what is left, removes cgroup and state)
//!            ─► run-<hex>/ removed; the upper too unless the command exited 0
//! ```
//!
//! The container is the one `twinbox run` would make (capabilities, seccomp profile,
//! namespaces, no network but loopback), with the step's command, environment, working
//! directory and user, and the container id `build-<hex>`. The overlay is mounted by the
//! runtime inside the container's own mount namespace, so it is gone with the container and
//! nothing is ever mounted on the host.
//!
//! Two things would otherwise end up in the layer without the command having made them: the
//! working directory, which is created in the upper before the run when no lower layer has it
//! (as Docker does), and the mount points the runtime creates for `/proc`, `/dev`, `/sys` on
//! an image that lacks them, which are removed from the upper again after the run when they
//! are still empty (as BuildKit does).
//!
//! A signal that would stop `twinbox build` (SIGINT, SIGTERM, SIGHUP, …) kills the step's
//! container instead; the step then fails and leaves nothing behind. A build killed with
//! SIGKILL leaves its step's container running: [`stop_orphan_steps`] (run by `prune` and
//! `system prune`) stops it, when no build can be running any more.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use oci_spec::image::{ConfigBuilder, ImageConfiguration};
use twinbox_exit::ExitCode;
use twinbox_image::build::{RunRequest, RunStep, RunStepError};
use twinbox_image::store::remove_tree;

use crate::container::spec::{self, OverlayStack, RunOptions};
use crate::container::{Engine, EngineError, FORWARDED};
use twinbox_runtime::container::{CreateOptions, Runtime};
use twinbox_runtime::RuntimeError;

/// Why a `RUN` step could not be run.
#[derive(Debug, thiserror::Error)]
pub enum BuildRunError {
    /// The spec could not be made (an unknown `USER`, …).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The OCI runtime failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A file of the step's scratch directory.
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
    /// A system call failed.
    #[error("{0}")]
    Sys(&'static str, #[source] nix::Error),
    /// The build was asked to stop while the step ran.
    #[error("interrupted by {0}; the step's container was killed")]
    Interrupted(Signal),
}

impl ExitCode for BuildRunError {
    fn exit_code(&self) -> i32 {
        match self {
            BuildRunError::Engine(e) => e.exit_code(),
            BuildRunError::Runtime(e) => e.exit_code(),
            BuildRunError::Io { .. } | BuildRunError::Sys(..) => twinbox_exit::INTERNAL,
            BuildRunError::Interrupted(signal) => twinbox_exit::signalled(*signal as i32),
        }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BuildRunError {
    let path = path.to_owned();
    move |source| BuildRunError::Io { op, path, source }
}

/// Runs `RUN` steps for the image builder in containers of `engine`'s runtime, over the
/// layers in `engine`'s store. Needs root.
pub struct BuildRunner<'e> {
    engine: &'e Engine,
}

impl<'e> BuildRunner<'e> {
    /// A runner over `engine`.
    pub fn new(engine: &'e Engine) -> Self {
        Self { engine }
    }

    /// Run one step to its end. Returns the upper directory and the command's exit code
    /// (128+N when killed by signal N); the upper directory is the caller's when the code is
    /// 0 and already removed otherwise. On error, everything the step made is removed.
    pub fn run_step(&self, req: &RunRequest<'_>) -> Result<(PathBuf, i32), BuildRunError> {
        let hex: String = crate::container::new_id().chars().take(32).collect();
        let id = format!("build-{hex}");
        let tmp = self.engine.store.tmp_dir();
        let mut scratch = Scratch {
            dir: tmp.join(format!("run-{hex}")),
            upper: tmp.join(format!("run-{hex}.upper")),
            keep_upper: false,
        };
        let bundle = scratch.dir.join("bundle");
        let work = scratch.dir.join("work");
        for d in [&bundle.join("rootfs"), &work, &scratch.upper] {
            fs::DirBuilder::new().recursive(true).mode(0o755).create(d).map_err(io_err("create directory", d))?;
        }
        // The upper's root is the container's `/`: give it the usual mode whatever the umask.
        fs::set_permissions(&scratch.upper, fs::Permissions::from_mode(0o755))
            .map_err(io_err("set the mode of", &scratch.upper))?;
        let mut lowers: Vec<PathBuf> = req.lowers.iter().rev().cloned().collect();
        if lowers.is_empty() {
            // FROM scratch: overlayfs needs a lower directory, so give it an empty one.
            let empty = scratch.dir.join("empty");
            fs::create_dir(&empty).map_err(io_err("create directory", &empty))?;
            lowers.push(empty);
        }
        make_workdir(&lowers, &scratch.upper, req.workdir)?;

        let mut config = ImageConfiguration::default();
        let mut c = ConfigBuilder::default().env(req.env.to_vec()).working_dir(req.workdir.to_owned());
        if !req.user.is_empty() {
            c = c.user(req.user.to_owned());
        }
        config.set_config(Some(c.build().expect("a config has no required fields")));
        let opts = RunOptions {
            image: "the build's image".into(),
            overrides: twinbox_image::launch::Overrides {
                cmd: req.argv.to_vec(),
                entrypoint: Some(String::new()),
                ..Default::default()
            },
            hostname: Some(hex.chars().take(12).collect()),
            ..Default::default()
        };
        let overlay = OverlayStack { lower: lowers.clone(), upper: scratch.upper.clone(), work };
        let spec = spec::build_spec(&id, &config, req.lowers, &overlay, &opts, &spec::NetSetup::default())?;
        let stubs = mount_stubs(&lowers, spec.mounts().as_deref().unwrap_or_default())?;
        let cfg = bundle.join("config.json");
        let json = serde_json::to_vec_pretty(&spec).expect("a spec always serializes");
        fs::write(&cfg, json).map_err(io_err("write", &cfg))?;

        tracing::debug!(id = %id, argv = ?req.argv, "running a build step");
        let code = run_container(&self.engine.runtime, &id, &bundle)?;
        remove_stubs(&scratch.upper, &stubs);
        scratch.keep_upper = code == 0;
        Ok((scratch.upper.clone(), code))
    }
}

impl RunStep for BuildRunner<'_> {
    fn run(&mut self, request: &RunRequest<'_>) -> Result<PathBuf, RunStepError> {
        match self.run_step(request) {
            Ok((upper, 0)) => Ok(upper),
            Ok((_, code)) => Err(RunStepError::Exit { code }),
            Err(e) => Err(RunStepError::runtime(e)),
        }
    }
}

/// The step's scratch directory and upper directory, removed when dropped (the upper only
/// unless it is handed over).
struct Scratch {
    dir: PathBuf,
    upper: PathBuf,
    keep_upper: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut doomed = vec![&self.dir];
        if !self.keep_upper {
            doomed.push(&self.upper);
        }
        for d in doomed {
            if let Err(e) = remove_tree(d) {
                tracing::warn!(dir = %d.display(), error = %e, "cannot remove a build step's directory; `twinbox prune` will");
            }
        }
    }
}

/// Create, start and wait for the container; then delete it (its cgroup and state) whatever
/// happened. Returns the exit code.
/// Stops and removes the step containers of builds that were killed: every `run-<hex>`
/// directory of the store's `tmp/` while no build runs (under the store's exclusive lock,
/// which every build holds shared), so each belongs to a build that is gone. The container
/// ids, one per line of what was done.
pub fn stop_orphan_steps(engine: &Engine) -> Result<Vec<String>, crate::container::EngineError> {
    let _alone = engine.store.exclusive_guard()?;
    let mut done = Vec::new();
    let tmp = engine.store.tmp_dir();
    for e in fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(hex) = name.strip_prefix("run-").filter(|h| !h.contains('.')) else { continue };
        let id = format!("build-{hex}");
        let ran = engine.runtime.state(&id).is_ok() || engine.runtime.state_dir(&id).exists();
        engine.delete_runtime(&id)?;
        let _ = remove_tree(&e.path());
        let _ = remove_tree(&tmp.join(format!("run-{hex}.upper")));
        if ran {
            done.push(format!("stopped {id}, the RUN step container of a build that was killed"));
        }
    }
    Ok(done)
}

fn run_container(rt: &Runtime, id: &str, bundle: &Path) -> Result<i32, BuildRunError> {
    let null = fs::File::open("/dev/null").map_err(io_err("open", Path::new("/dev/null")))?;
    let err = || io_err("duplicate", Path::new("standard error"));
    let stdio = [
        OwnedFd::from(null),
        io::stderr().as_fd().try_clone_to_owned().map_err(err())?,
        io::stderr().as_fd().try_clone_to_owned().map_err(err())?,
    ];
    // Block the signals that would stop us before the container exists, so none is lost.
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    let old = set.thread_swap_mask(SigmaskHow::SIG_BLOCK).map_err(|e| BuildRunError::Sys("sigprocmask", e))?;
    let result = (|| {
        let mut state = rt.create(id, bundle, CreateOptions { stdio: Some(stdio), ..Default::default() })?;
        rt.start_created(&mut state)?;
        wait_step(rt, id, Pid::from_raw(state.pid), &set)
    })();
    let _ = old.thread_set_mask();
    let deleted = match rt.delete(id, true) {
        Ok(()) | Err(RuntimeError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    };
    let code = result?;
    deleted?;
    Ok(code)
}

/// Wait for the container's init (our child) with `set` blocked; a blocked signal other than
/// SIGCHLD kills the container and makes the step fail.
fn wait_step(rt: &Runtime, id: &str, pid: Pid, set: &SigSet) -> Result<i32, BuildRunError> {
    let mut interrupted = None;
    loop {
        let code = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(status) => twinbox_runtime::exit_code(status),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(BuildRunError::Sys("waiting for the step's container", e)),
        };
        if let Some(code) = code {
            return match interrupted {
                Some(sig) => Err(BuildRunError::Interrupted(sig)),
                None => Ok(code),
            };
        }
        match set.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                tracing::debug!(id, signal = %sig, "killing the build step's container");
                interrupted.get_or_insert(sig);
                let _ = rt.kill(id, Signal::SIGKILL, true);
            }
        }
    }
}

/// The normal components of an absolute container path (`..` stays at the root).
fn components(path: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(PathBuf::from(n)),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// What a path is in the merged view of some lower layers.
enum Lookup<'a> {
    /// A directory: the top-most one's metadata, and the layers it is merged from (top-most
    /// first, down to the first opaque one).
    Dir(fs::Metadata, Vec<&'a Path>),
    /// Nothing, or a whiteout.
    Missing,
    /// A symlink or a file.
    Other,
}

/// Look `rel` up in `layers` (top-most first), which all have `rel`'s parent as a directory.
fn lookup<'a>(layers: &[&'a Path], rel: &Path) -> Result<Lookup<'a>, BuildRunError> {
    let mut top: Option<fs::Metadata> = None;
    let mut merged = Vec::new();
    for &layer in layers {
        let p = layer.join(rel);
        let m = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(BuildRunError::Io { op: "stat", path: p, source: e }),
        };
        if !m.is_dir() {
            if top.is_some() {
                break;
            }
            let whiteout = m.file_type().is_char_device() && m.rdev() == 0;
            return Ok(if whiteout { Lookup::Missing } else { Lookup::Other });
        }
        top.get_or_insert(m);
        merged.push(layer);
        if twinbox_image::build::upper::is_opaque(&p) {
            break;
        }
    }
    Ok(match top {
        Some(m) => Lookup::Dir(m, merged),
        None => Lookup::Missing,
    })
}

/// Create the working directory in the upper when the lowers do not have it: missing
/// components get mode 0755 and root, the directories above them keep the lowers' mode and
/// owner. A path that goes through a symlink or a file is left to the runtime.
fn make_workdir(lowers: &[PathBuf], upper: &Path, workdir: &str) -> Result<(), BuildRunError> {
    let comps = components(workdir);
    let mut layers: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    let mut rel = PathBuf::new();
    let mut above: Vec<fs::Metadata> = Vec::new();
    for (i, c) in comps.iter().enumerate() {
        rel.push(c);
        match lookup(&layers, &rel)? {
            Lookup::Dir(m, merged) => {
                above.push(m);
                layers = merged;
            }
            Lookup::Other => return Ok(()),
            Lookup::Missing => {
                let mut p = upper.to_path_buf();
                for (j, c) in comps.iter().enumerate() {
                    p.push(c);
                    if j < i {
                        if p.is_dir() {
                            continue;
                        }
                        fs::create_dir(&p).map_err(io_err("create directory", &p))?;
                        let m = &above[j];
                        fs::set_permissions(&p, fs::Permissions::from_mode(m.mode() & 0o7777))
                            .map_err(io_err("set the mode of", &p))?;
                        std::os::unix::fs::lchown(&p, Some(m.uid()), Some(m.gid())).map_err(io_err("chown", &p))?;
                    } else {
                        fs::DirBuilder::new().mode(0o755).create(&p).map_err(io_err("create directory", &p))?;
                        fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
                            .map_err(io_err("set the mode of", &p))?;
                    }
                }
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The mount destinations (and their parents) that no lower layer has: the runtime will
/// create them in the upper.
fn mount_stubs(lowers: &[PathBuf], mounts: &[oci_spec::runtime::Mount]) -> Result<BTreeSet<PathBuf>, BuildRunError> {
    let mut stubs = BTreeSet::new();
    for m in mounts {
        let Some(dest) = m.destination().to_str() else { continue };
        let mut layers: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
        let mut rel = PathBuf::new();
        let mut missing = false;
        for c in components(dest) {
            rel.push(c);
            if !missing {
                match lookup(&layers, &rel)? {
                    Lookup::Dir(_, merged) => {
                        layers = merged;
                        continue;
                    }
                    Lookup::Other => break,
                    Lookup::Missing => missing = true,
                }
            }
            stubs.insert(rel.clone());
        }
    }
    Ok(stubs)
}

/// Remove the mount points the runtime created, deepest first, where they are still empty.
fn remove_stubs(upper: &Path, stubs: &BTreeSet<PathBuf>) {
    let mut by_depth: Vec<&PathBuf> = stubs.iter().collect();
    by_depth.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for rel in by_depth {
        let p = upper.join(rel);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {
                let _ = fs::remove_dir(&p);
            }
            Ok(m) if m.is_file() && m.len() == 0 => {
                let _ = fs::remove_file(&p);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_paths_stay_inside_the_root() {
        assert_eq!(components("/a/./b/../c/"), [PathBuf::from("a"), PathBuf::from("c")]);
        assert_eq!(components("/../x"), [PathBuf::from("x")]);
        assert!(components("/").is_empty());
    }

    #[test]
    fn workdir_and_stubs_against_the_lowers() {
        let d = tempfile::tempdir().unwrap();
        let (base, top, upper) = (d.path().join("base"), d.path().join("top"), d.path().join("upper"));
        for p in [base.join("usr/lib"), base.join("proc"), top.join("usr"), upper.clone()] {
            fs::create_dir_all(p).unwrap();
        }
        fs::set_permissions(base.join("usr"), fs::Permissions::from_mode(0o750)).unwrap();
        fs::set_permissions(top.join("usr"), fs::Permissions::from_mode(0o711)).unwrap();
        std::os::unix::fs::symlink("usr/lib", top.join("lib")).unwrap();
        let lowers = vec![top.clone(), base.clone()];
        // Exists (merged from both layers): nothing to do.
        make_workdir(&lowers, &upper, "/usr/lib").unwrap();
        assert!(!upper.join("usr").exists());
        // Through a symlink: left to the runtime.
        make_workdir(&lowers, &upper, "/lib/x").unwrap();
        assert!(!upper.join("lib").exists());
        // Missing below an existing dir: that dir keeps the top layer's mode.
        make_workdir(&lowers, &upper, "/usr/src/app").unwrap();
        assert_eq!(fs::metadata(upper.join("usr")).unwrap().mode() & 0o7777, 0o711);
        assert_eq!(fs::metadata(upper.join("usr/src/app")).unwrap().mode() & 0o7777, 0o755);

        let mount =
            |dest: &str| oci_spec::runtime::MountBuilder::default().destination(PathBuf::from(dest)).build().unwrap();
        let stubs = mount_stubs(&lowers, &[mount("/proc"), mount("/dev"), mount("/dev/pts"), mount("/lib/m")]).unwrap();
        assert_eq!(stubs.into_iter().collect::<Vec<_>>(), [PathBuf::from("dev"), PathBuf::from("dev/pts")]);
    }

    #[test]
    fn exit_codes() {
        use twinbox_image::launch::LaunchError;
        assert_eq!(EngineError::Store(twinbox_image::StoreError::NoSuchImage("x:1".into())).exit_code(), 1);
        let unknown_user = BuildRunError::Engine(EngineError::Launch(LaunchError::UnknownUser("x".into())));
        assert_eq!(unknown_user.exit_code(), 1);
        // The builder's RunStepError keeps the code of the error it boxes.
        assert_eq!(RunStepError::runtime(unknown_user).exit_code(), 1);
        let missing = BuildRunError::Runtime(RuntimeError::Init { message: "m".into(), code: 127 });
        assert_eq!(missing.exit_code(), 127);
        assert_eq!(RunStepError::runtime(missing).exit_code(), 1, "a missing RUN program is the Dockerfile's");
        assert_eq!(BuildRunError::Sys("fork", nix::Error::EAGAIN).exit_code(), 125);
        assert_eq!(BuildRunError::Interrupted(Signal::SIGINT).exit_code(), 130);
    }
}

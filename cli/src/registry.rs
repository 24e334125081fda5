//! Registry commands: pull, push, login, logout.

use std::io::{IsTerminal, Read};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use twinbox_image::registry::{self, ClientOptions, Credentials, DockerConfig, Event, Outcome};
use twinbox_image::{Reference, Store};

use crate::UserError;

fn open(root: &Path) -> Result<Store> {
    Store::open(root).with_context(|| {
        format!("opening the image store at {} (set --root or TWINBOX_ROOT to use another)", root.display())
    })
}

fn parse_ref(s: &str) -> Result<Reference> {
    s.parse::<Reference>().with_context(|| format!("invalid image reference {s:?}"))
}

/// Credentials stored for the registry by `twinbox login` or `docker login`.
fn stored_credentials(registry: &str) -> Result<Option<Credentials>> {
    let config = DockerConfig::load_default()?;
    Ok(config.credentials(registry)?)
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Image to pull: [REGISTRY/]REPOSITORY[:TAG|@DIGEST].
    image: String,
    /// Platform to pick from a multi-platform image (os/arch[/variant]; default the host's).
    #[arg(long)]
    platform: Option<String>,
    /// Use plain HTTP even for a registry that is not on this machine.
    #[arg(long)]
    insecure: bool,
    /// Print only the image name.
    #[arg(short, long)]
    quiet: bool,
}

pub fn pull(root: &Path, a: PullArgs) -> Result<()> {
    let r = parse_ref(&a.image)?;
    if let Some(p) = &a.platform {
        let parts: Vec<&str> = p.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|s| s.is_empty()) {
            return Err(UserError(format!("invalid platform {p:?}: expected os/arch or os/arch/variant")).into());
        }
    }
    let store = open(root)?;
    let opts = registry::PullOptions {
        platform: a.platform.clone(),
        client: ClientOptions {
            insecure: a.insecure,
            credentials: stored_credentials(r.registry())?,
            ..Default::default()
        },
        ..Default::default()
    };
    let progress = Reporter::new("Pulling", a.quiet);
    if !a.quiet {
        eprintln!("Pulling {r}");
    }
    let report = registry::pull(&store, &r, &opts, &|e| progress.event(e)).with_context(|| format!("pulling {r}"))?;
    if !a.quiet {
        eprintln!("Digest: {}", report.digest);
        if report.up_to_date {
            eprintln!("Status: image is up to date for {r}");
        } else {
            eprintln!(
                "Status: downloaded newer image for {r} ({} blobs, {})",
                report.downloaded,
                human_bytes(report.bytes)
            );
        }
    }
    println!("{r}");
    Ok(())
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// Image to push, named for its registry: REGISTRY/REPOSITORY[:TAG] (see `twinbox tag`).
    image: String,
    /// Use plain HTTP even for a registry that is not on this machine.
    #[arg(long)]
    insecure: bool,
    /// Upload blobs larger than this many MiB in chunks of that size (default: in one request).
    #[arg(long, value_name = "MIB")]
    chunk_size: Option<u64>,
    /// Print only the digest.
    #[arg(short, long)]
    quiet: bool,
}

pub fn push(root: &Path, a: PushArgs) -> Result<()> {
    let r = parse_ref(&a.image)?;
    if r.domain().is_none() {
        tracing::info!(image = %r, "no registry in the name: pushing to Docker Hub");
    }
    let store = open(root)?;
    let opts = registry::PushOptions {
        client: ClientOptions {
            insecure: a.insecure,
            credentials: stored_credentials(r.registry())?,
            ..Default::default()
        },
        chunk_size: a.chunk_size.map(|m| m << 20),
        ..Default::default()
    };
    let progress = Reporter::new("Pushing", a.quiet);
    if !a.quiet {
        eprintln!("Pushing {r}");
    }
    let report = registry::push(&store, &r, &opts, &|e| progress.event(e)).with_context(|| format!("pushing {r}"))?;
    let digest = report.digest.map(|d| d.to_string()).unwrap_or_default();
    if a.quiet {
        println!("{digest}");
    } else {
        println!(
            "{}: digest: {digest} size: {} ({} uploaded, {} mounted, {} already there)",
            r.tag().unwrap_or("latest"),
            report.size,
            report.uploaded,
            report.mounted,
            report.existing
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// Registry (host[:port]); Docker Hub when omitted.
    registry: Option<String>,
    /// User name.
    #[arg(short, long)]
    username: Option<String>,
    /// Read the password (or token) from standard input.
    #[arg(long)]
    password_stdin: bool,
    /// Use plain HTTP even for a registry that is not on this machine.
    #[arg(long)]
    insecure: bool,
}

/// `https://host:port/…` or `host:port` → `host:port`.
fn registry_arg(r: Option<&str>) -> String {
    match r {
        None => "docker.io".to_owned(),
        Some(r) => twinbox_image::registry::auth::normalize_registry(r),
    }
}

pub fn login(a: LoginArgs) -> Result<()> {
    let registry = registry_arg(a.registry.as_deref());
    let Some(username) = a.username.filter(|u| !u.is_empty()) else {
        return Err(UserError(
            "give the user name with --username and the password on stdin with --password-stdin".into(),
        )
        .into());
    };
    if !a.password_stdin {
        return Err(UserError("give the password on standard input with --password-stdin".into()).into());
    }
    if std::io::stdin().is_terminal() {
        eprintln!("Password for {username} at {registry} (end with Ctrl-D):");
    }
    let mut password = String::new();
    std::io::stdin().read_to_string(&mut password).context("reading the password from standard input")?;
    let password = password.trim_end_matches(['\n', '\r']).to_owned();
    if password.is_empty() {
        return Err(UserError("the password on standard input is empty".into()).into());
    }
    let creds = Credentials { username, password };
    registry::login(&registry, creds.clone(), a.insecure).with_context(|| format!("logging in to {registry}"))?;
    let mut config = DockerConfig::load_default()?;
    config.set(&registry, &creds);
    config.save()?;
    eprintln!("Login succeeded; credentials stored in {}", config.path().display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct LogoutArgs {
    /// Registry (host[:port]); Docker Hub when omitted.
    registry: Option<String>,
}

pub fn logout(a: LogoutArgs) -> Result<()> {
    let registry = registry_arg(a.registry.as_deref());
    let mut config = DockerConfig::load_default()?;
    if config.remove(&registry) {
        config.save()?;
        eprintln!("Removed the credentials for {registry} from {}", config.path().display());
    } else {
        eprintln!("Not logged in to {registry}");
    }
    Ok(())
}

/// Per-blob progress on stderr: a progress bar per blob on a terminal (indicatif), otherwise
/// a line when a transfer takes longer than a moment and one when each blob is done.
struct Reporter {
    verb: &'static str,
    quiet: bool,
    bars: Option<indicatif::MultiProgress>,
    started: Mutex<Vec<Transfer>>,
}

struct Transfer {
    short: String,
    since: Instant,
    size: u64,
    announced: bool,
    bar: Option<indicatif::ProgressBar>,
}

impl Reporter {
    fn new(verb: &'static str, quiet: bool) -> Self {
        use std::io::IsTerminal;
        let bars = (!quiet && std::io::stderr().is_terminal()).then(indicatif::MultiProgress::new);
        Self { verb, quiet, bars, started: Mutex::new(Vec::new()) }
    }

    fn event(&self, e: Event<'_>) {
        if self.quiet {
            return;
        }
        let mut started = self.started.lock().expect("progress lock");
        match e {
            Event::Start { digest, size } => {
                let bar = self.bars.as_ref().map(|m| {
                    let b = m.add(indicatif::ProgressBar::new(size));
                    b.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{prefix}: {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                        )
                        .expect("a valid template")
                        .progress_chars("=> "),
                    );
                    b.set_prefix(digest.short().to_owned());
                    b.set_message(self.verb);
                    b
                });
                started.push(Transfer {
                    short: digest.short().to_owned(),
                    since: Instant::now(),
                    size,
                    announced: false,
                    bar,
                });
            }
            Event::Progress { digest, done } => {
                if let Some(t) = started.iter_mut().find(|t| t.short == digest.short()) {
                    match &t.bar {
                        Some(b) => b.set_position(done),
                        None if !t.announced && t.since.elapsed().as_millis() > 500 => {
                            t.announced = true;
                            eprintln!("{}: {} {} ...", t.short, self.verb, human_bytes(t.size));
                        }
                        None => {}
                    }
                }
            }
            Event::Resume { digest, offset } => {
                let line = format!("{}: connection broke off at {}; resuming", digest.short(), human_bytes(offset));
                match &self.bars {
                    Some(m) => {
                        let _ = m.println(line);
                    }
                    None => eprintln!("{line}"),
                }
            }
            Event::Done { digest, how } => {
                let t = started.iter().find(|t| t.short == digest.short());
                let what = match how {
                    Outcome::Exists => "already exists".to_owned(),
                    Outcome::Mounted => "mounted from another repository".to_owned(),
                    Outcome::Transferred => {
                        let size = t.map_or(0, |t| t.size);
                        format!("{} {}", if self.verb == "Pulling" { "pulled" } else { "pushed" }, human_bytes(size))
                    }
                };
                match t.and_then(|t| t.bar.as_ref()) {
                    Some(b) => {
                        b.set_style(
                            indicatif::ProgressStyle::with_template("{prefix}: {msg}").expect("a valid template"),
                        );
                        b.finish_with_message(what);
                    }
                    None => eprintln!("{}: {what}", digest.short()),
                }
            }
        }
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "kB", "MB", "GB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < UNITS.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

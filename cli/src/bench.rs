//! `twinbox bench` and `twinbox bench compare`: arguments in, the bench library does the rest.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use twinbox_bench::{compare, report, Options, Scenario};

use crate::UserError;

/// Exit code of `compare` when a metric regressed significantly, one the base has is missing,
/// or nothing was compared.
pub const REGRESSED: i32 = 2;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    /// A short run: fewer rounds, 10 instances (about 1 min; with the microVMs in a nested L1
    /// where KVM cannot boot Linux, about 3.5 min in all).
    #[arg(long)]
    quick: bool,
    /// Scenarios, comma-separated: start, memory, density, cpu, net, disk, isolation.
    #[arg(long, value_delimiter = ',', default_value = "start,memory,density,cpu,net,disk,isolation")]
    scenario: Vec<String>,
    /// Backends, comma-separated (default: all; the ones that cannot run here are listed with the reason).
    #[arg(long, value_delimiter = ',')]
    backends: Vec<String>,
    /// Measured rounds of the start and CPU scenarios (CPU: at most 30).
    #[arg(long)]
    runs: Option<usize>,
    /// Idle instances per backend in the memory scenario.
    #[arg(long)]
    instances: Option<usize>,
    /// Instances per backend in the density scenario.
    #[arg(long)]
    max: Option<usize>,
    /// Density: stop a backend early once its instances hold this much host memory (e.g. 2g).
    #[arg(long, value_parser = crate::containers::parse_memory)]
    memory_budget: Option<i64>,
    /// The image to run: the default `hello` image (its modes are the workloads), or your own
    /// with --ready.
    #[arg(long, default_value = twinbox_bench::DEFAULT_IMAGE)]
    image: String,
    /// With an image of your own: when an instance of it is ready. `http://:PORT/PATH` (an
    /// HTTP GET to its PORT, published on 127.0.0.1, answers), `tcp:PORT` (a connection to it
    /// is accepted) or `log:TEXT` (TEXT in its output). The image then runs its own command,
    /// measured for time to ready, memory per ready instance, density and (http) request
    /// latency; what needs hello (cpu, disk, …) is listed as not applicable.
    #[arg(long, value_name = "SPEC", value_parser = parse_ready)]
    ready: Option<twinbox_bench::ready::ReadySpec>,
    /// Report directory (default: reports/<date>-<rev>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print results.json to stdout.
    #[arg(long)]
    json: bool,
    /// A results.json made by scripts/nested-bench.sh (the microVMs in a nested L1), shown in
    /// its own section of the report. Repeat it for parts of one nested run made scenario by
    /// scenario (same revision and machine); they are shown as one run.
    #[arg(long)]
    nested: Vec<PathBuf>,
    /// On a host whose KVM cannot boot Linux (PVM, or no /dev/kvm), do not measure the
    /// microVMs in a nested L1 (scripts/nested-bench.sh, which this run otherwise starts).
    #[arg(long)]
    no_nested: bool,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Compare two results.json: per metric the median's change and a Mann-Whitney U test;
    /// exits 2 when a metric regressed significantly beyond the threshold.
    Compare(CompareArgs),
    /// Write the report (markdown, HTML, charts) again from a results.json, e.g. after the
    /// report format changed.
    Report(ReportArgs),
    /// How far apart several runs put each metric's median: the largest distance of a run's
    /// median from the middle one; exits 2 when one is beyond --max-spread.
    Spread(SpreadArgs),
}

#[derive(Args, Debug)]
struct SpreadArgs {
    /// Two or more results.json of the same build.
    #[arg(required = true, num_args = 2..)]
    results: Vec<PathBuf>,
    /// Fail (exit 2) when a metric's spread exceeds this (e.g. 10%).
    #[arg(long, value_parser = compare::parse_threshold)]
    max_spread: Option<f64>,
    #[command(flatten)]
    select: Select,
    /// Print the rows as JSON.
    #[arg(long)]
    json: bool,
}

/// What `compare` and `spread` look at.
#[derive(Args, Debug)]
struct Select {
    /// Only these backends (comma-separated).
    #[arg(long, value_delimiter = ',')]
    backends: Vec<String>,
    /// Only these metrics (comma-separated), each alone or as SCENARIO/METRIC (e.g. launch_cpu,memory/total_per_instance).
    #[arg(long, value_delimiter = ',')]
    metrics: Vec<String>,
    /// Take each run's times as multiples of this backend's (e.g. `process`, the floor) in the
    /// same run, so a host that got faster or slower between runs is not taken for a change;
    /// times the reference lacks are left out, and named. Memory and ratios stay as they are.
    #[arg(long)]
    relative_to: Option<String>,
}

impl Select {
    /// Keep the selected records of each run. The `--relative-to` backend stays in even when
    /// not listed: the others are divided by its figures.
    fn apply(&self, runs: &mut [twinbox_bench::results::Results]) -> Result<()> {
        let mut backends = self.backends.clone();
        if let Some(reference) = self.relative_to.as_ref().filter(|_| !backends.is_empty()) {
            backends.push(reference.clone());
        }
        compare::Selection { backends, metrics: self.metrics.clone() }.apply(runs)?;
        Ok(())
    }
}

#[derive(Args, Debug)]
struct ReportArgs {
    results: PathBuf,
    /// Report directory (default: the results file's directory).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct CompareArgs {
    base: PathBuf,
    new: PathBuf,
    /// How much worse a median may get before it counts (e.g. 10%).
    #[arg(long, default_value = "10%", value_parser = compare::parse_threshold)]
    max_regression: f64,
    /// Significance level of the test.
    #[arg(long, default_value_t = 0.05)]
    alpha: f64,
    #[command(flatten)]
    select: Select,
    /// Print the comparison as JSON.
    #[arg(long)]
    json: bool,
}

pub fn bench(root: &Path, a: BenchArgs) -> Result<i32> {
    match a.command {
        Some(BenchCommand::Compare(c)) => return compare_cmd(c),
        Some(BenchCommand::Report(r)) => return report_cmd(r),
        Some(BenchCommand::Spread(s)) => return spread_cmd(s),
        None => {}
    }
    let twinbox = std::env::current_exe().context("cannot find the running twinbox binary")?;
    let mut opts = Options::new(root, &twinbox);
    opts.image = a.image;
    opts.ready = a.ready;
    opts.quick = a.quick;
    opts.runs = a.runs;
    opts.instances = a.instances;
    opts.max = a.max;
    opts.memory_budget_mib = a.memory_budget.map(|b| (b >> 20) as u64);
    opts.scenarios = a
        .scenario
        .iter()
        .map(|s| {
            Scenario::parse(s.trim()).ok_or_else(|| {
                UserError(format!(
                    "unknown scenario {s:?}; scenarios: start, memory, density, cpu, net, disk, isolation"
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    if !a.backends.is_empty() {
        opts.backends = a.backends.iter().map(|b| b.trim().to_owned()).collect();
    }
    let nested = if a.nested.is_empty() {
        None
    } else {
        let parts = a.nested.iter().map(|p| twinbox_bench::results::Results::load(p)).collect::<Result<Vec<_>, _>>()?;
        let merged = twinbox_bench::results::Results::merge(parts).context("--nested")?;
        Some(Box::new(merged))
    };
    twinbox_bench::signal::install().context("cannot install the Ctrl-C handler")?;
    let mut results = twinbox_bench::run(&opts)?;
    let nested = match nested {
        Some(n) => Some(n),
        None if a.no_nested || results.interrupted || !needs_nested(&results) => None,
        None => match nested_script(&twinbox) {
            None => {
                results.notes.push(
                    "the microVMs were not measured in a nested L1: scripts/nested-bench.sh (in the source checkout \
                     twinbox was built from) was not found; run it there and pass its output with --nested"
                        .into(),
                );
                None
            }
            Some(script) => match run_nested(&script, &twinbox, &opts) {
                Ok(r) => Some(Box::new(r)),
                Err(e) => {
                    results.notes.push(format!("the nested L1 run of the microVMs failed: {e:#}"));
                    None
                }
            },
        },
    };
    results.nested = nested;
    let dir = a.out.unwrap_or_else(|| report::default_dir(Path::new("reports"), &results));
    let written =
        report::write(&results, &dir).with_context(|| format!("cannot write the report in {}", dir.display()))?;
    if a.json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &results)?;
        writeln!(out)?;
    } else {
        print_summary(&results);
    }
    if let Some(why) = &written.charts_skipped {
        eprintln!("twinbox bench: {why}");
    }
    eprintln!("report: {}", written.dir.join("report.html").display());
    Ok(if results.interrupted { 130 } else { 0 })
}

/// Whether a microVM backend of the run could not run for want of a KVM that boots Linux
/// (what the nested L1 has).
fn needs_nested(r: &twinbox_bench::results::Results) -> bool {
    r.backends.iter().any(|b| {
        matches!(b.name.as_str(), "twinbox-microvm" | "twinbox-microvm-snapshot" | "qemu-microvm")
            && !b.available
            && b.reason.as_deref().is_some_and(|why| why.contains("no hardware KVM") || why.contains("no /dev/kvm"))
    })
}

/// scripts/nested-bench.sh of the source tree `twinbox` was built in (target/*/twinbox).
fn nested_script(twinbox: &Path) -> Option<PathBuf> {
    twinbox.ancestors().skip(1).map(|d| d.join("scripts/nested-bench.sh")).find(|p| p.is_file())
}

/// Runs scripts/nested-bench.sh with this run's settings (the same scenarios, `--quick`, the
/// rounds, instances and backends the user chose, the image and its readiness check) and
/// returns its results; its progress lines move a bar of its phases with the time left.
fn run_nested(script: &Path, twinbox: &Path, opts: &Options) -> Result<twinbox_bench::results::Results> {
    use std::io::BufRead as _;
    let mut args: Vec<String> =
        vec!["--scenario".into(), opts.scenarios.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")];
    if opts.image != twinbox_bench::DEFAULT_IMAGE {
        args.extend(["--image".into(), opts.image.clone()]);
    }
    if let Some(ready) = &opts.ready {
        args.extend(["--ready".into(), ready.to_string()]);
    }
    // The backends asked for, where the user chose; else every one the L1 has.
    if opts.backends.iter().map(String::as_str).ne(twinbox_bench::backend::ALL.iter().copied()) {
        args.extend(["--backends".into(), opts.backends.join(",")]);
    }
    if opts.quick {
        args.push("--quick".into());
    }
    // A quick run in the L1 is lean by itself (a few rounds and instances: under emulation a
    // VM takes seconds to start); what the user set explicitly goes there as given.
    for (flag, v) in [("--runs", opts.runs), ("--instances", opts.instances), ("--max", opts.max)] {
        if let Some(v) = v {
            args.extend([flag.to_owned(), v.to_string()]);
        }
    }
    // Rough times of each scenario in the L1 under TCG with every backend, from runs on this
    // kind of host (2 cores), quick and full: what the estimate says.
    let per_scenario = |s: &Scenario| match s {
        Scenario::Start => (30, 125),
        Scenario::Memory => (20, 90),
        Scenario::Density => (17, 50),
        Scenario::Cpu => (21, 45),
        Scenario::Net => (37, 70),
        Scenario::Disk => (16, 30),
        Scenario::Isolation => (5, 5),
    };
    let mut phases = vec![("booting the L1".to_owned(), 15)];
    phases.extend(opts.scenarios.iter().map(|s| {
        let (quick, full) = per_scenario(s);
        (format!("scenario {}", s.as_str()), if opts.quick { quick } else { full })
    }));
    let mut child = std::process::Command::new("bash")
        .arg(script)
        // The store the image is taken from (the user's own image goes into the L1's); the
        // script works from its checkout, so the path must not be relative.
        .env("TWINBOX_ROOT", std::path::absolute(&opts.store_root).unwrap_or_else(|_| opts.store_root.clone()))
        .arg("--twinbox")
        .arg(twinbox)
        .arg("--")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", script.display()))?;
    let progress = NestedProgress::start(phases);
    let stderr = child.stderr.take().expect("piped");
    let phases = progress.clone();
    // The bar goes (and its ticker ends) however this returns.
    let _bar = BarGuard(progress);
    // Every line of the nested run, for when it is slow or fails: the path is in the notes.
    let log_path = std::env::temp_dir().join(format!("twinbox-nested-{}.log", std::process::id()));
    let mut log_file = std::fs::File::create(&log_path).ok();
    let log = std::thread::spawn(move || {
        let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(f) = log_file.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            if line.contains("trying again") {
                // A stalled L1 is booted again: the phases start over.
                phases.restart();
            } else if line.contains("build-guest-kernel: building") {
                // Only when it is not cached: about ten minutes on two cores.
                phases.insert("building the guest kernel (once)", 600);
            } else if let Some(s) = line.split("INFO scenario scenario=\"").nth(1).and_then(|r| r.split('"').next()) {
                phases.enter(&format!("scenario {s}"));
            }
            tail.push_back(line);
            if tail.len() > 30 {
                tail.pop_front();
            }
        }
        tail.into_iter().collect::<Vec<_>>().join("\n")
    });
    let mut json = Vec::new();
    if let Err(e) = std::io::Read::read_to_end(child.stdout.as_mut().expect("piped"), &mut json) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(anyhow::Error::new(e).context(format!("reading what {} printed", script.display())));
    }
    let status = child.wait()?;
    let tail = log.join().unwrap_or_default();
    if !status.success() {
        anyhow::bail!(
            "{} exited with {status} (log: {}); its last lines:\n{tail}",
            script.display(),
            log_path.display()
        );
    }
    let _ = std::fs::remove_file(&log_path);
    let r: twinbox_bench::results::Results = serde_json::from_slice(&json)
        .with_context(|| format!("{} printed no results; its last lines:\n{tail}", script.display()))?;
    if r.schema != twinbox_bench::results::SCHEMA {
        anyhow::bail!("{} printed results of schema {:?}", script.display(), r.schema);
    }
    Ok(r)
}

/// The nested run's progress bar: its phases (L1 boot, then each scenario) with their
/// estimated seconds; the bar moves with the time spent in the current phase, never past its
/// estimate, and jumps to the next phase when the L1 says it began; the message names the
/// phase and the time left.
#[derive(Clone)]
struct NestedProgress {
    bar: indicatif::ProgressBar,
    state: std::sync::Arc<std::sync::Mutex<PhaseState>>,
}

struct PhaseState {
    phases: Vec<(String, u64)>,
    current: usize,
    since: std::time::Instant,
    done: bool,
}

impl NestedProgress {
    fn start(phases: Vec<(String, u64)>) -> NestedProgress {
        let bar = indicatif::ProgressBar::new(phases.iter().map(|p| p.1).sum());
        bar.set_style(
            indicatif::ProgressStyle::with_template("nested L1 (microVMs, emulated) [{bar:24}] {elapsed} · {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let state = PhaseState { phases, current: 0, since: std::time::Instant::now(), done: false };
        let p = NestedProgress { bar, state: std::sync::Arc::new(std::sync::Mutex::new(state)) };
        let ticker = p.clone();
        std::thread::spawn(move || loop {
            if !ticker.tick() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        });
        p
    }

    /// Redraws; false once finished.
    fn tick(&self) -> bool {
        let Ok(s) = self.state.lock() else { return false };
        if s.done {
            return false;
        }
        let total: u64 = s.phases.iter().map(|p| p.1).sum();
        let before: u64 = s.phases[..s.current].iter().map(|p| p.1).sum();
        let Some((name, estimate)) = s.phases.get(s.current) else { return false };
        let in_phase = s.since.elapsed().as_secs().min(estimate.saturating_sub(1));
        let done = before + in_phase;
        self.bar.set_length(total);
        self.bar.set_position(done);
        let left = total - done;
        self.bar.set_message(format!("{name} · about {}:{:02} left", left / 60, left % 60));
        true
    }

    /// A phase the estimate lacked (the kernel build), as the current one.
    fn insert(&self, name: &str, seconds: u64) {
        if let Ok(mut s) = self.state.lock() {
            if !s.phases.iter().any(|p| p.0 == name) {
                let at = s.current;
                s.phases.insert(at, (name.to_owned(), seconds));
                s.since = std::time::Instant::now();
            }
        }
    }

    fn enter(&self, name: &str) {
        if let Ok(mut s) = self.state.lock() {
            if let Some(i) = s.phases.iter().position(|p| p.0 == name).filter(|&i| i > s.current) {
                s.current = i;
                s.since = std::time::Instant::now();
            }
        }
    }

    /// Back to the first phase (the L1 boots again after a stall).
    fn restart(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.current = 0;
            s.since = std::time::Instant::now();
        }
    }

    fn finish(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.done = true;
        }
        self.bar.finish_and_clear();
    }
}

/// Clears the nested run's bar when dropped.
struct BarGuard(NestedProgress);

impl Drop for BarGuard {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// Medians per backend and metric, for the terminal.
fn print_summary(r: &twinbox_bench::results::Results) {
    println!(
        "twinbox bench on {} ({}, kernel {}, rev {})",
        r.context.host, r.context.virtualization.kind, r.context.kernel, r.context.rev
    );
    for b in r.backends.iter().filter(|b| !b.available) {
        println!("  {:<18} not measured: {}", b.name, b.reason.as_deref().unwrap_or(""));
    }
    for rec in &r.records {
        if let Some(s) = rec.summary {
            println!(
                "  {:<18} {:<8} {:<24} p50 {:>10} {:<11} p90 {:>10}  n {}",
                rec.backend,
                rec.scenario,
                rec.metric,
                report::num(s.p50),
                rec.unit,
                report::num(s.p90),
                s.n
            );
        }
    }
    for n in &r.not_applicable {
        println!("  not applicable: {n}");
    }
    for n in &r.notes {
        println!("  note: {n}");
    }
}

fn parse_ready(s: &str) -> Result<twinbox_bench::ready::ReadySpec, twinbox_bench::ready::ReadySpecError> {
    s.parse()
}

fn compare_cmd(c: CompareArgs) -> Result<i32> {
    use twinbox_bench::results::Results;
    let mut runs = [Results::load(&c.base)?, Results::load(&c.new)?];
    c.select.apply(&mut runs)?;
    let [mut base, mut new] = runs;
    if let Some(reference) = &c.select.relative_to {
        let (b, mut left_out) = compare::relative_to(&base, reference)?;
        let (n, more) = compare::relative_to(&new, reference)?;
        left_out.extend(more);
        left_out.sort();
        left_out.dedup();
        if !left_out.is_empty() {
            eprintln!("not compared ({reference} has no such figure): {}", left_out.join(", "));
        }
        (base, new) = (b, n);
    }
    let cmp = compare::compare(&base, &new, c.max_regression, c.alpha)?;
    if c.json {
        println!("{}", serde_json::to_string_pretty(&cmp)?);
    } else {
        print!("{}", cmp.render(c.max_regression, c.alpha));
    }
    Ok(if cmp.passes() { 0 } else { REGRESSED })
}

fn spread_cmd(a: SpreadArgs) -> Result<i32> {
    use twinbox_bench::results::Results;
    let mut runs = a.results.iter().map(|p| Results::load(p)).collect::<Result<Vec<_>, _>>()?;
    a.select.apply(&mut runs)?;
    let rows = twinbox_bench::spread::spread(&runs, a.select.relative_to.as_deref())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", twinbox_bench::spread::render(&rows, a.max_spread));
    }
    let over = a.max_spread.is_some_and(|limit| rows.iter().any(|r| r.spread > limit));
    Ok(if over { REGRESSED } else { 0 })
}

fn report_cmd(a: ReportArgs) -> Result<i32> {
    let results = twinbox_bench::results::Results::load(&a.results)?;
    let dir = a.out.unwrap_or_else(|| a.results.parent().map(Path::to_owned).unwrap_or_default());
    let written =
        report::write(&results, &dir).with_context(|| format!("cannot write the report in {}", dir.display()))?;
    if let Some(why) = &written.charts_skipped {
        eprintln!("twinbox bench: {why}");
    }
    eprintln!("report: {}", written.dir.join("report.html").display());
    Ok(0)
}

//! The report: `results.json`, `report.md`, a self-contained `report.html` (SVG charts
//! inlined) and the charts as PNG and SVG. Markdown and HTML are rendered from one document
//! model ([`Block`]), so they always say the same thing.

pub mod charts;
pub mod glance;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use twinbox_exit::ExitCode;

use crate::results::{BackendStatus, Record, Results};
use crate::stats::median;

/// One piece of the report.
#[derive(Debug, Clone)]
pub enum Block {
    Heading(u8, String),
    Para(String),
    List(Vec<String>),
    Table { head: Vec<String>, rows: Vec<Vec<String>> },
    Figure { stem: String, caption: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ExitCode for ReportError {
    fn exit_code(&self) -> i32 {
        match self {
            ReportError::Write { .. } => twinbox_exit::INTERNAL,
        }
    }
}

/// What [`write`] produced.
#[derive(Debug)]
pub struct Written {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    /// Why there are no charts, when there are none.
    pub charts_skipped: Option<String>,
}

/// A number with as many digits as it deserves.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// `<base>/<date>-<rev>`: where a run's report goes by default.
pub fn default_dir(base: &Path, r: &Results) -> PathBuf {
    let date = r.context.date.get(..10).unwrap_or("undated");
    base.join(format!("{date}-{}", r.context.rev))
}

/// Write everything into `dir` (created).
pub fn write(r: &Results, dir: &Path) -> Result<Written, ReportError> {
    let werr = |path: &Path| {
        let path = path.to_owned();
        move |source| ReportError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(werr(dir))?;
    let mut files = Vec::new();
    let json_path = dir.join("results.json");
    let json = serde_json::to_vec_pretty(r).expect("results always serialize");
    std::fs::write(&json_path, json).map_err(werr(&json_path))?;
    files.push(json_path);

    let (charts, skipped) = match charts::draw_all(r, dir) {
        Ok(c) => (c, None),
        Err(e) => {
            tracing::warn!("charts: {e}");
            (Vec::new(), Some(crate::scenario::error_chain(&e)))
        }
    };
    for c in &charts {
        files.push(dir.join(format!("{}.svg", c.stem)));
        files.push(dir.join(format!("{}.png", c.stem)));
    }
    if let Some(nested) = &r.nested {
        // Its own report (and charts) next to this one; this one gets a summary section.
        let sub = write(nested, &dir.join("nested"))?;
        files.extend(sub.files);
    }
    let doc = document(r, &charts, skipped.as_deref());
    let md_path = dir.join("report.md");
    std::fs::write(&md_path, markdown(&doc)).map_err(werr(&md_path))?;
    files.push(md_path);
    let html_path = dir.join("report.html");
    std::fs::write(&html_path, html(&doc, dir, &title(r))).map_err(werr(&html_path))?;
    files.push(html_path);
    Ok(Written { dir: dir.to_owned(), files, charts_skipped: skipped })
}

fn title(r: &Results) -> String {
    format!("twinbox bench: {} on {}", r.context.date.get(..10).unwrap_or(""), r.context.host)
}

fn med(r: &Results, backend: &str, scenario: &str, metric: &str) -> Option<f64> {
    r.record(backend, scenario, metric).filter(|x| !x.samples.is_empty()).map(|x| median(&x.samples))
}

/// Whether the run (or its nested run) measured the isolation scenario.
fn has_isolation(r: &Results) -> bool {
    std::iter::once(r)
        .chain(r.nested.as_deref())
        .any(|r| r.records.iter().any(|x| x.scenario == "isolation" && !x.samples.is_empty()))
}

/// "twinbox-container 12.3 ms, runc 45.6 ms"
fn list_medians(r: &Results, scenario: &str, metric: &str, unit: &str, skip: &[&str]) -> String {
    r.records
        .iter()
        .filter(|x| {
            x.scenario == scenario && x.metric == metric && !x.samples.is_empty() && !skip.contains(&x.backend.as_str())
        })
        .map(|x| format!("{} {} {unit}", x.backend, num(median(&x.samples))))
        .collect::<Vec<_>>()
        .join(", ")
}

/// |median of the second half − median of the first| / the smaller, for samples kept in the
/// order they were taken (start rounds); None with fewer than 8.
fn half_drift(samples: &[f64]) -> Option<f64> {
    if samples.len() < 8 {
        return None;
    }
    let (a, b) = samples.split_at(samples.len() / 2);
    let (a, b) = (median(a), median(b));
    (a.min(b) > 0.0).then(|| (a - b).abs() / a.min(b))
}

/// The opening section: what the figures support, and where they do not.
fn what_this_shows(r: &Results) -> Vec<String> {
    let mut out = Vec::new();
    let floor = "process";
    if let Some(p) = med(r, floor, "start", "time_to_workload") {
        let others = list_medians(r, "start", "time_to_workload", "ms", &[floor]);
        if !others.is_empty() {
            out.push(format!(
                "**Start.** From launch to the workload's first instruction (median): {others}, against {} ms for the \
                 bare process. That difference is the price of a container start here: namespaces, cgroups, a \
                 root filesystem switch and the runtime's own start-up; the workload itself is the same static binary.",
                num(p)
            ));
        }
    } else if !list_medians(r, "start", "time_to_workload", "ms", &[]).is_empty() {
        out.push(format!(
            "**Start.** From launch to the workload's first instruction (median): {}.",
            list_medians(r, "start", "time_to_workload", "ms", &[])
        ));
    }
    let ready = list_medians(r, "start", "time_to_ready", "ms", &[]);
    if !ready.is_empty() {
        out.push(format!(
            "**Time to ready.** From launching {}'s own command (detached) until it is ready ({}), median: {ready}.",
            r.settings.image,
            r.settings.ready.as_deref().unwrap_or("?")
        ));
    }
    let e2e = list_medians(r, "start", "end_to_end", "ms", &[]);
    if !e2e.is_empty() {
        out.push(format!("**End to end** (launch → `hello true` exited and the instance removed, median): {e2e}."));
    }
    let mem = list_medians(r, "memory", "total_per_instance", "KiB", &[]);
    if !mem.is_empty() {
        out.push(format!(
            "**Memory.** An idle instance costs, per instance (PSS of what stays running + kernel growth): {mem}. \
             Containers share the host kernel and the image's pages, so an idle one costs its processes plus \
             kernel objects (namespaces, mounts, cgroups){}.",
            match med(r, "twinbox-container", "memory", "processes_per_instance") {
                Some(n) if n > 1.0 => format!(
                    "; the detached twinbox containers of a store share one monitor process of a few KiB (the \
                     init's parent), counted as an equal share of a process and of its PSS for each: {} processes \
                     per instance",
                    num(n)
                ),
                _ => String::new(),
            }
        ));
    }

    let rate = list_medians(r, "density", "launch_rate", "/s", &[]);
    if !rate.is_empty() {
        out.push(format!(
            "**Density.** Launching up to {} instances one after another ({}): \
             {rate}. The curves show whether launch latency and host memory grow linearly with N.",
            r.settings.max,
            match r.settings.density_passes {
                1 => "one pass per backend".to_owned(),
                n => format!("{n} passes per backend, the median of each point"),
            }
        ));
    }
    let cpu = list_medians(r, "cpu", "compute_ratio", "×", &[floor]);
    if !cpu.is_empty() {
        let sys = list_medians(r, "cpu", "syscalls_ratio", "×", &[floor]);
        let ratios: Vec<f64> = r
            .records
            .iter()
            .filter(|x| {
                x.scenario == "cpu" && x.metric == "compute_ratio" && x.backend != floor && !x.samples.is_empty()
            })
            .map(|x| median(&x.samples))
            .collect();
        let worst = ratios.iter().map(|v| (v - 1.0).abs()).fold(0.0_f64, f64::max);
        let reading = if worst <= 0.05 {
            "indistinguishable from the bare process, as expected without virtualization: the same kernel and \
             scheduler run the loop"
                .to_owned()
        } else {
            format!(
                "up to {:.0}% away from the bare process; containers add no instructions to a compute loop, so read \
                 this against the spread in the chart (a shared {}-CPU host; cgroup CPU shares also change how a \
                 container competes with other work) before calling it a cost",
                worst * 100.0,
                r.context.cpus
            )
        };
        out.push(format!(
            "**CPU.** A compute loop inside each backend, as a fraction of the bare process's time: {cpu} — \
             {reading}.{}",
            if sys.is_empty() {
                String::new()
            } else {
                format!(
                    " A syscall-heavy loop (getppid): {sys}; a seccomp filter, where the runtime installs one, is \
                     paid on every system call."
                )
            }
        ));
    }
    let keepalive = list_medians(r, "net", "latency_keepalive", "µs", &[]);
    if !keepalive.is_empty() {
        let fresh = list_medians(r, "net", "latency_new_connection", "µs", &[]);
        let tput = list_medians(r, "net", "throughput", "MB/s", &[]);
        let ready = list_medians(r, "net", "time_to_ready", "ms", &[]);
        out.push(format!(
            "**Network.** `hello serve` reached on 127.0.0.1 through a published port, each backend published the \
             way its users publish one (the bare process listens on the port itself): request latency over a \
             kept-alive connection {keepalive}; with a new connection per request {fresh}; throughput {tput}; time \
             from launch to the first answer {ready}. A container's packets cross a veth pair and a bridge and are \
             rewritten by NAT; what that adds over loopback is the difference to the process."
        ));
    } else if r.settings.ready.is_some() {
        let fresh = list_medians(r, "net", "latency_new_connection", "µs", &[]);
        if !fresh.is_empty() {
            out.push(format!(
                "**Network.** {} reached on 127.0.0.1 through a published port, each backend published the way its \
                 users publish one: request latency with a new connection per request {fresh}{}.",
                r.settings.image,
                match list_medians(r, "net", "latency_keepalive", "µs", &[]) {
                    k if k.is_empty() => String::new(),
                    k => format!("; over a kept-alive connection {k}"),
                }
            ));
        }
    }
    let durable = list_medians(r, "disk", "volume_rand_write_iops", "IOPS", &[]);
    if !durable.is_empty() {
        let seq = list_medians(r, "disk", "volume_seq_write", "MB/s", &[]);
        let root = list_medians(r, "disk", "root_rand_write_iops", "IOPS", &[]);
        out.push(format!(
            "**Disk.** In a volume, random 4 KiB writes each made durable (fdatasync): {durable}; sequential \
             writes {seq}. In the instance's own writable root: {root} — a microVM's root is a tmpfs overlay in \
             its own memory, so nothing there reaches a disk, while a container writes through its overlay to the \
             host's file system."
        ));
    }
    let missing: Vec<String> = r
        .backends
        .iter()
        .filter(|b| !b.available)
        .map(|b| format!("{} ({})", b.name, b.reason.as_deref().unwrap_or("no reason given")))
        .collect();
    let vm_measured = r.backends.iter().any(|b| b.isolation == "microvm" && b.available);
    let nested_vms = r.nested.as_deref().filter(|n| n.backends.iter().any(|b| b.isolation == "microvm" && b.available));
    if let (false, Some(n)) = (vm_measured, nested_vms) {
        let vm = |metric: &str, scenario: &str, unit: &str| list_medians(n, scenario, metric, unit, &[]);
        out.push(format!(
            "**Containers against VMs** — only in the {} run of the last section, where every backend ran on the \
             same emulated machine (so the ratios mean something, the absolute times do not): start to exit {}; \
             memory per idle instance {}. The VMs boot their own kernel and hold guest RAM, which is the other \
             half of the trade-off; what they buy, a much smaller shared attack surface, is {}.",
            n.context.virtualization.kind,
            vm("end_to_end", "start", "ms"),
            vm("pss_per_instance", "memory", "KiB"),
            if has_isolation(r) { "measured in the Isolation section" } else { "not measured" },
        ));
    } else if !vm_measured {
        out.push(
            "**Where these figures do not reach.** No microVM was measured in this run, so the other half of the \
             trade-off — a VM boots its own kernel and pays for it in start-up time and RAM per guest, in exchange \
             for a much smaller shared attack surface — is *not* shown here; nothing above compares containers with \
             VMs."
                .into(),
        );
    }
    if !missing.is_empty() {
        out.push(format!("**Not measured:** {}.", missing.join("; ")));
    }
    if !r.not_applicable.is_empty() {
        let scenarios: Vec<String> = r
            .not_applicable
            .iter()
            .filter(|n| n.metrics.is_empty() && n.backend.is_none())
            .map(|n| n.scenario.clone())
            .collect();
        out.push(format!(
            "**Not applicable to {}:** {}; they need the hello image's workloads (the list with the reasons: \
             \"Not applicable to this image\" below).",
            r.settings.image,
            if scenarios.is_empty() {
                "some metrics".to_owned()
            } else {
                format!("the {} scenarios and some metrics", scenarios.join(", "))
            }
        ));
    }
    let drifts: Vec<String> = r
        .records
        .iter()
        .filter(|x| x.scenario == "start" && x.metric == "time_to_workload")
        .filter_map(|x| Some(format!("{} {:.0} %", x.backend, half_drift(&x.samples)? * 100.0)))
        .collect();
    if !drifts.is_empty() {
        out.push(format!(
            "**Steadiness.** How far each backend's median start moved between the first and the second half of \
             this run's rounds: {}. The host's own noise is at least that large, so a smaller difference between \
             two runs says little; `twinbox bench compare` tests one for significance.",
            drifts.join(", ")
        ));
    }
    let churns = r.records.iter().any(|x| x.backend == "twinbox-container" && x.scenario != "cpu");
    if let Some(fs) = r.context.store_fs.as_ref().filter(|f| f.journal_less_ext4() && churns) {
        out.push(format!(
            "**This host's filesystem.** twinbox makes each container's overlay upper and work directories and \
             its bundle on ext4 without a journal here ({fs}). There the kernel does not \
             reuse an inode freed in the last one to six minutes, and every new file or directory is allocated \
             by scanning past those (fs/ext4/ialloc.c, `recently_deleted`). So launches that create files get \
             slower the more containers were removed just before, later in a run and from one run to the next. \
             A twinbox container creates about 20 inodes there, runc and crun 3–5 in their state directories, \
             so twinbox-container's launch times are the ones that climb over back-to-back runs. Leave a few \
             minutes between runs you compare, or measure with the state on a journaled filesystem \
             (`scripts/journaled-state.sh`)."
        ));
    }
    let surface_of = |r: &Results| {
        r.records
            .iter()
            .filter(|x| x.scenario == "isolation" && x.metric == "syscalls" && !x.samples.is_empty())
            .map(|x| format!("{} {}", x.backend, num(median(&x.samples))))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut surface = surface_of(r);
    if let Some(n) = r.nested.as_deref() {
        let nested = surface_of(n);
        if !nested.is_empty() {
            let sep = if surface.is_empty() { "" } else { "; " };
            surface = format!("{surface}{sep}in the {} run: {nested}", n.context.virtualization.kind);
        }
    }
    if !surface.is_empty() {
        out.push(format!(
            "**Isolation.** System calls of the host kernel that run when called, probed from inside: {surface}. \
             A container's are its workload's (twinbox's under its default seccomp profile, the bench's runc and \
             crun bundles without one). A VM's workload calls its own guest kernel, so what reaches the host is \
             its VMM: twinbox's VMM is jailed (a seccomp allowlist per thread, the vCPU thread's counted here; no \
             capabilities; an unprivileged uid; an empty read-only root; an empty network namespace; a cgroup of its \
             own), while QEMU runs here as an unconfined root process."
        ));
    }
    out.push(format!(
        "**Scope.** One host ({}; {}), {} CPUs, a machine shared with other work: the figures are this host's, \
         medians over the runs stated, and are only compared with runs under the same kind of virtualization. \
         {}",
        r.context.virtualization.kind,
        r.context.virtualization.detail,
        r.context.cpus,
        if surface.is_empty() {
            "Isolation strength itself is not measured."
        } else {
            "Isolation is measured as what reaches the host kernel (the Isolation section), not as resistance to \
             a determined attacker."
        }
    ));
    if r.interrupted {
        out.push(
            "**Interrupted.** The run was stopped with Ctrl-C; what is here is what was measured until then.".into(),
        );
    }
    out
}

fn summary_rows(records: &[&Record]) -> Vec<Vec<String>> {
    records
        .iter()
        .map(|x| {
            let s = x.summary;
            let f = |g: fn(&crate::stats::Summary) -> f64| s.as_ref().map(|s| num(g(s))).unwrap_or_else(|| "–".into());
            vec![
                x.backend.clone(),
                x.metric.clone(),
                x.unit.clone(),
                f(|s| s.p50),
                f(|s| s.p90),
                f(|s| s.p99),
                f(|s| s.min),
                f(|s| s.max),
                x.samples.len().to_string(),
                x.failures.to_string(),
            ]
        })
        .collect()
}

fn stats_table(records: &[&Record]) -> Block {
    Block::Table {
        head: ["backend", "metric", "unit", "p50", "p90", "p99", "min", "max", "n", "failed"]
            .map(String::from)
            .to_vec(),
        rows: summary_rows(records),
    }
}

/// The isolation figures: a row per backend, a column per metric (one probe each).
fn isolation_table(r: &Results, recs: &[&Record]) -> Block {
    let metrics = [
        ("syscalls", "system calls"),
        ("syscalls_widest_thread", "widest VMM thread"),
        ("capabilities", "capabilities"),
        ("device_nodes", "device nodes"),
        ("proc_sys_files", "/proc/sys files"),
        ("sys_class_entries", "/sys/class entries"),
        ("host_kernel_shared", "shares the host kernel"),
        ("emulated_device_types", "emulated device types"),
    ];
    let mut backends: Vec<&str> = Vec::new();
    for b in &r.backends {
        if recs.iter().any(|x| x.backend == b.name) {
            backends.push(&b.name);
        }
    }
    let rows = backends
        .iter()
        .map(|b| {
            let mut row = vec![b.to_string()];
            for (metric, _) in metrics {
                let v = recs.iter().find(|x| x.backend == *b && x.metric == metric).and_then(|x| x.samples.first());
                row.push(match (metric, v) {
                    ("host_kernel_shared", Some(v)) => if *v > 0.0 { "yes" } else { "no" }.to_owned(),
                    (_, Some(v)) => format!("{v:.0}"),
                    (_, None) => "–".to_owned(),
                });
            }
            row
        })
        .collect();
    let mut head = vec!["backend".to_owned()];
    head.extend(metrics.iter().map(|(_, h)| h.to_string()));
    Block::Table { head, rows }
}

/// The report as blocks.
pub fn document(r: &Results, charts: &[charts::Chart], charts_skipped: Option<&str>) -> Vec<Block> {
    let c = &r.context;
    let s = &r.settings;
    let mut d = vec![Block::Heading(1, title(r))];
    let figs = |stems: &[&str]| -> Vec<Block> {
        charts
            .iter()
            .filter(|c| stems.contains(&c.stem.as_str()))
            .map(|c| Block::Figure {
                stem: c.stem.clone(),
                caption: format!("{}. {}", c.title, c.caption.replace('\n', "; ")),
            })
            .collect()
    };
    d.push(Block::Para(format!(
        "Image `{}`, revision `{}`{}, {} run{}. Raw samples: `results.json`.",
        s.image,
        c.rev,
        if c.dirty { " with uncommitted changes" } else { "" },
        match (s.quick, s.lean) {
            (true, true) => "a lean `--quick` (emulated: a few rounds of each)",
            (false, true) => "a lean (emulated: fewer rounds)",
            (true, false) => "a `--quick`",
            (false, false) => "a full",
        },
        if r.interrupted { ", interrupted" } else { "" }
    )));
    let g = glance::glance(r);
    if !g.rows.is_empty() {
        d.push(Block::Heading(2, "The trade-off at a glance".into()));
        let mut head = vec![format!("cost ÷ {}'s (more is worse)", g.reference_label())];
        head.extend(g.columns.iter().map(glance::Column::label));
        d.push(Block::Table {
            head,
            rows: g
                .rows
                .iter()
                .map(|(label, costs)| {
                    let mut row = vec![label.to_string()];
                    row.extend(costs.iter().map(|c| glance::cell(*c)));
                    row
                })
                .collect(),
        });
        d.extend(figs(&["glance"]));
        d.push(Block::Para(glance::in_words(&g).join(" ")));
    }
    d.push(Block::Heading(2, "What this shows".into()));
    d.push(Block::List(what_this_shows(r)));

    d.push(Block::Heading(2, "Where and how".into()));
    d.push(Block::Table {
        head: vec!["".into(), "".into()],
        rows: vec![
            vec!["host".into(), c.host.clone()],
            vec!["date".into(), c.date.clone()],
            vec!["revision".into(), format!("{}{}", c.rev, if c.dirty { " (dirty)" } else { "" })],
            vec!["kernel".into(), c.kernel.clone()],
            vec!["CPU".into(), format!("{} × {}", c.cpus, c.cpu_model)],
            vec!["memory".into(), format!("{} MiB", c.mem_total_kib / 1024)],
            vec!["cgroups".into(), c.cgroup_layout.clone()],
            vec!["virtualization".into(), format!("{} — {}", c.virtualization.kind, c.virtualization.detail)],
            vec![
                "container files".into(),
                c.store_fs.as_ref().map_or_else(|| "not recorded".into(), |f| f.to_string()),
            ],
            vec!["scenarios".into(), s.scenarios.join(", ")],
            vec![
                "image".into(),
                match &s.ready {
                    Some(spec) => format!("`{}`, its own command, ready when `{spec}` holds", s.image),
                    None => format!("`{}`, the hello image's modes", s.image),
                },
            ],
            vec![
                "rounds".into(),
                format!(
                    "start {} measured + {} warm-up dropped{}; cpu {} + 1; memory {} instances; density up to {}",
                    if s.ready.is_some() { s.ready_runs } else { s.start_runs },
                    s.warmup,
                    if s.ready.is_some() { " (time to ready)" } else { "" },
                    s.cpu_runs,
                    s.instances,
                    s.max
                ),
            ],
        ],
    });
    d.push(Block::Para(
        "Backends run interleaved round by round with the order rotated each round; percentiles come from an HDR \
         histogram of the raw samples (3 significant digits). Timings are stamped by the harness on the host: the \
         workload signals by writing to its stdout pipe."
            .into(),
    ));

    d.push(Block::Heading(2, "Backends".into()));
    d.push(backends_table(&r.backends, true));

    let section = |scenario: &str| -> Vec<&Record> { r.records.iter().filter(|x| x.scenario == scenario).collect() };
    let method = |recs: &[&Record]| -> Block {
        let mut seen: Vec<String> = Vec::new();
        for x in recs {
            let line = format!("`{}`: {}", x.metric, x.description);
            if !seen.contains(&line) {
                seen.push(line);
            }
        }
        Block::List(seen)
    };
    for (scenario, heading, stems) in [
        ("start", "Start latency", &["start-time-to-workload", "start-end-to-end", "start-time-to-ready"][..]),
        ("memory", "Memory per idle instance", &["memory"][..]),
        ("density", "Density", &["density-launch-latency", "density-host-memory"][..]),
        ("cpu", "CPU cost", &["cpu"][..]),
        (
            "net",
            "Network through a published port",
            &["net-latency-keepalive", "net-latency-new-connection", "net-throughput", "net-time-to-ready"][..],
        ),
        ("disk", "Disk I/O", &[][..]),
        ("isolation", "Isolation: what reaches the host kernel", &[][..]),
    ] {
        let recs = section(scenario);
        if recs.is_empty() {
            continue;
        }
        d.push(Block::Heading(2, heading.into()));
        d.extend(figs(stems));
        d.push(if scenario == "isolation" { isolation_table(r, &recs) } else { stats_table(&recs) });
        d.push(method(&recs));
    }
    if !r.not_applicable.is_empty() {
        d.push(Block::Heading(2, "Not applicable to this image".into()));
        d.push(Block::Para(format!(
            "`{}` runs its own command, not the hello image's modes, so these are not measured for it:",
            s.image
        )));
        d.push(Block::List(r.not_applicable.iter().map(ToString::to_string).collect()));
    }
    if let Some(why) = charts_skipped {
        d.push(Block::Para(format!("No charts: {why}.")));
    }
    if let Some(n) = &r.nested {
        d.extend(nested_section(n));
    }
    if !r.notes.is_empty() {
        d.push(Block::Heading(2, "Notes from the run".into()));
        d.push(Block::List(r.notes.clone()));
    }
    d.push(Block::Heading(2, "Reproduce".into()));
    d.push(Block::Para(format!(
        "`sudo twinbox bench{}{}{}` ({}); compare two runs with `twinbox bench compare BASE/results.json \
         NEW/results.json --max-regression 10%`.",
        if s.quick { " --quick" } else { "" },
        match &s.ready {
            Some(spec) => format!(" --image {} --ready '{spec}'", s.image),
            None => String::new(),
        },
        if s.scenarios.len() < crate::Scenario::ALL.len() {
            format!(" --scenario {}", s.scenarios.join(","))
        } else {
            String::new()
        },
        match &s.ready {
            Some(_) => format!("store with `{}`, built or pulled there", s.image),
            None => "store with `hello:latest`: `scripts/default-images.sh`".to_owned(),
        }
    )));
    d
}

/// The run of another virtualization kind (the nested L1), summarised in its own section and
/// never in the same table as this host's figures.
fn nested_section(n: &Results) -> Vec<Block> {
    let c = &n.context;
    let kind = &c.virtualization.kind;
    let mut d = vec![Block::Heading(2, format!("MicroVMs — {kind}: shows the mechanics, not representative timings"))];
    d.push(Block::Para(format!(
        "Measured on another machine than the figures above, so never compared with them: {} ({}), kernel {}, \
         {} × {}, revision `{}`, {}. Every backend below ran there, interleaved as above, so they compare with \
         each other.{} Full report with charts: `nested/report.html`.",
        c.virtualization.detail,
        kind,
        c.kernel,
        c.cpus,
        c.cpu_model,
        c.rev,
        c.date,
        if n.settings.lean {
            format!(
                " Every microVM boot takes seconds there, so the run is lean: {} start rounds, {} idle instances, {} \
                 per density pass — each figure's size, not small differences.",
                n.settings.start_runs, n.settings.instances, n.settings.max
            )
        } else {
            String::new()
        }
    )));
    let mut shows = Vec::new();
    let start = list_medians(n, "start", "end_to_end", "ms", &[]);
    if !start.is_empty() {
        shows.push(format!("**Start to exit** of `hello true` (median): {start}."));
    }
    let mem = list_medians(n, "memory", "pss_per_instance", "KiB", &[]);
    if !mem.is_empty() {
        shows.push(format!("**Memory per idle instance** (PSS, median): {mem}."));
    }
    if !shows.is_empty() {
        d.push(Block::List(shows));
    }
    d.push(backends_table(&n.backends, false));
    let recs: Vec<&Record> = n.records.iter().collect();
    if !recs.is_empty() {
        d.push(stats_table(&recs));
    }
    if !n.notes.is_empty() {
        d.push(Block::List(n.notes.iter().map(|x| format!("note: {x}")).collect()));
    }
    d
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// Render as GitHub Markdown; figures reference the SVG next to the file.
pub fn markdown(doc: &[Block]) -> String {
    let mut o = String::new();
    for b in doc {
        match b {
            Block::Heading(l, t) => {
                let _ = writeln!(o, "{} {t}\n", "#".repeat(*l as usize));
            }
            Block::Para(t) => {
                let _ = writeln!(o, "{t}\n");
            }
            Block::List(items) => {
                for i in items {
                    let _ = writeln!(o, "- {i}");
                }
                o.push('\n');
            }
            Block::Table { head, rows } => {
                let _ = writeln!(o, "| {} |", head.iter().map(|h| md_cell(h)).collect::<Vec<_>>().join(" | "));
                let _ = writeln!(o, "|{}|", head.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
                for r in rows {
                    let _ = writeln!(o, "| {} |", r.iter().map(|c| md_cell(c)).collect::<Vec<_>>().join(" | "));
                }
                o.push('\n');
            }
            Block::Figure { stem, caption } => {
                let _ = writeln!(o, "![{}]({stem}.svg)\n\n*{caption}* ([PNG]({stem}.png))\n", md_cell(caption));
            }
        }
    }
    o
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Escape, then the two inline marks the report uses: `code` and **bold**, *em*.
fn inline(s: &str) -> String {
    let e = esc(s);
    let mut out = String::new();
    for (i, part) in e.split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<code>{part}</code>");
        } else {
            let mut t = String::new();
            for (j, p) in part.split("**").enumerate() {
                if j % 2 == 1 {
                    let _ = write!(t, "<strong>{p}</strong>");
                } else {
                    t.push_str(p);
                }
            }
            out.push_str(&t);
        }
    }
    out
}

/// Render as one HTML file with the SVG charts inlined.
pub fn html(doc: &[Block], dir: &Path, title: &str) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\
         body{{font-family:sans-serif;max-width:1060px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}}\
         table{{border-collapse:collapse;margin:1em 0;font-size:14px}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}\
         th{{background:#f3f3f3}}code{{background:#f3f3f3;padding:0 3px}}figure{{margin:1.5em 0}}\
         figure svg{{max-width:100%;height:auto}}figcaption{{font-size:14px;color:#555}}\
         </style></head><body>\n",
        esc(title)
    );
    for b in doc {
        match b {
            Block::Heading(l, t) => {
                let _ = writeln!(o, "<h{l}>{}</h{l}>", inline(t));
            }
            Block::Para(t) => {
                let _ = writeln!(o, "<p>{}</p>", inline(t));
            }
            Block::List(items) => {
                o.push_str("<ul>\n");
                for i in items {
                    let _ = writeln!(o, "<li>{}</li>", inline(i));
                }
                o.push_str("</ul>\n");
            }
            Block::Table { head, rows } => {
                o.push_str("<table>\n");
                if head.iter().any(|h| !h.is_empty()) {
                    let _ = writeln!(
                        o,
                        "<tr>{}</tr>",
                        head.iter().map(|h| format!("<th>{}</th>", inline(h))).collect::<String>()
                    );
                }
                for r in rows {
                    let _ = writeln!(
                        o,
                        "<tr>{}</tr>",
                        r.iter().map(|c| format!("<td>{}</td>", inline(c))).collect::<String>()
                    );
                }
                o.push_str("</table>\n");
            }
            Block::Figure { stem, caption } => {
                let svg = std::fs::read_to_string(dir.join(format!("{stem}.svg"))).unwrap_or_default();
                // Drop any XML prolog so the SVG can sit inside HTML.
                let svg = svg.find("<svg").map(|i| &svg[i..]).unwrap_or("");
                let _ = writeln!(o, "<figure>{svg}<figcaption>{}</figcaption></figure>", inline(caption));
            }
        }
    }
    o.push_str("</body></html>\n");
    o
}

/// The backends, measured or not and why; `version` adds their version column.
fn backends_table(backends: &[BackendStatus], version: bool) -> Block {
    let mut head = vec!["backend", "isolation", "measured", "reason / how it runs"];
    if version {
        head.push("version");
    }
    let rows = backends
        .iter()
        .map(|b| {
            let mut row = vec![
                b.name.clone(),
                b.isolation.clone(),
                if b.available { "yes".into() } else { "**no**".into() },
                if b.available { b.note.clone().unwrap_or_default() } else { b.reason.clone().unwrap_or_default() },
            ];
            if version {
                row.push(b.version.clone().unwrap_or_default());
            }
            row
        })
        .collect();
    Block::Table { head: head.into_iter().map(String::from).collect(), rows }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_marks_and_escaping() {
        assert_eq!(inline("a `b<c>` **d** e"), "a <code>b&lt;c&gt;</code> <strong>d</strong> e");
    }

    #[test]
    fn drift_between_the_halves_of_a_run() {
        let steady = [10.0, 11.0, 9.0, 10.0, 10.0, 9.0, 11.0, 10.0];
        assert_eq!(half_drift(&steady), Some(0.0));
        // The host got 20 % slower half way through.
        let slower = [10.0, 10.0, 10.0, 10.0, 12.0, 12.0, 12.0, 12.0];
        assert!((half_drift(&slower).unwrap() - 0.2).abs() < 1e-9);
        assert_eq!(half_drift(&slower[..6]), None, "too few samples to say");
    }

    #[test]
    fn numbers() {
        assert_eq!(num(1234.5), "1234");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(1.234), "1.23");
        assert_eq!(num(0.1234), "0.123");
        assert_eq!(num(f64::NAN), "–");
    }
}

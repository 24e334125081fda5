//! Report generation from synthetic results: every file is written, the SVGs are well-formed
//! enough to inline, and the text names every backend, unavailable ones with their reason.

mod common;

use std::path::Path;

fn balanced(svg: &str, tag: &str) -> bool {
    svg.matches(&format!("<{tag}")).count() == svg.matches(&format!("</{tag}>")).count()
}

/// Start and end of an SVG document, and no unclosed container elements.
fn svg_ok(path: &Path) {
    let svg = std::fs::read_to_string(path).unwrap();
    let body = svg.trim();
    assert!(
        body.starts_with("<svg") || body.starts_with("<?xml"),
        "{}: {}",
        path.display(),
        &body[..40.min(body.len())]
    );
    assert!(body.ends_with("</svg>"), "{} does not end with </svg>", path.display());
    assert!(balanced(&svg, "svg") && balanced(&svg, "text"), "{}: unbalanced tags", path.display());
    assert!(svg.contains("<text"), "{}: a chart without any text", path.display());
}

#[test]
fn writes_every_file_and_names_every_backend() {
    let r = common::results(1, 1.0);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let w = twinbox_bench::report::write(&r, &out).unwrap();
    for f in ["results.json", "report.md", "report.html"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    if let Some(why) = &w.charts_skipped {
        // Only acceptable when the machine has no font at all; CI machines have DejaVu.
        // Only acceptable when the machine has no font at all; CI machines have DejaVu.
        twinbox_testutil::require(false, "chart checks", why);
    } else {
        for stem in [
            "start-time-to-workload",
            "start-end-to-end",
            "memory",
            "density-launch-latency",
            "density-host-memory",
            "cpu",
        ] {
            svg_ok(&out.join(format!("{stem}.svg")));
            let png = std::fs::read(out.join(format!("{stem}.png"))).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{stem}.png is not a PNG");
        }
    }

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## What this shows"));
    assert!(md.contains("**Steadiness.**") && md.contains("twinbox-container"), "{md}");
    assert!(md.find("What this shows").unwrap() < md.find("## Backends").unwrap(), "the report must open with it");
    for b in &r.backends {
        assert!(md.contains(&b.name), "report.md does not mention {}", b.name);
        if let Some(reason) = &b.reason {
            assert!(md.contains(reason.as_str()), "report.md does not give the reason for {}: {reason}", b.name);
        }
    }
    assert!(md.contains("No microVM was measured"), "the report must say the VM side is missing");

    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    for b in &r.backends {
        assert!(html.contains(&b.name));
    }
    if w.charts_skipped.is_none() {
        assert_eq!(html.matches("<svg").count(), 7, "every chart inlined once (the glance chart first)");
        assert!(!html.contains("<img"), "self-contained: no external images");
    }

    let back = twinbox_bench::results::Results::load(&out.join("results.json")).unwrap();
    assert_eq!(back.records.len(), r.records.len());
    for (a, b) in back.records[0].samples.iter().zip(&r.records[0].samples) {
        assert!((a - b).abs() < 1e-12, "raw samples kept: {a} vs {b}");
    }
}

#[test]
fn the_store_filesystem_is_stated_and_a_journal_less_ext4_explained() {
    let md_for = |fs: Option<twinbox_bench::host::StoreFs>| {
        let mut r = common::results(3, 1.0);
        r.context.store_fs = fs;
        let dir = tempfile::tempdir().unwrap();
        twinbox_bench::report::write(&r, dir.path()).unwrap();
        std::fs::read_to_string(dir.path().join("report.md")).unwrap()
    };
    let ext4 = |journal| twinbox_bench::host::StoreFs {
        path: "/var/lib/twinbox/containers".into(),
        fs_type: "ext4".into(),
        source: "/dev/vda".into(),
        journal: Some(journal),
    };
    let caveat = "**This host's filesystem.**";

    let md = md_for(Some(ext4(false)));
    assert!(md.contains("| container files | ext4 on /dev/vda, no journal (/var/lib/twinbox/containers) |"), "{md}");
    let at = md.find(caveat).expect("a journal-less store is explained");
    assert!(at < md.find("## Backends").unwrap(), "in the opening section");
    assert!(md.contains("scripts/journaled-state.sh"), "and says what to do about it");

    let md = md_for(Some(ext4(true)));
    assert!(md.contains("ext4 on /dev/vda, journaled") && !md.contains(caveat), "{md}");
    let md = md_for(None);
    assert!(md.contains("| container files | not recorded |") && !md.contains(caveat), "{md}");
}

#[test]
fn a_run_with_only_unavailable_backends_still_reports() {
    let mut r = common::results(2, 1.0);
    r.records.clear();
    for b in &mut r.backends {
        b.available = false;
        b.reason.get_or_insert_with(|| "needs root".into());
    }
    let dir = tempfile::tempdir().unwrap();
    twinbox_bench::report::write(&r, dir.path()).unwrap();
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(md.contains("needs root") && md.contains("firecracker not on PATH"));
}

#[test]
fn results_with_another_schema_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("results.json");
    std::fs::write(&p, r#"{"schema": "something-else/9"}"#).unwrap();
    let e = twinbox_bench::results::Results::load(&p).unwrap_err();
    assert!(e.to_string().contains("something-else/9"), "{e}");
}

#[test]
fn a_nested_run_gets_its_own_labelled_section_and_report() {
    use twinbox_bench::host::{VirtKind, Virtualization};
    let mut nested = common::results(2, 1.0);
    nested.context.virtualization =
        Virtualization { kind: VirtKind::NestedTcg, detail: "nested L1 of scripts/nested-kvm.sh".into() };
    nested.notes = vec!["from the L1".into()];
    let mut r = common::results(1, 1.0);
    r.nested = Some(Box::new(nested));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    twinbox_bench::report::write(&r, &out).unwrap();
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let heading = md.lines().find(|l| l.starts_with("## MicroVMs")).expect("a nested section");
    assert!(heading.contains("nested TCG: shows the mechanics, not representative timings"), "{heading}");
    assert!(md.contains("note: from the L1"), "{md}");
    assert!(out.join("nested/report.html").is_file() && out.join("nested/results.json").is_file());
    // The JSON keeps both runs apart and loads back.
    let back = twinbox_bench::results::Results::load(&out.join("results.json")).unwrap();
    assert_eq!(back.nested.unwrap().context.virtualization.kind, VirtKind::NestedTcg);
    assert_eq!(back.context.virtualization.kind, VirtKind::Pvm);
}

/// `results` cut down to `scenarios`, as a part of a run split by scenario.
fn part(seed: u64, scenarios: &[&str]) -> twinbox_bench::results::Results {
    let mut r = common::results(seed, 1.0);
    r.records.retain(|x| scenarios.contains(&x.scenario.as_str()));
    r.settings.scenarios = scenarios.iter().map(|s| s.to_string()).collect();
    r
}

#[test]
fn parts_of_a_run_made_scenario_by_scenario_merge_into_one() {
    use twinbox_bench::results::{MergeError, Results};
    let mut cpu = part(2, &["cpu"]);
    cpu.settings.cpu_runs = 3;
    cpu.notes = vec!["cpu part".into()];
    let mut start = part(1, &["start"]);
    start.settings.start_runs = 10;
    let n = cpu.records.len() + start.records.len();
    let m = Results::merge(vec![cpu.clone(), start.clone()]).unwrap();
    assert_eq!(m.settings.scenarios, ["start", "cpu"], "in the order a full run takes them");
    assert_eq!((m.settings.start_runs, m.settings.cpu_runs), (10, 3), "each from the part that ran it");
    assert_eq!(m.records.len(), n);
    assert_eq!(m.notes.first().map(String::as_str), Some("cpu part"), "notes of every part, in order");

    // The same scenario twice, another revision or another kind of machine: refused.
    assert!(matches!(Results::merge(vec![start.clone(), start.clone()]), Err(MergeError::Overlap(s)) if s == "start"));
    let mut other = cpu.clone();
    other.context.rev = "0000000".into();
    let e = Results::merge(vec![start.clone(), other]).unwrap_err();
    assert!(e.to_string().contains("revision"), "{e}");
    let mut elsewhere = cpu;
    elsewhere.context.virtualization.kind = twinbox_bench::host::VirtKind::NestedTcg;
    assert!(Results::merge(vec![start, elsewhere]).unwrap_err().to_string().contains("virtualization"));
    assert!(matches!(Results::merge(vec![]), Err(MergeError::Empty)));
}

/// The report opens with the trade-off: its first table has every backend of the run and the
/// nested run's microVMs, each metric as a cost relative to its own run's bare process.
#[test]
fn the_first_table_puts_containers_and_nested_microvms_side_by_side() {
    use twinbox_bench::results::Better;
    let mut nested = common::results(2, 1.0);
    for b in nested.backends.iter_mut().filter(|b| b.name == "twinbox-microvm") {
        (b.available, b.reason) = (true, None);
    }
    // Ten times the process's start and memory there: the VM's ratios.
    for (metric, scenario, v) in
        [("time_to_workload", "start", 10.0), ("total_per_instance", "memory", 10.0), ("end_to_end", "start", 5.0)]
    {
        let base = nested.record("process", scenario, metric).unwrap().samples.clone();
        let mid = twinbox_bench::stats::median(&base);
        let samples = vec![mid * v];
        nested.records.push(common::record("twinbox-microvm", scenario, metric, "ms", Better::Lower, samples));
    }
    let mut r = common::results(1, 1.0);
    r.nested = Some(Box::new(nested));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    twinbox_bench::report::write(&r, &out).unwrap();
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let first_table = md.lines().find(|l| l.starts_with('|')).unwrap();
    assert!(md.find("## The trade-off at a glance").unwrap() < md.find("## What this shows").unwrap(), "{md}");
    assert_eq!(
        first_table,
        "| cost ÷ the bare process's (more is worse) | process | twinbox-container | runc | twinbox-microvm (nested, emulated) |"
    );
    let row = |label: &str| md.lines().find(|l| l.starts_with(&format!("| {label} |"))).unwrap_or_default().to_owned();
    assert!(row("start (time to workload)").ends_with("| 10.0× |"), "{}", row("start (time to workload)"));
    assert!(row("memory per idle instance").ends_with("| 10.0× |"), "{}", row("memory per idle instance"));
    assert!(row("start (time to workload)").starts_with("| start (time to workload) | 1.00× |"));
    assert!(
        md.contains("A microVM (twinbox-microvm (nested, emulated)) costs: 10.0× start (time to workload)"),
        "{md}"
    );
    assert!(md.contains("So the VM's own kernel costs, against the container:"), "{md}");
    assert!(out.join("glance.svg").is_file() || md.contains("No charts"), "the chart, unless no font");
}

/// The user's own image has no bare process (it is not applicable): the first table divides
/// by the twinbox container, in each run its own, and says so.
#[test]
fn an_image_without_the_bare_process_is_shown_against_the_container() {
    use twinbox_bench::results::Better;
    let own = |r: &mut twinbox_bench::results::Results| {
        r.records.retain(|x| x.backend != "process" && x.scenario != "cpu");
        for b in r.backends.iter_mut().filter(|b| b.name == "process") {
            (b.available, b.reason) = (false, Some("not applicable to web: …".into()));
        }
        r.settings.image = "web".into();
    };
    let mut nested = common::results(2, 1.0);
    own(&mut nested);
    for b in nested.backends.iter_mut().filter(|b| b.name == "twinbox-microvm") {
        (b.available, b.reason) = (true, None);
    }
    let base = nested.record("twinbox-container", "memory", "total_per_instance").unwrap().samples.clone();
    let vm = vec![twinbox_bench::stats::median(&base) * 20.0];
    nested.records.push(common::record("twinbox-microvm", "memory", "total_per_instance", "KiB", Better::Lower, vm));
    let mut r = common::results(1, 1.0);
    own(&mut r);
    r.nested = Some(Box::new(nested));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    twinbox_bench::report::write(&r, &out).unwrap();
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let first_table = md.lines().find(|l| l.starts_with('|')).unwrap();
    assert_eq!(
        first_table,
        "| cost ÷ twinbox-container's (more is worse) | twinbox-container | runc | twinbox-microvm (nested, emulated) |"
    );
    let row = md.lines().find(|l| l.starts_with("| memory per idle instance |")).unwrap();
    assert!(row.starts_with("| memory per idle instance | 1.00× |") && row.ends_with("| 20.0× |"), "{row}");
    assert!(!md.contains("| compute loop |"), "no ratios to a process that did not run: {md}");
    assert!(
        md.contains("A microVM (twinbox-microvm (nested, emulated)) costs, against a container (twinbox-container"),
        "{md}"
    );
}

/// Isolation figures of both runs (containers on the host, microVMs in the nested one) reach
/// the summary and the at-a-glance table, and the summary no longer says isolation is not
/// measured.
#[test]
fn isolation_of_both_runs_is_summarised() {
    use twinbox_bench::host::{VirtKind, Virtualization};
    use twinbox_bench::results::Better;
    let syscalls =
        |backend: &str, n: f64| common::record(backend, "isolation", "syscalls", "calls", Better::Lower, vec![n]);
    let mut nested = common::results(2, 1.0);
    nested.context.virtualization = Virtualization { kind: VirtKind::NestedTcg, detail: "nested L1".into() };
    for b in nested.backends.iter_mut().filter(|b| b.name == "twinbox-microvm") {
        (b.available, b.reason) = (true, None);
    }
    nested.records.extend([syscalls("process", 344.0), syscalls("twinbox-microvm", 43.0)]);
    let mut r = common::results(1, 1.0);
    r.records.extend([syscalls("process", 344.0), syscalls("twinbox-container", 303.0), syscalls("runc", 331.0)]);
    r.nested = Some(Box::new(nested));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    twinbox_bench::report::write(&r, &out).unwrap();
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let summary = md.lines().find(|l| l.contains("**Isolation.**")).unwrap_or_else(|| panic!("{md}"));
    assert!(summary.contains("twinbox-container 303, runc 331"), "{summary}");
    assert!(summary.contains("run: process 344, twinbox-microvm 43"), "{summary}");
    assert!(!md.contains("Isolation strength itself is not measured"), "{md}");
    assert!(md.contains("shared attack surface, is measured in the Isolation section"), "{md}");
    let row = md.lines().find(|l| l.starts_with("| host kernel surface (system calls) |")).expect("a glance row");
    assert!(row.contains("0.88×") && row.contains("0.12×"), "{row}");
}

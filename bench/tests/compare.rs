//! `compare` on synthetic results: an injected 20% slowdown is a regression, two runs of the
//! same distribution (A/A) are not, and different virtualization kinds are never compared.
//! `spread` over several runs: the largest distance of a run's median from the middle one.

mod common;

use twinbox_bench::compare::{compare, relative_to, Verdict};
use twinbox_bench::host::VirtKind;
use twinbox_bench::spread::{render, spread};

#[test]
fn a_twenty_percent_slowdown_is_caught() {
    let base = common::results(1, 1.0);
    let new = common::results(2, 1.2);
    let c = compare(&base, &new, 0.10, 0.05).unwrap();
    assert!(c.regressed());
    let regressed: Vec<_> = c.changes.iter().filter(|x| x.verdict == Verdict::Regressed).collect();
    assert!(regressed.iter().all(|x| x.backend == "twinbox-container" && x.scenario == "start"), "{regressed:?}");
    assert_eq!(regressed.len(), 2, "time_to_workload and end_to_end: {regressed:?}");
    assert!(regressed.iter().all(|x| (x.change - 0.2).abs() < 0.05 && x.p.unwrap() < 0.001));
}

#[test]
fn an_a_a_comparison_is_quiet() {
    for seed in 2..12 {
        let c = compare(&common::results(1, 1.0), &common::results(seed, 1.0), 0.10, 0.05).unwrap();
        assert!(!c.regressed(), "seed {seed}: {}", c.render(0.1, 0.05));
    }
}

#[test]
fn a_slowdown_below_the_threshold_is_not_a_regression() {
    let c = compare(&common::results(1, 1.0), &common::results(2, 1.05), 0.10, 0.05).unwrap();
    assert!(!c.regressed(), "{}", c.render(0.1, 0.05));
}

#[test]
fn improvements_are_reported_as_such() {
    let c = compare(&common::results(1, 1.0), &common::results(2, 0.7), 0.10, 0.05).unwrap();
    assert!(!c.regressed());
    assert!(c.changes.iter().any(|x| x.verdict == Verdict::Improved));
}

#[test]
fn single_samples_are_not_judged() {
    let c = compare(&common::results(1, 1.0), &common::results(2, 1.0), 0.10, 0.05).unwrap();
    let rate = c.changes.iter().find(|x| x.metric == "launch_rate").unwrap();
    assert_eq!(rate.verdict, Verdict::Untested);
}

#[test]
fn different_virtualization_is_refused() {
    let base = common::results(1, 1.0);
    let mut new = common::results(2, 1.0);
    new.context.virtualization.kind = VirtKind::HardwareKvm;
    let e = compare(&base, &new, 0.10, 0.05).unwrap_err();
    assert!(e.to_string().contains("PVM") && e.to_string().contains("hardware KVM"), "{e}");
}

#[test]
fn spread_is_the_largest_distance_of_a_median_from_the_middle_one() {
    // twinbox-container's start figures at 1.0, 1.1 and 0.95 of the base: the middle run is
    // the first, the farthest is 10 % above it.
    let runs = [common::results(1, 1.0), common::results(1, 1.1), common::results(1, 0.95)];
    let rows = spread(&runs, None).unwrap();
    let row = |b: &str, m: &str| rows.iter().find(|r| r.backend == b && r.metric == m).unwrap();
    let e2e = row("twinbox-container", "end_to_end");
    assert_eq!(e2e.medians.len(), 3);
    assert_eq!(e2e.middle, e2e.medians[0]);
    assert!((e2e.spread - 0.10).abs() < 1e-9, "{e2e:?}");
    // The same samples in every run: no spread.
    assert_eq!(row("runc", "end_to_end").spread, 0.0);
    let table = render(&rows, Some(0.05));
    let over: Vec<&str> = table.lines().filter(|l| l.ends_with("OVER")).collect();
    assert_eq!(over.len(), 2, "time_to_workload and end_to_end of twinbox-container:\n{table}");
    assert!(over.iter().all(|l| l.starts_with("twinbox-container") && l.contains("10.0%")), "{table}");
}

#[test]
fn spread_skips_metrics_a_run_lacks_and_never_mixes_virtualization_kinds() {
    let full = common::results(1, 1.0);
    let mut partial = common::results(2, 1.0);
    partial.records.retain(|r| r.scenario != "cpu");
    let rows = spread(&[full.clone(), partial], None).unwrap();
    assert!(!rows.is_empty() && rows.iter().all(|r| r.scenario != "cpu"));
    let mut nested = common::results(3, 1.0);
    nested.context.virtualization.kind = VirtKind::NestedTcg;
    assert!(spread(&[full, nested], None).is_err());
    assert!(spread(&[], None).unwrap().is_empty());
}

#[test]
fn relative_spread_divides_times_by_the_reference_of_the_same_run() {
    let runs = [common::results(1, 1.0), common::results(1, 1.1)];
    let rows = spread(&runs, Some("runc")).unwrap();
    let times: Vec<_> = rows.iter().filter(|r| r.scenario == "start").collect();
    assert!(!times.is_empty() && times.iter().all(|r| r.backend != "runc" && r.unit == "x runc"), "{times:?}");
    let e2e = rows.iter().find(|r| r.backend == "twinbox-container" && r.metric == "end_to_end").unwrap();
    // twinbox-container's end_to_end is 24 ms against runc's 40 in the synthetic results.
    assert!((e2e.medians[0] - 0.6).abs() < 0.05 && (e2e.medians[1] / e2e.medians[0] - 1.1).abs() < 1e-9, "{e2e:?}");
    // Memory does not scale with the host's speed: it stays absolute, the reference's too.
    let mem = rows.iter().find(|r| r.backend == "runc" && r.metric == "total_per_instance").unwrap();
    assert_eq!(mem.unit, "KiB");
}

/// Every time figure of every backend, the bare process included, scaled by `k`: the whole
/// host got slower.
fn slower_host(mut r: twinbox_bench::results::Results, k: f64) -> twinbox_bench::results::Results {
    for rec in r.records.iter_mut().filter(|x| x.unit == "ms") {
        rec.samples.iter_mut().for_each(|v| *v *= k);
        rec.summary = twinbox_bench::stats::Summary::of(&rec.samples);
    }
    r
}

#[test]
fn a_host_that_got_slower_is_no_change_relative_to_the_process_but_a_real_slowdown_is() {
    let base = common::results(1, 1.0);
    let host_slower = slower_host(common::results(2, 1.0), 1.3);
    assert!(compare(&base, &host_slower, 0.10, 0.05).unwrap().regressed(), "absolute: everything 30% slower");
    let rel = |r: &twinbox_bench::results::Results| relative_to(r, "process").unwrap().0;
    let c = compare(&rel(&base), &rel(&host_slower), 0.10, 0.05).unwrap();
    assert!(!c.regressed(), "{}", c.render(0.1, 0.05));

    // twinbox-container 20% slower on top of the slower host: still caught, and only it.
    let both = slower_host(common::results(2, 1.2), 1.3);
    let c = compare(&rel(&base), &rel(&both), 0.10, 0.05).unwrap();
    let regressed: Vec<_> = c.changes.iter().filter(|x| x.verdict == Verdict::Regressed).collect();
    assert_eq!(regressed.len(), 2, "{}", c.render(0.1, 0.05));
    assert!(regressed
        .iter()
        .all(|x| x.backend == "twinbox-container" && x.scenario == "start" && x.unit == "x process"));
}

#[test]
fn relative_to_names_what_it_cannot_divide_and_refuses_an_unknown_reference() {
    let mut r = common::results(1, 1.0);
    r.records.push(common::record(
        "runc",
        "density",
        "launch_cpu",
        "ms",
        twinbox_bench::results::Better::Lower,
        vec![5.0; 6],
    ));
    let (out, left_out) = relative_to(&r, "process").unwrap();
    assert_eq!(left_out, ["runc/density/launch_cpu"]);
    assert!(out.record("runc", "density", "launch_cpu").is_none());
    assert!(out.record("process", "start", "end_to_end").is_none(), "the reference's own times go");
    assert!(out.record("process", "memory", "total_per_instance").is_some(), "its memory stays");
    let e = relative_to(&r, "procss").unwrap_err().to_string();
    assert!(e.contains("procss") && e.contains("process, runc, twinbox-container"), "{e}");
}

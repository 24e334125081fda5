//! `compare` on synthetic results: an injected 20% slowdown is a regression, two runs of the
//! same distribution (A/A) are not, and different virtualization kinds are never compared.

mod common;

use twinbox_bench::compare::{compare, Verdict};
use twinbox_bench::host::VirtKind;

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

//! `twinbox bench compare BASE NEW`: per metric, the change of the median and a two-sided
//! Mann-Whitney U test on the raw samples. A metric regressed when it moved the wrong way by
//! more than the threshold *and* the test says the samples differ (p < alpha). Metrics with
//! fewer than [`MIN_SAMPLES`] samples on either side are shown but not judged.

use serde::Serialize;
use twinbox_exit::ExitCode;

use crate::results::{Better, Results};
use crate::stats::{mann_whitney, median};

/// Below this many samples per side the test cannot reach significance; not judged.
pub const MIN_SAMPLES: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Worse by more than the threshold, and significant.
    Regressed,
    /// Better by more than the threshold, and significant.
    Improved,
    /// Within the threshold, or not significant.
    Same,
    /// Too few samples to test.
    Untested,
}

#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub backend: String,
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub base_median: f64,
    pub new_median: f64,
    /// (new − base) / base, as a fraction.
    pub change: f64,
    pub p: Option<f64>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub changes: Vec<Change>,
    /// Metrics only one side has.
    pub unmatched: Vec<String>,
    /// Metrics the base measured that the new run did not (or measured nothing for): a gate
    /// fails on them, as it does when nothing at all was compared.
    pub missing: Vec<String>,
}

impl Comparison {
    pub fn regressed(&self) -> bool {
        self.changes.iter().any(|c| c.verdict == Verdict::Regressed)
    }

    /// Whether a regression gate passes: something was compared, nothing the base measured is
    /// missing, and nothing regressed.
    pub fn passes(&self) -> bool {
        !self.changes.is_empty() && self.missing.is_empty() && !self.regressed()
    }

    /// A table for a terminal.
    pub fn render(&self, threshold: f64, alpha: f64) -> String {
        let mut s = format!(
            "{:<18} {:<8} {:<24} {:>12} {:>12} {:>8} {:>8}  verdict (threshold {:.0}%, alpha {alpha})\n",
            "backend",
            "scenario",
            "metric",
            "base p50",
            "new p50",
            "change",
            "p",
            threshold * 100.0
        );
        for c in &self.changes {
            s.push_str(&format!(
                "{:<18} {:<8} {:<24} {:>12} {:>12} {:>+7.1}% {:>8}  {}\n",
                c.backend,
                c.scenario,
                c.metric,
                format!("{:.3} {}", c.base_median, c.unit),
                format!("{:.3} {}", c.new_median, c.unit),
                c.change * 100.0,
                c.p.map(|p| format!("{p:.4}")).unwrap_or_else(|| "-".into()),
                match c.verdict {
                    Verdict::Regressed => "REGRESSED",
                    Verdict::Improved => "improved",
                    Verdict::Same => "same",
                    Verdict::Untested => "untested (too few samples)",
                }
            ));
        }
        for u in &self.unmatched {
            s.push_str(&format!("only in one file: {u}\n"));
        }
        for m in &self.missing {
            s.push_str(&format!("MISSING from the new results: {m}\n"));
        }
        if self.changes.is_empty() {
            s.push_str("NOTHING was compared: the two results have no metric in common\n");
        }
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error(
        "the two runs were taken under different virtualization ({base} vs {new}); such figures are never compared"
    )]
    Virtualization { base: String, new: String },
    #[error("no {what} {name:?} in these results; they have: {known}")]
    NotInResults { what: &'static str, name: String, known: String },
}

impl ExitCode for CompareError {
    fn exit_code(&self) -> i32 {
        match self {
            CompareError::Virtualization { .. } | CompareError::NotInResults { .. } => twinbox_exit::USER_ERROR,
        }
    }
}

/// A run's times as multiples of a reference backend's (the bare `process`) in the same run:
/// each sample of a metric in ms divided by the reference's median for the same scenario and
/// metric. What is left when the whole host got faster or slower between two runs, as this
/// host does for minutes at a time. Only times are divided: memory and the in-run CPU ratios do
/// not scale with the host's speed and stay as they are. Returns the converted run and the
/// `backend/scenario/metric` of the times left out because the reference has no such figure
/// (or a zero one); the reference's own times go.
pub fn relative_to(run: &Results, reference: &str) -> Result<(Results, Vec<String>), CompareError> {
    if !run.records.iter().any(|r| r.backend == reference) {
        let mut known: Vec<String> = run.records.iter().map(|r| r.backend.clone()).collect();
        known.sort();
        known.dedup();
        return Err(CompareError::NotInResults {
            what: "reference backend",
            name: reference.into(),
            known: known.join(", "),
        });
    }
    let mut out = run.clone();
    let mut left_out = Vec::new();
    out.records = Vec::new();
    for rec in &run.records {
        if rec.unit != TIME_UNIT {
            out.records.push(rec.clone());
            continue;
        }
        if rec.backend == reference {
            continue;
        }
        let by = run
            .record(reference, &rec.scenario, &rec.metric)
            .filter(|x| !x.samples.is_empty())
            .map(|x| median(&x.samples))
            .filter(|m| *m > 0.0 && m.is_finite());
        let Some(by) = by else {
            if !rec.samples.is_empty() {
                left_out.push(format!("{}/{}/{}", rec.backend, rec.scenario, rec.metric));
            }
            continue;
        };
        let mut r = rec.clone();
        r.samples = rec.samples.iter().map(|v| v / by).collect();
        r.summary = crate::stats::Summary::of(&r.samples);
        r.unit = format!("x {reference}");
        out.records.push(r);
    }
    Ok((out, left_out))
}

/// The unit of the metrics [`relative_to`] divides.
const TIME_UNIT: &str = "ms";

/// Which records `compare` and `spread` look at: only these backends, and only these metrics,
/// each named alone (`launch_cpu`) or with its scenario (`density/launch_cpu`). An empty list
/// keeps everything. A CI job on a noisy host can gate on the figures that repeat there (CPU
/// time, memory, in-run ratios) and leave the wall-clock ones to the report.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub backends: Vec<String>,
    pub metrics: Vec<String>,
}

impl Selection {
    fn metric_matches(wanted: &str, scenario: &str, metric: &str) -> bool {
        wanted == metric || wanted.split_once('/').is_some_and(|(s, m)| s == scenario && m == metric)
    }

    pub fn keeps(&self, backend: &str, scenario: &str, metric: &str) -> bool {
        (self.backends.is_empty() || self.backends.iter().any(|b| b == backend))
            && (self.metrics.is_empty() || self.metrics.iter().any(|m| Self::metric_matches(m, scenario, metric)))
    }

    /// Keeps the selected records of each run, after checking that every backend and metric
    /// asked for is in at least one of them (a misspelt name would otherwise select nothing
    /// and pass).
    pub fn apply(&self, runs: &mut [Results]) -> Result<(), CompareError> {
        let all = || runs.iter().flat_map(|r| r.records.iter());
        let list = |mut names: Vec<String>| {
            names.sort();
            names.dedup();
            names.join(", ")
        };
        if let Some(b) = self.backends.iter().find(|b| !all().any(|r| &r.backend == *b)) {
            let known = list(all().map(|r| r.backend.clone()).collect());
            return Err(CompareError::NotInResults { what: "backend", name: b.clone(), known });
        }
        if let Some(m) = self.metrics.iter().find(|m| !all().any(|r| Self::metric_matches(m, &r.scenario, &r.metric))) {
            let known = list(all().map(|r| format!("{}/{}", r.scenario, r.metric)).collect());
            return Err(CompareError::NotInResults { what: "metric", name: m.clone(), known });
        }
        for r in runs.iter_mut() {
            r.records.retain(|x| self.keeps(&x.backend, &x.scenario, &x.metric));
        }
        Ok(())
    }
}

/// Compare every metric both runs have. `threshold`: the fraction (0.10 for 10%) a median may
/// worsen before it counts; `alpha`: the significance level.
pub fn compare(base: &Results, new: &Results, threshold: f64, alpha: f64) -> Result<Comparison, CompareError> {
    let (bk, nk) = (base.context.virtualization.kind, new.context.virtualization.kind);
    if bk != nk {
        return Err(CompareError::Virtualization { base: bk.to_string(), new: nk.to_string() });
    }
    let mut changes = Vec::new();
    let mut unmatched = Vec::new();
    let mut missing = Vec::new();
    for b in &base.records {
        let name = format!("{}/{}/{}", b.backend, b.scenario, b.metric);
        let Some(n) = new.record(&b.backend, &b.scenario, &b.metric) else {
            if !b.samples.is_empty() {
                unmatched.push(format!("{name} (base)"));
                missing.push(name);
            }
            continue;
        };
        if b.samples.is_empty() {
            continue;
        }
        if n.samples.is_empty() {
            missing.push(name);
            continue;
        }
        let (mb, mn) = (median(&b.samples), median(&n.samples));
        let change = if mb != 0.0 { (mn - mb) / mb.abs() } else { 0.0 };
        let worse = match b.better {
            Better::Lower => change,
            Better::Higher => -change,
        };
        let (p, verdict) = if b.samples.len() < MIN_SAMPLES || n.samples.len() < MIN_SAMPLES {
            (None, Verdict::Untested)
        } else {
            let p = mann_whitney(&b.samples, &n.samples).p;
            let v = if p >= alpha || worse.abs() <= threshold {
                Verdict::Same
            } else if worse > 0.0 {
                Verdict::Regressed
            } else {
                Verdict::Improved
            };
            (Some(p), v)
        };
        changes.push(Change {
            backend: b.backend.clone(),
            scenario: b.scenario.clone(),
            metric: b.metric.clone(),
            unit: b.unit.clone(),
            base_median: mb,
            new_median: mn,
            change,
            p,
            verdict,
        });
    }
    for n in &new.records {
        if base.record(&n.backend, &n.scenario, &n.metric).is_none() && !n.samples.is_empty() {
            unmatched.push(format!("{}/{}/{} (new)", n.backend, n.scenario, n.metric));
        }
    }
    Ok(Comparison { changes, unmatched, missing })
}

/// `10%`, `10` or `0.1` → 0.1.
pub fn parse_threshold(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (num, pct) = match t.strip_suffix('%') {
        Some(n) => (n, true),
        None => (t, false),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("invalid threshold {s:?}: use e.g. 10%"))?;
    let v = if pct || v > 1.0 { v / 100.0 } else { v };
    if !(0.0..10.0).contains(&v) {
        return Err(format!("threshold {s:?} out of range"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        assert_eq!(parse_threshold("10%").unwrap(), 0.1);
        assert_eq!(parse_threshold("10").unwrap(), 0.1);
        assert_eq!(parse_threshold("0.25").unwrap(), 0.25);
        assert!(parse_threshold("x").is_err());
    }
}

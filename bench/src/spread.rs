//! `twinbox bench spread A.json B.json C.json ...`: how far apart several runs of the same
//! build put each metric's median. For every metric all runs have, the spread is the largest
//! distance of a run's median from the middle one (the median of the medians), as a fraction of
//! the middle: "within ±10 %" means every run's median is within 10 % of the middle run's.

use serde::Serialize;

use crate::compare::{relative_to, CompareError};
use crate::results::Results;
use crate::stats::median;

/// One metric across the runs.
#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    pub backend: String,
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    /// Each run's median, in the order the runs were given.
    pub medians: Vec<f64>,
    /// The median of `medians`.
    pub middle: f64,
    /// max |median − middle| / middle, as a fraction.
    pub spread: f64,
}

/// The spreads of every metric that has samples in all runs; runs taken under different
/// virtualization kinds are refused, as in `compare`. With a `reference` backend (e.g. the bare
/// `process`), each run's times are first divided by the reference's in the same run
/// ([`relative_to`]): what is left when the whole host got faster or slower between runs.
pub fn spread(runs: &[Results], reference: Option<&str>) -> Result<Vec<Spread>, CompareError> {
    let Some(first) = runs.first() else { return Ok(Vec::new()) };
    let kind = first.context.virtualization.kind;
    if let Some(other) = runs.iter().find(|r| r.context.virtualization.kind != kind) {
        return Err(CompareError::Virtualization {
            base: kind.to_string(),
            new: other.context.virtualization.kind.to_string(),
        });
    }
    let converted: Vec<Results>;
    let runs = match reference {
        None => runs,
        Some(b) => {
            converted = runs.iter().map(|r| relative_to(r, b).map(|(r, _)| r)).collect::<Result<_, _>>()?;
            &converted[..]
        }
    };
    let mut out = Vec::new();
    for rec in &runs[0].records {
        let medians: Option<Vec<f64>> = runs
            .iter()
            .map(|r| {
                r.record(&rec.backend, &rec.scenario, &rec.metric)
                    .filter(|x| !x.samples.is_empty())
                    .map(|x| median(&x.samples))
            })
            .collect();
        let Some(medians) = medians else { continue };
        let middle = median(&medians);
        let spread = if middle != 0.0 {
            medians.iter().map(|m| (m - middle).abs() / middle.abs()).fold(0.0, f64::max)
        } else {
            0.0
        };
        out.push(Spread {
            backend: rec.backend.clone(),
            scenario: rec.scenario.clone(),
            metric: rec.metric.clone(),
            unit: rec.unit.clone(),
            medians,
            middle,
            spread,
        });
    }
    Ok(out)
}

/// A table for a terminal; rows beyond `limit` are marked.
pub fn render(rows: &[Spread], limit: Option<f64>) -> String {
    let mut s =
        format!("{:<18} {:<8} {:<24} {:>12}  {:>8}  medians\n", "backend", "scenario", "metric", "middle", "spread");
    for r in rows {
        let over = limit.is_some_and(|l| r.spread > l);
        let medians: Vec<String> = r.medians.iter().map(|m| format!("{m:.3}")).collect();
        s.push_str(&format!(
            "{:<18} {:<8} {:<24} {:>12}  {:>7.1}%  {}{}\n",
            r.backend,
            r.scenario,
            r.metric,
            format!("{:.3} {}", r.middle, r.unit),
            r.spread * 100.0,
            medians.join(" "),
            if over { "  OVER" } else { "" }
        ));
    }
    s
}

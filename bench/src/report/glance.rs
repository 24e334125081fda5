//! The trade-off at a glance: every headline metric of every backend as a cost relative to the
//! bare process of the same run (1 = what the process pays, 2 = twice that), containers and
//! microVMs side by side. A metric where more is better (throughput, IOPS, launch rate) is
//! turned round (process ÷ backend), so that in every row more is worse. MicroVMs measured in a
//! nested L1 (`--nested`) are divided by that run's own bare process (the same reference as
//! this run's, or they are left out) and marked as emulated.
//! The user's own image has no bare process (only hello's static binary runs outside a root
//! filesystem): there the twinbox container (else the first container measured) is the 1×.

use crate::results::Results;
use crate::stats::median;

/// (label, scenario, metric, the metric is already a ratio to the process, more is better).
pub const METRICS: [(&str, &str, &str, bool, bool); 13] = [
    ("start (time to workload)", "start", "time_to_workload", false, false),
    ("start (end to end)", "start", "end_to_end", false, false),
    ("time to ready", "start", "time_to_ready", false, false),
    ("memory per idle instance", "memory", "total_per_instance", false, false),
    ("launch rate (density)", "density", "launch_rate", false, true),
    ("compute loop", "cpu", "compute_ratio", true, false),
    ("syscall loop", "cpu", "syscalls_ratio", true, false),
    ("request latency (kept-alive)", "net", "latency_keepalive", false, false),
    ("request latency (new connection)", "net", "latency_new_connection", false, false),
    ("network throughput", "net", "throughput", false, true),
    ("durable 4 KiB writes (volume)", "disk", "volume_rand_write_iops", false, true),
    ("sequential writes (volume)", "disk", "volume_seq_write", false, true),
    // What reaches the host kernel: the system calls that run for the workload (a VM: its
    // VMM's vCPU thread), against the bare process's.
    ("host kernel surface (system calls)", "isolation", "syscalls", false, false),
];

/// One column: a backend of this run, or a microVM of the nested run.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub backend: String,
    /// "process", "container" or "microvm".
    pub isolation: String,
    /// Measured in the nested L1 (emulated).
    pub nested: bool,
}

impl Column {
    /// The column's heading.
    pub fn label(&self) -> String {
        if self.nested {
            format!("{} (nested, emulated)", self.backend)
        } else {
            self.backend.clone()
        }
    }
}

/// The table: columns (the reference, 1×, first), and per metric (in [`METRICS`] order) a cost
/// per column.
#[derive(Debug, Clone)]
pub struct Glance {
    /// The backend every cost is divided by (in each run, that run's own): `process`, or for
    /// an image without one a container.
    pub reference: String,
    pub columns: Vec<Column>,
    pub rows: Vec<(&'static str, Vec<Option<f64>>)>,
}

impl Glance {
    /// What the costs are divided by, in words: "the bare process" or the backend's name.
    pub fn reference_label(&self) -> String {
        if self.reference == "process" {
            "the bare process".into()
        } else {
            self.reference.clone()
        }
    }
}

fn med(r: &Results, backend: &str, scenario: &str, metric: &str) -> Option<f64> {
    r.record(backend, scenario, metric).filter(|x| !x.samples.is_empty()).map(|x| median(&x.samples))
}

fn measured(r: &Results, name: &str) -> bool {
    r.records.iter().any(|x| x.backend == name && !x.samples.is_empty())
}

/// The 1× of run `r`: its bare process, else its twinbox container, else its first container.
fn reference_of(r: &Results) -> Option<String> {
    ["process", "twinbox-container"].into_iter().map(String::from).find(|b| measured(r, b)).or_else(|| {
        r.backends.iter().find(|b| b.isolation == "container" && measured(r, &b.name)).map(|b| b.name.clone())
    })
}

/// `backend`'s cost in `r` relative to `r`'s `reference` for metric `m` of [`METRICS`].
fn cost(r: &Results, reference: &str, backend: &str, m: &(&str, &str, &str, bool, bool)) -> Option<f64> {
    let &(_, scenario, metric, is_ratio, higher_better) = m;
    if backend == reference {
        let ratio_to_itself = is_ratio && reference == "process";
        return (ratio_to_itself || med(r, backend, scenario, metric).is_some()).then_some(1.0);
    }
    let v = med(r, backend, scenario, metric)?;
    if is_ratio {
        // A ratio to the process: meaningful only where the process is the reference.
        return (v > 0.0 && reference == "process").then_some(v);
    }
    let base = med(r, reference, scenario, metric)?;
    let c = if higher_better { base / v } else { v / base };
    (c.is_finite() && c > 0.0).then_some(c)
}

/// The reference of `r` first, its other measured backends (in its order), then the microVMs
/// of its nested run, each divided by that run's own reference.
pub fn glance(r: &Results) -> Glance {
    let Some(reference) = reference_of(r) else {
        return Glance { reference: "process".into(), columns: Vec::new(), rows: Vec::new() };
    };
    let column = |b: &crate::results::BackendStatus, nested| Column {
        backend: b.name.clone(),
        isolation: b.isolation.clone(),
        nested,
    };
    let mut columns: Vec<Column> =
        r.backends.iter().filter(|b| b.name == reference).map(|b| column(b, false)).collect();
    columns.extend(r.backends.iter().filter(|b| b.name != reference && measured(r, &b.name)).map(|b| column(b, false)));
    // The nested run's microVMs are divided by its own run's reference: the same backend as
    // here, or the header would name the wrong one.
    let nested_reference = r.nested.as_deref().and_then(reference_of).filter(|n| *n == reference);
    if let Some(n) = r.nested.as_deref().filter(|_| nested_reference.is_some()) {
        columns.extend(
            n.backends.iter().filter(|b| b.isolation == "microvm" && measured(n, &b.name)).map(|b| column(b, true)),
        );
    }
    let rows = METRICS
        .iter()
        .map(|m| {
            let costs = columns
                .iter()
                .map(|c| match (c.nested, r.nested.as_deref(), nested_reference.as_deref()) {
                    (false, _, _) => cost(r, &reference, &c.backend, m),
                    (true, Some(n), Some(nref)) => cost(n, nref, &c.backend, m),
                    (true, _, _) => None,
                })
                .collect();
            (m.0, costs)
        })
        .filter(|(_, costs): &(_, Vec<Option<f64>>)| costs.iter().skip(1).any(Option::is_some))
        .collect();
    Glance { reference, columns, rows }
}

/// "1.25×", "–" when not measured.
pub fn cell(c: Option<f64>) -> String {
    match c {
        Some(v) if v >= 100.0 => format!("{v:.0}×"),
        Some(v) if v >= 10.0 => format!("{v:.1}×"),
        Some(v) => format!("{v:.2}×"),
        None => "–".into(),
    }
}

/// Two or three sentences that say the table's ratios in words: the twinbox container and
/// the twinbox microVM (or the first of each kind measured) against the process, and the VM
/// against the container.
pub fn in_words(g: &Glance) -> Vec<String> {
    let pick = |iso: &str| {
        let twin = format!("twinbox-{iso}");
        g.columns.iter().position(|c| c.backend == twin).or_else(|| g.columns.iter().position(|c| c.isolation == iso))
    };
    let (ct, vm) = (pick("container"), pick("microvm"));
    let get = |row: &str, col: usize| g.rows.iter().find(|(l, _)| *l == row).and_then(|(_, v)| v[col]);
    let describe = |col: usize| -> String {
        let mut parts = Vec::new();
        for (label, _) in &g.rows {
            if let Some(v) = get(label, col) {
                parts.push(format!("{} {}", cell(Some(v)), label));
            }
        }
        parts.join(", ")
    };
    let mut out = Vec::new();
    if g.reference != "process" {
        // The container is the 1×: the VM's costs against it say it all.
        if let Some(v) = vm {
            out.push(format!(
                "A microVM ({}) costs, against a container ({}{}): {}.",
                g.columns[v].label(),
                g.reference,
                if g.columns[v].nested { ", each divided by its own run's" } else { "" },
                describe(v)
            ));
        } else {
            out.push("No microVM was measured in this run (see the notes), so the table has containers only.".into());
        }
        return out;
    }
    if let Some(c) = ct {
        out.push(format!("A container ({}) costs, against the bare process: {}.", g.columns[c].label(), describe(c)));
    }
    if let Some(v) = vm {
        out.push(format!("A microVM ({}) costs: {}.", g.columns[v].label(), describe(v)));
    }
    if let (Some(c), Some(v)) = (ct, vm) {
        let mut versus = Vec::new();
        for row in ["start (time to workload)", "memory per idle instance", "request latency (kept-alive)"] {
            if let (Some(a), Some(b)) = (get(row, c), get(row, v)) {
                versus.push(format!("{} its {row}", cell(Some(b / a))));
            }
        }
        if !versus.is_empty() {
            out.push(format!(
                "So the VM's own kernel costs, against the container: {}{}.",
                versus.join(", "),
                if g.columns[v].nested {
                    " (the VM measured under emulation in a nested L1, each side divided by its own run's process)"
                } else {
                    ""
                }
            ));
        }
    } else if vm.is_none() {
        out.push("No microVM was measured in this run (see the notes), so the table has containers only.".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::cell;

    #[test]
    fn cells_have_the_digits_they_deserve() {
        assert_eq!(cell(Some(1.234)), "1.23×");
        assert_eq!(cell(Some(12.34)), "12.3×");
        assert_eq!(cell(Some(123.4)), "123×");
        assert_eq!(cell(None), "–");
    }
}

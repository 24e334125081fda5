//! Density: start instances of `hello sleep` one after another up to N (or until they hold the
//! memory budget, when one is given), recording after each:
//! - the launch latency (launch → the launcher returns with the instance started; for the bare
//!   process, the exec done);
//! - the CPU time that launch cost (what the launcher and the processes it waited for used, for
//!   backends whose launcher exits: unlike the latency, it does not move with how fast this host
//!   wakes an idle CPU);
//! - the host memory the instances hold: PSS of every process they left running plus the
//!   kernel's Slab + PageTables + KernelStack + Percpu growth since before the first
//!   (MemAvailable moves with everything else on a shared machine; this does not; the first
//!   reading waits for the kernel to finish freeing earlier instances, later ones do not wait,
//!   so that nothing but the launches sits between launches);
//!
//! then the launch rate (instances / sum of launch latencies) and the teardown time per
//! instance. Each backend starts from nothing running.
//!
//! The user's own image (`--ready SPEC`): each instance runs the image's own entrypoint and cmd
//! and is waited for until ready before the next is launched; its launch latency runs to then
//! (launch → ready), and its processes are found through the backend's id of it.

use std::time::{Duration, Instant};

use super::{children_cpu, launch_ready, leftovers, marker_base, ms, Fleet, Run, Scenario};
use crate::backend::{Instance, Workload};
use crate::host::{instance_processes, instance_trees, kernel_kib, pss_kib, scan, settled_kernel_kib};
use crate::results::Better;

/// One backend's pass: launch up to `max` instances, then tear them all down.
struct Pass {
    latency: Vec<f64>,
    /// CPU time of each launch (the launcher and what it waited for), ms; empty for backends
    /// whose instance is this process's own child (the bare process, the VMMs): their launch
    /// cost is only reaped when the instance ends.
    cpu: Vec<f64>,
    memory: Vec<f64>,
    teardown: Vec<f64>,
}

pub fn run(r: &mut Run<'_>) {
    let max = r.settings.max.max(1);
    let nb = r.backends.len();
    let passes = r.settings.density_passes.max(1);
    let bar = r.progress((max * nb * passes) as u64, "density");
    let mut results: Vec<Vec<Pass>> = (0..nb).map(|_| Vec::new()).collect();
    // Every backend once per pass, the order reversed on odd passes: a backend's curve is the
    // median over passes taken at different moments, so a slow minute of a shared host weighs
    // on every backend alike instead of on whichever ran then.
    'passes: for pass in 0..passes {
        for j in 0..nb {
            if crate::signal::interrupted() {
                break 'passes;
            }
            let k = if pass % 2 == 0 { j } else { nb - 1 - j };
            let p = one_pass(r, k, max, &bar);
            results[k].push(p);
        }
    }
    bar.finish_and_clear();
    for (k, passes) in results.into_iter().enumerate() {
        if passes.is_empty() {
            continue;
        }
        let name = r.backends[k].name();
        let latency = median_by_index(passes.iter().map(|p| &p.latency));
        let cpu = median_by_index(passes.iter().map(|p| &p.cpu));
        let memory = median_by_index(passes.iter().map(|p| &p.memory));
        let times: Vec<f64> = passes.iter().flat_map(|p| p.teardown.iter().copied()).collect();
        let count = latency.len();
        let total_s: f64 = latency.iter().sum::<f64>() / 1000.0;
        let rate = if total_s > 0.0 { vec![count as f64 / total_s] } else { Vec::new() };
        let until = match &r.image.foreign {
            Some(f) => format!("until it is ready ({})", f.ready),
            None => "until the launcher returns".to_owned(),
        };
        r.record(
            name,
            Scenario::Density,
            "launch_latency",
            "ms",
            Better::Lower,
            &format!("launch of instance i (sample i−1) with i−1 already running: {until}; the median over the passes"),
            latency,
            0,
            0,
        );
        if !cpu.is_empty() {
            r.record(
                name,
                Scenario::Density,
                "launch_cpu",
                "ms",
                Better::Lower,
                "user + system CPU time of launch i (sample i−1): the launcher and the processes it waited for, not the instance left running; the median over the passes",
                cpu,
                0,
                0,
            );
        }
        r.record(
            name,
            Scenario::Density,
            "host_memory",
            "MiB",
            Better::Lower,
            "after launching instance i (sample i−1): PSS of all instances' processes + kernel Slab/PageTables/KernelStack/Percpu growth; the median over the passes",
            memory,
            0,
            0,
        );
        r.record(
            name,
            Scenario::Density,
            "launch_rate",
            "instances/s",
            Better::Higher,
            &format!("{count} instances / the sum of their (median) launch latencies"),
            rate,
            0,
            0,
        );
        r.record(
            name,
            Scenario::Density,
            "teardown",
            "ms",
            Better::Lower,
            "stopping and removing one running instance",
            times,
            0,
            0,
        );
    }
}

/// The median, index by index, over series cut to the shortest one (a pass that stopped
/// early): one pass slowed by the rest of the host does not move the curve (with two passes,
/// this is their mean).
fn median_by_index<'a>(series: impl Iterator<Item = &'a Vec<f64>>) -> Vec<f64> {
    let series: Vec<&Vec<f64>> = series.collect();
    let n = series.iter().map(|s| s.len()).min().unwrap_or(0);
    (0..n).map(|i| crate::stats::median(&series.iter().map(|s| s[i]).collect::<Vec<f64>>())).collect()
}

fn one_pass(r: &mut Run<'_>, k: usize, max: usize, bar: &indicatif::ProgressBar) -> Pass {
    let b = r.backends[k].as_ref();
    let name = b.name();
    bar.set_message(name);
    let base = marker_base();
    let foreign = r.image.foreign.as_ref().map(|f| f.ready.clone());
    let markers: Vec<String> =
        if foreign.is_some() { Vec::new() } else { (0..max as u64).map(|i| (base + i).to_string()).collect() };
    let mut roots: Vec<Vec<u32>> = Vec::new();
    let mut fleet = Fleet::new(b);
    let k0 = settled_kernel_kib(Duration::from_secs(5)) as f64;
    let mut latency = Vec::new();
    let mut cpu = Vec::new();
    let mut memory = Vec::new();
    let mut failure = None;
    for i in 0..max {
        if crate::signal::interrupted() {
            break;
        }
        let cpu0 = children_cpu();
        let t = Instant::now();
        let id = format!("{}-d{name}-{base}-{i}", r.tag);
        let launched: Result<(Instance, Duration), String> = match &foreign {
            Some(spec) => launch_ready(b, spec, &id).map(|ready| (ready.instance, ready.took)),
            None => b
                .launch(&Workload::Sleep(base + i as u64), &id)
                .map(|inst| (inst, t.elapsed()))
                .map_err(|e| super::error_chain(&e)),
        };
        match launched {
            Ok((inst, took)) => {
                latency.push(ms(took));
                if inst.child.is_none() {
                    cpu.push(ms(children_cpu().saturating_sub(cpu0)));
                }
                if foreign.is_some() {
                    roots.push(b.instance_pids(&inst));
                }
                fleet.instances.push(inst);
                let procs = scan();
                let found = if foreign.is_some() {
                    instance_trees(&procs, &roots)
                } else {
                    instance_processes(&procs, &markers[..=i])
                };
                let pss: f64 = found.into_iter().filter_map(|(_, pid, share)| Some(pss_kib(pid)? as f64 * share)).sum();
                let held = (pss + kernel_kib() as f64 - k0) / 1024.0;
                memory.push(held);
                if let Some(budget) = r.settings.memory_budget_mib.filter(|&b| held >= b as f64) {
                    r.note(format!(
                        "density: {name}: stopped at {} instances, holding {held:.1} MiB of the {budget} MiB budget",
                        i + 1
                    ));
                    bar.inc((max - i) as u64);
                    break;
                }
            }
            Err(e) => {
                failure = Some(format!("density: {name}: launch {} failed: {e}", i + 1));
                break;
            }
        }
        bar.inc(1);
    }
    let (times, errors) = fleet.teardown();
    drop(fleet);
    if let Some(f) = failure {
        r.note(f);
    }
    for e in errors {
        r.note(format!("density: teardown: {e}"));
    }
    std::thread::sleep(Duration::from_millis(200));
    let left = leftovers(&markers) + roots.iter().flatten().filter(|&&p| crate::host::running(p)).count();
    if left > 0 {
        r.note(format!("density: {name}: {left} processes still running after teardown"));
    }
    Pass { latency, cpu, memory, teardown: times.iter().map(|d| ms(*d)).collect() }
}

#[cfg(test)]
mod tests {
    use super::median_by_index;

    #[test]
    fn one_slow_pass_does_not_move_the_curve() {
        let a = vec![1.0, 2.0, 3.0];
        let slow = vec![10.0, 20.0, 30.0];
        let b = vec![1.2, 2.2];
        // Three passes: the slow one is outvoted; the curve is cut to the shortest pass.
        assert_eq!(median_by_index([&a, &slow, &b].into_iter()), vec![1.2, 2.2]);
        // Two passes: their mean.
        assert_eq!(median_by_index([&a, &b].into_iter()), vec![1.1, 2.1]);
        assert!(median_by_index(std::iter::empty()).is_empty());
    }
}

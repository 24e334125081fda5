//! Memory per idle instance: N instances of `hello sleep M` (M unique per instance, so each
//! instance's processes are found by their arguments), then
//!
//! - PSS of every process the backend leaves running for an instance (the workload, and for
//!   `twinbox run -d` its share of the store's monitor, found as the workloads' parent: see
//!   [`instance_processes`]), from /proc/PID/smaps_rollup;
//! - the growth of the kernel's Slab + PageTables + KernelStack + Percpu from before the first launch
//!   to after the last, divided by N (namespaces, mounts, cgroups, page tables, task structs);
//!   both readings wait for the kernel's memory to stop moving (deferred frees of earlier
//!   instances and launchers).
//!
//! One backend after the other, in rounds (the order reversed on odd ones); each starts from
//! nothing running and must leave nothing behind.
//!
//! The user's own image (`--ready SPEC`): N instances of its own entrypoint and cmd, each
//! waited for until ready (its port published as the net scenario publishes one, so the
//! published port's cost is in the figures), their processes found through the backend's id
//! of each instance ([`Backend::instance_pids`], [`instance_trees`]) instead of a marker.

use std::time::Duration;

use super::{launch_ready, leftovers, marker_base, Fleet, Run, Scenario};
use crate::backend::{wait_for_marker, Backend, Workload};
use crate::host::{instance_processes, instance_trees, pss_kib, scan, settled_kernel_kib, shrunk_kernel_kib};
use crate::results::Better;

/// How long a kernel memory reading may wait for the kernel to finish freeing.
const SETTLE: Duration = Duration::from_secs(5);

struct Reading {
    pss: Vec<f64>,
    procs: Vec<f64>,
    kernel: f64,
}

fn idle(r: &Run<'_>, b: &dyn Backend, n: usize, base: u64, bar: &indicatif::ProgressBar) -> Result<Reading, String> {
    let foreign = r.image.foreign.as_ref().map(|f| &f.ready);
    let markers: Vec<String> =
        if foreign.is_some() { Vec::new() } else { (0..n as u64).map(|i| (base + i).to_string()).collect() };
    let mut roots: Vec<Vec<u32>> = Vec::new();
    let mut fleet = Fleet::new(b);
    settled_kernel_kib(SETTLE);
    let k0 = shrunk_kernel_kib();
    for i in 0..n {
        if crate::signal::interrupted() {
            return Err("interrupted".into());
        }
        let id = format!("{}-m{}-{i}", r.tag, b.name());
        match foreign {
            Some(spec) => {
                let ready = launch_ready(b, spec, &id)?;
                roots.push(b.instance_pids(&ready.instance));
                fleet.instances.push(ready.instance);
                if roots[i].is_empty() {
                    return Err(format!("instance {id} is ready but {} shows no process of it", b.name()));
                }
            }
            None => {
                let inst = b.launch(&Workload::Sleep(base + i as u64), &id).map_err(|e| super::error_chain(&e))?;
                fleet.instances.push(inst);
                if !wait_for_marker(&markers[i], Duration::from_secs(5)) {
                    return Err(format!("instance {id} did not show its workload within 5 s"));
                }
            }
        }
        bar.inc(1);
    }
    // Instances are idle once their workload runs (is ready); the kernel has finished with
    // their launchers' short-lived processes once its memory stops moving.
    settled_kernel_kib(SETTLE);
    let k1 = shrunk_kernel_kib();
    let found = if foreign.is_some() { instance_trees(&scan(), &roots) } else { instance_processes(&scan(), &markers) };
    let mut pss = vec![0.0; n];
    let mut count = vec![0.0; n];
    for &(i, pid, share) in &found {
        if let Some(kib) = pss_kib(pid) {
            pss[i] += kib as f64 * share;
            count[i] += share;
        }
    }
    let (_, errors) = fleet.teardown();
    if !errors.is_empty() {
        return Err(format!("teardown: {}", errors.join("; ")));
    }
    std::thread::sleep(Duration::from_millis(200));
    // The workloads, and the processes that watched them (a monitor ends soon after).
    // A zombie is gone: its parent (pid 1, for an init reparented there) may take its time to reap it.
    let alive = crate::host::running;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while found.iter().any(|&(_, pid, _)| alive(pid)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = leftovers(&markers) + found.iter().filter(|&&(_, pid, _)| alive(pid)).count();
    if left > 0 {
        return Err(format!("{left} processes still running after teardown"));
    }
    Ok(Reading { pss, procs: count, kernel: k1.saturating_sub(k0) as f64 / n as f64 })
}

/// A backend's samples over the rounds: every instance's PSS and process count, and per round
/// the kernel's growth per instance and the total (that round's mean PSS + its kernel growth).
#[derive(Clone, Default)]
struct Samples {
    pss: Vec<f64>,
    procs: Vec<f64>,
    kernel: Vec<f64>,
    total: Vec<f64>,
}

pub fn run(r: &mut Run<'_>) {
    let n = r.settings.instances.max(1);
    let rounds = r.settings.memory_rounds.max(1);
    let nb = r.backends.len();
    let bar = r.progress((n * nb * rounds) as u64, "memory");
    let mut readings: Vec<Option<Samples>> = vec![Some(Samples::default()); nb];
    'rounds: for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 { (0..nb).collect() } else { (0..nb).rev().collect() };
        for k in order {
            if crate::signal::interrupted() {
                break 'rounds;
            }
            if readings[k].is_none() {
                continue;
            }
            let b = r.backends[k].as_ref();
            bar.set_message(b.name());
            match idle(r, b, n, marker_base(), &bar) {
                Ok(reading) => {
                    let mean_pss = reading.pss.iter().sum::<f64>() / n as f64;
                    let acc = readings[k].as_mut().expect("checked above");
                    acc.pss.extend(reading.pss);
                    acc.procs.extend(reading.procs);
                    acc.kernel.push(reading.kernel);
                    acc.total.push(mean_pss + reading.kernel);
                }
                Err(e) => {
                    r.note(format!("memory: {}: {e}", b.name()));
                    readings[k] = None;
                }
            }
        }
    }
    for (k, reading) in readings.into_iter().enumerate() {
        let Some(Samples { pss, procs, kernel, total }) = reading.filter(|x| !x.kernel.is_empty()) else { continue };
        let name = r.backends[k].name();
        let idle = match &r.image.foreign {
            Some(f) => format!(
                "{n} ready, idle instances of {} ({}{})",
                r.image.reference,
                f.ready,
                if f.ready.port().is_some() {
                    ", each with its port published: a process that holds it, where the backend keeps one, counts"
                } else {
                    ""
                }
            ),
            None => format!("{n} idle instances of `hello sleep`"),
        };
        let desc = format!("{idle}, {} rounds over the backends", kernel.len());
        r.record(
            name,
            Scenario::Memory,
            "pss_per_instance",
            "KiB",
            Better::Lower,
            &format!("PSS of the processes each instance leaves running; {desc}, one sample per instance"),
            pss,
            0,
            0,
        );
        r.record(
            name,
            Scenario::Memory,
            "processes_per_instance",
            "processes",
            Better::Lower,
            &format!("processes each instance leaves running; {desc}"),
            procs,
            0,
            0,
        );
        r.record(
            name,
            Scenario::Memory,
            "kernel_per_instance",
            "KiB",
            Better::Lower,
            &format!(
                "growth of Slab (empty slabs given back) + PageTables + KernelStack + Percpu over {n} instances, \
                 once settled, divided by {n}; one sample per round"
            ),
            kernel,
            0,
            0,
        );
        r.record(
            name,
            Scenario::Memory,
            "total_per_instance",
            "KiB",
            Better::Lower,
            &format!("mean PSS + kernel growth per instance, one sample per round; {desc}"),
            total,
            0,
            0,
        );
    }
    bar.finish_and_clear();
}

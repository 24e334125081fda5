//! Start latency. Per round and backend, two foreground runs:
//!
//! - time to workload: launch → the first byte `hello spin 0` writes to its stdout (a pipe to
//!   the harness, which stamps the time when its blocked read returns); the workload's first
//!   action is that write, so this is launch → first instruction of the workload, plus one
//!   pipe write;
//! - end to end: launch → exit of the launcher running `hello true` (instance removed), and the
//!   CPU time (user + system) the launcher and everything it waited for used.
//!
//! For the user's own image (`--ready SPEC`), which neither marks its start nor exits: time to
//! ready, launch (detached, its image's own entrypoint and cmd, published as the net scenario
//! publishes a server) → SPEC holds, the instance removed after each round.

use super::{launch_ready, ms, run_once, Fleet, Run, Scenario};
use crate::backend::Workload;
use crate::ready::ReadySpec;
use crate::results::Better;

pub fn run(r: &mut Run<'_>) {
    if let Some(f) = &r.image.foreign {
        let spec = f.ready.clone();
        return time_to_ready(r, &spec);
    }
    let n = r.backends.len();
    let (warmup, runs) = (r.settings.warmup, r.settings.start_runs);
    let mut ttw: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut e2e: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut failures = vec![0usize; n];
    let mut last_error: Vec<Option<String>> = vec![None; n];
    let bar = r.progress(((warmup + runs) * n) as u64, "start");
    let scratch = r.image.work.clone();
    'rounds: for round in 0..warmup + runs {
        for k in 0..n {
            if crate::signal::interrupted() {
                break 'rounds;
            }
            let i = (k + round) % n;
            let b = r.backends[i].as_ref();
            bar.set_message(b.name());
            let measured = round >= warmup;
            match run_once(b, &Workload::Marker, &format!("{}-s{round}m{i}", r.tag), &scratch) {
                Ok(t) => match t.first_byte {
                    Some(fb) if measured => ttw[i].push(ms(fb)),
                    Some(_) => {}
                    None => {
                        failures[i] += 1;
                        last_error[i] = Some("the workload printed nothing".into());
                    }
                },
                Err(e) => {
                    failures[i] += 1;
                    last_error[i] = Some(super::error_chain(&e));
                }
            }
            match run_once(b, &Workload::True, &format!("{}-s{round}t{i}", r.tag), &scratch) {
                Ok(t) if measured => {
                    e2e[i].push(ms(t.exit));
                    cpu[i].push(ms(t.cpu));
                }
                Ok(_) => {}
                Err(e) => {
                    failures[i] += 1;
                    last_error[i] = Some(super::error_chain(&e));
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    for i in 0..n {
        let name = r.backends[i].name();
        if let Some(e) = last_error[i].take() {
            r.note(format!("start: {name}: {} failed runs; last: {e}", failures[i]));
        }
        let dropped = warmup.min(runs + warmup);
        r.record(
            name,
            Scenario::Start,
            "time_to_workload",
            "ms",
            Better::Lower,
            "launch → first byte the workload (`hello spin 0`) writes to its stdout pipe, stamped by the harness",
            std::mem::take(&mut ttw[i]),
            dropped,
            failures[i],
        );
        r.record(
            name,
            Scenario::Start,
            "end_to_end",
            "ms",
            Better::Lower,
            "launch → exit of the launcher running `hello true`, instance removed",
            std::mem::take(&mut e2e[i]),
            dropped,
            failures[i],
        );
        r.record(
            name,
            Scenario::Start,
            "launch_cpu",
            "ms",
            Better::Lower,
            "user + system CPU time of one `hello true` run: the launcher and everything it waited for",
            std::mem::take(&mut cpu[i]),
            dropped,
            failures[i],
        );
    }
}

/// Per round and backend: launch an instance of the user's own image, wait until `spec` holds,
/// tear it down. A backend whose instance fails once is not tried again (each failure can cost
/// the whole [`super::READY_TIMEOUT`]).
fn time_to_ready(r: &mut Run<'_>, spec: &ReadySpec) {
    let n = r.backends.len();
    let (warmup, runs) = (r.settings.warmup, r.settings.ready_runs);
    let mut ready: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut failed: Vec<Option<String>> = vec![None; n];
    let bar = r.progress(((warmup + runs) * n) as u64, "start");
    'rounds: for round in 0..warmup + runs {
        for k in 0..n {
            if crate::signal::interrupted() {
                break 'rounds;
            }
            let i = (k + round) % n;
            bar.inc(1);
            if failed[i].is_some() {
                continue;
            }
            let b = r.backends[i].as_ref();
            bar.set_message(b.name());
            let mut fleet = Fleet::new(b);
            match launch_ready(b, spec, &format!("{}-r{round}i{i}", r.tag)) {
                Ok(inst) => {
                    if round >= warmup {
                        ready[i].push(ms(inst.took));
                    }
                    fleet.instances.push(inst.instance);
                }
                Err(e) => failed[i] = Some(e),
            }
            let (_, errors) = fleet.teardown();
            if let Some(e) = errors.into_iter().next() {
                failed[i].get_or_insert(format!("teardown: {e}"));
            }
        }
    }
    bar.finish_and_clear();
    let publish = match spec.port() {
        Some(port) => format!("its port {port} published on 127.0.0.1 as in the net scenario"),
        None => "loopback only".to_owned(),
    };
    for (i, samples) in ready.into_iter().enumerate() {
        let name = r.backends[i].name();
        if let Some(e) = failed[i].take() {
            r.note(format!("start: {name}: {e}"));
        }
        let failures = runs.saturating_sub(samples.len());
        r.record(
            name,
            Scenario::Start,
            "time_to_ready",
            "ms",
            Better::Lower,
            &format!(
                "launch of the image's own entrypoint and cmd, detached ({publish}) → ready: {}; the instance \
                 removed after each round",
                spec.describe(None)
            ),
            samples,
            warmup,
            failures,
        );
    }
}

//! CPU cost: a compute loop (`hello spin N`, integer work) and a syscall-heavy loop (`hello
//! syscalls N`, getppid() N times) inside each backend against the bare process. N is
//! calibrated on the bare process to take `cpu_target_ms`. Per round and backend the loop runs
//! with N and with 0 in adjacent foreground runs; the work is the difference of the two end-
//! to-end times (so the start cost drops out), and the ratio is a backend's work over the bare
//! process's in the same round.

use std::process::{Command, Stdio};
use std::time::Instant;

use super::{ms, run_once, Run, Scenario};
use crate::backend::Workload;
use crate::results::Better;

#[derive(Clone, Copy)]
enum Loop {
    Compute,
    Syscalls,
}

impl Loop {
    fn workload(self, n: u64) -> Workload {
        match self {
            Loop::Compute => Workload::Spin(n),
            Loop::Syscalls => Workload::Syscalls(n),
        }
    }
    fn metric(self) -> &'static str {
        match self {
            Loop::Compute => "compute",
            Loop::Syscalls => "syscalls",
        }
    }
}

/// Time `hello MODE n` run bare, ms; None when the mode fails (an older image).
fn bare(r: &Run<'_>, l: Loop, n: u64) -> Option<f64> {
    let mut cmd = Command::new(r.image.workload_on_host());
    cmd.args(l.workload(n).args()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let t = Instant::now();
    let ok = cmd.status().is_ok_and(|s| s.success());
    ok.then(|| ms(t.elapsed()))
}

/// N so that the bare loop takes about `target_ms`.
fn calibrate(r: &Run<'_>, l: Loop, target_ms: f64) -> Option<u64> {
    let mut n: u64 = 100_000;
    loop {
        let t = bare(r, l, n)?;
        if t >= 50.0 || n >= 1 << 40 {
            return Some(((n as f64) * target_ms / t.max(0.001)).max(1.0) as u64);
        }
        n *= 8;
    }
}

pub fn run(r: &mut Run<'_>) {
    let target = r.settings.cpu_target_ms as f64;
    let mut loops = Vec::new();
    for l in [Loop::Compute, Loop::Syscalls] {
        match calibrate(r, l, target) {
            Some(n) => loops.push((l, n)),
            None => r.note(format!(
                "cpu: the image's hello has no `{}` mode; rebuild the default images (scripts/default-images.sh) \
                 to measure the syscall loop",
                l.metric()
            )),
        }
    }
    let nb = r.backends.len();
    let (warmup, runs) = (1, r.settings.cpu_runs);
    let floor = r.backends.iter().position(|b| b.name() == "process");
    if floor.is_none() {
        r.note("cpu: no ratios: the `process` backend (the bare floor) was not part of the run".into());
    }
    let bar = r.progress(((warmup + runs) * nb * loops.len()) as u64, "cpu");
    let scratch = r.image.work.clone();
    // work[loop][backend][round]
    let mut work = vec![vec![vec![None::<f64>; runs]; nb]; loops.len()];
    let mut errors: Vec<Option<String>> = vec![None; nb];
    'rounds: for round in 0..warmup + runs {
        for k in 0..nb {
            let i = (k + round) % nb;
            let b = r.backends[i].as_ref();
            bar.set_message(b.name());
            for (li, &(l, n)) in loops.iter().enumerate() {
                if crate::signal::interrupted() {
                    break 'rounds;
                }
                tracing::info!(backend = b.name(), round, workload = l.metric(), n, "cpu: running");
                let id = |w: &str| format!("{}-c{round}{w}{i}{li}", r.tag);
                let zero = run_once(b, &l.workload(0), &id("z"), &scratch);
                let full = run_once(b, &l.workload(n), &id("n"), &scratch);
                match (zero, full) {
                    (Ok(z), Ok(f)) if round >= warmup => work[li][i][round - warmup] = Some(ms(f.exit) - ms(z.exit)),
                    (Ok(_), Ok(_)) => {}
                    (Err(e), _) | (_, Err(e)) => errors[i] = Some(super::error_chain(&e)),
                }
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    for (i, e) in errors.into_iter().enumerate() {
        if let Some(e) = e {
            let name = r.backends[i].name();
            r.note(format!("cpu: {name}: {e}"));
        }
    }
    for (li, &(l, n)) in loops.iter().enumerate() {
        let what = match l {
            Loop::Compute => format!("`hello spin {n}`"),
            Loop::Syscalls => format!("`hello syscalls {n}`"),
        };
        for i in 0..nb {
            let name = r.backends[i].name();
            let samples: Vec<f64> = work[li][i].iter().flatten().copied().collect();
            let failures = runs - samples.len();
            r.record(
                name,
                Scenario::Cpu,
                l.metric(),
                "ms",
                Better::Lower,
                &format!("end-to-end time of {what} minus that of the same loop with 0 rounds, same round"),
                samples,
                warmup,
                failures,
            );
            if let Some(f) = floor {
                let ratios: Vec<f64> = (0..runs)
                    .filter_map(|round| match (work[li][i][round], work[li][f][round]) {
                        (Some(w), Some(base)) if base > 0.0 => Some(w / base),
                        _ => None,
                    })
                    .collect();
                r.record(
                    name,
                    Scenario::Cpu,
                    &format!("{}_ratio", l.metric()),
                    "ratio",
                    Better::Lower,
                    &format!("work of {what} in this backend / in the bare process, same round"),
                    ratios,
                    warmup,
                    0,
                );
            }
        }
    }
}

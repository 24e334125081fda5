//! CPU cost: a compute loop (`hello spin N`, integer work) and a syscall-heavy loop (`hello
//! syscalls N`, getppid() N times) inside each backend against the bare process. N is
//! calibrated on the bare process to take `cpu_target_ms`. Per round and backend the loop runs
//! once in the foreground and times itself (`loop_ns=` from `hello … timed`, the monotonic
//! clock of the kernel it runs on: the host's, or a guest's kvmclock), so start-up and exit
//! costs stay out of it; the ratio is a backend's loop time over the bare process's in the
//! same round.

use std::process::{Command, Stdio};

use super::{run_once, Run, Scenario};
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

/// The loop time `hello … timed` printed (`loop_ns=T` on a line of its own; a VM's console
/// may carry kernel lines around it), in ms.
fn loop_ms(stdout: &str) -> Option<f64> {
    stdout.lines().find_map(|l| l.trim().strip_prefix("loop_ns=")?.parse::<u64>().ok()).map(|ns| ns as f64 / 1e6)
}

/// The loop time of `hello MODE n timed` run bare, ms; None when the mode fails or prints no
/// time (an image built before either existed).
fn bare(r: &Run<'_>, l: Loop, n: u64) -> Option<f64> {
    let out = Command::new(r.image.workload_on_host())
        .args(l.workload(n).args())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    loop_ms(&String::from_utf8_lossy(&out.stdout))
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
                "cpu: the image's hello has no timed `{}` mode; rebuild the default images \
                 (scripts/default-images.sh) to measure this loop",
                l.metric()
            )),
        }
    }
    let nb = r.backends.len();
    // The loop times itself, so a cold first start does not reach its figure: one warm-up
    // round at most (none where the run has none: a quick one in the nested L1).
    let (warmup, runs) = (r.settings.warmup.min(1), r.settings.cpu_runs);
    let floor = r.backends.iter().position(|b| b.name() == "process");
    if floor.is_none() {
        r.note("cpu: no ratios: the `process` backend (the bare floor) was not part of the run".into());
    }
    let bar = r.progress(((warmup + runs) * nb * loops.len()) as u64, "cpu");
    let scratch = r.image.work.clone();
    // work[loop][backend][round]
    let mut work = vec![vec![vec![None::<f64>; runs]; nb]; loops.len()];
    let mut errors: Vec<Option<String>> = vec![None; nb];
    // Per round, each loop runs in every backend one after the other, so a backend's sample and
    // the bare process's it is divided by are taken within a second of each other: this host
    // changes its speed for syscalls by up to 20 % for seconds at a time, for every backend alike.
    'rounds: for round in 0..warmup + runs {
        for (li, &(l, n)) in loops.iter().enumerate() {
            for k in 0..nb {
                let i = (k + round) % nb;
                let b = r.backends[i].as_ref();
                bar.set_message(b.name());
                if crate::signal::interrupted() {
                    break 'rounds;
                }
                tracing::info!(backend = b.name(), round, workload = l.metric(), n, "cpu: running");
                let id = format!("{}-c{round}n{i}{li}", r.tag);
                match run_once(b, &l.workload(n), &id, &scratch) {
                    Ok(t) => match loop_ms(&t.stdout) {
                        Some(w) if round >= warmup => work[li][i][round - warmup] = Some(w),
                        Some(_) => {}
                        None => {
                            errors[i] = Some(format!(
                                "`hello {}` printed no loop_ns= line; rebuild the default images \
                                 (scripts/default-images.sh)",
                                l.workload(n).args().join(" ")
                            ))
                        }
                    },
                    Err(e) => errors[i] = Some(super::error_chain(&e)),
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
            Loop::Compute => format!("`hello spin {n} timed`"),
            Loop::Syscalls => format!("`hello syscalls {n} timed`"),
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
                &format!("time of {what} measured by the loop itself (monotonic clock around it)"),
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
                    &format!("loop time of {what} in this backend / in the bare process, same round"),
                    ratios,
                    warmup,
                    0,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::loop_ms;

    #[test]
    fn loop_time_is_found_among_console_lines() {
        assert_eq!(loop_ms("12345\nloop_ns=2500000\n"), Some(2.5));
        // A VM's console: kernel lines before and after, CR line ends.
        let console = "[    0.41] virtio_blk virtio0: [vda] 8192 512-byte logical blocks\r\n987\r\nloop_ns=1000000\r\n\
                       [    0.52] reboot: Restarting system\r\n";
        assert_eq!(loop_ms(console), Some(1.0));
        assert_eq!(loop_ms("987\n"), None, "an old hello prints no time");
        assert_eq!(loop_ms("loop_ns=soon\n"), None);
    }
}

//! Disk I/O: `hello disk DIR MIB` inside each backend, in two places: the instance's writable
//! root (a container's overlay upper directory, runc's and crun's shared root directory, a
//! microVM's tmpfs-backed overlay) and a volume (a host directory bound into a container, an
//! ext4 disk of a microVM on virtio-blk). The workload times itself: a MIB-MiB file written
//! sequentially and synced, read back, then random 4 KiB writes each made durable with
//! fdatasync (what a database pays per commit) and random 4 KiB reads. Per round every backend
//! runs once per place, in an order that rotates with the round; figures are medians over the
//! rounds.

use super::{run_once, Run, Scenario};
use crate::backend::Workload;
use crate::results::Better;

/// What `hello disk` prints, in order: (key, unit, which way is better, what it is).
const METRICS: [(&str, &str, Better, &str); 6] = [
    ("seq_write", "MB/s", Better::Higher, "sequential 1 MiB writes, then fsync, over the file's size"),
    ("seq_read", "MB/s", Better::Higher, "sequential 1 MiB reads of the file just written (its pages cached)"),
    ("rand_write_iops", "IOPS", Better::Higher, "random 4 KiB writes, each followed by fdatasync"),
    ("rand_write_p99", "µs", Better::Lower, "99th percentile of one random 4 KiB write + fdatasync"),
    ("rand_read_iops", "IOPS", Better::Higher, "random 4 KiB reads of the file (its pages cached)"),
    ("rand_read_p99", "µs", Better::Lower, "99th percentile of one random 4 KiB read"),
];

/// `hello disk`'s figures in `stdout` (a VM's console may carry kernel lines around them), in
/// [`METRICS`] order; None if any is missing.
fn parse(stdout: &str) -> Option<[f64; 6]> {
    let keys = [
        "seq_write_mbps",
        "seq_read_mbps",
        "rand_write_iops",
        "rand_write_p99_us",
        "rand_read_iops",
        "rand_read_p99_us",
    ];
    let mut out = [0.0; 6];
    for (slot, key) in out.iter_mut().zip(keys) {
        *slot = stdout.lines().find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('=')?.parse::<f64>().ok())?;
    }
    Some(out)
}

pub fn run(r: &mut Run<'_>) {
    let runs = r.settings.disk_runs.max(1);
    let mib = r.settings.disk_mib.max(1);
    let nb = r.backends.len();
    let places = [false, true];
    let bar = r.progress((runs * nb * places.len()) as u64, "disk");
    let scratch = r.image.work.clone();
    // figures[place][backend] = one [f64; 6] per successful round
    let mut figures = vec![vec![Vec::<[f64; 6]>::new(); nb]; places.len()];
    let mut errors: Vec<Option<String>> = vec![None; nb];
    'rounds: for round in 0..runs {
        for (pi, &volume) in places.iter().enumerate() {
            for k in 0..nb {
                let i = (k + round) % nb;
                let b = r.backends[i].as_ref();
                bar.set_message(b.name());
                if crate::signal::interrupted() {
                    break 'rounds;
                }
                let id = format!("{}-d{round}n{i}{pi}", r.tag);
                let workload = Workload::Disk { volume, mib };
                match run_once(b, &workload, &id, &scratch) {
                    Ok(t) => match parse(&t.stdout) {
                        Some(f) => figures[pi][i].push(f),
                        None => {
                            errors[i] = Some(format!(
                                "`hello {}` printed no figures (an image built before `hello disk` existed: rebuild \
                                 the default images with scripts/default-images.sh); it said: {}",
                                workload.args().join(" "),
                                t.stdout.trim().chars().take(300).collect::<String>()
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
    for b in r.backends {
        b.disk_cleanup();
    }
    for (i, e) in errors.into_iter().enumerate() {
        if let Some(e) = e {
            let name = r.backends[i].name();
            r.note(format!("disk: {name}: {e}"));
        }
    }
    for (pi, &volume) in places.iter().enumerate() {
        let place = if volume { "volume" } else { "root" };
        for (i, rounds) in figures[pi].iter().enumerate() {
            let b = r.backends[i].as_ref();
            if rounds.is_empty() {
                continue;
            }
            let note = b.disk_note();
            let (root_is, volume_is) = note.split_once("; ").unwrap_or((note.as_str(), note.as_str()));
            let lies = if volume { volume_is } else { root_is };
            for (m, &(key, unit, better, what)) in METRICS.iter().enumerate() {
                r.record(
                    b.name(),
                    Scenario::Disk,
                    &format!("{place}_{key}"),
                    unit,
                    better,
                    &format!("{what}; a {mib} MiB file in the instance's {place} ({lies}); one sample per round"),
                    rounds.iter().map(|f| f[m]).collect(),
                    0,
                    runs - rounds.len(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn figures_are_found_among_console_lines() {
        let out = "[ 0.4] virtio_blk virtio1: [vdb] 2097152 512-byte logical blocks\r\nseq_write_mbps=812.5\r\n\
                   seq_read_mbps=3000\r\nrand_write_iops=2100\r\nrand_write_p99_us=910.2\r\nrand_read_iops=400000\r\n\
                   rand_read_p99_us=3.1\r\n[ 1.2] reboot: Restarting system\r\n";
        assert_eq!(parse(out), Some([812.5, 3000.0, 2100.0, 910.2, 400000.0, 3.1]));
        assert_eq!(parse("seq_write_mbps=1\n"), None, "all six or none");
    }
}

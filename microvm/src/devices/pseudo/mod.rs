//! Devices with no hardware counterpart: the boot timer, the exit-status port and the
//! workload-output ports.

pub mod boot_timer;
pub mod exit_port;
pub mod output_port;

use std::time::{Duration, Instant};

/// Estimates when this process started, from /proc/self/stat `starttime` against
/// /proc/uptime (both in clock ticks of 10 ms, so ±10 ms). A binary that wants the boot timer
/// to be exact records `Instant::now()` first thing in `main` and passes it instead.
pub fn process_start_estimate() -> Instant {
    let now = Instant::now();
    let age = process_age().unwrap_or_default();
    now.checked_sub(age).unwrap_or(now)
}

fn process_age() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses; fields restart after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    // `rest` starts at field 3 (state); starttime is field 22.
    let start_ticks: u64 = rest.split_whitespace().nth(22 - 3)?.parse().ok()?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let uptime_s: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    // USER_HZ is 100 on every Linux ABI that matters here.
    let start_s = start_ticks as f64 / 100.0;
    Some(Duration::from_secs_f64((uptime_s - start_s).max(0.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_start_is_in_the_past_and_recent() {
        let start = process_start_estimate();
        let age = start.elapsed();
        assert!(age < Duration::from_secs(3600), "{age:?}");
    }
}

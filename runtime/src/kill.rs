//! `kill`: signal the init, or every process of the container's cgroup.

use nix::sys::signal::{kill as send_signal, Signal};
use nix::unistd::Pid;

use crate::container::{Runtime, RuntimeError};

/// Parse a signal as runc does: a number (`9`), a name (`KILL`, `kill`) or a full name
/// (`SIGKILL`).
pub fn parse_signal(s: &str) -> Result<Signal, RuntimeError> {
    let bad = || RuntimeError::Signal(s.to_string());
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| bad());
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    name.parse::<Signal>().map_err(|_| bad())
}

pub(crate) fn kill(rt: &Runtime, id: &str, sig: Signal, all: bool) -> Result<(), RuntimeError> {
    let st = rt.load(id)?;
    if !st.status.can_kill() {
        return Err(RuntimeError::NotRunning { id: id.to_string() });
    }
    if all {
        for pid in st.cgroup.pids()? {
            match send_signal(pid, sig) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(source) => return Err(RuntimeError::Sys { what: "sending signal", source }),
            }
        }
        return Ok(());
    }
    send_signal(Pid::from_raw(st.pid), sig).map_err(|source| RuntimeError::Sys { what: "sending signal", source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("KILL").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("sigterm").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), Signal::SIGUSR1);
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("999").is_err());
    }
}

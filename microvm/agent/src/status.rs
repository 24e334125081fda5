//! Exit statuses: what the agent reports on the exit port.

/// The agent could not set up or start the workload (Docker's and `twinbox run`'s 125).
pub const EXIT_SETUP_FAILED: i32 = 125;
/// The program exists but cannot be executed.
pub const EXIT_NOT_EXECUTABLE: i32 = 126;
/// The program was not found.
pub const EXIT_NOT_FOUND: i32 = 127;

/// Turns a Linux wait status (as `waitpid` fills it) into the status a shell reports: the exit
/// code of a process that exited, or 128 + N for one killed by signal N. `None` for a status
/// that is not an end (stopped, continued).
pub fn exit_code(wait_status: i32) -> Option<i32> {
    let low = wait_status & 0x7f;
    if low == 0 {
        // Exited: the code is in bits 8..16.
        Some((wait_status >> 8) & 0xff)
    } else if low != 0x7f && wait_status & 0xffff != 0xffff {
        // Killed: the signal in bits 0..7 (bit 7 is the core-dump flag).
        Some(128 + low)
    } else {
        // 0x7f in the low bits is "stopped", 0xffff is "continued".
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_match_the_kernel_encoding() {
        assert_eq!(exit_code(0), Some(0));
        assert_eq!(exit_code(3 << 8), Some(3));
        assert_eq!(exit_code(255 << 8), Some(255));
        assert_eq!(exit_code(libc::SIGKILL), Some(137));
        assert_eq!(exit_code(libc::SIGSEGV | 0x80), Some(139), "core dumped");
        assert_eq!(exit_code((libc::SIGSTOP << 8) | 0x7f), None, "stopped");
        assert_eq!(exit_code(0xffff), None, "continued");
    }

    #[test]
    fn agrees_with_libc_macros() {
        for status in [0, 1 << 8, 42 << 8, 9, 15, 6 | 0x80, 0x137f, 0xffff] {
            let expected = if libc::WIFEXITED(status) {
                Some(libc::WEXITSTATUS(status))
            } else if libc::WIFSIGNALED(status) {
                Some(128 + libc::WTERMSIG(status))
            } else {
                None
            };
            assert_eq!(exit_code(status), expected, "status {status:#x}");
        }
    }
}

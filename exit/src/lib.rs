//! twinbox's exit-code policy, Docker's:
//!
//! - 0: the command did what was asked.
//! - [`USER_ERROR`] (1): the user's mistake — a missing image, a bad reference, a name in use,
//!   a malformed Dockerfile, an invalid limit. The message says what to do.
//! - [`INTERNAL`] (125): twinbox's own failure — the store's I/O, a failing system call, a
//!   corrupt blob.
//! - [`NOT_EXECUTABLE`] (126), [`NOT_FOUND`] (127), [`signalled`] (128 + N): the workload's —
//!   its program cannot be executed, does not exist, or signal N ended it. A command that runs
//!   a workload (`twinbox run`) otherwise returns the workload's own code, so that twinbox's
//!   failures around it are 125 and never taken for the workload's.
//!
//! Each error enum a command can surface implements [`ExitCode`] in the crate that defines it,
//! with one match arm per variant (no catch-all), and a variant that wraps another twinbox
//! error asks that error. The command line prints the error chain once and exits with the code
//! of the outermost twinbox error in it.

/// The user can fix it; the message says how.
pub const USER_ERROR: i32 = 1;
/// twinbox itself failed.
pub const INTERNAL: i32 = 125;
/// The workload's program exists but cannot be executed.
pub const NOT_EXECUTABLE: i32 = 126;
/// The workload's program does not exist.
pub const NOT_FOUND: i32 = 127;
/// 128 + N: signal N ended the process (see [`signalled`]).
pub const SIGNAL_BASE: i32 = 128;

/// The code a shell reports for a process that signal `signal` ended.
pub const fn signalled(signal: i32) -> i32 {
    SIGNAL_BASE + signal
}

/// An error that knows which exit code a command reports for it.
pub trait ExitCode: std::error::Error {
    /// [`USER_ERROR`], [`INTERNAL`], or one of the workload's codes.
    fn exit_code(&self) -> i32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Missing;

    impl std::fmt::Display for Missing {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("missing")
        }
    }

    impl std::error::Error for Missing {}

    impl ExitCode for Missing {
        fn exit_code(&self) -> i32 {
            NOT_FOUND
        }
    }

    #[test]
    fn codes_are_dockers() {
        assert_eq!((USER_ERROR, INTERNAL, NOT_EXECUTABLE, NOT_FOUND), (1, 125, 126, 127));
        assert_eq!(signalled(9), 137);
        let e: &dyn ExitCode = &Missing;
        assert_eq!(e.exit_code(), 127);
    }
}

//! Ctrl-C: the first SIGINT (or SIGTERM) sets a flag the scenarios poll between runs, so every
//! instance started is torn down and a partial report is written; a second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether the run was asked to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Ask the run to stop (what the handler does; also for tests).
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

extern "C" fn on_signal(_: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        const MSG: &[u8] = b"\ntwinbox bench: second interrupt, exiting now; instances may be left behind\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static buffer.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(130);
        }
    }
    const MSG: &[u8] =
        b"\ntwinbox bench: interrupted; finishing the current run and tearing down (Ctrl-C again to abort)\n";
    // SAFETY: write(2) is async-signal-safe; MSG is a static buffer.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
    }
}

/// Install the handler for SIGINT and SIGTERM.
pub fn install() -> nix::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only touches an atomic and calls async-signal-safe functions.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}

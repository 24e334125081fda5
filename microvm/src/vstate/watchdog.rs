//! What stops running vCPUs from outside the guest: another vCPU ending the VM, the timeout,
//! and SIGINT/SIGTERM/SIGHUP. A vCPU notices at its next exit; the watchdog thread forces one
//! every [`POLL_INTERVAL`] by kicking each vCPU thread out of KVM_RUN with a signal.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::vcpu::VcpuError;

/// How often a running vCPU is interrupted to check for the timeout and a dead halt.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The signal that asked every running vCPU to stop, 0 for none.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// A VMM process this process is the monitor of: stop signals go on to it.
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

extern "C" fn stop_handler(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only an atomic store and kill(2): async-signal-safe.
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
    let pid = FORWARD_TO.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill takes integers only.
        unsafe { libc::kill(pid, sig) };
    }
}

/// From now on (with [`stop_on_signals`] installed) SIGINT, SIGTERM and SIGHUP also go to
/// `pid`, the VMM process this process monitors; `None` stops that. A signal that came
/// before goes to it at once.
pub fn forward_stops_to(pid: Option<i32>) {
    FORWARD_TO.store(pid.unwrap_or(0), Ordering::SeqCst);
    if let (Some(pid), Some(sig)) = (pid, stop_requested()) {
        // SAFETY: kill takes integers only.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Makes SIGINT, SIGTERM and SIGHUP stop the running guest instead of killing the process, so
/// the VMM's cleanup (image holds, temp files) runs: the vCPU loop notices within
/// [`POLL_INTERVAL`] and returns [`VcpuError::Interrupted`].
pub fn stop_on_signals() -> Result<(), std::io::Error> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(sig, stop_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}

/// The signal a [`stop_on_signals`] handler caught, if any.
pub fn stop_requested() -> Option<i32> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU out of KVM_RUN (its handler does nothing; the EINTR is the
/// point).
fn kick_signal() -> Result<libc::c_int, std::io::Error> {
    static INSTALLED: OnceLock<Result<libc::c_int, i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        let sig = vmm_sys_util::signal::SIGRTMIN();
        vmm_sys_util::signal::register_signal_handler(sig, kick_handler).map(|()| sig).map_err(|e| e.errno())
    });
    r.map_err(std::io::Error::from_raw_os_error)
}

/// What the vCPU threads of one VM share: the stop flag, the timeout, and the threads the
/// watchdog kicks out of KVM_RUN every [`POLL_INTERVAL`] so they notice either.
#[derive(Debug)]
pub struct RunControl {
    stopping: AtomicBool,
    timed_out: AtomicBool,
    timeout: Option<Duration>,
    pause_when_ready: bool,
    threads: Mutex<Vec<libc::pthread_t>>,
}

/// A vCPU thread's registration; dropping it unregisters the thread, so it is never signalled
/// after it has finished.
pub struct Registration<'a> {
    control: &'a RunControl,
    thread: libc::pthread_t,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut threads = self.control.threads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = threads.iter().position(|t| *t == self.thread) {
            threads.swap_remove(i);
        }
    }
}

impl RunControl {
    /// Control for a VM that stops with [`VcpuError::Timeout`] after `timeout`.
    pub fn new(timeout: Option<Duration>) -> Self {
        RunControl {
            stopping: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
            timeout,
            pause_when_ready: false,
            threads: Mutex::default(),
        }
    }

    /// The VM stops (every vCPU) when the guest agent says it waits for its workload.
    pub fn with_pause_when_ready(mut self, pause: bool) -> Self {
        self.pause_when_ready = pause;
        self
    }

    /// Whether the agent's ready signal stops the VM.
    pub(super) fn pause_when_ready(&self) -> bool {
        self.pause_when_ready
    }

    /// Registers the calling thread as a vCPU thread to kick.
    pub(super) fn register(&self) -> Registration<'_> {
        // SAFETY: pthread_self has no preconditions and cannot fail.
        let thread = unsafe { libc::pthread_self() };
        self.threads.lock().unwrap_or_else(|e| e.into_inner()).push(thread);
        Registration { control: self, thread }
    }

    /// The error a vCPU must return before entering the guest again: the timeout has passed
    /// ([`VcpuError::Timeout`]) or a [`stop_on_signals`] signal came ([`VcpuError::Interrupted`]).
    pub(super) fn stop_error(&self) -> Option<VcpuError> {
        if self.timed_out.load(Ordering::SeqCst) {
            return Some(VcpuError::Timeout(self.timeout.unwrap_or_default()));
        }
        stop_requested().map(VcpuError::Interrupted)
    }

    /// Whether [`RunControl::stop`] was called.
    pub(super) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Asks every vCPU to return; each does at its next exit, which the kick forces.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.kick_all();
    }

    fn kick_all(&self) {
        let Ok(sig) = kick_signal() else { return };
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for t in threads.iter() {
            // SAFETY: every listed thread is alive: a thread removes itself (Registration's
            // Drop, under this same lock) before it finishes, and the kick signal has a no-op
            // handler installed (kick_signal succeeded).
            unsafe { libc::pthread_kill(*t, sig) };
        }
    }
}

/// A thread that kicks every registered vCPU thread every [`POLL_INTERVAL`] and raises the
/// timeout flag when the time is up.
pub struct Watchdog {
    done: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Watchdog {
    /// Starts watching the vCPUs of `control`.
    pub fn start(control: Arc<RunControl>) -> Result<Self, VcpuError> {
        kick_signal().map_err(VcpuError::Watchdog)?;
        let (done, rx) = mpsc::channel::<()>();
        let deadline = control.timeout.map(|t| Instant::now() + t);
        let thread = std::thread::Builder::new()
            .name("vcpu-watchdog".into())
            .spawn(move || {
                if let Err(e) = crate::jail::seccomp::confine_thread(crate::jail::ThreadKind::Watchdog) {
                    // Without kicks nothing could stop the vCPUs later: end the VM now.
                    tracing::error!(error = %e, "the vCPU watchdog cannot run; stopping the VM");
                    control.stop();
                    control.kick_all();
                    return;
                }
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(POLL_INTERVAL) {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        control.timed_out.store(true, Ordering::SeqCst);
                    }
                    control.kick_all();
                }
            })
            .map_err(VcpuError::Watchdog)?;
        Ok(Watchdog { done, thread })
    }

    /// Stops the watchdog thread and waits for it.
    pub fn stop(self) {
        drop(self.done);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timed_out_vm_fails_with_its_timeout_and_a_stopped_one_just_stops() {
        let control = RunControl::new(Some(Duration::from_millis(5)));
        assert!(control.stop_error().is_none() && !control.stopping());
        control.timed_out.store(true, Ordering::SeqCst);
        assert!(matches!(control.stop_error(), Some(VcpuError::Timeout(t)) if t == Duration::from_millis(5)));
        let control = RunControl::new(None);
        control.stop();
        assert!(control.stopping() && control.stop_error().is_none());
    }

    #[test]
    fn registration_ends_with_its_guard() {
        let control = RunControl::new(None);
        let registered = control.register();
        assert_eq!(control.threads.lock().unwrap().len(), 1);
        control.stop(); // kicks this thread: the handler does nothing
        drop(registered);
        assert!(control.threads.lock().unwrap().is_empty());
    }
}

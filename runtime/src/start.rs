//! `start`: consume the exec fifo (the init, blocked opening it for writing, then writes one
//! byte and execs the user's program), remove it, run the poststart hooks.

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::Mode;
use std::os::fd::AsFd;

use crate::container::{Runtime, RuntimeError};
use crate::state::{derive_status, State, Status, EXEC_FIFO};

pub(crate) fn start(rt: &Runtime, id: &str) -> Result<(), RuntimeError> {
    let _lock = rt.lock(id)?;
    start_locked(rt, id, &mut rt.load(id)?)
}

/// `start` of a container this process has just created, with the state `create` returned
/// instead of reading it back from disk (`run`).
pub(crate) fn start_created(rt: &Runtime, st: &mut State) -> Result<(), RuntimeError> {
    let id = st.id.clone();
    let _lock = rt.lock(&id)?;
    // Status `created` as `create` left it; an init that died since is found by the wait below.
    start_locked(rt, &id, st)
}

fn start_locked(rt: &Runtime, id: &str, st: &mut State) -> Result<(), RuntimeError> {
    if !st.status.can_start() {
        return Err(RuntimeError::CannotStart { status: st.status });
    }
    let dir = rt.state_dir(id);
    let fifo_path = dir.join(EXEC_FIFO);
    // Non-blocking open: a blocking one would hang forever if the init died meanwhile.
    let fifo = nix::fcntl::open(&fifo_path, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|source| RuntimeError::Sys { what: "opening exec.fifo", source })?;
    let mut buf = [0u8; 1];
    loop {
        let mut fds = [PollFd::new(fifo.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => {
                if derive_status(st.pid, st.init_start_time, &fifo_path) != Status::Created {
                    return Err(RuntimeError::CannotStart { status: Status::Stopped });
                }
                continue;
            }
            Ok(_) => {}
            Err(source) => return Err(RuntimeError::Sys { what: "waiting on exec.fifo", source }),
        }
        match nix::unistd::read(&fifo, &mut buf) {
            Ok(1) => break,
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => continue,
            // The writer went away without writing: the init died.
            Ok(_) => return Err(RuntimeError::CannotStart { status: Status::Stopped }),
            Err(source) => return Err(RuntimeError::Sys { what: "reading exec.fifo", source }),
        }
    }
    drop(fifo);
    std::fs::remove_file(&fifo_path).map_err(|source| RuntimeError::Io {
        what: "removing",
        path: fifo_path.clone(),
        source,
    })?;
    st.refresh(&dir);
    if let Some(list) = st.config.hooks().as_ref().and_then(|h| h.poststart().clone()) {
        // A failing poststart hook is only a warning (runtime spec).
        if let Err(e) = crate::hooks::run("poststart", &list, &st.oci_json()) {
            tracing::warn!(id, error = %crate::container::error_chain(&e), "poststart hook failed");
        }
    }
    tracing::debug!(id, "started");
    Ok(())
}

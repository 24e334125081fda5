//! `delete`: stop what is left (a created container, or a running one with `force`), destroy
//! the cgroup, run the poststop hooks, remove the state directory.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::container::{error_chain, wait_gone, Runtime, RuntimeError};
use crate::state::{State, Status};

const KILL_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn delete(rt: &Runtime, id: &str, force: bool) -> Result<(), RuntimeError> {
    let _lock = rt.lock(id)?;
    delete_locked(rt, id, rt.load(id)?, force)
}

/// `delete` of a container this process created, with the state it holds (`run`): its status
/// is derived again, the rest of the state cannot have changed.
pub(crate) fn delete_created(rt: &Runtime, mut st: State, force: bool) -> Result<(), RuntimeError> {
    let id = st.id.clone();
    let _lock = rt.lock(&id)?;
    st.refresh(&rt.state_dir(&id));
    delete_locked(rt, &id, st, force)
}

fn delete_locked(rt: &Runtime, id: &str, mut st: State, force: bool) -> Result<(), RuntimeError> {
    let dir = rt.state_dir(id);
    match st.status {
        Status::Stopped => {}
        // runc deletes a created container without --force: nothing ever ran in it.
        Status::Created | Status::Creating => kill_and_wait(id, st.pid, st.init_start_time)?,
        s if !force => return Err(RuntimeError::NotStopped { id: id.to_string(), status: s }),
        _ => {
            if st.status == Status::Paused {
                let _ = st.cgroup.freeze(false);
            }
            kill_and_wait(id, st.pid, st.init_start_time)?;
        }
    }
    st.cgroup.destroy()?;
    if let Some(below) = st.host_mounts_below {
        crate::rootfs::unmount_host_mounts(&st.rootfs, below)?;
    }
    st.status = Status::Stopped;
    if let Some(list) = st.config.hooks().as_ref().and_then(|h| h.poststop().clone()) {
        // Poststop failures are warnings: the container is gone either way.
        if let Err(e) = crate::hooks::run("poststop", &list, &st.oci_json()) {
            tracing::warn!(id, error = %error_chain(&e), "poststop hook failed");
        }
    }
    match std::fs::remove_dir_all(&dir) {
        // A concurrent delete (a detached container's monitor and `rm -f` racing) got there
        // first: the container is gone either way.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        r => r.map_err(|source| RuntimeError::Io { what: "removing", path: dir.clone(), source })?,
    }
    tracing::debug!(id, "deleted");
    Ok(())
}

fn kill_and_wait(id: &str, pid: i32, start_time: u64) -> Result<(), RuntimeError> {
    match kill(Pid::from_raw(pid), Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(source) => return Err(RuntimeError::Sys { what: "killing the init", source }),
    }
    if !wait_gone(pid, start_time, KILL_TIMEOUT) {
        return Err(RuntimeError::KillTimeout { id: id.to_string(), secs: KILL_TIMEOUT.as_secs() });
    }
    Ok(())
}

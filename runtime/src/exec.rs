//! `exec`: run another process in a container — in its namespaces (the init's, as
//! /proc/PID/ns/*), its cgroup, with the given process's credentials.
//!
//! The pid namespace is entered by the runtime itself around the fork (setns(CLONE_NEWPID)
//! only affects children), so the new process is in the container's pid namespace *and* a
//! child of the caller. The child waits until the parent has put it into the cgroup, joins the
//! other namespaces (the cgroup one after the cgroup move), applies the credentials and execs.
//! Its end of the sync channel is close-on-exec: EOF tells the parent the exec happened; an
//! error message tells it why not.

use std::convert::Infallible;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, Process};
use twinbox_exit::ExitCode;

use crate::container::{connect_console, error_chain, write_pid_file, ExecOptions, Runtime, RuntimeError};
use crate::init::{self, InitError, Msg, SyncChannel};
use crate::namespaces::{self, OpenNamespaces, PidNsForChildren};
use crate::process::Prepared;
use crate::syscall;

pub(crate) fn exec(rt: &Runtime, id: &str, process: &Process, opts: ExecOptions) -> Result<Pid, RuntimeError> {
    let st = rt.load(id)?;
    if !st.status.can_exec() {
        return Err(RuntimeError::CannotExec { status: st.status });
    }
    if process.args().as_deref().unwrap_or(&[]).is_empty() {
        return Err(RuntimeError::InvalidSpec { reason: "process.args must not be empty" });
    }
    let terminal = process.terminal().unwrap_or(false);
    if terminal && opts.console_socket.is_none() {
        return Err(RuntimeError::NoConsoleSocket);
    }
    let linux = st.config.linux().clone().unwrap_or_default();
    let prepared = crate::process::prepare(process, linux.seccomp().as_ref())?;
    let types: Vec<LinuxNamespaceType> = linux.namespaces().as_deref().unwrap_or(&[]).iter().map(|n| n.typ()).collect();
    let init_pid = Pid::from_raw(st.pid);
    let joins = OpenNamespaces::of_process(init_pid, &types)?;
    // The init's root, entered after the mount namespace: joining a mount namespace puts a
    // process at the namespace's root, which is the container's only if the init could
    // pivot_root; without pivot (an initramfs, a chroot) the rootfs is a mount on top of it.
    let root = nix::fcntl::open(
        format!("/proc/{init_pid}/root").as_str(),
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|source| RuntimeError::Sys { what: "opening the container's root", source })?;
    let pid_ns = PathBuf::from(format!("/proc/{init_pid}/ns/pid"));
    let enter_pid_ns =
        types.contains(&LinuxNamespaceType::Pid) && !namespaces::same_file(&pid_ns, Path::new("/proc/self/ns/pid"));
    let console = match (&opts.console_socket, terminal) {
        (Some(p), true) => Some(connect_console(p)?),
        _ => None,
    };
    let (parent_sync, child_sync) =
        SyncChannel::pair().map_err(|source| RuntimeError::Sys { what: "socketpair", source })?;
    let stdio_raw = opts.stdio.as_ref().map(|[a, b, c]| [a.as_raw_fd(), b.as_raw_fd(), c.as_raw_fd()]);
    let child = ExecChild {
        process,
        prepared: &prepared,
        joins: &joins,
        root: root.as_fd(),
        sync: &child_sync,
        stdio: stdio_raw,
        console: console.as_ref().map(|c| c.as_raw_fd()),
        preserve_fds: opts.preserve_fds,
    };
    let pid = {
        let _pidns = if enter_pid_ns { Some(PidNsForChildren::enter(&pid_ns)?) } else { None };
        namespaces::clone_process(nix::sched::CloneFlags::empty(), || child.run())?
    };
    drop(child_sync);
    drop(opts.stdio);
    drop(console);
    let fail = |e: RuntimeError| {
        let _ = kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
        e
    };
    st.cgroup.add_task(pid).map_err(|e| fail(e.into()))?;
    parent_sync
        .send(&Msg::Go(Vec::new()))
        .map_err(|source| fail(RuntimeError::Sys { what: "sending go to the exec child", source }))?;
    match parent_sync.recv() {
        Ok(None) => {}
        Ok(Some(Msg::Error { code, message })) => {
            let _ = waitpid(pid, None);
            return Err(RuntimeError::ExecFailed { message, code });
        }
        Ok(Some(_)) => {
            return Err(fail(RuntimeError::ExecFailed {
                message: "unexpected message from the exec child".into(),
                code: 1,
            }))
        }
        Err(source) => return Err(fail(RuntimeError::Sys { what: "waiting for the exec child", source })),
    }
    if let Some(p) = &opts.pid_file {
        write_pid_file(p, pid)?;
    }
    tracing::debug!(id, pid = pid.as_raw(), "exec'd");
    Ok(pid)
}

struct ExecChild<'a> {
    process: &'a Process,
    prepared: &'a Prepared,
    joins: &'a OpenNamespaces,
    /// The init's root directory (O_PATH).
    root: std::os::fd::BorrowedFd<'a>,
    sync: &'a SyncChannel,
    stdio: Option<[RawFd; 3]>,
    console: Option<RawFd>,
    preserve_fds: u32,
}

impl ExecChild<'_> {
    fn run(&self) -> i32 {
        let err = match self.setup() {
            Ok(never) => match never {},
            Err(e) => e,
        };
        let code = err.exit_code();
        let _ = self.sync.send(&Msg::Error { code, message: error_chain(&err) });
        code
    }

    fn setup(&self) -> Result<Infallible, InitError> {
        syscall::reset_signals();
        if let Some(fds) = self.stdio {
            init::setup_stdio(fds, self.preserve_fds)?;
        }
        match self.sync.recv().map_err(InitError::Sync)? {
            Some(Msg::Go(_)) => {}
            None => return Err(InitError::SyncClosed),
            Some(_) => return Err(InitError::SyncProtocol),
        }
        self.joins.join()?;
        nix::unistd::fchdir(self.root).map_err(InitError::EnterRoot)?;
        nix::unistd::chroot(".").map_err(InitError::EnterRoot)?;
        let p = self.process;
        if p.terminal().unwrap_or(false) {
            if let Some(sock) = self.console {
                init::setup_console(sock, p, false)?;
            }
        }
        let argv = init::cstrings(p.args().as_deref().unwrap_or(&[]))?;
        let envv = init::cstrings(p.env().as_deref().unwrap_or(&[]))?;
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(p.user().umask().unwrap_or(0o022)));
        self.prepared.apply()?;
        let cwd = if p.cwd().as_os_str().is_empty() { PathBuf::from("/") } else { p.cwd().clone() };
        nix::unistd::chdir(&cwd).map_err(|source| InitError::Cwd { cwd, source })?;
        let program = p.args().as_deref().and_then(|a| a.first()).cloned().unwrap_or_default();
        let path = init::find_executable(&program, p.env().as_deref().unwrap_or(&[]))?;
        let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| InitError::Nul(path.display().to_string()))?;
        init::exec(&cpath, &argv, &envv, self.preserve_fds)
    }
}

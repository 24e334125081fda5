//! The agent's side of the control channel (see the library's `control`): a vsock listener on
//! port 1024 whose connections each run one `exec` in the workload's namespaces and root.
//! Everything runs in the agent's one thread, inside the loop that forwards the workload's
//! output ([`crate::supervise::forward`]), so forking stays safe.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use twinbox_agent::control::{frame, merge_env, ExecRequest, CONTROL_PORT, FRAME_ERROR, FRAME_EXIT, MAX_REQUEST};
use twinbox_agent::control::{FRAME_STDERR, FRAME_STDOUT};
use twinbox_agent::GuestConfig;

use crate::setup::ROOT;
use crate::sys;
use crate::workload::{become_process, cstrings, ChildFailure, Step};

enum State {
    /// Reading the request line.
    Request(Vec<u8>),
    /// The process runs (`pid` is the agent's child that waits for it); its output pipes until
    /// they reach end of file.
    Running { pid: libc::pid_t, out: Option<File>, err: Option<File> },
}

struct Session {
    conn: File,
    /// False once the host went away: output is still drained, not sent.
    connected: bool,
    state: State,
}

impl Session {
    fn send(&mut self, kind: u8, payload: &[u8]) {
        if self.connected && self.conn.write_all(&frame(kind, payload)).is_err() {
            self.connected = false;
        }
    }
}

/// The listener and its sessions.
pub struct Control<'a> {
    listener: Option<OwnedFd>,
    config: &'a GuestConfig,
    workload: libc::pid_t,
    sessions: Vec<Session>,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A vsock stream socket listening on `port` of any CID.
fn listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers.
    let fd = check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_vm is valid; the fields that matter are set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: bind reads `len` bytes of `addr`, a live sockaddr_vm.
    check(unsafe { libc::bind(sock.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), len) })?;
    // SAFETY: listen takes no pointers.
    check(unsafe { libc::listen(sock.as_raw_fd(), 16) })?;
    Ok(sock)
}

impl<'a> Control<'a> {
    /// Listens for exec requests for `workload`, run as `config` says; without a vsock device
    /// (a VM made without one) there is no listener and nothing to serve.
    pub fn new(config: &'a GuestConfig, workload: libc::pid_t) -> Self {
        Control { listener: listen(CONTROL_PORT).ok(), config, workload, sessions: Vec::new() }
    }

    /// Whether a listener is up.
    pub fn listening(&self) -> bool {
        self.listener.is_some()
    }

    /// What to poll: the listener, then per session its connection (while reading the
    /// request) or its output pipes.
    pub fn poll_fds(&self) -> Vec<libc::pollfd> {
        let fd = |fd: libc::c_int| libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let mut fds: Vec<libc::pollfd> = self.listener.iter().map(|l| fd(l.as_raw_fd())).collect();
        for s in &self.sessions {
            match &s.state {
                State::Request(_) => fds.push(fd(s.conn.as_raw_fd())),
                State::Running { out, err, .. } => {
                    fds.extend(out.iter().chain(err.iter()).map(|f| fd(f.as_raw_fd())));
                }
            }
        }
        fds
    }

    /// Handles what `poll` reported on [`poll_fds`](Self::poll_fds)'s descriptors.
    pub fn service(&mut self, fds: &[libc::pollfd]) {
        let ready = |fd: libc::c_int| fds.iter().any(|p| p.fd == fd && p.revents != 0);
        if let Some(l) = &self.listener {
            if ready(l.as_raw_fd()) {
                // SAFETY: accept4 with null address pointers writes no memory.
                let fd = unsafe {
                    libc::accept4(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
                };
                if fd >= 0 {
                    // SAFETY: `fd` was just returned by accept4 and nothing else owns it.
                    let conn = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                    self.sessions.push(Session { conn, connected: true, state: State::Request(Vec::new()) });
                }
            }
        }
        let mut i = 0;
        while i < self.sessions.len() {
            let done = self.step(i, &ready);
            if done {
                self.sessions.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Advances session `i`; true when it is over.
    fn step(&mut self, i: usize, ready: &dyn Fn(libc::c_int) -> bool) -> bool {
        let (config, workload) = (self.config, self.workload);
        let s = &mut self.sessions[i];
        match &mut s.state {
            State::Request(line) => {
                if !ready(s.conn.as_raw_fd()) {
                    return false;
                }
                let mut buf = [0u8; 4096];
                let n = match s.conn.read(&mut buf) {
                    Ok(0) | Err(_) => return true,
                    Ok(n) => n,
                };
                line.extend_from_slice(&buf[..n]);
                let Some(end) = line.iter().position(|b| *b == b'\n') else {
                    return line.len() > MAX_REQUEST;
                };
                let request: Result<ExecRequest, String> =
                    serde_json::from_slice(&line[..end]).map_err(|e| format!("bad exec request: {e}"));
                if let Ok(ExecRequest { signal: Some(sig), .. }) = request {
                    // SAFETY: kill takes no pointers.
                    match check(unsafe { libc::kill(workload, sig) }) {
                        Ok(_) => s.send(FRAME_EXIT, &0i32.to_le_bytes()),
                        Err(e) => {
                            s.send(
                                FRAME_ERROR,
                                format!("cannot send signal {sig}: {}", sys::errno_text(&e)).as_bytes(),
                            );
                            s.send(FRAME_EXIT, &1i32.to_le_bytes());
                        }
                    }
                    return true;
                }
                match request.and_then(|r| start(&r, config, workload).map_err(|(m, c)| format!("{m}\0{c}"))) {
                    Ok((pid, out, err)) => {
                        s.state = State::Running { pid, out: Some(out), err: Some(err) };
                        false
                    }
                    Err(e) => {
                        let (message, code) = match e.split_once('\0') {
                            Some((m, c)) => (m.to_owned(), c.parse().unwrap_or(125)),
                            None => (e, 125),
                        };
                        s.send(FRAME_ERROR, message.as_bytes());
                        s.send(FRAME_EXIT, &i32::to_le_bytes(code));
                        true
                    }
                }
            }
            State::Running { pid, out, err } => {
                let pid = *pid;
                let mut chunks = Vec::new();
                for (pipe, kind) in [(out, FRAME_STDOUT), (err, FRAME_STDERR)] {
                    let Some(f) = pipe else { continue };
                    if !ready(f.as_raw_fd()) {
                        continue;
                    }
                    let mut buf = vec![0u8; 16 * 1024];
                    match f.read(&mut buf) {
                        Ok(0) | Err(_) => *pipe = None,
                        Ok(n) => chunks.push((kind, buf[..n].to_vec())),
                    }
                }
                let finished = matches!(&s.state, State::Running { out: None, err: None, .. });
                for (kind, bytes) in chunks {
                    s.send(kind, &bytes);
                }
                if !finished {
                    return false;
                }
                let code = match sys::wait_pid(pid) {
                    Ok(status) => twinbox_agent::exit_code(status).unwrap_or(125),
                    Err(_) => 125,
                };
                s.send(FRAME_EXIT, &code.to_le_bytes());
                true
            }
        }
    }
}

/// Starts `req` in the workload's namespaces: a child that joins its mount namespace and root
/// and its pid namespace, and forks the process there (a process joins a pid namespace only
/// through a fork), then waits for it and exits with its status. Returns the child and the
/// process's output pipes, or the message and exit code of why it could not start.
fn start(
    req: &ExecRequest,
    config: &GuestConfig,
    workload: libc::pid_t,
) -> Result<(libc::pid_t, File, File), (String, i32)> {
    let setup = |what: &str, e: io::Error| (format!("exec: cannot {what}: {}", sys::errno_text(&e)), 125);
    if req.args.is_empty() {
        return Err(("exec: no command given".into(), 125));
    }
    let exec = GuestConfig {
        args: req.args.clone(),
        env: merge_env(&config.env, &req.env),
        cwd: req.cwd.clone().unwrap_or_else(|| config.cwd.clone()),
        uid: req.uid.unwrap_or(config.uid),
        gid: req.gid.unwrap_or(config.gid),
        additional_gids: if req.uid.is_some() { Vec::new() } else { config.additional_gids.clone() },
        ..config.clone()
    };
    let argv = cstrings(&exec.args).map_err(|e| (e.to_string(), 125))?;
    let envp = cstrings(&exec.env).map_err(|e| (e.to_string(), 125))?;
    let ns = |kind: &str| File::open(format!("/proc/{workload}/ns/{kind}"));
    let mnt = ns("mnt").map_err(|e| setup("find the workload's mount namespace", e))?;
    let pidns = ns("pid").map_err(|e| setup("find the workload's pid namespace", e))?;
    let (out_r, out_w) = sys::pipe().map_err(|e| setup("make a pipe", e))?;
    let (err_r, err_w) = sys::pipe().map_err(|e| setup("make a pipe", e))?;
    let (mut report_r, report_w) = sys::pipe().map_err(|e| setup("make a pipe", e))?;
    let child = ExecChild { exec: &exec, argv, envp, mnt, pidns, out: out_w, err: err_w, report: File::from(report_w) };
    let Some(pid) = sys::fork().map_err(|e| setup("fork", e))? else { child.run() };
    drop(child);
    let mut report = Vec::new();
    let _ = report_r.read_to_end(&mut report);
    if let Some(failure) = ChildFailure::decode(&report) {
        let _ = sys::wait_pid(pid);
        return Err((failure.message(&exec), failure.exit_code()));
    }
    Ok((pid, out_r, err_r))
}

/// What the exec's child needs, made before the fork.
struct ExecChild<'a> {
    exec: &'a GuestConfig,
    argv: Vec<CString>,
    envp: Vec<CString>,
    mnt: File,
    pidns: File,
    out: OwnedFd,
    err: OwnedFd,
    report: File,
}

impl ExecChild<'_> {
    /// In the forked child: join the workload, fork the process, wait for it. Never returns.
    fn run(mut self) -> ! {
        let joined = (|| {
            setns(&self.mnt, libc::CLONE_NEWNS).map_err(ChildFailure::at(Step::MountNamespace))?;
            std::os::unix::fs::chroot(ROOT).map_err(ChildFailure::at(Step::Chroot))?;
            std::env::set_current_dir("/").map_err(ChildFailure::at(Step::Chroot))?;
            setns(&self.pidns, libc::CLONE_NEWPID).map_err(ChildFailure::at(Step::MountNamespace))?;
            sys::fork().map_err(ChildFailure::at(Step::Exec))
        })();
        match joined {
            Ok(None) => {
                let failure = match self.prepare() {
                    Ok(path) => ChildFailure::at(Step::Exec)(sys::execve(&path, &self.argv, &self.envp)),
                    Err(f) => f,
                };
                let _ = self.report.write_all(&failure.encode());
                sys::exit_now(failure.exit_code())
            }
            Ok(Some(pid)) => {
                // Only the process keeps the pipes and the report open.
                drop(self);
                let code = sys::wait_pid(pid).ok().and_then(twinbox_agent::exit_code).unwrap_or(125);
                sys::exit_now(code)
            }
            Err(failure) => {
                let _ = self.report.write_all(&failure.encode());
                sys::exit_now(failure.exit_code())
            }
        }
    }

    /// In the process, up to its exec: the program's path.
    fn prepare(&self) -> Result<CString, ChildFailure> {
        become_process(self.exec, &self.out, &self.err)
    }
}

fn setns(ns: &File, kind: libc::c_int) -> io::Result<()> {
    // SAFETY: setns takes a descriptor and a flag, no pointers.
    check(unsafe { libc::setns(ns.as_raw_fd(), kind) }).map(drop)
}

//! The agent's side of the control channel (see the library's `control`): a vsock listener on
//! port 1024 whose connections each run one `exec` in the workload's namespaces and root. (A
//! template's agent makes the listener before it has a workload and waits for its `start` on
//! it, see [`crate::template`]; this server then takes the listener over.)
//! Everything runs in the agent's one thread, inside the loop that forwards the workload's
//! output ([`crate::supervise::forward_serving`]), so forking stays safe; every descriptor of a
//! session is non-blocking, so a host that stops reading, or a process that keeps its output
//! open, holds up only its own session. A session's output waits in a buffer of at most
//! [`MAX_PENDING`] bytes, after which its process's output is not read until the host takes
//! some: the process blocks, not the agent.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use twinbox_agent::control::{frame, merge_env, take_frame, ExecRequest, CONTROL_PORT, FRAME_ERROR, FRAME_EXIT};
use twinbox_agent::control::{FRAME_RESIZE, FRAME_STDERR, FRAME_STDIN, FRAME_STDOUT, MAX_REQUEST};
use twinbox_agent::GuestConfig;

use crate::setup::ROOT;
use crate::sys;
use crate::workload::{become_process, cstrings, ChildFailure, Stdio, Step};

/// Output (to the host) or input (to the process) a session holds before it stops reading more.
const MAX_PENDING: usize = 256 * 1024;

/// The answer to a `start` once the workload runs.
pub const ALREADY_STARTED: &str = "this VM already runs its workload";

/// A running process of a session.
struct Process {
    /// The agent's child that waits for the process and exits with its status.
    pid: libc::pid_t,
    /// Readable once `pid` has ended; None once reaped.
    pidfd: Option<OwnedFd>,
    /// Its output (with a terminal: the pty master, in `out` only), until end of file.
    out: Option<File>,
    err: Option<File>,
    /// Where what the host sends for its input goes (a pipe, or the pty master).
    input: Option<File>,
    /// Input not written yet, and whether the host ended it.
    pending_input: Vec<u8>,
    input_ended: bool,
    /// With a terminal: the master, for resizes.
    master: Option<File>,
    /// Its exit code, once known.
    code: Option<i32>,
}

enum State {
    /// Reading the request line.
    Request,
    Running(Box<Process>),
}

struct Session {
    conn: File,
    /// False once the host went away: output is still drained, not sent.
    connected: bool,
    /// Bytes from the host not parsed yet (the request line, then frames).
    received: Vec<u8>,
    /// Frames not sent yet.
    outgoing: Vec<u8>,
    /// The exit frame is queued: the session ends once `outgoing` is sent.
    finished: bool,
    state: State,
}

impl Session {
    fn send(&mut self, kind: u8, payload: &[u8]) {
        if self.connected {
            self.outgoing.extend_from_slice(&frame(kind, payload));
        }
    }

    fn finish(&mut self, code: i32) {
        self.send(FRAME_EXIT, &code.to_le_bytes());
        self.finished = true;
    }

    /// Sends what the connection takes now.
    fn flush(&mut self) {
        while self.connected && !self.outgoing.is_empty() {
            match self.conn.write(&self.outgoing) {
                Ok(0) => self.connected = false,
                Ok(n) => drop(self.outgoing.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.connected = false,
            }
        }
        if !self.connected {
            self.outgoing.clear();
        }
    }

    fn done(&self) -> bool {
        self.finished && self.outgoing.is_empty()
    }
}

/// The listener and its sessions.
pub struct Control<'a> {
    listener: Option<OwnedFd>,
    /// accept failed for want of descriptors: not polled until a session ends.
    listener_paused: bool,
    config: &'a GuestConfig,
    workload: libc::pid_t,
    /// Readable once the workload has ended.
    workload_fd: Option<OwnedFd>,
    sessions: Vec<Session>,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A vsock stream socket listening on `port` of any CID; its connections are accepted
/// blocking, the server makes each non-blocking itself.
pub fn listen(port: u32) -> io::Result<OwnedFd> {
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

/// One poll entry for `fd`.
fn entry(fd: libc::c_int, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

impl<'a> Control<'a> {
    /// Listens for exec requests for `workload`, run as `config` says; without a vsock device
    /// (a VM made without one) there is no listener and nothing to serve.
    pub fn new(config: &'a GuestConfig, workload: libc::pid_t) -> Self {
        Self::with_listener(listen(CONTROL_PORT).ok(), config, workload)
    }

    /// [`new`](Self::new) on a listener made before (a template's, on [`CONTROL_PORT`]);
    /// None serves nothing.
    pub fn with_listener(listener: Option<OwnedFd>, config: &'a GuestConfig, workload: libc::pid_t) -> Self {
        let workload_fd = listener.as_ref().and_then(|_| sys::pidfd_open(workload).ok());
        Control { listener, listener_paused: false, config, workload, workload_fd, sessions: Vec::new() }
    }

    /// Whether a listener is up.
    pub fn listening(&self) -> bool {
        self.listener.is_some()
    }

    /// Whether the workload still runs (while it does, requests are served even once its
    /// output is closed).
    pub fn workload_runs(&self) -> bool {
        self.workload_fd.is_some()
    }

    /// What to poll: the workload, the listener, and each session's connection, output and
    /// input as far as it can move now.
    pub fn poll_fds(&self) -> Vec<libc::pollfd> {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        fds.extend(self.workload_fd.iter().map(|f| entry(f.as_raw_fd(), libc::POLLIN)));
        fds.extend(self.listener.iter().filter(|_| !self.listener_paused).map(|l| entry(l.as_raw_fd(), libc::POLLIN)));
        for s in &self.sessions {
            let mut events = 0;
            let reading_input = match &s.state {
                State::Request => true,
                // Input, resizes, or the host hanging up.
                State::Running(p) => p.pending_input.len() < MAX_PENDING,
            };
            if s.connected && !s.finished && reading_input {
                events |= libc::POLLIN;
            }
            if s.connected && !s.outgoing.is_empty() {
                events |= libc::POLLOUT;
            }
            if events != 0 {
                fds.push(entry(s.conn.as_raw_fd(), events));
            }
            let State::Running(p) = &s.state else { continue };
            if s.outgoing.len() < MAX_PENDING {
                fds.extend(p.out.iter().chain(p.err.iter()).map(|f| entry(f.as_raw_fd(), libc::POLLIN)));
            }
            if let Some(input) = p.input.as_ref().filter(|_| !p.pending_input.is_empty() || p.input_ended) {
                fds.push(entry(input.as_raw_fd(), libc::POLLOUT));
            }
            fds.extend(p.pidfd.iter().map(|f| entry(f.as_raw_fd(), libc::POLLIN)));
        }
        fds
    }

    /// Handles what `poll` reported on [`poll_fds`](Self::poll_fds)'s descriptors.
    pub fn service(&mut self, fds: &[libc::pollfd]) {
        let ready = |fd: libc::c_int| fds.iter().any(|p| p.fd == fd && p.revents != 0);
        // Readable, or hung up: worth a read (a connection polled only for POLLOUT is not).
        let readable = |fd: libc::c_int| {
            fds.iter().any(|p| p.fd == fd && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
        };
        if self.workload_fd.as_ref().is_some_and(|f| ready(f.as_raw_fd())) {
            self.workload_fd = None;
        }
        if let Some(l) = self.listener.as_ref().filter(|_| !self.listener_paused) {
            if ready(l.as_raw_fd()) {
                // SAFETY: accept4 with null address pointers writes no memory.
                let fd = unsafe {
                    libc::accept4(
                        l.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    )
                };
                let err = std::io::Error::last_os_error().raw_os_error();
                if fd < 0 && matches!(err, Some(libc::EMFILE | libc::ENFILE)) {
                    // Out of descriptors: the listener stays readable, and polling it would
                    // spin; it rests until a session ends.
                    self.listener_paused = true;
                }
                if fd >= 0 {
                    // SAFETY: `fd` was just returned by accept4 and nothing else owns it.
                    let conn = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                    self.sessions.push(Session {
                        conn,
                        connected: true,
                        received: Vec::new(),
                        outgoing: Vec::new(),
                        finished: false,
                        state: State::Request,
                    });
                }
            }
        }
        let (config, workload) = (self.config, self.workload);
        let before = self.sessions.len();
        self.sessions.retain_mut(|s| {
            step(s, config, workload, &ready, &readable);
            s.flush();
            !s.done()
        });
        if self.sessions.len() < before {
            self.listener_paused = false;
        }
    }
}

/// Moves session `s` on as far as its ready descriptors allow.
fn step(
    s: &mut Session,
    config: &GuestConfig,
    workload: libc::pid_t,
    ready: &dyn Fn(libc::c_int) -> bool,
    readable: &dyn Fn(libc::c_int) -> bool,
) {
    let taking_input = match &s.state {
        State::Request => true,
        State::Running(p) => p.pending_input.len() < MAX_PENDING,
    };
    if s.connected && !s.finished && taking_input && readable(s.conn.as_raw_fd()) {
        let mut buf = [0u8; 16 * 1024];
        match s.conn.read(&mut buf) {
            Ok(0) => hang_up(s),
            Ok(n) => s.received.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(_) => hang_up(s),
        }
    }
    if matches!(s.state, State::Request) {
        let Some(end) = s.received.iter().position(|b| *b == b'\n') else {
            if s.received.len() > MAX_REQUEST || !s.connected {
                s.finished = true;
            }
            return;
        };
        let line: Vec<u8> = s.received.drain(..=end).collect();
        match serde_json::from_slice::<ExecRequest>(&line[..end]) {
            Err(e) => fail(s, &format!("bad exec request: {e}"), 125),
            Ok(ExecRequest { start: Some(_), .. }) => fail(s, ALREADY_STARTED, 1),
            Ok(ExecRequest { signal: Some(sig), .. }) => {
                // SAFETY: kill takes no pointers.
                match check(unsafe { libc::kill(workload, sig) }) {
                    Ok(_) => s.finish(0),
                    Err(e) => fail(s, &format!("cannot send signal {sig}: {}", sys::errno_text(&e)), 1),
                }
            }
            Ok(ExecRequest { hosts: Some(text), .. }) => {
                // In place: the workload's mount namespace sees the same file.
                let path = format!("{ROOT}/etc/hosts");
                // Not through a link the workload made, and never waiting on a FIFO it put
                // there: only a regular file is rewritten.
                let written = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&path)
                    .and_then(|mut f| {
                        if !f.metadata()?.is_file() {
                            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
                        }
                        f.set_len(0)?;
                        f.write_all(text.as_bytes())
                    });
                match written {
                    Ok(()) => s.finish(0),
                    Err(e) => fail(s, &format!("cannot rewrite {path}: {}", sys::errno_text(&e)), 1),
                }
            }
            Ok(request) => match start(&request, config, workload) {
                Ok(p) => s.state = State::Running(Box::new(p)),
                Err((message, code)) => fail(s, &message, code),
            },
        }
    }
    let State::Running(p) = &mut s.state else { return };
    // What the host sent: input and resizes.
    loop {
        match take_frame(&mut s.received) {
            Ok(Some((FRAME_STDIN, bytes))) if bytes.is_empty() => p.input_ended = true,
            Ok(Some((FRAME_STDIN, bytes))) => {
                if p.input.is_some() && !p.input_ended {
                    p.pending_input.extend_from_slice(&bytes);
                }
            }
            Ok(Some((FRAME_RESIZE, size))) if size.len() == 4 => {
                if let Some(master) = &p.master {
                    let _ = sys::set_window_size(
                        master,
                        u16::from_le_bytes([size[0], size[1]]),
                        u16::from_le_bytes([size[2], size[3]]),
                    );
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                hang_up(s);
                break;
            }
        }
    }
    let State::Running(p) = &mut s.state else { return };
    if let Some(input) = &mut p.input {
        if ready(input.as_raw_fd()) || !p.pending_input.is_empty() {
            match input.write(&p.pending_input) {
                Ok(n) => drop(p.pending_input.drain(..n)),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                // The process closed its input: what the host sends is dropped.
                Err(_) => {
                    p.pending_input.clear();
                    p.input_ended = true;
                }
            }
        }
        // A pipe closes; a terminal gets end-of-file as its line discipline's EOF character.
        if p.input_ended && p.pending_input.is_empty() {
            if p.master.is_some() {
                let _ = input.write(&[4]);
            }
            p.input = None;
        }
    }
    let mut chunks = Vec::new();
    if s.outgoing.len() < MAX_PENDING {
        for (pipe, kind) in [(&mut p.out, FRAME_STDOUT), (&mut p.err, FRAME_STDERR)] {
            let Some(f) = pipe else { continue };
            if !ready(f.as_raw_fd()) {
                continue;
            }
            let mut buf = vec![0u8; 16 * 1024];
            match f.read(&mut buf) {
                Ok(n) if n > 0 => chunks.push((kind, buf[..n].to_vec())),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                // End of file; for a pty master EIO once no slave is open.
                _ => *pipe = None,
            }
        }
    }
    if p.pidfd.as_ref().is_some_and(|f| ready(f.as_raw_fd())) {
        if let Ok(Some(status)) = sys::try_wait_pid(p.pid) {
            p.code = Some(twinbox_agent::exit_code(status).unwrap_or(125));
            p.pidfd = None;
        }
    }
    // With a terminal the process may end while a child of its keeps the slave open: its
    // exit ends the session, as `docker exec -t` does, once what it wrote is read.
    if p.code.is_some() && p.master.is_some() {
        if let Some(f) = &mut p.out {
            let mut buf = vec![0u8; 16 * 1024];
            let mut drained = 0;
            while drained < MAX_PENDING {
                match f.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        chunks.push((FRAME_STDOUT, buf[..n].to_vec()));
                        drained += n;
                    }
                    _ => break,
                }
            }
        }
        p.out = None;
    }
    let over = p.code.is_some() && p.out.is_none() && p.err.is_none();
    let code = p.code.unwrap_or(125);
    for (kind, bytes) in chunks {
        s.send(kind, &bytes);
    }
    if over {
        s.finish(code);
    }
}

/// The host went away: the process's input ends, its output is drained and dropped.
fn hang_up(s: &mut Session) {
    s.connected = false;
    s.outgoing.clear();
    match &mut s.state {
        State::Request => s.finished = true,
        State::Running(p) => p.input_ended = true,
    }
}

fn fail(s: &mut Session, message: &str, code: i32) {
    s.send(FRAME_ERROR, message.as_bytes());
    s.finish(code);
}

/// Starts `req` in the workload's namespaces: a child that joins its mount namespace and root
/// and its pid namespace, and forks the process there (a process joins a pid namespace only
/// through a fork), then waits for it and exits with its status. Returns the child and the
/// process's streams, or the message and exit code of why it could not start.
fn start(req: &ExecRequest, config: &GuestConfig, workload: libc::pid_t) -> Result<Process, (String, i32)> {
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
        additional_gids: match (&req.groups, req.uid) {
            (Some(groups), _) => groups.clone(),
            (None, Some(_)) => Vec::new(),
            (None, None) => config.additional_gids.clone(),
        },
        ..config.clone()
    };
    let argv = cstrings(&exec.args).map_err(|e| (e.to_string(), 125))?;
    let envp = cstrings(&exec.env).map_err(|e| (e.to_string(), 125))?;
    let ns = |kind: &str| File::open(format!("/proc/{workload}/ns/{kind}"));
    let mnt = ns("mnt").map_err(|e| setup("find the workload's mount namespace", e))?;
    let pidns = ns("pid").map_err(|e| setup("find the workload's pid namespace", e))?;
    let nonblocking = |f: File| sys::set_nonblocking(&f).map(|()| f).map_err(|e| setup("set up a pipe", e));
    let (streams, mut process) = if req.tty {
        // The workload's own devpts instance, so that the process sees its terminal as
        // /dev/pts/N of its root.
        let (master, number) =
            sys::open_pty(&format!("{ROOT}/dev/pts/ptmx")).map_err(|e| setup("open a terminal", e))?;
        if let Some((rows, cols)) = req.size {
            let _ = sys::set_window_size(&master, rows, cols);
        }
        let dup = |f: &File| f.try_clone().map_err(|e| setup("set up a terminal", e));
        let input = if req.stdin { Some(dup(&master)?) } else { None };
        let process = Process::new(Some(dup(&master)?), None, input, Some(master));
        (ChildStdio::Terminal(number), process)
    } else {
        let (out_r, out_w) = sys::pipe().map_err(|e| setup("make a pipe", e))?;
        let (err_r, err_w) = sys::pipe().map_err(|e| setup("make a pipe", e))?;
        let (input, stdin) = if req.stdin {
            let (in_r, in_w) = sys::pipe().map_err(|e| setup("make a pipe", e))?;
            (Some(nonblocking(File::from(in_w))?), Some(OwnedFd::from(in_r)))
        } else {
            (None, None)
        };
        let process = Process::new(Some(nonblocking(out_r)?), Some(nonblocking(err_r)?), input, None);
        (ChildStdio::Pipes { stdin, out: out_w, err: err_w }, process)
    };
    let (mut report_r, report_w) = sys::pipe().map_err(|e| setup("make a pipe", e))?;
    let child = ExecChild { exec: &exec, argv, envp, mnt, pidns, stdio: streams, report: File::from(report_w) };
    let Some(pid) = sys::fork().map_err(|e| setup("fork", e))? else { child.run() };
    drop(child);
    // Until the process execs (the pipe is close-on-exec) or reports why it could not.
    let mut report = Vec::new();
    let _ = report_r.read_to_end(&mut report);
    if let Some(failure) = ChildFailure::decode(&report) {
        let _ = sys::wait_pid(pid);
        return Err((failure.message(&exec), failure.exit_code()));
    }
    process.pid = pid;
    match sys::pidfd_open(pid) {
        Ok(fd) => process.pidfd = Some(fd),
        Err(e) => {
            // SAFETY: kill takes no pointers; `pid` is our child, not reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = sys::wait_pid(pid);
            return Err(setup("watch the process", e));
        }
    }
    Ok(process)
}

impl Process {
    fn new(out: Option<File>, err: Option<File>, input: Option<File>, master: Option<File>) -> Self {
        Process {
            pid: 0,
            pidfd: None,
            out,
            err,
            input,
            pending_input: Vec::new(),
            input_ended: false,
            master,
            code: None,
        }
    }
}

/// The streams the exec's process gets.
enum ChildStdio {
    Pipes {
        stdin: Option<OwnedFd>,
        out: OwnedFd,
        err: OwnedFd,
    },
    /// The number of the pty (in the workload's devpts) whose slave the process opens, once
    /// in the workload's root, so that its terminal is `/dev/pts/N` there (ttyname works).
    Terminal(u32),
}

/// What the exec's child needs, made before the fork.
struct ExecChild<'a> {
    exec: &'a GuestConfig,
    argv: Vec<CString>,
    envp: Vec<CString>,
    mnt: File,
    pidns: File,
    stdio: ChildStdio,
    report: File,
}

impl ExecChild<'_> {
    /// In the forked child: join the workload, fork the process, wait for it. Never returns.
    fn run(mut self) -> ! {
        // Only what this child needs: the other sessions' descriptors (their processes' input
        // above all, which must close when the agent closes it) stay with the agent.
        let mut keep = vec![self.mnt.as_raw_fd(), self.pidns.as_raw_fd(), self.report.as_raw_fd()];
        match &self.stdio {
            ChildStdio::Pipes { stdin, out, err } => {
                keep.extend(stdin.iter().map(|f| f.as_raw_fd()));
                keep.extend([out.as_raw_fd(), err.as_raw_fd()]);
            }
            ChildStdio::Terminal(_) => {}
        }
        sys::close_all_but(&keep);
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
                // Only the process keeps its streams and the report open.
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
        match &self.stdio {
            ChildStdio::Pipes { stdin, out, err } => {
                become_process(self.exec, Stdio::Pipes { stdin: stdin.as_ref(), stdout: out, stderr: err })
            }
            ChildStdio::Terminal(number) => {
                let slave = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NOCTTY)
                    .open(format!("/dev/pts/{number}"))
                    .map_err(ChildFailure::at(Step::Stdio))?;
                become_process(self.exec, Stdio::Terminal(&OwnedFd::from(slave)))
            }
        }
    }
}

fn setns(ns: &File, kind: libc::c_int) -> io::Result<()> {
    // SAFETY: setns takes a descriptor and a flag, no pointers.
    check(unsafe { libc::setns(ns.as_raw_fd(), kind) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};
    use twinbox_agent::control::read_frame;

    /// The server on a UNIX listener (accepted as a vsock one is), for a workload that is a
    /// `sleep`: a `start` is refused, the workload having started long ago.
    #[test]
    fn a_start_is_refused_once_the_workload_runs() {
        let dir = std::env::temp_dir().join(format!("twinbox-agent-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let _ = std::fs::remove_file(&path);
        let listener = OwnedFd::from(UnixListener::bind(&path).unwrap());
        let mut workload = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let config = GuestConfig { args: vec!["sleep".into()], ..GuestConfig::default() };
        let mut control = Control::with_listener(Some(listener), &config, workload.id() as libc::pid_t);
        assert!(control.listening() && control.workload_runs());
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"{\"start\":{\"config\":{\"args\":[\"/x\"]},\"entropy\":[1],\"realtime_ns\":1}}\n").unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        // Accept, read and answer: a few rounds, each waiting at most a second.
        let mut accepted = false;
        for _ in 0..10 {
            let mut fds = control.poll_fds();
            // SAFETY: poll reads and writes `fds.len()` entries of a live vector.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
            control.service(&fds);
            accepted |= !control.sessions.is_empty();
            if accepted && control.sessions.is_empty() {
                break;
            }
        }
        let _ = workload.kill();
        let _ = workload.wait();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read_frame(&mut host).unwrap(), Some((FRAME_ERROR, ALREADY_STARTED.as_bytes().to_vec())));
        assert_eq!(read_frame(&mut host).unwrap(), Some((FRAME_EXIT, 1i32.to_le_bytes().to_vec())));
        assert_eq!(read_frame(&mut host).unwrap(), None);
    }
}

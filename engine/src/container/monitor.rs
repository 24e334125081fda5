//! The program that watches detached containers: `engine/monitor`, built by engine/build.rs
//! into a freestanding static executable of a few KiB and embedded here. It is installed into
//! the store (`<store>/bin/twinbox-monitor-<hash>`, written once per build of it) and runs once
//! per store while the store has detached containers, listening on `<store>/monitor.sock`; see
//! `engine/monitor/src/main.rs` for what it does, its protocol, and why it is that small.
//!
//! This side of it: [`launch`] (start a launcher below the monitor, starting the monitor first
//! when none runs) and [`watch`] (ask it to run a command once a process has ended).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::sys::socket::{self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr};

use super::{io_err, EngineError};

/// The monitor executable.
pub const PROGRAM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/twinbox-monitor"));

/// The file name it is installed under: `twinbox-monitor-HASH`, its content's FNV-1a hash
/// (made by engine/build.rs), so a twinbox with another monitor never runs a stale one, and
/// concurrent installs write the same bytes.
pub fn file_name() -> String {
    env!("TWINBOX_MONITOR_FILE").to_owned()
}

/// The installed monitor under `dir` (made when missing), written atomically when it is not
/// there yet; older monitors in `dir` are removed (running
/// ones keep their executable).
pub fn install(dir: &Path) -> Result<PathBuf, EngineError> {
    install_program(dir, env!("TWINBOX_MONITOR_FILE"), PROGRAM, "install the container monitor at")
}

/// `program` installed under `dir` as `name` (`PREFIX-HASH`, see engine/build.rs), written
/// atomically when it is not there yet; older builds of it in `dir` (the same prefix, another
/// hash) are removed (running ones keep their executable).
pub(crate) fn install_program(
    dir: &Path,
    name: &str,
    program: &[u8],
    op: &'static str,
) -> Result<PathBuf, EngineError> {
    let path = dir.join(name);
    if fs::metadata(&path).is_ok_and(|m| m.len() == program.len() as u64) {
        return Ok(path);
    }
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    twinbox_image::atomic::write(&path, program, 0o755, true).map_err(|source| EngineError::Io {
        op,
        path: path.clone(),
        source,
    })?;
    let older = name.rsplit_once('-').map_or(name, |(prefix, _)| prefix).to_owned() + "-";
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&older) && n != name && n.len() == name.len() {
            let _ = fs::remove_file(e.path());
        }
    }
    Ok(path)
}

/// The monitor's socket and lock in the store's root, named after this build of it: a twinbox
/// with another monitor starts its own beside one still running, instead of talking to it in
/// a protocol it may not share (the old one leaves once its containers are gone).
fn socket_name() -> String {
    format!("{}.sock", file_name())
}

fn lock_name() -> String {
    format!("{}.lock", file_name())
}

/// Environment variables a launcher and an exit command get from the command that asked for
/// them: the search path, logging, and twinbox's own settings. Nothing else, so a request
/// stays small.
pub fn environment() -> Vec<OsString> {
    std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.as_bytes();
            k == b"PATH" || k.starts_with(b"TWINBOX_") || k.starts_with(b"RUST_")
        })
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            kv
        })
        .collect()
}

/// Runs `argv` (with `env`, `stdio` as its descriptors 0, 1, 2, in a session of its own) as a
/// child of the store's monitor, starting the monitor (`program`, see [`install`]) first when
/// none runs. Returns once it was started; what it reports comes through `stdio`.
pub fn launch(
    root: &Path,
    program: &Path,
    argv: &[OsString],
    env: &[OsString],
    stdio: [BorrowedFd<'_>; 3],
) -> Result<(), EngineError> {
    let conn = connect_or_start(root, program)?;
    let mut message = vec![b'R'];
    encode(&mut message, argv, env);
    request(root, &conn, &message, &stdio.map(|fd| fd.as_raw_fd()))
}

/// Asks the store's monitor to run `argv` (with `env`), the exit code appended, once its child
/// `pid` has ended. `pid` must be a child of the caller, which must itself be a child of the
/// monitor (a launcher): when the caller exits, `pid` becomes the monitor's.
pub fn watch(root: &Path, pid: i32, argv: &[OsString], env: &[OsString]) -> Result<(), EngineError> {
    let conn = connect(root).map_err(io_err("connect to the container monitor at", socket_path(root)))?;
    let mut message = vec![b'W'];
    message.extend_from_slice(&pid.to_le_bytes());
    encode(&mut message, argv, env);
    request(root, &conn, &message, &[])
}

/// ARGV and ENV as the monitor reads them: NUL-terminated strings, an empty one between.
fn encode(out: &mut Vec<u8>, argv: &[OsString], env: &[OsString]) {
    for s in argv.iter().chain([OsString::new()].iter()).chain(env) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
}

fn socket_path(root: &Path) -> PathBuf {
    root.join(socket_name())
}

/// One request, its descriptors, and the monitor's answer: `ok` or what went wrong.
fn request(root: &Path, conn: &OwnedFd, message: &[u8], fds: &[i32]) -> Result<(), EngineError> {
    let sys = |what| move |e| EngineError::Sys(what, e);
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs = if fds.is_empty() { &rights[..0] } else { &rights[..] };
    socket::sendmsg::<()>(conn.as_raw_fd(), &[io::IoSlice::new(message)], cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(sys("send a request to the container monitor"))?;
    let timeout = nix::sys::time::TimeVal::new(10, 0);
    socket::setsockopt(conn, socket::sockopt::ReceiveTimeout, &timeout)
        .map_err(sys("set a timeout on the monitor's socket"))?;
    let mut answer = [0u8; 256];
    let n = socket::recv(conn.as_raw_fd(), &mut answer, MsgFlags::empty())
        .map_err(sys("read the container monitor's answer"))?;
    match &answer[..n] {
        b"ok" => Ok(()),
        [] => {
            Err(EngineError::Monitor(format!("the container monitor of {} gave no answer (it ended)", root.display())))
        }
        other => Err(EngineError::Monitor(format!("the container monitor: {}", String::from_utf8_lossy(other)))),
    }
}

/// Whether a monitor of this build runs for the store at `root` (it takes connections).
pub fn running(root: &Path) -> bool {
    connect(root).is_ok()
}

/// A connection to the store's monitor.
fn connect(root: &Path) -> io::Result<OwnedFd> {
    let conn = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
    with_address(&socket_path(root), |addr| socket::connect(conn.as_raw_fd(), addr))?;
    Ok(conn)
}

/// `f` with the address of the socket at `path`; through /proc/self/fd when the path is longer
/// than a socket address holds.
fn with_address<T>(path: &Path, f: impl FnOnce(&UnixAddr) -> nix::Result<T>) -> io::Result<T> {
    if let Ok(addr) = UnixAddr::new(path) {
        return f(&addr).map_err(io::Error::from);
    }
    let (dir, name) = (path.parent().unwrap_or(Path::new("/")), path.file_name().unwrap_or(OsStr::new("monitor.sock")));
    let dir = fs::File::open(dir)?;
    let short = Path::new("/proc/self/fd").join(dir.as_raw_fd().to_string()).join(name);
    let addr = UnixAddr::new(&short).map_err(io::Error::from)?;
    f(&addr).map_err(io::Error::from)
}

/// A connection to the store's monitor, started first when none runs. Under `<store>/monitor.lock`,
/// which the monitor takes before it exits, so it never goes away under a new connection.
fn connect_or_start(root: &Path, program: &Path) -> Result<OwnedFd, EngineError> {
    let lock_path = root.join(lock_name());
    let open_lock = || {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))
    };
    let _lock = nix::fcntl::Flock::lock(open_lock()?, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| EngineError::Sys("lock the container monitor's lock file", e))?;
    let path = socket_path(root);
    match connect(root) {
        Ok(conn) => return Ok(conn),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENOENT)) => {}
        Err(e) => return Err(io_err("connect to the container monitor at", &path)(e)),
    }
    // None runs (a socket left by one that was killed is refused): listen, and start one on it.
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("remove the stale socket", &path)(e)),
        _ => {}
    }
    let listener = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| EngineError::Sys("make the container monitor's socket", e))?;
    with_address(&path, |addr| socket::bind(listener.as_raw_fd(), addr)).map_err(io_err("bind", &path))?;
    let started = (|| {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io_err("restrict", &path))?;
        socket::listen(&listener, socket::Backlog::new(128).unwrap_or(socket::Backlog::MAXCONN))
            .map_err(|e| EngineError::Sys("listen on the container monitor's socket", e))?;
        // Its own open file description of the lock: a copy of ours would hold our lock.
        start(program, listener.as_fd(), open_lock()?.as_fd())
            .map_err(io_err("start the container monitor", program))?;
        connect(root).map_err(io_err("connect to the container monitor at", &path))
    })();
    if started.is_err() {
        let _ = fs::remove_file(&path);
    }
    started
}

/// Starts `program serve` with `listener` as descriptor 3 and `lock` as 4 (see
/// [`spawn_orphan`]). With no environment: the monitor reads none (its launchers and exit
/// commands get theirs in each request), and the kernel would copy ours onto its stack,
/// where it would stay in memory as long as the monitor runs.
fn start(program: &Path, listener: BorrowedFd<'_>, lock: BorrowedFd<'_>) -> io::Result<()> {
    let mut cmd = std::process::Command::new(program);
    cmd.arg("serve").current_dir("/").env_clear();
    spawn_orphan(cmd, &[listener.as_raw_fd(), lock.as_raw_fd()])
}

/// The most descriptors [`spawn_orphan`] hands over.
pub(crate) const MAX_HANDED: usize = 72;

/// Starts `cmd` in a session of its own, stdio on /dev/null, with `fds` as its descriptors
/// 3, 4, …, as nobody's child here: a middle process forks it and exits at once (the store's
/// monitor, a subreaper, or init adopts it). Returns once it has been exec'd.
pub(crate) fn spawn_orphan(mut cmd: std::process::Command, fds: &[i32]) -> io::Result<()> {
    if fds.len() > MAX_HANDED {
        return Err(io::Error::other(format!("{} descriptors to hand over; at most {MAX_HANDED}", fds.len())));
    }
    // A fixed array: the child must not allocate between fork and exec.
    let mut given = [-1i32; MAX_HANDED];
    given[..fds.len()].copy_from_slice(fds);
    let count = fds.len();
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    // SAFETY: between fork and exec the child only calls async-signal-safe functions (setsid,
    // fork, fcntl, dup2, _exit) on descriptors it owns, and allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            libc::setsid();
            match libc::fork() {
                -1 => return Err(io::Error::last_os_error()),
                0 => {}
                _ => libc::_exit(0),
            }
            // Out of the way first, in case one is already 3, 4, …
            let mut high = [-1i32; MAX_HANDED];
            for i in 0..count {
                high[i] = libc::fcntl(given[i], libc::F_DUPFD_CLOEXEC, 100);
                if high[i] < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (i, &fd) in high.iter().enumerate().take(count) {
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    // The middle process; the child's exec (or its failure) is what spawn waits for.
    let status = cmd.spawn()?.wait()?;
    if !status.success() {
        return Err(io::Error::other(format!("its starter ended with {status}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_embedded_monitor_is_a_small_static_executable() {
        assert_eq!(&PROGRAM[..4], b"\x7fELF");
        assert!(PROGRAM.len() < 64 * 1024, "{} bytes", PROGRAM.len());
        assert!(file_name().starts_with("twinbox-monitor-") && file_name().len() == 32, "{}", file_name());
    }

    #[test]
    fn install_writes_once_and_replaces_older_builds() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir_all(&bin).unwrap();
        fs::write(bin.join("twinbox-monitor-0000000000000000"), b"old").unwrap();
        fs::write(bin.join("keep"), b"other").unwrap();
        let p = install(&bin).unwrap();
        assert_eq!(fs::read(&p).unwrap(), PROGRAM);
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o755);
        assert!(!bin.join("twinbox-monitor-0000000000000000").exists());
        assert!(bin.join("keep").exists());
        let mtime = fs::metadata(&p).unwrap().modified().unwrap();
        assert_eq!(install(&bin).unwrap(), p);
        assert_eq!(fs::metadata(&p).unwrap().modified().unwrap(), mtime, "not written again");
        let names: Vec<_> = fs::read_dir(&bin).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temp file left: {names:?}");
    }

    fn sh(script: &str, args: &[&str]) -> Vec<OsString> {
        ["/bin/sh", "-c", script].iter().chain(args).map(OsString::from).collect()
    }

    /// Launches `script` below the store's monitor (starting it when none runs), its stdout
    /// read to the end.
    fn launch_sh(root: &Path, program: &Path, script: &str) -> String {
        let (mut rd, wr) = io::pipe().unwrap();
        let null = fs::File::open("/dev/null").unwrap();
        launch(root, program, &sh(script, &[]), &[], [null.as_fd(), wr.as_fd(), null.as_fd()]).unwrap();
        drop(wr);
        let mut out = String::new();
        io::Read::read_to_string(&mut rd, &mut out).unwrap();
        out
    }

    fn ppid(pid: i32) -> Option<i32> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
    }

    /// `pid`'s parent once it is a running `program` (the launcher that made it may still be
    /// ending when its output closes).
    fn monitor_of(pid: i32, program: &Path) -> i32 {
        let mut found = None;
        eventually("the process is the monitor's", || {
            found = ppid(pid).filter(|p| fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == program));
            found.is_some()
        });
        found.unwrap()
    }

    /// Gone, or a zombie waiting for init.
    fn ended(pid: i32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
            .unwrap_or(true)
    }

    /// Kills the processes a test left, should it fail half way.
    struct Reap(Vec<i32>);

    impl Drop for Reap {
        fn drop(&mut self) {
            for &pid in &self.0 {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !check() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// One monitor for the store: what its launchers leave behind becomes its child, the
    /// command of a watched process runs with its exit code, and it leaves once idle.
    #[test]
    fn one_monitor_adopts_watches_and_leaves_when_idle() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let program = install(&root.join("bin")).unwrap();
        let fifo = root.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let out = root.join("out");
        let record = format!("echo \"$@\" > {}", out.display());

        // A launcher that leaves a child (which waits for the FIFO, then exits 7) and exits.
        let first: i32 =
            launch_sh(root, &program, &format!("(read x < {}; exit 7) >/dev/null & echo $!", fifo.display()))
                .trim()
                .parse()
                .unwrap();
        let mut reap = Reap(vec![first]);
        let monitor = monitor_of(first, &program);
        watch(root, first, &sh(&record, &["sh", "id1"]), &[]).unwrap();
        let second: i32 = launch_sh(root, &program, "sleep 30 >/dev/null & echo $!").trim().parse().unwrap();
        reap.0.push(second);
        assert_eq!(monitor_of(second, &program), monitor);
        watch(root, second, &sh(&record, &["sh", "id2"]), &[]).unwrap();

        fs::write(&fifo, "go\n").unwrap();
        eventually("the first exit is recorded", || fs::read_to_string(&out).is_ok_and(|s| s == "id1 7\n"));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(second), nix::sys::signal::Signal::SIGKILL).unwrap();
        eventually("the second exit is recorded", || fs::read_to_string(&out).is_ok_and(|s| s == "id2 137\n"));
        // Nothing left to watch: it goes, and the next request starts another.
        eventually("the idle monitor leaves", || ended(monitor));
        assert_eq!(launch_sh(root, &program, "echo again"), "again\n");
    }

    /// A killed monitor leaves a socket nobody listens on: the next request starts a new
    /// one. Requests it cannot read are refused with the reason.
    #[test]
    fn a_killed_monitor_is_replaced_and_bad_requests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let program = install(&root.join("bin")).unwrap();
        let child: i32 = launch_sh(root, &program, "sleep 30 >/dev/null & echo $!").trim().parse().unwrap();
        let mut reap = Reap(vec![child]);
        let monitor = monitor_of(child, &program);

        let conn = connect(root).unwrap();
        let refused = |message: &[u8], fds: &[i32]| match request(root, &connect(root).unwrap(), message, fds) {
            Err(EngineError::Monitor(m)) => m,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(message)),
        };
        assert!(refused(b"X", &[]).contains("unknown request"));
        assert!(refused(b"R/bin/true\0\0", &[]).contains("three descriptors"));
        assert!(refused(b"W\x01\0\0\0no-terminator", &[]).contains("malformed"));
        let null = fs::File::open("/dev/null").unwrap();
        let three = [null.as_raw_fd(); 3];
        assert!(refused(b"R\0\0", &three).contains("malformed"));
        // A process that is not below the monitor (ours): its end would never reach it.
        let mut ours = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let not_below = watch(root, ours.id() as i32, &sh("true", &[]), &[]);
        assert!(
            matches!(&not_below, Err(EngineError::Monitor(m)) if m.contains("not below this monitor")),
            "{not_below:?}"
        );
        ours.kill().unwrap();
        ours.wait().unwrap();
        drop(conn);

        nix::sys::signal::kill(nix::unistd::Pid::from_raw(monitor), nix::sys::signal::Signal::SIGKILL).unwrap();
        eventually("the monitor is gone", || ended(monitor));
        assert!(socket_path(root).exists(), "a killed monitor leaves its socket");
        let (mut rd, wr) = io::pipe().unwrap();
        launch(root, &program, &["/nonexistent".into()], &[], [null.as_fd(), wr.as_fd(), null.as_fd()]).unwrap();
        drop(wr);
        let mut err = String::new();
        io::Read::read_to_string(&mut rd, &mut err).unwrap();
        assert_eq!(err, "twinbox-monitor: cannot run /nonexistent\n");
        let launched: i32 = launch_sh(root, &program, "sleep 30 >/dev/null & echo $!").trim().parse().unwrap();
        reap.0.push(launched);
        let replacement = monitor_of(launched, &program);
        assert_ne!(replacement, monitor);
        for pid in [child, launched] {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        eventually("the new monitor leaves", || ended(replacement));
    }

    /// The monitor keeps what the commands of its watches share once (see its `Template`):
    /// whatever they share, and in whatever order the processes end, each runs exactly its own
    /// command, with its own environment.
    #[test]
    fn each_watch_runs_its_own_command() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let program = install(&root.join("bin")).unwrap();
        let out = root.join("out");
        const N: usize = 40;
        let pids: Vec<i32> =
            launch_sh(root, &program, &format!("for i in $(seq {N}); do sleep 30 >/dev/null & echo $!; done"))
                .split_whitespace()
                .map(|p| p.parse().unwrap())
                .collect();
        assert_eq!(pids.len(), N);
        let _reap = Reap(pids.clone());
        // The launcher's output closes before its children are handed to the monitor.
        monitor_of(pids[0], &program);
        let mut expected = Vec::new();
        for (i, &pid) in pids.iter().enumerate() {
            // Commands that share much, little (another first argument), or nothing but their
            // end; IDs of several lengths; three environments, one with a long variable of its
            // own (so that the arena takes pages, given back as they end).
            let record = format!("echo \"$0 $* ${{V-none}} ${{#W}}\" >> {}", out.display());
            let first = if i % 7 == 3 { "other" } else { "sh" };
            let mut argv = sh(&record, &[first, &"x".repeat(i % 5 + 1), &format!("id{i}")]);
            if i % 11 == 5 {
                argv[0] = "/bin/../bin/sh".into();
            }
            let env: Vec<OsString> = match i % 3 {
                0 => vec![],
                1 => vec![format!("V=v{i}").into(), format!("W={}", i.to_string().repeat(300)).into()],
                _ => vec!["V=same".into(), "PATH=/usr/bin:/bin".into()],
            };
            watch(root, pid, &argv, &env).unwrap();
            let v = match i % 3 {
                0 => "none".to_string(),
                1 => format!("v{i}"),
                _ => "same".to_string(),
            };
            let code = if i % 2 == 0 { 137 } else { 143 };
            let w = if i % 3 == 1 { i.to_string().len() * 300 } else { 0 };
            expected.push(format!("{first} {} id{i} {code} {v} {w}", "x".repeat(i % 5 + 1)));
        }
        // They end in an order of their own: the template's first users go first.
        let mut order: Vec<usize> = (0..N).collect();
        order.sort_by_key(|&i| (i * 17) % N);
        for (k, &i) in order.iter().enumerate() {
            let signal = if i % 2 == 0 { nix::sys::signal::Signal::SIGKILL } else { nix::sys::signal::Signal::SIGTERM };
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[i]), signal).unwrap();
            if k % 8 == 0 {
                // Some while the others are still watched, some all at once.
                eventually("the exit is recorded", || {
                    fs::read_to_string(&out).is_ok_and(|s| s.lines().count() == k + 1)
                });
            }
        }
        eventually("every exit is recorded", || fs::read_to_string(&out).is_ok_and(|s| s.lines().count() == N));
        let mut got: Vec<String> = fs::read_to_string(&out).unwrap().lines().map(String::from).collect();
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
    }

    #[test]
    fn launchers_get_the_search_path_and_twinbox_settings_only() {
        let env = environment();
        assert!(env.iter().any(|kv| kv.as_bytes().starts_with(b"PATH=")));
        assert!(env.iter().all(|kv| {
            let kv = kv.as_bytes();
            kv.starts_with(b"PATH=") || kv.starts_with(b"TWINBOX_") || kv.starts_with(b"RUST_")
        }));
    }
}

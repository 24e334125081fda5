//! Starting the workload: a child in its own pid and mount namespaces (pid 1 there, like a
//! container's init) that enters the root, becomes the configured user and execs the program,
//! writing the boot-timer byte just before. When it cannot, it sends a `ChildFailure` up a
//! close-on-exec pipe and exits with 125, 126 or 127.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use twinbox_agent::{
    find_program, GuestConfig, LookupError, Probe, BOOT_TIMER_MAGIC, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND,
    EXIT_SETUP_FAILED, STDERR_PORT, STDOUT_PORT,
};

use crate::ports::IoPorts;
use crate::setup::ROOT;
use crate::supervise::Stream;
use crate::sys::{self, PhysPage};

/// The parent could not start the child.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// /dev/mem could not be opened or mapped at the boot timer.
    #[error("cannot map the boot timer through /dev/mem")]
    BootTimer(#[source] io::Error),
    /// A string holds a NUL byte (the configuration's validation prevents it).
    #[error("{0:?} holds a NUL byte")]
    Nul(String),
    /// pipe2 failed.
    #[error("cannot create a pipe")]
    Pipe(#[source] io::Error),
    /// unshare(CLONE_NEWPID) failed.
    #[error("cannot create a pid namespace")]
    PidNamespace(#[source] io::Error),
    /// fork failed.
    #[error("cannot fork the workload")]
    Fork(#[source] io::Error),
    /// The report pipe could not be read.
    #[error("cannot read the workload's start-up report")]
    Report(#[source] io::Error),
}

/// Where in the child's set-up something failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    MountNamespace = 1,
    PrivateMounts,
    Chroot,
    MountProc,
    CreateCwd,
    ReadOnlyRoot,
    RevokePorts,
    Groups,
    Gid,
    Uid,
    Chdir,
    Stdio,
    Signals,
    NotFound,
    NoSuchFile,
    NotExecutable,
    Exec,
}

const STEPS: [Step; 17] = [
    Step::MountNamespace,
    Step::PrivateMounts,
    Step::Chroot,
    Step::MountProc,
    Step::CreateCwd,
    Step::ReadOnlyRoot,
    Step::RevokePorts,
    Step::Groups,
    Step::Gid,
    Step::Uid,
    Step::Chdir,
    Step::Stdio,
    Step::Signals,
    Step::NotFound,
    Step::NoSuchFile,
    Step::NotExecutable,
    Step::Exec,
];

/// What the child reports when it cannot exec: the step and its errno (0 for the lookup
/// steps, which have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildFailure {
    pub step: Step,
    pub errno: i32,
}

impl ChildFailure {
    const LEN: usize = 5;

    pub(crate) fn at(step: Step) -> impl Fn(io::Error) -> ChildFailure {
        move |e| ChildFailure { step, errno: e.raw_os_error().unwrap_or(libc::EIO) }
    }

    pub(crate) fn encode(self) -> [u8; Self::LEN] {
        let e = self.errno.to_le_bytes();
        [self.step as u8, e[0], e[1], e[2], e[3]]
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let [step, e0, e1, e2, e3] = *bytes else { return None };
        let step = *STEPS.iter().find(|s| **s as u8 == step)?;
        Some(ChildFailure { step, errno: i32::from_le_bytes([e0, e1, e2, e3]) })
    }

    /// The status the child exits with: 127 not found, 126 not executable, 125 otherwise.
    pub fn exit_code(self) -> i32 {
        match (self.step, self.errno) {
            (Step::NotFound | Step::NoSuchFile, _) | (Step::Exec, libc::ENOENT) => EXIT_NOT_FOUND,
            (Step::NotExecutable, _) | (Step::Exec, libc::EACCES | libc::ENOEXEC | libc::EISDIR) => EXIT_NOT_EXECUTABLE,
            _ => EXIT_SETUP_FAILED,
        }
    }

    /// The message for the stderr port (without the "twinbox-agent: " prefix).
    pub fn message(self, config: &GuestConfig) -> String {
        let program = config.args.first().map_or("", String::as_str).to_string();
        let errno = sys::errno_text(&io::Error::from_raw_os_error(self.errno));
        let what = match self.step {
            Step::NotFound => return LookupError::NotFound(program).to_string(),
            Step::NoSuchFile => return LookupError::NoSuchFile(program).to_string(),
            Step::NotExecutable => return LookupError::NotExecutable(program).to_string(),
            // Docker's form, with Go's lower-case errno text.
            Step::Exec => return format!("exec: {program:?}: {}", lower_first(&errno)),
            Step::MountNamespace => "create a mount namespace".to_string(),
            Step::PrivateMounts => "make the mounts private".to_string(),
            Step::Chroot => format!("enter the root {ROOT}"),
            Step::MountProc => "mount proc on /proc".to_string(),
            Step::CreateCwd => format!("create the working directory {:?}", config.cwd),
            Step::ReadOnlyRoot => "make the root read-only".to_string(),
            Step::RevokePorts => "give up the I/O ports".to_string(),
            Step::Groups => format!("set the supplementary groups to {:?}", config.additional_gids),
            Step::Gid => format!("set gid {}", config.gid),
            Step::Uid => format!("set uid {}", config.uid),
            Step::Chdir => format!("chdir to {:?}", config.cwd),
            Step::Stdio => "set up stdin, stdout and stderr".to_string(),
            Step::Signals => "reset the signal mask".to_string(),
        };
        format!("cannot {what}: {errno}")
    }
}

fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    chars.next().map(|c| c.to_lowercase().chain(chars).collect()).unwrap_or_default()
}

/// The started workload.
#[derive(Debug)]
pub struct Started {
    /// Its pid (in the agent's namespace).
    pub pid: libc::pid_t,
    /// Its stdout and stderr.
    pub streams: Vec<Stream>,
    /// Why it did not exec, if it did not; it then exits on its own.
    pub failure: Option<ChildFailure>,
}

pub(crate) fn cstrings(strings: &[String]) -> Result<Vec<CString>, SpawnError> {
    strings.iter().map(|s| CString::new(s.as_bytes()).map_err(|_| SpawnError::Nul(s.clone()))).collect()
}

/// What the child needs, made before the fork.
struct Child<'a> {
    config: &'a GuestConfig,
    argv: Vec<CString>,
    envp: Vec<CString>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    report: File,
    boot_timer: PhysPage,
}

/// Maps the boot timer and forks the workload (see the module doc); returns once it exec'd
/// or failed to.
pub fn spawn(config: &GuestConfig) -> Result<Started, SpawnError> {
    let boot_timer = PhysPage::map(twinbox_agent::BOOT_TIMER_ADDR).map_err(SpawnError::BootTimer)?;
    let argv = cstrings(&config.args)?;
    let envp = cstrings(&config.env)?;
    let (stdout_r, stdout) = sys::pipe().map_err(SpawnError::Pipe)?;
    let (stderr_r, stderr) = sys::pipe().map_err(SpawnError::Pipe)?;
    let (mut report_r, report) = sys::pipe().map_err(SpawnError::Pipe)?;
    // The next child is pid 1 of a new pid namespace (the agent itself stays where it is).
    sys::unshare(libc::CLONE_NEWPID).map_err(SpawnError::PidNamespace)?;
    let child = Child { config, argv, envp, stdout, stderr, report: File::from(report), boot_timer };
    let Some(pid) = sys::fork().map_err(SpawnError::Fork)? else { child.run() };
    // Close the child's ends here, so end of file comes when the child's copies go.
    drop(child);
    let mut report = Vec::new();
    report_r.read_to_end(&mut report).map_err(SpawnError::Report)?;
    Ok(Started {
        pid,
        streams: vec![Stream { pipe: stdout_r, port: STDOUT_PORT }, Stream { pipe: stderr_r, port: STDERR_PORT }],
        failure: ChildFailure::decode(&report),
    })
}

/// What `find_program` needs to know of a path, from the workload's point of view.
fn probe(path: &Path) -> Probe {
    match std::fs::metadata(path) {
        Err(_) => Probe::Missing,
        Ok(meta) if !meta.is_file() => Probe::NotExecutable,
        Ok(_) => match CString::new(path.as_os_str().as_encoded_bytes()) {
            Ok(c) if sys::may_execute(&c) => Probe::Executable,
            _ => Probe::NotExecutable,
        },
    }
}

impl Child<'_> {
    /// In the forked child: set up, write the boot-timer byte, exec. Never returns.
    fn run(mut self) -> ! {
        let failure = match self.prepare() {
            Ok(path) => {
                self.boot_timer.write_byte(BOOT_TIMER_MAGIC);
                let err = sys::execve(&path, &self.argv, &self.envp);
                ChildFailure::at(Step::Exec)(err)
            }
            Err(failure) => failure,
        };
        let _ = self.report.write_all(&failure.encode());
        sys::exit_now(failure.exit_code())
    }

    /// Everything up to the exec; the program's path.
    fn prepare(&self) -> Result<CString, ChildFailure> {
        use ChildFailure as F;
        let config = self.config;
        sys::unshare(libc::CLONE_NEWNS).map_err(F::at(Step::MountNamespace))?;
        sys::mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None).map_err(F::at(Step::PrivateMounts))?;
        std::os::unix::fs::chroot(ROOT).map_err(F::at(Step::Chroot))?;
        std::env::set_current_dir("/").map_err(F::at(Step::Chroot))?;
        // This process is pid 1 of the new namespace, so the new proc shows that namespace.
        let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        sys::mount(Some("proc"), "/proc", Some("proc"), proc_flags, None).map_err(F::at(Step::MountProc))?;
        // The usual umask, under which runc creates the working directory.
        sys::umask(0o022);
        std::fs::create_dir_all(&config.cwd).map_err(F::at(Step::CreateCwd))?;
        if config.read_only {
            let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
            sys::mount(None, "/", None, flags, None).map_err(F::at(Step::ReadOnlyRoot))?;
        }
        become_process(config, Stdio::Pipes { stdin: None, stdout: &self.stdout, stderr: &self.stderr })
    }
}

/// The last steps before an exec, in the workload's root, the same for the workload and for an
/// `exec` beside it: no I/O ports, `config`'s groups, user and working directory, the program
/// looked up in its PATH, stdin /dev/null and stdout/stderr `stdout`/`stderr`, signals reset.
/// The program's path.
pub(crate) fn become_process(config: &GuestConfig, stdio: Stdio<'_>) -> Result<CString, ChildFailure> {
    use ChildFailure as F;
    // ioperm is inherited across fork and kept across execve: the process gets none.
    IoPorts::revoke().map_err(F::at(Step::RevokePorts))?;
    sys::setgroups(&config.additional_gids).map_err(F::at(Step::Groups))?;
    sys::setgid(config.gid).map_err(F::at(Step::Gid))?;
    sys::setuid(config.uid).map_err(F::at(Step::Uid))?;
    std::env::set_current_dir(&config.cwd).map_err(F::at(Step::Chdir))?;
    let path = find_program(&config.args[0], &config.env, probe).map_err(|e| {
        let step = match e {
            LookupError::NotFound(_) => Step::NotFound,
            LookupError::NoSuchFile(_) => Step::NoSuchFile,
            LookupError::NotExecutable(_) => Step::NotExecutable,
        };
        ChildFailure { step, errno: 0 }
    })?;
    let path = CString::new(path.into_os_string().into_vec())
        .map_err(|_| ChildFailure { step: Step::Exec, errno: libc::EINVAL })?;
    match stdio {
        Stdio::Pipes { stdin, stdout, stderr } => {
            match stdin {
                Some(fd) => sys::dup2(fd, 0).map_err(F::at(Step::Stdio))?,
                None => {
                    let null = OpenOptions::new().read(true).open("/dev/null").map_err(F::at(Step::Stdio))?;
                    sys::dup2(&null, 0).map_err(F::at(Step::Stdio))?;
                }
            }
            sys::dup2(stdout, 1).map_err(F::at(Step::Stdio))?;
            sys::dup2(stderr, 2).map_err(F::at(Step::Stdio))?;
        }
        Stdio::Terminal(slave) => {
            sys::controlling_terminal(slave).map_err(F::at(Step::Stdio))?;
            for fd in 0..3 {
                sys::dup2(slave, fd).map_err(F::at(Step::Stdio))?;
            }
        }
    }
    sys::reset_signals().map_err(F::at(Step::Signals))?;
    Ok(path)
}

/// The standard streams of a process the agent starts.
#[derive(Clone, Copy)]
pub(crate) enum Stdio<'a> {
    /// Its input (or /dev/null), output and error.
    Pipes { stdin: Option<&'a OwnedFd>, stdout: &'a OwnedFd, stderr: &'a OwnedFd },
    /// A pty's slave, made its controlling terminal in a session of its own.
    Terminal(&'a OwnedFd),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_round_trip_through_the_pipe_encoding() {
        for step in STEPS {
            let failure = ChildFailure { step, errno: libc::EACCES };
            assert_eq!(ChildFailure::decode(&failure.encode()), Some(failure));
        }
        assert_eq!(ChildFailure::decode(&[]), None, "exec'd: the pipe just closed");
        assert_eq!(ChildFailure::decode(&[0, 0, 0, 0, 0]), None);
        assert_eq!(ChildFailure::decode(&[1, 0, 0, 0]), None);
    }

    #[test]
    fn exit_codes_follow_docker() {
        let code = |step, errno| ChildFailure { step, errno }.exit_code();
        assert_eq!(code(Step::NotFound, 0), 127);
        assert_eq!(code(Step::NoSuchFile, 0), 127);
        assert_eq!(code(Step::Exec, libc::ENOENT), 127);
        assert_eq!(code(Step::NotExecutable, 0), 126);
        assert_eq!(code(Step::Exec, libc::EACCES), 126);
        assert_eq!(code(Step::Exec, libc::ENOEXEC), 126);
        assert_eq!(code(Step::Exec, libc::EISDIR), 126);
        assert_eq!(code(Step::Exec, libc::E2BIG), 125);
        assert_eq!(code(Step::Chdir, libc::ENOENT), 125, "a set-up step, not the program");
        assert_eq!(code(Step::Uid, libc::EPERM), 125);
    }

    #[test]
    fn messages_name_the_program_or_the_step() {
        let config = GuestConfig { args: vec!["nope".into()], cwd: "/work".into(), uid: 7, ..Default::default() };
        let msg = |step, errno| ChildFailure { step, errno }.message(&config);
        assert_eq!(msg(Step::NotFound, 0), r#"exec: "nope": executable file not found in $PATH"#);
        assert_eq!(msg(Step::NotExecutable, 0), r#"exec: "nope": permission denied"#);
        assert_eq!(msg(Step::Exec, libc::ENOEXEC), r#"exec: "nope": exec format error"#);
        assert_eq!(msg(Step::Chdir, libc::ENOTDIR), r#"cannot chdir to "/work": Not a directory"#);
        assert_eq!(msg(Step::Uid, libc::EPERM), "cannot set uid 7: Operation not permitted");
    }

    #[test]
    fn probe_tells_executables_from_the_rest() {
        assert_eq!(probe(Path::new("/bin/sh")), Probe::Executable);
        assert_eq!(probe(Path::new("/")), Probe::NotExecutable);
        let plain = std::env::temp_dir().join(format!("twinbox-agent-probe-{}", std::process::id()));
        std::fs::write(&plain, "not a program").unwrap();
        let plain_probe = probe(&plain);
        std::fs::remove_file(&plain).unwrap();
        assert_eq!(plain_probe, Probe::NotExecutable, "mode 0644");
        assert_eq!(probe(Path::new("/no/such/file")), Probe::Missing);
    }
}

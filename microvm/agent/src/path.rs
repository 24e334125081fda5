//! Finding the program to run, as `execvp` does: a name without '/' is searched in the `PATH`
//! of the workload's environment.

use std::path::{Path, PathBuf};

use crate::status::{EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND};

/// The search path when the environment has no `PATH` (Docker's and runc's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a candidate path turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// A file the caller may execute.
    Executable,
    /// Something that exists but cannot be executed (a directory, no `x` bit).
    NotExecutable,
    /// Nothing there.
    Missing,
}

/// Why no program was found. The messages are Docker's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// A bare name found in no `PATH` directory.
    #[error("exec: {0:?}: executable file not found in $PATH")]
    NotFound(String),
    /// A path (with '/') that does not exist.
    #[error("exec: {0:?}: stat {0}: no such file or directory")]
    NoSuchFile(String),
    /// Found, but not executable.
    #[error("exec: {0:?}: permission denied")]
    NotExecutable(String),
}

impl LookupError {
    /// The exit status to report: 127 not found, 126 not executable.
    pub fn exit_code(&self) -> i32 {
        match self {
            LookupError::NotFound(_) | LookupError::NoSuchFile(_) => EXIT_NOT_FOUND,
            LookupError::NotExecutable(_) => EXIT_NOT_EXECUTABLE,
        }
    }
}

/// The `PATH` of environment `env` ("K=V" strings; the last `PATH=` wins, as in a process
/// environment built by appending), or [`DEFAULT_PATH`].
pub fn path_var(env: &[String]) -> &str {
    env.iter().rev().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH)
}

/// Resolves `name` like `execvp`: a name holding '/' is used as it is; otherwise each directory
/// of [`path_var`]`(env)` is tried in order (an empty entry is the working directory) and the
/// first executable candidate wins. If only non-executable candidates exist, the error is
/// [`LookupError::NotExecutable`]. `probe` says what a path is (on the real system:
/// `stat` + `access(X_OK)`).
pub fn find_program(name: &str, env: &[String], mut probe: impl FnMut(&Path) -> Probe) -> Result<PathBuf, LookupError> {
    if name.is_empty() {
        return Err(LookupError::NotFound(String::new()));
    }
    if name.contains('/') {
        return match probe(Path::new(name)) {
            Probe::Executable => Ok(PathBuf::from(name)),
            Probe::NotExecutable => Err(LookupError::NotExecutable(name.to_string())),
            Probe::Missing => Err(LookupError::NoSuchFile(name.to_string())),
        };
    }
    let mut denied = false;
    for dir in path_var(env).split(':') {
        let candidate = Path::new(if dir.is_empty() { "." } else { dir }).join(name);
        match probe(&candidate) {
            Probe::Executable => return Ok(candidate),
            Probe::NotExecutable => denied = true,
            Probe::Missing => {}
        }
    }
    if denied {
        Err(LookupError::NotExecutable(name.to_string()))
    } else {
        Err(LookupError::NotFound(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file system of a few paths; records what was probed.
    struct Fs {
        files: Vec<(&'static str, Probe)>,
        probed: Vec<PathBuf>,
    }

    impl Fs {
        fn new(files: &[(&'static str, Probe)]) -> Self {
            Fs { files: files.to_vec(), probed: Vec::new() }
        }

        fn probe(&mut self, p: &Path) -> Probe {
            self.probed.push(p.to_path_buf());
            self.files.iter().find(|(f, _)| Path::new(f) == p).map_or(Probe::Missing, |(_, k)| *k)
        }
    }

    fn env(path: &str) -> Vec<String> {
        vec!["HOME=/root".to_string(), format!("PATH={path}")]
    }

    #[test]
    fn first_executable_in_path_order_wins() {
        let mut fs = Fs::new(&[("/usr/bin/sh", Probe::Executable), ("/bin/sh", Probe::Executable)]);
        let found = find_program("sh", &env("/nope:/usr/bin:/bin"), |p| fs.probe(p));
        assert_eq!(found, Ok(PathBuf::from("/usr/bin/sh")));
        assert_eq!(fs.probed, [PathBuf::from("/nope/sh"), PathBuf::from("/usr/bin/sh")], "stops at the first hit");
    }

    #[test]
    fn non_executable_candidates_are_skipped_then_reported() {
        let mut fs = Fs::new(&[("/a/tool", Probe::NotExecutable), ("/b/tool", Probe::Executable)]);
        assert_eq!(find_program("tool", &env("/a:/b"), |p| fs.probe(p)), Ok(PathBuf::from("/b/tool")));
        let mut fs = Fs::new(&[("/a/tool", Probe::NotExecutable)]);
        let err = find_program("tool", &env("/a:/b"), |p| fs.probe(p)).unwrap_err();
        assert_eq!(err, LookupError::NotExecutable("tool".into()));
        assert_eq!(err.exit_code(), 126);
    }

    #[test]
    fn not_found_has_dockers_message_and_127() {
        let mut fs = Fs::new(&[]);
        let err = find_program("nope", &env("/bin"), |p| fs.probe(p)).unwrap_err();
        assert_eq!(err.to_string(), r#"exec: "nope": executable file not found in $PATH"#);
        assert_eq!(err.exit_code(), 127);
    }

    #[test]
    fn names_with_a_slash_are_not_searched() {
        let mut fs = Fs::new(&[("./run.sh", Probe::Executable), ("/opt/x", Probe::NotExecutable)]);
        assert_eq!(find_program("./run.sh", &env("/bin"), |p| fs.probe(p)), Ok(PathBuf::from("./run.sh")));
        assert_eq!(
            find_program("/opt/x", &env("/bin"), |p| fs.probe(p)),
            Err(LookupError::NotExecutable("/opt/x".into()))
        );
        let err = find_program("/opt/y", &env("/bin"), |p| fs.probe(p)).unwrap_err();
        assert_eq!(err.to_string(), r#"exec: "/opt/y": stat /opt/y: no such file or directory"#);
        assert_eq!(err.exit_code(), 127);
        assert_eq!(fs.probed, [PathBuf::from("./run.sh"), PathBuf::from("/opt/x"), PathBuf::from("/opt/y")]);
    }

    #[test]
    fn path_comes_from_the_workload_env_with_a_default() {
        assert_eq!(path_var(&[]), DEFAULT_PATH);
        let both = vec!["PATH=/first".to_string(), "X=1".to_string(), "PATH=/last".to_string()];
        assert_eq!(path_var(&both), "/last");
        // An empty entry is the working directory, as for execvp.
        let mut fs = Fs::new(&[("./tool", Probe::Executable)]);
        assert_eq!(find_program("tool", &env(":/bin"), |p| fs.probe(p)), Ok(PathBuf::from("./tool")));
        let mut fs = Fs::new(&[]);
        assert_eq!(find_program("", &env("/bin"), |p| fs.probe(p)), Err(LookupError::NotFound(String::new())));
        assert!(fs.probed.is_empty());
    }
}

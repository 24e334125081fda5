//! The program that watches a detached container: `engine/monitor`, built by engine/build.rs
//! into a freestanding static executable of a few KiB and embedded here. It is installed into
//! the store (`<store>/bin/twinbox-monitor-<hash>`, written once per build of it) and started
//! with `exec` in the process that created the container; see `engine/monitor/src/main.rs` for
//! what it does and why it is that small.

use std::fs;
use std::path::{Path, PathBuf};

use super::{io_err, EngineError};

/// The monitor executable.
pub const PROGRAM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/twinbox-monitor"));

/// The file name it is installed under: its content's FNV-1a hash, so a twinbox with another
/// monitor never runs a stale one, and concurrent installs write the same bytes.
pub fn file_name() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in PROGRAM {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("twinbox-monitor-{h:016x}")
}

/// The installed monitor under `dir` (made when missing), written atomically when it is not
/// there yet; older monitors in `dir` are removed (running
/// ones keep their executable).
pub fn install(dir: &Path) -> Result<PathBuf, EngineError> {
    let name = file_name();
    let path = dir.join(&name);
    if fs::metadata(&path).is_ok_and(|m| m.len() == PROGRAM.len() as u64) {
        return Ok(path);
    }
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    twinbox_image::atomic::write(&path, PROGRAM, 0o755, true).map_err(|source| EngineError::Io {
        op: "install the container monitor at",
        path: path.clone(),
        source,
    })?;
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("twinbox-monitor-") && n != name {
            let _ = fs::remove_file(e.path());
        }
    }
    Ok(path)
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

    /// The monitor itself: waits for its child, then runs the command with the exit code.
    #[test]
    fn the_monitor_waits_then_runs_the_command_with_the_code() {
        let dir = tempfile::tempdir().unwrap();
        let monitor = install(dir.path()).unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "sh -c 'exit 7' & exec {} $! /bin/sh -c 'echo \"$@\" > {}' sh id1",
            monitor.display(),
            out.display()
        );
        let status = std::process::Command::new("sh").arg("-c").arg(&script).status().unwrap();
        assert!(status.success());
        assert_eq!(fs::read_to_string(&out).unwrap(), "id1 7\n");
        let killed = format!(
            "sleep 30 & p=$!; kill -9 $p; exec {} $p /bin/sh -c 'echo \"$@\" > {}' sh id2",
            monitor.display(),
            out.display()
        );
        assert!(std::process::Command::new("sh").arg("-c").arg(&killed).status().unwrap().success());
        assert_eq!(fs::read_to_string(&out).unwrap(), "id2 137\n");
        // Its own failures: 125 and a line on stderr.
        for args in [vec![], vec!["x", "true"], vec!["1", "/nonexistent"]] {
            // (pid 1 is not its child: the code becomes -1, then the command cannot be run.)
            let o = std::process::Command::new(&monitor).args(&args).output().unwrap();
            assert_eq!(o.status.code(), Some(125), "{args:?}");
            assert!(
                String::from_utf8_lossy(&o.stderr).starts_with("usage") || o.stderr.starts_with(b"twinbox-monitor:")
            );
        }
    }
}

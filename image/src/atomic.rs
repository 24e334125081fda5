//! The one way twinbox's image store and engine replace a file: the new content goes to a
//! temporary file beside it, which is renamed over it, so a reader sees the old file or the
//! new one, never a part. `durable` also syncs the file before the rename and the directory
//! after it, so a crash of the machine keeps one of the two (the store's index and the
//! credentials need that; records that describe live processes do not). The runtime, which
//! knows nothing of this crate, has the same rule in `twinbox_runtime::state::write_atomic`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Replaces `path`'s content with `bytes`, the file getting permission bits `mode`.
pub fn write(path: &Path, bytes: &[u8], mode: u32, durable: bool) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().set_permissions(fs::Permissions::from_mode(mode))?;
    if durable {
        tmp.as_file().sync_all()?;
    }
    // Closed before the rename: an executable (the container monitor, the port proxy) another
    // process finds at `path` and runs at once must have no writer left, or exec fails with
    // ETXTBSY ("Text file busy", seen with twenty concurrent `run -p`).
    tmp.into_temp_path().persist(path).map_err(|e| e.error)?;
    if durable {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_with_the_mode_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        for (content, mode, durable) in [(&b"one"[..], 0o600, true), (&b"two, longer"[..], 0o644, false)] {
            write(&p, content, mode, durable).unwrap();
            assert_eq!(fs::read(&p).unwrap(), content);
            assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, mode);
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let err = write(&dir.path().join("missing/f"), b"x", 0o644, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}

//! Before the workload: the agent's own mounts, the configuration, and the workload's root
//! (the image's disk under a tmpfs-backed overlay, with /dev and /sys).

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::time::{Duration, Instant};

use twinbox_agent::{GuestConfig, GuestConfigError, CONFIG_PATH, CONSOLE_MIRROR_PARAM};

use crate::sys;

/// Where the image's disk is mounted, read-only.
pub const LOWER: &str = "/mnt/lower";
/// The tmpfs holding the overlay's upper and work directories.
pub const RW: &str = "/mnt/rw";
/// The workload's root.
pub const ROOT: &str = "/mnt/root";

/// How long the root device may take to appear in devtmpfs.
const DEVICE_WAIT: Duration = Duration::from_secs(2);

/// A step of the set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A mount failed.
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        /// The file system type (or "bind remount").
        fstype: String,
        /// Where.
        target: String,
        #[source]
        source: io::Error,
    },
    /// A directory could not be created.
    #[error("cannot create directory {path}")]
    Mkdir {
        /// Which.
        path: String,
        #[source]
        source: io::Error,
    },
    /// A device node or a symlink could not be created.
    #[error("cannot create {path}")]
    Node {
        /// Which.
        path: String,
        #[source]
        source: io::Error,
    },
    /// The configuration file could not be read.
    #[error("cannot read {CONFIG_PATH}")]
    ReadConfig(#[source] io::Error),
    /// The configuration is not usable.
    #[error("invalid {CONFIG_PATH}")]
    Config(#[source] GuestConfigError),
    /// sethostname failed.
    #[error("cannot set the hostname to {0:?}")]
    Hostname(String, #[source] io::Error),
}

fn mount(
    source: Option<&str>,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), SetupError> {
    sys::mount(source, target, Some(fstype), flags, data).map_err(|source| SetupError::Mount {
        fstype: fstype.to_string(),
        target: target.to_string(),
        source,
    })
}

/// `mkdir` with an exact mode (the agent runs with umask 0); an existing directory is fine.
fn mkdir(path: &str, mode: u32) -> Result<(), SetupError> {
    match DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(SetupError::Mkdir { path: path.to_string(), source: e })
        }
        _ => Ok(()),
    }
}

/// /proc, /sys and /dev of the initramfs: the agent needs /proc/cmdline and /dev/<root disk>.
pub fn early_mounts() -> Result<(), SetupError> {
    let common = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(Some("proc"), "/proc", "proc", common, None)?;
    mount(Some("sysfs"), "/sys", "sysfs", common, None)?;
    mount(Some("devtmpfs"), "/dev", "devtmpfs", libc::MS_NOSUID, Some("mode=0755"))?;
    Ok(())
}

/// Whether `word` is one of the words of the kernel command line `cmdline`.
pub fn cmdline_has(cmdline: &str, word: &str) -> bool {
    cmdline.split_ascii_whitespace().any(|w| w == word)
}

/// Whether the kernel command line asks for the console mirror.
pub fn console_mirror_wanted() -> bool {
    std::fs::read_to_string("/proc/cmdline").is_ok_and(|c| cmdline_has(&c, CONSOLE_MIRROR_PARAM))
}

/// Reads and validates [`CONFIG_PATH`].
pub fn read_config() -> Result<GuestConfig, SetupError> {
    let json = std::fs::read(CONFIG_PATH).map_err(SetupError::ReadConfig)?;
    GuestConfig::from_json(json).map_err(SetupError::Config)
}

/// Mounts the root disk at [`LOWER`].
fn mount_lower(config: &GuestConfig) -> Result<(), SetupError> {
    mount_device(&config.root_device, LOWER, &config.root_fstype, libc::MS_RDONLY, None)
}

/// Mounts disk `device` at `target`, waiting a little for the device node if the disk is
/// still being probed.
fn mount_device(
    device: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), SetupError> {
    let start = Instant::now();
    loop {
        match sys::mount(Some(device), target, Some(fstype), flags, data) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENXIO)) && start.elapsed() < DEVICE_WAIT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            result => {
                return result.map_err(|source| SetupError::Mount {
                    fstype: format!("{fstype} {device}"),
                    target: target.to_string(),
                    source,
                })
            }
        }
    }
}

/// The workload's root at [`ROOT`]: the disk read-only at [`LOWER`], a tmpfs at [`RW`] for
/// the overlay's upper and work directories, the overlay, its /proc /sys /dev mount points,
/// a /dev like runc's and a read-only /sys. /proc is mounted by the workload's process once
/// it is in its own pid namespace; the read-only remount (`read_only`) is done there too, after
/// it created the working directory.
pub fn root(config: &GuestConfig) -> Result<(), SetupError> {
    for dir in [LOWER, RW, ROOT] {
        mkdir(dir, 0o755)?;
    }
    mount_lower(config)?;
    mount(Some("tmpfs"), RW, "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, Some("mode=0755"))?;
    let upper = format!("{RW}/upper");
    let work = format!("{RW}/work");
    mkdir(&upper, 0o755)?;
    mkdir(&work, 0o755)?;
    let options = format!("lowerdir={LOWER},upperdir={upper},workdir={work}");
    mount(Some("overlay"), ROOT, "overlay", 0, Some(&options))?;
    for dir in ["proc", "sys", "dev"] {
        mkdir(&format!("{ROOT}/{dir}"), 0o755)?;
    }
    dev(&format!("{ROOT}/dev"))?;
    let sys_flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(Some("sysfs"), &format!("{ROOT}/sys"), "sysfs", sys_flags, None)?;
    for v in &config.volumes {
        let target = in_root(ROOT, &v.target)
            .map_err(|source| SetupError::Node { path: format!("{ROOT}{}", v.target), source })?;
        // A read-only volume is a read-only disk, so a journal left by a VM that was killed
        // cannot be replayed: it is not loaded (what was last written cleanly is seen).
        let (flags, data) = if v.read_only { (libc::MS_RDONLY, Some("noload")) } else { (0, None) };
        mount_device(&v.device, &target.to_string_lossy(), "ext4", flags, data)?;
    }
    Ok(())
}

/// Where the volumes were mounted, for [`unmount_volumes`].
pub fn volume_targets(config: &GuestConfig) -> Vec<String> {
    config
        .volumes
        .iter()
        .filter_map(|v| in_root(ROOT, &v.target).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

/// Unmounts the volumes (last first) once the workload is gone, so that their file systems are
/// clean on their disks when the VM ends; one still busy is made read-only instead.
pub fn unmount_volumes(targets: &[String]) {
    for t in targets.iter().rev() {
        if sys::umount(t).is_err() {
            let _ = sys::mount(None, t, None, libc::MS_REMOUNT | libc::MS_RDONLY, None);
        }
    }
    sys::sync();
}

/// Absolute `target` under `root` with its symlinks resolved as the workload sees them (an
/// absolute link starts again at `root`, `..` stops at it), the missing directories made:
/// a volume lands where the workload looks, never outside its root.
fn in_root(root: &str, target: &str) -> io::Result<std::path::PathBuf> {
    use std::collections::VecDeque;
    use std::path::{Path, PathBuf};
    let top = Path::new(root);
    let mut done = PathBuf::from(root);
    let mut todo: VecDeque<String> = target.split('/').filter(|c| !c.is_empty()).map(str::to_owned).collect();
    let mut links = 0;
    while let Some(c) = todo.pop_front() {
        match c.as_str() {
            "." => continue,
            ".." => {
                if done != top {
                    done.pop();
                }
                continue;
            }
            _ => {}
        }
        let next = done.join(&c);
        match std::fs::symlink_metadata(&next) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let link = std::fs::read_link(&next)?;
                if link.is_absolute() {
                    done = PathBuf::from(root);
                }
                let parts: Vec<String> =
                    link.to_string_lossy().split('/').filter(|c| !c.is_empty()).map(str::to_owned).collect();
                for p in parts.into_iter().rev() {
                    todo.push_front(p);
                }
            }
            Ok(m) if m.is_dir() => done = next,
            Ok(_) => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir(&next)?;
                done = next;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// runc's default devices: (name, major, minor), all mode 0666.
const DEVICES: [(&str, u32, u32); 6] =
    [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)];

/// runc's /dev symlinks: (name, target).
const DEV_LINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

/// A tmpfs /dev at `dev` with runc's default devices, links, devpts and /dev/shm.
fn dev(dev: &str) -> Result<(), SetupError> {
    mount(Some("tmpfs"), dev, "tmpfs", libc::MS_NOSUID | libc::MS_STRICTATIME, Some("mode=755,size=65536k"))?;
    for (name, major, minor) in DEVICES {
        let path = format!("{dev}/{name}");
        sys::mknod_char(&path, 0o666, major, minor).map_err(|source| SetupError::Node { path, source })?;
    }
    for (name, target) in DEV_LINKS {
        let path = format!("{dev}/{name}");
        std::os::unix::fs::symlink(target, &path).map_err(|source| SetupError::Node { path, source })?;
    }
    let pts = format!("{dev}/pts");
    mkdir(&pts, 0o755)?;
    let pts_options = "newinstance,ptmxmode=0666,mode=0620,gid=5";
    mount(Some("devpts"), &pts, "devpts", libc::MS_NOSUID | libc::MS_NOEXEC, Some(pts_options))?;
    let shm = format!("{dev}/shm");
    mkdir(&shm, 0o1777)?;
    let shm_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(Some("shm"), &shm, "tmpfs", shm_flags, Some("mode=1777,size=65536k"))?;
    Ok(())
}

/// Sets the guest's hostname, unless the configuration leaves it empty.
pub fn hostname(config: &GuestConfig) -> Result<(), SetupError> {
    if config.hostname.is_empty() {
        return Ok(());
    }
    sys::sethostname(&config.hostname).map_err(|e| SetupError::Hostname(config.hostname.clone(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_whole_words_of_the_command_line() {
        let cmdline = "console=ttyS0 twinbox.console quiet\n";
        assert!(cmdline_has(cmdline, CONSOLE_MIRROR_PARAM));
        assert!(!cmdline_has("twinbox.console=0 x", CONSOLE_MIRROR_PARAM));
        assert!(!cmdline_has("notwinbox.console", CONSOLE_MIRROR_PARAM));
    }

    #[test]
    fn error_messages_name_the_step() {
        let err = SetupError::Mount {
            fstype: "ext4 /dev/vda".into(),
            target: LOWER.into(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(err.to_string(), "cannot mount ext4 /dev/vda on /mnt/lower");
        assert_eq!(
            SetupError::ReadConfig(io::Error::from_raw_os_error(2)).to_string(),
            "cannot read /twinbox/config.json"
        );
    }

    #[test]
    fn volume_targets_resolve_links_inside_the_root() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let path = std::env::temp_dir().join(format!("in-root-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path).unwrap();
        struct Gone(std::path::PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = Gone(path);
        let dir = &dir;
        let root = dir.0.to_str().unwrap();
        std::fs::create_dir_all(dir.0.as_path().join("run")).unwrap();
        std::os::unix::fs::symlink("/run", dir.0.as_path().join("var-run")).unwrap();
        std::os::unix::fs::symlink("../../..", dir.0.as_path().join("run/up")).unwrap();
        assert_eq!(
            in_root(root, "/var-run/app").unwrap(),
            dir.0.as_path().join("run/app"),
            "absolute link from the root"
        );
        assert!(dir.0.as_path().join("run/app").is_dir(), "made");
        assert_eq!(in_root(root, "/run/up/x").unwrap(), dir.0.as_path().join("x"), "`..` stops at the root");
        std::fs::write(dir.0.as_path().join("file"), "").unwrap();
        assert_eq!(in_root(root, "/file/x").unwrap_err().raw_os_error(), Some(libc::ENOTDIR));
        std::os::unix::fs::symlink("/loop", dir.0.as_path().join("loop")).unwrap();
        assert_eq!(in_root(root, "/loop").unwrap_err().raw_os_error(), Some(libc::ELOOP));
    }

    #[test]
    fn mkdir_tolerates_an_existing_directory_only() {
        let tmp = std::env::temp_dir().join(format!("twinbox-agent-mkdir-{}", std::process::id()));
        let path = tmp.to_str().unwrap();
        mkdir(path, 0o755).unwrap();
        mkdir(path, 0o700).unwrap();
        let err = mkdir(&format!("{path}/missing/child"), 0o755).unwrap_err();
        std::fs::remove_dir(&tmp).unwrap();
        assert!(
            matches!(&err, SetupError::Mkdir { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
    }
}

//! Named volumes: data that outlives the instances using it, under `<store>/volumes/<name>/`
//! (`volume.json` says what it is), and the `-v` mounts of `twinbox run`.
//!
//! A volume has one of two drivers, fixed when it is made:
//! - `local` (Docker's): a directory, `_data`, bound into containers. The default for
//!   `volume create`, and what `run -v NAME:/path` makes for a container.
//! - `disk`: an ext4 file system in a sparse file, `disk.ext4` (`--size`, 1 GiB by default),
//!   that a microVM gets as a virtio-blk disk of its own; what `run --isolation microvm -v
//!   NAME:/path` makes. One VM at a time uses it (its VMM holds a lock on the file).
//!
//! A microVM has no shared-filesystem device, so neither a host directory (`-v /host:/path`)
//! nor a `local` volume goes into one; a container does not take a `disk` volume. Each is
//! refused with the reason. Unlike Docker, a new volume starts empty: the image's files at the
//! mount point are not copied into it.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// A volume's size when `--size` is not given (disk volumes; the file is sparse).
pub const DEFAULT_DISK_SIZE: u64 = 1 << 30;

/// What holds a volume's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// A directory of the host, bound into containers.
    Local,
    /// An ext4 image, a microVM's virtio-blk disk.
    Disk,
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // pad: `{:<8}` in a table lines up.
        f.pad(match self {
            Driver::Local => "local",
            Driver::Disk => "disk",
        })
    }
}

impl std::str::FromStr for Driver {
    type Err = VolumeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Driver::Local),
            "disk" => Ok(Driver::Disk),
            other => Err(VolumeError::UnknownDriver(other.to_owned())),
        }
    }
}

/// A named volume as `volume.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub name: String,
    pub driver: Driver,
    /// The disk's size in bytes (disk volumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// RFC 3339.
    pub created: String,
}

/// Where an instance's `-v` takes its data from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeSource {
    /// A directory (or file) of the host, by absolute path.
    Host(PathBuf),
    /// A named volume.
    Named(String),
}

/// One `-v SOURCE:TARGET[:ro|rw]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    pub source: VolumeSource,
    /// Absolute path in the instance.
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

impl std::str::FromStr for VolumeMount {
    type Err = VolumeError;

    /// `SOURCE:TARGET[:ro|rw]`; a SOURCE that starts with `/` is a host path, anything else a
    /// volume's name.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| VolumeError::BadMount { spec: spec.to_owned(), why: why.to_owned() };
        let parts: Vec<&str> = spec.split(':').collect();
        let (source, target, mode) = match parts.as_slice() {
            [s, t] => (*s, *t, None),
            [s, t, m] => (*s, *t, Some(*m)),
            [_] => return Err(bad("give SOURCE:TARGET (anonymous volumes are not supported; name one)")),
            _ => return Err(bad("give SOURCE:TARGET[:ro|rw]")),
        };
        let read_only = match mode {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(m) => return Err(bad(&format!("unknown option {m:?}; only ro and rw are supported"))),
        };
        if !target.starts_with('/') || target.split('/').any(|c| c == ".." || c == ".") {
            return Err(bad("TARGET must be an absolute path without `.` or `..`"));
        }
        if target.trim_end_matches('/').is_empty() {
            return Err(bad("TARGET cannot be the root"));
        }
        let source = if source.starts_with('/') {
            VolumeSource::Host(PathBuf::from(source))
        } else if crate::valid_name(source, 128) {
            VolumeSource::Named(source.to_owned())
        } else {
            return Err(bad("SOURCE is an absolute host path or a volume name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)"));
        };
        Ok(VolumeMount { source, target: target.to_owned(), read_only })
    }
}

impl fmt::Display for VolumeMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            VolumeSource::Host(p) => write!(f, "{}", p.display())?,
            VolumeSource::Named(n) => f.write_str(n)?,
        }
        write!(f, ":{}{}", self.target, if self.read_only { ":ro" } else { "" })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("invalid volume name {0:?}: use [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 128 characters")]
    InvalidName(String),
    #[error("no such volume: {0}; see `twinbox volume ls`")]
    NoSuchVolume(String),
    #[error("volume {name} exists with the {driver} driver; remove it first or pick another name")]
    Exists { name: String, driver: Driver },
    #[error("volume {name} is in use by {}; remove {} first", users.join(", "), if users.len() == 1 { "it" } else { "them" })]
    InUse { name: String, users: Vec<String> },
    #[error("unknown volume driver {0:?}: local (a directory, for containers) or disk (an ext4 disk, for microVMs)")]
    UnknownDriver(String),
    #[error("-v {spec}: {why}")]
    BadMount { spec: String, why: String },
    #[error("--size is for disk volumes")]
    SizeNeedsDisk,
    #[error("volume size {0} bytes is too small: a disk volume needs at least 8 MiB")]
    TooSmall(u64),
    #[error("volume {name} is a {driver} volume: {why}")]
    WrongDriver { name: String, driver: Driver, why: String },
    #[error("volume {0}'s record is unreadable: {1}")]
    Corrupt(String, String),
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Disk(#[from] twinbox_image::disk::DiskError),
}

impl twinbox_exit::ExitCode for VolumeError {
    fn exit_code(&self) -> i32 {
        match self {
            VolumeError::Io { .. } | VolumeError::Corrupt(..) => twinbox_exit::INTERNAL,
            VolumeError::Disk(e) => e.exit_code(),
            _ => twinbox_exit::USER_ERROR,
        }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> VolumeError {
    let path = path.to_owned();
    move |source| VolumeError::Io { op, path, source }
}

/// The store's volumes.
#[derive(Debug, Clone)]
pub struct Volumes {
    dir: PathBuf,
}

impl Volumes {
    /// The volumes of the store at `store_root`.
    pub fn new(store_root: &Path) -> Self {
        Volumes { dir: store_root.join("volumes") }
    }

    fn lock(&self) -> Result<nix::fcntl::Flock<fs::File>, VolumeError> {
        self.lock_at(".lock", nix::fcntl::FlockArg::LockExclusive)
    }

    /// Held shared by a command from checking its `-v` volumes until its instance's record
    /// (which names them) is saved, and exclusively by `volume rm` while it looks for users and
    /// removes: a volume is never removed between a run's check and its record.
    pub fn users_lock(&self, exclusive: bool) -> Result<nix::fcntl::Flock<fs::File>, VolumeError> {
        let how = if exclusive { nix::fcntl::FlockArg::LockExclusive } else { nix::fcntl::FlockArg::LockShared };
        self.lock_at(".users.lock", how)
    }

    fn lock_at(&self, name: &str, how: nix::fcntl::FlockArg) -> Result<nix::fcntl::Flock<fs::File>, VolumeError> {
        fs::create_dir_all(&self.dir).map_err(io_err("create directory", &self.dir))?;
        let path = self.dir.join(name);
        crate::lock_file(&path, how).map_err(io_err("lock", &path))
    }

    fn check_name(name: &str) -> Result<(), VolumeError> {
        if crate::valid_name(name, 128) {
            Ok(())
        } else {
            Err(VolumeError::InvalidName(name.to_owned()))
        }
    }

    /// The directory of volume `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A local volume's data directory.
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.path(name).join("_data")
    }

    /// A disk volume's ext4 image.
    pub fn disk_path(&self, name: &str) -> PathBuf {
        self.path(name).join("disk.ext4")
    }

    /// Volume `name`.
    pub fn get(&self, name: &str) -> Result<Volume, VolumeError> {
        Self::check_name(name)?;
        let path = self.path(name).join("volume.json");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(VolumeError::NoSuchVolume(name.to_owned())),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| VolumeError::Corrupt(name.to_owned(), e.to_string()))
    }

    /// Makes volume `name` (`size` only for disk volumes). One that exists with the same
    /// driver is returned as it is, as `docker volume create` does.
    pub fn create(&self, name: &str, driver: Driver, size: Option<u64>) -> Result<Volume, VolumeError> {
        Self::check_name(name)?;
        if size.is_some() && driver != Driver::Disk {
            return Err(VolumeError::SizeNeedsDisk);
        }
        if let Some(s) = size.filter(|s| *s < 8 << 20) {
            return Err(VolumeError::TooSmall(s));
        }
        let _lock = self.lock()?;
        match self.get(name) {
            Ok(v) if v.driver == driver && (size.is_none() || v.size == size) => return Ok(v),
            Ok(v) => return Err(VolumeError::Exists { name: name.to_owned(), driver: v.driver }),
            Err(VolumeError::NoSuchVolume(_)) => {}
            Err(e) => return Err(e),
        }
        let volume = Volume {
            name: name.to_owned(),
            driver,
            size: (driver == Driver::Disk).then(|| size.unwrap_or(DEFAULT_DISK_SIZE)),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        // Made beside, then renamed into place: a volume is there whole or not at all.
        let tmp = self.dir.join(format!(".new-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let made = (|| {
            fs::create_dir_all(&tmp).map_err(io_err("create directory", &tmp))?;
            match driver {
                Driver::Local => fs::create_dir(tmp.join("_data")).map_err(io_err("create directory", &tmp))?,
                Driver::Disk => make_disk(&tmp.join("disk.ext4"), volume.size.unwrap_or(DEFAULT_DISK_SIZE))?,
            }
            let json = serde_json::to_vec_pretty(&volume).expect("a volume serializes");
            fs::write(tmp.join("volume.json"), json).map_err(io_err("write", &tmp))?;
            let target = self.path(name);
            fs::rename(&tmp, &target).map_err(io_err("create", &target))
        })();
        if let Err(e) = made {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        Ok(volume)
    }

    /// Every volume, by name.
    pub fn list(&self) -> Result<Vec<Volume>, VolumeError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read", &self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            match self.get(&name) {
                Ok(v) => out.push(v),
                Err(VolumeError::NoSuchVolume(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes volume `name`, unless `users` (the instances whose mounts name it) is not
    /// empty.
    pub fn remove(&self, name: &str, users: &[String]) -> Result<(), VolumeError> {
        self.get(name)?;
        if !users.is_empty() {
            return Err(VolumeError::InUse { name: name.to_owned(), users: users.to_vec() });
        }
        let _lock = self.lock()?;
        // Renamed out of sight first: a half-removed volume is never found by name.
        let gone = self.dir.join(format!(".rm-{name}-{}", std::process::id()));
        let path = self.path(name);
        fs::rename(&path, &gone).map_err(io_err("remove", &path))?;
        fs::remove_dir_all(&gone).map_err(io_err("remove", &gone))
    }

    /// What is left of creations and removals a killed command did not finish.
    pub fn reconcile(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        let Ok(_lock) = self.lock() else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix(".new-")
                .or_else(|| name.strip_prefix(".rm-"))
                .and_then(|rest| rest.rsplit_once('-'))
                .and_then(|(_, pid)| pid.parse::<i32>().ok());
            let alive = |pid: i32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
            if pid.is_some_and(|p| !alive(p)) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Whether volume `name` (made or not) suits an instance of the given model: an existing
    /// one of the other model's driver is refused with the reason. Nothing is made.
    pub fn check_mount(&self, name: &str, microvm: bool) -> Result<(), VolumeError> {
        match self.get(name) {
            Ok(v) => self.suits(&v, microvm),
            Err(VolumeError::NoSuchVolume(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn suits(&self, v: &Volume, microvm: bool) -> Result<(), VolumeError> {
        let name = &v.name;
        let wanted = if microvm { Driver::Disk } else { Driver::Local };
        if v.driver == wanted {
            return Ok(());
        }
        let why = if microvm {
            format!(
                "a directory, which a microVM cannot mount (it has no shared-filesystem device); give it a disk \
                 volume: twinbox volume create --driver disk {name}-disk"
            )
        } else {
            format!(
                "an ext4 disk for microVMs, which a container does not mount; give it a local volume: \
                 twinbox volume create {name}-dir"
            )
        };
        Err(VolumeError::WrongDriver { name: name.to_owned(), driver: v.driver, why })
    }

    /// The volume a mount of an instance of the given model uses, made if it does not exist
    /// (a local volume for a container, a disk volume for a microVM), checked to suit it.
    pub fn for_mount(&self, name: &str, microvm: bool) -> Result<Volume, VolumeError> {
        let wanted = if microvm { Driver::Disk } else { Driver::Local };
        let v = match self.get(name) {
            Ok(v) => v,
            Err(VolumeError::NoSuchVolume(_)) => match self.create(name, wanted, None) {
                Err(VolumeError::Exists { .. }) => self.get(name)?,
                other => other?,
            },
            Err(e) => return Err(e),
        };
        self.suits(&v, microvm)?;
        Ok(v)
    }
}

/// A sparse ext4 file system of `size` bytes at `path`, its root directory world-writable as
/// a fresh directory volume's is not (root owns it, mode 0755 like Docker's `_data`).
fn make_disk(path: &Path, size: u64) -> Result<(), VolumeError> {
    let file = fs::File::create(path).map_err(io_err("create", path))?;
    file.set_len(size).map_err(io_err("size", path))?;
    drop(file);
    let mkfs = twinbox_image::disk::MKFS;
    let output = Command::new(mkfs)
        .args(["-q", "-F", "-t", "ext4", "-m", "0", "-L", "twinbox-volume", "-E", "root_owner=0:0"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(twinbox_image::disk::DiskError::MkfsMissing.into()),
        Err(e) => return Err(io_err("run", Path::new(mkfs))(e)),
    };
    if !output.status.success() {
        return Err(twinbox_image::disk::DiskError::Mkfs {
            path: path.to_owned(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_specs_parse_as_docker_reads_them() {
        let m: VolumeMount = "data:/var/lib/data".parse().unwrap();
        assert_eq!(m.source, VolumeSource::Named("data".into()));
        assert_eq!((m.target.as_str(), m.read_only), ("/var/lib/data", false));
        let m: VolumeMount = "/srv/www:/usr/share/www:ro".parse().unwrap();
        assert_eq!(m.source, VolumeSource::Host("/srv/www".into()));
        assert!(m.read_only);
        assert_eq!(m.to_string(), "/srv/www:/usr/share/www:ro");
        for bad in ["/only", "data:relative", "data:/x:z", "a:b:c:d", "da ta:/x", "data:/", "data:/a/../b", "data:/."] {
            let e = bad.parse::<VolumeMount>().unwrap_err();
            assert!(e.to_string().starts_with(&format!("-v {bad}: ")), "{bad}: {e}");
        }
    }

    #[test]
    fn local_volumes_are_made_once_listed_and_removed_unless_used() {
        let dir = tempfile::tempdir().unwrap();
        let vols = Volumes::new(dir.path());
        let v = vols.create("data", Driver::Local, None).unwrap();
        assert_eq!(v.driver, Driver::Local);
        assert!(vols.data_dir("data").is_dir());
        fs::write(vols.data_dir("data").join("kept"), "x").unwrap();
        assert_eq!(vols.create("data", Driver::Local, None).unwrap(), v, "made again: the same, data kept");
        assert!(vols.data_dir("data").join("kept").exists());
        assert!(matches!(vols.create("data", Driver::Disk, None), Err(VolumeError::Exists { .. })));
        assert!(matches!(vols.create("bad/name", Driver::Local, None), Err(VolumeError::InvalidName(_))));
        assert!(matches!(vols.create("x", Driver::Local, Some(1 << 30)), Err(VolumeError::SizeNeedsDisk)));
        assert_eq!(vols.list().unwrap().iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["data"]);
        let used = vols.remove("data", &["web".into()]).unwrap_err();
        assert_eq!(used.to_string(), "volume data is in use by web; remove it first");
        vols.remove("data", &[]).unwrap();
        assert!(!vols.path("data").exists());
        assert!(matches!(vols.get("data"), Err(VolumeError::NoSuchVolume(_))));
        assert!(vols.list().unwrap().is_empty());
    }

    #[test]
    fn each_model_gets_its_driver_and_the_other_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vols = Volumes::new(dir.path());
        assert_eq!(vols.for_mount("c", false).unwrap().driver, Driver::Local);
        let e = vols.for_mount("c", true).unwrap_err();
        assert!(e.to_string().contains("no shared-filesystem device"), "{e}");
        if Command::new(twinbox_image::disk::MKFS).arg("-V").output().is_err() {
            assert!(std::env::var_os("CI").is_none(), "mkfs.ext4 is missing under CI");
            eprintln!("SKIPPED: disk volumes: mkfs.ext4 is not installed");
            return;
        }
        let v = vols.create("d", Driver::Disk, Some(16 << 20)).unwrap();
        assert_eq!(v.size, Some(16 << 20));
        let disk = fs::metadata(vols.disk_path("d")).unwrap();
        assert_eq!(disk.len(), 16 << 20);
        assert!(std::os::unix::fs::MetadataExt::blocks(&disk) * 512 < 16 << 20, "sparse");
        let e = vols.for_mount("d", false).unwrap_err();
        assert!(e.to_string().contains("a container does not mount"), "{e}");
        assert_eq!(vols.for_mount("d", true).unwrap(), v);
    }

    #[test]
    fn leftovers_of_killed_commands_go() {
        let dir = tempfile::tempdir().unwrap();
        let vols = Volumes::new(dir.path());
        vols.create("keep", Driver::Local, None).unwrap();
        // A pid that cannot be running: above the kernel's maximum.
        let dead = vols.dir.join(".new-x-99999999");
        fs::create_dir_all(dead.join("_data")).unwrap();
        let live = vols.dir.join(format!(".rm-y-{}", std::process::id()));
        fs::create_dir_all(&live).unwrap();
        vols.reconcile();
        assert!(!dead.exists() && live.exists() && vols.path("keep").exists());
        assert_eq!(vols.list().unwrap().len(), 1);
    }
}

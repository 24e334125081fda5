//! What process an image starts, the way Docker decides it: the image config gives entrypoint,
//! cmd, env, working dir and user; the run's flags override them. Shared by both isolation
//! models, so a container and a microVM of the same image run exactly the same process.

use std::path::{Path, PathBuf};

use oci_spec::image::ImageConfiguration;
use twinbox_exit::ExitCode;

/// The PATH a process gets when its image sets none (Docker's default).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a run may override. Plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Overrides {
    /// Command (replaces the image's CMD).
    pub cmd: Vec<String>,
    /// Replaces the image's ENTRYPOINT (and drops its CMD unless `cmd` is given); `""` clears it.
    pub entrypoint: Option<String>,
    /// Extra environment, `K=V` (or `K`, taken from the caller's environment).
    pub env: Vec<String>,
    /// Working directory (absolute).
    pub workdir: Option<String>,
    /// `uid[:gid]` or `name[:group]`.
    pub user: Option<String>,
}

/// The process to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// argv.
    pub args: Vec<String>,
    /// The whole environment, `K=V`.
    pub env: Vec<String>,
    /// Absolute working directory.
    pub cwd: String,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
}

/// Why no process can be derived.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LaunchError {
    /// Neither the image nor the run gives a command.
    #[error("no command given and image {0} has no ENTRYPOINT or CMD; give a command after the image name")]
    NoCommand(String),
    /// `-w` must be absolute.
    #[error("working directory {0:?} is not absolute")]
    RelativeWorkdir(String),
    /// A user name the image's /etc/passwd does not list.
    #[error("unable to find user {0}: no matching entries in the image's /etc/passwd; give a numeric uid")]
    UnknownUser(String),
    /// A group name the image's /etc/group does not list.
    #[error("unable to find group {0}: no matching entries in the image's /etc/group; give a numeric gid")]
    UnknownGroup(String),
}

impl ExitCode for LaunchError {
    fn exit_code(&self) -> i32 {
        match self {
            LaunchError::NoCommand(_)
            | LaunchError::RelativeWorkdir(_)
            | LaunchError::UnknownUser(_)
            | LaunchError::UnknownGroup(_) => twinbox_exit::USER_ERROR,
        }
    }
}

/// The process a run of `image` (named `image_name` in errors) starts, with `hostname` in its
/// environment. `layers_base_first` are the image's unpacked layer directories (or one
/// flattened tree), searched top-down for /etc/passwd and /etc/group.
pub fn resolve(
    image_name: &str,
    config: &ImageConfiguration,
    layers_base_first: &[PathBuf],
    overrides: &Overrides,
    hostname: &str,
) -> Result<Launch, LaunchError> {
    let image = config.config().clone().unwrap_or_default();
    let mut args: Vec<String> = match &overrides.entrypoint {
        Some(e) if e.is_empty() => Vec::new(),
        Some(e) => vec![e.clone()],
        None => image.entrypoint().clone().unwrap_or_default(),
    };
    if !overrides.cmd.is_empty() {
        args.extend(overrides.cmd.iter().cloned());
    } else if overrides.entrypoint.is_none() {
        args.extend(image.cmd().clone().unwrap_or_default());
    }
    if args.is_empty() {
        return Err(LaunchError::NoCommand(image_name.to_owned()));
    }
    let env = merge_env(image.env().as_deref().unwrap_or_default(), &overrides.env, hostname);
    let cwd = overrides
        .workdir
        .clone()
        .or_else(|| image.working_dir().clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(LaunchError::RelativeWorkdir(cwd));
    }
    let user = overrides.user.clone().or_else(|| image.user().clone()).filter(|u| !u.is_empty());
    let (uid, gid, additional_gids) = match &user {
        Some(u) => resolve_user(u, layers_base_first)?,
        None => (0, 0, Vec::new()),
    };
    Ok(Launch { args, env, cwd, uid, gid, additional_gids })
}

/// Image env, then overrides (a bare `K` takes the caller's own `K`), a default PATH and
/// HOSTNAME when missing. Later values replace earlier ones with the same key.
pub fn merge_env(image: &[String], overrides: &[String], hostname: &str) -> Vec<String> {
    // Everything in order; then each key's last value, at the place of that last value (what
    // replacing one by one gives, in linear time: an image with 100k variables used to take
    // minutes here).
    let mut all: Vec<String> = Vec::with_capacity(image.len() + overrides.len() + 2);
    if !image.iter().any(|e| e.starts_with("PATH=")) {
        all.push(DEFAULT_PATH.to_owned());
    }
    all.push(format!("HOSTNAME={hostname}"));
    all.extend(image.iter().cloned());
    for e in overrides {
        if e.contains('=') {
            all.push(e.clone());
        } else if let Ok(v) = std::env::var(e) {
            all.push(format!("{e}={v}"));
        }
    }
    let key = |kv: &str| kv.split('=').next().unwrap_or_default().to_owned();
    let last: std::collections::HashMap<String, usize> = all.iter().enumerate().map(|(i, kv)| (key(kv), i)).collect();
    all.into_iter().enumerate().filter(|(i, kv)| last.get(&key(kv)) == Some(i)).map(|(_, kv)| kv).collect()
}

/// Resolve `uid[:gid]` / `name[:group]` against the image's /etc/passwd and /etc/group (the
/// top-most layer that has them). Returns uid, gid and supplementary groups.
pub fn resolve_user(spec: &str, layers_base_first: &[PathBuf]) -> Result<(u32, u32, Vec<u32>), LaunchError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = find_in_layers(layers_base_first, "etc/passwd");
    let groups = find_in_layers(layers_base_first, "etc/group");
    let (uid, mut gid, name) = match user.parse::<u32>() {
        Ok(uid) => {
            let entry = passwd.as_deref().and_then(|p| passwd_lookup(p, |f| f[2].parse() == Ok(uid)));
            (uid, entry.as_ref().map(|e| e.1).unwrap_or(0), entry.map(|e| e.2))
        }
        Err(_) => {
            let Some((uid, gid, name)) = passwd.as_deref().and_then(|p| passwd_lookup(p, |f| f[0] == user)) else {
                return Err(LaunchError::UnknownUser(user.to_owned()));
            };
            (uid, gid, Some(name))
        }
    };
    if let Some(g) = group {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups
                .as_deref()
                .and_then(|t| group_entries(t).find(|(n, _, _)| n == g).map(|(_, id, _)| id))
                .ok_or_else(|| LaunchError::UnknownGroup(g.to_owned()))?,
        };
    }
    let mut additional: Vec<u32> = match (&name, groups.as_deref()) {
        (Some(n), Some(t)) => {
            group_entries(t).filter(|(_, _, members)| members.iter().any(|m| m == n)).map(|(_, id, _)| id).collect()
        }
        _ => Vec::new(),
    };
    additional.retain(|g| *g != gid);
    Ok((uid, gid, additional))
}

fn passwd_lookup(text: &str, pred: impl Fn(&[&str]) -> bool) -> Option<(u32, u32, String)> {
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .find(|f| pred(f))
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?, f[0].to_owned())))
}

fn group_entries(text: &str) -> impl Iterator<Item = (String, u32, Vec<String>)> + '_ {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 3 {
            return None;
        }
        let members =
            f.get(3).map(|m| m.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect()).unwrap_or_default();
        Some((f[0].to_owned(), f[2].parse().ok()?, members))
    })
}

/// The content of `rel` in the top-most layer that has it as a regular file (a whiteout or any
/// other kind of entry above hides it).
fn find_in_layers(layers_base_first: &[PathBuf], rel: &str) -> Option<String> {
    for layer in layers_base_first.iter().rev() {
        let p: &Path = &layer.join(rel);
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_file() => return std::fs::read_to_string(p).ok(),
            Ok(_) => return None,
            Err(_) => continue,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::{ConfigBuilder, ImageConfigurationBuilder};

    fn image(entry: Option<&[&str]>, cmd: Option<&[&str]>, env: &[&str], workdir: Option<&str>) -> ImageConfiguration {
        let mut c = ConfigBuilder::default().env(env.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        if let Some(e) = entry {
            c = c.entrypoint(e.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        }
        if let Some(e) = cmd {
            c = c.cmd(e.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        }
        if let Some(w) = workdir {
            c = c.working_dir(w.to_string());
        }
        ImageConfigurationBuilder::default().config(c.build().unwrap()).build().unwrap()
    }

    fn args(config: &ImageConfiguration, cmd: &[&str], entrypoint: Option<&str>) -> Result<Vec<String>, LaunchError> {
        let o = Overrides {
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            entrypoint: entrypoint.map(str::to_owned),
            ..Default::default()
        };
        resolve("x", config, &[], &o, "h").map(|l| l.args)
    }

    #[test]
    fn entrypoint_and_cmd_like_docker() {
        let img = image(Some(&["/hello"]), Some(&["greet"]), &[], None);
        assert_eq!(args(&img, &[], None).unwrap(), ["/hello", "greet"]);
        assert_eq!(args(&img, &["true"], None).unwrap(), ["/hello", "true"]);
        assert_eq!(args(&img, &[], Some("/bin/sh")).unwrap(), ["/bin/sh"]);
        assert_eq!(args(&img, &["-c", "x"], Some("/bin/sh")).unwrap(), ["/bin/sh", "-c", "x"]);
        assert_eq!(args(&img, &["/bin/true"], Some("")).unwrap(), ["/bin/true"]);
        let none = image(None, None, &[], None);
        assert_eq!(args(&none, &[], None), Err(LaunchError::NoCommand("x".into())));
    }

    #[test]
    fn env_cwd_and_defaults() {
        let img = image(None, Some(&["sh"]), &["A=1", "PATH=/bin"], Some("/srv"));
        let o = Overrides { env: vec!["A=2".into(), "B=3".into()], ..Default::default() };
        let l = resolve("x", &img, &[], &o, "box").unwrap();
        assert_eq!(l.env, ["HOSTNAME=box", "PATH=/bin", "A=2", "B=3"]);
        assert_eq!(l.cwd, "/srv");
        assert_eq!((l.uid, l.gid), (0, 0));
        let bare = resolve("x", &image(None, Some(&["sh"]), &[], None), &[], &Overrides::default(), "h").unwrap();
        assert_eq!(bare.env[0], DEFAULT_PATH);
        assert_eq!(bare.cwd, "/");
        let rel = Overrides { workdir: Some("srv".into()), ..Default::default() };
        assert_eq!(resolve("x", &img, &[], &rel, "h"), Err(LaunchError::RelativeWorkdir("srv".into())));
    }

    #[test]
    fn a_huge_environment_merges_as_one_by_one_replacement_would() {
        let image: Vec<String> = (0..100_000).map(|i| format!("V{}={i}", i % 50_000)).collect();
        let env = merge_env(&image, &["V7=over".into(), "NEW=1".into()], "h");
        assert_eq!(env.len(), 2 + 50_000 + 1);
        assert_eq!(env[0], DEFAULT_PATH);
        assert_eq!(env[1], "HOSTNAME=h");
        assert_eq!(env[2], "V0=50000", "the later value, at the later place");
        assert_eq!(&env[env.len() - 2..], ["V7=over", "NEW=1"]);
        assert!(!env.iter().any(|e| e == "V7=50007"));
    }

    #[test]
    fn users_resolved_from_the_top_layer() {
        let d = tempfile::tempdir().unwrap();
        let (base, top) = (d.path().join("base"), d.path().join("top"));
        std::fs::create_dir_all(base.join("etc")).unwrap();
        std::fs::create_dir_all(top.join("etc")).unwrap();
        std::fs::write(base.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::write(top.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
            .unwrap();
        std::fs::write(top.join("etc/group"), "root:x:0:\napp:x:1000:\nwheel:x:10:app\n").unwrap();
        let layers = vec![base, top];
        assert_eq!(resolve_user("app", &layers).unwrap(), (1000, 1000, vec![10]));
        assert_eq!(resolve_user("1000:10", &layers).unwrap(), (1000, 10, vec![]));
        assert_eq!(resolve_user("4242", &layers).unwrap(), (4242, 0, vec![]));
        assert_eq!(resolve_user("app:wheel", &layers).unwrap().1, 10);
        assert_eq!(resolve_user("nobody", &layers), Err(LaunchError::UnknownUser("nobody".into())));
        assert_eq!(resolve_user("app:nogroup", &layers), Err(LaunchError::UnknownGroup("nogroup".into())));
    }
}

//! The build context: the directory `COPY` and `ADD` read from.
//!
//! Sources are paths relative to the context root (a leading `/` also means the root, as in
//! Docker), with `*`, `?` and `[...]` patterns per path component. A source may not leave the
//! context: `..` above the root is refused, and so is a source that is, or goes through, a
//! symlink whose target lies outside the context on the host. Symlinks *inside* a copied
//! directory are copied as symlinks and never followed, so they cannot leak host files.
//!
//! `.dockerignore` at the root hides files from `COPY`/`ADD`: one pattern per line, `#`
//! comments, `*` `?` `[...]` within a component, `**` for any number of components, a leading
//! `!` re-includes, the last matching line wins, and a pattern that matches a directory
//! matches everything below it.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use twinbox_exit::ExitCode;

/// Why a source could not be read from the context.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The context directory itself is unusable.
    #[error("cannot open the build context {}", path.display())]
    Open {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading a file or directory of the context failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A source with `..` that climbs above the context root.
    #[error("{path} is outside the build context; sources are relative to the context directory and cannot use .. to leave it")]
    Outside {
        /// The source as written.
        path: String,
    },
    /// A source path that does not exist.
    #[error("{path} not found in the build context {}", context.display())]
    NotFound {
        /// The source as written.
        path: String,
        /// The context root.
        context: PathBuf,
    },
    /// A pattern that matches nothing.
    #[error("no file in the build context {} matches {pattern}", context.display())]
    NoMatch {
        /// The pattern.
        pattern: String,
        /// The context root.
        context: PathBuf,
    },
    /// A source that `.dockerignore` excludes.
    #[error("{path} is excluded by .dockerignore")]
    Excluded {
        /// The source.
        path: String,
    },
    /// A source that is or goes through a symlink pointing outside the context.
    #[error("{path} is a symlink to {}, outside the build context; copy the target into the context instead", target.display())]
    SymlinkEscapes {
        /// The source (or the part of it that is the symlink).
        path: String,
        /// Where it leads on the host.
        target: PathBuf,
    },
    /// A file name that is not UTF-8.
    #[error("{}: file names must be UTF-8", path.display())]
    NonUtf8 {
        /// The file.
        path: PathBuf,
    },
    /// A device node or other special file.
    #[error("{}: only files, directories, symlinks and fifos can be copied; add it to .dockerignore", path.display())]
    SpecialFile {
        /// The file.
        path: PathBuf,
    },
}

impl ExitCode for ContextError {
    fn exit_code(&self) -> i32 {
        match self {
            // The context is the user's directory: its files, their permissions, its .dockerignore.
            ContextError::Open { .. }
            | ContextError::Io { .. }
            | ContextError::Outside { .. }
            | ContextError::NotFound { .. }
            | ContextError::NoMatch { .. }
            | ContextError::Excluded { .. }
            | ContextError::SymlinkEscapes { .. }
            | ContextError::NonUtf8 { .. }
            | ContextError::SpecialFile { .. } => twinbox_exit::USER_ERROR,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ContextError + 'a {
    move |source| ContextError::Io { op, path: path.to_owned(), source }
}

/// An open build context.
#[derive(Debug, Clone)]
pub struct Context {
    root: PathBuf,
    rules: Vec<IgnoreRule>,
}

#[derive(Debug, Clone)]
struct IgnoreRule {
    /// `false` for a `!` exception.
    exclude: bool,
    parts: Vec<String>,
}

/// A source matched in the context.
#[derive(Debug, Clone)]
pub struct Source {
    /// The last component of the source as matched (before following symlinks): the name
    /// a file gets when it is copied into a directory.
    pub name: String,
    /// The real path on the host (symlinks followed), inside the context.
    pub real: PathBuf,
    /// `real` relative to the context root (`""` for the root), for `.dockerignore`.
    pub real_rel: String,
    /// Whether it is a directory.
    pub is_dir: bool,
}

/// What a context item is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemKind {
    /// A directory.
    Dir,
    /// A regular file of this size.
    File {
        /// Size in bytes.
        size: u64,
    },
    /// A symlink, copied as is.
    Symlink {
        /// Its target, as written.
        target: String,
    },
    /// A named pipe.
    Fifo,
}

/// A file, directory or symlink to copy.
#[derive(Debug, Clone)]
pub struct Item {
    /// Path relative to the source (`""` for the source itself).
    pub rel: String,
    /// What it is.
    pub kind: ItemKind,
    /// Permission bits with setuid/setgid/sticky.
    pub mode: u32,
    /// Modification time (seconds since the epoch, clamped at 0).
    pub mtime: u64,
    /// Where it is on the host.
    pub real: PathBuf,
    /// Device and inode of a regular file with more than one link (for hardlinks).
    pub inode: Option<(u64, u64)>,
}

impl Context {
    /// Open `dir` as a build context and read its `.dockerignore`.
    pub fn open(dir: &Path) -> Result<Self, ContextError> {
        let root = fs::canonicalize(dir).map_err(|source| ContextError::Open { path: dir.to_owned(), source })?;
        let meta = fs::metadata(&root).map_err(|source| ContextError::Open { path: dir.to_owned(), source })?;
        if !meta.is_dir() {
            return Err(ContextError::Open {
                path: dir.to_owned(),
                source: io::Error::from(io::ErrorKind::NotADirectory),
            });
        }
        let ignore = root.join(".dockerignore");
        let rules = match fs::read_to_string(&ignore) {
            Ok(text) => parse_ignore(&text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(ContextError::Io { op: "read", path: ignore, source: e }),
        };
        Ok(Self { root, rules })
    }

    /// The context root (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether `.dockerignore` excludes `rel` (a path relative to the root).
    pub fn is_excluded(&self, rel: &str) -> bool {
        if rel.is_empty() {
            return false;
        }
        let path: Vec<&str> = rel.split('/').collect();
        let mut excluded = false;
        for r in &self.rules {
            if pattern_matches(&r.parts, &path) {
                excluded = r.exclude;
            }
        }
        excluded
    }

    fn has_exceptions(&self) -> bool {
        self.rules.iter().any(|r| !r.exclude)
    }

    /// An excluded path may still be needed as the parent of a re-included one.
    fn visible(&self, rel: &str, is_dir: bool) -> bool {
        !self.is_excluded(rel) || (is_dir && self.has_exceptions())
    }

    /// The sources a `COPY`/`ADD` source pattern names, sorted by path.
    pub fn resolve(&self, pattern: &str) -> Result<Vec<Source>, ContextError> {
        let mut parts: Vec<&str> = Vec::new();
        for c in pattern.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    if parts.pop().is_none() {
                        return Err(ContextError::Outside { path: pattern.to_owned() });
                    }
                }
                c => parts.push(c),
            }
        }
        let is_glob = parts.iter().any(|p| has_meta(p));
        // (path as matched, real path, real path relative to the root)
        let mut current: Vec<(String, PathBuf, String)> = vec![(String::new(), self.root.clone(), String::new())];
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let mut next = Vec::new();
            for (matched, real, _) in &current {
                let names: Vec<String> = if has_meta(part) {
                    if !real.is_dir() {
                        continue;
                    }
                    let mut names = Vec::new();
                    for e in fs::read_dir(real).map_err(io_err("list", real))? {
                        let e = e.map_err(io_err("list", real))?;
                        let name = e.file_name().into_string().map_err(|_| ContextError::NonUtf8 { path: e.path() })?;
                        if glob_match(part, &name) {
                            names.push(name);
                        }
                    }
                    names.sort();
                    names
                } else {
                    vec![unescape(part)]
                };
                for name in names {
                    let written = if matched.is_empty() { name.clone() } else { format!("{matched}/{name}") };
                    let candidate = real.join(&name);
                    match fs::symlink_metadata(&candidate) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory => {
                            if is_glob {
                                continue;
                            }
                            return Err(ContextError::NotFound {
                                path: pattern.to_owned(),
                                context: self.root.clone(),
                            });
                        }
                        Err(e) => return Err(ContextError::Io { op: "stat", path: candidate, source: e }),
                    }
                    let resolved = match fs::canonicalize(&candidate) {
                        Ok(p) => p,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            // A dangling symlink: say where it leads.
                            let target = fs::read_link(&candidate).unwrap_or_default();
                            let target = real.join(target);
                            if !lexically_inside(&self.root, &target) {
                                return Err(ContextError::SymlinkEscapes { path: written, target });
                            }
                            if is_glob {
                                continue;
                            }
                            return Err(ContextError::NotFound {
                                path: pattern.to_owned(),
                                context: self.root.clone(),
                            });
                        }
                        Err(e) => return Err(ContextError::Io { op: "resolve", path: candidate, source: e }),
                    };
                    if !resolved.starts_with(&self.root) {
                        return Err(ContextError::SymlinkEscapes { path: written, target: resolved });
                    }
                    let real_rel = rel_str(&self.root, &resolved)?;
                    let is_dir = resolved.is_dir();
                    if !self.visible(&real_rel, is_dir) {
                        if is_glob {
                            continue;
                        }
                        return Err(ContextError::Excluded { path: pattern.to_owned() });
                    }
                    if !last && !is_dir {
                        if is_glob {
                            continue;
                        }
                        return Err(ContextError::NotFound { path: pattern.to_owned(), context: self.root.clone() });
                    }
                    next.push((written, resolved, real_rel));
                }
            }
            current = next;
        }
        if current.is_empty() {
            return Err(ContextError::NoMatch { pattern: pattern.to_owned(), context: self.root.clone() });
        }
        Ok(current
            .into_iter()
            .map(|(matched, real, real_rel)| {
                let is_dir = real.is_dir();
                let name = matched.rsplit('/').next().unwrap_or_default().to_owned();
                Source { name, real, real_rel, is_dir }
            })
            .collect())
    }

    /// The items a source stands for: the file itself, or everything below the directory
    /// (not the directory itself), honouring `.dockerignore`. Sorted by path.
    pub fn items(&self, src: &Source) -> Result<Vec<Item>, ContextError> {
        if !src.is_dir {
            let meta = fs::metadata(&src.real).map_err(io_err("stat", &src.real))?;
            return Ok(vec![item(String::new(), &src.real, &meta)?
                .ok_or_else(|| ContextError::SpecialFile { path: src.real.clone() })?]);
        }
        let mut out: Vec<(Item, bool)> = Vec::new();
        let exceptions = self.has_exceptions();
        let walker = walkdir::WalkDir::new(&src.real).min_depth(1).follow_links(false).sort_by_file_name();
        let mut it = walker.into_iter();
        while let Some(e) = it.next() {
            let e = e.map_err(|e| {
                let path = e.path().map(Path::to_owned).unwrap_or_else(|| src.real.clone());
                ContextError::Io { op: "walk", path, source: e.into() }
            })?;
            let rel = rel_str(&src.real, e.path())?;
            let real_rel = if src.real_rel.is_empty() { rel.clone() } else { format!("{}/{rel}", src.real_rel) };
            let is_dir = e.file_type().is_dir();
            let excluded = self.is_excluded(&real_rel);
            if excluded && !(is_dir && exceptions) {
                if is_dir {
                    it.skip_current_dir();
                }
                continue;
            }
            let meta = e.metadata().map_err(|err| ContextError::Io {
                op: "stat",
                path: e.path().to_owned(),
                source: err.into(),
            })?;
            if let Some(i) = item(rel, e.path(), &meta)? {
                out.push((i, excluded));
            }
        }
        // An excluded directory stays only as the parent of something re-included.
        let mut keep = vec![true; out.len()];
        for i in (0..out.len()).rev() {
            if out[i].1 {
                let prefix = format!("{}/", out[i].0.rel);
                keep[i] = out[i + 1..].iter().zip(&keep[i + 1..]).any(|((o, _), k)| *k && o.rel.starts_with(&prefix));
            }
        }
        Ok(out.into_iter().zip(keep).filter(|(_, k)| *k).map(|((i, _), _)| i).collect())
    }
}

/// Build an item from metadata; `None` for sockets (skipped, as Docker does).
fn item(rel: String, path: &Path, meta: &fs::Metadata) -> Result<Option<Item>, ContextError> {
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        ItemKind::Dir
    } else if ft.is_file() {
        ItemKind::File { size: meta.len() }
    } else if ft.is_symlink() {
        let target = fs::read_link(path).map_err(io_err("read link", path))?;
        let target =
            target.into_os_string().into_string().map_err(|_| ContextError::NonUtf8 { path: path.to_owned() })?;
        ItemKind::Symlink { target }
    } else if ft.is_fifo() {
        ItemKind::Fifo
    } else if ft.is_socket() {
        return Ok(None);
    } else {
        return Err(ContextError::SpecialFile { path: path.to_owned() });
    };
    let inode = (ft.is_file() && meta.nlink() > 1).then(|| (meta.dev(), meta.ino()));
    Ok(Some(Item {
        rel,
        kind,
        mode: meta.mode() & 0o7777,
        mtime: meta.mtime().max(0) as u64,
        real: path.to_owned(),
        inode,
    }))
}

fn rel_str(base: &Path, p: &Path) -> Result<String, ContextError> {
    let rel = p.strip_prefix(base).unwrap_or(p);
    rel.to_str().map(str::to_owned).ok_or_else(|| ContextError::NonUtf8 { path: p.to_owned() })
}

/// Whether `p`, cleaned lexically, lies under `root`.
fn lexically_inside(root: &Path, p: &Path) -> bool {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out.starts_with(root)
}

fn parse_ignore(text: &str) -> Vec<IgnoreRule> {
    let mut rules = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (exclude, pat) = match line.strip_prefix('!') {
            Some(p) => (false, p.trim()),
            None => (true, line),
        };
        let mut parts: Vec<String> = Vec::new();
        for c in pat.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                c => parts.push(c.to_owned()),
            }
        }
        if !parts.is_empty() {
            rules.push(IgnoreRule { exclude, parts });
        }
    }
    rules
}

/// Whether the pattern matches `path` or one of its parent directories.
fn pattern_matches(parts: &[String], path: &[&str]) -> bool {
    match parts.split_first() {
        None => true,
        Some((p, rest)) if p == "**" => (0..=path.len()).any(|k| pattern_matches(rest, &path[k..])),
        Some((p, rest)) => !path.is_empty() && glob_match(p, path[0]) && pattern_matches(rest, &path[1..]),
    }
}

/// Whether a path component has pattern characters.
pub fn has_meta(s: &str) -> bool {
    s.contains(['*', '?', '[', '\\'])
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Match one path component against a pattern with `*`, `?`, `[...]` (`[!...]`, `[^...]`,
/// ranges) and `\` escapes, like Go's `filepath.Match`. A malformed class matches literally.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    glob_at(&p, &n)
}

fn glob_at(p: &[char], n: &[char]) -> bool {
    let Some((&c, rest)) = p.split_first() else { return n.is_empty() };
    match c {
        '*' => (0..=n.len()).any(|k| glob_at(rest, &n[k..])),
        '?' => !n.is_empty() && glob_at(rest, &n[1..]),
        '[' => match class(rest) {
            Some((set, negated, after)) => {
                let Some((&first, tail)) = n.split_first() else { return false };
                let inside = set.iter().any(|&(lo, hi)| lo <= first && first <= hi);
                inside != negated && glob_at(after, tail)
            }
            None => n.first() == Some(&'[') && glob_at(rest, &n[1..]),
        },
        '\\' if !rest.is_empty() => n.first() == Some(&rest[0]) && glob_at(&rest[1..], &n[1..]),
        c => n.first() == Some(&c) && glob_at(rest, &n[1..]),
    }
}

type Class<'a> = (Vec<(char, char)>, bool, &'a [char]);

/// Parse a character class after its `[`: the ranges, whether negated, and what follows `]`.
fn class(p: &[char]) -> Option<Class<'_>> {
    let mut i = 0;
    let negated = matches!(p.first(), Some('!' | '^'));
    if negated {
        i += 1;
    }
    let mut set = Vec::new();
    let mut first = true;
    loop {
        let c = *p.get(i)?;
        if c == ']' && !first {
            return Some((set, negated, &p[i + 1..]));
        }
        first = false;
        let lo = if c == '\\' {
            i += 1;
            *p.get(i)?
        } else {
            c
        };
        i += 1;
        if p.get(i) == Some(&'-') && p.get(i + 1).is_some_and(|&c| c != ']') {
            let mut hi = p[i + 1];
            i += 2;
            if hi == '\\' {
                hi = *p.get(i)?;
                i += 1;
            }
            set.push((lo, hi));
        } else {
            set.push((lo, lo));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*.txt", "a.txt"));
        assert!(!glob_match("*.txt", "a.txt.bak"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("[a-c]x", "bx"));
        assert!(!glob_match("[!a-c]x", "bx"));
        assert!(glob_match("[^a-c]x", "dx"));
        assert!(glob_match("a\\*", "a*"));
        assert!(!glob_match("a\\*", "ab"));
        assert!(glob_match("[x", "[x"));
    }

    #[test]
    fn ignore_rules() {
        let rules = parse_ignore("# comment\n\n*.log\nbuild\n!build/keep\n**/secret\n/tmp/*\n");
        let ctx = Context { root: PathBuf::from("/nonexistent"), rules };
        assert!(ctx.is_excluded("a.log"));
        assert!(!ctx.is_excluded("dir/a.log"), "* does not cross /");
        assert!(ctx.is_excluded("build"));
        assert!(ctx.is_excluded("build/x/y"), "a matched directory excludes what is below it");
        assert!(!ctx.is_excluded("build/keep"));
        assert!(!ctx.is_excluded("build/keep/inner"));
        assert!(ctx.is_excluded("secret"));
        assert!(ctx.is_excluded("a/b/secret"));
        assert!(ctx.is_excluded("tmp/x"));
        assert!(!ctx.is_excluded("tmp"));
        assert!(!ctx.is_excluded("src/main.rs"));
    }
}

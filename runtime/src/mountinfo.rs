//! /proc/…/mountinfo (proc(5)): one line per mount, as the kernel prints it.

use std::path::PathBuf;

/// One line of mountinfo, the fields twinbox uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `MAJ:MIN` of the filesystem's device (`254:0`; `0:N` for those without one).
    pub device: String,
    pub mount_point: PathBuf,
    pub fstype: String,
    /// What was mounted (`/dev/vda`, `tmpfs`, `overlay`).
    pub source: String,
    pub super_options: Vec<String>,
}

/// Parses mountinfo text: `id parent maj:min root mount-point options [optional…] - fstype
/// source super-options`. Malformed lines are skipped; later lines are mounted on top of
/// earlier ones at the same place.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields.iter().skip(6).position(|f| *f == "-")? + 6;
    let device = (*fields.get(2)?).to_string();
    let mount_point = unescape(fields.get(4)?);
    let fstype = (*fields.get(sep + 1)?).to_string();
    let source = fields.get(sep + 2).map(|s| unescape(s)).unwrap_or_default();
    let super_options = fields.get(sep + 3).map(|o| o.split(',').map(str::to_string).collect()).unwrap_or_default();
    Some(MountEntry { device, mount_point: PathBuf::from(mount_point), fstype, source, super_options })
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = (bytes[i + 1] - b'0') as u32 * 64 + (bytes[i + 2] - b'0') as u32 * 8 + (bytes[i + 3] - b'0') as u32;
            if let Ok(b) = u8::try_from(v) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn escapes_and_optional_fields() {
        let m = parse("1 2 0:3 / /tmp/a\\040b rw shared:1 master:2 - cgroup2 cgroup2 rw\nbroken line\n");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].mount_point, Path::new("/tmp/a b"));
        assert_eq!(m[0].fstype, "cgroup2");
        assert_eq!((m[0].device.as_str(), m[0].source.as_str()), ("0:3", "cgroup2"));
        assert_eq!(unescape("a\\134b\\"), "a\\b\\");
    }
}

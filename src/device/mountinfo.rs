//! Reading `/proc/<task>/mountinfo`.

/// One mount: where, what filesystem type, from what source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount point, unescaped.
    pub mountpoint: String,
    /// Filesystem type (`ext4`, `overlay`, ...).
    pub fstype: String,
    /// Source (`/dev/ublkb0`, ...), as the kernel prints it.
    pub source: String,
}

/// The mounts listed in `path` (e.g. `/proc/self/mountinfo`); empty if it cannot be read.
pub fn mounts(path: &str) -> Vec<MountEntry> {
    std::fs::read_to_string(path)
        .map(|info| info.lines().filter_map(parse_line).collect())
        .unwrap_or_default()
}

fn parse_line(l: &str) -> Option<MountEntry> {
    let (pre, post) = l.split_once(" - ")?;
    let mountpoint = unescape(pre.split(' ').nth(4)?);
    let mut post = post.split(' ');
    Some(MountEntry {
        mountpoint,
        fstype: post.next()?.to_string(),
        source: post.next()?.to_string(),
    })
}

/// Whether `dir` is a mount point in the calling process's namespace.
pub fn is_mountpoint(dir: &std::path::Path) -> bool {
    let want = dir.to_string_lossy();
    mounts("/proc/self/mountinfo")
        .iter()
        .any(|m| m.mountpoint == want)
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let d = &b[i + 1..i + 4];
            if d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3' {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/mnt/tab\011x\134"), "/mnt/tab\tx\\");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn parses_lines() {
        let l = r"36 35 98:0 / /mnt/a\040b rw,noatime master:1 - ext4 /dev/ublkb0 ro";
        assert_eq!(
            parse_line(l),
            Some(MountEntry {
                mountpoint: "/mnt/a b".into(),
                fstype: "ext4".into(),
                source: "/dev/ublkb0".into()
            })
        );
        assert_eq!(parse_line("garbage"), None);
        assert!(is_mountpoint(std::path::Path::new("/")));
    }
}

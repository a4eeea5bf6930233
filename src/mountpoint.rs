//! The mountpoint as the mount table shows it: checked before mounting, and unmounted when
//! the service ends.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The mountpoint as an absolute path (the daemon leaves its working directory), after
/// checking that it is a directory nothing is mounted on.
pub fn check_mountpoint(path: &Path) -> Result<PathBuf, String> {
    let name = path.display();
    let meta = fs::metadata(path).map_err(|e| format!("{name}: cannot use as mountpoint: {e}"))?;
    if !meta.is_dir() {
        return Err(format!("{name}: mountpoint is not a directory"));
    }
    let absolute = path
        .canonicalize()
        .map_err(|e| format!("{name}: cannot use as mountpoint: {e}"))?;
    if is_mount_point(&absolute) {
        return Err(format!(
            "{name}: mountpoint is busy: something is already mounted there"
        ));
    }
    Ok(absolute)
}

pub fn is_mount_point(path: &Path) -> bool {
    // Paths in the table need not be UTF-8, so it is searched as bytes.
    let Ok(table) = fs::read("/proc/self/mountinfo") else {
        return false;
    };
    table
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .any(|field| unescape_mountinfo(field) == path.as_os_str().as_bytes())
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let escape = field.get(i + 1..i + 4).filter(|_| field[i] == b'\\');
        match escape.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok()) {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// Unmounts, or detaches the mount if files are still open on it (they keep failing with
/// `ENOTCONN` once the daemon exits).
pub fn unmount(mountpoint: &Path) -> std::io::Result<()> {
    if !is_mount_point(mountpoint) {
        // Unmounted meanwhile by someone else: the session is ending on its own.
        return Ok(());
    }
    let path = CString::new(mountpoint.as_os_str().as_bytes())?;
    for flags in [0, libc::MNT_DETACH] {
        // SAFETY: `path` is a valid NUL-terminated string.
        if unsafe { libc::umount2(path.as_ptr(), flags) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EBUSY) => continue,
            Some(libc::EPERM) => break,
            _ => return Err(err),
        }
    }
    // Unprivileged mounts are undone by the setuid helper.
    for lazy in [false, true] {
        let mut command = Command::new("fusermount3");
        command
            .arg("-u")
            .args(lazy.then_some("-z"))
            .arg("--")
            .arg(mountpoint);
        if command.status()?.success() {
            return Ok(());
        }
    }
    Err(std::io::Error::other("fusermount3 -u -z failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(br"/mnt/a\040b\134c"), b"/mnt/a b\\c");
        assert_eq!(unescape_mountinfo(br"/x\0"), b"/x\\0");
        assert!(is_mount_point(Path::new("/proc")));
        assert!(!is_mount_point(Path::new("/proc/self")));
    }

    #[test]
    fn mountpoint_must_be_an_unmounted_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_mountpoint(dir.path()).is_ok());
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        let err = check_mountpoint(&file).unwrap_err();
        assert!(
            err.contains("not a directory") && err.contains("/f"),
            "{err}"
        );
        let err = check_mountpoint(&dir.path().join("missing")).unwrap_err();
        assert!(
            err.contains("missing") && err.contains("No such file"),
            "{err}"
        );
        assert!(
            check_mountpoint(Path::new("/proc"))
                .unwrap_err()
                .contains("busy")
        );
    }
}

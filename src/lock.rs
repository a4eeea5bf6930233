//! Image locks that qemu honours, and that honour qemu's.
//!
//! qemu (`block/file-posix.c`) locks image files with open-file-description (OFD) byte
//! locks, all of them shared (read) locks, one byte per block-layer permission:
//! - byte `100 + p` while it *uses* permission `p`;
//! - byte `200 + p` while it *refuses to share* permission `p` with anyone else.
//!
//! Before using `p` it checks that nobody holds `200 + p`, and before refusing to share
//! `p` it checks that nobody holds `100 + p`. Taking the same bytes the same way makes a
//! mount and `qemu-img`/`qemu-io`/a VM exclude each other exactly as two qemu processes do:
//! a read-write mount uses read, write and resize and shares neither write nor resize
//! (what qemu takes for a writable image); a read-only mount uses read and shares neither
//! write nor resize (what `qemu-io -r` takes), so read-only users share an image while a
//! writer excludes everyone else. Parents of differencing images are locked as read-only
//! images are, as qemu locks backing files.
//!
//! A whole-file `flock` (exclusive when read-write) comes with the byte locks; qemu
//! ignores it but `flock(1)` sees it: a script can wait for a daemon to finish closing
//! the image after `umount` with `flock IMAGE true`.
//!
//! OFD locks hide their owner (`F_OFD_GETLK` and `/proc/locks` say pid -1), so the holder
//! is found through `/proc/PID/fdinfo`, which lists the locks of each open file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// qemu's `RAW_LOCK_PERM_BASE`: byte `100 + p` is held while permission `p` is in use.
const PERM_BASE: u64 = 100;
/// qemu's `RAW_LOCK_SHARED_BASE`: byte `200 + p` is held while permission `p` is not shared.
const SHARED_BASE: u64 = 200;

/// qemu's block-layer permissions, as bit numbers (`BLK_PERM_*`).
const CONSISTENT_READ: u64 = 0;
const WRITE: u64 = 1;
const RESIZE: u64 = 3;

/// Permissions a mount uses, and permissions it refuses to share.
fn permissions(read_only: bool) -> (&'static [u64], &'static [u64]) {
    if read_only {
        (&[CONSISTENT_READ], &[WRITE, RESIZE])
    } else {
        (&[CONSISTENT_READ, WRITE, RESIZE], &[WRITE, RESIZE])
    }
}

/// Locks the image open as `file` for reading only (shared with other readers) or for
/// writing (exclusive), or says who holds it: "image is in use (pid N)". The locks belong
/// to the open file description: they last until its last descriptor is closed, and a
/// refused attempt's partial locks go with it.
pub fn lock(file: &File, read_only: bool) -> Result<(), String> {
    let (used, unshared) = permissions(read_only);
    // Locks first, checks second (as qemu does): of two openers racing, at least one
    // then sees the other, so both can never succeed.
    let taken = used
        .iter()
        .map(|p| PERM_BASE + p)
        .chain(unshared.iter().map(|p| SHARED_BASE + p));
    for byte in taken {
        set_read_lock(file, byte).map_err(|e| format!("cannot lock image: {e}"))?;
    }
    let conflicts = used
        .iter()
        .map(|p| SHARED_BASE + p)
        .chain(unshared.iter().map(|p| PERM_BASE + p));
    for byte in conflicts {
        let held =
            held_by_others(file, byte).map_err(|e| format!("cannot test the image's lock: {e}"))?;
        if held {
            return Err(format!("image is in use ({})", holder(file, byte)));
        }
    }
    let mode = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a valid descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            format!("image is in use ({})", holder(file, 0))
        } else {
            format!("cannot lock image: {err}")
        });
    }
    Ok(())
}

/// Opens the image at `path` for a command that works on it offline, locked as a mount
/// locks it: shared when `read_only`, else exclusive; held until the file is closed.
pub fn open_locked(path: &Path, read_only: bool) -> crate::error::Result<File> {
    use crate::error::{Error, ErrorKind, IoContext};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .context(|| "cannot open image".to_string())?;
    lock(&file, read_only).map_err(|problem| Error::new(ErrorKind::InUse(problem)))?;
    Ok(file)
}

/// An image locked for as long as this value lives.
#[derive(Debug)]
pub struct ImageLock {
    file: File,
}

impl ImageLock {
    /// Opens `image` and [`lock`]s it; errors name the image.
    pub fn acquire(image: &Path, read_only: bool) -> Result<ImageLock, String> {
        let name = image.display();
        let file = File::open(image).map_err(|e| format!("{name}: cannot open image: {e}"))?;
        lock(&file, read_only).map_err(|e| format!("{name}: {e}"))?;
        Ok(ImageLock { file })
    }

    /// The locked image, opened read-only.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Unlocks before the file closes. The locks belong to the open file description, and a
/// child forked meanwhile by another thread holds that description until it execs: only
/// closing would leave the image locked until then, while unlocking frees it at once.
impl Drop for ImageLock {
    fn drop(&mut self) {
        let fd = self.file.as_raw_fd();
        // The whole file, as `l_len` 0 means.
        let request = lock_request(libc::F_UNLCK as libc::c_short, 0);
        let request = libc::flock {
            l_len: 0,
            ..request
        };
        // SAFETY: a valid descriptor and a valid flock structure; failures leave the locks
        // to go with the description, as they would without this.
        unsafe {
            libc::fcntl(fd, libc::F_OFD_SETLK, &request);
            libc::flock(fd, libc::LOCK_UN);
        }
    }
}

fn lock_request(kind: libc::c_short, byte: u64) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value (pid 0 as OFD locks require).
    let mut request: libc::flock = unsafe { std::mem::zeroed() };
    request.l_type = kind;
    request.l_whence = libc::SEEK_SET as libc::c_short;
    request.l_start = byte as libc::off_t;
    request.l_len = 1;
    request
}

fn set_read_lock(file: &File, byte: u64) -> io::Result<()> {
    let request = lock_request(libc::F_RDLCK as libc::c_short, byte);
    // SAFETY: a valid descriptor and a valid flock structure.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &request) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether another open file description holds a lock on `byte`: our own locks never
/// conflict with a test through the same description.
fn held_by_others(file: &File, byte: u64) -> io::Result<bool> {
    let mut request = lock_request(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: a valid descriptor and a valid, writable flock structure.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut request) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(request.l_type != libc::F_UNLCK as libc::c_short)
}

/// Names the process holding `byte` of `file` locked, as far as `/proc` lets us see.
fn holder(file: &File, byte: u64) -> String {
    let Ok(meta) = file.metadata() else {
        return "by another program".to_string();
    };
    let pids = lock_holders(meta.dev(), meta.ino(), byte);
    match pids.as_slice() {
        [] => "by another program".to_string(),
        [pid] => format!("pid {pid}"),
        many => {
            let list: Vec<String> = many.iter().map(|p| p.to_string()).collect();
            format!("pids {}", list.join(", "))
        }
    }
}

/// Every other process with an open file on (`dev`, `ino`) whose locks cover `byte`.
fn lock_holders(dev: u64, ino: u64, byte: u64) -> Vec<u32> {
    // Lock lines name the file as "MAJOR:MINOR:INODE", major and minor in hex.
    let file_id = format!(
        "{:02x}:{:02x}:{ino}",
        libc::major(dev as libc::dev_t),
        libc::minor(dev as libc::dev_t)
    );
    let me = std::process::id();
    let mut pids = Vec::new();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for process in processes.flatten() {
        let Some(pid) = process.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Unreadable entries (other users' processes, exited ones) are simply skipped.
        let Ok(fds) = std::fs::read_dir(process.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_to_string(fd.path())
                .is_ok_and(|info| info.lines().any(|l| lock_line_covers(l, &file_id, byte)))
        });
        if holds {
            pids.push(pid);
        }
    }
    pids
}

/// Whether an fdinfo line like `lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:1234 100 101`
/// describes a lock on `file_id` covering `byte` (`EOF` ends a lock that runs to the end).
fn lock_line_covers(line: &str, file_id: &str, byte: u64) -> bool {
    let Some(rest) = line.strip_prefix("lock:") else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let Some(at) = fields.iter().position(|f| *f == file_id) else {
        return false;
    };
    let start = fields.get(at + 1).and_then(|s| s.parse::<u64>().ok());
    let end = match fields.get(at + 2) {
        Some(&"EOF") => Some(u64::MAX),
        Some(s) => s.parse::<u64>().ok(),
        None => None,
    };
    matches!((start, end), (Some(start), Some(end)) if (start..=end).contains(&byte))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(4096).unwrap();
        file
    }

    // OFD locks of two descriptions conflict even inside one process, so one test
    // process can play both sides.
    #[test]
    fn a_writer_excludes_everyone_and_readers_share() {
        let file = image();
        let writer = ImageLock::acquire(file.path(), false).unwrap();
        for read_only in [false, true] {
            let err = ImageLock::acquire(file.path(), read_only).unwrap_err();
            assert!(err.contains("image is in use"), "{err}");
            assert!(err.contains(file.path().to_str().unwrap()), "{err}");
        }
        drop(writer);

        let reader = ImageLock::acquire(file.path(), true).unwrap();
        let second = ImageLock::acquire(file.path(), true).unwrap();
        assert!(ImageLock::acquire(file.path(), false).is_err());
        drop(reader);
        assert!(ImageLock::acquire(file.path(), false).is_err());
        drop(second);
        ImageLock::acquire(file.path(), false).unwrap();
    }

    #[test]
    fn a_refused_attempt_leaves_no_bytes_locked() {
        let file = image();
        let reader = ImageLock::acquire(file.path(), true).unwrap();
        assert!(ImageLock::acquire(file.path(), false).is_err());
        drop(reader);
        // Had the failed writer kept its bytes, this writer would see them.
        ImageLock::acquire(file.path(), false).unwrap();
    }

    #[test]
    fn the_bytes_are_qemus() {
        let file = image();
        let _writer = ImageLock::acquire(file.path(), false).unwrap();
        let probe = File::open(file.path()).unwrap();
        let held: Vec<u64> = (95..210)
            .filter(|&b| held_by_others(&probe, b).unwrap())
            .collect();
        assert_eq!(held, [100, 101, 103, 201, 203]);
    }

    #[test]
    fn a_flock_on_the_image_also_counts() {
        let file = image();
        let other = File::open(file.path()).unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_SH) }, 0);
        ImageLock::acquire(file.path(), true).unwrap();
        let err = ImageLock::acquire(file.path(), false).unwrap_err();
        assert!(err.contains("in use"), "{err}");
    }

    #[test]
    fn lock_lines_are_matched_by_file_and_range() {
        let line = "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:1234 100 101";
        assert!(lock_line_covers(line, "fe:00:1234", 100));
        assert!(lock_line_covers(line, "fe:00:1234", 101));
        assert!(!lock_line_covers(line, "fe:00:1234", 102));
        assert!(!lock_line_covers(line, "fe:00:12345", 100));
        assert!(!lock_line_covers("pos:\t0", "fe:00:1234", 100));
        let to_end = "lock:\t1: POSIX  ADVISORY  WRITE 77 08:01:9 0 EOF";
        assert!(lock_line_covers(to_end, "08:01:9", 201));
        assert!(!lock_line_covers(
            "lock:\t1: POSIX fe:00:1234 x",
            "fe:00:1234",
            1
        ));
    }

    #[test]
    fn the_holder_is_named_by_pid() {
        let file = image();
        let child_lock = file.path().to_owned();
        // The holder must be another process: our own pid is never reported.
        let mut child = std::process::Command::new("flock")
            // --close: the lock stays with flock itself, not with the command it runs.
            .args(["--shared", "--close"])
            .arg(&child_lock)
            .args(["sleep", "30"])
            .spawn()
            .unwrap();
        // flock(2) locks show in fdinfo too, as whole-file locks.
        let meta = std::fs::metadata(&child_lock).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut pids = Vec::new();
        while pids.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            pids = lock_holders(meta.dev(), meta.ino(), 150);
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(pids, [child.id()]);
    }
}

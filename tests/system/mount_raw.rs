//! Real mounts of plain files with `-o format=raw`: the FUSE layer measured on its own,
//! and the daemon's life cycle (background start, unmount, signals, foreground mode).

use crate::common;
use crate::common::mount::{self, Mount};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A raw file of `size` bytes holding qemu-io patterns.
fn patterned_raw(dir: &Path, size: u64) -> PathBuf {
    let image = dir.join("disk.raw");
    common::qemu_img(&[
        "create",
        "-f",
        "raw",
        image.to_str().unwrap(),
        &size.to_string(),
    ]);
    common::qemu_io(
        "raw",
        &image,
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 1536k 1m",
            &format!("write -P 0x33 {} 4096", size / 4096 * 4096 - 8192),
        ],
    );
    image
}

#[test]
fn raw_mount_reads_writes_and_remounts_read_only() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Not a multiple of any sector size: the last partial sector must work too.
    let image = patterned_raw(dir.path(), 24 * MIB + 1234);
    // Every byte of a raw file is data: there is no hole to report.
    assert_eq!(mount::round_trip(&image, "raw", &["format=raw"], MIB), 0);
}

#[test]
fn punched_holes_read_as_zeros_and_stay_inside_the_disk() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = patterned_raw(dir.path(), 4 * MIB);
    let reference = dir.path().join("reference.raw");
    std::fs::copy(&image, &reference).unwrap();

    let mount = Mount::new(&image, &["format=raw"]);
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mount.disk())
        .unwrap();
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    for (offset, len) in [(1000i64, 70_000i64), (4 * MIB as i64 - 100, 1000)] {
        // SAFETY: a plain syscall on an open descriptor.
        let rc = unsafe { libc::fallocate(disk.as_raw_fd(), punch, offset, len) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        let end = (offset + len).min(4 * MIB as i64) as u64;
        let zeros = vec![0u8; (end - offset as u64) as usize];
        std::fs::OpenOptions::new()
            .write(true)
            .open(&reference)
            .unwrap()
            .write_all_at(&zeros, offset as u64)
            .unwrap();
    }
    // Growing the file is not possible, whatever the request.
    // SAFETY: as above.
    let rc = unsafe { libc::fallocate(disk.as_raw_fd(), 0, 0, 8 * MIB as i64) };
    assert_eq!(rc, -1);
    assert_eq!(disk.metadata().unwrap().len(), 4 * MIB);
    assert_eq!(
        disk.set_len(MIB).unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
    drop(disk);
    mount::assert_same_bytes(&mount.disk(), &reference);
    mount.unmount();
    mount::assert_same_bytes(&image, &reference);
}

#[test]
fn only_disk_img_exists_and_nothing_can_be_added() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = patterned_raw(dir.path(), 4 * MIB);
    let mount = Mount::new(&image, &["format=raw"]);
    let names: Vec<_> = std::fs::read_dir(mount.mountpoint())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["disk.img"]);
    let meta = std::fs::metadata(mount.disk()).unwrap();
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getuid cannot fail.
    assert_eq!(meta.uid(), unsafe { libc::getuid() });
    assert_eq!(meta.mode() & 0o777, 0o644);
    let refused = [
        std::fs::File::create(mount.mountpoint().join("new")).map(drop),
        std::fs::create_dir(mount.mountpoint().join("d")),
        std::fs::remove_file(mount.disk()),
        std::fs::rename(mount.disk(), mount.mountpoint().join("other")),
    ];
    for result in refused {
        assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EPERM));
    }
    mount.unmount();
}

#[test]
fn sigterm_unmounts_and_the_daemon_exits_cleanly() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = patterned_raw(dir.path(), 4 * MIB);
    let mount = Mount::new(&image, &["format=raw"]);
    let mountpoint = mount.mountpoint().to_path_buf();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(mount.daemon_pid(), libc::SIGTERM) }, 0);
    assert_eq!(mount.wait_for_exit(), Some(0));
    assert!(!mount::is_mounted(&mountpoint));
}

#[test]
fn foreground_mode_serves_until_unmounted() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = patterned_raw(dir.path(), 4 * MIB);
    let mountpoint = dir.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let mut daemon = Command::new(mount::BIN)
        .args(["-f", "-o", "format=raw"])
        .args(mount::transport_options().iter().flat_map(|o| ["-o", o]))
        .arg(&image)
        .arg(&mountpoint)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !mount::is_mounted(&mountpoint) {
        assert!(daemon.try_wait().unwrap().is_none(), "daemon exited early");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "mount never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(mountpoint.join("disk.img"))
        .unwrap();
    disk.write_all_at(b"foreground", 4096).unwrap();
    drop(disk);
    common::run(Command::new("fusermount3").arg("-u").arg(&mountpoint));
    let status = daemon.wait().unwrap();
    assert!(status.success(), "{status}");
    let mut buf = [0u8; 10];
    std::fs::File::open(&image)
        .unwrap()
        .read_exact_at(&mut buf, 4096)
        .unwrap();
    assert_eq!(&buf, b"foreground");
}

#[test]
fn parallel_writers_to_disjoint_ranges_all_land() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = patterned_raw(dir.path(), 16 * MIB);
    let reference = dir.path().join("reference.raw");
    std::fs::copy(&image, &reference).unwrap();
    let mount = Mount::new(&image, &["format=raw", "threads=4"]);
    let chunks: Vec<(u64, Vec<u8>)> = (0..8u64)
        .map(|i| (i * 2 * MIB + 333, mount::pattern(i, (MIB + 17) as usize)))
        .collect();
    std::thread::scope(|s| {
        for (offset, data) in &chunks {
            let disk = mount.disk();
            s.spawn(move || {
                let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
                for piece in 0..data.len().div_ceil(4096) {
                    let start = piece * 4096;
                    let end = (start + 4096).min(data.len());
                    f.write_all_at(&data[start..end], offset + start as u64)
                        .unwrap();
                }
                f.sync_all().unwrap();
            });
        }
    });
    let plain = std::fs::OpenOptions::new()
        .write(true)
        .open(&reference)
        .unwrap();
    for (offset, data) in &chunks {
        plain.write_all_at(data, *offset).unwrap();
    }
    mount.unmount();
    mount::assert_same_bytes(&image, &reference);
}

/// Reads the first bytes of `file` as the unprivileged user `nobody`.
fn read_as_nobody(file: &Path) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "head",
            "-c",
            "4",
        ])
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn other_users_get_in_only_with_allow_other() {
    if !mount::fuse_available() {
        return;
    }
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        assert!(std::env::var_os("CI").is_none(), "CI must run as root");
        eprintln!("SKIPPED: switching to another user needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("shared.raw");
    std::fs::write(&image, b"abcd".repeat(1024)).unwrap();

    let private = Mount::new(&image, &["format=raw,ro"]);
    let out = read_as_nobody(&private.disk());
    assert!(!out.status.success(), "another user read a private mount");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    private.unmount();

    let shared = Mount::new(&image, &["format=raw,ro,allow_other"]);
    let out = read_as_nobody(&shared.disk());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"abcd");
    shared.unmount();
}

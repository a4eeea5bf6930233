//! Faults of the system under the image: the filesystem holding it fills up, the image
//! file is removed, or its filesystem is unmounted underneath the daemon.

use crate::common;
use crate::common::mount::{self, FsMount, LoopDevice, Mount};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn create(image: &Path, qemu_format: &str, options: &str, size: u64) {
    common::qemu_img(&[
        "create",
        "-f",
        qemu_format,
        "-o",
        options,
        image.to_str().unwrap(),
        &size.to_string(),
    ]);
}

/// A foreground daemon whose log goes to a file.
fn mount_logging(image: &Path, log: &Path) -> Mount {
    let log = File::create(log).unwrap();
    Mount::foreground(image, &["log_level=warn"], |cmd| {
        cmd.stderr(Stdio::from(log));
    })
}

fn chunk(i: u64) -> Vec<u8> {
    mount::pattern(i, MIB as usize)
}

/// Writes 1 MiB chunks from chunk `first` on until one fails; returns the first chunk
/// not written and the error.
fn fill(disk: &File, first: u64, size: u64) -> (u64, std::io::Error) {
    let mut i = first;
    loop {
        assert!((i + 1) * MIB <= size, "the disk never filled up");
        if let Err(e) = disk.write_all_at(&chunk(i), i * MIB) {
            return (i, e);
        }
        i += 1;
    }
}

fn disk_full(qemu_format: &str, options: &str) {
    let space = FsMount::tmpfs(24 * MIB);
    let image = space.path().join(format!("full.{qemu_format}"));
    create(&image, qemu_format, options, 256 * MIB);
    let filler = space.path().join("filler");
    std::fs::write(&filler, vec![1u8; 4 * MIB as usize]).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("daemon.log");

    let mount = mount_logging(&image, &log);
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mount.disk())
        .unwrap();
    let size = disk.metadata().unwrap().len();
    let (full_at, err) = fill(&disk, 0, size);
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(full_at > 2, "the disk was full from the start");
    // The daemon keeps serving: what was acknowledged is durable and reads back.
    disk.sync_all().unwrap();
    let mut back = vec![0u8; MIB as usize];
    disk.read_exact_at(&mut back, 0).unwrap();
    assert!(back == chunk(0));

    // Space freed: writes succeed again, until the filesystem is full once more.
    std::fs::remove_file(&filler).unwrap();
    let (full_again, err) = fill(&disk, full_at, size);
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(
        full_again > full_at,
        "no write succeeded after space was freed"
    );
    disk.sync_all().unwrap();
    drop(disk);
    // Closed on a full filesystem.
    mount.unmount();

    let logged = std::fs::read_to_string(&log).unwrap();
    let line = format!("write of {MIB} bytes at offset {}", full_at * MIB);
    assert!(logged.contains(&line), "{line:?} not logged:\n{logged}");
    assert!(logged.contains("No space left on device"), "{logged}");

    common::qemu_check_clean(qemu_format, &image);
    let raw = scratch.path().join("raw");
    common::qemu_convert_to_raw(qemu_format, &image, &raw);
    let raw = File::open(&raw).unwrap();
    for i in 0..full_again {
        raw.read_exact_at(&mut back, i * MIB).unwrap();
        assert!(
            back == chunk(i),
            "acknowledged chunk {i} is not in the image"
        );
    }
}

#[test]
fn a_full_filesystem_fails_vhdx_writes_with_enospc_and_recovers() {
    if mount::fuse_available() {
        disk_full("vhdx", "block_size=1M");
    }
}

#[test]
fn a_full_filesystem_fails_vhd_writes_with_enospc_and_recovers() {
    if mount::fuse_available() {
        disk_full("vpc", "subformat=dynamic");
    }
}

/// Keeps writing (and syncing) through `disk` until the daemon fails a request; the
/// error must be EIO, and come within a few seconds.
fn expect_eio_soon(disk: &File) {
    let start = Instant::now();
    let err = loop {
        let attempt = disk
            .write_all_at(&chunk(1), MIB)
            .and_then(|()| disk.sync_data());
        if let Err(e) = attempt {
            break e;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the daemon went on acknowledging writes to a vanished image"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Far from the writes, so the kernel's page cache cannot answer.
    let mut buf = [0u8; 512];
    let err = disk.read_exact_at(&mut buf, 40 * MIB).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
}

#[test]
fn a_removed_image_fails_requests_with_eio_and_still_unmounts() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("gone.vhdx");
    create(&image, "vhdx", "block_size=1M", 64 * MIB);
    let log = dir.path().join("daemon.log");
    let mount = mount_logging(&image, &log);
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mount.disk())
        .unwrap();
    disk.write_all_at(&chunk(0), 0).unwrap();
    disk.sync_data().unwrap();
    std::fs::remove_file(&image).unwrap();
    expect_eio_soon(&disk);
    drop(disk);
    // Unmounting still works; the daemon reports that the service failed.
    assert_eq!(mount.unmount_status(), Some(1));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("image file was removed"), "{logged}");
}

/// An ext4 filesystem in a file, on a loop device, mounted.
fn ext4(dir: &Path) -> (LoopDevice, FsMount, PathBuf) {
    let backing = dir.join("ext4.img");
    File::create(&backing).unwrap().set_len(128 * MIB).unwrap();
    common::run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&backing));
    let device = LoopDevice::attach(&backing);
    let fs = FsMount::new(device.path());
    (device, fs, backing)
}

#[test]
fn a_lazily_unmounted_filesystem_fails_requests_with_eio_and_keeps_the_image_whole() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (device, fs, _backing) = ext4(dir.path());
    let image = fs.path().join("lazy.vhdx");
    create(&image, "vhdx", "block_size=1M", 64 * MIB);
    let mount = mount_logging(&image, &dir.path().join("daemon.log"));
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mount.disk())
        .unwrap();
    disk.write_all_at(&chunk(0), 0).unwrap();
    disk.sync_data().unwrap();
    // The filesystem leaves the namespace, but lives on while the daemon holds the image.
    fs.detach();
    expect_eio_soon(&disk);
    drop(disk);
    assert_eq!(mount.unmount_status(), Some(1));
    let logged = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(
        logged.contains("filesystem holding the image file was unmounted"),
        "{logged}"
    );

    // With the daemon gone, the filesystem is really unmounted; mounted again, it holds
    // a clean image with the write acknowledged before the unmount.
    let fs = FsMount::new(device.path());
    let image = fs.path().join("lazy.vhdx");
    common::qemu_check_clean("vhdx", &image);
    let out = common::qemu_io("vhdx", &image, &["read -v 0 16"]);
    let expected: String = chunk(0)[..16].iter().map(|b| format!("{b:02x} ")).collect();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(expected.trim_end()),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    fs.unmount();
}

/// Binds the system log socket for as long as this lives, so a test can read what a
/// background daemon logs; removed on drop.
struct SystemLog(std::os::unix::net::UnixDatagram);

impl SystemLog {
    const SOCKET: &str = "/dev/log";

    fn listen() -> Option<SystemLog> {
        if Path::new(Self::SOCKET).exists() {
            // A real system log owns it; its records cannot be read back here.
            assert!(
                std::env::var_os("CI").is_none(),
                "{} exists; CI must run the system-log test",
                Self::SOCKET
            );
            eprintln!("SKIPPED: {} belongs to a running system log", Self::SOCKET);
            return None;
        }
        let socket = std::os::unix::net::UnixDatagram::bind(Self::SOCKET).ok()?;
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Some(SystemLog(socket))
    }

    /// Records received until one contains `needle` (which is returned).
    fn wait_for(&self, needle: &str) -> String {
        let mut buf = [0u8; 4096];
        loop {
            let n = self.0.recv(&mut buf).expect("nothing logged");
            let record = String::from_utf8_lossy(&buf[..n]).into_owned();
            if record.contains(needle) {
                return record;
            }
        }
    }
}

impl Drop for SystemLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(Self::SOCKET);
    }
}

#[test]
fn a_background_daemon_logs_io_errors_to_the_system_log() {
    // SAFETY: getuid cannot fail.
    if !mount::fuse_available() || unsafe { libc::getuid() } != 0 {
        return;
    }
    let Some(system_log) = SystemLog::listen() else {
        return;
    };
    let space = FsMount::tmpfs(12 * MIB);
    let image = space.path().join("log.vhdx");
    create(&image, "vhdx", "block_size=1M", 64 * MIB);
    let mount = Mount::new(&image, &[]);
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.disk())
        .unwrap();
    let (full_at, err) = fill(&disk, 0, 64 * MIB);
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    let record = system_log.wait_for("No space left on device");
    let expected = format!(
        "<27>vdisk-mount[{}]: write of {MIB} bytes at offset {} failed",
        mount.daemon_pid(),
        full_at * MIB
    );
    assert!(record.starts_with(&expected), "{record}");
    drop(disk);
    mount.unmount();
}

/// `EXT4_IOC_SHUTDOWN`, `_IOR('X', 125, __u32)`: the filesystem stops, as when its disk
/// dies, and every later I/O on it fails with `EIO`.
const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587d;
/// Drop the journal's uncommitted part, as a dead disk would.
const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;

#[test]
fn a_failing_filesystem_passes_eio_through_and_the_daemon_keeps_answering() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (device, fs, _backing) = ext4(dir.path());
    let image = fs.path().join("dying.vhdx");
    create(&image, "vhdx", "block_size=1M", 64 * MIB);
    let log = dir.path().join("daemon.log");
    let mount = mount_logging(&image, &log);
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mount.disk())
        .unwrap();
    disk.write_all_at(&chunk(0), 0).unwrap();
    disk.sync_data().unwrap();

    let root = File::open(fs.path()).unwrap();
    let flags = EXT4_GOING_FLAGS_NOLOGFLUSH;
    // SAFETY: the ioctl reads one u32 from a valid pointer.
    let rc = unsafe { libc::ioctl(root.as_raw_fd(), EXT4_IOC_SHUTDOWN, &flags) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    drop(root);

    let err = disk
        .write_all_at(&chunk(3), 3 * MIB)
        .and_then(|()| disk.sync_data())
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Reading written data must reach the image file: O_DIRECT passes the kernel's page
    // cache by. (Unwritten ranges read as zeros without the file, and still do.)
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(mount.disk())
        .unwrap();
    let mut aligned = vec![0u8; 8192];
    let start = aligned.as_ptr().align_offset(4096);
    let err = direct
        .read_exact_at(&mut aligned[start..start + 4096], 0)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(direct);
    // The daemon is still there, answering what needs no image.
    assert_eq!(std::fs::metadata(mount.disk()).unwrap().len(), 64 * MIB);
    drop(disk);
    // Unmounting works; closing the image could not, so the daemon reports failure.
    assert_eq!(mount.unmount_status(), Some(1));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("Input/output error"), "{logged}");
    assert!(logged.contains(" at offset "), "{logged}");

    // Mounted again (its journal replayed), the filesystem holds the image as a crash
    // would have left it: it opens (replaying its own log if the failure left one), holds
    // what was made durable before the failure, and closes clean for qemu.
    fs.unmount();
    let fs = FsMount::new(device.path());
    let image = fs.path().join("dying.vhdx");
    let mount = Mount::new(&image, &[]);
    let mut back = vec![0u8; MIB as usize];
    File::open(mount.disk())
        .unwrap()
        .read_exact_at(&mut back, 0)
        .unwrap();
    assert!(back == chunk(0), "the synced chunk is gone");
    mount.unmount();
    common::qemu_check_clean("vhdx", &image);
    fs.unmount();
}

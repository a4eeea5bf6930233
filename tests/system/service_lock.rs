//! Image locks that qemu honours both ways: while vdisk-mount serves an image read-write,
//! qemu-img/qemu-io cannot open it, and while qemu has it open for writing, vdisk-mount
//! refuses it, naming the process that holds it. Readers share.

use crate::common;
use crate::common::mount::{self, Mount};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn qemu_vhdx(dir: &Path) -> PathBuf {
    let image = dir.join("locked.vhdx");
    common::qemu_img(&["create", "-f", "vhdx", image.to_str().unwrap(), "64M"]);
    image
}

/// qemu-io on `image` without `-c`: it keeps the image open until its input ends.
pub(crate) struct QemuIo(Child);

impl QemuIo {
    pub(crate) fn open(image: &Path, read_only: bool) -> QemuIo {
        let mut command = Command::new("qemu-io");
        command.args(["-f", "vhdx"]);
        if read_only {
            command.arg("-r");
        }
        let child = command
            .arg(image)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // Open once its locks show up in the kernel's lock table.
        let inode = format!(":{} ", std::fs::metadata(image).unwrap().ino());
        let start = Instant::now();
        while !std::fs::read_to_string("/proc/locks")
            .unwrap()
            .contains(&inode)
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "qemu-io did not open"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        QemuIo(child)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

pub(crate) fn qemu_io_write(image: &Path) -> Output {
    Command::new("qemu-io")
        .args(["-f", "vhdx", "-c", "write -P 0x55 0 4k"])
        .arg(image)
        .output()
        .unwrap()
}

pub(crate) fn qemu_io_read(image: &Path) -> Output {
    Command::new("qemu-io")
        .args(["-r", "-f", "vhdx", "-c", "read 0 4k"])
        .arg(image)
        .output()
        .unwrap()
}

pub(crate) fn assert_qemu_refused(out: &Output, lock: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "qemu opened a locked image");
    assert!(stderr.contains(lock), "{stderr}");
}

/// Mounting must fail at once with one line naming the image and the holder's pid.
pub(crate) fn assert_mount_refused(image: &Path, options: &[&str], holder: u32) {
    let mountpoint = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let out = Mount::start(image, options, mountpoint.path());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "refusal took long"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mounted an image in use");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let expected = format!("{}: image is in use (pid {holder})", image.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(!mount::is_mounted(mountpoint.path()));
}

#[test]
fn a_read_write_mount_keeps_qemu_out() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhdx(dir.path());
    let mount = Mount::new(&image, &[]);
    assert_qemu_refused(&qemu_io_write(&image), "Failed to get \"write\" lock");
    assert_qemu_refused(&qemu_io_read(&image), "Failed to get shared \"write\" lock");
    assert_mount_refused(&image, &[], mount.daemon_pid() as u32);
    assert_mount_refused(&image, &["ro"], mount.daemon_pid() as u32);
    // The mount still serves, and qemu gets in once it is gone.
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(mount.disk())
        .unwrap()
        .write_all_at(&[0x66; 4096], 0)
        .unwrap();
    mount.unmount();
    common::qemu_io("vhdx", &image, &["read -P 0x66 0 4k", "write -P 0x55 0 4k"]);
}

#[test]
fn a_read_only_mount_shares_with_qemu_readers_only() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhdx(dir.path());
    let mount = Mount::new(&image, &["ro"]);
    let out = qemu_io_read(&image);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_qemu_refused(&qemu_io_write(&image), "Failed to get \"write\" lock");
    assert_mount_refused(&image, &[], mount.daemon_pid() as u32);
    let second = Mount::new(&image, &["ro"]);
    second.unmount();
    mount.unmount();
}

#[test]
fn qemu_writing_keeps_mounts_out() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhdx(dir.path());
    let qemu = QemuIo::open(&image, false);
    assert_mount_refused(&image, &[], qemu.pid());
    assert_mount_refused(&image, &["ro"], qemu.pid());
    drop(qemu);
    Mount::new(&image, &[]).unmount();
}

#[test]
fn qemu_reading_shares_with_read_only_mounts() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhdx(dir.path());
    let qemu = QemuIo::open(&image, true);
    assert_mount_refused(&image, &[], qemu.pid());
    let mount = Mount::new(&image, &["ro"]);
    assert_eq!(std::fs::read(mount.disk()).unwrap().len(), 64 << 20);
    mount.unmount();
    drop(qemu);
}

#[test]
fn parents_are_shared_with_readers_and_kept_from_writers() {
    if !mount::fuse_available() {
        return;
    }
    use vdisk_mount::chain::parent_image;
    use vdisk_mount::vhd::{VhdCreateOptions, VhdKind, create_vhd};
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    common::qemu_img(&[
        "create",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic",
        base.to_str().unwrap(),
        "16M",
    ]);
    common::qemu_io("vpc", &base, &["write -P 0x3c 0 64k"]);
    let child = dir.path().join("child.vhd");
    let kind = VhdKind::Differencing {
        parent: parent_image(&child, &base).unwrap(),
    };
    create_vhd(&child, &VhdCreateOptions::new(0, kind)).unwrap();

    let mount = Mount::new(&child, &[]);
    let write = Command::new("qemu-io")
        .args(["-f", "vpc", "-c", "write 0 4k"])
        .arg(&base)
        .output()
        .unwrap();
    assert_qemu_refused(&write, "Failed to get \"write\" lock");
    let read = Command::new("qemu-io")
        .args(["-r", "-f", "vpc", "-c", "read -P 0x3c 0 64k"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert!(!String::from_utf8_lossy(&read.stdout).contains("fail"));
    // A second child of the same parent shares it too.
    let sibling = dir.path().join("sibling.vhd");
    let kind = VhdKind::Differencing {
        parent: parent_image(&sibling, &base).unwrap(),
    };
    create_vhd(&sibling, &VhdCreateOptions::new(0, kind)).unwrap();
    Mount::new(&sibling, &["ro"]).unmount();
    mount.unmount();

    // The parent mounted read-write keeps its children out, naming it and its holder.
    let writer = Mount::new(&base, &[]);
    let mountpoint = tempfile::tempdir().unwrap();
    let out = Mount::start(&child, &[], mountpoint.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mounted a child of a parent in use");
    let expected = format!(
        "parent {}: image is in use (pid {})",
        base.display(),
        writer.daemon_pid()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    writer.unmount();
}

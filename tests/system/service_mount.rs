//! Mounting like any other filesystem: through fuse3's `mount.fuse3` helper and mount(8)
//! with the options fstab lines carry, unmounting with umount(8), and the options that
//! set the mounted file's owner, mode and name.

use crate::common;
use crate::common::mount::{self, BIN, Mount};
use std::ffi::OsStr;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

/// Every generic option an fstab line may carry, and the restricting ones.
const FSTAB_OPTIONS: &str = "defaults,allow_other,nofail,noauto,auto,user,users,_netdev,\
                             x-systemd.automount,x-systemd.device-timeout=5s,comment=test,\
                             dev,suid,exec,nodev,nosuid,noexec";

/// A directory holding only `vdisk-mount` (the binary under test), for the front of PATH:
/// `mount.fuse3` finds the daemon by name.
fn path_with_binary(dir: &Path) -> std::ffi::OsString {
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(BIN, bin.join("vdisk-mount")).unwrap();
    let mut path = bin.into_os_string();
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    path
}

/// The type and options the mount table shows for `mountpoint`.
fn mount_entry(mountpoint: &Path) -> (String, String) {
    let target = mountpoint.to_str().unwrap();
    let table = std::fs::read_to_string("/proc/self/mounts").unwrap();
    table
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.get(1) == Some(&target))
        .map(|f| (f[2].to_string(), f[3].to_string()))
        .unwrap_or_else(|| panic!("{target} is not mounted"))
}

/// Writes through the mount, unmounts with umount(8) (as an admin would), and checks
/// that the daemon closed the image so that qemu reads the write.
fn write_then_umount(mount: Mount, image: &Path) {
    let data = mount::pattern(7, 3000);
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.disk())
        .unwrap();
    disk.write_all_at(&data, MIB + 5).unwrap();
    drop(disk);
    common::run(Command::new("umount").arg(mount.mountpoint()));
    assert!(!mount::is_mounted(mount.mountpoint()));
    assert_eq!(
        mount.wait_for_exit(),
        Some(0),
        "daemon did not exit cleanly"
    );
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    common::qemu_convert_to_raw("vhdx", image, &raw);
    let mut back = vec![0u8; data.len()];
    std::fs::File::open(&raw)
        .unwrap()
        .read_exact_at(&mut back, MIB + 5)
        .unwrap();
    assert!(back == data, "the write did not reach the image");
    common::qemu_check_clean("vhdx", image);
}

fn qemu_vhdx(dir: &Path) -> PathBuf {
    mount::qemu_image_with_patterns(dir, "a.vhdx", "vhdx", "block_size=1M", 64 * MIB, MIB)
}

#[test]
fn mount_fuse3_runs_the_daemon_with_fstab_options() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhdx(dir.path());
    let reference = dir.path().join("reference.raw");
    mount::reference_copy("vhdx", &image, &reference);
    let path = path_with_binary(dir.path());
    // How mount(8) calls the helper for type fuse.vdisk-mount.
    let mount = Mount::by_command(|mountpoint| {
        let mut command = Command::new("mount.fuse3");
        command
            .arg(&image)
            .arg(mountpoint)
            .args(["-t", "vdisk-mount", "-o", FSTAB_OPTIONS])
            .env("PATH", &path);
        command
    });
    mount::assert_same_bytes(&mount.disk(), &reference);
    let (fs_type, options) = mount_entry(mount.mountpoint());
    assert_eq!(fs_type, "fuse.vdisk-mount");
    for wanted in ["rw", "nodev", "nosuid", "noexec", "allow_other"] {
        assert!(
            options.split(',').any(|o| o == wanted),
            "{wanted} missing from {options}"
        );
    }
    write_then_umount(mount, &image);
}

#[test]
fn mount_fuse3_passes_on_an_unknown_option_and_it_is_refused() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhdx(dir.path());
    let mountpoint = tempfile::tempdir().unwrap();
    let out = Command::new("mount.fuse3")
        .arg(&image)
        .arg(mountpoint.path())
        .args(["-t", "vdisk-mount", "-o", "defaults,nofail,frobnicate=3"])
        .env("PATH", path_with_binary(dir.path()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("unknown mount option 'frobnicate=3'"),
        "{stderr}"
    );
    assert!(!mount::is_mounted(mountpoint.path()));
}

#[test]
fn mount_8_mounts_an_fstab_line_and_umount_8_unmounts_it() {
    if !mount::fuse_available() {
        return;
    }
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        assert!(std::env::var_os("CI").is_none(), "CI must run as root");
        eprintln!("SKIPPED: mount(8) with an fstab needs root");
        return;
    }
    let Some(_installed) = mount::Installed::new() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhdx(dir.path());
    let reference = dir.path().join("reference.raw");
    mount::reference_copy("vhdx", &image, &reference);
    let fstab = dir.path().join("fstab");
    let mount = Mount::by_command(|mountpoint| {
        std::fs::write(
            &fstab,
            format!(
                "# a comment\n{} {} fuse.vdisk-mount defaults,allow_other,nofail,\
                 x-systemd.automount,_netdev 0 0\n",
                image.display(),
                mountpoint.display()
            ),
        )
        .unwrap();
        let mut command = Command::new("mount");
        command.arg("-T").arg(&fstab).arg(mountpoint);
        command
    });
    mount::assert_same_bytes(&mount.disk(), &reference);
    write_then_umount(mount, &image);

    // `ro` from the command line, on top of the fstab line's options.
    let mount = Mount::by_command(|mountpoint| {
        let mut command = Command::new("mount");
        command
            .args(["-t", "fuse.vdisk-mount", "-o", "ro,nofail,nodev"])
            .arg(&image)
            .arg(mountpoint);
        command
    });
    mount::assert_read_only(&mount.disk());
    common::run(Command::new("umount").arg(mount.mountpoint()));
    assert_eq!(mount.wait_for_exit(), Some(0));
}

#[test]
fn owner_mode_and_name_follow_the_options() {
    if !mount::fuse_available() || !mount::can_switch_users() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhdx(dir.path());
    let mount = Mount::by_command(|mountpoint| {
        let mut command = Command::new(BIN);
        command
            .args([
                "-o",
                "uid=65534,gid=65534,umask=077,filename=sda.raw,allow_other",
            ])
            .arg(&image)
            .arg(mountpoint);
        command
    });
    let file = mount.mountpoint().join("sda.raw");
    assert!(!mount.disk().exists(), "disk.img is still there");
    let names: Vec<_> = std::fs::read_dir(mount.mountpoint())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["sda.raw"]);
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    let root = std::fs::metadata(mount.mountpoint()).unwrap();
    assert_eq!(
        (root.uid(), root.permissions().mode() & 0o7777),
        (65534, 0o700)
    );

    // The owner may write, and the kernel enforces the mode against everyone else.
    let dd = |uid: u32| {
        mount::run_as(
            uid,
            uid,
            "dd",
            &[
                OsStr::new("if=/dev/zero"),
                OsStr::new(&format!("of={}", file.display())),
                OsStr::new("bs=512"),
                OsStr::new("count=1"),
                OsStr::new("seek=3"),
                OsStr::new("conv=notrunc"),
            ],
        )
    };
    let out = dd(65534);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = dd(12345);
    assert!(!out.status.success(), "a stranger wrote the file");
    let out = mount::run_as(12345, 12345, "stat", &[file.as_os_str()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    mount.unmount();
    let out = common::qemu_io("vhdx", &image, &["read -P 0 1536 512"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("read 512/512"));
}

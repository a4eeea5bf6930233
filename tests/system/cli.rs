//! The command line's bad input failing the same way: non-zero exit, exactly one line on
//! stderr naming the offending file, no panic, and nothing left mounted. Help and version
//! are in the quick tier.

use crate::common;
use crate::common::mount::{self, Mount};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Runs a background mount that must fail, and checks how it failed.
fn assert_refused(image: &Path, options: &[&str], mountpoint: &Path, named: &Path) -> String {
    let out = Mount::start(image, options, mountpoint);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "mount of {} succeeded",
        image.display()
    );
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(stderr.ends_with('\n'));
    assert!(
        stderr.contains(named.to_str().unwrap()),
        "{stderr:?} does not name {}",
        named.display()
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty());
    if mountpoint.exists() {
        assert!(!mount::is_mounted(mountpoint), "a mount was left behind");
    }
    // What is left says what is wrong; callers check it without matching the path.
    stderr.replace(named.to_str().unwrap(), "<file>")
}

/// A fresh VHD created by qemu-img.
fn qemu_vhd(dir: &Path, name: &str, subformat: &str) -> PathBuf {
    let image = dir.join(name);
    common::qemu_img(&[
        "create",
        "-f",
        "vpc",
        "-o",
        &format!("subformat={subformat}"),
        image.to_str().unwrap(),
        "8M",
    ]);
    image
}

fn read_u64_be(file: &Path, offset: u64) -> u64 {
    let mut buf = [0u8; 8];
    std::fs::File::open(file)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    u64::from_be_bytes(buf)
}

fn write_at(file: &Path, offset: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .write_all_at(bytes, offset)
        .unwrap();
}

#[test]
fn unknown_mount_option_is_rejected_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhd(dir.path(), "ok.vhd", "dynamic");
    let out = Mount::start(&image, &["ro,frobnicate"], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("frobnicate"), "{stderr}");
    assert!(!mount::is_mounted(dir.path()));
}

#[test]
fn images_that_cannot_be_served_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let mountpoint = dir.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();

    let missing = dir.path().join("missing.vhd");
    let stderr = assert_refused(&missing, &[], &mountpoint, &missing);
    assert!(stderr.contains("No such file"), "{stderr}");

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "just some text, not a disk image\n".repeat(40)).unwrap();
    let stderr = assert_refused(&text, &[], &mountpoint, &text);
    assert!(stderr.contains("not a VHD or VHDX"), "{stderr}");

    let empty = dir.path().join("empty.vhd");
    std::fs::write(&empty, b"").unwrap();
    assert_refused(&empty, &[], &mountpoint, &empty);

    let truncated = qemu_vhd(dir.path(), "truncated.vhd", "dynamic");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap()
        .set_len(700)
        .unwrap();
    assert_refused(&truncated, &[], &mountpoint, &truncated);

    // Fixed: the footer at the end is the only copy, so a bad checksum cannot be avoided.
    let bad_checksum = qemu_vhd(dir.path(), "footer.vhd", "fixed");
    let footer = std::fs::metadata(&bad_checksum).unwrap().len() - 512;
    let mut byte = [0u8; 1];
    std::fs::File::open(&bad_checksum)
        .unwrap()
        .read_exact_at(&mut byte, footer + 67)
        .unwrap();
    write_at(&bad_checksum, footer + 67, &[byte[0] ^ 0x5a]);
    let stderr = assert_refused(&bad_checksum, &[], &mountpoint, &bad_checksum);
    assert!(stderr.to_lowercase().contains("checksum"), "{stderr}");

    // Dynamic header at 512; its Table Offset (at +16) locates the BAT.
    let bat_past_end = qemu_vhd(dir.path(), "table.vhd", "dynamic");
    let bat = read_u64_be(&bat_past_end, 512 + 16);
    write_at(&bat_past_end, bat, &0x0010_0000u32.to_be_bytes());
    let stderr = assert_refused(&bat_past_end, &[], &mountpoint, &bat_past_end);
    assert!(stderr.contains("BAT"), "{stderr}");
}

#[test]
fn unusable_mountpoints_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhd(dir.path(), "ok.vhd", "dynamic");
    let before = common::sha256_file(&image);

    let missing = dir.path().join("no-such-dir");
    let stderr = assert_refused(&image, &[], &missing, &missing);
    assert!(stderr.contains("No such file"), "{stderr}");

    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let stderr = assert_refused(&image, &[], &file, &file);
    assert!(stderr.contains("not a directory"), "{stderr}");

    assert_eq!(common::sha256_file(&image), before, "image was touched");
}

#[test]
fn a_busy_mountpoint_is_refused_and_the_first_mount_survives() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
    let first = Mount::new(&image, &["format=raw"]);
    let stderr = {
        let out = Mount::start(&image, &["format=raw"], first.mountpoint());
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("busy"), "{stderr}");
    assert!(
        stderr.contains(first.mountpoint().to_str().unwrap()),
        "{stderr}"
    );
    assert_eq!(std::fs::read(first.disk()).unwrap(), vec![7u8; 1 << 20]);
    first.unmount();
}

#[test]
fn an_image_in_use_is_refused_unless_both_mounts_are_read_only() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhd(dir.path(), "shared.vhd", "dynamic");
    let other = tempfile::tempdir().unwrap();

    let writer = Mount::new(&image, &[]);
    for options in [&[][..], &["ro"]] {
        let stderr = assert_refused(&image, options, other.path(), &image);
        assert!(stderr.contains("in use"), "{stderr}");
    }
    writer.unmount();

    let reader = Mount::new(&image, &["ro"]);
    let second_reader = Mount::new(&image, &["ro"]);
    let stderr = assert_refused(&image, &[], other.path(), &image);
    assert!(stderr.contains("in use"), "{stderr}");
    second_reader.unmount();
    reader.unmount();
}

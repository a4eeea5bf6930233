//! Real-world VHD and VHDX images from the sample corpus, served through a real mount: the
//! bytes a program reads from `disk.img` must be the ones two independent readers agreed
//! on, and a read-only mount must not change the image, even one with a log to replay.
mod common;

use common::mount::{self, FsMount, LoopDevice, Mount};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

#[test]
fn corpus_images_read_as_expected_through_the_mount() {
    if !mount::fuse_available() {
        return;
    }
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "dfvfs__ext2__qemu-img.vhd",
        "qemu-iotests__d2v-zerofilled__disk2vhd.vhd",
        "qemu-iotests__iotest-dynamic-1G__hyperv-win6.2.vhdx",
        "qemu-iotests__test-disk2vhd__disk2vhd.vhdx",
        "discutils__btrfs__win10-15063.vhdx",
        // A dirty log: read-only mounts replay it in memory only.
        "discutils__vhdx-log-replay__win10-15063-dirtylog.vhdx",
    ] {
        let image = common::decompress_corpus_image(&corpus, name, dir.path());
        let before = common::sha256_file(&image);
        let mount = Mount::new(&image, &["ro"]);
        assert_eq!(
            common::sha256_file(&mount.disk()),
            common::expected_sha256(&corpus, &format!("{name}.raw")),
            "{name}"
        );
        mount.unmount();
        assert_eq!(common::sha256_file(&image), before, "{name} was modified");
    }
}

#[test]
fn corpus_ext2_filesystem_mounts_through_a_loop_device() {
    if !mount::loop_available() {
        return;
    }
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = common::decompress_corpus_image(&corpus, "dfvfs__ext2__qemu-img.vhd", dir.path());
    let vdisk = Mount::new(&image, &["ro"]);
    let device = LoopDevice::attach_read_only(&vdisk.disk());
    let fs = FsMount::new_read_only(device.path());
    let passwords = std::fs::read(fs.path().join("passwords.txt")).unwrap();
    assert_eq!(passwords.len(), 116);
    fs.unmount();
    drop(device);
    vdisk.unmount();
}

/// Size of `disk.img` when `image` is mounted with `options`.
fn mounted_size(image: &Path, options: &[&str]) -> u64 {
    let mount = Mount::new(image, options);
    let disk = std::fs::File::open(mount.disk()).unwrap();
    let size = disk.metadata().unwrap().len();
    // The disks are empty: no data anywhere, zeros at the very end.
    // SAFETY: lseek on an open descriptor.
    let data = unsafe { libc::lseek(disk.as_raw_fd(), 0, libc::SEEK_DATA) };
    assert_eq!(data, -1, "SEEK_DATA found data in an empty disk");
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENXIO)
    );
    let mut tail = vec![0xffu8; 4096];
    disk.read_exact_at(&mut tail, size - 4096).unwrap();
    assert!(tail.iter().all(|&b| b == 0));
    drop(disk);
    mount.unmount();
    size
}

#[test]
fn size_calc_option_picks_the_vhd_size_rule() {
    if !mount::fuse_available() {
        return;
    }
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    const CHS: u64 = 136_363_130_880;
    const CURRENT_SIZE: u64 = 136_365_211_648;
    let dir = tempfile::tempdir().unwrap();
    let hyperv = common::decompress_corpus_image(
        &corpus,
        "qemu-iotests__hyperv2012r2-dynamic__hyperv-win6.3.vhd",
        dir.path(),
    );
    let virtual_pc = common::decompress_corpus_image(
        &corpus,
        "qemu-iotests__virtualpc-dynamic__virtualpc.vhd",
        dir.path(),
    );
    assert_eq!(mounted_size(&hyperv, &["ro"]), CURRENT_SIZE);
    assert_eq!(mounted_size(&hyperv, &["ro,size_calc=chs"]), CHS);
    assert_eq!(mounted_size(&virtual_pc, &["ro"]), CHS);
    assert_eq!(
        mounted_size(&virtual_pc, &["ro", "size_calc=current_size"]),
        CURRENT_SIZE
    );
}

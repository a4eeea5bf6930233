//! Space given back: a filesystem on a loop device over `disk.img` that deletes files and
//! runs `fstrim` gives the image file's space back to the host.

use crate::common;
use crate::common::mount::{self, FsMount, LoopDevice, Mount};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

/// Bytes the host filesystem holds for `path`.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn sync() {
    common::run(&mut Command::new("sync"));
}

/// ext4 on the image: 600 MiB of files written, deleted and trimmed must give back at
/// least 90% of their space, while a file kept beside them reads the same before and after
/// remounting.
fn fstrim_gives_space_back(image: &Path, format: &str) {
    let kept = mount::pattern(99, 3 * MIB as usize + 123);
    {
        let vdisk = Mount::new(image, &[]);
        let device = LoopDevice::attach(&vdisk.disk());
        common::run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(device.path()),
        );
        let fs = FsMount::new(device.path());
        std::fs::write(fs.path().join("kept.bin"), &kept).unwrap();
        for i in 0..6 {
            let data = mount::pattern(i, 100 * MIB as usize);
            std::fs::write(fs.path().join(format!("big-{i}.bin")), data).unwrap();
        }
        sync();
        let full = allocated(image);
        for i in 0..6 {
            std::fs::remove_file(fs.path().join(format!("big-{i}.bin"))).unwrap();
        }
        sync();
        common::run(Command::new("fstrim").arg(fs.path()));
        sync();
        let trimmed = allocated(image);
        assert!(
            full.saturating_sub(trimmed) >= 600 * MIB * 9 / 10,
            "{format}: the image held {full} bytes with the files, {trimmed} after fstrim"
        );
        assert_eq!(std::fs::read(fs.path().join("kept.bin")).unwrap(), kept);
        fs.unmount();
        drop(device);
        vdisk.unmount();
    }
    common::qemu_check_clean(format, image);
    let vdisk = Mount::new(image, &["ro"]);
    let device = LoopDevice::attach_read_only(&vdisk.disk());
    common::run(Command::new("fsck.ext4").arg("-fn").arg(device.path()));
    let fs = FsMount::new_read_only(device.path());
    assert_eq!(std::fs::read(fs.path().join("kept.bin")).unwrap(), kept);
    fs.unmount();
    drop(device);
    vdisk.unmount();
}

#[test]
fn fstrim_through_a_loop_device_gives_a_dynamic_vhdx_its_space_back() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("trim.vhdx");
    common::qemu_img(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        image.to_str().unwrap(),
        "1G",
    ]);
    fstrim_gives_space_back(&image, "vhdx");
}

#[test]
fn fstrim_through_a_loop_device_gives_a_dynamic_vhd_its_space_back() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("trim.vhd");
    common::qemu_img(&["create", "-f", "vpc", image.to_str().unwrap(), "1G"]);
    fstrim_gives_space_back(&image, "vpc");
}

//! The way most people use a mounted image: as a block device through a loop device, with a
//! kernel filesystem on it that must survive unmounting everything and mounting it again.

use crate::common;
use crate::common::mount::{self, FsMount, LoopDevice, Mount};
use std::path::Path;
use std::process::Command;

/// Files of awkward sizes, so ext4 allocates across many VHD blocks.
fn sample_files() -> Vec<(String, Vec<u8>)> {
    [0usize, 1, 4095, 4097, 300_000, 5 << 20]
        .iter()
        .enumerate()
        .map(|(i, &len)| (format!("file-{i}.bin"), mount::pattern(i as u64 + 1, len)))
        .collect()
}

fn ext4_survives_remounting(image: &Path, options: &[&str]) {
    let files = sample_files();
    {
        let vdisk = Mount::new(image, options);
        {
            let device = LoopDevice::attach(&vdisk.disk());
            common::run(
                Command::new("mkfs.ext4")
                    .args(["-q", "-F"])
                    .arg(device.path()),
            );
            let fs = FsMount::new(device.path());
            std::fs::create_dir(fs.path().join("dir")).unwrap();
            for (name, data) in &files {
                std::fs::write(fs.path().join("dir").join(name), data).unwrap();
            }
            fs.unmount();
        }
        vdisk.unmount();
    }

    let vdisk = Mount::new(image, options);
    let device = LoopDevice::attach(&vdisk.disk());
    common::run(Command::new("fsck.ext4").arg("-fn").arg(device.path()));
    let fs = FsMount::new(device.path());
    for (name, data) in &files {
        let read = std::fs::read(fs.path().join("dir").join(name)).unwrap();
        assert!(read == *data, "{name} differs after remounting");
    }
    fs.unmount();
    drop(device);
    vdisk.unmount();
}

#[test]
fn ext4_on_a_dynamic_vhd_survives_remounting() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ext4.vhd");
    common::qemu_img(&["create", "-f", "vpc", image.to_str().unwrap(), "128M"]);
    ext4_survives_remounting(&image, &[]);
    common::qemu_check_clean("vpc", &image);
    // qemu reads the filesystem image as the loop device saw it.
    let raw = dir.path().join("ext4.raw");
    common::qemu_convert_to_raw("vpc", &image, &raw);
    common::run(Command::new("fsck.ext4").arg("-fn").arg(&raw));
}

#[test]
fn ext4_on_a_dynamic_vhdx_survives_remounting() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ext4.vhdx");
    common::qemu_img(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        image.to_str().unwrap(),
        "128M",
    ]);
    ext4_survives_remounting(&image, &[]);
    common::qemu_check_clean("vhdx", &image);
    let raw = dir.path().join("ext4.raw");
    common::qemu_convert_to_raw("vhdx", &image, &raw);
    common::run(Command::new("fsck.ext4").arg("-fn").arg(&raw));
}

#[test]
fn ext4_on_a_raw_file_survives_remounting() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ext4.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    ext4_survives_remounting(&image, &["format=raw"]);
    common::run(Command::new("fsck.ext4").arg("-fn").arg(&image));
}

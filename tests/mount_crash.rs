//! A daemon killed outright (SIGKILL, as by the OOM killer) must leave an image that opens,
//! holds every write the mount acknowledged, and is clean again after one more mount.
mod common;

use common::mount::{self, Mount};
use std::path::Path;

const MIB: u64 = 1 << 20;

fn survives_sigkill(image: &Path, qemu_format: &str, block: u64) {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference.raw");
    mount::reference_copy(qemu_format, image, &reference);

    let vdisk = Mount::new(image, &[]);
    let size = std::fs::metadata(vdisk.disk()).unwrap().len();
    let writes = mount::awkward_writes(size, block);
    let (synced, unsynced) = writes.split_at(writes.len() / 2);
    // Both halves are acknowledged writes, so both reach the image file before the kill;
    // only the first half was also made durable (which a kill cannot tell apart).
    mount::write_both(&vdisk.disk(), &reference, synced);
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(vdisk.disk())
        .unwrap();
    let plain = std::fs::OpenOptions::new()
        .write(true)
        .open(&reference)
        .unwrap();
    use std::os::unix::fs::FileExt;
    for (i, &(offset, len)) in unsynced.iter().enumerate() {
        let data = mount::pattern(1000 + i as u64, len);
        disk.write_all_at(&data, offset).unwrap();
        plain.write_all_at(&data, offset).unwrap();
    }
    vdisk.kill();
    drop(disk);

    // Our own mount must open it (replaying what the crash left), serve every
    // acknowledged write, and close it cleanly for qemu.
    let vdisk = Mount::new(image, &[]);
    mount::assert_same_bytes(&vdisk.disk(), &reference);
    vdisk.unmount();
    mount::assert_qemu_identical(qemu_format, image, &reference);
    common::qemu_check_clean(qemu_format, image);
}

#[test]
fn dynamic_vhd_survives_a_killed_daemon() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = mount::qemu_image_with_patterns(
        dir.path(),
        "crash.vhd",
        "vpc",
        "subformat=dynamic",
        64 * MIB,
        2 * MIB,
    );
    survives_sigkill(&image, "vpc", 2 * MIB);
}

#[test]
fn dynamic_vhdx_survives_a_killed_daemon() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = mount::qemu_image_with_patterns(
        dir.path(),
        "crash.vhdx",
        "vhdx",
        "block_size=1M",
        64 * MIB,
        MIB,
    );
    survives_sigkill(&image, "vhdx", MIB);
}

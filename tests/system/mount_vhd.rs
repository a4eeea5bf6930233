//! Real mounts of VHD images made by qemu-img and filled by qemu-io: what the mount shows
//! must be what qemu shows, and what is written through the mount must be what qemu reads.

use crate::common::mount;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;
/// qemu's default VHD block size.
const BLOCK: u64 = 2 * MIB;

fn qemu_vhd(dir: &Path, name: &str, options: &str, size: u64) -> PathBuf {
    mount::qemu_image_with_patterns(dir, name, "vpc", options, size, BLOCK)
}

#[test]
fn dynamic_vhd_round_trip() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhd(dir.path(), "dynamic.vhd", "subformat=dynamic", 64 * MIB);
    let holes = mount::round_trip(&image, "vpc", &[], BLOCK);
    assert!(holes > 0, "unallocated blocks not reported as holes");
}

#[test]
fn fixed_vhd_round_trip() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhd(dir.path(), "fixed.vhd", "subformat=fixed", 64 * MIB);
    assert_eq!(
        mount::round_trip(&image, "vpc", &[], BLOCK),
        0,
        "fixed disks have no holes"
    );
}

#[test]
fn vhd_whose_size_is_not_a_multiple_of_the_block_size() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // qemu rounds this to whole CHS cylinders, which still leaves a partial last block.
    let image = qemu_vhd(dir.path(), "odd.vhd", "subformat=dynamic", 100_000_000);
    mount::round_trip(&image, "vpc", &[], BLOCK);
    // With force_size the footer's Current Size is exact and the size comes from it.
    let image = qemu_vhd(
        dir.path(),
        "exact.vhd",
        "subformat=dynamic,force_size=on",
        100_000_000,
    );
    mount::round_trip(&image, "vpc", &[], BLOCK);
}

#[test]
fn multi_gib_sparse_vhd_round_trip() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhd(dir.path(), "big.vhd", "subformat=dynamic", 5 << 30);
    let holes = mount::round_trip(&image, "vpc", &[], BLOCK);
    assert!(holes > 4 << 30, "only {holes} bytes reported as holes");
}

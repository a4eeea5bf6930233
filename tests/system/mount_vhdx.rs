//! Real mounts of VHDX images made by qemu-img and filled by qemu-io: what the mount shows
//! must be what qemu shows, and what is written through the mount must be what qemu reads
//! (and `qemu-img check` must find the image clean).

use crate::common::mount;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

fn qemu_vhdx(dir: &Path, name: &str, options: &str, size: u64, block: u64) -> PathBuf {
    mount::qemu_image_with_patterns(dir, name, "vhdx", options, size, block)
}

#[test]
fn dynamic_vhdx_round_trip() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Small blocks: many block boundaries and allocations inside 64 MiB.
    let image = qemu_vhdx(dir.path(), "dynamic.vhdx", "block_size=1M", 64 * MIB, MIB);
    let holes = mount::round_trip(&image, "vhdx", &[], MIB);
    assert!(holes > 0, "unallocated blocks not reported as holes");
}

#[test]
fn fixed_vhdx_round_trip() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhdx(
        dir.path(),
        "fixed.vhdx",
        "subformat=fixed,block_size=8M",
        64 * MIB,
        8 * MIB,
    );
    mount::round_trip(&image, "vhdx", &[], 8 * MIB);
}

#[test]
fn vhdx_whose_size_is_not_a_multiple_of_the_block_size() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 100 * MIB + 3 * 512;
    let image = qemu_vhdx(dir.path(), "odd.vhdx", "block_size=8M", size, 8 * MIB);
    mount::round_trip(&image, "vhdx", &[], 8 * MIB);
}

#[test]
fn multi_gib_sparse_vhdx_round_trip() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhdx(dir.path(), "big.vhdx", "block_size=32M", 5 << 30, 32 * MIB);
    let holes = mount::round_trip(&image, "vhdx", &[], 32 * MIB);
    assert!(holes > 4 << 30, "only {holes} bytes reported as holes");
}

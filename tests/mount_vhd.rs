//! Real mounts of VHD images made by qemu-img and filled by qemu-io: what the mount shows
//! must be what qemu shows, and what is written through the mount must be what qemu reads.
mod common;

use common::mount;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;
/// qemu's default VHD block size.
const BLOCK: u64 = 2 * MIB;

/// A VHD of `size` bytes (as qemu rounds it) created with `options`, with patterns written
/// near the start, across a block boundary, in the middle and near the end.
fn qemu_vhd(dir: &Path, name: &str, options: &str, size: u64) -> PathBuf {
    let image = dir.join(name);
    common::qemu_img(&[
        "create",
        "-f",
        "vpc",
        "-o",
        options,
        image.to_str().unwrap(),
        &size.to_string(),
    ]);
    let out = common::qemu_img(&[
        "info",
        "-f",
        "vpc",
        "--output=json",
        image.to_str().unwrap(),
    ]);
    let info = String::from_utf8(out.stdout).unwrap();
    let virtual_size: u64 = info
        // The image's own entry comes after those of its children.
        .rsplit("\"virtual-size\":")
        .next()
        .and_then(|rest| rest.split([',', '}']).next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no virtual-size in {info}"));
    let last = virtual_size / 512 * 512 - 64 * 1024;
    common::qemu_io(
        "vpc",
        &image,
        &[
            "write -P 0x11 0 64k",
            &format!("write -P 0x22 {} 4k", BLOCK - 2048),
            &format!("write -P 0x33 {} 1m", virtual_size / 2 / 512 * 512),
            &format!("write -P 0x44 {last} 64k"),
        ],
    );
    image
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

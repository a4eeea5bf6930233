//! Differencing chains written through real mounts: each level, while it is the top of
//! its chain, is mounted read/write and written with pwrite into disk.img; afterwards every
//! level, mounted read-only, shows what its model and libvhdi's vhdimount show, and no
//! parent changed. VHD and VHDX, over bases from qemu-img and from the corpus.

use crate::common;
use crate::common::chain::{Writes, assert_same, check_chain};
use crate::common::mount::{self, Mount};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

fn write_mounted(path: &Path, writes: &Writes) {
    let mount = Mount::new(path, &[]);
    let disk = OpenOptions::new().write(true).open(mount.disk()).unwrap();
    for (offset, data) in writes {
        disk.write_all_at(data, *offset).unwrap();
    }
    disk.sync_all().unwrap();
    drop(disk);
    mount.unmount();
}

/// Builds the chain over `base` through mounts, then reads every level through a
/// read-only mount.
fn chain_through_mounts(dir: &Path, base: &Path, levels: usize, seed: u64) {
    for (level, (path, model)) in check_chain(dir, base, levels, seed, &write_mounted)
        .into_iter()
        .enumerate()
    {
        let before = common::sha256_file(&path);
        let mount = Mount::new(&path, &["ro"]);
        let shown = std::fs::read(mount.disk()).unwrap();
        mount.unmount();
        assert_same(&shown, &model, &format!("level {level} mounted read-only"));
        assert_eq!(common::sha256_file(&path), before, "level {level} changed");
    }
}

#[test]
fn six_level_vhdx_chain_over_a_qemu_image() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    common::qemu_img(&["create", "-q", "-f", "vhdx", base.to_str().unwrap(), "12M"]);
    common::qemu_io(
        "vhdx",
        &base,
        &["write -P 0x5a 0 1M", "write -P 0xa5 7M 3M"],
    );
    chain_through_mounts(dir.path(), &base, 6, 11);
}

#[test]
fn six_level_vhd_chain_over_a_qemu_image() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    common::qemu_img(&["create", "-q", "-f", "vpc", base.to_str().unwrap(), "12M"]);
    common::qemu_io("vpc", &base, &["write -P 0x5a 0 1M", "write -P 0xa5 7M 3M"]);
    chain_through_mounts(dir.path(), &base, 6, 12);
}

#[test]
fn six_level_chains_over_corpus_images() {
    if !mount::fuse_available() {
        return;
    }
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    for (name, seed) in [
        ("qemu-iotests__test-disk2vhd__disk2vhd.vhdx", 13),
        ("dfvfs__ext2__qemu-img.vhd", 14),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let base = common::decompress_corpus_image(&corpus, name, dir.path());
        chain_through_mounts(dir.path(), &base, 6, seed);
    }
}

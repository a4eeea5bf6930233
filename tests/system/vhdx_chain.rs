//! Differencing VHDX chains made by this library over bases from qemu-img, the corpus and
//! this library: every level reads as a flat model of the writes it got and as libvhdi's
//! vhdimount reads it; parents are never written, not even one with a dirty log; a child
//! larger than its parent reads zeros past the parent; unsafe files put in a parent's
//! place are refused with errors that say why. Parents refused by the library alone
//! (looping, rewritten, moved, of another sector size) are in the quick tier.

use crate::common;
use crate::common::chain::{
    MIB, assert_same, check_chain, child_of, open, open_error, read_all, unsafe_parent_errors,
    write_directly,
};
use std::path::{Path, PathBuf};
use vdisk_mount::create::{CreateOptions, create};
use vdisk_mount::vhdx::create::{VhdxCreateOptions, VhdxKind, create_vhdx};
use vdisk_mount::{Allocation, OpenOptions};

#[test]
fn six_level_chain_over_a_qemu_image() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    common::qemu_img(&["create", "-q", "-f", "vhdx", base.to_str().unwrap(), "9M"]);
    common::qemu_io(
        "vhdx",
        &base,
        &["write -P 0x5a 0 1M", "write -P 0xa5 3000k 2500k"],
    );
    check_chain(dir.path(), &base, 6, 2, &write_directly);
}

#[test]
fn six_level_chain_over_4096_byte_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let options = VhdxCreateOptions {
        logical_sector_size: 4096,
        block_size: MIB as u32,
        ..VhdxCreateOptions::new(7 * MIB, VhdxKind::Dynamic)
    };
    create_vhdx(&base, &options).unwrap();
    write_directly(&base, &[(5000, vec![0x77; 300_000])]);
    check_chain(dir.path(), &base, 6, 4, &write_directly);
}

#[test]
fn seven_level_chain_over_a_corpus_image() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = common::decompress_corpus_image(
        &corpus,
        "qemu-iotests__test-disk2vhd__disk2vhd.vhdx",
        dir.path(),
    );
    check_chain(dir.path(), &base, 7, 3, &write_directly);
}

#[test]
fn a_child_of_a_parent_with_a_dirty_log_reads_it_replayed_and_never_writes_it() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let name = "discutils__vhdx-log-replay__win10-15063-dirtylog.vhdx";
    let base = common::decompress_corpus_image(&corpus, name, dir.path());
    let before = common::sha256_file(&base);
    let child = dir.path().join("child.vhdx");
    child_of(&base, &child);
    let disk = open(&child, false);
    assert_eq!(
        common::sha256_disk(disk.as_ref()),
        common::expected_sha256(&corpus, &format!("{name}.raw"))
    );
    disk.write_at(b"child data", 4096).unwrap();
    disk.close().unwrap();
    drop(disk);
    let disk = open(&child, true);
    let mut buf = [0u8; 10];
    disk.read_at(&mut buf, 4096).unwrap();
    assert_eq!(&buf, b"child data");
    assert_eq!(common::sha256_file(&base), before, "the parent was written");
}

#[test]
fn a_child_larger_than_its_parent_reads_zeros_past_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    common::qemu_img(&["create", "-q", "-f", "vhdx", base.to_str().unwrap(), "3M"]);
    common::qemu_io("vhdx", &base, &["write -P 0x11 0 3M"]);
    let options = CreateOptions {
        parent: Some(base.clone()),
        size: Some(40 * MIB),
        ..Default::default()
    };
    create(&child, &options).unwrap();
    let disk = open(&child, false);
    assert_eq!(disk.size(), 40 * MIB);
    let mut model = vec![0x11u8; 3 * MIB as usize];
    model.resize(40 * MIB as usize, 0);
    assert_same(&read_all(disk.as_ref()), &model, "fresh child");
    let extents = disk.allocation(0, 40 * MIB).unwrap();
    assert_eq!(extents.last().unwrap().state, Allocation::Zero);
    // Across the parent's end, and far past it.
    disk.write_at(&[0x22; 5000], 3 * MIB - 2000).unwrap();
    disk.write_at(&[0x33; 700], 39 * MIB).unwrap();
    model[3 * MIB as usize - 2000..3 * MIB as usize + 3000].fill(0x22);
    model[39 * MIB as usize..39 * MIB as usize + 700].fill(0x33);
    disk.close().unwrap();
    drop(disk);
    assert_same(&read_all(open(&child, true).as_ref()), &model, "child");
    // libvhdi fails (EIO) reading a VHDX child past its parent's end, so it cannot
    // serve as the second reader here; the model is the reference.
    let smaller = CreateOptions {
        parent: Some(base.clone()),
        size: Some(2 * MIB),
        ..Default::default()
    };
    let err = create(&dir.path().join("small.vhdx"), &smaller).unwrap_err();
    assert!(err.to_string().contains("would cut off the end"), "{err}");
}

fn dynamic(path: &Path, size: u64) {
    create_vhdx(path, &VhdxCreateOptions::new(size, VhdxKind::Dynamic)).unwrap();
}

#[test]
fn parents_that_are_not_vhdx_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    dynamic(&base, 4 * MIB);
    child_of(&base, &child);
    for (what, err) in unsafe_parent_errors(&base, &child, &|at: &Path| {
        common::qemu_img(&["create", "-q", "-f", "vpc", at.to_str().unwrap(), "4M"]);
    }) {
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        let expected = match what {
            "/dev/zero" => "resolves to /dev/zero under /dev, where no image is read from",
            "/proc/self/mem" => "under /proc, where no image is read from",
            "FIFO" => "base.vhdx: a FIFO",
            "directory" => "base.vhdx: a directory",
            "text file" => "base.vhdx: not a VHD or VHDX disk image",
            "itself" => "loops back to an image already in it",
            _ => "is a vhd image; a VHDX differencing disk needs a vhdx parent",
        };
        assert!(err.contains(expected), "{what}: {err}");
    }
    let options = OpenOptions {
        parent: Some(PathBuf::from("/dev/null")),
        ..Default::default()
    };
    let err = open_error(&child, &options);
    assert!(
        err.contains("under /dev, where no image is read from"),
        "{err}"
    );
}

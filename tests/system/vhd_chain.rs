//! VHDs created by this library, alone and as differencing chains over bases from qemu-img
//! and the corpus: every level reads as a flat model of the writes it got, as qemu reads
//! it (non-differencing) and as libvhdi's vhdimount reads it (chains too), and no parent is
//! written; unsafe files put in a parent's place are refused with errors that say why.
//! Chains read back through the library alone (larger children, locators, missing, wrong
//! and looping parents, the deepest chain) are in the quick tier.

use crate::common;
use crate::common::chain::{
    MIB, assert_same, check_chain, child_of, open, open_error, random_writes, read_all,
    unsafe_parent_errors, write_directly,
};
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::fs;
use std::path::{Path, PathBuf};
use vdisk_mount::OpenOptions;
use vdisk_mount::vhd::{VhdCreateOptions, VhdKind, create_vhd};

fn create(path: &Path, kind: VhdKind, size: u64) {
    create_vhd(path, &VhdCreateOptions::new(size, kind)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn created_images_read_alike_in_qemu_and_vhdimount() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    // Whole MiB, as Azure wants, and sizes geometry cannot express.
    for (name, kind, size) in [
        ("fixed-azure.vhd", VhdKind::Fixed, 30 * MIB),
        ("dynamic.vhd", VhdKind::Dynamic, 21 * MIB),
        ("fixed-odd.vhd", VhdKind::Fixed, 3 * MIB + 3 * 512),
        ("dynamic-odd.vhd", VhdKind::Dynamic, 5 * MIB + 7 * 512),
    ] {
        let path = dir.path().join(name);
        create(&path, kind, size);
        let opts = format!("driver=vpc,file.filename={}", path.display());
        assert_eq!(common::qemu_virtual_size(&opts), size, "{name}");
        common::qemu_check_clean("vpc", &path);
        // Empty, then written by us.
        let mut model = vec![0u8; size as usize];
        assert_same(&common::vhdimount_read(&path), &model, name);
        let disk = open(&path, false);
        assert_eq!(disk.size(), size);
        for (offset, data) in random_writes(&mut model, &mut rng, 12) {
            disk.write_at(&data, offset).unwrap();
        }
        disk.close().unwrap();
        let raw = dir.path().join(format!("{name}.raw"));
        common::qemu_convert_to_raw("vpc", &path, &raw);
        assert_same(&fs::read(&raw).unwrap(), &model, &format!("{name} in qemu"));
        assert_same(
            &common::vhdimount_read(&path),
            &model,
            &format!("{name} in vhdimount"),
        );
        assert_same(&read_all(open(&path, true).as_ref()), &model, name);
        common::qemu_check_clean("vpc", &path);
    }
}

#[test]
fn six_level_chain_over_a_qemu_image() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    common::qemu_img(&["create", "-q", "-f", "vpc", base.to_str().unwrap(), "9M"]);
    common::qemu_io(
        "vpc",
        &base,
        &["write -P 0x5a 0 1M", "write -P 0xa5 3000k 2500k"],
    );
    check_chain(dir.path(), &base, 6, 2, &write_directly);
}

#[test]
fn seven_level_chain_over_a_corpus_image() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = common::decompress_corpus_image(&corpus, "dfvfs__ext2__qemu-img.vhd", dir.path());
    check_chain(dir.path(), &base, 7, 3, &write_directly);
}

#[test]
fn parents_that_are_not_vhd_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    create(&base, VhdKind::Dynamic, 4 * MIB);
    child_of(&base, &child);
    for (what, err) in unsafe_parent_errors(&base, &child, &|at: &Path| {
        common::qemu_img(&["create", "-q", "-f", "vhdx", at.to_str().unwrap(), "4M"]);
    }) {
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        let expected = match what {
            "/dev/zero" => "resolves to /dev/zero under /dev, where no image is read from",
            "/proc/self/mem" => "under /proc, where no image is read from",
            "FIFO" => "base.vhd: a FIFO",
            "directory" => "base.vhd: a directory",
            "text file" => "base.vhd: not a VHD or VHDX disk image",
            "itself" => "loops back to an image already in it",
            _ => "is a vhdx image; a VHD differencing disk needs a vhd parent",
        };
        assert!(err.contains(expected), "{what}: {err}");
    }
    // And through the override, whatever the image says.
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

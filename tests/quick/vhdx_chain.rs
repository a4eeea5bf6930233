//! VHDX chains made by this library, read back through it: looping parents, a parent
//! written after its child was made or moved away, and a parent whose sector size differs
//! are refused with errors that say why. Chains checked against vhdimount, over qemu and
//! corpus bases, and unsafe parents are in the system tier's `vhdx_chain` module.

use crate::common::chain::{MIB, child_of, open_error, write_directly};
use std::fs;
use std::path::Path;
use vdisk_mount::OpenOptions;
use vdisk_mount::vhdx::create::{VhdxCreateOptions, VhdxKind, create_vhdx};

fn dynamic(path: &Path, size: u64) {
    create_vhdx(path, &VhdxCreateOptions::new(size, VhdxKind::Dynamic)).unwrap();
}

/// Rewrites every UTF-16LE occurrence of `from` in the file as `to` (same length); the
/// metadata region has no checksum, so the child stays valid.
fn rename_parent_in_place(path: &Path, from: &str, to: &str) {
    let mut image = fs::read(path).unwrap();
    let f: Vec<u8> = from.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let t: Vec<u8> = to.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let mut at = 0;
    while let Some(found) = image[at..].windows(f.len()).position(|w| w == f) {
        image[at + found..at + found + t.len()].copy_from_slice(&t);
        at += found + t.len();
    }
    fs::write(path, image).unwrap();
}

#[test]
fn a_chain_that_loops_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (x1, x2, x3) = (
        dir.path().join("x1.vhdx"),
        dir.path().join("x2.vhdx"),
        dir.path().join("x3.vhdx"),
    );
    dynamic(&x1, 4 * MIB);
    child_of(&x1, &x2);
    child_of(&x2, &x3);
    rename_parent_in_place(&x2, "x1.vhdx", "x3.vhdx");
    let err = open_error(&x3, &OpenOptions::default());
    assert!(
        err.contains("the chain of parents loops back to an image already in it"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_parent_written_after_the_child_was_made_is_refused_and_a_moved_one_found() {
    let dir = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(dir.path()).unwrap();
    let base = root.join("base.vhdx");
    let child = root.join("child.vhdx");
    dynamic(&base, 4 * MIB);
    child_of(&base, &child);
    let before = vdisk_mount::info::image_info(&base, &OpenOptions::default()).unwrap();
    // A write to the parent gives it a new DataWriteGuid: the child no longer matches.
    write_directly(&base, &[(0, b"changed".to_vec())]);
    let err = open_error(&child, &OpenOptions::default());
    assert!(err.contains("not this image's parent"), "{err}");
    assert!(
        err.contains(before.identifiers.data_write_guid.as_deref().unwrap()),
        "{err} names the expected DataWriteGuid"
    );

    // Moved away: not found; found again through the override.
    let base2 = root.join("base2.vhdx");
    let child2 = root.join("child2.vhdx");
    dynamic(&base2, 4 * MIB);
    child_of(&base2, &child2);
    let moved = root.join("elsewhere.vhdx");
    fs::rename(&base2, &moved).unwrap();
    let err = open_error(&child2, &OpenOptions::default());
    assert!(
        err.starts_with(&format!("{}: parent not found; tried", child2.display())),
        "{err}"
    );
    assert!(
        err.contains(&root.join("base2.vhdx").display().to_string()),
        "{err}"
    );
    let options = OpenOptions {
        parent: Some(moved),
        read_only: true,
        ..Default::default()
    };
    vdisk_mount::open(&child2, &options).unwrap();
}

#[test]
fn parent_and_child_sector_sizes_must_match() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, child) = (
        dir.path().join("a.vhdx"),
        dir.path().join("b.vhdx"),
        dir.path().join("child.vhdx"),
    );
    dynamic(&a, 4 * MIB);
    child_of(&a, &child);
    // A 4096-byte-sector image with a's DataWriteGuid put in its place.
    let options = VhdxCreateOptions {
        logical_sector_size: 4096,
        ..VhdxCreateOptions::new(4 * MIB, VhdxKind::Dynamic)
    };
    create_vhdx(&b, &options).unwrap();
    let mut image = fs::read(&b).unwrap();
    let donor = fs::read(&a).unwrap();
    for header in [64 * 1024usize, 128 * 1024] {
        image[header + 32..header + 48].copy_from_slice(&donor[header + 32..header + 48]);
        image[header + 4..header + 8].fill(0);
        let crc = crc32c(&image[header..header + 4096]);
        image[header + 4..header + 8].copy_from_slice(&crc.to_le_bytes());
    }
    fs::write(&b, image).unwrap();
    let options = OpenOptions {
        parent: Some(b),
        ..Default::default()
    };
    let err = open_error(&child, &options);
    assert!(
        err.contains("has 4096-byte logical sectors, the child 512-byte ones"),
        "{err}"
    );
}

/// CRC-32C (Castagnoli), bitwise: independent of the library's implementation.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

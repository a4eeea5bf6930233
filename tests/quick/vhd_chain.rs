//! VHD chains made by this library, read back through it: a child larger than its parent
//! reads zeros past the parent; parent locators name the parent relatively and absolutely;
//! missing, wrong and looping parents are refused with errors that say why; the deepest
//! chain allowed opens. Chains checked against qemu and vhdimount, and unsafe parents, are
//! in the system tier's `vhd_chain` module.

use crate::common;
use crate::common::chain::{MIB, assert_same, child_of, open, open_error, read_all};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vdisk_mount::vhd::{VhdCreateOptions, VhdKind, create_vhd};
use vdisk_mount::{Allocation, OpenOptions};

fn create(path: &Path, kind: VhdKind, size: u64) {
    create_vhd(path, &VhdCreateOptions::new(size, kind)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_child_larger_than_its_parent_reads_zeros_past_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("small.vhd");
    create(&base, VhdKind::Dynamic, 3 * MIB);
    let parent = open(&base, false);
    parent.write_at(&vec![0x77; 3 * MIB as usize], 0).unwrap();
    parent.close().unwrap();
    drop(parent);
    let digest = common::sha256_file(&base);

    let child = dir.path().join("large.vhd");
    create(
        &child,
        VhdKind::Differencing {
            parent: vdisk_mount::chain::parent_image(&child, &base).unwrap(),
        },
        8 * MIB,
    );
    let disk = open(&child, false);
    assert_eq!(disk.size(), 8 * MIB);
    let mut model = vec![0x77u8; 3 * MIB as usize];
    model.resize(8 * MIB as usize, 0);
    assert_same(&read_all(disk.as_ref()), &model, "fresh child");
    assert_eq!(
        disk.allocation(2 * MIB, 4 * MIB).unwrap(),
        vec![
            vdisk_mount::Extent {
                offset: 2 * MIB,
                len: MIB,
                state: Allocation::Data
            },
            vdisk_mount::Extent {
                offset: 3 * MIB,
                len: 3 * MIB,
                state: Allocation::Zero
            },
        ]
    );
    // Across the parent's end, and a partial sector past it.
    disk.write_at(&[1; 1000], 3 * MIB - 500).unwrap();
    disk.write_at(&[2; 3], 7 * MIB + 10).unwrap();
    model[3 * MIB as usize - 500..3 * MIB as usize + 500].fill(1);
    model[7 * MIB as usize + 10..7 * MIB as usize + 13].fill(2);
    disk.close().unwrap();
    drop(disk);
    assert_same(&read_all(open(&child, true).as_ref()), &model, "child");
    // No second opinion here: libvhdi fails reads past the parent's end (EIO).
    assert_eq!(common::sha256_file(&base), digest);
    // A smaller child would hide the parent's end.
    let err = create_vhd(
        &dir.path().join("smaller.vhd"),
        &VhdCreateOptions::new(
            2 * MIB,
            VhdKind::Differencing {
                parent: vdisk_mount::chain::parent_image(&child, &base).unwrap(),
            },
        ),
    )
    .unwrap_err();
    assert!(err.to_string().contains("would cut off the end"), "{err}");
}

/// Replaces every occurrence of `from` by `to` (same length) in `path`, in UTF-16 of both
/// byte orders, then repairs the dynamic header's checksum.
fn rename_parent_in_place(path: &Path, from: &str, to: &str) {
    let mut image = fs::read(path).unwrap();
    for encode in [u16::to_le_bytes, u16::to_be_bytes] {
        let f: Vec<u8> = from.encode_utf16().flat_map(encode).collect();
        let t: Vec<u8> = to.encode_utf16().flat_map(encode).collect();
        let mut at = 0;
        while let Some(found) = image[at..].windows(f.len()).position(|w| w == f) {
            image[at + found..at + found + t.len()].copy_from_slice(&t);
            at += found + t.len();
        }
    }
    // The dynamic header at 512: checksum at 36, one's complement of the byte sum.
    let header = &mut image[512..1536];
    header[36..40].fill(0);
    let sum = header
        .iter()
        .fold(0u32, |sum, &b| sum.wrapping_add(u32::from(b)));
    header[36..40].copy_from_slice(&(!sum).to_be_bytes());
    fs::write(path, image).unwrap();
}

#[test]
fn a_chain_that_loops_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (x1, x2, x3) = (
        dir.path().join("x1.vhd"),
        dir.path().join("x2.vhd"),
        dir.path().join("x3.vhd"),
    );
    create(&x1, VhdKind::Dynamic, 4 * MIB);
    child_of(&x1, &x2);
    child_of(&x2, &x3);
    rename_parent_in_place(&x2, "x1.vhd", "x3.vhd");
    let err = open_error(&x3, &OpenOptions::default());
    assert!(
        err.contains("the chain of parents loops back to an image already in it"),
        "{err}"
    );
    assert!(err.contains("x3.vhd -> "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_missing_parent_lists_the_paths_tried_and_a_moved_one_is_found_by_override() {
    let dir = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(dir.path()).unwrap();
    let (bases, vm) = (root.join("bases"), root.join("vm"));
    fs::create_dir(&bases).unwrap();
    fs::create_dir(&vm).unwrap();
    let base = bases.join("base.vhd");
    let child = vm.join("child.vhd");
    create(&base, VhdKind::Dynamic, 4 * MIB);
    let parent = open(&base, false);
    parent.write_at(b"parent data", 1000).unwrap();
    parent.close().unwrap();
    drop(parent);
    child_of(&base, &child);
    let moved = root.join("elsewhere.vhd");
    fs::rename(&base, &moved).unwrap();

    // Relative locator, then the absolute one's name beside the child, then the absolute
    // path itself.
    assert_eq!(
        open_error(&child, &OpenOptions::default()),
        format!(
            "{0}/vm/child.vhd: parent not found; tried {0}/vm/../bases/base.vhd, \
             {0}/vm/base.vhd, {0}/bases/base.vhd: No such file or directory (os error 2)",
            root.display()
        )
    );

    let options = OpenOptions {
        parent: Some(moved.clone()),
        ..Default::default()
    };
    let disk = vdisk_mount::open(&child, &options).unwrap();
    let mut buf = [0u8; 11];
    disk.read_at(&mut buf, 1000).unwrap();
    assert_eq!(&buf, b"parent data");
}

#[test]
fn a_parent_with_another_identity_is_refused_showing_both() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    create(&base, VhdKind::Dynamic, 4 * MIB);
    let expected = uuid_of(&base);
    child_of(&base, &child);
    fs::remove_file(&base).unwrap();
    create(&base, VhdKind::Dynamic, 4 * MIB);
    let found = uuid_of(&base);
    let err = open_error(&child, &OpenOptions::default());
    assert!(
        err.ends_with(&format!(
            "base.vhd: not this image's parent: its identifier is {found}, the child expects \
             {expected}"
        )),
        "{err}"
    );
}

/// A VHD footer's Unique Id as hyphenated hex.
fn uuid_of(path: &Path) -> String {
    let image = fs::read(path).unwrap();
    let id = &image[image.len() - 512 + 68..image.len() - 512 + 84];
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[test]
fn locators_name_the_parent_relatively_and_absolutely() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("children");
    fs::create_dir(&sub).unwrap();
    let base = dir.path().join("base.vhd");
    let child = sub.join("child.vhd");
    create(&base, VhdKind::Dynamic, 2 * MIB);
    child_of(&base, &child);
    let image = fs::File::open(&child).unwrap();
    let mut header = [0u8; 1024];
    image.read_exact_at(&mut header, 512).unwrap();
    let utf16le = |bytes: &[u8]| {
        let units: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|p| u16::from_le_bytes([p[0], p[1]]))
            .collect();
        String::from_utf16(&units).unwrap()
    };
    let mut found = Vec::new();
    for entry in header[576..768].chunks_exact(24) {
        let code = &entry[0..4];
        if code == [0; 4] {
            continue;
        }
        let len = u32::from_be_bytes(entry[8..12].try_into().unwrap()) as usize;
        let at = u64::from_be_bytes(entry[16..24].try_into().unwrap());
        assert_eq!(at % 512, 0, "locator data is sector-aligned");
        let mut data = vec![0u8; len];
        image.read_exact_at(&mut data, at).unwrap();
        found.push((String::from_utf8_lossy(code).into_owned(), utf16le(&data)));
    }
    let absolute = fs::canonicalize(&base)
        .unwrap()
        .to_str()
        .unwrap()
        .replace('/', "\\");
    assert_eq!(
        found,
        [
            ("W2ru".to_string(), "..\\base.vhd".to_string()),
            ("W2ku".to_string(), absolute)
        ]
    );
    let name: Vec<u8> = "base.vhd"
        .encode_utf16()
        .flat_map(u16::to_be_bytes)
        .collect();
    assert_eq!(&header[64..64 + name.len()], &name[..]);
    assert_eq!(open(&child, true).size(), 2 * MIB);
}

#[test]
fn the_deepest_chain_allowed_opens_and_one_more_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let depth = vdisk_mount::chain::MAX_CHAIN_DEPTH;
    let mut previous = dir.path().join("level0.vhd");
    create(&previous, VhdKind::Dynamic, MIB);
    let base = open(&previous, false);
    base.write_at(b"base", 0).unwrap();
    base.close().unwrap();
    drop(base);
    for level in 1..depth {
        let path = dir.path().join(format!("level{level}.vhd"));
        child_of(&previous, &path);
        let disk = open(&path, false);
        disk.write_at(&[level as u8], 4 + level as u64).unwrap();
        disk.close().unwrap();
        previous = path;
    }
    let top = open(&previous, true);
    let mut found = vec![0u8; 4 + depth];
    top.read_at(&mut found, 0).unwrap();
    let mut expected = b"base".to_vec();
    expected.extend((0..depth).map(|level| level as u8));
    assert_eq!(found, expected);
    drop(top);
    let one_more = dir.path().join("one-more.vhd");
    child_of(&previous, &one_more);
    let err = open_error(&one_more, &OpenOptions::default());
    assert!(
        err.ends_with("VHD differencing disk has more than 32 images in its chain of parents"),
        "{err}"
    );
}

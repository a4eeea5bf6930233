//! VHD images made and written by qemu-img/qemu-io read the same through this library as
//! through qemu, and images this library writes read back the same in qemu.

use crate::common;
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vdisk_mount::{Allocation, Format, OpenOptions, VirtualDisk};

const MIB: u64 = 1 << 20;
/// qemu's dynamic VHDs use 2 MiB blocks.
const BLOCK: u64 = 2 * MIB;

struct Case {
    name: &'static str,
    options: &'static [&'static str],
    /// Size asked of qemu-img; qemu rounds it to whole CHS geometry unless forced.
    requested: u64,
}

const CASES: &[Case] = &[
    Case {
        name: "dynamic",
        options: &[],
        requested: 64 * MIB,
    },
    Case {
        name: "fixed",
        options: &["subformat=fixed"],
        requested: 40 * MIB,
    },
    Case {
        name: "dynamic-force-size",
        options: &["force_size=on"],
        requested: 33 * MIB,
    },
    Case {
        // Neither a whole number of blocks nor a CHS-exact size.
        name: "dynamic-odd-size",
        options: &["force_size=on"],
        requested: 5 * MIB + 7 * 512,
    },
    Case {
        name: "fixed-force-size-odd",
        options: &["subformat=fixed", "force_size=on"],
        requested: 3 * MIB + 3 * 512,
    },
];

fn create(dir: &Path, name: &str, options: &[&str], size: u64) -> (PathBuf, u64) {
    let path = dir.join(format!("{name}.vhd"));
    let path_str = path.to_str().unwrap();
    let size_str = size.to_string();
    let mut args = vec!["create", "-q", "-f", "vpc"];
    let joined = options.join(",");
    if !options.is_empty() {
        args.extend(["-o", &joined]);
    }
    args.extend([path_str, &size_str]);
    common::qemu_img(&args);
    let virtual_size = common::qemu_virtual_size(&format!("driver=vpc,file.filename={path_str}"));
    (path, virtual_size)
}

/// Patterns qemu writes before we read: the first block, across a block boundary, the
/// middle, and the last sector.
fn qemu_patterns(path: &Path, size: u64) {
    let boundary = BLOCK - 8192;
    let middle = size / 2 / 512 * 512;
    let last = size - 512;
    common::qemu_io(
        "vpc",
        path,
        &[
            "write -P 0x11 0 64k",
            &format!("write -P 0x22 {boundary} 16k"),
            &format!("write -P 0x33 {middle} 4k"),
            &format!("write -P 0x44 {last} 512"),
        ],
    );
}

fn open(path: &Path, read_only: bool) -> Box<dyn VirtualDisk> {
    let options = OpenOptions {
        read_only,
        ..Default::default()
    };
    vdisk_mount::open(path, &options).unwrap_or_else(|e| panic!("{e}"))
}

/// Our whole disk equals the raw file, compared in chunks.
fn assert_disk_equals_raw(disk: &dyn VirtualDisk, raw: &Path, what: &str) {
    let raw = File::open(raw).unwrap();
    assert_eq!(disk.size(), raw.metadata().unwrap().len(), "{what}: size");
    let (mut ours, mut theirs) = (vec![0u8; 8 * MIB as usize], vec![0u8; 8 * MIB as usize]);
    let mut pos = 0;
    while pos < disk.size() {
        let n = (disk.size() - pos).min(ours.len() as u64) as usize;
        disk.read_at(&mut ours[..n], pos).unwrap();
        raw.read_exact_at(&mut theirs[..n], pos).unwrap();
        if ours[..n] != theirs[..n] {
            let at = (0..n).find(|&i| ours[i] != theirs[i]).unwrap();
            panic!(
                "{what}: byte {} reads {:#x}, qemu reads {:#x}",
                pos + at as u64,
                ours[at],
                theirs[at]
            );
        }
        pos += n as u64;
    }
}

#[test]
fn images_written_by_qemu_read_the_same() {
    let dir = tempfile::tempdir().unwrap();
    for case in CASES {
        let (path, size) = create(dir.path(), case.name, case.options, case.requested);
        qemu_patterns(&path, size);
        let raw = dir.path().join(format!("{}.raw", case.name));
        common::qemu_convert_to_raw("vpc", &path, &raw);
        let disk = open(&path, true);
        assert_eq!(disk.format(), Format::Vhd);
        assert_eq!(disk.size(), size, "{}", case.name);
        assert_disk_equals_raw(disk.as_ref(), &raw, case.name);
    }
}

/// The writes a test applies both to an image (through the library) and to a raw file.
fn writes(size: u64, seed: u64) -> Vec<(u64, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let fill = |rng: &mut StdRng, len: usize| {
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        data
    };
    let mut list = vec![
        // Unaligned, inside the first block.
        (1234, fill(&mut rng, 5000)),
        // Across the first block boundary, unaligned on both ends.
        (BLOCK - 300, fill(&mut rng, 1000)),
        // The last sector, then the last byte over it.
        (size - 512, fill(&mut rng, 512)),
        (size - 1, fill(&mut rng, 1)),
        // A single byte in the middle.
        (size / 2 + 3, fill(&mut rng, 1)),
    ];
    if size > 6 * MIB {
        // Several whole blocks in one request.
        list.push((3 * MIB + 17, fill(&mut rng, 5 * MIB as usize)));
    }
    for _ in 0..20 {
        let len = rng.random_range(1..300_000u64).min(size);
        let offset = rng.random_range(0..=size - len);
        let data = fill(&mut rng, len as usize);
        list.push((offset, data));
    }
    list
}

fn write_both(disk: &dyn VirtualDisk, raw: &File, writes: &[(u64, Vec<u8>)]) {
    for (offset, data) in writes {
        disk.write_at(data, *offset).unwrap();
        raw.write_all_at(data, *offset).unwrap();
    }
}

fn qemu_compare(image: &Path, raw: &Path) {
    common::qemu_img(&[
        "compare",
        "-f",
        "vpc",
        "-F",
        "raw",
        image.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
}

#[test]
fn images_we_write_read_the_same_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (seed, case) in CASES.iter().enumerate() {
        let (path, size) = create(dir.path(), case.name, case.options, case.requested);
        // Some blocks already allocated by qemu, some not.
        qemu_patterns(&path, size);
        let raw_path = dir.path().join(format!("{}.raw", case.name));
        common::qemu_convert_to_raw("vpc", &path, &raw_path);
        let raw = File::options().write(true).open(&raw_path).unwrap();

        let disk = open(&path, false);
        write_both(disk.as_ref(), &raw, &writes(size, seed as u64));
        disk.flush().unwrap();
        disk.close().unwrap();
        drop(disk);

        qemu_compare(&path, &raw_path);
        common::qemu_check_clean("vpc", &path);
        let disk = open(&path, true);
        assert_disk_equals_raw(disk.as_ref(), &raw_path, case.name);
    }
}

#[test]
fn discarded_ranges_read_as_zeros_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for case in &CASES[..2] {
        let (path, size) = create(dir.path(), case.name, case.options, case.requested);
        qemu_patterns(&path, size);
        let disk = open(&path, false);
        disk.discard(1000, BLOCK).unwrap();
        disk.discard(size - 700, 700).unwrap();
        disk.close().unwrap();
        drop(disk);
        let zeros = |at: u64, len: u64| format!("read -P 0 {at} {len}");
        common::qemu_io(
            "vpc",
            &path,
            &[
                "read -P 0x11 0 1000",
                &zeros(1000, 64 * 1024 - 1000),
                &zeros(BLOCK - 8192, 8192 + 1000),
                &format!("read -P 0x22 {} {}", BLOCK + 1000, 8192 - 1000),
                &zeros(size - 512, 512),
            ],
        );
    }
}

#[test]
fn a_large_sparse_image_reads_and_writes_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let (path, size) = create(dir.path(), "large", &[], 8 << 30);
    assert!(size > 8_000_000_000, "{size}");
    qemu_patterns(&path, size);
    let raw_path = dir.path().join("large.raw");
    common::qemu_convert_to_raw("vpc", &path, &raw_path);

    let disk = open(&path, true);
    assert_eq!(disk.size(), size);
    let extents = disk.allocation(0, size).unwrap();
    let data: u64 = extents
        .iter()
        .filter(|e| e.state == Allocation::Data)
        .map(|e| e.len)
        .sum();
    // First block, the block after the boundary, the middle one, and the last one, which
    // the disk's end cuts short.
    let last_block_start = (size - 1) / BLOCK * BLOCK;
    assert_eq!(data, 3 * BLOCK + (size - last_block_start), "{extents:?}");
    assert_disk_equals_raw(disk.as_ref(), &raw_path, "large");
    drop(disk);

    let raw = File::options().write(true).open(&raw_path).unwrap();
    let disk = open(&path, false);
    let mut list = writes(size, 99);
    list.push((5 << 30, vec![0x5A; 3 * MIB as usize + 11]));
    write_both(disk.as_ref(), &raw, &list);
    disk.close().unwrap();
    drop(disk);
    qemu_compare(&path, &raw_path);
    let disk = open(&path, true);
    assert_disk_equals_raw(disk.as_ref(), &raw_path, "large, rewritten");
}

#[test]
fn concurrent_writers_leave_an_image_qemu_reads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (path, size) = create(dir.path(), "concurrent", &[], 24 * MIB);
    qemu_patterns(&path, size);
    let raw_path = dir.path().join("concurrent.raw");
    common::qemu_convert_to_raw("vpc", &path, &raw_path);
    let raw = File::options().write(true).open(&raw_path).unwrap();
    let disk = open(&path, false);
    // Four threads interleave 4 KiB stripes, so they race to allocate the same blocks and
    // overwrite neighbouring parts of allocated ones.
    const STRIPE: u64 = 4096;
    let stripes = size / STRIPE;
    std::thread::scope(|scope| {
        for thread in 0..4u64 {
            let (disk, raw) = (disk.as_ref(), &raw);
            scope.spawn(move || {
                let mut rng = StdRng::seed_from_u64(thread);
                for stripe in (thread..stripes).step_by(4) {
                    if rng.random_range(0..3) == 0 {
                        continue;
                    }
                    let mut data = vec![0u8; STRIPE as usize];
                    rng.fill_bytes(&mut data);
                    disk.write_at(&data, stripe * STRIPE).unwrap();
                    raw.write_all_at(&data, stripe * STRIPE).unwrap();
                }
            });
        }
    });
    disk.close().unwrap();
    drop(disk);
    qemu_compare(&path, &raw_path);
    let disk = open(&path, true);
    assert_disk_equals_raw(disk.as_ref(), &raw_path, "concurrent");
}

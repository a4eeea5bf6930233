//! VHDX images made by qemu-img and written by qemu-io read the same through this library
//! as through qemu and libvhdi; images written by this library stay valid for both.

use crate::common;
use crate::common::mount::pattern;
use crate::common::open_vhdx;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use vdisk_mount::vhdx::metadata::{LOGICAL_SECTOR_SIZE, METADATA_TABLE_LEN, MetadataTable};
use vdisk_mount::vhdx::region_table::{METADATA_REGION, REGION_TABLE_LEN, RegionTable};
use vdisk_mount::{OpenOptions, VirtualDisk};

const MIB: u64 = 1 << 20;

/// Fails at the first offset where the disk and the raw file differ.
fn assert_disk_equals_file(disk: &dyn VirtualDisk, raw: &Path, what: &str) {
    let file = File::open(raw).unwrap();
    assert_eq!(file.metadata().unwrap().len(), disk.size(), "{what}: size");
    let mut ours = vec![0u8; 4 << 20];
    let mut theirs = vec![0u8; 4 << 20];
    let mut offset = 0;
    while offset < disk.size() {
        let n = (disk.size() - offset).min(ours.len() as u64) as usize;
        disk.read_at(&mut ours[..n], offset).unwrap();
        file.read_exact_at(&mut theirs[..n], offset).unwrap();
        if ours[..n] != theirs[..n] {
            let i = (0..n).find(|&i| ours[i] != theirs[i]).unwrap();
            panic!(
                "{what}: first difference at byte {} (ours {:#x}, expected {:#x})",
                offset + i as u64,
                ours[i],
                theirs[i]
            );
        }
        offset += n as u64;
    }
}

/// Mounts `image` with libvhdi's vhdimount and checks its view equals `raw`. Skipped only
/// when vhdimount is missing outside CI.
fn assert_vhdimount_equals(image: &Path, raw: &Path) {
    if Command::new("vhdimount").arg("-V").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "vhdimount missing in CI");
        eprintln!("SKIPPED: vhdimount not installed");
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    common::run(Command::new("vhdimount").arg(image).arg(mnt.path()));
    let difference = first_difference(&mnt.path().join("vhdi1"), raw);
    common::run(Command::new("fusermount3").arg("-u").arg(mnt.path()));
    if let Some(at) = difference {
        panic!(
            "vhdimount's view of {} differs at byte {at}",
            image.display()
        );
    }
}

/// The first offset where two files differ (a length difference counts at the shorter end).
fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let (a, b) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (len_a, len_b) = (a.metadata().unwrap().len(), b.metadata().unwrap().len());
    let mut buf_a = vec![0u8; 4 << 20];
    let mut buf_b = vec![0u8; 4 << 20];
    let mut offset = 0;
    while offset < len_a.min(len_b) {
        let n = (len_a.min(len_b) - offset).min(buf_a.len() as u64) as usize;
        a.read_exact_at(&mut buf_a[..n], offset).unwrap();
        b.read_exact_at(&mut buf_b[..n], offset).unwrap();
        if buf_a[..n] != buf_b[..n] {
            return Some(offset + (0..n).find(|&i| buf_a[i] != buf_b[i]).unwrap() as u64);
        }
        offset += n as u64;
    }
    (len_a != len_b).then_some(len_a.min(len_b))
}

struct Case {
    block_mib: u64,
    log_mib: u64,
    fixed: bool,
    block_state_zero: bool,
    size: u64,
}

impl Case {
    fn create(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!(
            "b{}-l{}-{}-z{}-{}.vhdx",
            self.block_mib,
            self.log_mib,
            if self.fixed { "fixed" } else { "dynamic" },
            self.block_state_zero,
            self.size
        ));
        let options = format!(
            "subformat={},block_size={}M,log_size={}M,block_state_zero={}",
            if self.fixed { "fixed" } else { "dynamic" },
            self.block_mib,
            self.log_mib,
            if self.block_state_zero { "on" } else { "off" }
        );
        common::qemu_img(&[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            &options,
            path.to_str().unwrap(),
            &self.size.to_string(),
        ]);
        path
    }

    /// Writes by qemu-io: at the start, across the first block boundary, in the middle,
    /// and the last sector.
    fn qemu_writes(&self, image: &Path) {
        let bs = self.block_mib * MIB;
        let mut cmds = vec![
            "write -P 0x11 0 4096".to_string(),
            format!("write -P 0x22 {} 8192", bs - 4096),
            format!("write -P 0x33 {} 512", self.size - 512),
        ];
        if self.size > 3 * bs {
            cmds.push(format!("write -P 0x44 {} 65536", 2 * bs + 4096));
        }
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        common::qemu_io("vhdx", image, &refs);
    }

    /// Unaligned writes and discards through this library, mirrored onto `raw`.
    fn our_writes(&self, disk: &dyn VirtualDisk, raw: &Path) {
        let raw = std::fs::OpenOptions::new().write(true).open(raw).unwrap();
        let (bs, size) = (self.block_mib * MIB, self.size);
        let writes = [
            (0, 1),
            (bs - 3, 7),
            (size - 512, 512),
            (size - 1, 1),
            (size / 2 + 17, (3 * bs / 2).min(size / 2 - 17) as usize),
            ((bs + 12345).min(size - 300), 300),
        ];
        for (i, &(offset, len)) in writes.iter().enumerate() {
            let data = pattern(i as u64 + 1, len);
            disk.write_at(&data, offset).unwrap();
            raw.write_all_at(&data, offset).unwrap();
        }
        let discards = [(bs.min(size) / 2 + 5, 1000), (0, bs.min(size))];
        for (offset, len) in discards {
            disk.discard(offset, len).unwrap();
            raw.write_all_at(&vec![0u8; len as usize], offset).unwrap();
        }
        disk.write_at(&pattern(99, 4096), 0).unwrap();
        raw.write_all_at(&pattern(99, 4096), 0).unwrap();
    }
}

fn cases() -> Vec<Case> {
    let case = |block_mib, log_mib, fixed, block_state_zero, size| Case {
        block_mib,
        log_mib,
        fixed,
        block_state_zero,
        size,
    };
    vec![
        case(1, 1, false, true, 5 * MIB + 512),
        case(1, 8, true, false, 4 * MIB),
        case(2, 1, false, false, 8 * MIB),
        case(2, 8, false, true, 7 * MIB + 3 * 512),
        case(32, 1, true, false, 40 * MIB),
        case(32, 8, false, false, 96 * MIB + 4096),
        case(32, 1, false, true, 128 * MIB),
        case(256, 1, false, true, 300 * MIB),
        case(256, 8, false, false, 512 * MIB),
    ]
}

#[test]
fn qemu_made_images_read_and_write_like_qemu_and_libvhdi() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases() {
        let image = case.create(dir.path());
        let name = image.file_name().unwrap().to_str().unwrap().to_string();
        case.qemu_writes(&image);
        let raw = dir.path().join("expected.raw");
        common::qemu_convert_to_raw("vhdx", &image, &raw);

        let disk = open_vhdx(&image, true);
        assert_eq!(disk.size(), case.size, "{name}");
        assert_eq!(disk.info().fixed, case.fixed, "{name}");
        assert_disk_equals_file(&disk, &raw, &format!("{name} as qemu wrote it"));
        drop(disk);
        assert_vhdimount_equals(&image, &raw);

        let disk = open_vhdx(&image, false);
        case.our_writes(&disk, &raw);
        assert_disk_equals_file(&disk, &raw, &format!("{name} after our writes"));
        disk.close().unwrap();
        drop(disk);

        common::qemu_check_clean("vhdx", &image);
        common::qemu_img(&[
            "compare",
            "-f",
            "vhdx",
            "-F",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        assert_vhdimount_equals(&image, &raw);
        let reopened = open_vhdx(&image, true);
        assert!(reopened.info().log_guid.is_nil(), "{name}: log left dirty");
        drop(reopened);
        std::fs::remove_file(&image).unwrap();
        std::fs::remove_file(&raw).unwrap();
    }
}

/// Rewrites the Logical Sector Size item of a fresh, empty dynamic image to 4096. With no
/// block allocated and the image far below one chunk, nothing else depends on it.
fn make_4k_sector_image(path: &Path) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut table = vec![0u8; REGION_TABLE_LEN];
    file.read_exact_at(&mut table, 192 * 1024).unwrap();
    let regions = RegionTable::parse(&table, "region table 1").unwrap();
    let region = regions.find(METADATA_REGION);
    let mut meta = vec![0u8; METADATA_TABLE_LEN];
    file.read_exact_at(&mut meta, region.file_offset).unwrap();
    let meta = MetadataTable::parse(&meta, u64::from(region.length)).unwrap();
    let item = meta.find(LOGICAL_SECTOR_SIZE).unwrap();
    let at = region.file_offset + u64::from(item.offset);
    let mut old = [0u8; 4];
    file.read_exact_at(&mut old, at).unwrap();
    assert_eq!(u32::from_le_bytes(old), 512);
    file.write_all_at(&4096u32.to_le_bytes(), at).unwrap();
}

#[test]
fn logical_sector_size_4096_reads_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let size = 24 * MIB;
    for (block_state_zero, block_mib) in [(true, 1), (false, 8)] {
        let case = Case {
            block_mib,
            log_mib: 1,
            fixed: false,
            block_state_zero,
            size,
        };
        let image = case.create(dir.path());
        make_4k_sector_image(&image);
        let raw = dir.path().join("expected.raw");
        File::create(&raw).unwrap().set_len(size).unwrap();

        let disk = open_vhdx(&image, false);
        assert_eq!(disk.logical_sector_size(), 4096);
        case.our_writes(&disk, &raw);
        disk.close().unwrap();
        drop(disk);

        let disk = open_vhdx(&image, true);
        assert_eq!(disk.logical_sector_size(), 4096);
        assert_disk_equals_file(&disk, &raw, "4 KiB-sector image");
        drop(disk);
        assert_vhdimount_equals(&image, &raw);
        std::fs::remove_file(&image).unwrap();
    }
}

/// After enough allocations for the log to wrap, an image left with its last BAT update
/// only in the log is replayed identically by this library (in memory) and by qemu.
#[test]
fn wrapped_log_left_dirty_is_replayed_by_us_and_by_qemu() {
    use vdisk_mount::vhdx::region_table::BAT_REGION;
    let dir = tempfile::tempdir().unwrap();
    let case = Case {
        block_mib: 1,
        log_mib: 1,
        fixed: false,
        block_state_zero: false,
        size: 160 * MIB,
    };
    let image = case.create(dir.path());
    let raw = dir.path().join("expected.raw");
    File::create(&raw).unwrap().set_len(case.size).unwrap();
    let raw_file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();

    let disk = open_vhdx(&image, false);
    // Each allocation is one 8 KiB log entry: 150 of them go round a 1 MiB log.
    let blocks = 150;
    for block in 0..blocks {
        let data = pattern(block + 7, 512);
        disk.write_at(&data, block * MIB + 1000).unwrap();
        raw_file.write_all_at(&data, block * MIB + 1000).unwrap();
    }
    // Every write was journaled, applied and flushed: this copy is the file as a power
    // failure now would leave it, with the log still live.
    let dirty = dir.path().join("dirty.vhdx");
    std::fs::copy(&image, &dirty).unwrap();
    disk.close().unwrap();
    drop(disk);

    // Undo the last in-place BAT update, so only the log holds it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dirty)
        .unwrap();
    let mut table = vec![0u8; REGION_TABLE_LEN];
    file.read_exact_at(&mut table, 192 * 1024).unwrap();
    let bat = RegionTable::parse(&table, "region table 1")
        .unwrap()
        .find(BAT_REGION)
        .file_offset;
    file.write_all_at(&0u64.to_le_bytes(), bat + (blocks - 1) * 8)
        .unwrap();
    drop(file);

    let before = common::sha256_file(&dirty);
    let ours = open_vhdx(&dirty, true);
    assert!(ours.info().log_was_dirty);
    assert_disk_equals_file(&ours, &raw, "wrapped log replayed in memory");
    drop(ours);
    assert_eq!(common::sha256_file(&dirty), before, "read-only open wrote");

    common::qemu_img(&[
        "check",
        "-q",
        "-r",
        "all",
        "-f",
        "vhdx",
        dirty.to_str().unwrap(),
    ]);
    common::qemu_img(&[
        "compare",
        "-f",
        "vhdx",
        "-F",
        "raw",
        dirty.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    common::qemu_img(&[
        "compare",
        "-f",
        "vhdx",
        "-F",
        "raw",
        image.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
}

/// Bytes written over an image at an offset.
type Patch = (u64, Vec<u8>);

/// Damage to a qemu-made image: one bad copy of a duplicated structure is survived, anything
/// else is refused with one line naming the file and the structure.
#[test]
fn damaged_qemu_images_are_refused_with_one_line_errors() {
    use vdisk_mount::vhdx::region_table::BAT_REGION;
    let dir = tempfile::tempdir().unwrap();
    let case = Case {
        block_mib: 1,
        log_mib: 1,
        fixed: false,
        block_state_zero: true,
        size: 8 * MIB,
    };
    let pristine = case.create(dir.path());
    case.qemu_writes(&pristine);
    let raw = dir.path().join("expected.raw");
    common::qemu_convert_to_raw("vhdx", &pristine, &raw);
    let mut table = vec![0u8; REGION_TABLE_LEN];
    File::open(&pristine)
        .unwrap()
        .read_exact_at(&mut table, 192 * 1024)
        .unwrap();
    let regions = RegionTable::parse(&table, "region table 1").unwrap();
    let bat = regions.find(BAT_REGION).file_offset;
    let meta = regions.find(METADATA_REGION).file_offset;
    let file_len = std::fs::metadata(&pristine).unwrap().len();

    let flip = |at: u64| -> Vec<Patch> {
        let mut byte = [0u8; 1];
        File::open(&pristine)
            .unwrap()
            .read_exact_at(&mut byte, at)
            .unwrap();
        vec![(at, vec![byte[0] ^ 0x20])]
    };
    let mut overlapping = regions.clone();
    overlapping.entries[0].file_offset = MIB;
    let overlapping = overlapping.to_bytes();
    let past_end = (file_len.next_multiple_of(MIB) + 4 * MIB) | 6;
    let cases: Vec<(&str, Vec<Patch>, Option<&str>)> = vec![
        ("header 1", flip(64 * 1024 + 40), None),
        ("header 2", flip(128 * 1024 + 40), None),
        (
            "both headers",
            [flip(64 * 1024 + 40), flip(128 * 1024 + 40)].concat(),
            Some("headers: no valid header"),
        ),
        ("region table 1", flip(192 * 1024 + 20), None),
        (
            "both region tables",
            [flip(192 * 1024 + 20), flip(256 * 1024 + 20)].concat(),
            Some("region tables: no valid copy"),
        ),
        (
            "metadata table",
            flip(meta + 2),
            Some("metadata table: signature is not 'metadata'"),
        ),
        (
            "BAT entry",
            vec![(bat + 8 * 5, past_end.to_le_bytes().to_vec())],
            Some("BAT entry 5: points past end of file"),
        ),
        (
            "overlapping regions",
            vec![
                (192 * 1024, overlapping.clone()),
                (256 * 1024, overlapping.clone()),
            ],
            Some(
                "region table: BAT region 2dc27766-f623-4200-9d64-115e9bfd4a08: at 0x100000 overlaps the log",
            ),
        ),
    ];
    for (what, patches, refusal) in cases {
        let damaged = dir.path().join("damaged.vhdx");
        std::fs::copy(&pristine, &damaged).unwrap();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&damaged)
            .unwrap();
        for (at, bytes) in patches {
            file.write_all_at(&bytes, at).unwrap();
        }
        drop(file);
        let options = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        match (vdisk_mount::open(&damaged, &options), refusal) {
            (Ok(disk), None) => assert_disk_equals_file(disk.as_ref(), &raw, what),
            (Err(e), Some(expected)) => {
                let text = e.to_string();
                let prefix = format!("{}: {expected}", damaged.display());
                assert!(text.starts_with(&prefix), "{what}: {text}");
                assert!(!text.contains('\n'), "{what}: {text}");
            }
            (Ok(_), Some(expected)) => panic!("{what}: opened, expected {expected}"),
            (Err(e), None) => panic!("{what}: refused: {e}"),
        }
    }
}

//! Every VHDX of the sample-image corpus reads to the contents two independent readers
//! agree on, including images whose log must be replayed first.

use crate::common;
use crate::common::open_vhdx;
use vdisk_mount::{Allocation, VirtualDisk};

#[test]
fn corpus_vhdx_images_read_to_expected_contents() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let names = common::corpus_images(&corpus, ".vhdx");
    assert!(names.len() >= 9, "corpus lists only {names:?}");
    for name in names {
        let path = common::decompress_corpus_image(&corpus, &name, dir.path());
        let expected = common::expected_sha256(&corpus, &format!("{name}.raw"));
        let file_before = common::sha256_file(&path);
        let disk = open_vhdx(&path, true);
        assert_eq!(common::sha256_disk(&disk), expected, "{name} read-only");
        drop(disk);
        assert_eq!(
            common::sha256_file(&path),
            file_before,
            "{name}: a read-only open changed the file"
        );
        std::fs::remove_file(&path).unwrap();
    }
}

/// Both disks map the same ranges and hold the same bytes in every range with data.
fn assert_same_view(a: &dyn VirtualDisk, b: &dyn VirtualDisk, what: &str) {
    assert_eq!(a.size(), b.size(), "{what}");
    let extents = a.allocation(0, a.size()).unwrap();
    assert_eq!(extents, b.allocation(0, b.size()).unwrap(), "{what}");
    let (mut buf_a, mut buf_b) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    for extent in extents.iter().filter(|e| e.state == Allocation::Data) {
        let mut offset = extent.offset;
        while offset < extent.offset + extent.len {
            let n = (extent.offset + extent.len - offset).min(buf_a.len() as u64) as usize;
            a.read_at(&mut buf_a[..n], offset).unwrap();
            b.read_at(&mut buf_b[..n], offset).unwrap();
            assert!(buf_a[..n] == buf_b[..n], "{what}: differ near {offset}");
            offset += n as u64;
        }
    }
}

#[test]
fn dirty_logs_are_replayed_in_memory_read_only_and_on_disk_read_write() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dirty: Vec<String> = common::corpus_images(&corpus, "dirtylog.vhdx");
    assert_eq!(dirty.len(), 2, "corpus lists {dirty:?}");
    for name in dirty {
        let (ro_dir, rw_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ro_path = common::decompress_corpus_image(&corpus, &name, ro_dir.path());
        let rw_path = common::decompress_corpus_image(&corpus, &name, rw_dir.path());
        let expected = common::expected_sha256(&corpus, &format!("{name}.raw"));
        let stale = common::expected_sha256(&corpus, &format!("{name}.log-not-replayed.raw"));
        assert_ne!(expected, stale);
        let file_before = common::sha256_file(&ro_path);

        let replayed_in_memory = open_vhdx(&ro_path, true);
        assert!(replayed_in_memory.info().log_was_dirty, "{name}");
        assert!(!replayed_in_memory.info().log_guid.is_nil(), "{name}");
        let digest = common::sha256_disk(&replayed_in_memory);
        assert_ne!(digest, stale, "{name}: log ignored");
        assert_eq!(digest, expected, "{name} read-only");
        assert_eq!(
            common::sha256_file(&ro_path),
            file_before,
            "{name} modified"
        );

        let disk = open_vhdx(&rw_path, false);
        assert!(disk.info().log_was_dirty);
        assert!(
            disk.info().log_guid.is_nil(),
            "{name}: log not emptied after replay"
        );
        assert_same_view(&disk, &replayed_in_memory, &format!("{name} read-write"));
        disk.close().unwrap();
        drop(disk);
        assert_ne!(
            common::sha256_file(&rw_path),
            file_before,
            "{name} not replayed on disk"
        );

        let disk = open_vhdx(&rw_path, true);
        let info = disk.info();
        assert!(
            !info.log_was_dirty && info.log_guid.is_nil(),
            "{name}: {info:?}"
        );
        assert_same_view(&disk, &replayed_in_memory, &format!("{name} after replay"));
        drop(disk);
        common::qemu_check_clean("vhdx", &rw_path);
    }
}

/// Images written by Hyper-V, Windows and Disk2vhd (equal-sequence headers) stay valid for
/// qemu after writes, allocations and discards through this library.
#[test]
fn writes_to_images_from_other_tools_stay_valid_for_qemu() {
    use std::os::unix::fs::FileExt;
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "qemu-iotests__iotest-dynamic-1G__hyperv-win6.2.vhdx",
        "qemu-iotests__test-disk2vhd__disk2vhd.vhdx",
        "discutils__swap__win10-14393.vhdx",
    ] {
        let path = common::decompress_corpus_image(&corpus, name, dir.path());
        let raw_path = dir.path().join("expected.raw");
        common::qemu_convert_to_raw("vhdx", &path, &raw_path);
        let raw = std::fs::OpenOptions::new()
            .write(true)
            .open(&raw_path)
            .unwrap();

        let disk = open_vhdx(&path, false);
        let before = disk.info();
        let (size, block) = (disk.size(), u64::from(before.block_size));
        let writes = [
            (7, 5000),
            (block - 100, 300),
            (size / 2 + 3, 70_000),
            (size - 512, 512),
        ];
        for (i, (offset, len)) in writes.into_iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8 | 1).collect();
            disk.write_at(&data, offset).unwrap();
            raw.write_all_at(&data, offset).unwrap();
        }
        disk.discard(2 * block, block).unwrap();
        raw.write_all_at(&vec![0u8; block as usize], 2 * block)
            .unwrap();
        let after = disk.info();
        assert_ne!(after.data_write_guid, before.data_write_guid, "{name}");
        assert!(after.header_sequence_number > before.header_sequence_number);
        disk.close().unwrap();
        drop(disk);

        common::qemu_check_clean("vhdx", &path);
        common::qemu_img(&[
            "compare",
            "-f",
            "vhdx",
            "-F",
            "raw",
            path.to_str().unwrap(),
            raw_path.to_str().unwrap(),
        ]);
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&raw_path).unwrap();
    }
}

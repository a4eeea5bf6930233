//! Every VHDX of the sample-image corpus reads to the contents two independent readers
//! agree on, including images whose log must be replayed first.
mod common;

use std::path::Path;
use vdisk_mount::storage::FileStorage;
use vdisk_mount::vhdx::VhdxDisk;
use vdisk_mount::{OpenOptions, VirtualDisk};

fn open_vhdx(path: &Path, read_only: bool) -> VhdxDisk {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .unwrap();
    let options = OpenOptions {
        read_only,
        ..Default::default()
    };
    VhdxDisk::open(Box::new(FileStorage::new(file)), &options)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

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

#[test]
fn dirty_logs_are_replayed_in_memory_read_only_and_on_disk_read_write() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dirty: Vec<String> = common::corpus_images(&corpus, "dirtylog.vhdx");
    assert_eq!(dirty.len(), 2, "corpus lists {dirty:?}");
    for name in dirty {
        let path = common::decompress_corpus_image(&corpus, &name, dir.path());
        let expected = common::expected_sha256(&corpus, &format!("{name}.raw"));
        let stale = common::expected_sha256(&corpus, &format!("{name}.log-not-replayed.raw"));
        assert_ne!(expected, stale);
        let file_before = common::sha256_file(&path);

        let disk = open_vhdx(&path, true);
        assert!(disk.info().log_was_dirty, "{name}");
        assert!(!disk.info().log_guid.is_nil(), "{name}");
        assert_eq!(common::sha256_disk(&disk), expected, "{name} read-only");
        drop(disk);
        assert_eq!(common::sha256_file(&path), file_before, "{name} modified");

        let disk = open_vhdx(&path, false);
        assert!(disk.info().log_was_dirty);
        assert!(
            disk.info().log_guid.is_nil(),
            "{name}: log not emptied after replay"
        );
        assert_eq!(common::sha256_disk(&disk), expected, "{name} read-write");
        disk.close().unwrap();
        drop(disk);
        assert_ne!(
            common::sha256_file(&path),
            file_before,
            "{name} not replayed on disk"
        );

        let disk = open_vhdx(&path, true);
        let info = disk.info();
        assert!(
            !info.log_was_dirty && info.log_guid.is_nil(),
            "{name}: {info:?}"
        );
        assert_eq!(common::sha256_disk(&disk), expected, "{name} after replay");
        drop(disk);
        common::qemu_check_clean("vhdx", &path);
        std::fs::remove_file(&path).unwrap();
    }
}

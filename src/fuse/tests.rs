//! [`DiskFs`] answering requests without a mount, over in-memory raw disks.

use super::*;
use crate::disk::{Format, OpenOptions, VirtualDisk};
use crate::storage::{MemStorage, Storage};
use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, UNIX_EPOCH};

/// `storage` as a raw disk, through the same probing open a mount uses, told the format.
fn raw_disk(storage: impl Storage + 'static, read_only: bool) -> Box<dyn VirtualDisk> {
    let options = OpenOptions {
        read_only,
        format: Some(Format::Raw),
        ..Default::default()
    };
    crate::open_storage(Box::new(storage), &options).unwrap()
}

pub(super) fn fs_over(bytes: Vec<u8>, read_only: bool) -> DiskFs {
    let disk = raw_disk(MemStorage::from_vec(bytes), read_only);
    DiskFs::new(
        disk.into(),
        View::owned_by(1234, 5678),
        UNIX_EPOCH + Duration::from_secs(1_000_000),
    )
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn root_holds_exactly_one_file_owned_by_the_mounting_user() {
    let fs = fs_over(vec![0; 8192], false);
    let file = fs.lookup(ROOT_INO, OsStr::new(DISK_FILE_NAME)).unwrap();
    assert_eq!(file.ino, DISK_INO);
    assert_eq!(file.kind, NodeKind::File);
    assert_eq!(file.size, 8192);
    assert_eq!(file.perm, 0o644);
    assert_eq!((file.uid, file.gid), (1234, 5678));
    assert_eq!(
        fs.lookup(ROOT_INO, OsStr::new("other")).unwrap_err(),
        libc::ENOENT
    );
    assert_eq!(
        fs.lookup(DISK_INO, OsStr::new("x")).unwrap_err(),
        libc::ENOTDIR
    );
    assert_eq!(fs.getattr(99).unwrap_err(), libc::ENOENT);
    let root = fs.getattr(ROOT_INO).unwrap();
    assert_eq!(
        (root.kind, root.perm, root.nlink),
        (NodeKind::Directory, 0o755, 2)
    );

    let names: Vec<_> = fs
        .readdir(ROOT_INO, 0)
        .unwrap()
        .iter()
        .map(|e| e.name.clone())
        .collect();
    assert_eq!(names, [".", "..", DISK_FILE_NAME]);
    // A listing resumed after the second entry continues with the third.
    let rest = fs.readdir(ROOT_INO, 2).unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].ino, DISK_INO);
    assert!(fs.readdir(ROOT_INO, 3).unwrap().is_empty());
    assert!(fs.readdir(ROOT_INO, u64::MAX).unwrap().is_empty());
    assert_eq!(fs.readdir(DISK_INO, 0).unwrap_err(), libc::ENOTDIR);
}

#[test]
fn reads_are_clamped_at_the_end_like_a_file() {
    let data = pattern(4096);
    let fs = fs_over(data.clone(), false);
    assert_eq!(fs.read(DISK_INO, 100, 50).unwrap(), data[100..150]);
    assert_eq!(fs.read(DISK_INO, 4000, 4096).unwrap(), data[4000..]);
    assert!(fs.read(DISK_INO, 4096, 10).unwrap().is_empty());
    assert!(fs.read(DISK_INO, u64::MAX, 10).unwrap().is_empty());
    assert_eq!(fs.read(DISK_INO, 0, MAX_IO + 1).unwrap_err(), libc::EINVAL);
    assert_eq!(fs.read(ROOT_INO, 0, 10).unwrap_err(), libc::EISDIR);
}

#[test]
fn writes_stop_at_the_end_like_a_block_device() {
    let fs = fs_over(vec![0; 4096], false);
    let before = fs.getattr(DISK_INO).unwrap().mtime;
    assert_eq!(fs.write(DISK_INO, 1, b"abc").unwrap(), 3);
    assert!(fs.getattr(DISK_INO).unwrap().mtime > before);
    // Straddling the end: the part that fits is written and reported.
    assert_eq!(fs.write(DISK_INO, 4094, b"wxyz").unwrap(), 2);
    assert_eq!(fs.write(DISK_INO, 4096, b"z").unwrap_err(), libc::ENOSPC);
    assert_eq!(
        fs.write(DISK_INO, u64::MAX, b"z").unwrap_err(),
        libc::ENOSPC
    );
    assert_eq!(fs.write(DISK_INO, 4096, b"").unwrap(), 0);
    assert_eq!(fs.read(DISK_INO, 0, 4).unwrap(), b"\0abc");
    assert_eq!(fs.read(DISK_INO, 4092, 8).unwrap(), b"\0\0wx");
    assert_eq!(fs.getattr(DISK_INO).unwrap().size, 4096);
    fs.flush(DISK_INO).unwrap();
}

#[test]
fn size_is_fixed_and_nothing_else_can_be_created() {
    let fs = fs_over(vec![0; 4096], false);
    assert_eq!(fs.setattr(DISK_INO, Some(4096), false).unwrap().size, 4096);
    assert_eq!(
        fs.setattr(DISK_INO, Some(0), false).unwrap_err(),
        libc::EPERM
    );
    assert_eq!(
        fs.setattr(DISK_INO, Some(8192), false).unwrap_err(),
        libc::EPERM
    );
    assert_eq!(fs.setattr(DISK_INO, None, true).unwrap_err(), libc::EPERM);
    assert!(fs.setattr(DISK_INO, None, false).is_ok());
    assert_eq!(fs.refuse_namespace_change(), libc::EPERM);
    assert_eq!(fs.open(ROOT_INO, true).unwrap_err(), libc::EISDIR);
    fs.open(DISK_INO, true).unwrap();
}

#[test]
fn read_only_refuses_every_change_with_erofs() {
    let fs = fs_over(pattern(4096), true);
    assert_eq!(fs.getattr(DISK_INO).unwrap().perm, 0o444);
    assert_eq!(fs.getattr(ROOT_INO).unwrap().perm, 0o555);
    assert_eq!(fs.open(DISK_INO, true).unwrap_err(), libc::EROFS);
    fs.open(DISK_INO, false).unwrap();
    assert_eq!(fs.write(DISK_INO, 0, b"x").unwrap_err(), libc::EROFS);
    assert_eq!(
        fs.setattr(DISK_INO, Some(4096), false).unwrap_err(),
        libc::EROFS
    );
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(
        fs.fallocate(DISK_INO, 0, 512, punch).unwrap_err(),
        libc::EROFS
    );
    assert_eq!(fs.refuse_namespace_change(), libc::EROFS);
    fs.flush(DISK_INO).unwrap();
    assert_eq!(fs.read(DISK_INO, 0, 4096).unwrap(), pattern(4096));
}

#[test]
fn punching_a_hole_zeroes_the_range_inside_the_disk() {
    let fs = fs_over(vec![0xaa; 4096], false);
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    fs.fallocate(DISK_INO, 10, 20, punch).unwrap();
    let data = fs.read(DISK_INO, 0, 4096).unwrap();
    assert!(data[..10].iter().all(|&b| b == 0xaa));
    assert!(data[10..30].iter().all(|&b| b == 0));
    assert!(data[30..].iter().all(|&b| b == 0xaa));
    // Past the end only the part inside the disk is zeroed.
    fs.fallocate(DISK_INO, 4000, 1 << 40, punch).unwrap();
    assert!(fs.read(DISK_INO, 4000, 96).unwrap().iter().all(|&b| b == 0));
    fs.fallocate(DISK_INO, u64::MAX - 1, 1, punch).unwrap();
    assert_eq!(
        fs.fallocate(DISK_INO, 1, u64::MAX, punch).unwrap_err(),
        libc::EFBIG
    );
    assert_eq!(
        fs.fallocate(DISK_INO, 4000, 200, libc::FALLOC_FL_ZERO_RANGE)
            .unwrap_err(),
        libc::ENOSPC
    );
    assert_eq!(
        fs.fallocate(DISK_INO, 0, 10, 0).unwrap_err(),
        libc::EOPNOTSUPP
    );
    assert_eq!(fs.getattr(DISK_INO).unwrap().size, 4096);
}

#[test]
fn seek_data_and_hole_follow_the_allocation_map() {
    // A raw disk is all data: the only hole is the end of the file.
    let fs = fs_over(vec![1; 4096], false);
    assert_eq!(fs.seek(DISK_INO, 100, libc::SEEK_DATA).unwrap(), 100);
    assert_eq!(fs.seek(DISK_INO, 100, libc::SEEK_HOLE).unwrap(), 4096);
    assert_eq!(
        fs.seek(DISK_INO, 4096, libc::SEEK_DATA).unwrap_err(),
        libc::ENXIO
    );
    assert_eq!(
        fs.seek(DISK_INO, -1, libc::SEEK_HOLE).unwrap_err(),
        libc::ENXIO
    );
    assert_eq!(
        fs.seek(DISK_INO, 0, libc::SEEK_END).unwrap_err(),
        libc::EINVAL
    );
}

#[test]
fn driver_errors_reach_the_caller_as_their_errno() {
    let storage = Arc::new(MemStorage::from_vec(vec![0; 4096]));
    let disk = raw_disk(storage.clone(), false);
    let fs = DiskFs::new(disk.into(), View::owned_by(0, 0), UNIX_EPOCH);
    // Closing after reads only costs no sync.
    fs.read(DISK_INO, 0, 10).unwrap();
    fs.flush(DISK_INO).unwrap();
    assert_eq!(storage.flush_count(), 0);

    storage.fail_writes_after(0, libc::ENOSPC);
    assert_eq!(fs.write(DISK_INO, 0, b"x").unwrap_err(), libc::ENOSPC);
    storage.fail_flushes(libc::EIO);
    assert_eq!(fs.flush(DISK_INO).unwrap_err(), libc::EIO);
    // A failed flush is retried by the next one.
    assert_eq!(fs.flush(DISK_INO).unwrap_err(), libc::EIO);
    storage.fail_reads(libc::EIO);
    assert_eq!(fs.read(DISK_INO, 0, 1).unwrap_err(), libc::EIO);
    storage.clear_faults();
    fs.flush(DISK_INO).unwrap();
    assert_eq!(storage.flush_count(), 1);
    fs.flush(DISK_INO).unwrap();
    assert_eq!(storage.flush_count(), 1);

    assert_eq!(fs.write(DISK_INO, 0, b"x").unwrap(), 1);
    fs.flush(DISK_INO).unwrap();
    assert_eq!(storage.flush_count(), 2);
    assert_eq!(storage.contents()[0], b'x');
}

/// A disk that runs `before_write` before each write and `before_flush` before each
/// flush reaches the disk beneath, so a test can put another request in between.
struct Hooked {
    inner: Box<dyn VirtualDisk>,
    before_write: Box<dyn Fn() + Send + Sync>,
    before_flush: Box<dyn Fn() + Send + Sync>,
}

impl VirtualDisk for Hooked {
    fn format(&self) -> crate::disk::Format {
        self.inner.format()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.inner.logical_sector_size()
    }
    fn physical_sector_size(&self) -> u32 {
        self.inner.physical_sector_size()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> crate::Result<()> {
        (self.before_write)();
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> crate::Result<()> {
        (self.before_flush)();
        self.inner.flush()
    }
    fn allocation(&self, offset: u64, len: u64) -> crate::Result<Vec<crate::Extent>> {
        self.inner.allocation(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> crate::Result<()> {
        self.inner.discard(offset, len)
    }
}

#[test]
fn a_flush_racing_a_write_in_flight_never_lets_a_later_fsync_skip_it() {
    let storage = Arc::new(MemStorage::from_vec(vec![0; 4096]));
    // Writes let a flush run while their data is still on its way to the file, as a
    // concurrent fsync can.
    let racing: Arc<std::sync::OnceLock<std::sync::Weak<DiskFs>>> = Arc::default();
    let flusher = racing.clone();
    let disk = Hooked {
        inner: raw_disk(storage.clone(), false),
        before_write: Box::new(move || {
            if let Some(fs) = flusher.get().and_then(std::sync::Weak::upgrade) {
                fs.flush(DISK_INO).unwrap();
            }
        }),
        before_flush: Box::new(|| {}),
    };
    let fs = Arc::new(DiskFs::new(
        Arc::new(disk),
        View::owned_by(0, 0),
        UNIX_EPOCH,
    ));
    fs.write(DISK_INO, 0, b"a").unwrap();
    racing.set(Arc::downgrade(&fs)).unwrap();
    // The racing flush syncs "a" but cannot cover "b", which reaches the file after it.
    fs.write(DISK_INO, 1, b"b").unwrap();
    assert_eq!(storage.flush_count(), 1);
    fs.flush(DISK_INO).unwrap();
    let durable = storage.power_loss_dropping_unflushed().contents();
    assert_eq!(&durable[..2], b"ab");
}

#[test]
fn an_fsync_during_another_returns_only_once_the_write_it_covers_is_durable() {
    let storage = Arc::new(MemStorage::from_vec(vec![0; 4096]));
    let (started, started_rx) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    // The first flush tells when it has started, then waits to be let go.
    let (held, go_rx) = (AtomicBool::new(false), parking_lot::Mutex::new(go_rx));
    let disk = Hooked {
        inner: raw_disk(storage.clone(), false),
        before_write: Box::new(|| {}),
        before_flush: Box::new(move || {
            if !held.swap(true, Ordering::SeqCst) {
                started.send(()).unwrap();
                go_rx.lock().recv().unwrap();
            }
        }),
    };
    let fs = Arc::new(DiskFs::new(
        Arc::new(disk),
        View::owned_by(0, 0),
        UNIX_EPOCH,
    ));
    fs.write(DISK_INO, 0, b"a").unwrap();
    let first = {
        let fs = fs.clone();
        std::thread::spawn(move || fs.flush(DISK_INO).unwrap())
    };
    started_rx.recv().unwrap();
    let events = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let second = {
        let (fs, events, storage) = (fs.clone(), events.clone(), storage.clone());
        std::thread::spawn(move || {
            fs.flush(DISK_INO).unwrap();
            // What this fsync promises: "a" survives a power loss now.
            let durable = storage.power_loss_dropping_unflushed().contents();
            events.lock().push(("second fsync returned", durable[0]));
        })
    };
    // Time for a second fsync that wrongly skips the flush to return; a right one waits
    // however long this takes.
    std::thread::sleep(Duration::from_millis(100));
    events.lock().push(("first flush let go", 0));
    go.send(()).unwrap();
    first.join().unwrap();
    second.join().unwrap();
    assert_eq!(
        *events.lock(),
        [("first flush let go", 0), ("second fsync returned", b'a')]
    );
}

#[test]
fn the_view_sets_owner_modes_and_name() {
    let disk = raw_disk(MemStorage::from_vec(vec![0; 4096]), false);
    let view = View {
        uid: 7,
        gid: 8,
        file_mode: 0o660,
        dir_mode: 0o750,
        file_name: "sda.raw".to_string(),
        partitions: PartitionFiles::Auto,
    };
    let fs = DiskFs::new(disk.into(), view, UNIX_EPOCH);
    let file = fs.lookup(ROOT_INO, OsStr::new("sda.raw")).unwrap();
    assert_eq!(
        (file.ino, file.perm, file.uid, file.gid),
        (DISK_INO, 0o660, 7, 8)
    );
    assert_eq!(fs.getattr(ROOT_INO).unwrap().perm, 0o750);
    assert_eq!(
        fs.lookup(ROOT_INO, OsStr::new(DISK_FILE_NAME)).unwrap_err(),
        libc::ENOENT
    );
    let names: Vec<_> = fs
        .readdir(ROOT_INO, 0)
        .unwrap()
        .iter()
        .map(|e| e.name.to_string())
        .collect();
    assert_eq!(names, [".", "..", "sda.raw"]);
}

#[test]
fn a_lost_image_fails_requests_with_eio_and_no_flush_succeeds() {
    let missing = Arc::new(AtomicBool::new(false));
    let mut fs = fs_over(vec![0; 4096], false);
    let flag = missing.clone();
    fs.set_image_check(Box::new(move || {
        if flag.load(Ordering::SeqCst) {
            Err("image.vhd: removed".to_string())
        } else {
            Ok(())
        }
    }));
    assert_eq!(fs.write(DISK_INO, 0, b"x").unwrap(), 1);
    fs.flush(DISK_INO).unwrap();
    assert_eq!(fs.write(DISK_INO, 0, b"y").unwrap(), 1);
    missing.store(true, Ordering::SeqCst);
    assert_eq!(fs.flush(DISK_INO).unwrap_err(), libc::EIO);
    assert!(fs.gate().is_image_lost());
    assert_eq!(fs.read(DISK_INO, 0, 1).unwrap_err(), libc::EIO);
    assert_eq!(fs.write(DISK_INO, 0, b"z").unwrap_err(), libc::EIO);
    assert_eq!(fs.flush(DISK_INO).unwrap_err(), libc::EIO);
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(fs.fallocate(DISK_INO, 0, 1, punch).unwrap_err(), libc::EIO);
    assert_eq!(
        fs.seek(DISK_INO, 0, libc::SEEK_DATA).unwrap_err(),
        libc::EIO
    );
}

#[test]
fn statfs_reports_the_disk_as_a_full_filesystem() {
    let fs = fs_over(vec![0; 10_000], false);
    assert_eq!(
        fs.statfs(),
        FsStats {
            blocks: 3,
            block_size: 4096
        }
    );
}

/// A 1 MiB disk whose MBR holds partition 1 at sectors 64..128 and partition 3 at
/// 256..512 (slot 2 empty), the rest filled with a pattern.
fn partitioned_disk() -> Vec<u8> {
    let mut bytes = pattern(1 << 20);
    write_mbr(&mut bytes, &[(0, 64, 64), (2, 256, 256)]);
    bytes
}

/// An MBR of Linux partitions in the given slots: (slot, first sector, sectors).
fn write_mbr(disk: &mut [u8], entries: &[(usize, u32, u32)]) {
    disk[446..512].fill(0);
    for &(slot, start, sectors) in entries {
        let entry = &mut disk[446 + 16 * slot..462 + 16 * slot];
        entry[4] = 0x83;
        entry[8..12].copy_from_slice(&start.to_le_bytes());
        entry[12..16].copy_from_slice(&sectors.to_le_bytes());
    }
    disk[510..512].copy_from_slice(&[0x55, 0xaa]);
}

fn fs_with(
    bytes: Vec<u8>,
    partitions: PartitionFiles,
) -> (DiskFs, Arc<parking_lot::Mutex<Vec<Invalidation>>>) {
    let disk = raw_disk(MemStorage::from_vec(bytes), false);
    let view = View {
        partitions,
        ..View::owned_by(1, 1)
    };
    let mut fs = DiskFs::new(disk.into(), view, UNIX_EPOCH);
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let record = seen.clone();
    fs.set_invalidator(Box::new(move |what| record.lock().push(what)));
    (fs, seen)
}

fn listing(fs: &DiskFs) -> Vec<(String, u64)> {
    fs.readdir(ROOT_INO, 2)
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.ino))
        .collect()
}

const PART1_INO: u64 = FIRST_PARTITION_INO;
const PART3_INO: u64 = FIRST_PARTITION_INO + 2;

#[test]
fn partition_files_show_their_range_of_the_disk_numbered_by_slot() {
    let disk = partitioned_disk();
    let (fs, _) = fs_with(disk.clone(), PartitionFiles::Auto);
    assert_eq!(
        listing(&fs),
        [
            ("disk.img".to_string(), DISK_INO),
            ("part1.img".to_string(), PART1_INO),
            ("part3.img".to_string(), PART3_INO)
        ]
    );
    let part3 = fs.lookup(ROOT_INO, OsStr::new("part3.img")).unwrap();
    assert_eq!(
        (part3.ino, part3.size, part3.kind),
        (PART3_INO, 256 * 512, NodeKind::File)
    );
    assert_eq!(
        fs.lookup(ROOT_INO, OsStr::new("part2.img")).unwrap_err(),
        libc::ENOENT
    );
    assert_eq!(
        fs.read(PART1_INO, 0, 4096).unwrap(),
        disk[64 * 512..64 * 512 + 4096]
    );
    // Reads stop at the partition's end, not the disk's.
    assert_eq!(
        fs.read(PART1_INO, 64 * 512 - 10, 100).unwrap(),
        disk[128 * 512 - 10..128 * 512]
    );
    assert!(fs.read(PART1_INO, 64 * 512, 100).unwrap().is_empty());
    assert_eq!(
        fs.read(PART3_INO, 0, 512).unwrap(),
        disk[256 * 512..257 * 512]
    );
    assert_eq!(fs.seek(PART3_INO, 100, libc::SEEK_HOLE).unwrap(), 256 * 512);
    assert_eq!(fs.seek(PART3_INO, 100, libc::SEEK_DATA).unwrap(), 100);
    assert_eq!(
        fs.setattr(PART3_INO, Some(256 * 512), false).unwrap().size,
        256 * 512
    );
    assert_eq!(
        fs.setattr(PART3_INO, Some(4096), false).unwrap_err(),
        libc::EPERM
    );
}

#[test]
fn writes_through_a_partition_file_land_inside_it_and_stop_at_its_end() {
    let (fs, _) = fs_with(partitioned_disk(), PartitionFiles::Auto);
    let end = 64 * 512;
    assert_eq!(fs.write(PART1_INO, end - 3, b"abcdef").unwrap(), 3);
    assert_eq!(fs.write(PART1_INO, end, b"x").unwrap_err(), libc::ENOSPC);
    assert_eq!(fs.read(DISK_INO, 128 * 512 - 3, 6).unwrap()[..3], *b"abc");
    assert_ne!(fs.read(DISK_INO, 128 * 512, 3).unwrap(), b"def");
    fs.fallocate(
        PART3_INO,
        512,
        1 << 30,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    )
    .unwrap();
    assert_eq!(
        fs.read(DISK_INO, 257 * 512, 255 * 512).unwrap(),
        vec![0; 255 * 512]
    );
    assert_ne!(fs.read(DISK_INO, 256 * 512, 512).unwrap(), vec![0; 512]);
    assert_ne!(fs.read(DISK_INO, 512 * 512, 512).unwrap(), vec![0; 512]);
    fs.flush(PART3_INO).unwrap();
}

#[test]
fn partitions_off_and_only_choose_the_files() {
    let (fs, _) = fs_with(partitioned_disk(), PartitionFiles::Off);
    assert_eq!(listing(&fs), [("disk.img".to_string(), DISK_INO)]);
    assert_eq!(fs.getattr(PART1_INO).unwrap_err(), libc::ENOENT);
    let (fs, _) = fs_with(partitioned_disk(), PartitionFiles::Only);
    let names: Vec<_> = listing(&fs).into_iter().map(|(name, _)| name).collect();
    assert_eq!(names, ["part1.img", "part3.img"]);
    assert_eq!(
        fs.lookup(ROOT_INO, OsStr::new("disk.img")).unwrap_err(),
        libc::ENOENT
    );
    assert_eq!(fs.read(DISK_INO, 0, 10).unwrap_err(), libc::ENOENT);
    // A disk without a table shows only the disk file.
    let (fs, _) = fs_with(vec![0; 1 << 20], PartitionFiles::Auto);
    assert_eq!(listing(&fs), [("disk.img".to_string(), DISK_INO)]);
}

#[test]
fn a_write_to_the_table_makes_the_files_follow_it() {
    let (fs, seen) = fs_with(partitioned_disk(), PartitionFiles::Auto);
    let mut sector0 = fs.read(DISK_INO, 0, 512).unwrap();
    // Partition 1 grows, partition 3 goes, partition 2 comes.
    write_mbr(&mut sector0, &[(0, 64, 128), (1, 512, 64)]);
    fs.write(DISK_INO, 0, &sector0).unwrap();
    let names: Vec<_> = listing(&fs).into_iter().map(|(name, _)| name).collect();
    assert_eq!(names, ["disk.img", "part1.img", "part2.img"]);
    assert_eq!(fs.getattr(PART1_INO).unwrap().size, 128 * 512);
    assert_eq!(fs.getattr(PART3_INO).unwrap_err(), libc::ENOENT);
    let seen = seen.lock();
    for name in ["part1.img", "part2.img", "part3.img"] {
        assert!(
            seen.contains(&Invalidation::Entry {
                name: name.to_string()
            }),
            "{seen:?}"
        );
    }
    for ino in [PART1_INO, PART1_INO + 1, PART3_INO] {
        assert!(
            seen.contains(&Invalidation::Pages {
                ino,
                offset: 0,
                len: 0
            }),
            "{seen:?}"
        );
    }
    drop(seen);
    // A write elsewhere leaves the table alone.
    fs.write(DISK_INO, 1000 * 512, b"x").unwrap();
    assert_eq!(fs.getattr(PART1_INO).unwrap().size, 128 * 512);
}

#[test]
fn a_change_through_one_file_invalidates_what_the_open_others_cached() {
    let (fs, seen) = fs_with(partitioned_disk(), PartitionFiles::Auto);
    // Nothing open: nothing cached to invalidate.
    fs.write(DISK_INO, 300 * 512, b"abc").unwrap();
    assert!(seen.lock().is_empty());
    fs.open(PART3_INO, false).unwrap();
    fs.open(PART1_INO, false).unwrap();
    fs.open(DISK_INO, true).unwrap();
    fs.write(DISK_INO, 300 * 512, b"abc").unwrap();
    assert_eq!(
        *seen.lock(),
        [Invalidation::Pages {
            ino: PART3_INO,
            offset: 44 * 512,
            len: 3
        }]
    );
    seen.lock().clear();
    fs.fallocate(
        PART1_INO,
        0,
        512,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    )
    .unwrap();
    assert_eq!(
        *seen.lock(),
        [Invalidation::Pages {
            ino: DISK_INO,
            offset: 64 * 512,
            len: 512
        }]
    );
    seen.lock().clear();
    fs.release(DISK_INO);
    fs.write(PART1_INO, 0, b"x").unwrap();
    assert!(seen.lock().is_empty());
}

//! Driver tests on in-memory images: reads and writes against a model, crash consistency
//! at every write of an allocating workload, concurrency, damaged structures.

use super::*;
use crate::disk::{Allocation, DiscardMode};
use crate::layer::{ParentImage, StoredParentPaths};
use crate::storage::{MemStorage, PendingOp, Survives};
use metadata::tests::region_with;
use region_table::RegionEntry;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

const LOG_AT: u64 = MIB;
const BAT_AT: u64 = 2 * MIB;
const META_AT: u64 = 3 * MIB;
const PAYLOAD_AT: u64 = 4 * MIB;

/// A fresh image laid out as qemu-img lays them out: log at 1 MiB, BAT at 2 MiB, metadata
/// at 3 MiB, blocks from 4 MiB (all allocated when `fixed`).
fn build_image(virtual_size: u64, block_size: u32, fixed: bool) -> Vec<u8> {
    let params = DiskParameters {
        block_size,
        leave_blocks_allocated: fixed,
        has_parent: false,
        virtual_size,
        disk_id: Uuid::from_u128(0xd15c),
        logical_sector_size: 512,
        physical_sector_size: 4096,
    };
    let layout = BatLayout::new(virtual_size, block_size, 512, false);
    assert!(
        layout.total_entries * 8 <= MIB,
        "test images keep the BAT in 1 MiB"
    );
    let blocks_len = if fixed {
        layout.payload_blocks * u64::from(block_size)
    } else {
        0
    };
    let mut image = vec![0u8; (PAYLOAD_AT + blocks_len) as usize];
    let ident = FileIdentifier {
        creator: "vdisk-mount tests".into(),
    };
    image[..FILE_IDENTIFIER_LEN].copy_from_slice(&ident.to_bytes());
    for (i, offset) in HEADER_OFFSETS.iter().enumerate() {
        let header = Header {
            sequence_number: 1 + i as u64,
            file_write_guid: Uuid::from_u128(0xf11e),
            data_write_guid: Uuid::from_u128(0xda7a),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: LOG_AT,
        };
        put(&mut image, *offset, &header.to_bytes());
    }
    let regions = RegionTable {
        entries: vec![
            RegionEntry {
                guid: BAT_REGION,
                file_offset: BAT_AT,
                length: MIB as u32,
                required: true,
            },
            RegionEntry {
                guid: METADATA_REGION,
                file_offset: META_AT,
                length: MIB as u32,
                required: true,
            },
        ],
    };
    for offset in REGION_TABLE_OFFSETS {
        put(&mut image, offset, &regions.to_bytes());
    }
    put(&mut image, META_AT, &region_with(&params, MIB as usize));
    if fixed {
        for block in 0..layout.payload_blocks {
            let entry = BatEntry::new(
                PayloadState::FullyPresent,
                PAYLOAD_AT + block * u64::from(block_size),
            );
            let at = BAT_AT + layout.payload_index(block) * 8;
            put(&mut image, at, &entry.0.to_le_bytes());
        }
    }
    image
}

fn put(image: &mut [u8], offset: u64, bytes: &[u8]) {
    image[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
}

fn open_mem(image: Vec<u8>, read_only: bool) -> Result<VhdxDisk> {
    open_storage(Arc::new(MemStorage::from_vec(image)), read_only)
}

/// The storage handed to the driver: shares a `MemStorage` with the test, and can make
/// every mutating request (write, flush, set_len) fail after a given number of them, which
/// stops the driver at any instant, including between a write and its flush.
struct Shared {
    mem: Arc<MemStorage>,
    ops_left: Arc<AtomicU64>,
}

impl Shared {
    fn mutate(&self) -> std::io::Result<()> {
        let left = self.ops_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        if left != u64::MAX {
            self.ops_left.store(left - 1, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl Storage for Shared {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.mutate()?;
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.mutate()?;
        self.mem.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.mutate()?;
        self.mem.set_len(len)
    }
}

fn open_storage(storage: Arc<MemStorage>, read_only: bool) -> Result<VhdxDisk> {
    open_counting(storage, read_only, Arc::new(AtomicU64::new(u64::MAX)))
}

/// Opens with mutating requests failing once `ops_left` reaches zero; each one that
/// succeeds counts it down.
fn open_counting(
    storage: Arc<MemStorage>,
    read_only: bool,
    ops_left: Arc<AtomicU64>,
) -> Result<VhdxDisk> {
    let options = OpenOptions {
        read_only,
        ..Default::default()
    };
    let shared = Shared {
        mem: storage,
        ops_left,
    };
    VhdxDisk::open(Box::new(shared), &options)
}

fn read_all(disk: &VhdxDisk) -> Vec<u8> {
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

/// Deterministic pseudo-random numbers (xorshift64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn fresh_dynamic_image_reads_zeros_and_keeps_writes_across_reopen() {
    let storage = Arc::new(MemStorage::from_vec(build_image(
        10 * MIB + 512,
        MIB as u32,
        false,
    )));
    let disk = open_storage(storage.clone(), false).unwrap();
    assert_eq!(disk.size(), 10 * MIB + 512);
    assert!(read_all(&disk).iter().all(|&b| b == 0));
    let before = storage.contents();
    let first = disk.info();

    disk.write_at(b"hello", MIB - 2).unwrap();
    disk.write_at(b"end", 10 * MIB + 509).unwrap();
    let info = disk.info();
    assert_ne!(info.file_write_guid, first.file_write_guid);
    assert_ne!(info.data_write_guid, first.data_write_guid);
    assert!(info.header_sequence_number > first.header_sequence_number);
    assert_eq!(info.allocated_blocks, 3);
    disk.close().unwrap();
    assert!(disk.info().log_guid.is_nil());
    assert_eq!(
        storage.len().unwrap() % MIB,
        0,
        "file size stays 1 MiB aligned"
    );
    assert_ne!(storage.contents(), before);

    let disk = open_storage(storage.clone(), true).unwrap();
    let mut buf = [0u8; 7];
    disk.read_at(&mut buf, MIB - 3).unwrap();
    assert_eq!(&buf, b"\0hello\0");
    disk.read_at(&mut buf[..3], 10 * MIB + 509).unwrap();
    assert_eq!(&buf[..3], b"end");
    assert!(disk.write_at(b"x", 0).is_err());
    assert_eq!(
        disk.allocation(0, 3 * MIB).unwrap(),
        vec![
            Extent {
                offset: 0,
                len: 2 * MIB,
                state: Allocation::Data
            },
            Extent {
                offset: 2 * MIB,
                len: MIB,
                state: Allocation::Zero
            }
        ]
    );
}

#[test]
fn random_writes_and_discards_match_a_model() {
    for fixed in [false, true] {
        let size = 9 * MIB + 4096;
        let storage = Arc::new(MemStorage::from_vec(build_image(size, MIB as u32, fixed)));
        let disk = open_storage(storage.clone(), false).unwrap();
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(0x5eed + u64::from(fixed));
        for step in 0..300 {
            let offset = rng.below(size);
            let len = (rng.below(3 * MIB / 2) + 1).min(size - offset) as usize;
            if step % 7 == 6 {
                disk.discard(offset, len as u64).unwrap();
                model[offset as usize..offset as usize + len].fill(0);
            } else {
                let data = rng.bytes(len);
                disk.write_at(&data, offset).unwrap();
                model[offset as usize..offset as usize + len].copy_from_slice(&data);
            }
            if step % 50 == 0 {
                assert!(read_all(&disk) == model, "step {step}");
            }
        }
        disk.discard(MIB, 2 * MIB).unwrap();
        model[MIB as usize..3 * MIB as usize].fill(0);
        let zero_extent = disk.allocation(MIB, 2 * MIB).unwrap();
        let expected_state = if fixed {
            Allocation::Data
        } else {
            Allocation::Zero
        };
        assert_eq!(zero_extent[0].state, expected_state, "fixed={fixed}");
        disk.close().unwrap();
        drop(disk);
        let disk = open_storage(storage, true).unwrap();
        assert!(read_all(&disk) == model, "fixed={fixed} after reopen");
        assert_eq!(disk.info().fixed, fixed);
    }
}

#[test]
fn released_blocks_are_reused_and_the_file_stops_growing() {
    let size = 32 * MIB;
    let storage = Arc::new(MemStorage::from_vec(build_image(size, MIB as u32, false)));
    let disk = open_storage(storage.clone(), false).unwrap();
    let lengths =
        crate::free_space::workloads::write_and_trim_rounds(&disk, 8, || storage.len().unwrap());
    assert!(lengths.iter().all(|&l| l == lengths[0]), "{lengths:?}");
    disk.write_at(&[5; 4096], 3 * MIB).unwrap();
    disk.close().unwrap();
    drop(disk);
    let disk = open_storage(storage.clone(), false).unwrap();
    let mut expected = vec![0u8; size as usize];
    expected[3 * MIB as usize..3 * MIB as usize + 4096].fill(5);
    assert!(read_all(&disk) == expected);
    // Space found free at open is used before the file grows.
    disk.write_at(&[6; 4096], 20 * MIB).unwrap();
    assert_eq!(storage.len().unwrap(), lengths[0]);
}

#[test]
fn a_read_in_flight_keeps_its_block_from_reuse() {
    crate::free_space::workloads::a_stalled_read_keeps_its_block_from_reuse(
        build_image(8 * MIB, MIB as u32, false),
        MIB,
        |storage| Box::new(VhdxDisk::open(storage, &OpenOptions::default()).unwrap()),
    );
}

#[test]
fn concurrent_writes_and_discards_never_reach_a_reused_block() {
    let storage = Arc::new(MemStorage::from_vec(build_image(
        12 * MIB,
        MIB as u32,
        false,
    )));
    let disk = open_storage(storage, false).unwrap();
    crate::free_space::workloads::disjoint_writers_and_discarders(&disk, 4, 40);
}

#[test]
fn concurrent_writers_into_one_unallocated_block_allocate_it_once() {
    let storage = Arc::new(MemStorage::from_vec(build_image(
        8 * MIB,
        2 * MIB as u32,
        false,
    )));
    let disk = open_storage(storage, false).unwrap();
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let disk = &disk;
            s.spawn(move || {
                let chunk = vec![t + 1; 64 * 1024];
                disk.write_at(&chunk, 2 * MIB + u64::from(t) * 64 * 1024)
                    .unwrap();
            });
        }
    });
    assert_eq!(disk.info().allocated_blocks, 1);
    let all = read_all(&disk);
    for t in 0..8usize {
        let start = 2 * MIB as usize + t * 64 * 1024;
        assert!(
            all[start..start + 64 * 1024]
                .iter()
                .all(|&b| b == t as u8 + 1)
        );
    }
}

/// An in-memory file that shows the test every write and flush, and whose flushes, once
/// held, wait until the test lets them go: a writer can be stopped in a flush while the
/// test watches what other writers do meanwhile.
struct Watched {
    mem: Arc<MemStorage>,
    seen: Mutex<Seen>,
    changed: parking_lot::Condvar,
}

#[derive(Default)]
struct Seen {
    /// Where each write went, and what it wrote.
    writes: Vec<(u64, Vec<u8>)>,
    holding: bool,
    /// Flushes waiting, by number (in the order they came).
    held: Vec<u64>,
    /// Flushes that came so far.
    came: u64,
    /// Flushes let go while the rest are held.
    let_go: Vec<u64>,
}

impl Watched {
    fn new(image: Vec<u8>) -> Arc<Self> {
        Arc::new(Watched {
            mem: Arc::new(MemStorage::from_vec(image)),
            seen: Mutex::new(Seen::default()),
            changed: parking_lot::Condvar::new(),
        })
    }

    fn hold(&self) {
        self.seen.lock().holding = true;
    }

    fn let_go(&self, flush: u64) {
        self.seen.lock().let_go.push(flush);
        self.changed.notify_all();
    }

    fn release(&self) {
        self.seen.lock().holding = false;
        self.changed.notify_all();
    }

    /// Waits until `ready` says so of what was seen. Nothing here measures time: a minute
    /// only turns a writer that never gets there into a failure instead of a hang.
    fn wait_until(&self, what: &str, ready: impl Fn(&Seen) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut seen = self.seen.lock();
        while !ready(&seen) {
            let waited = self.changed.wait_until(&mut seen, deadline);
            assert!(!waited.timed_out(), "never happened: {what}");
        }
    }

    /// Log entries written so far.
    fn log_entries(&self) -> usize {
        let log = LOG_AT..LOG_AT + MIB;
        let seen = self.seen.lock();
        let entries = seen.writes.iter();
        entries
            .filter(|(at, data)| log.contains(at) && data.starts_with(b"loge"))
            .count()
    }
}

impl Storage for Watched {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.mem.write_at(buf, offset)?;
        self.seen.lock().writes.push((offset, buf.to_vec()));
        self.changed.notify_all();
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        {
            let mut seen = self.seen.lock();
            let flush = seen.came;
            seen.came += 1;
            seen.held.push(flush);
            self.changed.notify_all();
            while seen.holding && !seen.let_go.contains(&flush) {
                self.changed.wait(&mut seen);
            }
            seen.held.retain(|&f| f != flush);
        }
        self.mem.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.mem.set_len(len)
    }
}

/// A dynamic image on a `Watched` file whose session has begun and whose log is in use,
/// so the next allocating write's first flush is the one that makes its data durable.
fn watched_disk(size: u64) -> (Arc<Watched>, VhdxDisk) {
    let watched = Watched::new(build_image(size, MIB as u32, false));
    let disk = VhdxDisk::open(Box::new(watched.clone()), &OpenOptions::default()).unwrap();
    disk.write_at(&[1; 4096], 0).unwrap();
    disk.flush().unwrap();
    (watched, disk)
}

fn holds(disk: &VhdxDisk, at: u64, len: usize, fill: u8) -> bool {
    let mut buf = vec![0u8; len];
    disk.read_at(&mut buf, at).unwrap();
    buf.iter().all(|&b| b == fill)
}

#[test]
fn a_writer_in_its_data_flush_stops_no_writer_but_those_of_its_own_block() {
    let (watched, disk) = watched_disk(8 * MIB);
    let file_len = watched.len().unwrap();
    let len = 64 * 1024;
    watched.hold();
    std::thread::scope(|s| {
        let disk = &disk;
        let a = s.spawn(move || disk.write_at(&vec![0xAA; len], MIB));
        watched.wait_until("writer A flushes its new block", |seen| {
            seen.held.len() == 1
        });
        let b = s.spawn(move || disk.write_at(&vec![0xBB; len], 2 * MIB));
        watched.wait_until("writer B writes its new block's data", |seen| {
            seen.writes
                .iter()
                .any(|(_, data)| data.len() == len && data.iter().all(|&b| b == 0xBB))
        });
        // A's block: waits for A's claim, then finds the block allocated.
        let c = s.spawn(move || disk.write_at(&vec![0xCC; len], MIB + len as u64));
        while disk.claims.waiting() == 0 {
            std::thread::yield_now();
        }
        watched.release();
        for writer in [a, b, c] {
            writer.join().unwrap().unwrap();
        }
    });
    assert!(holds(&disk, MIB, len, 0xAA));
    assert!(holds(&disk, MIB + len as u64, len, 0xCC));
    assert!(holds(&disk, 2 * MIB, len, 0xBB));
    assert_eq!(disk.info().allocated_blocks, 3);
    assert_eq!(watched.len().unwrap(), file_len + 2 * MIB, "one block each");
}

#[test]
fn allocating_writers_queued_behind_a_commit_share_one_log_entry() {
    let (watched, disk) = watched_disk(16 * MIB);
    let before = watched.log_entries();
    let queued = 7;
    watched.hold();
    std::thread::scope(|s| {
        let disk = &disk;
        let write = |block: u64| s.spawn(move || disk.write_at(&[block as u8; 4096], block * MIB));
        let mut writers = vec![write(1)];
        watched.wait_until("the first writer flushes its data", |seen| {
            seen.held.len() == 1
        });
        writers.extend((2..2 + queued).map(write));
        while disk.commits.queued() < queued as usize {
            std::thread::yield_now();
        }
        watched.release();
        for writer in writers {
            writer.join().unwrap().unwrap();
        }
    });
    for block in 1..2 + queued {
        assert!(
            holds(&disk, block * MIB, 4096, block as u8),
            "block {block}"
        );
    }
    assert_eq!(
        watched.log_entries() - before,
        2,
        "the first writer's entry, then one for the {queued} queued behind it"
    );
}

#[test]
fn an_fsync_waits_for_no_writer_s_commit_only_for_its_own_flush() {
    let (watched, disk) = watched_disk(8 * MIB);
    // In place, into the block allocated already: durable once a flush after it ends.
    disk.write_at(&[2; 4096], 4096).unwrap();
    watched.hold();
    std::thread::scope(|s| {
        let disk = &disk;
        let writer = s.spawn(move || disk.write_at(&[3; 4096], MIB));
        watched.wait_until("the writer flushes its data", |seen| seen.held.len() == 1);
        let fsync = s.spawn(move || disk.flush());
        watched.wait_until("the fsync flushes", |seen| seen.held.len() == 2);
        let fsync_flush = watched.seen.lock().held[1];
        watched.let_go(fsync_flush);
        fsync.join().unwrap().unwrap();
        assert!(
            !writer.is_finished(),
            "the writer's data flush is still held"
        );
        let durable = open_mem(watched.mem.power_loss_dropping_unflushed().contents(), true);
        assert!(
            holds(&durable.unwrap(), 4096, 4096, 2),
            "fsync returned early"
        );
        watched.release();
        writer.join().unwrap().unwrap();
    });
    assert!(holds(&disk, MIB, 4096, 3));
}

#[test]
fn a_write_failing_before_its_commit_leaves_no_block_and_its_space_is_reused() {
    let storage = Arc::new(MemStorage::from_vec(build_image(
        8 * MIB,
        MIB as u32,
        false,
    )));
    let disk = open_storage(storage.clone(), false).unwrap();
    disk.write_at(&[1; 4096], 0).unwrap();
    disk.flush().unwrap();
    let len = storage.len().unwrap();
    let fail_next_write = |disk: &VhdxDisk, at: u64| {
        storage.fail_writes_after(0, libc::EIO);
        let err = disk.write_at(&[9; 4096], at).unwrap_err();
        storage.clear_faults();
        assert_eq!(err.errno(), libc::EIO);
    };
    // The data write fails after the file grew for the block.
    fail_next_write(&disk, MIB);
    assert_eq!(storage.len().unwrap(), len + MIB);
    assert_eq!(disk.info().allocated_blocks, 1);
    disk.write_at(&[4; 4096], 2 * MIB).unwrap();
    assert_eq!(
        storage.len().unwrap(),
        len + MIB,
        "the failed write's space is reused"
    );
    // A writer that never got to its commit, then a crash: the next open finds its space.
    fail_next_write(&disk, 3 * MIB);
    drop(disk);
    let disk = open_storage(storage.clone(), false).unwrap();
    disk.write_at(&[5; 4096], 4 * MIB).unwrap();
    assert_eq!(storage.len().unwrap(), len + 2 * MIB);
    let mut expected = vec![0u8; 8 * MIB as usize];
    expected[..4096].fill(1);
    expected[2 * MIB as usize..][..4096].fill(4);
    expected[4 * MIB as usize..][..4096].fill(5);
    assert!(read_all(&disk) == expected);
    assert_eq!(disk.info().allocated_blocks, 3);
}

#[test]
fn a_crash_at_any_write_or_flush_of_concurrent_writers_keeps_every_acknowledged_one() {
    use crate::storage::Crashing;
    use std::sync::atomic::AtomicU8;
    let w = Arc::new(Workload::new());
    let progress: Arc<Vec<AtomicU8>> = Arc::new(w.steps.iter().map(|_| AtomicU8::new(0)).collect());
    let check = {
        let (w, progress) = (w.clone(), progress.clone());
        move |crashed: MemStorage, what: &str| {
            let now: Vec<Progress> = progress
                .iter()
                .map(|p| match p.load(Ordering::SeqCst) {
                    0 => Progress::NotIssued,
                    1 => Progress::Issued,
                    _ => Progress::Acknowledged,
                })
                .collect();
            check_crashed(crashed.contents(), &w, &now, what);
        }
    };
    let base = MemStorage::from_vec(build_image(w.size, MIB as u32, false));
    let storage = Arc::new(Crashing::new(base, check));
    let disk = VhdxDisk::open(Box::new(storage.clone()), &OpenOptions::default()).unwrap();
    // Writes into the same block and into blocks of their own, each thread flushing after
    // each of its writes.
    let threads = 4;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (disk, w, progress) = (&disk, &w, &progress);
            s.spawn(move || {
                for (i, (offset, data, _)) in w.steps.iter().enumerate().skip(t).step_by(threads) {
                    progress[i].store(1, Ordering::SeqCst);
                    disk.write_at(data, *offset).unwrap();
                    disk.flush().unwrap();
                    progress[i].store(2, Ordering::SeqCst);
                }
            });
        }
    });
    disk.close().unwrap();
    assert!(
        storage.checked() > 100,
        "{} crashes checked",
        storage.checked()
    );
}

#[test]
fn concurrent_writers_into_a_child_s_new_chunk_allocate_one_sector_bitmap() {
    let (parent, mut child, mut model) = parent_and_child(4 * MIB, 4 * MIB, 512);
    // Without the empty bitmap block this creator gives every chunk (others do not).
    let at = {
        let storage = Arc::new(MemStorage::from_vec(child.clone()));
        let disk = open_child(storage, &parent, true, unlimited()).unwrap();
        disk.bat_offset + disk.layout.sector_bitmap_index(0) * BAT_ENTRY_LEN
    };
    put(&mut child, at, &[0; 8]);
    let watched = Watched::new(child);
    let mut disk = VhdxDisk::open(Box::new(watched.clone()), &OpenOptions::default()).unwrap();
    disk.attach_parent(Parent {
        path: "base.vhdx".into(),
        layer: Box::new(open_storage(parent.clone(), true).unwrap()),
    });
    disk.begin_user_write().unwrap();
    let used = || watched.len().unwrap() - disk.allocator.lock().free.bytes();
    let used_before = used();
    let mut rng = Rng(14);
    // Partial sectors copied up from the parent; the last write spans two blocks.
    let writes: Vec<(u64, Vec<u8>)> = [
        (700, 3000),
        (MIB + 100, 5000),
        (2 * MIB + 4000, 20),
        (3 * MIB - 10, 20),
    ]
    .into_iter()
    .map(|(at, len)| (at, rng.bytes(len)))
    .collect();
    watched.hold();
    std::thread::scope(|s| {
        let disk = &disk;
        let write = |(at, data): &(u64, Vec<u8>)| {
            let (at, data) = (*at, data.clone());
            s.spawn(move || disk.write_at(&data, at))
        };
        let mut writers = vec![write(&writes[0])];
        watched.wait_until("the first writer flushes its data", |seen| {
            seen.held.len() == 1
        });
        writers.extend(writes[1..].iter().map(write));
        // Each needs the chunk's sector bitmap, which the first one is adding.
        while disk.claims.waiting() < writes.len() - 1 {
            std::thread::yield_now();
        }
        watched.release();
        for writer in writers {
            writer.join().unwrap().unwrap();
        }
    });
    for (at, data) in &writes {
        model[*at as usize..][..data.len()].copy_from_slice(data);
    }
    assert!(read_all(&disk) == model);
    assert_eq!(
        used() - used_before,
        5 * MIB,
        "four blocks and one sector bitmap block"
    );
    disk.close().unwrap();
    drop(disk);
    let again = open_child(watched.mem.clone(), &parent, true, unlimited()).unwrap();
    assert!(read_all(&again) == model);
}

/// An allocating workload whose writes never overlap, so after a crash each byte may only
/// be 0 or its written value, and must be the written value if a flush acknowledged it.
struct Workload {
    size: u64,
    steps: Vec<(u64, Vec<u8>, bool)>,
}

impl Workload {
    fn new() -> Self {
        let size = 12 * MIB;
        let mut rng = Rng(0xc0ffee);
        let spans = [
            (100, 5000, false),
            (3 * MIB - 300, 600, true),
            (20_000, 3000, false),
            (7 * MIB + 12, 1_200_000, true),
            (50_000, 100, false),
            (11 * MIB, 4096, false),
            (5 * MIB + 1, 10, true),
        ];
        let steps = spans
            .iter()
            .map(|&(offset, len, flush)| (offset, rng.bytes(len as usize), flush))
            .collect();
        Workload { size, steps }
    }

    /// Runs until the first failure; returns how many steps a flush acknowledged and how
    /// many were attempted.
    fn run(&self, disk: &VhdxDisk) -> (usize, usize) {
        let mut acknowledged = 0;
        for (i, (offset, data, flush)) in self.steps.iter().enumerate() {
            if disk.write_at(data, *offset).is_err() {
                return (acknowledged, i + 1);
            }
            if *flush {
                if disk.flush().is_err() {
                    return (acknowledged, i + 1);
                }
                acknowledged = i + 1;
            }
        }
        if disk.close().is_ok() {
            acknowledged = self.steps.len();
        }
        (acknowledged, self.steps.len())
    }

    fn check(&self, contents: &[u8], progress: &[Progress], what: &str) {
        assert_eq!(contents.len() as u64, self.size, "{what}");
        let zeros = vec![0u8; self.size as usize];
        let mut spans: Vec<(usize, usize, usize)> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, (offset, data, _))| (*offset as usize, *offset as usize + data.len(), i))
            .collect();
        spans.sort_unstable();
        let mut covered_to = 0;
        for (start, end, i) in spans {
            assert!(
                contents[covered_to..start] == zeros[..start - covered_to],
                "{what}: bytes {covered_to}..{start} were never written but are not zero"
            );
            covered_to = end;
            let (got, data) = (&contents[start..end], &self.steps[i].1[..]);
            match progress[i] {
                Progress::Acknowledged => {
                    assert!(got == data, "{what}: acknowledged write {i} lost")
                }
                Progress::Issued => {
                    let bad = (0..data.len()).find(|&b| got[b] != 0 && got[b] != data[b]);
                    assert!(bad.is_none(), "{what}: write {i} holds foreign bytes");
                }
                Progress::NotIssued => {
                    assert!(got == &zeros[..got.len()], "{what}: write {i} never issued")
                }
            }
        }
        assert!(
            contents[covered_to..] == zeros[covered_to..],
            "{what}: tail not zero"
        );
    }
}

/// How far a workload's write got before a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    NotIssued,
    /// Issued, but no flush after it completed: old or new bytes, nothing else.
    Issued,
    /// A flush after it completed: the new bytes.
    Acknowledged,
}

impl Progress {
    /// Writes run in order: the first `acknowledged` acknowledged, up to `attempted`
    /// issued, of `steps`.
    fn in_order(acknowledged: usize, attempted: usize, steps: usize) -> Vec<Progress> {
        (0..steps)
            .map(|i| match i {
                i if i < acknowledged => Progress::Acknowledged,
                i if i < attempted => Progress::Issued,
                _ => Progress::NotIssued,
            })
            .collect()
    }
}

/// Reopens a crashed image read-only (must not change it) and read/write (replays), and
/// checks both serve the same data that the workload allows.
fn check_crashed(crashed: Vec<u8>, w: &Workload, progress: &[Progress], what: &str) {
    let storage = Arc::new(MemStorage::from_vec(crashed.clone()));
    let ro = open_storage(storage.clone(), true)
        .unwrap_or_else(|e| panic!("{what}: read-only reopen: {e}"));
    let ro_view = read_all(&ro);
    drop(ro);
    assert!(
        storage.contents() == crashed,
        "{what}: read-only open changed the file"
    );
    w.check(&ro_view, progress, what);

    let rw = open_storage(storage.clone(), false)
        .unwrap_or_else(|e| panic!("{what}: read/write reopen: {e}"));
    assert!(read_all(&rw) == ro_view, "{what}: replayed views differ");
    rw.close().unwrap();
    drop(rw);
    let again = open_storage(storage, true).unwrap();
    assert!(again.info().log_guid.is_nil(), "{what}");
    assert!(read_all(&again) == ro_view, "{what}: after replay");
}

#[test]
fn crash_at_every_instant_keeps_acknowledged_data() {
    let w = Workload::new();
    let base = build_image(w.size, MIB as u32, false);
    let total_ops = {
        let budget = 1 << 40;
        let ops_left = Arc::new(AtomicU64::new(budget));
        let storage = Arc::new(MemStorage::from_vec(base.clone()));
        let disk = open_counting(storage, false, ops_left.clone()).unwrap();
        assert_eq!(w.run(&disk), (w.steps.len(), w.steps.len()));
        budget - ops_left.load(Ordering::SeqCst)
    };
    assert!(total_ops > 40, "{total_ops}");
    let mut rng = Rng(0xdead_beef);
    for fail_after in 0..=total_ops {
        let storage = Arc::new(MemStorage::from_vec(base.clone()));
        let ops_left = Arc::new(AtomicU64::new(fail_after));
        let disk = open_counting(storage.clone(), false, ops_left).unwrap();
        let (acknowledged, attempted) = w.run(&disk);
        let progress = Progress::in_order(acknowledged, attempted, w.steps.len());
        drop(disk);
        let pending = storage.pending();
        for cut in 0..=pending.len() {
            // Everything before `cut` reached the medium, `cut` itself only halfway.
            let crashed = storage.power_loss(|i, op| match i.cmp(&cut) {
                std::cmp::Ordering::Less => Survives::Everything,
                std::cmp::Ordering::Equal => match op {
                    PendingOp::Write { data, .. } => Survives::Prefix(data.len() / 2),
                    PendingOp::SetLen(_) => Survives::Everything,
                },
                std::cmp::Ordering::Greater => Survives::Nothing,
            });
            let what = format!("writes failing after {fail_after}, crash at pending op {cut}");
            check_crashed(crashed.contents(), &w, &progress, &what);
        }
        for lost in 0..pending.len() {
            // Writes reach the medium out of order: everything but one.
            let crashed = storage.power_loss(|i, _| {
                if i == lost {
                    Survives::Nothing
                } else {
                    Survives::Everything
                }
            });
            let what = format!("writes failing after {fail_after}, pending op {lost} lost");
            check_crashed(crashed.contents(), &w, &progress, &what);
        }
        for round in 0..3 {
            let crashed = storage.power_loss(|_, op| match rng.below(3) {
                0 => Survives::Nothing,
                1 => Survives::Everything,
                _ => match op {
                    PendingOp::Write { data, .. } => {
                        Survives::Prefix(rng.below(data.len() as u64 + 1) as usize)
                    }
                    PendingOp::SetLen(_) => Survives::Everything,
                },
            });
            let what = format!("writes failing after {fail_after}, random subset {round}");
            check_crashed(crashed.contents(), &w, &progress, &what);
        }
    }
}

/// An image whose log holds one journaled, unapplied BAT change: block 2 allocated.
fn image_with_pending_log_entry() -> (Vec<u8>, Vec<u8>) {
    let storage = Arc::new(MemStorage::from_vec(build_image(
        8 * MIB,
        MIB as u32,
        false,
    )));
    let disk = open_storage(storage.clone(), false).unwrap();
    let data = vec![0x5a; 3000];
    disk.write_at(&data, 2 * MIB + 100).unwrap();
    drop(disk);
    // Undo the in-place BAT update, as if power failed right after the log entry's flush.
    let mut image = storage.contents();
    put(&mut image, BAT_AT, &[0u8; 4096]);
    let mut expected = vec![0u8; 8 * MIB as usize];
    expected[2 * MIB as usize + 100..2 * MIB as usize + 3100].copy_from_slice(&data);
    (image, expected)
}

#[test]
fn dirty_log_is_replayed_in_memory_when_read_only_and_in_place_when_writable() {
    let (image, expected) = image_with_pending_log_entry();
    let ro = open_mem(image.clone(), true).unwrap();
    assert!(ro.info().log_was_dirty);
    assert!(read_all(&ro) == expected);

    let storage = Arc::new(MemStorage::from_vec(image.clone()));
    let rw = open_storage(storage.clone(), false).unwrap();
    assert!(rw.info().log_guid.is_nil());
    assert!(read_all(&rw) == expected);
    drop(rw);
    assert_ne!(
        storage.contents()[BAT_AT as usize..BAT_AT as usize + 4096],
        [0u8; 4096]
    );
    let clean = open_storage(storage, true).unwrap();
    assert!(!clean.info().log_was_dirty);
    assert!(read_all(&clean) == expected);
}

#[test]
fn a_writable_open_refused_after_reading_the_log_leaves_the_file_unchanged() {
    let (mut image, _) = image_with_pending_log_entry();
    // Metadata the log does not touch is damaged: the open must fail before the replay
    // reaches the file.
    image[META_AT as usize] ^= 0xFF;
    let storage = Arc::new(MemStorage::from_vec(image.clone()));
    let err = open_storage(storage.clone(), false).unwrap_err();
    assert_eq!(err.corruption_kind(), Some(CorruptionKind::BadSignature));
    assert!(
        storage.contents() == image,
        "a refused open wrote to the image"
    );
    assert_eq!(storage.write_count(), 0);
}

#[test]
fn damaged_log_entries_are_not_replayed_and_truncation_is_refused() {
    let (image, _) = image_with_pending_log_entry();
    // The entry sits at the start of the log; a flipped byte invalidates it and the log
    // holds no other sequence: opened as nothing to replay.
    let mut flipped = image.clone();
    flipped[LOG_AT as usize + 5000] ^= 0x40;
    let disk = open_mem(flipped, true).unwrap();
    assert!(read_all(&disk).iter().all(|&b| b == 0));

    let file_len = image.len();
    let mut truncated = image.clone();
    truncated.truncate(file_len - MIB as usize);
    let err = open_mem(truncated, true).unwrap_err();
    assert_eq!(err.corruption_kind(), Some(CorruptionKind::Truncated));
    assert!(
        err.to_string()
            .starts_with("log entry 1: file is truncated"),
        "{err}"
    );
}

#[test]
fn partially_present_block_fails_only_its_own_requests() {
    let mut image = build_image(4 * MIB, MIB as u32, false);
    let entry = BatEntry::new(PayloadState::PartiallyPresent, PAYLOAD_AT);
    put(&mut image, BAT_AT + 8, &entry.0.to_le_bytes());
    image.resize((PAYLOAD_AT + MIB) as usize, 0);
    let disk = open_mem(image, false).unwrap();
    let mut buf = [0u8; 16];
    let err = disk.read_at(&mut buf, MIB + 5).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert!(err.to_string().starts_with("BAT entry 1: "), "{err}");
    assert!(disk.write_at(&buf, MIB).is_err());
    disk.read_at(&mut buf, 0).unwrap();
    disk.write_at(b"fine", 2 * MIB).unwrap();
}

#[test]
fn a_differencing_image_without_a_parent_locator_is_refused() {
    let mut image = build_image(4 * MIB, MIB as u32, false);
    let mut params = metadata::tests::params();
    params.has_parent = true;
    put(&mut image, META_AT, &region_with(&params, MIB as usize));
    let err = open_mem(image, true).unwrap_err();
    assert_eq!(
        err.to_string(),
        "metadata table: a differencing image has no parent locator item"
    );
}

#[test]
fn damaged_structures_are_refused_with_one_line_errors() {
    let base = build_image(4 * MIB, MIB as u32, false);
    let refuse = |image: Vec<u8>, start: &str| {
        let err = open_mem(image, true).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(start),
            "{text} does not start with {start}"
        );
        assert!(!text.contains('\n'));
    };
    let flip = |at: u64| {
        let mut image = base.clone();
        image[at as usize] ^= 0x10;
        image
    };

    // One damaged header of two: opened from the other one.
    assert!(open_mem(flip(HEADER_OFFSETS[0] + 30), true).is_ok());
    assert!(open_mem(flip(HEADER_OFFSETS[1] + 30), true).is_ok());
    let mut both = flip(HEADER_OFFSETS[0] + 30);
    both[HEADER_OFFSETS[1] as usize + 30] ^= 0x10;
    refuse(both, "headers: no valid header");

    assert!(open_mem(flip(REGION_TABLE_OFFSETS[0] + 20), true).is_ok());
    let mut both = flip(REGION_TABLE_OFFSETS[0] + 20);
    both[REGION_TABLE_OFFSETS[1] as usize + 20] ^= 0x10;
    refuse(both, "region tables: no valid copy");

    refuse(flip(META_AT), "metadata table: signature");
    refuse(flip(0), "file identifier: signature");

    let mut past_end = base.clone();
    let entry = BatEntry::new(PayloadState::FullyPresent, 64 * MIB);
    put(&mut past_end, BAT_AT + 16, &entry.0.to_le_bytes());
    refuse(
        past_end,
        "BAT entry 2: points past end of file (offset 0x4000000)",
    );

    let mut into_metadata = base.clone();
    let entry = BatEntry::new(PayloadState::FullyPresent, META_AT);
    put(&mut into_metadata, BAT_AT, &entry.0.to_le_bytes());
    refuse(into_metadata, "BAT entry 0: overlaps the metadata region");

    // Regions overlapping the log: rewrite both copies consistently.
    let mut overlapping = base.clone();
    let mut regions = RegionTable::parse(
        &base[REGION_TABLE_OFFSETS[0] as usize..][..REGION_TABLE_LEN],
        "region table 1",
    )
    .unwrap();
    regions.entries[0].file_offset = LOG_AT;
    for offset in REGION_TABLE_OFFSETS {
        put(&mut overlapping, offset, &regions.to_bytes());
    }
    refuse(overlapping, "region table: BAT region");

    let short = base[..(MIB as usize) / 2].to_vec();
    refuse(short, "file: is 524288 bytes");
    let mut no_meta = base.clone();
    no_meta.truncate((META_AT + MIB / 2) as usize);
    refuse(no_meta, "region table: metadata region");
}

#[test]
fn crash_during_discard_leaves_old_data_or_zeros_never_a_mix_of_blocks() {
    let size = 6 * MIB;
    let old: Vec<u8> = Rng(77).bytes(3 * MIB as usize);
    let base = {
        let storage = Arc::new(MemStorage::from_vec(build_image(size, MIB as u32, false)));
        let disk = open_storage(storage.clone(), false).unwrap();
        disk.write_at(&old, MIB).unwrap();
        disk.close().unwrap();
        storage.contents()
    };
    let run = |disk: &VhdxDisk| -> bool {
        // Whole blocks 1 and 2 go to ZERO through the log; block 3 is zero-written in part.
        disk.discard(MIB, 2 * MIB + 4096).is_ok() && disk.flush().is_ok()
    };
    let total_ops = {
        let budget = 1 << 40;
        let ops_left = Arc::new(AtomicU64::new(budget));
        let disk = open_counting(
            Arc::new(MemStorage::from_vec(base.clone())),
            false,
            ops_left.clone(),
        )
        .unwrap();
        assert!(run(&disk));
        budget - ops_left.load(Ordering::SeqCst)
    };
    for fail_after in 0..=total_ops {
        let storage = Arc::new(MemStorage::from_vec(base.clone()));
        let disk =
            open_counting(storage.clone(), false, Arc::new(AtomicU64::new(fail_after))).unwrap();
        let acknowledged = run(&disk);
        drop(disk);
        for cut in 0..=storage.pending().len() {
            let crashed = storage.power_loss(|i, _| {
                if i < cut {
                    Survives::Everything
                } else {
                    Survives::Nothing
                }
            });
            let what = format!("discard failing after {fail_after}, crash at {cut}");
            let disk =
                open_storage(Arc::new(crashed), true).unwrap_or_else(|e| panic!("{what}: {e}"));
            let view = read_all(&disk);
            for block in 1..4usize {
                let range = block * MIB as usize..(block + 1) * MIB as usize;
                let was = &old[range.start - MIB as usize..range.end - MIB as usize];
                let zeroed = if block == 3 { 4096 } else { MIB as usize };
                let now = &view[range];
                let is_zero =
                    now[..zeroed].iter().all(|&b| b == 0) && now[zeroed..] == was[zeroed..];
                assert!(
                    is_zero || (!acknowledged && now == was),
                    "{what}: block {block} is neither its old data nor discarded"
                );
            }
        }
    }
}

#[test]
fn random_damage_to_metadata_never_panics() {
    let image = {
        let storage = Arc::new(MemStorage::from_vec(build_image(
            6 * MIB,
            MIB as u32,
            false,
        )));
        let disk = open_storage(storage.clone(), false).unwrap();
        disk.write_at(&[0xAB; 5000], 2 * MIB - 100).unwrap();
        // Not closed: the log stays live, so damage can also hit a replayable entry.
        drop(disk);
        storage.contents()
    };
    assert!(open_mem(image.clone(), true).unwrap().info().log_was_dirty);
    let mut rng = Rng(0xbad5eed);
    let areas = [
        (0u64, 4096u64),
        (HEADER_OFFSETS[0], 4096),
        (HEADER_OFFSETS[1], 4096),
        (REGION_TABLE_OFFSETS[0], 256),
        (LOG_AT, 16384),
        (BAT_AT, 64),
        (META_AT, 512),
        (META_AT + 64 * 1024, 64),
    ];
    let (mut opened, mut refused) = (0, 0);
    for _ in 0..200 {
        let mut damaged = image.clone();
        for _ in 0..1 + rng.below(4) {
            let (start, len) = areas[rng.below(areas.len() as u64) as usize];
            let at = (start + rng.below(len)) as usize;
            damaged[at] = match rng.below(3) {
                0 => damaged[at] ^ (1 << rng.below(8)),
                1 => 0xFF,
                _ => rng.next() as u8,
            };
        }
        for read_only in [true, false] {
            match open_mem(damaged.clone(), read_only) {
                Ok(disk) => {
                    opened += 1;
                    let mut buf = vec![0u8; disk.size().min(8 * MIB) as usize];
                    let _ = disk.read_at(&mut buf, 0);
                    let _ = disk.write_at(&[1; 700], 3 * MIB - 300);
                }
                Err(e) => {
                    refused += 1;
                    // Damage is always caught by a check, never by reading past the end.
                    assert!(
                        e.corruption_kind().is_some()
                            || matches!(e.kind(), ErrorKind::Unsupported(_)),
                        "{e}"
                    );
                    assert!(!e.to_string().contains('\n'), "{e}");
                }
            }
        }
    }
    assert!(
        opened > 0 && refused > 0,
        "opened {opened}, refused {refused}"
    );
}

/// A dynamic parent and a differencing child of `child_size` bytes made by `create_vhdx`
/// (1 MiB blocks), as in-memory files; the parent holds random data.
fn parent_and_child(
    parent_size: u64,
    child_size: u64,
    logical_sector_size: u32,
) -> (Arc<MemStorage>, Vec<u8>, Vec<u8>) {
    use create::{VhdxCreateOptions, VhdxKind, create_vhdx};
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = (dir.path().join("base.vhdx"), dir.path().join("child.vhdx"));
    let options = |size, kind| VhdxCreateOptions {
        block_size: MIB as u32,
        logical_sector_size,
        ..VhdxCreateOptions::new(size, kind)
    };
    create_vhdx(&base, &options(parent_size, VhdxKind::Dynamic)).unwrap();
    let parent = Arc::new(MemStorage::from_vec(std::fs::read(&base).unwrap()));
    let disk = open_storage(parent.clone(), false).unwrap();
    let mut rng = Rng(parent_size);
    let data = rng.bytes(parent_size as usize);
    // Leave the second block unallocated in the parent: it reads as zeros there.
    disk.write_at(&data[..MIB as usize], 0).unwrap();
    disk.write_at(&data[2 * MIB as usize..], 2 * MIB).unwrap();
    disk.close().unwrap();
    drop(disk);
    std::fs::write(&base, parent.contents()).unwrap();
    let kind = VhdxKind::Differencing {
        parent: parent_image(&open_storage(parent.clone(), true).unwrap(), &base),
    };
    create_vhdx(&child, &options(child_size, kind)).unwrap();
    let mut model = data;
    model[MIB as usize..2 * MIB as usize].fill(0);
    model.resize(child_size as usize, 0);
    (parent, std::fs::read(&child).unwrap(), model)
}

/// What a child of `disk`, kept at `path` beside it, records.
fn parent_image(disk: &VhdxDisk, path: &std::path::Path) -> ParentImage {
    let facts = disk.facts();
    ParentImage {
        format: Format::Vhdx,
        identity: *facts.data_write_guid.unwrap().as_bytes(),
        disk_id: facts.disk_id,
        size: disk.size(),
        logical_sector_size: disk.logical_sector_size(),
        physical_sector_size: disk.physical_sector_size(),
        time_stamp: None,
        paths: StoredParentPaths {
            canonical: path.to_path_buf(),
            relative: ".\\base.vhdx".to_string(),
            absolute: path.display().to_string().replace('/', "\\"),
            windows: None,
            volume: None,
        },
    }
}

/// Opens the in-memory `child` over the in-memory `parent`, whose identity the child's
/// locator must name, with mutating requests failing once `ops_left` reaches zero.
fn open_child(
    child: Arc<MemStorage>,
    parent: &Arc<MemStorage>,
    read_only: bool,
    ops_left: Arc<AtomicU64>,
) -> Result<VhdxDisk> {
    let options = OpenOptions {
        read_only,
        ..Default::default()
    };
    let shared = Shared {
        mem: child,
        ops_left,
    };
    let mut disk = VhdxDisk::open(Box::new(shared), &options)?;
    let parent = open_storage(parent.clone(), true)?;
    let link = disk.parent_link().unwrap();
    assert_eq!(link.identities, [*parent.info().data_write_guid.as_bytes()]);
    assert_eq!(disk.logical_sector_size(), parent.logical_sector_size());
    disk.attach_parent(Parent {
        path: "base.vhdx".into(),
        layer: Box::new(parent),
    });
    Ok(disk)
}

fn unlimited() -> Arc<AtomicU64> {
    Arc::new(AtomicU64::new(u64::MAX))
}

#[test]
fn a_child_reads_its_parent_until_written_and_matches_a_model() {
    for lss in [512u32, 4096] {
        let parent_size = 3 * MIB + 3 * 4096;
        let child_size = 6 * MIB;
        let (parent, child, mut model) = parent_and_child(parent_size, child_size, lss);
        let parent_before = parent.contents();
        let storage = Arc::new(MemStorage::from_vec(child));
        let disk = open_child(storage.clone(), &parent, false, unlimited()).unwrap();
        assert!(read_all(&disk) == model, "fresh child reads its parent");
        let extents = disk.allocation(0, child_size).unwrap();
        assert_eq!(extents[0].state, Allocation::Data);
        assert_eq!(extents.last().unwrap().state, Allocation::Zero);
        let mut rng = Rng(u64::from(lss));
        for step in 0..300 {
            let at = rng.below(child_size);
            let len =
                (1 + rng.below(if step % 10 == 0 { 3 * MIB } else { 9000 })).min(child_size - at);
            if step % 7 == 3 {
                disk.discard(at, len).unwrap();
                model[at as usize..(at + len) as usize].fill(0);
            } else {
                let data = rng.bytes(len as usize);
                disk.write_at(&data, at).unwrap();
                model[at as usize..(at + len) as usize].copy_from_slice(&data);
            }
            let probe = rng.below(child_size - 4096);
            let mut buf = vec![0u8; 4096];
            disk.read_at(&mut buf, probe).unwrap();
            assert!(
                buf[..] == model[probe as usize..probe as usize + 4096],
                "lss {lss} step {step}"
            );
        }
        assert!(read_all(&disk) == model, "lss {lss}");
        let info = disk.info();
        assert!(info.allocated_blocks > 0 && info.parent_locator.is_some());
        disk.close().unwrap();
        drop(disk);
        let again = open_child(storage.clone(), &parent, true, unlimited()).unwrap();
        assert!(read_all(&again) == model, "lss {lss}: after reopen");
        assert!(
            parent.contents() == parent_before,
            "the parent is never written"
        );
    }
}

#[test]
fn writes_to_a_child_set_bits_not_whole_blocks_and_discards_hide_the_parent() {
    let (parent, child, model) = parent_and_child(4 * MIB, 4 * MIB, 512);
    let storage = Arc::new(MemStorage::from_vec(child));
    let disk = open_child(storage.clone(), &parent, false, unlimited()).unwrap();
    disk.write_at(b"xyz", 700).unwrap();
    let entry = disk.bat.read().payload(0);
    assert_eq!(entry.payload_state(), Some(PayloadState::PartiallyPresent));
    let d = disk.differencing.as_ref().unwrap();
    assert_eq!(
        disk.sector_runs(d, 0, &(0..2048)),
        vec![(0..512, false), (512..1024, true), (1024..2048, false)]
    );
    let mut sector = [0u8; 1024];
    disk.read_at(&mut sector, 0).unwrap();
    let mut expected = model[..1024].to_vec();
    expected[700..703].copy_from_slice(b"xyz");
    assert_eq!(sector[..], expected[..]);
    // Whole-block and partial discards read zeros afterwards, not the parent.
    disk.discard(MIB * 2, MIB).unwrap();
    disk.discard(3 * MIB + 100, 1000).unwrap();
    assert_eq!(
        disk.bat.read().payload(2).payload_state(),
        Some(PayloadState::Zero)
    );
    let mut buf = vec![1u8; MIB as usize];
    disk.read_at(&mut buf, 2 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let mut buf = vec![1u8; 1000];
    disk.read_at(&mut buf, 3 * MIB + 100).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(
        disk.allocation(2 * MIB, MIB).unwrap(),
        vec![Extent {
            offset: 2 * MIB,
            len: MIB,
            state: Allocation::Zero
        }]
    );
}

#[test]
fn a_crash_at_any_instant_of_child_writes_keeps_every_acknowledged_one() {
    let (parent, child, old) = parent_and_child(3 * MIB, 4 * MIB, 512);
    // Non-overlapping writes, each inside one block, each followed by a flush: new
    // blocks, partial sectors, blocks already partly present, one past the parent's end.
    let mut rng = Rng(77);
    let writes: Vec<(u64, Vec<u8>)> = [
        (100, 700),
        (MIB + 4096, 512),
        (MIB + 10_000, 3000),
        (2048, 1000),
        (3 * MIB + 5, 20_000),
        (2 * MIB, MIB),
    ]
    .into_iter()
    .map(|(at, len)| (at, rng.bytes(len as usize)))
    .collect();
    let run = |disk: &VhdxDisk| {
        let mut acknowledged = 0;
        for (i, (at, data)) in writes.iter().enumerate() {
            if disk.write_at(data, *at).and_then(|_| disk.flush()).is_err() {
                return (acknowledged, i + 1);
            }
            acknowledged = i + 1;
        }
        (acknowledged, writes.len())
    };
    let total_ops = {
        let ops_left = Arc::new(AtomicU64::new(1 << 40));
        let storage = Arc::new(MemStorage::from_vec(child.clone()));
        let disk = open_child(storage, &parent, false, ops_left.clone()).unwrap();
        assert_eq!(run(&disk), (writes.len(), writes.len()));
        (1 << 40) - ops_left.load(Ordering::SeqCst)
    };
    let check = |contents: Vec<u8>, acknowledged: usize, attempted: usize, what: &str| {
        let storage = Arc::new(MemStorage::from_vec(contents));
        let view = read_all(
            &open_child(storage.clone(), &parent, true, unlimited())
                .unwrap_or_else(|e| panic!("{what}: {e}")),
        );
        for (i, (at, data)) in writes.iter().enumerate() {
            let range = *at as usize..*at as usize + data.len();
            let got = &view[range.clone()];
            if i < acknowledged {
                assert!(got == &data[..], "{what}: write {i} lost");
            } else if i < attempted {
                assert!(
                    got.iter()
                        .zip(&old[range.clone()])
                        .zip(data)
                        .all(|((g, o), n)| g == o || g == n),
                    "{what}: write {i} neither old nor new"
                );
            } else {
                assert!(got == &old[range], "{what}: write {i} never issued");
            }
        }
        let rw = open_child(storage, &parent, false, unlimited())
            .unwrap_or_else(|e| panic!("{what}: read/write reopen: {e}"));
        assert!(read_all(&rw) == view, "{what}: replayed view differs");
    };
    for fail_after in 0..=total_ops {
        let storage = Arc::new(MemStorage::from_vec(child.clone()));
        let ops_left = Arc::new(AtomicU64::new(fail_after));
        let disk = open_child(storage.clone(), &parent, false, ops_left).unwrap();
        let (acknowledged, attempted) = run(&disk);
        drop(disk);
        let pending = storage.pending();
        for cut in 0..=pending.len() {
            let crashed = storage.power_loss(|i, op| match i.cmp(&cut) {
                std::cmp::Ordering::Less => Survives::Everything,
                std::cmp::Ordering::Equal => match op {
                    PendingOp::Write { data, .. } => Survives::Prefix(data.len() / 2),
                    PendingOp::SetLen(_) => Survives::Everything,
                },
                std::cmp::Ordering::Greater => Survives::Nothing,
            });
            let what = format!("failing after {fail_after}, crash at pending op {cut}");
            check(crashed.contents(), acknowledged, attempted, &what);
        }
    }
}

#[test]
fn a_refused_discard_leaves_the_image_untouched() {
    let image = build_image(8 * MIB, MIB as u32, false);
    let storage = Arc::new(MemStorage::from_vec(image.clone()));
    let options = OpenOptions {
        discard: Some(DiscardMode::Ignore),
        ..Default::default()
    };
    let disk = VhdxDisk::open(Box::new(storage.clone()), &options).unwrap();
    assert_eq!(disk.discard(0, MIB).unwrap_err().errno(), libc::EOPNOTSUPP);
    disk.close().unwrap();
    assert_eq!(storage.write_count(), 0);
    assert_eq!(storage.contents(), image);
}

#[test]
fn relinking_moves_a_parent_locator_that_outgrows_its_room() {
    let (parent, mut child, model) = parent_and_child(2 * MIB, 2 * MIB, 512);
    let region = {
        let disk = open_child(
            Arc::new(MemStorage::from_vec(child.clone())),
            &parent,
            true,
            unlimited(),
        )
        .unwrap();
        disk.differencing.as_ref().unwrap().metadata_region.clone()
    };
    let at = region.start as usize;
    let mut table = MetadataTable::parse(&child[at..at + METADATA_TABLE_LEN], MIB).unwrap();
    let locator = table.find(PARENT_LOCATOR).unwrap().clone();
    // A user item right after the locator leaves it no room to grow in place.
    let user = metadata::MetadataItem {
        id: Uuid::from_u128(0x5e5),
        offset: locator.offset + locator.length,
        length: 16,
        is_user: true,
        is_virtual_disk: false,
        is_required: false,
    };
    table.items.push(user.clone());
    put(&mut child, region.start, &table.to_bytes());
    let user_at = at + user.offset as usize;
    child[user_at..user_at + 16].copy_from_slice(&[0xEE; 16]);

    let child = Arc::new(MemStorage::from_vec(child));
    let mut disk = VhdxDisk::open(Box::new(child.clone()), &OpenOptions::default()).unwrap();
    disk.attach_parent(Parent {
        path: "base.vhdx".into(),
        layer: Box::new(open_storage(parent.clone(), false).unwrap()),
    });
    disk.relink_parent().unwrap();
    disk.close().unwrap();
    drop(disk);
    let disk = open_child(child.clone(), &parent, true, unlimited()).unwrap();
    assert!(read_all(&disk) == model);
    let bytes = child.contents();
    let table = MetadataTable::parse(&bytes[at..at + METADATA_TABLE_LEN], MIB).unwrap();
    let moved = table.find(PARENT_LOCATOR).unwrap();
    assert_eq!(moved.offset, user.offset + user.length);
    assert_eq!(&bytes[user_at..user_at + 16], &[0xEE; 16]);
    let old = at + locator.offset as usize;
    assert!(
        bytes[old..old + locator.length as usize]
            .iter()
            .all(|&b| b == 0)
    );
    let entries = disk.info().parent_locator.unwrap();
    assert!(
        entries
            .iter()
            .all(|(k, _)| k != parent_locator::PARENT_LINKAGE2)
    );
}

#[test]
fn a_child_cleared_to_its_parent_keeps_no_block_and_no_bit() {
    let (parent, child, _) = parent_and_child(4 * MIB, 4 * MIB, 512);
    let storage = Arc::new(MemStorage::from_vec(child));
    let disk = open_child(storage.clone(), &parent, false, unlimited()).unwrap();
    disk.write_at(&[7; 5000], MIB - 100).unwrap();
    disk.discard(2 * MIB, MIB).unwrap();
    disk.clear_blocks_to_parent().unwrap();
    disk.close().unwrap();
    drop(disk);
    let again = open_child(storage, &parent, true, unlimited()).unwrap();
    let bat = again.bat.read();
    assert!(
        (0..again.layout.payload_blocks)
            .all(|b| bat.payload(b).payload_state() == Some(PayloadState::NotPresent))
    );
    let d = again.differencing.as_ref().unwrap();
    assert_eq!(d.bitmaps.read().page_count(), 0);
    assert_eq!(again.info().allocated_blocks, 0);
}

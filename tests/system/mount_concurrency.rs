//! Many requests at once through one real mount.
//!
//! - Reads that wait for the image file wait side by side, with many worker threads
//!   (`-o threads=N`) and with one: a read the page cache cannot answer leaves its worker
//!   for a pool of threads that may wait.
//! - Reads and overwrites of allocated blocks go ahead while an allocation is stuck in its
//!   data write (so they never wait for the metadata lock while it does I/O). They go
//!   through a direct-I/O loop device, which submits requests asynchronously: synchronous
//!   writes to one FUSE file are serialised by the kernel before they reach the daemon.
//! - Threads doing random reads, overwrites and allocating writes on one dynamic VHDX or
//!   VHD at once leave an image that qemu finds identical to the model and clean.
//!
//! The first two watch the daemon's I/O from below: its image lives on a small FUSE
//! filesystem served by this test ([`GateFs`]), which counts the reads in flight and can
//! hold writes to chosen offsets.

use crate::common;
use crate::common::mount::{self, LoopDevice, Mount};
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;

// ---------------------------------------------------------------------------------------
// GateFs: one file, `image`, passed through to a real file, with hooks on reads and writes.

const GATE_ROOT: u64 = 1;
const GATE_FILE: u64 = 2;
const GATE_NAME: &str = "image";
/// The longest any request is held, so a failing test never hangs.
const HOLD_LIMIT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct GateState {
    reads_in_flight: usize,
    max_reads_in_flight: usize,
    /// Reads wait until this many are in flight, or for at most the given time.
    gather_reads: Option<(usize, Duration)>,
    /// Writes starting inside this range of the file wait until it is cleared.
    hold_writes: Option<std::ops::Range<u64>>,
    writes_held: usize,
}

#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl Gate {
    fn update<T>(&self, f: impl FnOnce(&mut GateState) -> T) -> T {
        let result = f(&mut self.state.lock().unwrap());
        self.changed.notify_all();
        result
    }

    fn gather_reads(&self, count: usize, patience: Duration) {
        self.update(|s| {
            s.gather_reads = Some((count, patience));
            s.max_reads_in_flight = 0;
        });
    }

    fn max_reads_in_flight(&self) -> usize {
        self.state.lock().unwrap().max_reads_in_flight
    }

    fn writes_held(&self) -> usize {
        self.state.lock().unwrap().writes_held
    }

    /// Waits until `pred` holds, for at most `limit`; returns whether it did.
    fn wait_until(&self, limit: Duration, pred: impl Fn(&GateState) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        let mut s = self.state.lock().unwrap();
        while !pred(&s) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self.changed.wait_timeout(s, deadline - now).unwrap().0;
        }
        true
    }

    fn before_read(&self) {
        let gather = self.update(|s| {
            s.reads_in_flight += 1;
            s.max_reads_in_flight = s.max_reads_in_flight.max(s.reads_in_flight);
            s.gather_reads
        });
        if let Some((count, patience)) = gather {
            // Once they have all met, reads pass freely again.
            self.wait_until(patience, |s| {
                s.gather_reads.is_none() || s.reads_in_flight >= count
            });
            self.update(|s| s.gather_reads = None);
        }
    }

    fn after_read(&self) {
        self.update(|s| s.reads_in_flight -= 1);
    }

    fn before_write(&self, offset: u64) {
        let held = |s: &GateState| s.hold_writes.as_ref().is_some_and(|r| r.contains(&offset));
        if !self.update(|s| {
            let hold = held(s);
            s.writes_held += usize::from(hold);
            hold
        }) {
            return;
        }
        self.wait_until(HOLD_LIMIT, |s| !held(s));
        self.update(|s| s.writes_held -= 1);
    }
}

struct GateFs {
    file: File,
    gate: Arc<Gate>,
}

impl GateFs {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm) = match ino {
            GATE_ROOT => (FileType::Directory, 0, 0o755),
            GATE_FILE => (
                FileType::RegularFile,
                self.file.metadata().ok()?.len(),
                0o644,
            ),
            _ => return None,
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Filesystem for GateFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.attr(GATE_FILE) {
            Some(a) if parent.0 == GATE_ROOT && name == GATE_NAME => {
                reply.entry(&Duration::ZERO, &a, fuser::Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&Duration::ZERO, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if let Some(size) = size
            && let Err(e) = self.file.set_len(size)
        {
            return reply.error(io_errno(&e));
        }
        match self.attr(ino.0) {
            Some(a) => reply.attr(&Duration::ZERO, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Every read and write reaches this filesystem (no page cache in between), and
        // writes are not serialised by the kernel, so what is seen here is what the
        // daemon does.
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.gate.before_read();
        let mut buf = vec![0u8; size as usize];
        let result = self.file.read_at(&mut buf, offset);
        self.gate.after_read();
        match result {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(io_errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.gate.before_write(offset);
        match self.file.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(io_errno(&e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.file.sync_data() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(io_errno(&e)),
        }
    }
}

/// A mounted [`GateFs`] exposing `backing` as `<mountpoint>/image`; unmounted on drop
/// (after releasing anything it still holds).
struct GateMount {
    gate: Arc<Gate>,
    dir: tempfile::TempDir,
    session: Option<fuser::BackgroundSession>,
}

impl GateMount {
    fn new(backing: &Path) -> GateMount {
        let gate = Arc::new(Gate::default());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(backing)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("gate".to_string())];
        // Plenty of threads, so this filesystem never limits the daemon above it.
        config.n_threads = Some(32);
        config.clone_fd = true;
        let fs = GateFs {
            file,
            gate: gate.clone(),
        };
        let session = fuser::spawn_mount(fs, dir.path(), &config).unwrap();
        GateMount {
            gate,
            dir,
            session: Some(session),
        }
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join(GATE_NAME)
    }

    fn release_writes(&self) {
        self.gate.update(|s| s.hold_writes = None);
    }
}

impl Drop for GateMount {
    fn drop(&mut self) {
        self.release_writes();
        self.gate.update(|s| s.gather_reads = None);
        if let Some(session) = self.session.take() {
            let _ = session.umount_and_join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// O_DIRECT helpers

/// A page-aligned buffer, as O_DIRECT needs.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + PAGE];
        let start = raw.as_ptr().align_offset(PAGE);
        AlignedBuf { raw, start, len }
    }

    fn from(data: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::new(data.len());
        buf.as_mut().copy_from_slice(data);
        buf
    }

    fn as_ref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

fn open_direct(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap()
}

fn read_direct(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = AlignedBuf::new(len);
    file.read_exact_at(buf.as_mut(), offset)
        .unwrap_or_else(|e| panic!("O_DIRECT read of {len} bytes at {offset}: {e}"));
    buf.as_ref().to_vec()
}

fn write_direct(file: &File, offset: u64, data: &[u8]) {
    file.write_all_at(AlignedBuf::from(data).as_ref(), offset)
        .unwrap_or_else(|e| panic!("O_DIRECT write of {} bytes at {offset}: {e}", data.len()));
}

/// Runs `f` on another thread and returns its result, or `None` if it takes longer than
/// `limit` (the thread is then left to finish on its own).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

// ---------------------------------------------------------------------------------------
// Parallel dispatch

/// `readers` threads each read 4 KiB from a different place at once, while the backing
/// filesystem holds every read until `readers` are in flight (or `patience` passes).
/// Returns the most reads the daemon had in flight together.
fn reads_in_flight_together(
    gate: &GateMount,
    disk: &Path,
    backing: &[u8],
    readers: usize,
    patience: Duration,
) -> usize {
    gate.gate.gather_reads(readers, patience);
    std::thread::scope(|scope| {
        for i in 0..readers {
            scope.spawn(move || {
                let file = open_direct(disk);
                let offset = i as u64 * MIB + 8192;
                let data = read_direct(&file, offset, PAGE);
                let at = offset as usize;
                assert!(
                    data == backing[at..at + PAGE],
                    "read {i} returned wrong bytes"
                );
            });
        }
    });
    gate.gate.update(|s| s.gather_reads = None);
    gate.gate.max_reads_in_flight()
}

#[test]
fn reads_that_wait_for_the_image_are_served_side_by_side() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing_path = dir.path().join("raw.img");
    let backing = mount::pattern(1, (16 * MIB) as usize);
    std::fs::write(&backing_path, &backing).unwrap();
    let gate = GateMount::new(&backing_path);

    // If the daemon served one read at a time, the first would sit out the whole patience
    // alone and the count would stay at 1.
    for (threads, readers) in [("threads=8", 6), ("threads=1", 6)] {
        let mount = Mount::new(&gate.image(), &["format=raw", threads]);
        let together =
            reads_in_flight_together(&gate, &mount.disk(), &backing, readers, HOLD_LIMIT);
        assert_eq!(together, readers, "reads in flight at once with {threads}");
        mount.unmount();
    }
}

// ---------------------------------------------------------------------------------------
// Allocation in progress

/// Holds an allocating write in its data write and checks that reads and overwrites of
/// allocated blocks complete meanwhile; then checks the result with qemu.
fn allocated_io_passes_a_stuck_allocation(qemu_format: &str, options: &str, block: u64) {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    // Patterns at the start, across the first block boundary, in the middle, at the end.
    let image =
        mount::qemu_image_with_patterns(dir.path(), "image", qemu_format, options, size, block);
    let reference = dir.path().join("reference.raw");
    mount::reference_copy(qemu_format, &image, &reference);
    let mut model = std::fs::read(&reference).unwrap();
    let middle = (model.len() as u64 / 2 / 512 * 512).next_multiple_of(PAGE as u64);

    let gate = GateMount::new(&image);
    let mount = Mount::new(&gate.image(), &["threads=8"]);
    let device = LoopDevice::attach_direct_io(&mount.disk());
    let disk = device.path().to_path_buf();
    let file = open_direct(&disk);
    // The first change of a session may update headers; get it out of the way.
    let first = mount::pattern(2, PAGE);
    write_direct(&file, 0, &first);
    model[..PAGE].copy_from_slice(&first);

    // New blocks take free space inside the file first (qemu leaves some before its first
    // block): use it up, so the next new block goes past the last one, where the file
    // grew (by room for more than one block, in a VHD) and where the gate holds it.
    let file_len = || std::fs::metadata(&image).unwrap().len();
    let grown_from = (3..8).find_map(|b| {
        let before = file_len();
        let data = mount::pattern(10 + b, PAGE);
        write_direct(&file, b * block, &data);
        model[(b * block) as usize..(b * block) as usize + PAGE].copy_from_slice(&data);
        (file_len() > before).then_some(before)
    });
    let grown_from = grown_from.expect("five new blocks never made the file grow");
    gate.gate
        .update(|s| s.hold_writes = Some(grown_from..u64::MAX));
    let new_at = 8 * block + 2 * PAGE as u64;
    let new_data = mount::pattern(3, 64 * 1024);
    let allocating = {
        let (disk, data) = (disk.clone(), new_data.clone());
        std::thread::spawn(move || write_direct(&open_direct(&disk), new_at, &data))
    };
    assert!(
        gate.gate
            .wait_until(Duration::from_secs(30), |s| s.writes_held > 0),
        "the allocating write never reached the end of the file"
    );

    let overwrite = mount::pattern(4, 2 * PAGE);
    let expected_start = model[..2 * PAGE].to_vec();
    let expected_middle = model[middle as usize..middle as usize + PAGE].to_vec();
    let (disk2, overwrite2) = (disk.clone(), overwrite.clone());
    let passed = within(Duration::from_secs(20), move || {
        let file = open_direct(&disk2);
        let start = read_direct(&file, 0, 2 * PAGE);
        let middle_bytes = read_direct(&file, middle, PAGE);
        write_direct(&file, middle + PAGE as u64, &overwrite2);
        (start, middle_bytes)
    });
    let still_held = gate.gate.writes_held();
    gate.release_writes();
    let (start, middle_bytes) =
        passed.expect("reads and overwrites of allocated blocks waited for an allocation");
    assert!(start == expected_start, "start of the disk read back wrong");
    assert!(
        middle_bytes == expected_middle,
        "middle of the disk read back wrong"
    );
    assert_eq!(
        still_held, 1,
        "the allocation finished before the other requests"
    );
    allocating.join().unwrap();
    let at = (middle + PAGE as u64) as usize;
    model[at..at + overwrite.len()].copy_from_slice(&overwrite);
    model[new_at as usize..new_at as usize + new_data.len()].copy_from_slice(&new_data);

    file.sync_all().unwrap();
    drop(file);
    drop(device);
    mount.unmount();
    drop(gate);
    std::fs::write(&reference, &model).unwrap();
    mount::assert_qemu_identical(qemu_format, &image, &reference);
    common::qemu_check_clean(qemu_format, &image);
}

#[test]
fn vhdx_allocated_io_passes_a_stuck_allocation() {
    if !mount::fuse_available() {
        return;
    }
    allocated_io_passes_a_stuck_allocation("vhdx", "block_size=1M", MIB);
}

#[test]
fn vhd_allocated_io_passes_a_stuck_allocation() {
    if !mount::fuse_available() {
        return;
    }
    allocated_io_passes_a_stuck_allocation("vpc", "subformat=dynamic", 2 * MIB);
}

// ---------------------------------------------------------------------------------------
// Many threads against a model

const THREADS: usize = 8;
const OPS_PER_THREAD: usize = 400;
/// Each chunk belongs to one thread (chunk number modulo THREADS), so every block is
/// shared by all threads (they race to allocate it) while each byte has one writer.
const CHUNK: u64 = 64 * 1024;

/// One thread's random reads (checked against what it wrote), unaligned buffered writes,
/// aligned O_DIRECT writes and fsyncs on its own chunks; returns the final bytes of each
/// chunk it changed.
fn worker(disk: &Path, initial: &[u8], thread: usize, seed: u64) -> HashMap<u64, Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let buffered = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .unwrap();
    let direct = open_direct(disk);
    let chunks = initial.len() as u64 / CHUNK;
    let mut mine: HashMap<u64, Vec<u8>> = HashMap::new();
    for op in 0..OPS_PER_THREAD {
        let chunk = rng.random_range(0..chunks / THREADS as u64) * THREADS as u64 + thread as u64;
        let base = chunk * CHUNK;
        let content = mine
            .entry(chunk)
            .or_insert_with(|| initial[base as usize..(base + CHUNK) as usize].to_vec());
        match rng.random_range(0..100) {
            0..45 => {
                let at = rng.random_range(0..CHUNK as usize);
                let len = rng.random_range(1..=(CHUNK as usize - at).min(20_000));
                let data = mount::pattern(seed ^ ((op as u64) << 20), len);
                buffered.write_all_at(&data, base + at as u64).unwrap();
                content[at..at + len].copy_from_slice(&data);
            }
            45..65 => {
                let pages = CHUNK as usize / PAGE;
                let first = rng.random_range(0..pages);
                let count = rng.random_range(1..=(pages - first).min(8));
                let data = mount::pattern(seed ^ ((op as u64) << 24), count * PAGE);
                write_direct(&direct, base + (first * PAGE) as u64, &data);
                content[first * PAGE..(first + count) * PAGE].copy_from_slice(&data);
            }
            65..97 => {
                let pages = CHUNK as usize / PAGE;
                let first = rng.random_range(0..pages);
                let count = rng.random_range(1..=pages - first);
                let got = read_direct(&direct, base + (first * PAGE) as u64, count * PAGE);
                assert!(
                    got == content[first * PAGE..(first + count) * PAGE],
                    "thread {thread}: chunk {chunk} pages {first}..{} read back wrong",
                    first + count
                );
            }
            _ => buffered.sync_data().unwrap(),
        }
    }
    mine
}

fn many_threads_match_the_model(qemu_format: &str, options: &str, block: u64) {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let image =
        mount::qemu_image_with_patterns(dir.path(), "image", qemu_format, options, size, block);
    let reference = dir.path().join("reference.raw");
    mount::reference_copy(qemu_format, &image, &reference);
    let initial = Arc::new(std::fs::read(&reference).unwrap());

    let mount = Mount::new(&image, &["threads=8"]);
    assert_eq!(
        std::fs::metadata(mount.disk()).unwrap().len(),
        initial.len() as u64,
        "disk size"
    );
    let results: Vec<HashMap<u64, Vec<u8>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (disk, initial) = (mount.disk(), initial.clone());
                scope.spawn(move || worker(&disk, &initial, t, 1000 + t as u64))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    File::open(mount.disk()).unwrap().sync_all().unwrap();
    mount.unmount();

    let mut model = initial.to_vec();
    let mut changed = 0;
    for (chunk, content) in results.iter().flatten() {
        let at = (chunk * CHUNK) as usize;
        model[at..at + CHUNK as usize].copy_from_slice(content);
        changed += 1;
    }
    assert!(changed > THREADS * 10, "only {changed} chunks touched");
    std::fs::write(&reference, &model).unwrap();
    mount::assert_qemu_identical(qemu_format, &image, &reference);
    common::qemu_check_clean(qemu_format, &image);
}

#[test]
fn many_threads_on_a_dynamic_vhdx_match_the_model() {
    if !mount::fuse_available() {
        return;
    }
    // 1 MiB blocks: 64 of them, all shared by every thread.
    many_threads_match_the_model("vhdx", "block_size=1M", MIB);
}

#[test]
fn many_threads_on_a_dynamic_vhd_match_the_model() {
    if !mount::fuse_available() {
        return;
    }
    many_threads_match_the_model("vpc", "subformat=dynamic", 2 * MIB);
}

//! [`DiskFs`]: what the mount holds and how each request on it is answered, as plain
//! methods that need no mount.

use super::partitions::{PartitionFiles, PartitionSet};
use super::{DISK_FILE_NAME, DISK_INO, FsResult, MAX_IO, ROOT_INO, RequestGate};
use crate::blocking_pool::BlockingPool;
use crate::disk::{Allocation, VirtualDisk};
use crate::error::Error;
use crate::storage;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `SEEK_DATA`/`SEEK_HOLE` ask the driver about this much of the disk at a time, so a
/// search over a huge empty disk never builds one enormous extent list.
const SEEK_WINDOW: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Directory,
    File,
}

/// What `stat` reports for the root directory or `disk.img`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAttr {
    pub ino: u64,
    pub kind: NodeKind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    pub blksize: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    /// Where a listing continues after this entry.
    pub next_offset: u64,
    pub kind: NodeKind,
    pub name: String,
}

/// `statfs` figures: the filesystem is exactly as big as the disk and full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    pub blocks: u64,
    pub block_size: u32,
}

/// How the mount looks: owner, permission bits (write bits are dropped when the disk is
/// read-only), the disk file's name and whether partition files stand beside it.
#[derive(Debug, Clone)]
pub struct View {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    pub file_name: String,
    pub partitions: PartitionFiles,
}

impl View {
    /// `disk.img` and its partitions, rw-r--r--, owned by `uid`/`gid`.
    pub fn owned_by(uid: u32, gid: u32) -> View {
        View {
            uid,
            gid,
            file_mode: 0o644,
            dir_mode: 0o755,
            file_name: DISK_FILE_NAME.to_string(),
            partitions: PartitionFiles::Auto,
        }
    }
}

/// Says why the image file can no longer be trusted to keep data, if it cannot.
pub type ImageCheck = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What the kernel must forget because the bytes behind it changed through another file
/// (`disk.img` and a partition file show the same bytes) or the partition table changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// The root directory's entry of this name.
    Entry { name: String },
    /// Cached pages of a file from `offset`, `len` bytes (0: to its end, and its
    /// attributes too).
    Pages { ino: u64, offset: u64, len: u64 },
}

/// Passes invalidations to the kernel. It must not wait for the kernel: the kernel may be
/// waiting for the request that sends them.
pub type CacheInvalidator = Box<dyn Fn(Invalidation) + Send + Sync>;

/// The bytes of the disk one file shows.
#[derive(Debug, Clone, Copy)]
struct Window {
    ino: u64,
    start: u64,
    len: u64,
}

impl Window {
    fn disk_range(&self, offset: u64, len: u64) -> Range<u64> {
        self.start + offset..self.start + offset + len
    }
}

pub struct DiskFs {
    disk: Arc<dyn VirtualDisk>,
    view: View,
    gate: Arc<RequestGate>,
    /// Asked before a flush is acknowledged, so that no flush claims durability for
    /// writes that went into a file nobody can reach any more.
    image_check: Option<ImageCheck>,
    /// Nanoseconds since the epoch of the last write or discard.
    mtime_ns: AtomicU64,
    /// Set by every change after it reached the file and before it is acknowledged,
    /// cleared by the flush that covers it:
    /// closing a file that only read (every `close` is a flush) then costs no sync.
    unflushed: AtomicBool,
    /// Serves the reads that must wait for the disk (see [`DiskFs::read_if_cached`]).
    waiting_reads: BlockingPool,
    /// Held by a flush from clearing `unflushed` until the disk's flush has returned: a
    /// second fsync finding the mark already cleared must wait for the flush that cleared
    /// it, since the changes it promises durable are in that flush. Writers never take it.
    flushing: Mutex<()>,
    /// `None` with `partitions=off`.
    partitions: Option<RwLock<PartitionSet>>,
    /// Lets one re-read of the table run at a time, so the last one wins.
    rereading: Mutex<()>,
    /// How many times each file is open: only open files can hold pages that another
    /// file's change makes stale (every open starts from an empty page cache).
    open_files: Mutex<HashMap<u64, u32>>,
    invalidator: Option<CacheInvalidator>,
    /// Set when INIT is to ask for FUSE over io_uring; true once the kernel agreed.
    io_uring: Option<Arc<AtomicBool>>,
}

impl DiskFs {
    /// `mtime` is what `disk.img` reports until the first change (the image's own).
    pub fn new(disk: Arc<dyn VirtualDisk>, view: View, mtime: SystemTime) -> Self {
        let partitions = (view.partitions != PartitionFiles::Off)
            .then(|| RwLock::new(PartitionSet::read(disk.as_ref())));
        DiskFs {
            disk,
            view,
            gate: Arc::default(),
            image_check: None,
            mtime_ns: AtomicU64::new(nanos_since_epoch(mtime)),
            unflushed: AtomicBool::new(false),
            waiting_reads: BlockingPool::default(),
            flushing: Mutex::new(()),
            partitions,
            rereading: Mutex::new(()),
            open_files: Mutex::default(),
            invalidator: None,
            io_uring: None,
        }
    }

    /// Makes INIT ask for FUSE over io_uring where the kernel offers it; the flag returned
    /// tells whether the kernel agreed, once the session is set up.
    pub fn ask_for_io_uring(&mut self) -> Arc<AtomicBool> {
        self.io_uring.get_or_insert_default().clone()
    }

    pub(super) fn io_uring_request(&self) -> Option<&AtomicBool> {
        self.io_uring.as_deref()
    }

    pub fn set_invalidator(&mut self, invalidator: CacheInvalidator) {
        self.invalidator = Some(invalidator);
    }

    /// The names of the partition files, ascending by number.
    pub fn partition_file_names(&self) -> Vec<String> {
        self.partitions.as_ref().map_or_else(Vec::new, |p| {
            p.read().files.iter().map(|f| f.name.clone()).collect()
        })
    }

    pub fn gate(&self) -> Arc<RequestGate> {
        self.gate.clone()
    }

    pub fn set_image_check(&mut self, check: ImageCheck) {
        self.image_check = Some(check);
    }

    fn read_only(&self) -> bool {
        self.disk.is_read_only()
    }

    pub fn getattr(&self, ino: u64) -> FsResult<NodeAttr> {
        let mtime = UNIX_EPOCH + Duration::from_nanos(self.mtime_ns.load(Ordering::Relaxed));
        let (kind, size, mode, nlink) = match ino {
            ROOT_INO => (NodeKind::Directory, 0, self.view.dir_mode, 2),
            _ => (
                NodeKind::File,
                self.window(ino)?.len,
                self.view.file_mode,
                1,
            ),
        };
        let perm = if self.read_only() {
            mode & !0o222
        } else {
            mode
        };
        Ok(NodeAttr {
            ino,
            kind,
            size,
            perm,
            nlink,
            uid: self.view.uid,
            gid: self.view.gid,
            mtime,
            blksize: self.disk.physical_sector_size().max(4096),
        })
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<NodeAttr> {
        if parent != ROOT_INO {
            self.getattr(parent)?;
            return Err(libc::ENOTDIR);
        }
        let name = name.to_str().ok_or(libc::ENOENT)?;
        if name == self.view.file_name && self.shows_disk_file() {
            return self.getattr(DISK_INO);
        }
        let ino = self
            .partitions
            .as_ref()
            .and_then(|p| p.read().by_name(name).map(|f| f.ino()))
            .ok_or(libc::ENOENT)?;
        self.getattr(ino)
    }

    /// Entries of the root directory from listing position `offset` on.
    pub fn readdir(&self, ino: u64, offset: u64) -> FsResult<Vec<DirEntry>> {
        if ino != ROOT_INO {
            self.getattr(ino)?;
            return Err(libc::ENOTDIR);
        }
        let mut all = vec![
            (ROOT_INO, NodeKind::Directory, ".".to_string()),
            (ROOT_INO, NodeKind::Directory, "..".to_string()),
        ];
        if self.shows_disk_file() {
            all.push((DISK_INO, NodeKind::File, self.view.file_name.clone()));
        }
        if let Some(partitions) = &self.partitions {
            let files = &partitions.read().files;
            all.extend(
                files
                    .iter()
                    .map(|f| (f.ino(), NodeKind::File, f.name.clone())),
            );
        }
        Ok(all
            .into_iter()
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .map(|(i, (ino, kind, name))| DirEntry {
                ino,
                next_offset: i as u64 + 1,
                kind,
                name,
            })
            .collect())
    }

    pub fn open(&self, ino: u64, for_writing: bool) -> FsResult<()> {
        self.getattr(ino)?;
        if for_writing && ino == ROOT_INO {
            return Err(libc::EISDIR);
        }
        if for_writing && self.read_only() {
            return Err(libc::EROFS);
        }
        if ino != ROOT_INO {
            *self.open_files.lock().entry(ino).or_default() += 1;
        }
        Ok(())
    }

    /// The last use of an open file ended.
    pub fn release(&self, ino: u64) {
        let mut open = self.open_files.lock();
        if let Some(count) = open.get_mut(&ino) {
            *count -= 1;
            if *count == 0 {
                open.remove(&ino);
            }
        }
    }

    /// A size change is refused unless it keeps the size (the disk cannot grow or shrink);
    /// so are ownership and mode changes. Time updates are ignored.
    pub fn setattr(
        &self,
        ino: u64,
        size: Option<u64>,
        changes_owner_or_mode: bool,
    ) -> FsResult<NodeAttr> {
        let attr = self.getattr(ino)?;
        if changes_owner_or_mode {
            return Err(libc::EPERM);
        }
        if let Some(size) = size {
            if ino == ROOT_INO {
                return Err(libc::EISDIR);
            }
            if self.read_only() {
                return Err(libc::EROFS);
            }
            if size != attr.size {
                return Err(libc::EPERM);
            }
        }
        Ok(attr)
    }

    /// The errno for any attempt to create, link, rename or remove a directory entry.
    pub fn refuse_namespace_change(&self) -> i32 {
        if self.read_only() {
            libc::EROFS
        } else {
            libc::EPERM
        }
    }

    pub fn read(&self, ino: u64, offset: u64, len: u32) -> FsResult<Vec<u8>> {
        let window = self.window(ino)?;
        read_waiting(self.disk.as_ref(), &self.gate, window, offset, len)
    }

    /// The read if the page cache holds everything it needs (image data and, for a
    /// differencing disk, its parents'), or `None` if it would have to wait for the disk.
    pub fn read_if_cached(&self, ino: u64, offset: u64, len: u32) -> FsResult<Option<Vec<u8>>> {
        let window = self.window(ino)?;
        match read_disk(
            self.disk.as_ref(),
            &self.gate,
            window,
            offset,
            len,
            Waiting::NotAllowed,
        )? {
            Read::Done(data) => Ok(Some(data)),
            Read::MustWait => Ok(None),
        }
    }

    /// Runs a read that [`DiskFs::read_if_cached`] could not serve from the page cache on
    /// a thread that may wait for the disk, and hands its result to `done` there.
    pub(super) fn read_on_waiting_thread(
        &self,
        ino: u64,
        offset: u64,
        len: u32,
        done: impl FnOnce(FsResult<Vec<u8>>) + Send + 'static,
    ) {
        let window = match self.window(ino) {
            Ok(window) => window,
            Err(e) => return done(Err(e)),
        };
        let (disk, gate) = (self.disk.clone(), self.gate.clone());
        self.waiting_reads
            .submit(move || done(read_waiting(disk.as_ref(), &gate, window, offset, len)));
    }

    /// Writes what fits inside the file and returns how much that was.
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let window = self.window(ino)?;
        if self.read_only() {
            return Err(libc::EROFS);
        }
        if data.is_empty() {
            return Ok(0);
        }
        let _admitted = self.gate.enter()?;
        if offset >= window.len {
            return Err(libc::ENOSPC);
        }
        let fits = (window.len - offset).min(data.len() as u64) as usize;
        let written = u32::try_from(fits).map_err(|_| libc::EINVAL)?;
        let range = window.disk_range(offset, fits as u64);
        self.change("write", window, &range, || {
            self.disk.write_at(&data[..fits], range.start)
        })?;
        Ok(written)
    }

    pub fn flush(&self, ino: u64) -> FsResult<()> {
        self.getattr(ino)?;
        if ino == ROOT_INO {
            return Ok(());
        }
        let _admitted = self.gate.enter()?;
        let _one_flush_at_a_time = self.flushing.lock();
        if !self.unflushed.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(Err(why)) = self.image_check.as_ref().map(|check| check()) {
            self.unflushed.store(true, Ordering::SeqCst);
            log::error!("flush refused: {why}");
            self.gate.image_lost();
            return Err(libc::EIO);
        }
        self.disk.flush().map_err(|e| {
            // The changes are still not durable: the next flush must try again.
            self.unflushed.store(true, Ordering::SeqCst);
            log::error!("flush failed: {e}");
            e.errno()
        })
    }

    /// Punching a hole or zeroing a range discards it (it reads as zeros afterwards);
    /// the part past the end of the disk is ignored, since the disk cannot grow.
    /// Preallocation is not offered: a dynamic image cannot promise space ahead.
    pub fn fallocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        let window = self.window(ino)?;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        const ZERO_KEEP: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if !matches!(mode, PUNCH | ZERO | ZERO_KEEP) {
            return Err(libc::EOPNOTSUPP);
        }
        if self.read_only() {
            return Err(libc::EROFS);
        }
        let end = offset.checked_add(len).ok_or(libc::EFBIG)?;
        if mode == ZERO && end > window.len {
            return Err(libc::ENOSPC);
        }
        let end = end.min(window.len);
        if offset >= end {
            return Ok(());
        }
        let _admitted = self.gate.enter()?;
        let range = window.disk_range(offset, end - offset);
        self.change("discard", window, &range, || {
            self.disk.discard(range.start, range.end - range.start)
        })
    }

    /// `SEEK_DATA` and `SEEK_HOLE`, from the driver's allocation map: ranges that read as
    /// zeros without data behind them are holes.
    pub fn seek(&self, ino: u64, offset: i64, whence: i32) -> FsResult<i64> {
        let window = self.window(ino)?;
        let want = match whence {
            libc::SEEK_DATA => Allocation::Data,
            libc::SEEK_HOLE => Allocation::Zero,
            _ => return Err(libc::EINVAL),
        };
        let size = window.len;
        let start = u64::try_from(offset).map_err(|_| libc::ENXIO)?;
        if start >= size {
            return Err(libc::ENXIO);
        }
        let _admitted = self.gate.enter()?;
        let mut pos = start;
        while pos < size {
            let len = SEEK_WINDOW.min(size - pos);
            let at = window.start + pos;
            let extents = self
                .disk
                .allocation(at, len)
                .map_err(|e| failed("allocation lookup", at, len, &e))?;
            if let Some(found) = extents.iter().find(|e| e.state == want) {
                let found = found.offset.max(at) - window.start;
                return i64::try_from(found).map_err(|_| libc::EOVERFLOW);
            }
            pos += len;
        }
        match want {
            Allocation::Data => Err(libc::ENXIO),
            // The end of a file counts as a hole.
            Allocation::Zero => i64::try_from(size).map_err(|_| libc::EOVERFLOW),
        }
    }

    pub fn statfs(&self) -> FsStats {
        let block_size = self.disk.physical_sector_size().max(4096);
        FsStats {
            blocks: self.disk.size().div_ceil(u64::from(block_size)),
            block_size,
        }
    }

    fn shows_disk_file(&self) -> bool {
        self.view.partitions != PartitionFiles::Only
    }

    /// The bytes of the disk a file shows, as the partition table says now.
    fn window(&self, ino: u64) -> FsResult<Window> {
        match ino {
            ROOT_INO => Err(libc::EISDIR),
            DISK_INO if self.shows_disk_file() => Ok(Window {
                ino,
                start: 0,
                len: self.disk.size(),
            }),
            _ => {
                let partitions = self.partitions.as_ref().ok_or(libc::ENOENT)?.read();
                let file = partitions.by_ino(ino).ok_or(libc::ENOENT)?;
                Ok(Window {
                    ino,
                    start: file.start,
                    len: file.len,
                })
            }
        }
    }

    /// Runs a change to the disk and marks the image as needing a flush once the change
    /// has reached the file, before it is acknowledged. Marking it earlier would let a
    /// concurrent flush clear the mark while the change is still in flight, and a later
    /// fsync would then skip the sync the change needs. A failed change is marked too: it
    /// may have reached the file in part.
    ///
    /// The other files showing the changed bytes then drop what they cached of them, and
    /// a change where the partition table lives reads the table again.
    fn change(
        &self,
        what: &str,
        through: Window,
        range: &Range<u64>,
        op: impl FnOnce() -> Result<(), Error>,
    ) -> FsResult<()> {
        let result = op();
        self.unflushed.store(true, Ordering::SeqCst);
        if self.partitions.is_some() {
            self.invalidate_others(through, range);
        }
        result.map_err(|e| failed(what, range.start, range.end - range.start, &e))?;
        self.mtime_ns
            .store(nanos_since_epoch(SystemTime::now()), Ordering::Relaxed);
        if let Some(partitions) = &self.partitions
            && partitions.read().holds_table_in(range)
        {
            self.reread_partition_table(partitions);
        }
        Ok(())
    }

    /// Tells the kernel to drop the pages of `range` that open files other than the one
    /// changed cached, since the kernel does not know they show the same bytes.
    fn invalidate_others(&self, through: Window, range: &Range<u64>) {
        let Some(invalidate) = &self.invalidator else {
            return;
        };
        let open: Vec<u64> = self
            .open_files
            .lock()
            .keys()
            .copied()
            .filter(|&ino| ino != through.ino)
            .collect();
        for ino in open {
            let Ok(other) = self.window(ino) else {
                continue;
            };
            let start = range.start.max(other.start);
            let end = range.end.min(other.start + other.len);
            if start < end {
                invalidate(Invalidation::Pages {
                    ino,
                    offset: start - other.start,
                    len: end - start,
                });
            }
        }
    }

    /// Reads the table again and, where the files it describes changed, makes the kernel
    /// forget their names and what it cached of them.
    fn reread_partition_table(&self, partitions: &RwLock<PartitionSet>) {
        let _one_at_a_time = self.rereading.lock();
        let newer = PartitionSet::read(self.disk.as_ref());
        let mut current = partitions.write();
        let changed: Vec<_> = current
            .changed(&newer)
            .into_iter()
            .map(|f| (f.ino(), f.name.clone()))
            .collect();
        if changed.is_empty() {
            return;
        }
        *current = newer;
        drop(current);
        log::info!(
            "partition table changed; partition files now: {}",
            self.partition_file_names().join(", ")
        );
        if let Some(invalidate) = &self.invalidator {
            for (ino, name) in changed {
                invalidate(Invalidation::Entry { name });
                invalidate(Invalidation::Pages {
                    ino,
                    offset: 0,
                    len: 0,
                });
            }
        }
    }
}

fn nanos_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Waiting {
    Allowed,
    NotAllowed,
}

enum Read {
    Done(Vec<u8>),
    MustWait,
}

/// Reads `len` bytes at `offset`, fewer at the end of the disk. With
/// `Waiting::NotAllowed` it gives up with `Read::MustWait` at the first piece that is not
/// in the page cache.
fn read_disk(
    disk: &dyn VirtualDisk,
    gate: &RequestGate,
    window: Window,
    offset: u64,
    len: u32,
    waiting: Waiting,
) -> FsResult<Read> {
    let _admitted = gate.enter()?;
    let size = window.len;
    if offset >= size {
        return Ok(Read::Done(Vec::new()));
    }
    // The kernel never asks for more than it negotiated; anything larger is refused
    // rather than answered short, which it would take as end of file.
    if len > MAX_IO {
        log::error!("read of {len} bytes at offset {offset} exceeds the {MAX_IO}-byte limit");
        return Err(libc::EINVAL);
    }
    let n = (size - offset).min(u64::from(len));
    let mut buf = vec![0u8; n as usize];
    let at = window.start + offset;
    let read = match waiting {
        Waiting::Allowed => disk.read_at(&mut buf, at),
        Waiting::NotAllowed => storage::cached_reads_only(|| disk.read_at(&mut buf, at)),
    };
    match read {
        Ok(()) => Ok(Read::Done(buf)),
        Err(e) if waiting == Waiting::NotAllowed && e.errno() == libc::EAGAIN => Ok(Read::MustWait),
        Err(e) => Err(failed("read", at, n, &e)),
    }
}

fn read_waiting(
    disk: &dyn VirtualDisk,
    gate: &RequestGate,
    window: Window,
    offset: u64,
    len: u32,
) -> FsResult<Vec<u8>> {
    match read_disk(disk, gate, window, offset, len, Waiting::Allowed)? {
        Read::Done(data) => Ok(data),
        Read::MustWait => unreachable!("a read allowed to wait never asks to"),
    }
}

/// Logs a driver failure with the request it broke and returns the errno for the caller.
fn failed(op: &str, offset: u64, len: u64, err: &Error) -> i32 {
    log::error!("{op} of {len} bytes at offset {offset} failed: {err}");
    err.errno()
}

//! [`DiskFs`]: what the mount holds and how each request on it is answered, as plain
//! methods that need no mount.

use super::{DISK_FILE_NAME, DISK_INO, FsResult, MAX_IO, ROOT_INO, RequestGate};
use crate::blocking_pool::BlockingPool;
use crate::disk::{Allocation, VirtualDisk};
use crate::error::Error;
use crate::storage;
use std::ffi::OsStr;
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
pub struct DirEntry<'a> {
    pub ino: u64,
    /// Where a listing continues after this entry.
    pub next_offset: u64,
    pub kind: NodeKind,
    pub name: &'a str,
}

/// `statfs` figures: the filesystem is exactly as big as the disk and full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    pub blocks: u64,
    pub block_size: u32,
}

/// How the mount looks: owner, permission bits (write bits are dropped when the disk is
/// read-only) and the file's name.
#[derive(Debug, Clone)]
pub struct View {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    pub file_name: String,
}

impl View {
    /// `disk.img`, rw-r--r--, owned by `uid`/`gid`.
    pub fn owned_by(uid: u32, gid: u32) -> View {
        View {
            uid,
            gid,
            file_mode: 0o644,
            dir_mode: 0o755,
            file_name: DISK_FILE_NAME.to_string(),
        }
    }
}

/// Says why the image file can no longer be trusted to keep data, if it cannot.
pub type ImageCheck = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

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
}

impl DiskFs {
    /// `mtime` is what `disk.img` reports until the first change (the image's own).
    pub fn new(disk: Arc<dyn VirtualDisk>, view: View, mtime: SystemTime) -> Self {
        DiskFs {
            disk,
            view,
            gate: Arc::default(),
            image_check: None,
            mtime_ns: AtomicU64::new(nanos_since_epoch(mtime)),
            unflushed: AtomicBool::new(false),
            waiting_reads: BlockingPool::default(),
        }
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
            DISK_INO => (NodeKind::File, self.disk.size(), self.view.file_mode, 1),
            _ => return Err(libc::ENOENT),
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
        match parent {
            ROOT_INO if name == self.view.file_name.as_str() => self.getattr(DISK_INO),
            ROOT_INO => Err(libc::ENOENT),
            DISK_INO => Err(libc::ENOTDIR),
            _ => Err(libc::ENOENT),
        }
    }

    /// Entries of the root directory from listing position `offset` on.
    pub fn readdir(&self, ino: u64, offset: u64) -> FsResult<Vec<DirEntry<'_>>> {
        match ino {
            ROOT_INO => {}
            DISK_INO => return Err(libc::ENOTDIR),
            _ => return Err(libc::ENOENT),
        }
        let all = [
            (ROOT_INO, NodeKind::Directory, "."),
            (ROOT_INO, NodeKind::Directory, ".."),
            (DISK_INO, NodeKind::File, self.view.file_name.as_str()),
        ];
        Ok(all
            .iter()
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .map(|(i, &(ino, kind, name))| DirEntry {
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
        Ok(())
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
            if ino != DISK_INO {
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
        self.expect_disk(ino)?;
        read_waiting(self.disk.as_ref(), &self.gate, offset, len)
    }

    /// The read if the page cache holds everything it needs (image data and, for a
    /// differencing disk, its parents'), or `None` if it would have to wait for the disk.
    pub fn read_if_cached(&self, ino: u64, offset: u64, len: u32) -> FsResult<Option<Vec<u8>>> {
        self.expect_disk(ino)?;
        match read_disk(
            self.disk.as_ref(),
            &self.gate,
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
        offset: u64,
        len: u32,
        done: impl FnOnce(FsResult<Vec<u8>>) + Send + 'static,
    ) {
        let (disk, gate) = (self.disk.clone(), self.gate.clone());
        self.waiting_reads
            .submit(move || done(read_waiting(disk.as_ref(), &gate, offset, len)));
    }

    /// Writes what fits inside the disk and returns how much that was.
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.expect_disk(ino)?;
        if self.read_only() {
            return Err(libc::EROFS);
        }
        if data.is_empty() {
            return Ok(0);
        }
        let _admitted = self.gate.enter()?;
        let size = self.disk.size();
        if offset >= size {
            return Err(libc::ENOSPC);
        }
        let fits = (size - offset).min(data.len() as u64) as usize;
        let written = u32::try_from(fits).map_err(|_| libc::EINVAL)?;
        self.change("write", offset, fits as u64, || {
            self.disk.write_at(&data[..fits], offset)
        })?;
        Ok(written)
    }

    pub fn flush(&self, ino: u64) -> FsResult<()> {
        self.getattr(ino)?;
        if ino != DISK_INO {
            return Ok(());
        }
        let _admitted = self.gate.enter()?;
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
        self.expect_disk(ino)?;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        const ZERO_KEEP: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if !matches!(mode, PUNCH | ZERO | ZERO_KEEP) {
            return Err(libc::EOPNOTSUPP);
        }
        if self.read_only() {
            return Err(libc::EROFS);
        }
        let size = self.disk.size();
        let end = offset.checked_add(len).ok_or(libc::EFBIG)?;
        if mode == ZERO && end > size {
            return Err(libc::ENOSPC);
        }
        let end = end.min(size);
        if offset >= end {
            return Ok(());
        }
        let _admitted = self.gate.enter()?;
        self.change("discard", offset, end - offset, || {
            self.disk.discard(offset, end - offset)
        })
    }

    /// `SEEK_DATA` and `SEEK_HOLE`, from the driver's allocation map: ranges that read as
    /// zeros without data behind them are holes.
    pub fn seek(&self, ino: u64, offset: i64, whence: i32) -> FsResult<i64> {
        self.expect_disk(ino)?;
        let want = match whence {
            libc::SEEK_DATA => Allocation::Data,
            libc::SEEK_HOLE => Allocation::Zero,
            _ => return Err(libc::EINVAL),
        };
        let size = self.disk.size();
        let start = u64::try_from(offset).map_err(|_| libc::ENXIO)?;
        if start >= size {
            return Err(libc::ENXIO);
        }
        let _admitted = self.gate.enter()?;
        let mut pos = start;
        while pos < size {
            let len = SEEK_WINDOW.min(size - pos);
            let extents = self
                .disk
                .allocation(pos, len)
                .map_err(|e| failed("allocation lookup", pos, len, &e))?;
            if let Some(found) = extents.iter().find(|e| e.state == want) {
                return i64::try_from(found.offset.max(start)).map_err(|_| libc::EOVERFLOW);
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
        let block_size = self.getattr(DISK_INO).map_or(4096, |a| a.blksize);
        FsStats {
            blocks: self.disk.size().div_ceil(u64::from(block_size)),
            block_size,
        }
    }

    fn expect_disk(&self, ino: u64) -> FsResult<()> {
        match ino {
            DISK_INO => Ok(()),
            ROOT_INO => Err(libc::EISDIR),
            _ => Err(libc::ENOENT),
        }
    }

    /// Runs a change to the disk and marks the image as needing a flush once the change
    /// has reached the file, before it is acknowledged. Marking it earlier would let a
    /// concurrent flush clear the mark while the change is still in flight, and a later
    /// fsync would then skip the sync the change needs. A failed change is marked too: it
    /// may have reached the file in part.
    fn change(
        &self,
        what: &str,
        offset: u64,
        len: u64,
        op: impl FnOnce() -> Result<(), Error>,
    ) -> FsResult<()> {
        let result = op();
        self.unflushed.store(true, Ordering::SeqCst);
        result.map_err(|e| failed(what, offset, len, &e))?;
        self.mtime_ns
            .store(nanos_since_epoch(SystemTime::now()), Ordering::Relaxed);
        Ok(())
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
    offset: u64,
    len: u32,
    waiting: Waiting,
) -> FsResult<Read> {
    let _admitted = gate.enter()?;
    let size = disk.size();
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
    let read = match waiting {
        Waiting::Allowed => disk.read_at(&mut buf, offset),
        Waiting::NotAllowed => storage::cached_reads_only(|| disk.read_at(&mut buf, offset)),
    };
    match read {
        Ok(()) => Ok(Read::Done(buf)),
        Err(e) if waiting == Waiting::NotAllowed && e.errno() == libc::EAGAIN => Ok(Read::MustWait),
        Err(e) => Err(failed("read", offset, n, &e)),
    }
}

fn read_waiting(
    disk: &dyn VirtualDisk,
    gate: &RequestGate,
    offset: u64,
    len: u32,
) -> FsResult<Vec<u8>> {
    match read_disk(disk, gate, offset, len, Waiting::Allowed)? {
        Read::Done(data) => Ok(data),
        Read::MustWait => unreachable!("a read allowed to wait never asks to"),
    }
}

/// Logs a driver failure with the request it broke and returns the errno for the caller.
fn failed(op: &str, offset: u64, len: u64, err: &Error) -> i32 {
    log::error!("{op} of {len} bytes at offset {offset} failed: {err}");
    err.errno()
}

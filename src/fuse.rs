//! The mounted view of a disk: a directory holding one regular file, `disk.img`, whose
//! bytes are the virtual disk's.
//!
//! [`DiskFs`] holds every decision (inodes, attributes, range clamping, errno choices) as
//! plain methods that tests call without a mount; its [`fuser::Filesystem`] impl only
//! translates requests and replies.
//!
//! `disk.img` behaves like a block device wherever a file and a block device differ:
//! - its size is fixed: a write that starts at or past the end fails with `ENOSPC`, and a
//!   write straddling the end writes what fits and reports the shorter count (what `pwrite`
//!   on a block device does);
//! - truncating it to any other size fails with `EPERM` (so `dd` needs `conv=notrunc`);
//! - nothing else can be created, renamed or removed (`EPERM`; `EROFS` when read-only);
//! - reads past the end return short or empty, as for any file.
//!
//! `fsync` and every `close` (FUSE `flush`) make completed writes durable in the image.
//!
//! Every request that reaches the disk passes a [`RequestGate`]: stopping the service
//! closes it and waits for the requests already inside, so the disk can be closed while
//! the kernel still sends requests; they then fail with `ENOTCONN`, as they would from
//! a dead mount. An image file that has gone (no name left, or its filesystem
//! unmounted) closes the gate for good with `EIO`.

use crate::blocking_pool::BlockingPool;
use crate::disk::{Allocation, VirtualDisk};
use crate::error::Error;
use crate::storage;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use parking_lot::{RwLock, RwLockReadGuard};
use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const ROOT_INO: u64 = 1;
pub const DISK_INO: u64 = 2;
/// The file's name unless the mount names it otherwise.
pub const DISK_FILE_NAME: &str = "disk.img";

/// Largest read or write the kernel sends in one request.
pub const MAX_IO: u32 = 1 << 20;

/// `SEEK_DATA`/`SEEK_HOLE` ask the driver about this much of the disk at a time, so a
/// search over a huge empty disk never builds one enormous extent list.
const SEEK_WINDOW: u64 = 1 << 30;

/// Attributes never change behind the kernel's back (only this daemon writes the image),
/// so they may be cached for long.
const ATTR_TTL: Duration = Duration::from_secs(3600);

/// An errno value, as every filesystem request fails with.
pub type FsResult<T> = Result<T, i32>;

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

const SERVING: u8 = 0;
const STOPPED: u8 = 1;
const IMAGE_LOST: u8 = 2;

/// Admits requests to the disk while the service runs; see the module documentation.
#[derive(Default)]
pub struct RequestGate {
    /// Held shared by each request for as long as it uses the disk.
    in_flight: RwLock<()>,
    state: AtomicU8,
}

impl RequestGate {
    fn enter(&self) -> FsResult<RwLockReadGuard<'_, ()>> {
        let guard = self.in_flight.read();
        match self.state.load(Ordering::SeqCst) {
            SERVING => Ok(guard),
            STOPPED => Err(libc::ENOTCONN),
            _ => Err(libc::EIO),
        }
    }

    /// Refuses new requests and returns once those already admitted have finished.
    pub fn stop(&self) {
        self.state.store(STOPPED, Ordering::SeqCst);
        // A request admitted before the store holds the lock until it finishes; one
        // admitted after it sees the new state and leaves at once.
        drop(self.in_flight.write());
    }

    /// Fails every later request with `EIO`: the image they would reach is gone.
    pub fn image_lost(&self) {
        let _ =
            self.state
                .compare_exchange(SERVING, IMAGE_LOST, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn is_image_lost(&self) -> bool {
        self.state.load(Ordering::SeqCst) == IMAGE_LOST
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

fn errno(code: i32) -> Errno {
    Errno::from_i32(code)
}

fn file_attr(a: &NodeAttr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: match a.kind {
            NodeKind::Directory => FileType::Directory,
            NodeKind::File => FileType::RegularFile,
        },
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: a.blksize,
        flags: 0,
    }
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Asynchronous direct I/O and background requests (readahead, asynchronous direct
        // I/O) are held back by the kernel beyond this many in flight. It must cover a
        // loop device's or an application's whole queue, so the worker threads always
        // have requests to serve; the kernel lowers it for unprivileged mounts.
        const MAX_BACKGROUND: u16 = 128;
        // Both are capped by the kernel and by fuser; a smaller limit is fine.
        let _ = config.set_max_write(MAX_IO);
        if let Err(kernel_max) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(kernel_max);
        }
        // Without it the kernel serves each O_DIRECT request (io_submit, a loop device
        // with direct I/O) to completion before the caller may submit the next, so a
        // queue depth of 16 would reach the workers one request at a time.
        if config
            .add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO)
            .is_err()
        {
            log::warn!("the kernel lacks asynchronous direct I/O; O_DIRECT requests run serially");
        }
        // fuser derives the congestion threshold from it (three quarters).
        let _ = config.set_max_background(MAX_BACKGROUND);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match DiskFs::lookup(self, parent.0, name) {
            Ok(a) => reply.entry(&ATTR_TTL, &file_attr(&a), fuser::Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match DiskFs::getattr(self, ino.0) {
            Ok(a) => reply.attr(&ATTR_TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
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
        let owner_or_mode = mode.is_some() || uid.is_some() || gid.is_some();
        match DiskFs::setattr(self, ino.0, size, owner_or_mode) {
            Ok(a) => reply.attr(&ATTR_TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match DiskFs::readdir(self, ino.0, offset) {
            Ok(entries) => {
                for e in entries {
                    let kind = match e.kind {
                        NodeKind::Directory => FileType::Directory,
                        NodeKind::File => FileType::RegularFile,
                    };
                    if reply.add(INodeNo(e.ino), e.next_offset, kind, e.name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let for_writing = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match DiskFs::open(self, ino.0, for_writing) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Cached data is served on this thread; a read that must wait for the disk goes to
        // a thread that may wait, so that reads queued behind it reach the disk together.
        match DiskFs::read_if_cached(self, ino.0, offset, size) {
            Ok(Some(data)) => reply.data(&data),
            Ok(None) => {
                let (disk, gate) = (self.disk.clone(), self.gate.clone());
                self.waiting_reads.submit(move || {
                    match read_waiting(disk.as_ref(), &gate, offset, size) {
                        Ok(data) => reply.data(&data),
                        Err(e) => reply.error(errno(e)),
                    }
                });
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match DiskFs::write(self, ino.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match DiskFs::flush(self, ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match DiskFs::flush(self, ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match DiskFs::getattr(self, ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = DiskFs::statfs(self);
        reply.statfs(s.blocks, 0, 0, 2, 0, s.block_size, 255, s.block_size);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match DiskFs::fallocate(self, ino.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match DiskFs::seek(self, ino.0, offset, whence) {
            Ok(pos) => reply.offset(pos),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(errno(self.refuse_namespace_change()));
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(errno(self.refuse_namespace_change()));
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(errno(self.refuse_namespace_change()));
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(self.refuse_namespace_change()));
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(self.refuse_namespace_change()));
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(errno(self.refuse_namespace_change()));
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(errno(self.refuse_namespace_change()));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(errno(self.refuse_namespace_change()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{Format, OpenOptions};
    use crate::storage::{MemStorage, Storage};

    /// `storage` as a raw disk, through the same probing open a mount uses, told the format.
    fn raw_disk(storage: impl Storage + 'static, read_only: bool) -> Box<dyn VirtualDisk> {
        let options = OpenOptions {
            read_only,
            format: Some(Format::Raw),
            ..Default::default()
        };
        crate::open_storage(Box::new(storage), &options).unwrap()
    }

    fn fs_over(bytes: Vec<u8>, read_only: bool) -> DiskFs {
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
            .map(|e| e.name)
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

    /// A disk whose writes let a flush run while their data is still on its way to the
    /// file, as a concurrent fsync can.
    struct FlushMidWrite {
        inner: Box<dyn VirtualDisk>,
        fs: std::sync::OnceLock<std::sync::Weak<DiskFs>>,
    }

    impl VirtualDisk for FlushMidWrite {
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
            if let Some(fs) = self.fs.get().and_then(std::sync::Weak::upgrade) {
                fs.flush(DISK_INO).unwrap();
            }
            self.inner.write_at(buf, offset)
        }
        fn flush(&self) -> crate::Result<()> {
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
        let disk = Arc::new(FlushMidWrite {
            inner: raw_disk(storage.clone(), false),
            fs: std::sync::OnceLock::new(),
        });
        let fs = Arc::new(DiskFs::new(disk.clone(), View::owned_by(0, 0), UNIX_EPOCH));
        fs.write(DISK_INO, 0, b"a").unwrap();
        disk.fs.set(Arc::downgrade(&fs)).unwrap();
        // The racing flush syncs "a" but cannot cover "b", which reaches the file after it.
        fs.write(DISK_INO, 1, b"b").unwrap();
        assert_eq!(storage.flush_count(), 1);
        fs.flush(DISK_INO).unwrap();
        let durable = storage.power_loss_dropping_unflushed().contents();
        assert_eq!(&durable[..2], b"ab");
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
    fn a_stopped_gate_waits_for_requests_inside_and_refuses_later_ones() {
        let fs = Arc::new(fs_over(vec![0; 4096], false));
        let gate = fs.gate();
        let admitted = gate.enter().unwrap();
        let stopper = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.stop())
        };
        // Until stop has refused new requests its thread may not even have run, and a
        // check would prove nothing.
        while gate.state.load(Ordering::SeqCst) != STOPPED {
            assert!(!stopper.is_finished(), "stop returned without stopping");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Time for a stop that does not wait to return; a stop that waits never does.
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !stopper.is_finished(),
            "stop did not wait for the request inside"
        );
        drop(admitted);
        stopper.join().unwrap();
        assert_eq!(fs.write(DISK_INO, 0, b"x").unwrap_err(), libc::ENOTCONN);
        assert_eq!(fs.read(DISK_INO, 0, 1).unwrap_err(), libc::ENOTCONN);
        assert_eq!(fs.flush(DISK_INO).unwrap_err(), libc::ENOTCONN);
        // Stopping is final: a lost image afterwards changes nothing.
        gate.image_lost();
        assert_eq!(fs.read(DISK_INO, 0, 1).unwrap_err(), libc::ENOTCONN);
        // What needs no disk still answers.
        assert_eq!(fs.getattr(DISK_INO).unwrap().size, 4096);
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
}

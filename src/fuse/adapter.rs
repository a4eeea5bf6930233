//! The [`fuser::Filesystem`] impl of [`DiskFs`]: it translates each kernel request into a
//! call of the method that decides it, and the answer into the reply.

use super::{DiskFs, MAX_IO, NodeAttr, NodeKind};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

/// Attributes never change behind the kernel's back (only this daemon writes the image),
/// so they may be cached for long.
const ATTR_TTL: Duration = Duration::from_secs(3600);

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
        if let Some(agreed) = self.io_uring_request() {
            let offered = config
                .add_capabilities(fuser::InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
            agreed.store(offered, Ordering::Relaxed);
        }
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
                    if reply.add(INodeNo(e.ino), e.next_offset, kind, &e.name) {
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
            Ok(None) => self.read_on_waiting_thread(ino.0, offset, size, move |read| match read {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(e)),
            }),
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

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        DiskFs::release(self, ino.0);
        reply.ok();
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

//! The mounted view of a disk: a directory holding `disk.img`, whose bytes are the
//! virtual disk's, and a file per partition the disk's table describes (`part1.img`, ...),
//! whose bytes are that partition's range of the disk.
//!
//! [`DiskFs`] holds every decision (inodes, attributes, range clamping, errno choices) as
//! plain methods that tests call without a mount; its [`fuser::Filesystem`] impl only
//! translates requests and replies. Requests come through `/dev/fuse` (fuser's session
//! loop) or, where the kernel offers it, through FUSE-over-io_uring queues ([`uring`]),
//! which hand them to the same impl.
//!
//! Each file behaves like a block device wherever a file and a block device differ:
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

mod adapter;
mod fs;
mod gate;
mod partitions;
#[cfg(test)]
mod tests;
pub mod uring;

pub use fs::{
    CacheInvalidator, DirEntry, DiskFs, FsStats, ImageCheck, Invalidation, NodeAttr, NodeKind, View,
};
pub use gate::RequestGate;
pub use partitions::PartitionFiles;

pub const ROOT_INO: u64 = 1;
pub const DISK_INO: u64 = 2;
/// Partition N's file is inode `FIRST_PARTITION_INO + N - 1`, so a file keeps its inode
/// while the table changes around it.
pub const FIRST_PARTITION_INO: u64 = 3;
/// The file's name unless the mount names it otherwise.
pub const DISK_FILE_NAME: &str = "disk.img";

/// Largest read or write the kernel sends in one request.
pub const MAX_IO: u32 = 1 << 20;

/// An errno value, as every filesystem request fails with.
pub type FsResult<T> = Result<T, i32>;

//! vdisk-mount: VHD and VHDX disk images as one flat raw disk.
//!
//! The library works without FUSE: [`open()`] probes an image by its signature, opens it
//! with the chain of parents it needs, and returns a [`VirtualDisk`] that reads and writes
//! the virtual disk's bytes. The FUSE daemon (`fuse`) and the command line are thin layers
//! over it.
//!
//! ```text
//!  fuse::DiskFs ──► /mountpoint/disk.img           (FUSE adapter)
//!        │
//!  dyn VirtualDisk (size, read_at, write_at, flush, allocation, discard)   (disk)
//!        │
//!  chain: open the image, then each parent it names, in a loop   (chain, open)
//!        │
//!  vhd / vhdx / raw drivers: one image file each, as a Layer      (drivers)
//!        │
//!  layer: map a range to file / zeros / parent; one read, map and discard path
//!        │
//!  Storage (pread/pwrite/fdatasync; an in-memory file in tests)   (storage)
//! ```
//!
//! A driver opens one file and describes the parent it needs ([`layer::ParentLink`]);
//! [`chain`] maps the paths it stores to host paths, checks each candidate (a regular
//! image file, not in the chain already, of the child's format, carrying the identity the
//! child expects) and opens it read-only through the same probe and dispatch
//! ([`open::open_layer`]), then hands each child its parent. [`create::create`] makes
//! fixed, dynamic and differencing images of both formats, [`info::image_info`]
//! describes an image and its chain, and [`check::check`] examines every structure of an
//! image and repairs what it can; the `vdisk` command offers them.
//! [`partition::read_partition_table`] reads a disk's MBR or GPT and numbers its
//! partitions as Linux does. [`serve::open_image`] opens an image for a service (the
//! mount, the nbdkit plugin in `nbdkit-vdisk/`) locked as qemu locks images.
//! ARCHITECTURE.md draws the layers.
//!
//! Drivers keep metadata (BAT, headers, footer, log state) in memory under a lock; data
//! I/O to allocated blocks runs outside it. Allocating writes put data on disk and flush
//! it before any metadata points at it, so a crash at any instant leaves an image that
//! opens and holds every write that a flush acknowledged.

mod bit_runs;
mod blocking_pool;
pub mod chain;
pub mod check;
mod claims;
pub mod cli;
pub mod commit;
mod commit_queue;
pub mod compact;
pub mod convert;
pub mod create;
pub mod disk;
pub mod error;
pub mod finding;
pub mod free_space;
pub mod fuse;
pub mod info;
pub mod layer;
pub mod lock;
pub mod map;
pub mod open;
pub mod partition;
pub mod raw;
pub mod relocation;
pub mod resize;
pub mod serve;
pub mod storage;
pub mod vhd;
pub mod vhdx;
pub mod windows_path;

pub use chain::{open, open_storage, open_storage_in};
pub use disk::{Allocation, Extent, Format, OpenOptions, VhdSizeRule, VirtualDisk};
pub use error::{CorruptionKind, Error, ErrorKind, Result};

/// Rewrites every checksum the image in `storage` carries (VHD footers and dynamic header,
/// VHDX headers, region tables and log entries), so a fuzzer's mutations reach the checks
/// beyond them.
#[cfg(feature = "fuzzing")]
pub fn seal_checksums_for_fuzzing(storage: &dyn storage::Storage) {
    vhd::fuzzing::seal_checksums(storage);
    vhdx::fuzzing::seal_checksums(storage);
}

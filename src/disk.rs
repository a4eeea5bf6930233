//! The boundary the rest of the program sees: every image, of any format and with any
//! chain of parents, is served as a [`VirtualDisk`]. Nothing here knows a format.

use crate::error::{Error, ErrorKind, Result};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A virtual disk: a flat array of `size()` bytes, whatever the image format behind it.
///
/// Offsets and lengths are in bytes and need not be sector-aligned; a request must lie
/// inside the disk (`OutOfRange` otherwise). Every method may be called from many threads
/// at once.
pub trait VirtualDisk: Send + Sync {
    fn format(&self) -> Format;
    /// Virtual disk size in bytes.
    fn size(&self) -> u64;
    fn logical_sector_size(&self) -> u32;
    fn physical_sector_size(&self) -> u32;
    fn is_read_only(&self) -> bool;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes every completed write durable in the image file.
    fn flush(&self) -> Result<()>;
    /// How `[offset, offset + len)` is backed, as consecutive extents covering the range.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
    /// The range reads as zeros afterwards; space is released where the format allows.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// The identifier a differencing child records to name this image as its parent
    /// (VHD: the footer's Unique Id); `None` for formats that cannot be parents.
    fn identity(&self) -> Option<[u8; 16]> {
        None
    }
    /// A differencing image's parent and the file it was found in.
    fn parent(&self) -> Option<(&Path, &dyn VirtualDisk)> {
        None
    }
    /// Clean shutdown: flush and leave the image in its final, clean on-disk state.
    /// The disk must not be used afterwards.
    fn close(&self) -> Result<()> {
        self.flush()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Vhd,
    Vhdx,
    Raw,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
            Format::Raw => "raw",
        })
    }
}

impl FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "vhd" | "vpc" => Ok(Format::Vhd),
            "vhdx" => Ok(Format::Vhdx),
            "raw" => Ok(Format::Raw),
            _ => Err(Error::invalid_input(format!(
                "unknown format '{s}' (expected vhd, vhdx or raw)"
            ))),
        }
    }
}

/// Which VHD footer field gives the disk size (FORMATS.md §8.13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VhdSizeRule {
    /// Decided by the creator application, as qemu does.
    #[default]
    Auto,
    /// Cylinders × heads × sectors × 512.
    Chs,
    /// The footer's Current Size field.
    CurrentSize,
}

impl FromStr for VhdSizeRule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(VhdSizeRule::Auto),
            "chs" => Ok(VhdSizeRule::Chs),
            "current_size" | "current-size" => Ok(VhdSizeRule::CurrentSize),
            _ => Err(Error::invalid_input(format!(
                "unknown size rule '{s}' (expected auto, chs or current_size)"
            ))),
        }
    }
}

/// What a discard (TRIM, `fallocate` PUNCH_HOLE) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardMode {
    /// Refused as unsupported: the range keeps its data.
    Ignore,
    /// The range reads as zeros; the image keeps its space (a fixed image stays fully
    /// allocated on the host, as Hyper-V expects).
    Zero,
    /// The range reads as zeros and its space goes back: whole blocks leave the image's
    /// block table where the format allows, the rest becomes holes in the host file.
    Unmap,
}

impl FromStr for DiscardMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ignore" => Ok(DiscardMode::Ignore),
            "zero" => Ok(DiscardMode::Zero),
            "unmap" => Ok(DiscardMode::Unmap),
            _ => Err(Error::invalid_input(format!(
                "unknown discard mode '{s}' (expected ignore, zero or unmap)"
            ))),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    pub vhd_size_rule: VhdSizeRule,
    /// Skip probing and use this format; the only way to open a raw file.
    pub format: Option<Format>,
    /// Where a differencing image's parent is, instead of where the image says (for
    /// images moved apart). Applies to the first parent only; its own parents are found
    /// as it names them.
    pub parent: Option<PathBuf>,
    /// What discards do; `None`: [`DiscardMode::Unmap`] for dynamic and differencing
    /// images, [`DiscardMode::Zero`] for fixed and raw ones.
    pub discard: Option<DiscardMode>,
    /// Open the first parent read-write as well, locked as a read-write mount locks an
    /// image and with `keep_identity`: for merging a differencing image into its parent.
    pub writable_parent: bool,
    /// Writes leave the identity children name this image by (VHDX DataWriteGuid) as it
    /// is: for writing into a parent what its child already shows, which changes nothing
    /// that child reads.
    pub keep_identity: bool,
}

/// How a range of the virtual disk is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Backed by data in the image file.
    Data,
    /// Reads as zeros without data in the image file.
    Zero,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub state: Allocation,
}

/// Appends `[offset, offset + len)` to `extents`, merging it into the last extent when that
/// one ends at `offset` with the same state.
pub fn push_extent(extents: &mut Vec<Extent>, offset: u64, len: u64, state: Allocation) {
    if len == 0 {
        return;
    }
    if let Some(last) = extents.last_mut()
        && last.state == state
        && last.offset + last.len == offset
    {
        last.len += len;
        return;
    }
    extents.push(Extent { offset, len, state });
}

/// Fails with `OutOfRange` unless `[offset, offset + len)` lies inside a disk of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: usize) -> Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::new(ErrorKind::OutOfRange {
            offset,
            len: len as u64,
            size,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_when_adjacent_and_alike() {
        let mut v = Vec::new();
        push_extent(&mut v, 0, 10, Allocation::Zero);
        push_extent(&mut v, 10, 5, Allocation::Zero);
        push_extent(&mut v, 15, 0, Allocation::Data);
        push_extent(&mut v, 15, 5, Allocation::Data);
        assert_eq!(
            v,
            vec![
                Extent {
                    offset: 0,
                    len: 15,
                    state: Allocation::Zero
                },
                Extent {
                    offset: 15,
                    len: 5,
                    state: Allocation::Data
                }
            ]
        );
    }

    #[test]
    fn range_checks_reject_overflow_and_past_end() {
        assert!(check_range(100, 90, 10).is_ok());
        assert!(check_range(100, 91, 10).is_err());
        assert!(check_range(100, u64::MAX, 1).is_err());
    }
}

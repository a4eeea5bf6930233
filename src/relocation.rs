//! What a driver offers for compacting its file offline: the pieces of file space that
//! may move (blocks and, in VHDX, sector bitmap blocks), the space nothing uses, and a
//! crash-safe move. `compact.rs` decides what moves where.

use crate::error::Result;
use crate::free_space::FreeSpace;
use std::ops::Range;

/// A piece of the file that can move as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// The driver's name for it (a BAT index).
    pub id: u64,
    /// Where it is in the file, and its length there.
    pub at: u64,
    pub len: u64,
    /// For a block that may be given back when all its data is zeros: its range of the
    /// virtual disk and where that data is in the file.
    pub releasable: Option<Releasable>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Releasable {
    pub disk_range: Range<u64>,
    pub data_at: u64,
}

pub trait Relocation {
    /// Everything in the file that may move.
    fn units(&self) -> Vec<Unit>;

    /// File space that nothing uses, before the end of the file's data.
    fn free_space(&self) -> FreeSpace;

    /// Where in the free `range` a unit of `len` bytes would go, if it fits.
    fn place(&self, range: Range<u64>, len: u64) -> Option<u64>;

    /// Moves each unit to its new offset (free space, clear of every other unit): data
    /// copied and flushed, then the table entries pointing at it changed and made durable.
    /// The old places are unused once this returns.
    fn relocate(&self, moves: &[(Unit, u64)]) -> Result<()>;

    /// Cuts the file after the last byte any structure or unit uses, keeping it a valid
    /// image at every instant; returns the new file length.
    fn shrink(&self) -> Result<u64>;
}

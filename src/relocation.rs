//! What a driver offers for compacting its file offline: the pieces of file space that
//! may move (blocks and, in VHDX, sector bitmap blocks), the space nothing uses, and a
//! crash-safe move. `compact.rs` decides what moves where.

use crate::error::{IoContext, Result};
use crate::free_space::FreeSpace;
use crate::storage::{self, Storage};
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

/// The first half of every move: each unit copied to its new place, then flushed, so the
/// tables may point there.
pub fn copy_units(storage: &dyn Storage, moves: &[(Unit, u64)]) -> Result<()> {
    let copies: Vec<(u64, u64, u64)> = moves.iter().map(|(u, to)| (u.at, *to, u.len)).collect();
    storage::copy_sparse(storage, &copies).context(|| format!("moving {} blocks", moves.len()))?;
    storage
        .flush()
        .context(|| "flushing moved blocks".to_string())
}

/// The last half: once the tables point at the new places, `free` loses them and gains
/// the old ones.
pub fn account_moves(free: &mut FreeSpace, moves: &[(Unit, u64)]) {
    for (unit, to) in moves {
        free.remove(*to..to + unit.len);
        free.insert(unit.at..unit.at + unit.len);
    }
}

//! What a driver offers for rewriting its file offline: the pieces of file space that
//! may move (blocks and, in VHDX, sector bitmap blocks), the space nothing uses, and a
//! crash-safe move, for `compact.rs` to decide what moves where; room made for a growing
//! structure by moving what is in its way ([`clear`]); and a crash-safe change of the
//! disk's size ([`Resize`]), for `resize.rs`.

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

    /// Takes `len` bytes that nothing uses, placed as [`Relocation::place`] places a unit:
    /// free space where some fits, else past the end of the file, which grows keeping the
    /// image valid at every instant (a VHD's footer moves first). Returns where they start.
    fn reserve(&self, len: u64) -> Result<u64>;

    /// Makes `range` part of the file (growing it as [`Relocation::reserve`] does) and
    /// keeps it from being handed out. Units inside it stay where they are.
    fn claim(&self, range: Range<u64>) -> Result<()>;
}

/// Empties `range` of the file for a structure to grow into: every unit overlapping it
/// moves out, into space [`Relocation::reserve`] finds, with [`Relocation::relocate`]'s
/// crash-safe move, and the range is kept from later use. Returns how many units moved.
pub fn clear(relocation: &dyn Relocation, range: Range<u64>) -> Result<u64> {
    // Claimed first, so no unit is reserved space inside it.
    relocation.claim(range.clone())?;
    let mut moves = Vec::new();
    for unit in relocation.units() {
        if unit.at < range.end && range.start < unit.at + unit.len {
            let to = relocation.reserve(unit.len)?;
            moves.push((unit, to));
        }
    }
    if moves.is_empty() {
        return Ok(0);
    }
    relocation.relocate(&moves)?;
    // The places the units left inside the range became free with the move.
    relocation.claim(range)?;
    Ok(moves.len() as u64)
}

/// What a driver offers for changing its disk's size offline.
pub trait Resize {
    /// The size a disk resized to `size` gets: `size`, or the next larger size the image
    /// can express (a VHD sized by its geometry); an error when the image cannot hold it.
    fn fit_size(&self, size: u64) -> Result<u64>;

    /// Changes the disk's size to `size` (as [`Resize::fit_size`] gave it) in place. A crash
    /// at any instant leaves an image that opens as the disk before or after: the new range
    /// of a larger disk reads as zeros, and what lay past a smaller one is dropped, which
    /// the caller has checked first. Closes the image: nothing may use it afterwards.
    /// Returns how many units moved to make room.
    fn resize(&self, size: u64) -> Result<u64>;
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

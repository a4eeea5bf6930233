//! What a format driver tells the rest of the library, and the one I/O path built on it.
//!
//! A driver opens one image file and implements [`Layer`]: it maps any range of its own
//! virtual disk to runs that are in its file, read as zeros, or belong to its parent
//! ([`Mapping`]), and it describes its parent ([`ParentLink`]) without opening it. The
//! chain module finds and opens parents and hands each driver its own ([`Parent`]).
//! Reads, allocation maps and discards of every format, with or without parents, then go
//! through the functions here ([`read`], [`allocation`], [`discard`]), which walk down a
//! chain level by level, never by recursion. Writes stay with the drivers, whose on-disk
//! rules differ, but they split requests at block boundaries ([`block_pieces`]) and fill
//! what a write leaves of a sector or bitmap group from the parent ([`copy_up`]) here.

use crate::disk::{Allocation, DiscardMode, Extent, Format, VirtualDisk, check_range, push_extent};
use crate::error::{Error, Result};
use crate::free_space::{SpaceGate, SpacePin};
use crate::relocation::{Relocation, Resize};
use crate::storage;
use crate::windows_path::WindowsPath;
use std::any::Any;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use uuid::Uuid;

/// Where one run of a layer's virtual disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// In this layer's file, starting at this file offset.
    File(u64),
    /// Reads as zeros; nothing below shows through.
    Zero,
    /// Not in this layer: whatever its parent holds there (zeros past the parent's end).
    Parent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedRun {
    pub len: u64,
    pub mapping: Mapping,
}

/// Appends a run of `len` bytes, merging it into the last run when it continues it (the
/// same kind, and for file runs the next bytes of the file), so that neighbouring blocks
/// laid out one after the other are read with one request.
pub fn push_run(runs: &mut Vec<MappedRun>, len: u64, mapping: Mapping) {
    if len == 0 {
        return;
    }
    if let Some(last) = runs.last_mut() {
        let continues = match (last.mapping, mapping) {
            (Mapping::File(a), Mapping::File(b)) => a.checked_add(last.len) == Some(b),
            (a, b) => a == b,
        };
        if continues {
            last.len += len;
            return;
        }
    }
    runs.push(MappedRun { len, mapping });
}

/// One image file of a chain, as its format driver serves it.
///
/// Its [`VirtualDisk`] methods serve the whole chain below it (reads and allocation maps
/// through [`read`] and [`allocation`], discards through [`discard`]), once the chain
/// module has attached its parent.
pub trait Layer: VirtualDisk + Any {
    /// Appends runs covering exactly `[offset, offset + len)` of this layer, which lies
    /// inside the disk.
    fn map(&self, offset: u64, len: u64, runs: &mut Vec<MappedRun>) -> Result<()>;

    /// Reads data that [`Layer::map`] placed in this file.
    fn read_mapped(&self, buf: &mut [u8], file_offset: u64) -> Result<()>;

    /// Makes data that [`Layer::map`] placed in this file read as zeros, as
    /// [`Layer::discard_mode`] says: holes in the host file, or zeros written.
    fn zero_mapped(&self, file_offset: u64, len: u64) -> Result<()>;

    /// What discards of this image do (the open options' choice, else the image type's
    /// default).
    fn discard_mode(&self) -> DiscardMode;

    /// Gives back whole blocks of `[offset, offset + len)` where the format can make them
    /// read as zeros without data; returns the parts still to be zeroed. A format that
    /// cannot returns the whole range. Called for [`DiscardMode::Unmap`] only.
    fn release_blocks(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        Ok(vec![(offset, len)])
    }

    /// The parent this image needs, as the image names it; `None` for a base image.
    fn parent_link(&self) -> Option<&ParentLink> {
        None
    }

    /// Hands a differencing image the parent that the chain module found for it.
    fn attach_parent(&mut self, _parent: Parent) {}

    /// The parent attached to this image.
    fn parent_layer(&self) -> Option<&Parent> {
        None
    }

    /// What `vdisk info` reports about this file.
    fn facts(&self) -> LayerFacts;

    /// The gate that data I/O to this file's mapped space pins, for a layer that hands
    /// released space out again (see `free_space`).
    fn space_gate(&self) -> Option<&SpaceGate> {
        None
    }

    /// How this file's blocks move when it is compacted; `None` when nothing in it can.
    fn relocation(&self) -> Option<&dyn Relocation> {
        None
    }

    /// How this file's disk changes its size; `None` when it cannot.
    fn resizing(&self) -> Option<&dyn Resize> {
        None
    }

    /// Hands every block of a differencing image back to its parent (VHD: unallocated,
    /// VHDX: NOT_PRESENT), the table change durable before the space is given back. Only
    /// for an image whose parent already holds everything it shows (after a merge): what
    /// it reads does not change at any instant.
    fn clear_to_parent(&self) -> Result<()> {
        Err(Error::invalid_input("not a differencing image"))
    }

    /// After a merge wrote this image's data into its parent: gives the parent the new
    /// identity changed data calls for, where the format has one (VHDX DataWriteGuid; a
    /// VHD's Unique Id is not renewed by writes), naming it in this image first, so that
    /// this image finds its parent at every instant and images that named the old
    /// identity refuse the changed parent.
    fn relink_merged_parent(&self) -> Result<()> {
        Ok(())
    }
}

/// Pins `layer`'s space, if it reuses space, across a mapping and the I/O to it.
fn pin_space(layer: &dyn Layer) -> Option<SpacePin<'_>> {
    layer.space_gate().map(SpaceGate::pin)
}

/// A parent handed to its child: the image and the file it was found in.
pub struct Parent {
    pub path: PathBuf,
    pub layer: Box<dyn Layer>,
}

impl Parent {
    /// The parent as the boundary trait sees it, for [`VirtualDisk::parent`].
    pub fn as_disk(&self) -> (&Path, &dyn VirtualDisk) {
        (&self.path, self.layer.as_ref())
    }
}

/// Reads what `parent` holds at `offset`; past its end (a child may be larger than its
/// parent), zeros. A differencing image whose parent was never attached cannot.
pub fn read_parent(parent: Option<&Parent>, buf: &mut [u8], offset: u64) -> Result<()> {
    let parent = parent.ok_or_else(no_parent)?;
    let inside = parent
        .layer
        .size()
        .saturating_sub(offset)
        .min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(inside);
    if !head.is_empty() {
        read(parent.layer.as_ref(), head, offset)?;
    }
    tail.fill(0);
    Ok(())
}

fn no_parent() -> Error {
    Error::invalid_input(
        "differencing image opened without its parent (open it by path to find the parent)",
    )
}

/// The bytes of `span` (virtual offsets) once `data` is written at virtual `data_at`
/// inside it: the parent's bytes around the data. What a child writes when a write covers
/// only part of the unit (sector, bitmap group) that moves from the parent into it.
pub fn copy_up(
    parent: Option<&Parent>,
    span: Range<u64>,
    data_at: u64,
    data: &[u8],
) -> Result<Vec<u8>> {
    let mut merged = vec![0u8; (span.end - span.start) as usize];
    let head = (data_at - span.start) as usize;
    let tail = head + data.len();
    if head > 0 {
        read_parent(parent, &mut merged[..head], span.start)?;
    }
    if tail < merged.len() {
        read_parent(parent, &mut merged[tail..], span.start + tail as u64)?;
    }
    merged[head..tail].copy_from_slice(data);
    Ok(merged)
}

/// The part of a request that falls in one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockPiece {
    pub block: u64,
    /// Offset of the piece inside its block.
    pub in_block: u64,
    /// Offset of the piece inside the request.
    pub at: usize,
    pub len: usize,
}

impl BlockPiece {
    /// The piece's bytes of a request's buffer.
    pub fn range(&self) -> Range<usize> {
        self.at..self.at + self.len
    }
}

/// Splits `len` bytes at virtual `offset` at every multiple of `block_size`.
pub fn block_pieces(offset: u64, len: u64, block_size: u64) -> impl Iterator<Item = BlockPiece> {
    let mut done = 0u64;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = offset + done;
        let in_block = pos % block_size;
        let n = (block_size - in_block).min(len - done);
        let piece = BlockPiece {
            block: pos / block_size,
            in_block,
            at: done as usize,
            len: n as usize,
        };
        done += n;
        Some(piece)
    })
}

/// Maps `[offset, offset + len)` of `layer`, checking the driver covered it exactly.
fn map_checked(layer: &dyn Layer, offset: u64, len: u64, runs: &mut Vec<MappedRun>) -> Result<()> {
    runs.clear();
    layer.map(offset, len, runs)?;
    let covered = runs.iter().try_fold(0u64, |sum, r| sum.checked_add(r.len));
    if covered != Some(len) {
        return Err(Error::invalid_input(format!(
            "{} driver mapped {covered:?} bytes of a {len}-byte range at {offset}",
            layer.format()
        )));
    }
    Ok(())
}

/// The layer below `layer` that a run mapped to [`Mapping::Parent`] reads from.
fn below(layer: &dyn Layer) -> Result<&dyn Layer> {
    layer
        .parent_layer()
        .map(|p| p.layer.as_ref())
        .ok_or_else(no_parent)
}

/// Reads `buf` at `offset` of the chain whose top is `top`: each level maps what the
/// levels above left to it, and reads what it holds.
pub fn read(top: &dyn Layer, buf: &mut [u8], offset: u64) -> Result<()> {
    check_range(top.size(), offset, buf.len())?;
    // Parts of `buf` still to be read at the current level: (start in buf, length, offset).
    let mut wanted = vec![(0usize, buf.len(), offset)];
    let mut layer = top;
    let mut runs = Vec::new();
    loop {
        let mut deeper = Vec::new();
        let pin = pin_space(layer);
        for (start, len, at) in wanted {
            map_checked(layer, at, len as u64, &mut runs)?;
            let (mut pos, mut virtual_at) = (start, at);
            for run in &runs {
                let n = run.len as usize;
                let piece = &mut buf[pos..pos + n];
                match run.mapping {
                    Mapping::File(file_offset) => layer.read_mapped(piece, file_offset)?,
                    Mapping::Zero => piece.fill(0),
                    Mapping::Parent => {
                        let parent_size = below(layer)?.size();
                        let inside = parent_size.saturating_sub(virtual_at).min(run.len) as usize;
                        piece[inside..].fill(0);
                        if inside > 0 {
                            deeper.push((pos, inside, virtual_at));
                        }
                    }
                }
                pos += n;
                virtual_at += run.len;
            }
        }
        drop(pin);
        if deeper.is_empty() {
            return Ok(());
        }
        layer = below(layer)?;
        wanted = deeper;
    }
}

/// Where a run of a chain's virtual disk comes from; levels count from the top image (0)
/// down through its parents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Data in the file of the image at `level`, at `file_offset`.
    File { level: usize, file_offset: u64 },
    /// Zeros, as the image at `level` says, or because the range lies past its end.
    Zero { level: usize },
}

/// A run of a chain's virtual disk and where it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainRun {
    pub offset: u64,
    pub len: u64,
    pub source: Source,
}

/// Appends a run, merging it into the last one when it continues it.
pub fn push_chain_run(runs: &mut Vec<ChainRun>, offset: u64, len: u64, source: Source) {
    if len == 0 {
        return;
    }
    if let Some(last) = runs.last_mut()
        && last.offset + last.len == offset
    {
        let continues = match (last.source, source) {
            (
                Source::File { level, file_offset },
                Source::File {
                    level: next_level,
                    file_offset: next,
                },
            ) => level == next_level && file_offset.checked_add(last.len) == Some(next),
            (a, b) => a == b,
        };
        if continues {
            last.len += len;
            return;
        }
    }
    runs.push(ChainRun {
        offset,
        len,
        source,
    });
}

/// Which image of the chain whose top is `top` answers for each run of
/// `[offset, offset + len)`, in order: each level maps what the levels above left to it.
pub fn chain_map(top: &dyn Layer, offset: u64, len: u64) -> Result<Vec<ChainRun>> {
    let len_usize = usize::try_from(len).map_err(|_| Error::invalid_input("range too long"))?;
    check_range(top.size(), offset, len_usize)?;
    enum Part {
        Known(u64, u64, Source),
        Below(u64, u64),
    }
    let mut parts = vec![Part::Below(offset, len)];
    let (mut layer, mut level) = (top, 0);
    let mut runs = Vec::new();
    loop {
        let mut next = Vec::with_capacity(parts.len());
        let mut asked_below = false;
        for part in parts {
            let Part::Below(at, len) = part else {
                next.push(part);
                continue;
            };
            map_checked(layer, at, len, &mut runs)?;
            let mut virtual_at = at;
            for run in &runs {
                let known = |source| Part::Known(virtual_at, run.len, source);
                match run.mapping {
                    Mapping::File(file_offset) => {
                        next.push(known(Source::File { level, file_offset }))
                    }
                    Mapping::Zero => next.push(known(Source::Zero { level })),
                    Mapping::Parent => {
                        let parent_size = below(layer)?.size();
                        let inside = parent_size.saturating_sub(virtual_at).min(run.len);
                        if inside > 0 {
                            next.push(Part::Below(virtual_at, inside));
                            asked_below = true;
                        }
                        if inside < run.len {
                            let past_end = Source::Zero { level: level + 1 };
                            next.push(Part::Known(virtual_at + inside, run.len - inside, past_end));
                        }
                    }
                }
                virtual_at += run.len;
            }
        }
        parts = next;
        if !asked_below {
            break;
        }
        layer = below(layer)?;
        level += 1;
    }
    let mut mapped = Vec::new();
    for part in parts {
        if let Part::Known(at, len, source) = part {
            push_chain_run(&mut mapped, at, len, source);
        }
    }
    Ok(mapped)
}

/// How the chain whose top is `top` backs `[offset, offset + len)`: data wherever some
/// level holds it, zeros where the first level that answers says so or past a parent's
/// end.
pub fn allocation(top: &dyn Layer, offset: u64, len: u64) -> Result<Vec<Extent>> {
    let mut extents = Vec::new();
    for run in chain_map(top, offset, len)? {
        let state = match run.source {
            Source::File { .. } => Allocation::Data,
            Source::Zero { .. } => Allocation::Zero,
        };
        push_extent(&mut extents, run.offset, run.len, state);
    }
    Ok(extents)
}

/// Makes `[offset, offset + len)` of `layer` read as zeros, as its [`DiscardMode`] says:
/// whole blocks are given back where the format allows (unmap), data in the file becomes
/// holes (unmap) or zeros, and what the parent held is covered by zeros written through
/// the layer's own write path (leaving it to the parent would bring the parent's data
/// back).
pub fn discard(layer: &dyn Layer, offset: u64, len: u64) -> Result<()> {
    let len_usize = usize::try_from(len).map_err(|_| Error::invalid_input("range too long"))?;
    check_range(layer.size(), offset, len_usize)?;
    if layer.is_read_only() {
        return Err(Error::new(crate::error::ErrorKind::ReadOnly));
    }
    let mode = layer.discard_mode();
    if mode == DiscardMode::Ignore {
        return Err(Error::unsupported(
            "discards are switched off (discard=ignore)",
        ));
    }
    if len == 0 {
        return Ok(());
    }
    let ranges = match mode {
        DiscardMode::Unmap => layer.release_blocks(offset, len)?,
        _ => vec![(offset, len)],
    };
    let mut runs = Vec::new();
    let mut parents = Vec::new();
    for (start, len) in ranges {
        let _pin = pin_space(layer);
        map_checked(layer, start, len, &mut runs)?;
        let mut at = start;
        for run in &runs {
            match run.mapping {
                Mapping::File(file_offset) => layer.zero_mapped(file_offset, run.len)?,
                Mapping::Zero => {}
                Mapping::Parent => parents.push((at, run.len)),
            }
            at += run.len;
        }
    }
    // Written unpinned: a write may allocate, and allocating may wait for pins to go.
    for (at, len) in parents {
        storage::zero_chunks(at, len, |zeros, at| layer.write_at(zeros, at))?;
    }
    Ok(())
}

/// One way a differencing image names its parent, as stored in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParentPath {
    /// Relative to the child's directory: `.\base.vhd`, `..\dir\base.vhd`.
    Relative(String),
    /// Absolute: `C:\dir\base.vhd`, `\\?\C:\dir\base.vhd`, `\\server\share\base.vhd` or
    /// a host path.
    Absolute(String),
    /// A name to look for beside the child; any directory part is dropped.
    FileName(String),
}

/// What a differencing image records about the parent it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLink {
    /// The paths the child stores, most trusted first.
    pub paths: Vec<ParentPath>,
    /// Identities the parent may report ([`VirtualDisk::identity`]); the first is the one
    /// named in messages.
    pub identities: Vec<[u8; 16]>,
    /// The format the parent must have.
    pub format: Format,
    /// What the child is, for messages: "VHD differencing disk".
    pub child_kind: &'static str,
}

/// The paths a new differencing image records for its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredParentPaths {
    /// The parent file, symlinks resolved.
    pub canonical: PathBuf,
    /// From the child's directory to the parent, in Windows form (`.\base.vhdx`).
    pub relative: String,
    /// The parent's absolute host path in Windows form (`\srv\vm\base.vhdx`).
    pub absolute: String,
    /// Where Windows finds the parent, when the user said so (no host path tells).
    pub windows: Option<WindowsPath>,
    /// The parent's volume GUID path (`\\?\Volume{GUID}\vm\base.vhdx`), when given.
    pub volume: Option<String>,
}

impl StoredParentPaths {
    /// The absolute path a VHD records (W2ku): the Windows one when known, else the host
    /// path in Windows form, which this library maps back.
    pub fn vhd_absolute(&self) -> String {
        match &self.windows {
            Some(windows) => windows.plain().to_string(),
            None => self.absolute.clone(),
        }
    }
}

/// What a new differencing image takes from its parent, gathered by opening the parent
/// with its whole chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentImage {
    pub format: Format,
    /// What the child records to name the parent: VHD Unique Id, VHDX DataWriteGuid.
    pub identity: [u8; 16],
    /// The parent's VHDX DiskId, which a VHDX child shares.
    pub disk_id: Option<Uuid>,
    pub size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// A VHD parent's footer Time Stamp, which its child records as Parent Time Stamp.
    pub time_stamp: Option<u32>,
    pub paths: StoredParentPaths,
}

/// Most memory the metadata held for a whole chain may take (BATs and sector bitmaps of
/// every image in it). One image stays well below it (VHDX: 32 MiB of BAT and 128 MiB of
/// bitmaps at most); the bound keeps a chain of crafted images from adding up past what
/// a daemon should hold.
pub const CHAIN_METADATA_MEMORY: u64 = 192 << 20;

/// Memory charged to a chain's metadata so far, shared by every image of the chain.
#[derive(Debug, Clone, Default)]
pub struct MetadataBudget {
    charged: Arc<AtomicU64>,
    exceeded: Arc<AtomicBool>,
}

impl MetadataBudget {
    /// Counts `bytes` of metadata an image of this chain keeps in memory (`what`, for the
    /// message), failing once the chain as a whole would hold more than
    /// [`CHAIN_METADATA_MEMORY`].
    pub fn charge(&self, bytes: u64, what: &str) -> Result<()> {
        let before = self.charged.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > CHAIN_METADATA_MEMORY {
            self.exceeded.store(true, Ordering::Relaxed);
            return Err(Error::unsupported(format!(
                "{what} would take the metadata this chain keeps in memory past {} MiB",
                CHAIN_METADATA_MEMORY >> 20
            )));
        }
        Ok(())
    }

    /// Whether a charge failed: the chain as a whole, not one of its files, is too large.
    pub fn is_exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Relaxed)
    }
}

/// What `vdisk info` reports about one image file, and a new child takes from it; what a
/// format lacks stays empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerFacts {
    /// fixed, dynamic, differencing or raw.
    pub subtype: &'static str,
    pub creator: String,
    pub block_size: Option<u64>,
    pub allocated_blocks: Option<u64>,
    pub total_blocks: Option<u64>,
    pub unique_id: Option<Uuid>,
    pub disk_id: Option<Uuid>,
    pub data_write_guid: Option<Uuid>,
    pub file_write_guid: Option<Uuid>,
    pub log_guid: Option<Uuid>,
    pub header_sequence_number: Option<u64>,
    /// Whether the log had to be replayed at open.
    pub log_was_dirty: Option<bool>,
    /// A differencing VHDX's parent locator: key/value pairs as stored.
    pub parent_locator: Option<Vec<(String, String)>>,
    /// A VHD footer's Time Stamp (seconds since 2000), which a new child copies.
    pub time_stamp: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_block_boundaries() {
        let pieces: Vec<BlockPiece> = block_pieces(10, 30, 16).collect();
        assert_eq!(
            pieces,
            [
                BlockPiece {
                    block: 0,
                    in_block: 10,
                    at: 0,
                    len: 6
                },
                BlockPiece {
                    block: 1,
                    in_block: 0,
                    at: 6,
                    len: 16
                },
                BlockPiece {
                    block: 2,
                    in_block: 0,
                    at: 22,
                    len: 8
                },
            ]
        );
        assert_eq!(block_pieces(5, 0, 16).count(), 0);
    }

    #[test]
    fn runs_merge_only_where_they_continue() {
        let mut runs = Vec::new();
        push_run(&mut runs, 10, Mapping::File(100));
        push_run(&mut runs, 5, Mapping::File(110));
        push_run(&mut runs, 5, Mapping::File(200));
        push_run(&mut runs, 0, Mapping::Zero);
        push_run(&mut runs, 3, Mapping::Parent);
        push_run(&mut runs, 4, Mapping::Parent);
        push_run(&mut runs, 1, Mapping::Zero);
        let run = |len, mapping| MappedRun { len, mapping };
        assert_eq!(
            runs,
            [
                run(15, Mapping::File(100)),
                run(5, Mapping::File(200)),
                run(7, Mapping::Parent),
                run(1, Mapping::Zero),
            ]
        );
    }

    /// A layer of `size` bytes whose byte `i` is `mapping[i / 4]`, in 4-byte units; its
    /// file holds byte value `file_offset as u8` everywhere.
    struct Striped {
        size: u64,
        units: Vec<Mapping>,
        parent: Option<Parent>,
        /// Bytes a faulty driver leaves out of every answer.
        short_by: u64,
    }

    impl VirtualDisk for Striped {
        fn format(&self) -> Format {
            Format::Raw
        }
        fn size(&self) -> u64 {
            self.size
        }
        fn logical_sector_size(&self) -> u32 {
            512
        }
        fn physical_sector_size(&self) -> u32 {
            512
        }
        fn is_read_only(&self) -> bool {
            true
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            read(self, buf, offset)
        }
        fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
            Err(Error::new(crate::error::ErrorKind::ReadOnly))
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
            allocation(self, offset, len)
        }
        fn discard(&self, offset: u64, len: u64) -> Result<()> {
            discard(self, offset, len)
        }
    }

    impl Layer for Striped {
        fn map(&self, offset: u64, len: u64, runs: &mut Vec<MappedRun>) -> Result<()> {
            for at in offset..offset + len - self.short_by {
                let mapping = match self.units[(at / 4) as usize] {
                    Mapping::File(base) => Mapping::File(base + at % 4),
                    other => other,
                };
                push_run(runs, 1, mapping);
            }
            Ok(())
        }
        fn read_mapped(&self, buf: &mut [u8], file_offset: u64) -> Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (file_offset + i as u64) as u8;
            }
            Ok(())
        }
        fn zero_mapped(&self, _: u64, _: u64) -> Result<()> {
            unreachable!("read-only")
        }
        fn discard_mode(&self) -> DiscardMode {
            DiscardMode::Zero
        }
        fn parent_layer(&self) -> Option<&Parent> {
            self.parent.as_ref()
        }
        fn facts(&self) -> LayerFacts {
            LayerFacts::default()
        }
    }

    /// base (8 bytes) ← middle (12 bytes) ← top (16 bytes): each level's units File, Zero
    /// or Parent, so that reads must reach down two levels and past the base's end.
    fn chain() -> Striped {
        use Mapping::{File, Parent as P, Zero};
        let base = Striped {
            size: 8,
            units: vec![File(100), File(200)],
            parent: None,
            short_by: 0,
        };
        let middle = Striped {
            size: 12,
            units: vec![P, File(50), P],
            parent: Some(Parent {
                path: "base".into(),
                layer: Box::new(base),
            }),
            short_by: 0,
        };
        Striped {
            size: 16,
            units: vec![P, Zero, P, P],
            parent: Some(Parent {
                path: "middle".into(),
                layer: Box::new(middle),
            }),
            short_by: 0,
        }
    }

    #[test]
    fn reads_walk_down_the_chain_and_read_zeros_past_a_parents_end() {
        let top = chain();
        let mut buf = [0xEEu8; 16];
        read(&top, &mut buf, 0).unwrap();
        // Unit 0 comes from the base; unit 1 is the top's zeros, hiding the middle's file
        // data; unit 2 reaches the base past its end, unit 3 the middle past its end.
        assert_eq!(
            buf,
            [100, 101, 102, 103, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let mut part = [0xEEu8; 5];
        read(&top, &mut part, 2).unwrap();
        assert_eq!(part, [102, 103, 0, 0, 0]);
    }

    #[test]
    fn allocation_walks_down_the_chain_in_order() {
        let top = chain();
        let extent = |offset, len, state| Extent { offset, len, state };
        assert_eq!(
            allocation(&top, 0, 16).unwrap(),
            [
                extent(0, 4, Allocation::Data),
                extent(4, 12, Allocation::Zero),
            ]
        );
        assert_eq!(
            allocation(&top, 3, 2).unwrap(),
            [
                extent(3, 1, Allocation::Data),
                extent(4, 1, Allocation::Zero)
            ]
        );
        let middle = top.parent.as_ref().unwrap().layer.as_ref();
        assert_eq!(
            allocation(middle, 0, 12).unwrap(),
            [
                extent(0, 8, Allocation::Data),
                extent(8, 4, Allocation::Zero),
            ]
        );
    }

    #[test]
    fn the_chain_map_names_the_level_of_each_run() {
        let top = chain();
        let run = |offset, len, source| ChainRun {
            offset,
            len,
            source,
        };
        assert_eq!(
            chain_map(&top, 1, 15).unwrap(),
            [
                run(
                    1,
                    3,
                    Source::File {
                        level: 2,
                        file_offset: 101
                    }
                ),
                run(4, 4, Source::Zero { level: 0 }),
                run(8, 4, Source::Zero { level: 2 }),
                run(12, 4, Source::Zero { level: 1 }),
            ]
        );
    }

    #[test]
    fn a_driver_that_maps_too_little_or_points_at_no_parent_fails_cleanly() {
        let short = Striped {
            size: 8,
            units: vec![Mapping::Zero, Mapping::Zero],
            parent: None,
            short_by: 1,
        };
        let err = read(&short, &mut [0u8; 8], 0).unwrap_err();
        assert!(err.to_string().contains("mapped Some(7) bytes"), "{err}");
        assert!(allocation(&short, 0, 8).is_err());
        let orphan = Striped {
            size: 8,
            units: vec![Mapping::Parent, Mapping::Parent],
            parent: None,
            short_by: 0,
        };
        let err = read(&orphan, &mut [0u8; 8], 0).unwrap_err();
        assert!(err.to_string().contains("without its parent"), "{err}");
    }

    #[test]
    fn the_images_of_a_chain_share_one_metadata_budget() {
        let budget = MetadataBudget::default();
        budget
            .charge(CHAIN_METADATA_MEMORY - 10, "the child's BAT")
            .unwrap();
        let err = budget.clone().charge(20, "the parent's BAT").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the parent's BAT would take the metadata this chain keeps"),
            "{err}"
        );
        MetadataBudget::default()
            .charge(20, "another chain's BAT")
            .unwrap();
    }
}

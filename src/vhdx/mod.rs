//! VHDX images (fixed, dynamic and differencing): open with log replay, reads, allocating
//! writes whose BAT and sector bitmap changes go through the log, discard.
//!
//! Differencing: the image describes its parent (its DataWriteGuid must be the locator's
//! `parent_linkage`, or `parent_linkage2`) and the chain module hands it over, opened
//! read-only (writable for a merge, `merge.rs`). NOT_PRESENT blocks read from the parent; PARTIALLY_PRESENT ones per sector, as their chunk's sector
//! bitmap says; ZERO, UNMAPPED and UNDEFINED read zeros, never the parent. A write into a
//! NOT_PRESENT block allocates it (and its chunk's bitmap block if missing), completes the
//! partly written first and last sectors with the parent's bytes, flushes, then journals
//! the bitmap block's BAT entry, and after it the payload entry (PARTIALLY_PRESENT) with
//! the sectors' bits. A write into a PARTIALLY_PRESENT block whose sectors are all set
//! goes straight to the file; otherwise its bits are journaled after the data is durable.
//! Discarding a whole block makes it ZERO, part of one writes zeros: NOT_PRESENT would
//! bring the parent's data back.
//!
//! Writers do not wait on each other's I/O. The BAT and the sector bitmaps live in memory
//! under read/write locks held only to copy or change entries; data I/O to blocks the BAT
//! maps runs outside every lock. A write that needs metadata (a new block, new sector
//! bits) claims the BAT entries it will change (`claims`; a second writer to the same
//! block waits for the claim to go, then looks again), reserves file space under the
//! allocator mutex, writes its data (copying up from the parent) holding no lock, and
//! hands its change to the commit queue (`commits`). The first queued writer to find no
//! group being written writes one for everything queued: one flush makes all their data
//! durable, then one log entry carries all their BAT and bitmap changes, and each writer
//! gets the group's result. An fsync takes no lock: it flushes the file beside whatever
//! else runs. A writer that fails before its change is queued drops its claim and gives
//! its space back, so no other writer trusts a block that was never committed; space
//! reserved by a writer that crashed is a gap the next open finds free. New blocks take
//! free space (gaps found at open, released blocks) before the file grows.
//!
//! Lock order: a thread holding one of these never waits for one listed before it.
//! 1. claims: held from looking at a BAT entry until its change is committed, across
//!    data I/O (discards claim the entries they release);
//! 2. the commit queue: its members wait for their group, one of them writing it;
//! 3. the journal mutex: header updates and log entries, held across their I/O by one
//!    group or one other metadata change at a time;
//! 4. the BAT lock, then the sector bitmap lock: never held across I/O or another wait;
//! 5. the allocator mutex: file length and free ranges, held across `set_len` and
//!    while draining the space gate.
//!
//! Payload I/O pins the space gate across the BAT lookup (it may take 4) and the I/O, and
//! waits for nothing else meanwhile; allocations that reuse released space retire it
//! through the gate (see `free_space`).
//!
//! Log policy: the first metadata change of a session installs a fresh LogGuid. Each
//! group of changes is written as a log entry and flushed, then applied in place and
//! flushed, so every entry is fully applied before the next is written (each entry's Tail
//! is itself). A crash therefore leaves at most one entry to replay, and replaying an
//! applied entry again is harmless. A clean close sets LogGuid back to zero.

#![forbid(unsafe_code)]

pub mod bat;
mod check;
pub mod create;
mod fields;
pub mod file_identifier;
mod format;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod header;
mod journal;
pub mod log;
mod merge;
pub mod metadata;
mod opening;
pub mod parent_locator;
pub mod region_table;
mod relocate;
mod replay;
mod resize;
pub mod sector_bitmap;
mod space;
mod write;

use crate::claims::Claims;
use crate::commit_queue::CommitQueue;
use crate::disk::{DiscardMode, Extent, Format, OpenOptions, VirtualDisk, check_range};
use crate::error::{CorruptionKind, Error, ErrorKind, IoContext, Result};
use crate::finding::{Finding, Fix, Problems};
use crate::free_space::{FreeSpace, SpaceGate, aligned_place};
use crate::layer::{
    self, Layer, LayerFacts, MappedRun, Mapping, MetadataBudget, Parent, ParentLink, block_pieces,
    copy_up, push_run,
};
use crate::relocation::{Relocation, Resize};
use crate::storage::{self, Storage, write_zeros};
use bat::{BAT_ENTRY_LEN, BAT_PAGE_LEN, Bat, BatEntry, BatLayout, PayloadState, ReservedRange};
use fields::MIB;
use file_identifier::{FILE_IDENTIFIER_LEN, FileIdentifier};
use header::{HEADER_LEN, HEADER_OFFSETS, Header};
use journal::{Journal, update_header};
use log::{LogUpdate, LogWriter};
use metadata::{DiskParameters, METADATA_TABLE_LEN, MetadataTable, PARENT_LOCATOR};
use parent_locator::ParentLocator;
use parking_lot::{Mutex, RwLock};
use region_table::{
    BAT_REGION, METADATA_REGION, REGION_TABLE_LEN, REGION_TABLE_OFFSETS, RegionTable,
};
use replay::Overlay;
use sector_bitmap::{BitmapPage, MAX_LOADED_PAGES, SECTOR_BITMAP_LEN, SectorBitmaps};
use space::Allocator;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use uuid::Uuid;
use write::{BitmapPageChange, Change};

/// What a differencing image has besides a dynamic one.
struct Differencing {
    /// Rewritten only under the journal lock (a merge renames the parent).
    locator: RwLock<ParentLocator>,
    /// The parent the locator named when the image was opened.
    link: ParentLink,
    /// Where the metadata region holding the locator is in the file.
    metadata_region: Range<u64>,
    /// Opened read-only (other children may share it, unless a merge writes into it)
    /// and attached by the chain module.
    parent: Option<Parent>,
    /// Sector bitmaps of the chunks that have one; changed only under the journal lock
    /// (bits of a block by the holder of its claim), and always before the BAT entries
    /// that make them count.
    bitmaps: RwLock<SectorBitmaps>,
}

/// Read-only facts about an open VHDX, for reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdxInfo {
    pub creator: String,
    pub header_sequence_number: u64,
    pub file_write_guid: Uuid,
    pub data_write_guid: Uuid,
    pub log_guid: Uuid,
    /// Whether the log had to be replayed when the image was opened.
    pub log_was_dirty: bool,
    pub block_size: u32,
    pub allocated_blocks: u64,
    pub total_blocks: u64,
    pub disk_id: Uuid,
    /// LeaveBlockAllocated: a fixed image.
    pub fixed: bool,
    /// A differencing image's parent locator: key/value pairs as stored.
    pub parent_locator: Option<Vec<(String, String)>>,
}

pub struct VhdxDisk {
    storage: Box<dyn Storage>,
    read_only: bool,
    discard: DiscardMode,
    params: DiskParameters,
    creator: String,
    bat_offset: u64,
    log_was_dirty: bool,
    /// How BAT indices map onto the disk (the same as `bat.layout`, without the lock).
    layout: BatLayout,
    bat: RwLock<Bat>,
    /// Where the log and the regions end: the file can never be shorter.
    metadata_end: u64,
    journal: Mutex<Journal>,
    allocator: Mutex<Allocator>,
    /// BAT entries a write or discard is changing.
    claims: Claims,
    /// Writers' metadata changes waiting to be written together.
    commits: CommitQueue<Change>,
    /// Pinned by data I/O to mapped space, so released space is reused only once no I/O
    /// can still reach it.
    space: SpaceGate,
    /// Fast path: the header update for user-visible writes is done.
    data_write_started: AtomicBool,
    /// User-visible writes keep DataWriteGuid (`OpenOptions::keep_identity`).
    keep_identity: bool,
    /// A metadata change failed after its log entry became durable; the in-place BAT may
    /// be stale until the image is reopened (and the log replayed).
    poisoned: AtomicBool,
    /// Only for read-only opens whose replayed log touched payload or extended the file.
    payload_overlay: Option<Overlay>,
    differencing: Option<Differencing>,
}

impl VhdxDisk {
    pub fn info(&self) -> VhdxInfo {
        let j = self.journal.lock();
        let bat = self.bat.read();
        VhdxInfo {
            creator: self.creator.clone(),
            header_sequence_number: j.header.sequence_number,
            file_write_guid: j.header.file_write_guid,
            data_write_guid: j.header.data_write_guid,
            log_guid: j.header.log_guid,
            log_was_dirty: self.log_was_dirty,
            block_size: self.params.block_size,
            allocated_blocks: bat.allocated_blocks(),
            total_blocks: bat.layout.payload_blocks,
            disk_id: self.params.disk_id,
            fixed: self.params.leave_blocks_allocated && self.differencing.is_none(),
            parent_locator: self
                .differencing
                .as_ref()
                .map(|d| d.locator.read().entries.clone()),
        }
    }

    fn partially_present(&self, block: u64) -> Error {
        let index = self.layout.payload_index(block);
        let err = Error::corrupt(
            CorruptionKind::InvalidField,
            format!("BAT entry {index}"),
            "block is PARTIALLY_PRESENT in an image without a parent",
        );
        ::log::error!("{err}");
        err
    }

    fn read_payload(&self, buf: &mut [u8], file_offset: u64) -> Result<()> {
        match &self.payload_overlay {
            Some(overlay) => overlay.read(self.storage.as_ref(), buf, file_offset),
            None => self
                .storage
                .read_at(buf, file_offset)
                .context(|| format!("reading {} bytes at {file_offset:#x}", buf.len())),
        }
    }

    /// Commits BAT `changes` that leave `spaces` unused; only then do they become holes,
    /// and free once no I/O can reach them: only a hole may be handed out again.
    fn give_back(
        &self,
        j: &mut Journal,
        changes: &[(u64, BatEntry)],
        spaces: Vec<Range<u64>>,
    ) -> Result<()> {
        self.commit(j, changes, &[])?;
        for space in spaces {
            self.storage
                .punch_hole(space.start, space.end - space.start)
                .context(|| format!("releasing the space at {:#x}", space.start))?;
            self.allocator.lock().free.release(space);
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::new(ErrorKind::ReadOnly));
        }
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::io(
                "an earlier metadata update failed; reopen the image to recover it",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }
}

impl VirtualDisk for VhdxDisk {
    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn size(&self) -> u64 {
        self.params.virtual_size
    }

    fn logical_sector_size(&self) -> u32 {
        self.params.logical_sector_size
    }

    fn physical_sector_size(&self) -> u32 {
        self.params.physical_sector_size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        layer::read(self, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_range(self.size(), offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.begin_user_write()?;
        let mut needs_metadata = Vec::new();
        let block_size = self.layout.block_size;
        for piece in block_pieces(offset, buf.len() as u64, block_size) {
            let data = &buf[piece.range()];
            if !self.write_in_place(data, piece.block, piece.in_block)? {
                needs_metadata.push((piece.block, piece.in_block, data));
            }
        }
        if needs_metadata.is_empty() {
            return Ok(());
        }
        self.write_allocating(&needs_metadata)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.check_writable()?;
        self.flush_storage()
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        layer::allocation(self, offset, len)
    }

    /// Whole blocks become ZERO (in a child too: NOT_PRESENT would bring the parent's data
    /// back); parts of blocks are overwritten with zeros.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        // A refused discard changes nothing, DataWriteGuid included (children name it).
        if self.discard != DiscardMode::Ignore {
            self.begin_user_write()?;
        }
        layer::discard(self, offset, len)
    }

    /// The current DataWriteGuid, which a child records as its `parent_linkage`.
    fn identity(&self) -> Option<[u8; 16]> {
        Some(*self.journal.lock().header.data_write_guid.as_bytes())
    }

    fn parent(&self) -> Option<(&Path, &dyn VirtualDisk)> {
        self.parent_layer().map(Parent::as_disk)
    }

    fn close(&self) -> Result<()> {
        self.flush()?;
        if self.read_only {
            return Ok(());
        }
        let mut j = self.journal.lock();
        if j.header.log_is_dirty() {
            update_header(self.storage.as_ref(), &mut j, |h| h.log_guid = Uuid::nil())?;
            j.writer = None;
        }
        Ok(())
    }
}

impl Layer for VhdxDisk {
    fn map(&self, offset: u64, len: u64, runs: &mut Vec<MappedRun>) -> Result<()> {
        let bat = self.bat.read();
        for piece in block_pieces(offset, len, self.layout.block_size) {
            let entry = bat.payload(piece.block);
            let (in_block, n) = (piece.in_block, piece.len as u64);
            match (entry.payload_state(), &self.differencing) {
                (Some(PayloadState::FullyPresent), _) => {
                    push_run(runs, n, Mapping::File(entry.file_offset() + in_block))
                }
                (Some(PayloadState::NotPresent), Some(_)) => push_run(runs, n, Mapping::Parent),
                (Some(PayloadState::PartiallyPresent), Some(d)) => {
                    for (run, present) in
                        self.sector_runs(d, piece.block, &(in_block..in_block + n))
                    {
                        let mapping = if present {
                            Mapping::File(entry.file_offset() + run.start)
                        } else {
                            Mapping::Parent
                        };
                        push_run(runs, run.end - run.start, mapping);
                    }
                }
                (Some(PayloadState::PartiallyPresent), None) => {
                    return Err(self.partially_present(piece.block));
                }
                // ZERO, UNMAPPED and UNDEFINED read as zeros even in a child: never the parent.
                _ => push_run(runs, n, Mapping::Zero),
            }
        }
        Ok(())
    }

    fn read_mapped(&self, buf: &mut [u8], file_offset: u64) -> Result<()> {
        self.read_payload(buf, file_offset)
    }

    fn zero_mapped(&self, file_offset: u64, len: u64) -> Result<()> {
        let unmap = self.discard == DiscardMode::Unmap;
        storage::zero_range(self.storage.as_ref(), file_offset, len, unmap)
            .context(|| format!("zeroing {len} bytes at {file_offset:#x}"))
    }

    fn discard_mode(&self) -> DiscardMode {
        self.discard
    }

    /// Whole blocks that hold anything become ZERO, through the log; unless the image is
    /// fixed, whose blocks keep their space. Their space becomes a hole once no entry
    /// points at it, and free for new blocks.
    fn release_blocks(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let block_size = self.layout.block_size;
        let child = self.differencing.is_some();
        if len == 0 {
            return Ok(Vec::new());
        }
        // Entries are looked at under a claim, so no writer changes them before the commit.
        let (first, last) = (offset / block_size, (offset + len - 1) / block_size);
        let claimed = self.layout.payload_index(first)..self.layout.payload_index(last) + 1;
        let _claim = loop {
            if let Some(claim) = self.claims.claim([claimed.clone()]) {
                break claim;
            }
        };
        let mut j = self.journal.lock();
        let mut whole_blocks = Vec::new();
        let mut rest: Vec<(u64, u64)> = Vec::new();
        for piece in block_pieces(offset, len, block_size) {
            let entry = self.bat.read().payload(piece.block);
            let state = entry.payload_state();
            let holds_data = match state {
                Some(PayloadState::FullyPresent) => true,
                Some(PayloadState::PartiallyPresent | PayloadState::NotPresent) => child,
                _ => false,
            };
            let block_len = block_size.min(self.size() - piece.block * block_size);
            let whole = piece.in_block == 0 && piece.len as u64 == block_len;
            if holds_data && whole && (child || !self.params.leave_blocks_allocated) {
                whole_blocks.push(piece.block);
                continue;
            }
            let at = offset + piece.at as u64;
            match rest.last_mut() {
                Some((start, n)) if *start + *n == at => *n += piece.len as u64,
                _ => rest.push((at, piece.len as u64)),
            }
        }
        self.retire_blocks(&mut j, &whole_blocks, PayloadState::Zero)?;
        Ok(rest)
    }

    fn space_gate(&self) -> Option<&SpaceGate> {
        Some(&self.space)
    }

    fn relocation(&self) -> Option<&dyn Relocation> {
        Some(self)
    }

    fn resizing(&self) -> Option<&dyn Resize> {
        Some(self)
    }

    fn parent_link(&self) -> Option<&ParentLink> {
        self.differencing.as_ref().map(|d| &d.link)
    }

    fn attach_parent(&mut self, parent: Parent) {
        if let Some(d) = self.differencing.as_mut() {
            d.parent = Some(parent);
        }
    }

    fn parent_layer(&self) -> Option<&Parent> {
        self.differencing.as_ref()?.parent.as_ref()
    }

    fn clear_to_parent(&self) -> Result<()> {
        self.clear_blocks_to_parent()
    }

    fn relink_merged_parent(&self) -> Result<()> {
        self.relink_parent()
    }

    fn facts(&self) -> LayerFacts {
        let v = self.info();
        LayerFacts {
            subtype: if v.parent_locator.is_some() {
                "differencing"
            } else if v.fixed {
                "fixed"
            } else {
                "dynamic"
            },
            creator: v.creator,
            block_size: Some(u64::from(v.block_size)),
            allocated_blocks: Some(v.allocated_blocks),
            total_blocks: Some(v.total_blocks),
            disk_id: Some(v.disk_id),
            data_write_guid: Some(v.data_write_guid),
            file_write_guid: Some(v.file_write_guid),
            log_guid: Some(v.log_guid),
            header_sequence_number: Some(v.header_sequence_number),
            log_was_dirty: Some(v.log_was_dirty),
            parent_locator: v.parent_locator,
            unique_id: None,
            time_stamp: None,
        }
    }
}

impl std::fmt::Debug for VhdxDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdxDisk")
            .field("params", &self.params)
            .field("read_only", &self.read_only)
            .finish()
    }
}

#[cfg(test)]
mod tests;

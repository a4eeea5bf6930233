//! VHDX images (fixed, dynamic and differencing): open with log replay, reads, allocating
//! writes whose BAT and sector bitmap changes go through the log, discard.
//!
//! Differencing: the image describes its parent (its DataWriteGuid must be the locator's
//! `parent_linkage`, or `parent_linkage2`) and the chain module hands it over, opened
//! read-only. NOT_PRESENT
//! blocks read from the parent; PARTIALLY_PRESENT ones per sector, as their chunk's sector
//! bitmap says; ZERO, UNMAPPED and UNDEFINED read zeros, never the parent. A write into a
//! NOT_PRESENT block allocates it (and its chunk's bitmap block if missing), completes the
//! partly written first and last sectors with the parent's bytes, flushes, then journals
//! the bitmap block's BAT entry, and after it the payload entry (PARTIALLY_PRESENT) with
//! the sectors' bits. A write into a PARTIALLY_PRESENT block whose sectors are all set
//! goes straight to the file; otherwise its bits are journaled after the data is durable.
//! Discarding a whole block makes it ZERO, part of one writes zeros: NOT_PRESENT would
//! bring the parent's data back.
//!
//! Locking: the BAT lives in memory under a read/write lock that the data path holds only
//! long enough to copy one entry; payload I/O runs outside it. Everything that changes
//! metadata on disk (header updates, block allocation, log entries, BAT and bitmap pages)
//! is serialized by the journal mutex, taken before the BAT and bitmap locks.
//!
//! Log policy: the first metadata change of a session installs a fresh LogGuid. Each
//! change is written as a log entry and flushed, then applied in place and flushed, so every entry is fully applied before the next is written (each entry's Tail
//! is itself). A crash therefore leaves at most one entry to replay, and replaying an
//! applied entry again is harmless. A clean close sets LogGuid back to zero.

pub mod bat;
pub mod create;
mod fields;
pub mod file_identifier;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod header;
pub mod log;
pub mod metadata;
pub mod parent_locator;
pub mod region_table;
pub mod sector_bitmap;

use crate::disk::{Extent, Format, OpenOptions, VirtualDisk, check_range};
use crate::error::{CorruptionKind, Error, ErrorKind, IoContext, Result};
use crate::layer::{
    self, Layer, LayerFacts, MappedRun, Mapping, MetadataBudget, Parent, ParentLink, block_pieces,
    copy_up, push_run,
};
use crate::storage::{Storage, write_zeros};
use bat::{BAT_ENTRY_LEN, BAT_PAGE_LEN, Bat, BatEntry, BatLayout, PayloadState, ReservedRange};
use fields::MIB;
use file_identifier::{FILE_IDENTIFIER_LEN, FileIdentifier};
use header::{HEADER_LEN, HEADER_OFFSETS, Header};
use log::{LogUpdate, LogWriter};
use metadata::{DiskParameters, METADATA_TABLE_LEN, MetadataTable, PARENT_LOCATOR};
use parent_locator::ParentLocator;
use parking_lot::{Mutex, RwLock};
use region_table::{
    BAT_REGION, METADATA_REGION, REGION_TABLE_LEN, REGION_TABLE_OFFSETS, RegionTable,
};
use sector_bitmap::{BitmapPage, MAX_LOADED_PAGES, SECTOR_BITMAP_LEN, SectorBitmaps};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use uuid::Uuid;

/// What a differencing image has besides a dynamic one.
struct Differencing {
    locator: ParentLocator,
    /// The parent the locator names.
    link: ParentLink,
    /// Opened read-only (other children may share it) and attached by the chain module.
    parent: Option<Parent>,
    /// Sector bitmaps of the chunks that have one; changed only under the journal lock,
    /// and always before the BAT entries that make them count.
    bitmaps: RwLock<SectorBitmaps>,
}

/// The replayed view of a dirty image opened read-only: the log's updates laid over the
/// file, which is taken as extended to the log's LastFileOffset.
#[derive(Debug)]
struct Overlay {
    updates: Vec<LogUpdate>,
    physical_len: u64,
    logical_len: u64,
}

impl Overlay {
    fn read(&self, storage: &dyn Storage, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.logical_len)
            .ok_or_else(|| {
                Error::corrupt(
                    CorruptionKind::OutOfBounds,
                    "image",
                    format!("read at {offset:#x} past end of file"),
                )
            })?;
        let in_file = self
            .physical_len
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize;
        if in_file > 0 {
            storage
                .read_at(&mut buf[..in_file], offset)
                .context(|| format!("reading {} bytes at {offset:#x}", buf.len()))?;
        }
        buf[in_file..].fill(0);
        for update in &self.updates {
            let (start, len) = (update.file_offset(), update.covered_len());
            let (lo, hi) = (start.max(offset), (start + len).min(end));
            if lo >= hi {
                continue;
            }
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match update {
                LogUpdate::Page { data, .. } => {
                    dst.copy_from_slice(&data[(lo - start) as usize..(hi - start) as usize])
                }
                LogUpdate::Zero { .. } => dst.fill(0),
            }
        }
        Ok(())
    }
}

/// Reads metadata at open: from the file, or through the replayed view when the log was
/// replayed in memory.
fn read_structure(
    storage: &dyn Storage,
    overlay: Option<&Overlay>,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<()> {
    match overlay {
        Some(overlay) => overlay.read(storage, buf, offset),
        None => storage
            .read_at(buf, offset)
            .context(|| format!("reading {what} at {offset:#x}")),
    }
}

/// Everything that changes metadata on disk, serialized.
struct Journal {
    header: Header,
    current_slot: usize,
    file_write_guid_changed: bool,
    data_write_guid_changed: bool,
    /// Set once this session has installed its own LogGuid.
    writer: Option<LogWriter>,
    /// File length; 1 MiB aligned once this session has changed metadata.
    file_end: u64,
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
    params: DiskParameters,
    creator: String,
    bat_offset: u64,
    log_was_dirty: bool,
    /// How BAT indices map onto the disk (the same as `bat.layout`, without the lock).
    layout: BatLayout,
    bat: RwLock<Bat>,
    journal: Mutex<Journal>,
    /// Fast path: the header update for user-visible writes is done.
    data_write_started: AtomicBool,
    /// A metadata change failed after its log entry became durable; the in-place BAT may
    /// be stale until the image is reopened (and the log replayed).
    poisoned: AtomicBool,
    /// Only for read-only opens whose replayed log touched payload or extended the file.
    payload_overlay: Option<Overlay>,
    differencing: Option<Differencing>,
}

impl VhdxDisk {
    /// Opens the VHDX image held by `storage`, a differencing one without its parent.
    pub fn open(storage: Box<dyn Storage>, options: &OpenOptions) -> Result<Self> {
        Self::open_charged(storage, options, &MetadataBudget::default())
    }

    /// Opens the VHDX image held by `storage`, charging the metadata it keeps in memory to
    /// `budget` (its chain's).
    pub fn open_charged(
        storage: Box<dyn Storage>,
        options: &OpenOptions,
        budget: &MetadataBudget,
    ) -> Result<Self> {
        let file_len = storage
            .len()
            .context(|| "cannot read file size".to_string())?;
        if file_len < MIB {
            return Err(Error::corrupt(
                CorruptionKind::Truncated,
                "file",
                format!("is {file_len} bytes, shorter than the 1 MiB header area"),
            ));
        }
        let mut ident = [0u8; FILE_IDENTIFIER_LEN];
        storage
            .read_at(&mut ident, 0)
            .context(|| "reading file identifier".to_string())?;
        let creator = FileIdentifier::parse(&ident)?.creator;

        let mut slots = [[0u8; HEADER_LEN]; 2];
        for (slot, offset) in slots.iter_mut().zip(HEADER_OFFSETS) {
            storage
                .read_at(slot, offset)
                .context(|| format!("reading header at {offset:#x}"))?;
        }
        let (header, current_slot) = header::select_current([&slots[0], &slots[1]])?;
        header.check(file_len)?;

        let mut journal = Journal {
            header,
            current_slot,
            file_write_guid_changed: false,
            data_write_guid_changed: false,
            writer: None,
            file_end: file_len,
        };
        let log_was_dirty = journal.header.log_is_dirty();
        let overlay = replay_log(storage.as_ref(), &journal, file_len)?;
        let file_len = match &overlay {
            Some(o) => o.logical_len,
            None => storage
                .len()
                .context(|| "cannot read file size".to_string())?,
        };
        journal.file_end = file_len;

        let mut copies = [vec![0u8; REGION_TABLE_LEN], vec![0u8; REGION_TABLE_LEN]];
        for (copy, offset) in copies.iter_mut().zip(REGION_TABLE_OFFSETS) {
            read_structure(
                storage.as_ref(),
                overlay.as_ref(),
                copy,
                offset,
                "region table",
            )?;
        }
        let regions = RegionTable::parse_either([&copies[0], &copies[1]])?;
        let reserved = reserved_ranges(&journal.header, &regions, file_len)?;

        let meta_region = regions.find(METADATA_REGION);
        let mut table = vec![0u8; METADATA_TABLE_LEN];
        read_structure(
            storage.as_ref(),
            overlay.as_ref(),
            &mut table,
            meta_region.file_offset,
            "metadata table",
        )?;
        let table = MetadataTable::parse(&table, u64::from(meta_region.length))?;
        let params = DiskParameters::read(&table, |offset, len| {
            let mut item = vec![0u8; len];
            read_structure(
                storage.as_ref(),
                overlay.as_ref(),
                &mut item,
                meta_region.file_offset + u64::from(offset),
                "metadata item",
            )?;
            Ok(item)
        })?;
        let locator = if params.has_parent {
            let item = table.find(PARENT_LOCATOR).ok_or_else(|| {
                Error::corrupt(
                    CorruptionKind::InvalidField,
                    "metadata table",
                    "a differencing image has no parent locator item",
                )
            })?;
            let mut bytes = vec![0u8; item.length as usize];
            read_structure(
                storage.as_ref(),
                overlay.as_ref(),
                &mut bytes,
                meta_region.file_offset + u64::from(item.offset),
                "parent locator",
            )?;
            Some(ParentLocator::parse(&bytes)?)
        } else {
            None
        };

        let layout = BatLayout::new(
            params.virtual_size,
            params.block_size,
            params.logical_sector_size,
            params.has_parent,
        );
        let bat_region = regions.find(BAT_REGION);
        let loaded = Bat::loaded_len(&layout, u64::from(bat_region.length))?;
        budget.charge(loaded, "the VHDX BAT")?;
        let bat = Bat::load(layout, loaded, |buf, offset| {
            read_structure(
                storage.as_ref(),
                overlay.as_ref(),
                buf,
                bat_region.file_offset + offset,
                "BAT",
            )
        })?;
        bat.validate(params.virtual_size, file_len, &reserved)?;
        let bitmaps = match &locator {
            Some(_) => {
                let bitmaps = load_sector_bitmaps(storage.as_ref(), overlay.as_ref(), &bat)?;
                budget.charge(
                    (bitmaps.page_count() * BAT_PAGE_LEN) as u64,
                    "the sector bitmaps of this VHDX differencing disk",
                )?;
                Some(bitmaps)
            }
            None => None,
        };

        let differencing = match (locator, bitmaps) {
            (Some(locator), Some(bitmaps)) => Some(Differencing {
                link: ParentLink {
                    paths: locator.paths(),
                    identities: locator
                        .linkages()?
                        .iter()
                        .map(|id| *id.as_bytes())
                        .collect(),
                    format: Format::Vhdx,
                    child_kind: "VHDX differencing disk",
                },
                locator,
                parent: None,
                bitmaps: RwLock::new(bitmaps),
            }),
            _ => None,
        };

        // A read/write open writes the replayed log into the file only now, once all it
        // holds was checked: an image refused above is left as it was. Reads then find
        // everything in the file; a read-only open keeps the replayed view, and its payload
        // path consults it only if the log wrote outside the metadata structures or the
        // file is shorter than the view.
        let payload_overlay = match overlay {
            Some(replay) if !options.read_only => {
                replay_to_file(storage.as_ref(), &mut journal, &replay)?;
                None
            }
            overlay => overlay.and_then(|mut o| {
                let metadata_area = |u: &LogUpdate| {
                    let (s, e) = (u.file_offset(), u.file_offset() + u.covered_len());
                    (s >= REGION_TABLE_OFFSETS[0]
                        && e <= REGION_TABLE_OFFSETS[1] + REGION_TABLE_LEN as u64)
                        || reserved[1..].iter().any(|r| s >= r.start && e <= r.end)
                };
                o.updates.retain(|u| !metadata_area(u));
                (!o.updates.is_empty() || o.logical_len > o.physical_len).then_some(o)
            }),
        };

        Ok(VhdxDisk {
            storage,
            read_only: options.read_only,
            creator,
            bat_offset: bat_region.file_offset,
            log_was_dirty,
            layout: bat.layout,
            bat: RwLock::new(bat),
            journal: Mutex::new(journal),
            data_write_started: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            payload_overlay,
            params,
            differencing,
        })
    }

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
                .map(|d| d.locator.entries.clone()),
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

    /// Before the first user-visible change of a session: new FileWriteGuid and
    /// DataWriteGuid in both headers.
    fn begin_user_write(&self) -> Result<()> {
        if self.data_write_started.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut j = self.journal.lock();
        if !j.data_write_guid_changed {
            update_header(self.storage.as_ref(), &mut j, |h| {
                h.data_write_guid = Uuid::new_v4()
            })?;
            j.data_write_guid_changed = true;
        }
        self.data_write_started.store(true, Ordering::Release);
        Ok(())
    }

    /// Journals and applies BAT entry and sector bitmap page changes: log entry durable,
    /// then the pages in place durable, then the in-memory bitmaps and BAT (bitmaps first,
    /// so a reader that sees a new PARTIALLY_PRESENT entry sees its bits).
    fn commit(
        &self,
        j: &mut Journal,
        changes: &[(u64, BatEntry)],
        bitmap_pages: &[BitmapPageChange],
    ) -> Result<()> {
        if j.writer.is_none() {
            let aligned = j.file_end.next_multiple_of(MIB);
            if aligned != j.file_end {
                // FlushedFileOffset must be a durable, 1 MiB aligned file size.
                self.storage
                    .set_len(aligned)
                    .context(|| "extending file to a 1 MiB boundary".to_string())?;
                self.storage
                    .flush()
                    .context(|| "flushing file extension".to_string())?;
                j.file_end = aligned;
            }
            let log_guid = Uuid::new_v4();
            update_header(self.storage.as_ref(), j, |h| h.log_guid = log_guid)?;
            j.writer = Some(LogWriter::new(
                j.header.log_offset,
                j.header.log_length,
                log_guid,
            ));
        }
        let encoded: Vec<(u64, [u8; 8])> = changes
            .iter()
            .map(|&(index, entry)| {
                (
                    self.bat_offset + index * BAT_ENTRY_LEN,
                    entry.0.to_le_bytes(),
                )
            })
            .collect();
        let ranges: Vec<(u64, &[u8])> = encoded.iter().map(|(o, b)| (*o, &b[..])).collect();
        let pages =
            {
                let bat = self.bat.read();
                log::merge_into_pages(&ranges, |page_offset| {
                    Ok(bat.page_bytes(
                        ((page_offset - self.bat_offset) / BAT_PAGE_LEN as u64) as usize,
                    ))
                })?
            };
        let updates: Vec<LogUpdate> = pages
            .into_iter()
            .chain(
                bitmap_pages
                    .iter()
                    .map(|change| (change.file_offset, change.contents.clone())),
            )
            .map(|(file_offset, data)| LogUpdate::Page { file_offset, data })
            .collect();
        let file_end = j.file_end;
        let writer = j.writer.as_mut().unwrap();
        for group in writer.split(&updates) {
            writer.write_entry(self.storage.as_ref(), group, file_end, file_end)?;
            self.storage
                .flush()
                .context(|| "flushing log entry".to_string())?;
            let applied = group.iter().try_for_each(|u| match u {
                LogUpdate::Page { file_offset, data } => self
                    .storage
                    .write_at(&data[..], *file_offset)
                    .context(|| format!("writing metadata page at {file_offset:#x}")),
                LogUpdate::Zero { .. } => unreachable!("metadata changes are whole pages"),
            });
            if let Err(e) = applied.and_then(|_| {
                self.storage
                    .flush()
                    .context(|| "flushing metadata pages".to_string())
            }) {
                self.poisoned.store(true, Ordering::Release);
                return Err(e);
            }
        }
        if let Some(d) = &self.differencing {
            let mut bitmaps = d.bitmaps.write();
            for change in bitmap_pages {
                bitmaps.apply_page(change.chunk, change.page, &change.contents);
            }
        }
        let mut bat = self.bat.write();
        for &(index, entry) in changes {
            bat.set(index, entry);
        }
        Ok(())
    }

    /// Reserves `len` bytes at the next 1 MiB boundary past the end of the file (reading
    /// as zeros) and returns where they start.
    fn extend_file(&self, j: &mut Journal, len: u64, what: &str) -> Result<u64> {
        let start = j.file_end.next_multiple_of(MIB);
        let end = start
            .checked_add(len)
            .ok_or_else(|| Error::invalid_input("image file would exceed the largest offset"))?;
        self.storage
            .set_len(end)
            .context(|| format!("extending file for {what}"))?;
        j.file_end = end;
        Ok(start)
    }

    /// Writes pieces that need metadata changes: blocks without data are allocated at the
    /// end of the file, data is written and flushed, then new sector bitmap blocks, and
    /// after them the payload entries and bitmap bits, are journaled.
    fn write_allocating(&self, pieces: &[(u64, u64, &[u8])]) -> Result<()> {
        let mut j = self.journal.lock();
        let layout = self.layout;
        let mut changes = Vec::new();
        let mut new_bitmaps: Vec<(u64, BatEntry)> = Vec::new();
        let mut bits: BitAssignments = Vec::new();
        for &(block, in_block, data) in pieces {
            // Another writer may have allocated the block, or set its bits, meanwhile.
            if self.write_in_place(data, block, in_block)? {
                continue;
            }
            let (index, entry) = {
                let bat = self.bat.read();
                (layout.payload_index(block), bat.payload(block))
            };
            let written = in_block..in_block + data.len() as u64;
            match (entry.payload_state(), &self.differencing) {
                (Some(PayloadState::PartiallyPresent), Some(d)) => {
                    self.write_sectors(d, block, entry.file_offset(), in_block, data, false)?;
                    let (chunk, sectors, _) = self.sector_bits(block, &written);
                    add_bits(&mut bits, chunk, sectors, true);
                }
                (Some(PayloadState::NotPresent), Some(d)) => {
                    let start = self.extend_file(&mut j, layout.block_size, "a block")?;
                    self.write_sectors(d, block, start, in_block, data, true)?;
                    let (chunk, sectors, base) = self.sector_bits(block, &written);
                    // Bits of a block that had no data mean nothing: start from clear.
                    let per_block = layout.block_size / u64::from(self.params.logical_sector_size);
                    add_bits(&mut bits, chunk, base..base + per_block, false);
                    add_bits(&mut bits, chunk, sectors, true);
                    let has_bitmap = self.bat.read().sector_bitmap(block).payload_state()
                        == Some(PayloadState::FullyPresent);
                    let bitmap_index = layout.sector_bitmap_index(block);
                    if !has_bitmap && !new_bitmaps.iter().any(|(i, _)| *i == bitmap_index) {
                        let at = self.extend_file(&mut j, MIB, "a sector bitmap")?;
                        new_bitmaps
                            .push((bitmap_index, BatEntry::new(PayloadState::FullyPresent, at)));
                    }
                    changes.push((index, BatEntry::new(PayloadState::PartiallyPresent, start)));
                }
                // Blocks that read as zeros: the file's extension reads as zeros, so the
                // block holds exactly what it must once the data is in.
                _ => {
                    let start = self.extend_file(&mut j, layout.block_size, "a block")?;
                    self.write_payload(data, start + in_block)?;
                    changes.push((index, BatEntry::new(PayloadState::FullyPresent, start)));
                }
            }
        }
        if changes.is_empty() && bits.is_empty() {
            return Ok(());
        }
        self.storage
            .flush()
            .context(|| "flushing new blocks".to_string())?;
        // A PARTIALLY_PRESENT entry must never be durable before its chunk's bitmap entry.
        if !new_bitmaps.is_empty() {
            self.commit(&mut j, &new_bitmaps, &[])?;
        }
        let mut pages = Vec::new();
        if let Some(d) = &self.differencing {
            let bat = self.bat.read();
            let bitmaps = d.bitmaps.read();
            for (chunk, assign) in &bits {
                let at = bat.sector_bitmap(chunk * layout.chunk_ratio).file_offset();
                for (page, contents) in bitmaps.changed_pages(*chunk, assign) {
                    pages.push(BitmapPageChange {
                        chunk: *chunk,
                        page,
                        file_offset: at + page * BAT_PAGE_LEN as u64,
                        contents,
                    });
                }
            }
        }
        self.commit(&mut j, &changes, &pages)
    }

    /// Writes `data` where block `block` already keeps it in this file; `false` when the
    /// write needs metadata changes first.
    fn write_in_place(&self, data: &[u8], block: u64, in_block: u64) -> Result<bool> {
        let entry = self.bat.read().payload(block);
        match (entry.payload_state(), &self.differencing) {
            (Some(PayloadState::FullyPresent), _) => {}
            (Some(PayloadState::PartiallyPresent), Some(d)) => {
                let written = in_block..in_block + data.len() as u64;
                if self
                    .sector_runs(d, block, &written)
                    .iter()
                    .any(|(_, present)| !present)
                {
                    return Ok(false);
                }
            }
            (Some(PayloadState::PartiallyPresent), None) => {
                return Err(self.partially_present(block));
            }
            _ => return Ok(false),
        }
        self.write_payload(data, entry.file_offset() + in_block)?;
        Ok(true)
    }

    /// Writes `data` at `in_block` of a child's block stored at `file_start`, filling the
    /// rest of its first and last sectors with the parent's bytes where those sectors are
    /// still the parent's (all of them if `all_parent`), so whole sectors can become this
    /// file's.
    fn write_sectors(
        &self,
        d: &Differencing,
        block: u64,
        file_start: u64,
        in_block: u64,
        data: &[u8],
        all_parent: bool,
    ) -> Result<()> {
        let sector = u64::from(self.params.logical_sector_size);
        let end = in_block + data.len() as u64;
        let parents = |at: u64| all_parent || !self.sector_runs(d, block, &(at..at + 1))[0].1;
        let head = in_block - in_block % sector;
        let start = if head < in_block && parents(head) {
            head
        } else {
            in_block
        };
        let tail = end.next_multiple_of(sector);
        let stop = if tail > end && parents(end - end % sector) {
            tail
        } else {
            end
        };
        if (start, stop) == (in_block, end) {
            return self.write_payload(data, file_start + in_block);
        }
        let block_start = block * self.layout.block_size;
        let merged = copy_up(
            d.parent.as_ref(),
            block_start + start..block_start + stop,
            block_start + in_block,
            data,
        )?;
        self.write_payload(&merged, file_start + start)
    }

    /// The chunk of `block`, the bitmap bits of the sectors that the byte range `bytes`
    /// of the block touches, and the block's first bit.
    fn sector_bits(&self, block: u64, bytes: &Range<u64>) -> (u64, Range<u64>, u64) {
        let sector = u64::from(self.params.logical_sector_size);
        let ratio = self.layout.chunk_ratio;
        let base = (block % ratio) * (self.layout.block_size / sector);
        (
            block / ratio,
            base + bytes.start / sector..base + bytes.end.div_ceil(sector),
            base,
        )
    }

    /// Splits `bytes` (offsets inside `block`) into runs held by this file (`true`) or by
    /// the parent, as the block's sector bitmap says.
    fn sector_runs(
        &self,
        d: &Differencing,
        block: u64,
        bytes: &Range<u64>,
    ) -> Vec<(Range<u64>, bool)> {
        let sector = u64::from(self.params.logical_sector_size);
        let (chunk, bits, base) = self.sector_bits(block, bytes);
        d.bitmaps
            .read()
            .runs(chunk, bits)
            .into_iter()
            .map(|(run, present)| {
                (
                    ((run.start - base) * sector).max(bytes.start)
                        ..((run.end - base) * sector).min(bytes.end),
                    present,
                )
            })
            .collect()
    }

    fn write_payload(&self, data: &[u8], file_offset: u64) -> Result<()> {
        self.storage
            .write_at(data, file_offset)
            .context(|| format!("writing {} bytes at {file_offset:#x}", data.len()))
    }
}

/// A sector bitmap page to journal: its new contents and where it goes.
struct BitmapPageChange {
    chunk: u64,
    page: u64,
    file_offset: u64,
    contents: BitmapPage,
}

/// Per chunk, sector ranges and the value their bits take, later ranges winning.
type BitAssignments = Vec<(u64, Vec<(Range<u64>, bool)>)>;

/// Records that `sectors` (bits of `chunk`) take `value`; later records win.
fn add_bits(bits: &mut BitAssignments, chunk: u64, sectors: Range<u64>, value: bool) {
    match bits.iter_mut().find(|(c, _)| *c == chunk) {
        Some((_, assign)) => assign.push((sectors, value)),
        None => bits.push((chunk, vec![(sectors, value)])),
    }
}

/// Loads the sector bitmap block of every chunk whose BAT entry has one, and checks that
/// each PARTIALLY_PRESENT block has one.
fn load_sector_bitmaps(
    storage: &dyn Storage,
    overlay: Option<&Overlay>,
    bat: &Bat,
) -> Result<SectorBitmaps> {
    let layout = &bat.layout;
    let mut bitmaps = SectorBitmaps::default();
    let mut block = vec![0u8; SECTOR_BITMAP_LEN];
    for chunk in 0..layout.payload_blocks.div_ceil(layout.chunk_ratio) {
        let first = chunk * layout.chunk_ratio;
        let entry = bat.sector_bitmap(first);
        if entry.payload_state() == Some(PayloadState::FullyPresent) {
            read_structure(
                storage,
                overlay,
                &mut block,
                entry.file_offset(),
                "sector bitmap",
            )?;
            bitmaps.insert(chunk, &block);
            if bitmaps.page_count() > MAX_LOADED_PAGES {
                return Err(Error::unsupported(format!(
                    "sector bitmaps with more than {} MiB of set bits; this reader keeps \
                     at most that much in memory",
                    (MAX_LOADED_PAGES * BAT_PAGE_LEN) >> 20
                )));
            }
            continue;
        }
        let last = (first + layout.chunk_ratio).min(layout.payload_blocks);
        if let Some(block) = (first..last)
            .find(|&b| bat.payload(b).payload_state() == Some(PayloadState::PartiallyPresent))
        {
            return Err(Error::corrupt(
                CorruptionKind::InvalidField,
                format!("BAT entry {}", layout.payload_index(block)),
                "block is PARTIALLY_PRESENT but its chunk has no sector bitmap",
            ));
        }
    }
    Ok(bitmaps)
}

/// Replays a dirty log: into the file for read/write opens, or into the returned overlay
/// for read-only ones, which must leave the file untouched.
fn replay_log(storage: &dyn Storage, journal: &Journal, file_len: u64) -> Result<Option<Overlay>> {
    let h = &journal.header;
    if !h.log_is_dirty() {
        return Ok(None);
    }
    let ring = log::read_ring(storage, h.log_offset, h.log_length)?;
    let Some(sequence) = log::find_active_sequence(&ring, h.log_guid)? else {
        ::log::warn!(
            "log {} holds no valid sequence; nothing to replay",
            h.log_guid
        );
        return Ok(None);
    };
    log::check_sequence_against_file(&sequence, file_len)?;
    let logical_len = file_len.max(sequence.head().last_file_offset);
    let mut updates = Vec::new();
    for entry in sequence.entries {
        for update in entry.updates {
            if update.file_offset() + update.covered_len() > logical_len {
                return Err(Error::corrupt(
                    CorruptionKind::OutOfBounds,
                    format!("log entry {}", entry.sequence),
                    format!(
                        "update at {:#x} lies past the end of the file",
                        update.file_offset()
                    ),
                ));
            }
            updates.push(update);
        }
    }
    Ok(Some(Overlay {
        updates,
        physical_len: file_len,
        logical_len,
    }))
}

/// Checks every region against the file and the log, and returns the ranges no block may
/// overlap: the log first, then each region.
fn reserved_ranges(
    header: &Header,
    regions: &RegionTable,
    file_len: u64,
) -> Result<Vec<ReservedRange>> {
    let log = ReservedRange {
        start: header.log_offset,
        end: header.log_offset + u64::from(header.log_length),
        name: "log",
    };
    let mut reserved = vec![log];
    for region in &regions.entries {
        let name = match region.guid {
            BAT_REGION => "BAT region",
            METADATA_REGION => "metadata region",
            _ => "region",
        };
        let bad = |problem: String| {
            Err(Error::corrupt(
                CorruptionKind::OutOfBounds,
                format!("region table: {name} {}", region.guid),
                problem,
            ))
        };
        if region.end() > file_len {
            return bad(format!(
                "at {:#x} extends past end of file ({file_len:#x})",
                region.file_offset
            ));
        }
        if region.file_offset < reserved[0].end && reserved[0].start < region.end() {
            return bad(format!("at {:#x} overlaps the log", region.file_offset));
        }
        reserved.push(ReservedRange {
            start: region.file_offset,
            end: region.end(),
            name,
        });
    }
    Ok(reserved)
}

/// Replaces the current header by the two-step procedure: the changed header goes to the
/// other slot and is flushed, then to the first slot. The first update of a session also
/// installs a new FileWriteGuid.
fn update_header(
    storage: &dyn Storage,
    j: &mut Journal,
    change: impl FnOnce(&mut Header),
) -> Result<()> {
    let mut next = j.header.clone();
    change(&mut next);
    if !j.file_write_guid_changed {
        next.file_write_guid = Uuid::new_v4();
    }
    for _ in 0..2 {
        next.sequence_number = j.header.sequence_number.checked_add(1).ok_or_else(|| {
            Error::corrupt(
                CorruptionKind::InvalidField,
                "header",
                "sequence number exhausted",
            )
        })?;
        let slot = 1 - j.current_slot;
        storage
            .write_at(&next.to_bytes(), HEADER_OFFSETS[slot])
            .context(|| format!("writing header {}", slot + 1))?;
        storage
            .flush()
            .context(|| format!("flushing header {}", slot + 1))?;
        j.header = next.clone();
        j.current_slot = slot;
    }
    j.file_write_guid_changed = true;
    Ok(())
}

/// Replays the log's updates into the file, then marks the log empty. The header update
/// before replay keeps the LogGuid, so a crash during replay leaves the log replayable.
fn replay_to_file(storage: &dyn Storage, j: &mut Journal, replay: &Overlay) -> Result<()> {
    update_header(storage, j, |_| {})?;
    for update in &replay.updates {
        match update {
            LogUpdate::Page { file_offset, data } => storage
                .write_at(&data[..], *file_offset)
                .context(|| format!("replaying log page to {file_offset:#x}"))?,
            // Past the end of the file is zeros already, or will be once the file is
            // extended below: only what the file holds is written, whatever length a
            // damaged entry claims.
            LogUpdate::Zero {
                file_offset,
                length,
            } => {
                let file_len = storage
                    .len()
                    .context(|| "cannot read file size".to_string())?;
                let end = (file_offset + length).min(file_len);
                if end > *file_offset {
                    write_zeros(storage, *file_offset, end - file_offset)
                        .context(|| format!("replaying log zeros to {file_offset:#x}"))?;
                }
            }
        }
    }
    let len = storage
        .len()
        .context(|| "cannot read file size".to_string())?;
    if len < replay.logical_len {
        storage
            .set_len(replay.logical_len)
            .context(|| "extending file to the log's LastFileOffset".to_string())?;
    }
    storage
        .flush()
        .context(|| "flushing replayed log".to_string())?;
    update_header(storage, j, |h| h.log_guid = Uuid::nil())
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
        self.storage
            .flush()
            .context(|| "flushing image".to_string())
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        layer::allocation(self, offset, len)
    }

    /// Whole blocks become ZERO (in a child too: NOT_PRESENT would bring the parent's data
    /// back); parts of blocks are overwritten with zeros.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
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
        write_zeros(self.storage.as_ref(), file_offset, len)
            .context(|| format!("zeroing {len} bytes at {file_offset:#x}"))
    }

    /// Whole blocks that hold anything become ZERO, through the log; unless the image is
    /// fixed, whose blocks keep their space.
    fn release_blocks(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        self.check_writable()?;
        self.begin_user_write()?;
        let block_size = self.layout.block_size;
        let child = self.differencing.is_some();
        let mut whole_blocks = Vec::new();
        let mut rest: Vec<(u64, u64)> = Vec::new();
        for piece in block_pieces(offset, len, block_size) {
            let state = self.bat.read().payload(piece.block).payload_state();
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
        if !whole_blocks.is_empty() {
            let mut j = self.journal.lock();
            let changes: Vec<(u64, BatEntry)> = whole_blocks
                .iter()
                .map(|&b| {
                    (
                        self.layout.payload_index(b),
                        BatEntry::new(PayloadState::Zero, 0),
                    )
                })
                .collect();
            self.commit(&mut j, &changes, &[])?;
        }
        Ok(rest)
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

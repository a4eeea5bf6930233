//! VHDX images (dynamic and fixed): open with log replay, reads, allocating writes whose
//! BAT changes go through the log, discard.
//!
//! Locking: the BAT lives in memory under a read/write lock that the data path holds only
//! long enough to copy one entry; payload I/O runs outside it. Everything that changes
//! metadata on disk (header updates, block allocation, log entries, BAT pages) is
//! serialized by the journal mutex, taken before the BAT lock when both are needed.
//!
//! Log policy: the first metadata change of a session installs a fresh LogGuid. Each
//! change is written as a log entry and flushed, then applied to the BAT in place and
//! flushed, so every entry is fully applied before the next is written (each entry's Tail
//! is itself). A crash therefore leaves at most one entry to replay, and replaying an
//! applied entry again is harmless. A clean close sets LogGuid back to zero.

pub mod bat;
mod fields;
pub mod file_identifier;
pub mod header;
pub mod log;
pub mod metadata;
pub mod region_table;

use crate::disk::{Allocation, Extent, Format, OpenOptions, VirtualDisk, check_range, push_extent};
use crate::error::{CorruptionKind, Error, ErrorKind, IoContext, Result};
use crate::storage::Storage;
use bat::{BAT_ENTRY_LEN, BAT_PAGE_LEN, Bat, BatEntry, BatLayout, PayloadState, ReservedRange};
use fields::MIB;
use file_identifier::{FILE_IDENTIFIER_LEN, FileIdentifier};
use header::{HEADER_LEN, HEADER_OFFSETS, Header};
use log::{LogUpdate, LogWriter};
use metadata::{DiskParameters, METADATA_TABLE_LEN, MetadataTable};
use parking_lot::{Mutex, RwLock};
use region_table::{
    BAT_REGION, METADATA_REGION, REGION_TABLE_LEN, REGION_TABLE_OFFSETS, RegionTable,
};
use std::sync::atomic::{AtomicBool, Ordering};
use uuid::Uuid;

pub fn open(storage: Box<dyn Storage>, options: &OpenOptions) -> Result<Box<dyn VirtualDisk>> {
    Ok(Box::new(VhdxDisk::open(storage, options)?))
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
}

pub struct VhdxDisk {
    storage: Box<dyn Storage>,
    read_only: bool,
    params: DiskParameters,
    creator: String,
    bat_offset: u64,
    log_was_dirty: bool,
    bat: RwLock<Bat>,
    journal: Mutex<Journal>,
    /// Fast path: the header update for user-visible writes is done.
    data_write_started: AtomicBool,
    /// A metadata change failed after its log entry became durable; the in-place BAT may
    /// be stale until the image is reopened (and the log replayed).
    poisoned: AtomicBool,
    /// Only for read-only opens whose replayed log touched payload or extended the file.
    payload_overlay: Option<Overlay>,
}

impl VhdxDisk {
    pub fn open(storage: Box<dyn Storage>, options: &OpenOptions) -> Result<Self> {
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
        let overlay = replay_log(storage.as_ref(), &mut journal, file_len, options.read_only)?;
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
        if params.has_parent {
            return Err(Error::unsupported("differencing VHDX is not supported yet"));
        }

        let layout = BatLayout::new(
            params.virtual_size,
            params.block_size,
            params.logical_sector_size,
            params.has_parent,
        );
        let bat_region = regions.find(BAT_REGION);
        let loaded = Bat::loaded_len(&layout, u64::from(bat_region.length))?;
        let mut bytes = Vec::new();
        bytes
            .try_reserve_exact(loaded)
            .map_err(|_| Error::unsupported("BAT too large for this machine's memory"))?;
        bytes.resize(loaded, 0);
        read_structure(
            storage.as_ref(),
            overlay.as_ref(),
            &mut bytes,
            bat_region.file_offset,
            "BAT",
        )?;
        let bat = Bat::from_bytes(layout, &bytes);
        bat.validate(params.virtual_size, file_len, &reserved)?;

        // The payload path consults the overlay only if the log wrote outside the metadata
        // structures or the file is shorter than the replayed view.
        let payload_overlay = overlay.and_then(|mut o| {
            let metadata_area = |u: &LogUpdate| {
                let (s, e) = (u.file_offset(), u.file_offset() + u.covered_len());
                (s >= REGION_TABLE_OFFSETS[0]
                    && e <= REGION_TABLE_OFFSETS[1] + REGION_TABLE_LEN as u64)
                    || reserved[1..].iter().any(|r| s >= r.start && e <= r.end)
            };
            o.updates.retain(|u| !metadata_area(u));
            (!o.updates.is_empty() || o.logical_len > o.physical_len).then_some(o)
        });

        Ok(VhdxDisk {
            storage,
            read_only: options.read_only,
            creator,
            bat_offset: bat_region.file_offset,
            log_was_dirty,
            bat: RwLock::new(bat),
            journal: Mutex::new(journal),
            data_write_started: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            payload_overlay,
            params,
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
            fixed: self.params.leave_blocks_allocated,
        }
    }

    /// Splits `[offset, offset + len)` at block boundaries: (block, offset in block,
    /// offset in the request, length).
    fn pieces(&self, offset: u64, len: usize) -> impl Iterator<Item = (u64, u64, usize, usize)> {
        let block_size = u64::from(self.params.block_size);
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let pos = offset + done as u64;
            let (block, in_block) = (pos / block_size, pos % block_size);
            let n = ((block_size - in_block) as usize).min(len - done);
            let piece = (block, in_block, done, n);
            done += n;
            Some(piece)
        })
    }

    fn partially_present(&self, block: u64) -> Error {
        let index = self.bat.read().layout.payload_index(block);
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

    /// Journals and applies BAT changes: log entry durable, then BAT pages in place
    /// durable, then the in-memory BAT.
    fn commit_bat(&self, j: &mut Journal, changes: &[(u64, BatEntry)]) -> Result<()> {
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
                    .context(|| format!("writing BAT page at {file_offset:#x}")),
                LogUpdate::Zero { .. } => unreachable!("BAT changes are whole pages"),
            });
            if let Err(e) =
                applied.and_then(|_| self.storage.flush().context(|| "flushing BAT".to_string()))
            {
                self.poisoned.store(true, Ordering::Release);
                return Err(e);
            }
        }
        let mut bat = self.bat.write();
        for &(index, entry) in changes {
            bat.set(index, entry);
        }
        Ok(())
    }

    /// Writes pieces that fell into blocks without data: allocates each block at the end of
    /// the file, writes the data, flushes, then journals the new BAT entries.
    fn write_allocating(&self, pieces: &[(u64, u64, &[u8])]) -> Result<()> {
        let mut j = self.journal.lock();
        let block_size = u64::from(self.params.block_size);
        let mut changes = Vec::new();
        for &(block, in_block, data) in pieces {
            let (index, entry) = {
                let bat = self.bat.read();
                (bat.layout.payload_index(block), bat.payload(block))
            };
            match entry.payload_state() {
                Some(PayloadState::FullyPresent) => {
                    // Another writer allocated it while this one waited.
                    self.write_payload(data, entry.file_offset() + in_block)?;
                    continue;
                }
                Some(PayloadState::PartiallyPresent) => return Err(self.partially_present(block)),
                _ => {}
            }
            let start = j.file_end.next_multiple_of(MIB);
            let end = start.checked_add(block_size).ok_or_else(|| {
                Error::invalid_input("image file would exceed the largest offset")
            })?;
            // The extension reads as zeros: the rest of the block needs no explicit write.
            self.storage
                .set_len(end)
                .context(|| format!("extending file for block {block}"))?;
            j.file_end = end;
            self.write_payload(data, start + in_block)?;
            changes.push((index, BatEntry::new(PayloadState::FullyPresent, start)));
        }
        if changes.is_empty() {
            return Ok(());
        }
        self.storage
            .flush()
            .context(|| "flushing new blocks".to_string())?;
        self.commit_bat(&mut j, &changes)
    }

    fn write_payload(&self, data: &[u8], file_offset: u64) -> Result<()> {
        self.storage
            .write_at(data, file_offset)
            .context(|| format!("writing {} bytes at {file_offset:#x}", data.len()))
    }
}

/// Replays a dirty log: into the file for read/write opens, or into the returned overlay
/// for read-only ones, which must leave the file untouched.
fn replay_log(
    storage: &dyn Storage,
    journal: &mut Journal,
    file_len: u64,
    read_only: bool,
) -> Result<Option<Overlay>> {
    let h = &journal.header;
    if !h.log_is_dirty() {
        return Ok(None);
    }
    let ring = log::read_ring(storage, h.log_offset, h.log_length)?;
    let Some(sequence) = log::find_active_sequence(&ring, h.log_guid) else {
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
    let replay = Overlay {
        updates,
        physical_len: file_len,
        logical_len,
    };
    if read_only {
        return Ok(Some(replay));
    }
    replay_to_file(storage, journal, &replay)?;
    Ok(None)
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

/// Writes `len` zero bytes at `offset`, a bounded buffer at a time.
fn write_zeros(storage: &dyn Storage, offset: u64, len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; len.min(MIB) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(MIB);
        storage.write_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
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
            LogUpdate::Zero {
                file_offset,
                length,
            } => write_zeros(storage, *file_offset, *length)
                .context(|| format!("replaying log zeros to {file_offset:#x}"))?,
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
        check_range(self.size(), offset, buf.len())?;
        for (block, in_block, at, n) in self.pieces(offset, buf.len()) {
            let entry = self.bat.read().payload(block);
            let piece = &mut buf[at..at + n];
            match entry.payload_state() {
                Some(PayloadState::FullyPresent) => {
                    self.read_payload(piece, entry.file_offset() + in_block)?
                }
                Some(PayloadState::PartiallyPresent) => return Err(self.partially_present(block)),
                _ => piece.fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_range(self.size(), offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.begin_user_write()?;
        let mut unallocated = Vec::new();
        for (block, in_block, at, n) in self.pieces(offset, buf.len()) {
            let entry = self.bat.read().payload(block);
            let piece = &buf[at..at + n];
            match entry.payload_state() {
                Some(PayloadState::FullyPresent) => {
                    self.write_payload(piece, entry.file_offset() + in_block)?
                }
                Some(PayloadState::PartiallyPresent) => return Err(self.partially_present(block)),
                _ => unallocated.push((block, in_block, piece)),
            }
        }
        if unallocated.is_empty() {
            return Ok(());
        }
        self.write_allocating(&unallocated)
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
        let len_usize = usize::try_from(len).map_err(|_| Error::invalid_input("range too long"))?;
        check_range(self.size(), offset, len_usize)?;
        let mut extents = Vec::new();
        let bat = self.bat.read();
        for (block, _, at, n) in self.pieces(offset, len_usize) {
            let state = match bat.payload(block).payload_state() {
                Some(PayloadState::FullyPresent) => Allocation::Data,
                Some(PayloadState::PartiallyPresent) => {
                    drop(bat);
                    return Err(self.partially_present(block));
                }
                _ => Allocation::Zero,
            };
            push_extent(&mut extents, offset + at as u64, n as u64, state);
        }
        Ok(extents)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let len_usize = usize::try_from(len).map_err(|_| Error::invalid_input("range too long"))?;
        check_range(self.size(), offset, len_usize)?;
        if len == 0 {
            return Ok(());
        }
        self.begin_user_write()?;
        let block_size = u64::from(self.params.block_size);
        let mut whole_blocks = Vec::new();
        for (block, in_block, _, n) in self.pieces(offset, len_usize) {
            let entry = self.bat.read().payload(block);
            match entry.payload_state() {
                Some(PayloadState::FullyPresent) => {}
                Some(PayloadState::PartiallyPresent) => return Err(self.partially_present(block)),
                _ => continue,
            }
            let block_len = block_size.min(self.size() - block * block_size);
            if in_block == 0 && n as u64 == block_len && !self.params.leave_blocks_allocated {
                whole_blocks.push(block);
            } else {
                let at = entry.file_offset() + in_block;
                write_zeros(self.storage.as_ref(), at, n as u64)
                    .context(|| format!("zeroing {n} bytes at {at:#x}"))?;
            }
        }
        if whole_blocks.is_empty() {
            return Ok(());
        }
        let mut j = self.journal.lock();
        let changes: Vec<(u64, BatEntry)> = {
            let bat = self.bat.read();
            whole_blocks
                .iter()
                .map(|&b| {
                    (
                        bat.layout.payload_index(b),
                        BatEntry::new(PayloadState::Zero, 0),
                    )
                })
                .collect()
        };
        self.commit_bat(&mut j, &changes)
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

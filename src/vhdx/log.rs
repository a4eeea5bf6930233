//! The metadata log: a ring of entries, each a list of 4 KiB page writes and zeroed ranges
//! that must reach their final places in the file. Parses entries, finds the active
//! sequence to replay (MS-VHDX §2.3.3), and builds entries for the writer.

use super::fields::seal_crc32c;
use super::format::{
    RawDataDescriptor, RawDataSector, RawLogEntryHeader, RawLoggedPage, RawZeroDescriptor,
};
use crate::error::{CorruptionKind, Error, IoContext, Result};
use crate::storage::Storage;
use core::mem::offset_of;
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;
use zerocopy::{FromBytes, IntoBytes};

pub const LOG_SECTOR: usize = 4096;
const SECTOR: u64 = LOG_SECTOR as u64;

pub(super) const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
const CHECKSUM_AT: usize = offset_of!(RawLogEntryHeader, checksum);
const DESCRIPTOR_LEN: usize = size_of::<RawDataDescriptor>();
const ZERO_SIGNATURE: &[u8; 4] = b"zero";
const DATA_DESCRIPTOR_SIGNATURE: &[u8; 4] = b"desc";
const DATA_SIGNATURE: &[u8; 4] = b"data";
/// File identifier and headers are never written through the log.
const LOWEST_LOG_TARGET: u64 = 192 * 1024;

/// One write an entry carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogUpdate {
    Page {
        file_offset: u64,
        data: Box<[u8; LOG_SECTOR]>,
    },
    Zero {
        file_offset: u64,
        length: u64,
    },
}

impl LogUpdate {
    pub fn file_offset(&self) -> u64 {
        match self {
            LogUpdate::Page { file_offset, .. } | LogUpdate::Zero { file_offset, .. } => {
                *file_offset
            }
        }
    }

    /// Bytes of the file the update covers.
    pub fn covered_len(&self) -> u64 {
        match self {
            LogUpdate::Page { .. } => SECTOR,
            LogUpdate::Zero { length, .. } => *length,
        }
    }
}

/// A valid, parsed log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Where the entry starts, relative to the log.
    pub position: u64,
    pub length: u64,
    pub tail: u64,
    pub sequence: u64,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub updates: Vec<LogUpdate>,
}

/// Sector count of the descriptor area for `descriptors` descriptors (never 0): the first
/// sector holds the 64-byte header plus 126 descriptors.
fn descriptor_sectors(descriptors: u64) -> u64 {
    (descriptors + 2).div_ceil(128)
}

/// A log ring in memory, with the CRC-32C of every sector-aligned prefix of the ring laid
/// twice end to end. The checksum of any entry, wrapping or not, then costs the same
/// whatever length it claims, so scanning a ring whose every sector claims to start an
/// entry as long as the ring stays linear in the ring's size.
pub struct LogRing<'a> {
    bytes: &'a [u8],
    prefix_crcs: Vec<u32>,
}

impl<'a> LogRing<'a> {
    /// `bytes` is a whole number of sectors.
    pub fn new(bytes: &'a [u8]) -> Self {
        debug_assert!(bytes.len().is_multiple_of(LOG_SECTOR));
        let mut prefix_crcs = Vec::with_capacity(2 * bytes.len() / LOG_SECTOR + 1);
        let mut crc = 0;
        prefix_crcs.push(crc);
        for sector in bytes
            .chunks_exact(LOG_SECTOR)
            .chain(bytes.chunks_exact(LOG_SECTOR))
        {
            crc = crc32c::crc32c_append(crc, sector);
            prefix_crcs.push(crc);
        }
        LogRing { bytes, prefix_crcs }
    }

    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// `len` bytes from `position` (both multiples of the sector, `len` at most the ring),
    /// wrapping past the end.
    fn copy(&self, position: u64, len: u64) -> Vec<u8> {
        let start = position as usize;
        let len = len as usize;
        let first = len.min(self.bytes.len() - start);
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&self.bytes[start..start + first]);
        out.extend_from_slice(&self.bytes[..len - first]);
        out
    }

    /// Whether the entry of `len` bytes at `position` carries its own checksum: CRC-32C
    /// over its bytes with the checksum field taken as zero. CRC-32C is linear: the CRC
    /// of a stretch is the CRC of the prefix ending with it less the earlier prefix's CRC
    /// carried over the stretch's length, and zeroing the field changes the result by the
    /// field's own contribution carried over the bytes after it.
    fn entry_checksum_matches(&self, position: u64, len: u64) -> bool {
        let first = (position / SECTOR) as usize;
        let last = first + (len / SECTOR) as usize;
        let stretch = self.prefix_crcs[last]
            ^ crc32c::crc32c_combine(self.prefix_crcs[first], 0, len as usize);
        let at = position as usize + CHECKSUM_AT;
        let field = &self.bytes[at..at + 4];
        let field_share = crc32c::crc32c_combine(
            crc32c::crc32c(field) ^ crc32c::crc32c(&[0; 4]),
            0,
            len as usize - CHECKSUM_AT - 4,
        );
        field == (stretch ^ field_share).to_le_bytes()
    }
}

/// Parses the entry at `position` of `ring`; `None` if it is not a valid entry of the
/// sequence identified by `log_guid`. Costs the same for any claimed length until the
/// checksum matched, and then what the entry really holds.
pub fn parse_entry(ring: &LogRing, position: u64, log_guid: Uuid) -> Option<LogEntry> {
    let log_len = ring.len();
    let head = &ring.bytes[position as usize..position as usize + LOG_SECTOR];
    let (header, _) = RawLogEntryHeader::ref_from_prefix(head).ok()?;
    if &header.signature != ENTRY_SIGNATURE {
        return None;
    }
    let length = u64::from(header.entry_length.get());
    let tail = u64::from(header.tail.get());
    let sequence = header.sequence_number.get();
    let descriptors = u64::from(header.descriptor_count.get());
    if length == 0
        || !length.is_multiple_of(SECTOR)
        || length > log_len
        || !tail.is_multiple_of(SECTOR)
        || tail >= log_len
        || sequence == 0
        || header.log_guid.get() != log_guid
    {
        return None;
    }
    let desc_sectors = descriptor_sectors(descriptors);
    if desc_sectors * SECTOR > length || !ring.entry_checksum_matches(position, length) {
        return None;
    }
    let bytes = ring.copy(position, length);
    let targets_this_entry = |file_offset: u64, descriptor_sequence: u64| {
        descriptor_sequence == sequence
            && file_offset.is_multiple_of(SECTOR)
            && file_offset >= LOWEST_LOG_TARGET
    };
    let mut updates = Vec::with_capacity(descriptors as usize);
    let mut data_sector = desc_sectors;
    for d in bytes[size_of::<RawLogEntryHeader>()..]
        .chunks_exact(DESCRIPTOR_LEN)
        .take(descriptors as usize)
    {
        let update = if d.starts_with(ZERO_SIGNATURE) {
            let d = RawZeroDescriptor::ref_from_bytes(d).ok()?;
            let (file_offset, length) = (d.file_offset.get(), d.zero_length.get());
            if !targets_this_entry(file_offset, d.sequence_number.get())
                || !length.is_multiple_of(SECTOR)
                || file_offset.checked_add(length).is_none()
            {
                return None;
            }
            LogUpdate::Zero {
                file_offset,
                length,
            }
        } else if d.starts_with(DATA_DESCRIPTOR_SIGNATURE) {
            let d = RawDataDescriptor::ref_from_bytes(d).ok()?;
            let file_offset = d.file_offset.get();
            if !targets_this_entry(file_offset, d.sequence_number.get())
                || (data_sector + 1) * SECTOR > length
                || file_offset.checked_add(SECTOR).is_none()
            {
                return None;
            }
            let s = RawDataSector::ref_from_prefix(&bytes[(data_sector * SECTOR) as usize..])
                .ok()?
                .0;
            let seq_in_sector =
                (u64::from(s.sequence_high.get()) << 32) | u64::from(s.sequence_low.get());
            if &s.signature != DATA_SIGNATURE || seq_in_sector != sequence {
                return None;
            }
            data_sector += 1;
            LogUpdate::Page {
                file_offset,
                data: Box::new(zerocopy::transmute!(RawLoggedPage {
                    leading_bytes: d.leading_bytes,
                    data: s.data,
                    trailing_bytes: d.trailing_bytes,
                })),
            }
        } else {
            return None;
        };
        updates.push(update);
    }
    Some(LogEntry {
        position,
        length,
        tail,
        sequence,
        flushed_file_offset: header.flushed_file_offset.get(),
        last_file_offset: header.last_file_offset.get(),
        updates,
    })
}

/// The entries to replay, oldest first (from the head's Tail through the head).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveSequence {
    pub entries: Vec<LogEntry>,
}

impl ActiveSequence {
    pub fn head(&self) -> &LogEntry {
        self.entries.last().unwrap()
    }
}

/// The valid entries of a ring, each parsed once, with the stretches of ring they occupy.
struct ValidEntries<'r, 'a> {
    ring: &'r LogRing<'a>,
    log_guid: Uuid,
    parsed: HashMap<u64, Option<LogEntry>>,
    /// Occupied stretches as `start -> (end, entry position)`, a wrapping entry as two.
    occupied: BTreeMap<u64, (u64, u64)>,
}

impl ValidEntries<'_, '_> {
    fn at(&mut self, position: u64) -> Result<Option<&LogEntry>> {
        if !self.parsed.contains_key(&position) {
            let entry = parse_entry(self.ring, position, self.log_guid);
            if let Some(entry) = &entry {
                self.occupy(entry)?;
            }
            self.parsed.insert(position, entry);
        }
        Ok(self.parsed[&position].as_ref())
    }

    /// Records where `entry` lies. Entries a writer leaves never overlap: writing one over
    /// part of another breaks the older one's checksum. Overlapping valid entries are
    /// crafted, and refusing them keeps the work of a scan within the ring's size.
    fn occupy(&mut self, entry: &LogEntry) -> Result<()> {
        let log_len = self.ring.len();
        let end = entry.position + entry.length;
        let mut stretches = vec![(entry.position, end.min(log_len))];
        if end > log_len {
            stretches.push((0, end - log_len));
        }
        for (start, end) in stretches {
            if let Some((_, &(other_end, other))) = self.occupied.range(..end).next_back()
                && other_end > start
            {
                return Err(Error::corrupt(
                    CorruptionKind::OutOfBounds,
                    format!("log entry {}", entry.sequence),
                    format!(
                        "at log offset {:#x} overlaps the valid entry at {other:#x}",
                        entry.position
                    ),
                ));
            }
            self.occupied.insert(start, (end, entry.position));
        }
        Ok(())
    }
}

/// Finds the active sequence in the log ring `log` (MS-VHDX §2.3.3): the valid run of
/// consecutive entries with the highest head sequence number whose head's Tail points at
/// one of its own entries. `None` when the log holds no valid sequence; an error when
/// valid entries overlap.
///
/// The specification moves on by one sector after a run that is not valid. A writer's
/// valid entries never overlap, and every later entry of such a run heads a run with the
/// same head (which misses the same Tail), so the scan skips the whole run instead: each
/// sector of the ring is looked at once, and the result is the specification's for every
/// log a writer can leave.
pub fn find_active_sequence(log: &[u8], log_guid: Uuid) -> Result<Option<ActiveSequence>> {
    let ring = LogRing::new(log);
    let log_len = ring.len();
    let mut valid = ValidEntries {
        ring: &ring,
        log_guid,
        parsed: HashMap::new(),
        occupied: BTreeMap::new(),
    };
    let mut best: Option<(u64, Vec<u64>)> = None;
    let mut start = 0u64;
    let mut scanned = 0u64;
    while scanned < log_len {
        let mut run: Vec<u64> = Vec::new();
        let mut pos = start;
        let mut run_len = 0u64;
        let mut head: Option<(u64, u64)> = None;
        while run_len < log_len {
            let Some(entry) = valid.at(pos)? else {
                break;
            };
            if head.is_some_and(|(sequence, _)| entry.sequence != sequence + 1) {
                break;
            }
            head = Some((entry.sequence, entry.tail));
            run.push(pos);
            run_len += entry.length;
            pos = (pos + entry.length) % log_len;
        }
        if let Some((sequence, tail)) = head
            && run.contains(&tail)
            && best
                .as_ref()
                .is_none_or(|(best_seq, _)| sequence > *best_seq)
        {
            let first = run.iter().position(|&p| p == tail).unwrap();
            best = Some((sequence, run.split_off(first)));
        }
        let advance = if head.is_some() { run_len } else { SECTOR };
        start = (start + advance) % log_len;
        scanned += advance;
    }
    Ok(best.map(|(_, run)| ActiveSequence {
        entries: run
            .iter()
            .map(|p| valid.parsed.remove(p).flatten().unwrap())
            .collect(),
    }))
}

/// Largest log this reader replays. Hyper-V and qemu make 1 MiB logs unless told
/// otherwise; the format allows up to 4 GiB, all of which a replay must hold in memory.
pub const MAX_REPLAYED_LOG: u32 = 32 << 20;

/// Reads the whole log ring of a dirty image.
pub fn read_ring(storage: &dyn Storage, log_offset: u64, log_length: u32) -> Result<Vec<u8>> {
    if log_length > MAX_REPLAYED_LOG {
        return Err(Error::unsupported(format!(
            "log of {} MiB must be replayed, but this reader replays logs of at most {} MiB",
            log_length >> 20,
            MAX_REPLAYED_LOG >> 20
        )));
    }
    let mut log = vec![0u8; log_length as usize];
    storage
        .read_at(&mut log, log_offset)
        .context(|| format!("reading log at {log_offset:#x}"))?;
    Ok(log)
}

/// No file holding a VHDX disk (at most 64 TiB, plus its BAT, sector bitmaps, log and
/// metadata) comes near this size; a log asking for a larger file is damaged, and
/// replaying it would extend the image to absurd lengths.
const MAX_FILE_LEN: u64 = 1 << 47;

/// Checks what the head entry says about the file: never shorter than FlushedFileOffset,
/// no longer than any VHDX file can be, and no update below the file identifier and
/// headers (already excluded when parsing).
pub fn check_sequence_against_file(sequence: &ActiveSequence, file_len: u64) -> Result<()> {
    let head = sequence.head();
    if head.last_file_offset > MAX_FILE_LEN {
        return Err(Error::corrupt(
            CorruptionKind::InvalidField,
            format!("log entry {}", head.sequence),
            format!(
                "LastFileOffset {:#x} is beyond the largest possible VHDX file ({MAX_FILE_LEN:#x})",
                head.last_file_offset
            ),
        ));
    }
    if head.flushed_file_offset > file_len {
        return Err(Error::corrupt(
            CorruptionKind::Truncated,
            format!("log entry {}", head.sequence),
            format!(
                "file is truncated: {file_len:#x} bytes, but the log says {:#x} were flushed",
                head.flushed_file_offset
            ),
        ));
    }
    Ok(())
}

/// Merges byte-range updates (any alignment) into whole 4 KiB pages, taking the bytes they
/// do not cover from `current_page(page_offset)`. Updates later in `updates` win.
pub fn merge_into_pages(
    updates: &[(u64, &[u8])],
    mut current_page: impl FnMut(u64) -> Result<[u8; LOG_SECTOR]>,
) -> Result<Vec<(u64, Box<[u8; LOG_SECTOR]>)>> {
    let mut pages: BTreeMap<u64, Box<[u8; LOG_SECTOR]>> = BTreeMap::new();
    for &(offset, bytes) in updates {
        let mut done = 0usize;
        while done < bytes.len() {
            let at = offset + done as u64;
            let page_offset = at - at % SECTOR;
            let in_page = (at - page_offset) as usize;
            let n = (LOG_SECTOR - in_page).min(bytes.len() - done);
            let page = match pages.entry(page_offset) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(Box::new(current_page(page_offset)?))
                }
            };
            page[in_page..in_page + n].copy_from_slice(&bytes[done..done + n]);
            done += n;
        }
    }
    Ok(pages.into_iter().collect())
}

/// Builds the on-disk bytes of one entry.
pub struct EntryBuilder<'a> {
    pub sequence: u64,
    pub tail: u64,
    pub log_guid: Uuid,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub updates: &'a [LogUpdate],
}

impl EntryBuilder<'_> {
    /// Bytes an entry with these updates occupies in the log.
    pub fn entry_len(updates: &[LogUpdate]) -> u64 {
        let pages = updates
            .iter()
            .filter(|u| matches!(u, LogUpdate::Page { .. }))
            .count() as u64;
        (descriptor_sectors(updates.len() as u64) + pages) * SECTOR
    }

    pub fn build(&self) -> Vec<u8> {
        let entry_len = Self::entry_len(self.updates);
        let mut buf = Vec::with_capacity(entry_len as usize);
        buf.extend_from_slice(
            RawLogEntryHeader {
                signature: *ENTRY_SIGNATURE,
                checksum: 0.into(),
                entry_length: (entry_len as u32).into(),
                tail: (self.tail as u32).into(),
                sequence_number: self.sequence.into(),
                descriptor_count: (self.updates.len() as u32).into(),
                reserved: [0; 4],
                log_guid: self.log_guid.into(),
                flushed_file_offset: self.flushed_file_offset.into(),
                last_file_offset: self.last_file_offset.into(),
            }
            .as_bytes(),
        );
        for update in self.updates {
            match update {
                LogUpdate::Zero {
                    file_offset,
                    length,
                } => buf.extend_from_slice(
                    RawZeroDescriptor {
                        signature: *ZERO_SIGNATURE,
                        reserved: [0; 4],
                        zero_length: (*length).into(),
                        file_offset: (*file_offset).into(),
                        sequence_number: self.sequence.into(),
                    }
                    .as_bytes(),
                ),
                LogUpdate::Page { file_offset, data } => {
                    let page: &RawLoggedPage = zerocopy::transmute_ref!(&**data);
                    buf.extend_from_slice(
                        RawDataDescriptor {
                            signature: *DATA_DESCRIPTOR_SIGNATURE,
                            trailing_bytes: page.trailing_bytes,
                            leading_bytes: page.leading_bytes,
                            file_offset: (*file_offset).into(),
                            sequence_number: self.sequence.into(),
                        }
                        .as_bytes(),
                    );
                }
            }
        }
        buf.resize(
            descriptor_sectors(self.updates.len() as u64) as usize * LOG_SECTOR,
            0,
        );
        for update in self.updates {
            if let LogUpdate::Page { data, .. } = update {
                let page: &RawLoggedPage = zerocopy::transmute_ref!(&**data);
                buf.extend_from_slice(
                    RawDataSector {
                        signature: *DATA_SIGNATURE,
                        sequence_high: ((self.sequence >> 32) as u32).into(),
                        data: page.data,
                        sequence_low: (self.sequence as u32).into(),
                    }
                    .as_bytes(),
                );
            }
        }
        seal_crc32c(&mut buf, CHECKSUM_AT);
        buf
    }
}

/// Where the next entry goes. Every entry is applied (and flushed) before the next one is
/// written, so each entry's Tail is its own position; entries are kept to at most half the
/// ring so writing one never overwrites the previous one, which must stay replayable until
/// its successor is durable.
#[derive(Debug, Clone)]
pub struct LogWriter {
    pub log_offset: u64,
    pub log_length: u64,
    pub log_guid: Uuid,
    next_sequence: u64,
    head: u64,
}

impl LogWriter {
    /// A writer for a freshly installed `log_guid`: no valid entry of it exists yet.
    pub fn new(log_offset: u64, log_length: u32, log_guid: Uuid) -> Self {
        LogWriter {
            log_offset,
            log_length: u64::from(log_length),
            log_guid,
            next_sequence: 1,
            head: 0,
        }
    }

    /// The largest entry allowed (see the type's comment).
    pub fn max_entry_len(&self) -> u64 {
        self.log_length / 2
    }

    /// Splits `updates` into groups that each fit one entry.
    pub fn split<'u>(&self, updates: &'u [LogUpdate]) -> Vec<&'u [LogUpdate]> {
        let mut groups = Vec::new();
        let mut start = 0;
        while start < updates.len() {
            let mut end = start + 1;
            while end < updates.len()
                && EntryBuilder::entry_len(&updates[start..end + 1]) <= self.max_entry_len()
            {
                end += 1;
            }
            groups.push(&updates[start..end]);
            start = end;
        }
        groups
    }

    /// Writes one entry (not flushed) holding `updates`, which must fit (see `split`).
    pub fn write_entry(
        &mut self,
        storage: &dyn Storage,
        updates: &[LogUpdate],
        flushed_file_offset: u64,
        last_file_offset: u64,
    ) -> Result<()> {
        let bytes = EntryBuilder {
            sequence: self.next_sequence,
            tail: self.head,
            log_guid: self.log_guid,
            flushed_file_offset,
            last_file_offset,
            updates,
        }
        .build();
        debug_assert!(bytes.len() as u64 <= self.max_entry_len());
        let first = (bytes.len() as u64).min(self.log_length - self.head) as usize;
        let write = |buf: &[u8], pos: u64| {
            storage
                .write_at(buf, self.log_offset + pos)
                .context(|| format!("writing log entry {}", self.next_sequence))
        };
        write(&bytes[..first], self.head)?;
        if first < bytes.len() {
            write(&bytes[first..], 0)?;
        }
        self.head = (self.head + bytes.len() as u64) % self.log_length;
        self.next_sequence += 1;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    const GUID: Uuid = Uuid::from_u128(0x1111_2222);

    fn page(fill: u8, file_offset: u64) -> LogUpdate {
        let mut data = Box::new([fill; LOG_SECTOR]);
        data[0] = 0xA0;
        data[4095] = 0x0B;
        LogUpdate::Page { file_offset, data }
    }

    fn entry(sequence: u64, tail: u64, updates: &[LogUpdate]) -> Vec<u8> {
        EntryBuilder {
            sequence,
            tail,
            log_guid: GUID,
            flushed_file_offset: 4 << 20,
            last_file_offset: 5 << 20,
            updates,
        }
        .build()
    }

    fn header(entry: &mut [u8]) -> &mut RawLogEntryHeader {
        RawLogEntryHeader::mut_from_prefix(entry).unwrap().0
    }

    fn put(log: &mut [u8], pos: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let at = (pos + i) % log.len();
            log[at] = *b;
        }
    }

    #[test]
    fn entry_round_trips_pages_and_zero_ranges() {
        let updates = vec![
            page(1, 0x30_0000),
            LogUpdate::Zero {
                file_offset: 0x40_0000,
                length: 0x20_0000,
            },
            page(2, 0x30_1000),
        ];
        let bytes = entry(7, 0, &updates);
        assert_eq!(bytes.len(), 3 * LOG_SECTOR);
        let mut log = vec![0u8; 1 << 20];
        put(&mut log, 0, &bytes);
        let parsed = parse_entry(&LogRing::new(&log), 0, GUID).unwrap();
        assert_eq!(parsed.updates, updates);
        assert_eq!(
            (
                parsed.sequence,
                parsed.flushed_file_offset,
                parsed.last_file_offset
            ),
            (7, 4 << 20, 5 << 20)
        );
        assert!(
            parse_entry(&LogRing::new(&log), 0, Uuid::from_u128(3)).is_none(),
            "wrong guid"
        );
    }

    #[test]
    fn many_descriptors_spill_into_further_descriptor_sectors() {
        let updates: Vec<LogUpdate> = (0..300)
            .map(|i| LogUpdate::Zero {
                file_offset: (1 << 20) + i * 4096,
                length: 4096,
            })
            .collect();
        let bytes = entry(1, 0, &updates);
        assert_eq!(bytes.len(), 3 * LOG_SECTOR);
        let mut log = vec![0u8; 1 << 20];
        put(&mut log, 0, &bytes);
        assert_eq!(
            parse_entry(&LogRing::new(&log), 0, GUID).unwrap().updates,
            updates
        );
    }

    #[test]
    fn damaged_entries_are_invalid() {
        let bytes = entry(3, 0, &[page(5, 0x20_0000)]);
        let damage: [fn(&mut Vec<u8>); 6] = [
            |b| b[0] = b'L',
            |b| b[200] ^= 1,                                // checksum
            |b| b[LOG_SECTOR + 100] ^= 1,                   // data sector payload
            |b| header(b).sequence_number = 0.into(),       // sequence 0
            |b| header(b).entry_length = (4 * 4096).into(), // longer than written
            |b| {
                let (_, descriptors) = RawLogEntryHeader::mut_from_prefix(b).unwrap();
                let d = RawDataDescriptor::mut_from_prefix(descriptors).unwrap().0;
                d.file_offset = 0x1_0000.into(); // header area
            },
        ];
        for (i, d) in damage.iter().enumerate() {
            let mut b = bytes.clone();
            d(&mut b);
            if i >= 3 {
                seal_crc32c(&mut b[..2 * LOG_SECTOR], CHECKSUM_AT);
            }
            let mut log = vec![0u8; 1 << 20];
            put(&mut log, 0, &b);
            assert!(
                parse_entry(&LogRing::new(&log), 0, GUID).is_none(),
                "damage {i} accepted"
            );
        }
    }

    #[test]
    fn active_sequence_follows_tail_and_highest_sequence() {
        let mut log = vec![0u8; 64 * 1024];
        // A stale run 1..=2 at 0, then the live run 5..=7 whose head's tail points at 6.
        put(&mut log, 0, &entry(1, 0, &[page(1, 0x20_0000)]));
        put(&mut log, 8192, &entry(2, 0, &[page(2, 0x20_0000)]));
        put(&mut log, 16384, &entry(5, 16384, &[page(5, 0x20_0000)]));
        put(&mut log, 24576, &entry(6, 16384, &[page(6, 0x20_0000)]));
        put(&mut log, 32768, &entry(7, 24576, &[page(7, 0x21_0000)]));
        let seq = find_active_sequence(&log, GUID).unwrap().unwrap();
        let seqs: Vec<u64> = seq.entries.iter().map(|e| e.sequence).collect();
        assert_eq!(seqs, vec![6, 7]);
    }

    #[test]
    fn gap_or_torn_head_falls_back_to_the_last_complete_sequence() {
        let mut log = vec![0u8; 64 * 1024];
        put(&mut log, 0, &entry(1, 0, &[page(1, 0x20_0000)]));
        put(&mut log, 8192, &entry(2, 8192, &[page(2, 0x20_0000)]));
        // Sequence 4 after a gap, with its tail pointing back across the gap.
        put(&mut log, 16384, &entry(4, 8192, &[page(4, 0x20_0000)]));
        let seq = find_active_sequence(&log, GUID).unwrap().unwrap();
        assert_eq!(seq.head().sequence, 2);

        let mut torn = entry(3, 16384, &[page(3, 0x20_0000)]);
        torn.truncate(5000);
        put(&mut log, 16384, &torn);
        assert_eq!(
            find_active_sequence(&log, GUID)
                .unwrap()
                .unwrap()
                .head()
                .sequence,
            2
        );
        assert!(find_active_sequence(&[0u8; 8192], GUID).unwrap().is_none());
    }

    #[test]
    fn ring_checksums_match_a_direct_computation_wrapped_or_not() {
        let mut log: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 253) as u8).collect();
        for (position, len) in [
            (0u64, 4096u64),
            (8192, 3 * 4096),
            (61440, 2 * 4096),
            (4096, 65536),
        ] {
            let mut bytes = LogRing::new(&log).copy(position, len);
            seal_crc32c(&mut bytes, CHECKSUM_AT);
            put(&mut log, position as usize, &bytes);
            assert!(LogRing::new(&log).entry_checksum_matches(position, len));
            log[((position + len - 1) % 65536) as usize] ^= 1;
            assert!(!LogRing::new(&log).entry_checksum_matches(position, len));
        }
    }

    #[test]
    fn overlapping_valid_entries_are_refused() {
        let mut log = vec![0u8; 64 * 1024];
        put(&mut log, 8192, &entry(1, 8192, &[]));
        // An entry at 40 KiB sealed over the rest of the ring and round to 12 KiB, the
        // valid entry at 8 KiB included: both carry valid checksums, which no writer can
        // leave.
        let len = log.len() - 40960 + 12288;
        let mut wrapping = LogRing::new(&log).copy(40960, len as u64);
        wrapping[..LOG_SECTOR].copy_from_slice(&entry(5, 40960, &[])[..LOG_SECTOR]);
        header(&mut wrapping).entry_length = (len as u32).into();
        seal_crc32c(&mut wrapping, CHECKSUM_AT);
        put(&mut log, 40960, &wrapping);
        assert!(parse_entry(&LogRing::new(&log), 8192, GUID).is_some());
        assert!(parse_entry(&LogRing::new(&log), 40960, GUID).is_some());
        let err = find_active_sequence(&log, GUID).unwrap_err();
        assert!(
            err.to_string().contains("overlaps the valid entry"),
            "{err}"
        );
    }

    #[test]
    fn a_ring_of_entries_claiming_its_whole_length_scans_each_sector_once() {
        // Every sector starts an entry that claims the whole ring, with a wrong checksum:
        // checking each must not read the ring again.
        let mut log = vec![0u8; 16 << 20];
        let mut header = entry(1, 0, &[]);
        self::header(&mut header).entry_length = (log.len() as u32).into();
        for pos in (0..log.len()).step_by(LOG_SECTOR) {
            log[pos..pos + LOG_SECTOR].copy_from_slice(&header[..LOG_SECTOR]);
        }
        assert!(find_active_sequence(&log, GUID).unwrap().is_none());
    }

    #[test]
    fn entries_wrap_around_the_ring_end() {
        let mut log = vec![0u8; 32 * 1024];
        let e = entry(9, 24576, &[page(9, 0x20_0000), page(8, 0x20_1000)]);
        put(&mut log, 24576, &e);
        let seq = find_active_sequence(&log, GUID).unwrap().unwrap();
        assert_eq!(seq.head().sequence, 9);
        assert_eq!(seq.head().updates[1], page(8, 0x20_1000));
    }

    #[test]
    fn head_flushed_offset_past_end_of_file_means_truncated() {
        let mut log = vec![0u8; 64 * 1024];
        put(&mut log, 0, &entry(1, 0, &[page(1, 0x20_0000)]));
        let seq = find_active_sequence(&log, GUID).unwrap().unwrap();
        assert!(check_sequence_against_file(&seq, 4 << 20).is_ok());
        let err = check_sequence_against_file(&seq, 3 << 20).unwrap_err();
        assert_eq!(err.corruption_kind(), Some(CorruptionKind::Truncated));
        assert!(
            err.to_string()
                .starts_with("log entry 1: file is truncated")
        );
    }

    #[test]
    fn head_last_file_offset_beyond_any_vhdx_file_is_refused() {
        let mut log = vec![0u8; 64 * 1024];
        let huge = EntryBuilder {
            sequence: 1,
            tail: 0,
            log_guid: GUID,
            flushed_file_offset: 4 << 20,
            last_file_offset: !0xF_FFFF,
            updates: &[page(1, 0x20_0000)],
        }
        .build();
        put(&mut log, 0, &huge);
        let seq = find_active_sequence(&log, GUID).unwrap().unwrap();
        let err = check_sequence_against_file(&seq, 4 << 20).unwrap_err();
        assert_eq!(err.corruption_kind(), Some(CorruptionKind::InvalidField));
        assert!(err.to_string().contains("LastFileOffset"), "{err}");
    }

    #[test]
    fn partial_page_updates_merge_with_both_neighbours() {
        // An update straddling a page boundary must keep the bytes around it in BOTH pages
        // (the trailing page is merged from its own offset, not the first page's).
        let disk: Vec<u8> = (0..3 * LOG_SECTOR).map(|i| (i % 251) as u8).collect();
        let update = vec![0xEEu8; 24];
        let at = 2 * LOG_SECTOR as u64 - 8;
        let pages = merge_into_pages(&[(at, &update)], |off| {
            Ok(disk[off as usize..off as usize + LOG_SECTOR]
                .try_into()
                .unwrap())
        })
        .unwrap();
        let mut expected = disk.clone();
        expected[at as usize..at as usize + 24].fill(0xEE);
        assert_eq!(pages.len(), 2);
        for (off, data) in pages {
            assert_eq!(
                &data[..],
                &expected[off as usize..off as usize + LOG_SECTOR]
            );
        }
    }

    #[test]
    fn writer_keeps_entries_small_and_wraps_the_ring() {
        let storage = MemStorage::from_vec(vec![0u8; 2 << 20]);
        let mut w = LogWriter::new(1 << 20, 1 << 20, GUID);
        let updates: Vec<LogUpdate> = (0..200)
            .map(|i| page(i as u8, 0x20_0000 + i * 4096))
            .collect();
        let groups = w.split(&updates);
        assert!(groups.len() >= 2);
        assert_eq!(groups.iter().map(|g| g.len()).sum::<usize>(), 200);
        for _ in 0..5 {
            for g in &groups {
                w.write_entry(&storage, g, 2 << 20, 2 << 20).unwrap();
            }
        }
        let log = storage.contents()[1 << 20..].to_vec();
        let seq = find_active_sequence(&log, GUID).unwrap().unwrap();
        assert_eq!(seq.entries.len(), 1, "each entry's tail is itself");
        assert_eq!(seq.head().sequence, 5 * groups.len() as u64);
        assert_eq!(seq.head().updates.as_slice(), *groups.last().unwrap());
    }
}

//! The block allocation table: one u64 per payload block, with one sector-bitmap entry
//! after every `chunk_ratio` payload entries, held in memory for the whole session.

use super::fields::{MIB, u64_at};
use crate::error::{CorruptionKind, Error, Result};
use crate::free_space::FreeSpace;
use std::ops::Range;

pub const BAT_ENTRY_LEN: u64 = 8;
/// The unit in which BAT changes are journaled.
pub const BAT_PAGE_LEN: usize = 4096;
const ENTRIES_PER_PAGE: usize = BAT_PAGE_LEN / BAT_ENTRY_LEN as usize;
// Bit layout of one entry.
const STATE_MASK: u64 = 0x7; // bits 0-2
const FILE_OFFSET_MASK: u64 = !(MIB - 1); // bits 20-63: offset in MiB units
/// Bits of the virtual disk one sector-bitmap block covers (2^23 sectors).
const SECTORS_PER_CHUNK: u64 = 1 << 23;
/// Most BAT bytes kept in memory: 4 Mi entries, enough for 8 TiB in 2 MiB blocks or the
/// format's 64 TiB in blocks of 16 MiB and more. The bound keeps a crafted size, with a
/// BAT region in a sparse file to match, from taking the machine's memory.
pub const MAX_LOADED_BAT: u64 = 32 << 20;
/// Bytes of the BAT read at a time while loading it.
const LOAD_PIECE: usize = 1 << 20;

/// What a payload entry says about its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadState {
    NotPresent,
    Undefined,
    Zero,
    /// Value 3; value 5 (from the 0.95 draft) is read as this too.
    Unmapped,
    FullyPresent,
    PartiallyPresent,
}

impl PayloadState {
    pub fn code(self) -> u64 {
        match self {
            PayloadState::NotPresent => 0,
            PayloadState::Undefined => 1,
            PayloadState::Zero => 2,
            PayloadState::Unmapped => 3,
            PayloadState::FullyPresent => 6,
            PayloadState::PartiallyPresent => 7,
        }
    }
}

/// One raw BAT entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatEntry(pub u64);

impl BatEntry {
    pub fn new(state: PayloadState, file_offset: u64) -> Self {
        debug_assert_eq!(file_offset & !FILE_OFFSET_MASK, 0);
        BatEntry(file_offset | state.code())
    }

    /// The payload state, or `None` for the reserved value 4.
    pub fn payload_state(self) -> Option<PayloadState> {
        Some(match self.0 & STATE_MASK {
            0 => PayloadState::NotPresent,
            1 => PayloadState::Undefined,
            2 => PayloadState::Zero,
            3 | 5 => PayloadState::Unmapped,
            6 => PayloadState::FullyPresent,
            7 => PayloadState::PartiallyPresent,
            _ => return None,
        })
    }

    pub fn file_offset(self) -> u64 {
        self.0 & FILE_OFFSET_MASK
    }
}

/// How BAT indices map onto the virtual disk (MS-VHDX §2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatLayout {
    pub block_size: u64,
    /// Payload blocks per sector-bitmap block.
    pub chunk_ratio: u64,
    pub payload_blocks: u64,
    /// Entries the BAT must hold.
    pub total_entries: u64,
}

impl BatLayout {
    pub fn new(
        virtual_size: u64,
        block_size: u32,
        logical_sector_size: u32,
        has_parent: bool,
    ) -> Self {
        let block_size = u64::from(block_size);
        // Both factors are validated powers of two, so the ratio is exact and >= 16.
        let chunk_ratio = SECTORS_PER_CHUNK * u64::from(logical_sector_size) / block_size;
        let payload_blocks = virtual_size.div_ceil(block_size);
        let total_entries = if has_parent {
            payload_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else {
            payload_blocks + (payload_blocks - 1) / chunk_ratio
        };
        BatLayout {
            block_size,
            chunk_ratio,
            payload_blocks,
            total_entries,
        }
    }

    /// BAT index of payload block `block`: each chunk's sector-bitmap entry follows its
    /// `chunk_ratio` payload entries.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector-bitmap entry of the chunk holding payload block `block`.
    pub fn sector_bitmap_index(&self, block: u64) -> u64 {
        (block / self.chunk_ratio) * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    pub fn is_sector_bitmap_index(&self, index: u64) -> bool {
        index % (self.chunk_ratio + 1) == self.chunk_ratio
    }

    /// Payload block number of a payload index.
    pub fn block_of_index(&self, index: u64) -> u64 {
        index - index / (self.chunk_ratio + 1)
    }

    /// An entry at `index` that names no data and no place: ZERO for a payload block
    /// (zeros even in a child), absent for a sector bitmap block.
    pub fn naming_nothing(&self, index: u64) -> BatEntry {
        match self.is_sector_bitmap_index(index) {
            true => BatEntry(0),
            false => BatEntry::new(PayloadState::Zero, 0),
        }
    }
}

/// A file range the BAT's blocks must stay clear of (log, BAT, metadata region).
#[derive(Debug, Clone)]
pub struct ReservedRange {
    pub start: u64,
    pub end: u64,
    pub name: &'static str,
}

/// What [`Bat::validate`] found.
#[derive(Debug)]
pub struct Validated {
    /// File space nothing uses.
    pub free: FreeSpace,
    pub bad: Vec<BadEntry>,
}

/// An entry that breaks the format's rules.
#[derive(Debug)]
pub struct BadEntry {
    pub index: u64,
    pub kind: CorruptionKind,
    pub problem: String,
    /// The part of the file the entry names: nobody's to take.
    pub space: Range<u64>,
}

impl BadEntry {
    /// The error a normal open refuses the image with.
    pub fn error(&self) -> Error {
        Error::corrupt(
            self.kind,
            format!("BAT entry {}", self.index),
            &self.problem,
        )
    }
}

/// The in-memory BAT: every entry of the pages covering the used entries, so a journaled
/// page always carries its neighbours' current values.
#[derive(Debug, Clone)]
pub struct Bat {
    pub layout: BatLayout,
    entries: Vec<BatEntry>,
}

impl Bat {
    /// Bytes of the BAT region that are held in memory (whole pages, within the region).
    pub fn loaded_len(layout: &BatLayout, region_len: u64) -> Result<u64> {
        let needed = layout.total_entries * BAT_ENTRY_LEN;
        if needed > region_len {
            return Err(Error::corrupt(
                CorruptionKind::Truncated,
                "BAT region",
                format!(
                    "holds {:#x} bytes but {} entries need {needed:#x}",
                    region_len, layout.total_entries
                ),
            ));
        }
        let loaded = needed.div_ceil(BAT_PAGE_LEN as u64) * BAT_PAGE_LEN as u64;
        if loaded > MAX_LOADED_BAT {
            return Err(Error::unsupported(format!(
                "BAT of {} MiB for {} entries; this reader keeps at most {} MiB of BAT in \
                 memory (a disk this large needs larger blocks)",
                loaded >> 20,
                layout.total_entries,
                MAX_LOADED_BAT >> 20
            )));
        }
        Ok(loaded.min(region_len))
    }

    /// Builds the BAT from the first `loaded_len` bytes of its region, which
    /// `read(buf, offset)` reads piece by piece so the raw bytes are never held whole.
    pub fn load(
        layout: BatLayout,
        loaded_len: u64,
        mut read: impl FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<Self> {
        let mut entries = Vec::new();
        entries
            .try_reserve_exact((loaded_len / BAT_ENTRY_LEN) as usize)
            .map_err(|_| Error::unsupported("BAT too large for this machine's memory"))?;
        let mut piece = vec![0u8; LOAD_PIECE.min(loaded_len as usize)];
        let mut offset = 0;
        while offset < loaded_len {
            let n = (loaded_len - offset).min(LOAD_PIECE as u64) as usize;
            read(&mut piece[..n], offset)?;
            entries.extend(
                piece[..n]
                    .chunks_exact(BAT_ENTRY_LEN as usize)
                    .map(|e| BatEntry(u64_at(e, 0))),
            );
            offset += n as u64;
        }
        Ok(Bat { layout, entries })
    }

    /// The same table for a disk of `layout` (a larger one): the entries it lacks, whole
    /// pages of them, are zero (NOT_PRESENT).
    pub fn grown(&self, layout: BatLayout) -> Bat {
        let pages = (layout.total_entries * BAT_ENTRY_LEN).div_ceil(BAT_PAGE_LEN as u64);
        let mut entries = self.entries.clone();
        let len = entries.len().max(pages as usize * ENTRIES_PER_PAGE);
        entries.resize(len, BatEntry(0));
        Bat { layout, entries }
    }

    pub fn entry(&self, index: u64) -> BatEntry {
        self.entries[index as usize]
    }

    pub fn set(&mut self, index: u64, entry: BatEntry) {
        self.entries[index as usize] = entry;
    }

    pub fn payload(&self, block: u64) -> BatEntry {
        self.entry(self.layout.payload_index(block))
    }

    /// The sector-bitmap entry of the chunk holding payload block `block` (differencing
    /// images, whose BAT always holds it).
    pub fn sector_bitmap(&self, block: u64) -> BatEntry {
        self.entry(self.layout.sector_bitmap_index(block))
    }

    /// The on-disk bytes of BAT page `page`.
    pub fn page_bytes(&self, page: usize) -> [u8; BAT_PAGE_LEN] {
        let mut buf = [0u8; BAT_PAGE_LEN];
        let first = page * ENTRIES_PER_PAGE;
        let last = (first + ENTRIES_PER_PAGE).min(self.entries.len());
        for (i, entry) in self.entries[first..last].iter().enumerate() {
            buf[i * 8..i * 8 + 8].copy_from_slice(&entry.0.to_le_bytes());
        }
        buf
    }

    /// Checks every used entry against the file: valid states, present blocks inside the
    /// file (`file_len`), past the header area, clear of `reserved` and of each other.
    /// The last block only needs its part inside the virtual disk to be in the file.
    /// Lists every entry that breaks a rule (two blocks sharing space both do), those
    /// failing on their own first, and the file space past the header area that nothing
    /// uses: not `reserved`, no block, no old location that an entry without data still
    /// names (locations must stay unique), and nothing a bad entry names.
    pub fn validate(
        &self,
        virtual_size: u64,
        file_len: u64,
        reserved: &[ReservedRange],
    ) -> Validated {
        let layout = &self.layout;
        let mut free = FreeSpace::new(MIB..file_len);
        for r in reserved {
            free.remove(r.start..r.end);
        }
        let mut bad = Vec::new();
        // (offset, index): ends are found again from the index, keeping this list small.
        let mut used: Vec<(u64, u32)> = Vec::new();
        for index in 0..layout.total_entries {
            let entry = self.entry(index);
            let offset = entry.file_offset();
            let len = self.used_len(index, virtual_size);
            let mut fail = |kind, problem: String| {
                bad.push(BadEntry {
                    index,
                    kind,
                    problem,
                    space: offset.min(file_len)..offset.saturating_add(len).min(file_len),
                });
            };
            if layout.is_sector_bitmap_index(index) {
                match entry.0 & STATE_MASK {
                    0 => continue,
                    6 => {}
                    state => {
                        fail(
                            CorruptionKind::InvalidField,
                            format!("invalid sector bitmap state {state}"),
                        );
                        continue;
                    }
                }
            } else {
                match entry.payload_state() {
                    None => {
                        fail(
                            CorruptionKind::InvalidField,
                            format!("invalid payload state {}", entry.0 & STATE_MASK),
                        );
                        continue;
                    }
                    // A differencing BAT holds whole chunks: entries past the disk's last
                    // block name no data, whatever they say, and are never read.
                    _ if layout.block_of_index(index) >= layout.payload_blocks => continue,
                    Some(PayloadState::FullyPresent | PayloadState::PartiallyPresent) => {}
                    Some(_) => {
                        free.remove(offset..offset.saturating_add(len));
                        continue;
                    }
                }
            }
            if offset < MIB {
                fail(
                    CorruptionKind::OutOfBounds,
                    format!("points into the header area (offset {offset:#x})"),
                );
            } else if offset.checked_add(len).is_none_or(|end| end > file_len) {
                fail(
                    CorruptionKind::OutOfBounds,
                    format!("points past end of file (offset {offset:#x})"),
                );
            } else if let Some(r) = reserved
                .iter()
                .find(|r| offset < r.end && r.start < offset + len)
            {
                fail(
                    CorruptionKind::OutOfBounds,
                    format!("overlaps the {} (offset {offset:#x})", r.name),
                );
            } else {
                used.push((offset, index as u32));
            }
        }
        used.sort_unstable();
        // Blocks differ in length (bitmap blocks, a short last block): each is compared
        // with the one reaching furthest among those before it.
        let mut sharing = Vec::new();
        let mut furthest: Option<(u64, u32)> = None;
        for &(offset, index) in &used {
            let end = offset + self.used_len(u64::from(index), virtual_size);
            if let Some((reach, other)) = furthest {
                if offset < reach {
                    sharing.push((index.max(other), index.min(other), offset));
                    sharing.push((index.min(other), index.max(other), offset));
                }
                if end <= reach {
                    continue;
                }
            }
            furthest = Some((end, index));
        }
        for (index, other, at) in sharing {
            let index = u64::from(index);
            if bad.iter().all(|b: &BadEntry| b.index != index) {
                let offset = self.entry(index).file_offset();
                bad.push(BadEntry {
                    index,
                    kind: CorruptionKind::OutOfBounds,
                    problem: format!("overlaps the block of BAT entry {other} (offset {at:#x})"),
                    space: offset..offset + self.used_len(index, virtual_size),
                });
            }
        }
        for &(offset, index) in &used {
            free.remove(offset..offset + self.used_len(u64::from(index), virtual_size));
        }
        for b in &bad {
            free.remove(b.space.clone());
        }
        Validated { free, bad }
    }

    /// File bytes the allocated entry `index` uses: a sector bitmap block, or the part of
    /// a payload block inside the virtual disk (none for a block past its end).
    pub fn used_len(&self, index: u64, virtual_size: u64) -> u64 {
        if self.layout.is_sector_bitmap_index(index) {
            MIB
        } else {
            let start = self.layout.block_of_index(index) * self.layout.block_size;
            self.layout
                .block_size
                .min(virtual_size.saturating_sub(start))
        }
    }

    /// Number of payload blocks with data in the file (fully or partly present).
    pub fn allocated_blocks(&self) -> u64 {
        (0..self.layout.payload_blocks)
            .filter(|&b| {
                matches!(
                    self.payload(b).payload_state(),
                    Some(PayloadState::FullyPresent | PayloadState::PartiallyPresent)
                )
            })
            .count() as u64
    }
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_worked_examples() {
        let gib = 1u64 << 30;
        let l = BatLayout::new(10 * gib, 32 << 20, 512, false);
        assert_eq!(
            (l.chunk_ratio, l.payload_blocks, l.total_entries),
            (128, 320, 322)
        );
        assert_eq!(
            BatLayout::new(10 * gib, 32 << 20, 512, true).total_entries,
            387
        );
        let l = BatLayout::new(100 * gib, 32 << 20, 512, false);
        assert_eq!(l.total_entries, 3224);
        assert_eq!(BatLayout::new(gib, 1 << 20, 4096, false).chunk_ratio, 32768);
        assert_eq!(BatLayout::new(gib, 256 << 20, 512, false).chunk_ratio, 16);
    }

    #[test]
    fn payload_and_bitmap_entries_interleave() {
        let l = BatLayout::new(1 << 40, 256 << 20, 512, false);
        assert_eq!(l.payload_index(15), 15);
        assert_eq!(l.sector_bitmap_index(15), 16);
        assert_eq!(l.payload_index(16), 17);
        assert_eq!(l.sector_bitmap_index(16), 33);
        assert!(l.is_sector_bitmap_index(33) && !l.is_sector_bitmap_index(34));
        for block in [0, 15, 16, 31, 32, 1000] {
            assert_eq!(l.block_of_index(l.payload_index(block)), block);
        }
    }

    #[test]
    fn entry_states_round_trip_and_legacy_unmapped_reads_as_unmapped() {
        for state in [
            PayloadState::NotPresent,
            PayloadState::Undefined,
            PayloadState::Zero,
            PayloadState::Unmapped,
            PayloadState::FullyPresent,
            PayloadState::PartiallyPresent,
        ] {
            let e = BatEntry::new(state, 7 * MIB);
            assert_eq!(e.payload_state(), Some(state));
            assert_eq!(e.file_offset(), 7 * MIB);
        }
        assert_eq!(BatEntry(5).payload_state(), Some(PayloadState::Unmapped));
        assert_eq!(BatEntry(4).payload_state(), None);
    }

    #[test]
    fn a_bat_larger_than_memory_allows_is_refused_before_it_is_read() {
        let tib = 1u64 << 40;
        let small_blocks = BatLayout::new(64 * tib, MIB as u32, 512, false);
        let err = Bat::loaded_len(&small_blocks, 1 << 31).unwrap_err();
        assert!(err.to_string().contains("at most 32 MiB of BAT"), "{err}");
        let hyper_v_blocks = BatLayout::new(64 * tib, 32 * MIB as u32, 512, false);
        assert!(Bat::loaded_len(&hyper_v_blocks, 1 << 31).unwrap() <= MAX_LOADED_BAT);
    }

    #[test]
    fn present_entries_past_the_disk_in_a_differencing_bat_are_ignored() {
        // 4 MiB of 1 MiB blocks: one chunk, whose entries 4..4096 lie past the disk.
        let layout = BatLayout::new(4 * MIB, MIB as u32, 512, true);
        let mut bytes = vec![0u8; Bat::loaded_len(&layout, 1 << 20).unwrap() as usize];
        bytes[100 * 8..101 * 8].copy_from_slice(
            &BatEntry::new(PayloadState::FullyPresent, 8 * MIB)
                .0
                .to_le_bytes(),
        );
        let bat = from_bytes(layout, &bytes);
        assert!(bat.validate(4 * MIB, 16 * MIB, &[]).bad.is_empty());
        assert_eq!(bat.allocated_blocks(), 0);
    }

    fn from_bytes(layout: BatLayout, bytes: &[u8]) -> Bat {
        Bat::load(layout, bytes.len() as u64, |buf, offset| {
            buf.copy_from_slice(&bytes[offset as usize..offset as usize + buf.len()]);
            Ok(())
        })
        .unwrap()
    }

    fn bat_with(entries: &[u64]) -> Bat {
        let layout = BatLayout::new(8 * MIB, MIB as u32, 512, false);
        let mut bytes = vec![0u8; 4096];
        for (i, e) in entries.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        from_bytes(layout, &bytes)
    }

    #[test]
    fn page_bytes_round_trip() {
        let bat = bat_with(&[6 | (5 * MIB), 2, 0, 6 | (9 * MIB)]);
        assert_eq!(
            from_bytes(bat.layout, &bat.page_bytes(0)).entry(3),
            bat.entry(3)
        );
        assert_eq!(bat.allocated_blocks(), 2);
    }

    #[test]
    fn validate_rejects_each_bad_entry() {
        let reserved = [ReservedRange {
            start: MIB,
            end: 3 * MIB,
            name: "log",
        }];
        let file_len = 20 * MIB;
        assert!(
            bat_with(&[6 | (5 * MIB), 6 | (6 * MIB), 3 | (6 * MIB)])
                .validate(8 * MIB, file_len, &reserved)
                .bad
                .is_empty()
        );
        let cases: [(&[u64], &str); 5] = [
            (&[0, 4], "BAT entry 1: invalid payload state 4"),
            (
                &[6 | (20 * MIB)],
                "BAT entry 0: points past end of file (offset 0x1400000)",
            ),
            (&[0, 0, 6], "BAT entry 2: points into the header area"),
            (&[6 | (2 * MIB)], "BAT entry 0: overlaps the log"),
            (
                &[6 | (5 * MIB), 0, 6 | (5 * MIB)],
                "BAT entry 2: overlaps the block of BAT entry 0",
            ),
        ];
        for (entries, text) in cases {
            let err = bat_with(entries).validate(8 * MIB, file_len, &reserved).bad[0].error();
            assert!(err.to_string().starts_with(text), "{err} is not {text}");
        }
    }

    #[test]
    fn every_bad_entry_is_listed_and_what_it_names_is_nobodys() {
        let reserved = [ReservedRange {
            start: MIB,
            end: 3 * MIB,
            name: "log",
        }];
        // Entry 0 at 5 MiB is shared with entry 3; entry 1 past the end, entry 2 in the
        // log, entry 4 of reserved state 4 at 9 MiB.
        let bat = bat_with(&[
            6 | (5 * MIB),
            6 | (30 * MIB),
            6 | (2 * MIB),
            6 | (5 * MIB),
            4 | (9 * MIB),
        ]);
        let validated = bat.validate(8 * MIB, 20 * MIB, &reserved);
        let listed: Vec<String> = validated
            .bad
            .iter()
            .map(|b| b.error().to_string())
            .collect();
        assert_eq!(
            listed,
            [
                "BAT entry 1: points past end of file (offset 0x1e00000)",
                "BAT entry 2: overlaps the log (offset 0x200000)",
                "BAT entry 4: invalid payload state 4",
                "BAT entry 3: overlaps the block of BAT entry 0 (offset 0x500000)",
                "BAT entry 0: overlaps the block of BAT entry 3 (offset 0x500000)",
            ]
        );
        assert_eq!(
            validated.free.ranges().collect::<Vec<_>>(),
            [3 * MIB..5 * MIB, 6 * MIB..9 * MIB, 10 * MIB..20 * MIB]
        );
    }

    #[test]
    fn a_long_block_overlapping_past_a_short_one_is_caught() {
        // 4 MiB blocks of a 8 MiB child: block 0 at 4 MiB covers the bitmap block at
        // 5 MiB and block 1 at 6 MiB.
        let layout = BatLayout::new(8 * MIB, 4 * MIB as u32, 512, true);
        let mut bytes = vec![0u8; Bat::loaded_len(&layout, MIB).unwrap() as usize];
        let chunk_bitmap = layout.sector_bitmap_index(0) as usize;
        for (index, entry) in [
            (0, 6 | (4 * MIB)),
            (1, 6 | (6 * MIB)),
            (chunk_bitmap, 6 | (5 * MIB)),
        ] {
            bytes[index * 8..index * 8 + 8].copy_from_slice(&entry.to_le_bytes());
        }
        let bat = from_bytes(layout, &bytes);
        let mut bad: Vec<u64> = bat
            .validate(8 * MIB, 16 * MIB, &[])
            .bad
            .iter()
            .map(|b| b.index)
            .collect();
        bad.sort_unstable();
        assert_eq!(bad, [0, 1, chunk_bitmap as u64]);
    }

    #[test]
    fn region_too_small_for_the_entries_is_refused() {
        let layout = BatLayout::new(1 << 40, MIB as u32, 512, false);
        let err = Bat::loaded_len(&layout, MIB).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("BAT region: holds 0x100000 bytes")
        );
        let small = BatLayout::new(8 * MIB, MIB as u32, 512, false);
        assert_eq!(Bat::loaded_len(&small, MIB).unwrap(), 4096);
    }
}

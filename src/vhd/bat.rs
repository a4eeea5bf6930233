//! The Block Allocation Table of dynamic disks (FORMATS.md §8.7): one big-endian u32 per
//! block, the sector number of the block's bitmap, or all ones for a block never written.
//! Each block is its sector bitmap followed by Block Size bytes of data.

use crate::error::{CorruptionKind, Error};
use std::ops::Range;

pub const UNALLOCATED: u32 = 0xFFFF_FFFF;
pub const ENTRY_SIZE: u64 = 4;
const SECTOR: u64 = 512;

/// How blocks are laid out in the file for one block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    pub block_size: u64,
    /// One bit per data sector, padded to whole sectors.
    pub bitmap_bytes: u64,
}

impl BlockLayout {
    pub fn new(block_size: u32) -> BlockLayout {
        let block_size = u64::from(block_size);
        BlockLayout {
            block_size,
            bitmap_bytes: (block_size / SECTOR).div_ceil(8).next_multiple_of(SECTOR),
        }
    }

    /// Bytes a block occupies in the file.
    pub fn span(&self) -> u64 {
        self.bitmap_bytes + self.block_size
    }
}

/// Bytes the table occupies in the file for `entries` entries (padded to whole sectors).
pub fn table_bytes(entries: u32) -> u64 {
    (u64::from(entries) * ENTRY_SIZE).next_multiple_of(SECTOR)
}

/// A region of the file that no block may overlap.
pub struct Reserved {
    pub start: u64,
    pub len: u64,
    pub name: &'static str,
}

/// The entries for the blocks the disk uses; entries past the disk's end are never read,
/// so they are not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bat {
    entries: Vec<u32>,
}

impl Bat {
    /// Entries from their on-disk bytes (a multiple of 4).
    pub fn parse(bytes: &[u8]) -> Bat {
        let mut bat = Bat {
            entries: Vec::with_capacity(bytes.len() / 4),
        };
        bat.extend_from(bytes);
        bat
    }

    /// Appends entries read in pieces, so a large table needs no second copy in memory.
    pub fn extend_from(&mut self, bytes: &[u8]) {
        self.entries.extend(
            bytes
                .chunks_exact(ENTRY_SIZE as usize)
                .map(|e| u32::from_be_bytes(e.try_into().unwrap())),
        );
    }

    /// File offset of `block`'s bitmap, `None` while unallocated.
    pub fn block_offset(&self, block: u64) -> Option<u64> {
        match self.entries[usize::try_from(block).expect("block index fits memory")] {
            UNALLOCATED => None,
            sector => Some(u64::from(sector) * SECTOR),
        }
    }

    pub fn set(&mut self, block: u64, sector: u32) {
        self.entries[usize::try_from(block).expect("block index fits memory")] = sector;
    }

    /// Each allocated block with the file offset of its bitmap, in block order.
    pub fn allocated_blocks(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|&(_, &entry)| entry != UNALLOCATED)
            .map(|(block, &entry)| (block as u64, u64::from(entry) * SECTOR))
    }

    pub fn allocated(&self) -> u64 {
        self.entries.iter().filter(|&&e| e != UNALLOCATED).count() as u64
    }

    /// On-disk bytes of one entry.
    pub fn entry_bytes(sector: u32) -> [u8; 4] {
        sector.to_be_bytes()
    }

    /// On-disk bytes of the whole table of `entries` entries (at least as many as are
    /// kept), padded with all ones.
    pub fn serialize(&self, entries: u32) -> Vec<u8> {
        let mut bytes = vec![0xFF; table_bytes(entries) as usize];
        for (slot, entry) in bytes.chunks_exact_mut(4).zip(&self.entries) {
            slot.copy_from_slice(&entry.to_be_bytes());
        }
        bytes
    }

    /// Checks that every allocated block lies whole inside `[0, data_end)`, outside every
    /// `reserved` region and apart from every other block. Lists every entry that breaks
    /// one of those rules (two blocks sharing space both do), those against the file and
    /// the regions first, and says where the blocks of the others end.
    pub fn validate(&self, layout: BlockLayout, reserved: &[Reserved], data_end: u64) -> Validated {
        let span = layout.span();
        let mut blocks: Vec<(u64, usize)> = Vec::new();
        let mut bad = Vec::new();
        for (index, &entry) in self.entries.iter().enumerate() {
            if entry == UNALLOCATED {
                continue;
            }
            let start = u64::from(entry) * SECTOR;
            // u32 sectors times 512 plus a u32-sized span cannot overflow u64.
            let end = start + span;
            let problem = if let Some(r) = reserved
                .iter()
                .find(|r| start < r.start + r.len && r.start < end)
            {
                format!("block at offset {start:#x} overlaps the {}", r.name)
            } else if end > data_end {
                format!(
                    "block at offset {start:#x} ({span} bytes) runs past the footer or the end \
                     of the file at {data_end:#x}"
                )
            } else {
                blocks.push((start, index));
                continue;
            };
            bad.push(BadEntry::new(index, start..end, data_end, problem));
        }
        blocks.sort_unstable();
        let mut sharing = Vec::new();
        for pair in blocks.windows(2) {
            let ((first, first_index), (second, second_index)) = (pair[0], pair[1]);
            if second < first + span {
                sharing.push((second_index, second, first_index, first));
                sharing.push((first_index, first, second_index, second));
            }
        }
        for (index, start, other, other_start) in sharing {
            if bad.iter().all(|b: &BadEntry| b.index != index as u64) {
                let problem = format!(
                    "block at offset {start:#x} overlaps the block of BAT entry {other} at \
                     {other_start:#x}"
                );
                bad.push(BadEntry::new(index, start..start + span, data_end, problem));
            }
        }
        let blocks_end = blocks
            .iter()
            .filter(|&&(_, index)| bad.iter().all(|b| b.index != index as u64))
            .map(|&(start, _)| start + span)
            .max()
            .unwrap_or(0);
        Validated { blocks_end, bad }
    }
}

/// What [`Bat::validate`] found.
#[derive(Debug)]
pub struct Validated {
    /// Where the last block of a sound entry ends (0 when there is none).
    pub blocks_end: u64,
    pub bad: Vec<BadEntry>,
}

/// An entry naming space no block may have.
#[derive(Debug)]
pub struct BadEntry {
    pub index: u64,
    pub problem: String,
    /// The part of the space it names that lies inside the data area: no one else's.
    pub space: Range<u64>,
}

impl BadEntry {
    fn new(index: usize, block: Range<u64>, data_end: u64, problem: String) -> BadEntry {
        BadEntry {
            index: index as u64,
            problem,
            space: block.start.min(data_end)..block.end.min(data_end),
        }
    }

    /// The structure the problem is about, as messages name it.
    pub fn structure(&self) -> String {
        format!("BAT entry {}", self.index)
    }

    /// The error a normal open refuses the image with.
    pub fn error(&self) -> Error {
        Error::corrupt(CorruptionKind::OutOfBounds, self.structure(), &self.problem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB2: u32 = 2 << 20;

    #[test]
    fn layout_pads_bitmaps_to_sectors() {
        assert_eq!(BlockLayout::new(MIB2).bitmap_bytes, 512);
        assert_eq!(BlockLayout::new(512 << 10).bitmap_bytes, 512);
        assert_eq!(BlockLayout::new(512).bitmap_bytes, 512);
        assert_eq!(BlockLayout::new(32 << 20).bitmap_bytes, 8192);
        assert_eq!(BlockLayout::new(MIB2).span(), MIB2 as u64 + 512);
        assert_eq!(table_bytes(3), 512);
        assert_eq!(table_bytes(128), 512);
        assert_eq!(table_bytes(129), 1024);
    }

    #[test]
    fn round_trip() {
        let mut bytes = vec![0xFF; 512];
        bytes[4..8].copy_from_slice(&[0, 0, 0, 3]);
        let mut bat = Bat::parse(&bytes[..12]);
        assert_eq!(bat.entries.len(), 3);
        assert_eq!(bat.block_offset(0), None);
        assert_eq!(bat.block_offset(1), Some(1536));
        assert_eq!(bat.allocated(), 1);
        assert_eq!(bat.allocated_blocks().collect::<Vec<_>>(), vec![(1, 1536)]);
        assert_eq!(bat.serialize(3), bytes);
        bat.set(2, 0x1234_5678);
        assert_eq!(bat.block_offset(2), Some(0x1234_5678 * 512));
        assert_eq!(Bat::parse(&bat.serialize(3)[..12]), bat);
        assert_eq!(Bat::entry_bytes(0x1234_5678), [0x12, 0x34, 0x56, 0x78]);
    }

    fn table(entries: &[u32]) -> Bat {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        Bat::parse(&bytes)
    }

    fn reserved() -> Vec<Reserved> {
        vec![
            Reserved {
                start: 0,
                len: 512,
                name: "footer copy",
            },
            Reserved {
                start: 512,
                len: 1024,
                name: "dynamic header",
            },
            Reserved {
                start: 1536,
                len: 512,
                name: "BAT",
            },
        ]
    }

    fn rejection(entries: &[u32], data_end: u64) -> String {
        let validated = table(entries).validate(BlockLayout::new(4096), &reserved(), data_end);
        let err = validated.bad[0].error();
        assert_eq!(err.corruption_kind(), Some(CorruptionKind::OutOfBounds));
        err.to_string()
    }

    #[test]
    fn accepts_blocks_in_free_space_and_reports_their_end() {
        // 4 KiB blocks span 9 sectors (1 bitmap + 8 data).
        let bat = table(&[4, UNALLOCATED, 13, 22]);
        let validated = bat.validate(BlockLayout::new(4096), &reserved(), 31 * 512);
        assert!(validated.bad.is_empty(), "{validated:?}");
        assert_eq!(validated.blocks_end, 31 * 512);
        let empty = table(&[UNALLOCATED]).validate(BlockLayout::new(4096), &reserved(), 2048);
        assert_eq!((empty.blocks_end, empty.bad.len()), (0, 0));
    }

    #[test]
    fn rejects_blocks_past_the_end() {
        let msg = rejection(&[4, 13], 21 * 512);
        assert!(
            msg.starts_with("BAT entry 1: block at offset 0x1a00"),
            "{msg}"
        );
        assert!(msg.contains("runs past the footer"), "{msg}");
        let msg = rejection(&[UNALLOCATED - 1], 1 << 20);
        assert!(msg.starts_with("BAT entry 0:"), "{msg}");
        assert!(msg.contains("runs past the footer"), "{msg}");
    }

    #[test]
    fn rejects_blocks_over_metadata() {
        assert!(rejection(&[0], 1 << 20).contains("overlaps the footer copy"));
        assert!(rejection(&[2], 1 << 20).contains("overlaps the dynamic header"));
        assert!(rejection(&[3], 1 << 20).contains("overlaps the BAT"));
    }

    #[test]
    fn rejects_blocks_that_share_space() {
        let msg = rejection(&[20, 4, 12], 1 << 20);
        assert_eq!(
            msg,
            "BAT entry 2: block at offset 0x1800 overlaps the block of BAT entry 1 at 0x800"
        );
        assert!(rejection(&[4, 4], 1 << 20).contains("overlaps the block of BAT entry"));
    }

    #[test]
    fn every_bad_entry_is_listed_with_the_space_it_names_inside_the_file() {
        // Entry 0 over the footer copy, 1 and 2 sharing space, 3 sound, 4 past the end.
        let bat = table(&[0, 4, 12, 40, 200]);
        let validated = bat.validate(BlockLayout::new(4096), &reserved(), 100 * 512);
        let bad: Vec<(u64, std::ops::Range<u64>)> = validated
            .bad
            .iter()
            .map(|b| (b.index, b.space.clone()))
            .collect();
        assert_eq!(
            bad,
            [
                (0, 0..9 * 512),
                (4, 100 * 512..100 * 512),
                (2, 12 * 512..21 * 512),
                (1, 4 * 512..13 * 512)
            ]
        );
        assert!(
            validated.bad[3]
                .problem
                .contains("overlaps the block of BAT entry 2")
        );
        assert_eq!(validated.blocks_end, 49 * 512);
    }
}

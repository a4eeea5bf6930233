//! Sector bitmap blocks of a differencing VHDX: 1 MiB, one bit per logical sector of a
//! chunk (2^23 sectors), LSB first; a set bit means the sector's data is in this file, a
//! clear one that it is the parent's. Their pages with a bit set are held in memory, so a
//! read never goes to the file for them.

use super::bat::BAT_PAGE_LEN;
use super::fields::MIB;
use crate::bit_runs::{self, BitOrder};
use std::collections::HashMap;
use std::ops::Range;

/// Bytes of one sector bitmap block.
pub const SECTOR_BITMAP_LEN: usize = MIB as usize;
/// Bits in one 4 KiB page, the unit in which bitmap changes are journaled.
const BITS_PER_PAGE: u64 = BAT_PAGE_LEN as u64 * 8;
/// Most bitmap pages holding a set bit kept in memory at open (128 MiB, the sectors of
/// 512 TiB of written data). Past it an image is refused rather than allowed to take the
/// machine's memory.
pub const MAX_LOADED_PAGES: usize = 32 * 1024;

/// One page of a bitmap block, as it is to be journaled and written.
pub type BitmapPage = Box<[u8; BAT_PAGE_LEN]>;

/// The set bits of every chunk, kept by page: a page with no bit set is not held, so
/// memory follows what was written rather than how many chunks have a bitmap block.
#[derive(Debug, Default)]
pub struct SectorBitmaps {
    pages: HashMap<(u64, u64), BitmapPage>,
}

impl SectorBitmaps {
    /// Takes the stored block of `chunk` (`SECTOR_BITMAP_LEN` bytes), keeping its pages
    /// that have a bit set.
    pub fn insert(&mut self, chunk: u64, block: &[u8]) {
        debug_assert_eq!(block.len(), SECTOR_BITMAP_LEN);
        for (page, contents) in block.chunks_exact(BAT_PAGE_LEN).enumerate() {
            self.apply_page(chunk, page as u64, contents.try_into().unwrap());
        }
    }

    /// Pages held in memory.
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// The pages with a bit set, as (chunk, page), in order.
    pub fn held_pages(&self) -> Vec<(u64, u64)> {
        let mut held: Vec<(u64, u64)> = self.pages.keys().copied().collect();
        held.sort_unstable();
        held
    }

    #[cfg(test)]
    pub fn contains(&self, chunk: u64) -> bool {
        self.pages.keys().any(|&(c, _)| c == chunk)
    }

    /// Consecutive runs of equal bits over `bits` of `chunk`'s block; a chunk without a
    /// block has every bit clear.
    pub fn runs(&self, chunk: u64, bits: Range<u64>) -> Vec<(Range<u64>, bool)> {
        let mut runs = Vec::new();
        let mut bit = bits.start;
        while bit < bits.end {
            let page = bit / BITS_PER_PAGE;
            let page_start = page * BITS_PER_PAGE;
            let end = bits.end.min(page_start + BITS_PER_PAGE);
            let contents = self.pages.get(&(chunk, page)).map(|p| &p[..]);
            let in_page = bit - page_start..end - page_start;
            bit_runs::push_runs(&mut runs, contents, in_page, page_start, BitOrder::LsbFirst);
            bit = end;
        }
        runs
    }

    /// The pages of `chunk`'s block (all clear if it has none yet) that change when each
    /// range of `assign` takes its value, as (page index, new contents).
    pub fn changed_pages(
        &self,
        chunk: u64,
        assign: &[(Range<u64>, bool)],
    ) -> Vec<(u64, BitmapPage)> {
        let mut pages: Vec<(u64, BitmapPage)> = Vec::new();
        for (range, value) in assign {
            let mut bit = range.start;
            while bit < range.end {
                let page = bit / BITS_PER_PAGE;
                let page_start = page * BITS_PER_PAGE;
                let end = range.end.min(page_start + BITS_PER_PAGE);
                let index = match pages.iter().position(|(p, _)| *p == page) {
                    Some(index) => index,
                    None => {
                        let contents = self
                            .pages
                            .get(&(chunk, page))
                            .cloned()
                            .unwrap_or_else(|| Box::new([0u8; BAT_PAGE_LEN]));
                        pages.push((page, contents));
                        pages.len() - 1
                    }
                };
                bit_runs::assign(
                    &mut pages[index].1[..],
                    bit - page_start..end - page_start,
                    *value,
                    BitOrder::LsbFirst,
                );
                bit = end;
            }
        }
        pages
    }

    /// Installs a page read from the file, or computed by [`Self::changed_pages`] once it
    /// is on disk.
    pub fn apply_page(&mut self, chunk: u64, page: u64, contents: &[u8; BAT_PAGE_LEN]) {
        if contents.iter().any(|&b| b != 0) {
            self.pages.insert((chunk, page), Box::new(*contents));
        } else {
            self.pages.remove(&(chunk, page));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_lsb_first_and_runs_split_where_they_change() {
        let mut block = vec![0u8; SECTOR_BITMAP_LEN];
        block[0] = 0b0000_0110;
        block[1] = 0x80;
        let mut maps = SectorBitmaps::default();
        maps.insert(3, &block);
        maps.insert(4, &vec![0u8; SECTOR_BITMAP_LEN]);
        assert!(
            maps.contains(3) && !maps.contains(4),
            "empty blocks are not kept"
        );
        assert_eq!(
            maps.runs(3, 0..17),
            vec![
                (0..1, false),
                (1..3, true),
                (3..15, false),
                (15..16, true),
                (16..17, false)
            ]
        );
    }

    #[test]
    fn changed_pages_round_trip_through_apply() {
        let mut maps = SectorBitmaps::default();
        let bits = BITS_PER_PAGE - 4..BITS_PER_PAGE + 4;
        let pages = maps.changed_pages(0, &[(bits.clone(), true)]);
        assert_eq!(pages.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(pages[0].1[BAT_PAGE_LEN - 1], 0xf0);
        assert_eq!(pages[1].1[0], 0x0f);
        assert!(!maps.contains(0), "computing pages changes nothing");
        for (page, contents) in &pages {
            maps.apply_page(0, *page, contents);
        }
        assert_eq!(
            maps.runs(0, bits.start - 1..bits.end + 1),
            vec![
                (bits.start - 1..bits.start, false),
                (bits.clone(), true),
                (bits.end..bits.end + 1, false)
            ]
        );
        // Clearing part of a block and setting another part in one change.
        let pages = maps.changed_pages(
            0,
            &[(bits.clone(), false), (bits.start..bits.start + 1, true)],
        );
        for (page, contents) in &pages {
            maps.apply_page(0, *page, contents);
        }
        assert_eq!(
            maps.runs(0, bits.clone()),
            vec![
                (bits.start..bits.start + 1, true),
                (bits.start + 1..bits.end, false)
            ]
        );
    }
}

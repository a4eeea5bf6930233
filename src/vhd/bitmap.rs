//! The sector bitmap in front of each block's data (FORMATS.md §8.7): one bit per data
//! sector, most significant bit first (bit 7 of byte 0 is the block's first sector), padded
//! to whole sectors. In a differencing disk a set bit means the sector's data is in this
//! file, a clear one that it is in the parent.

use std::ops::Range;

const SECTOR: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectorBitmap {
    bytes: Box<[u8]>,
}

impl SectorBitmap {
    /// The bitmap as stored, `bitmap_bytes` long.
    pub fn from_bytes(bytes: Vec<u8>) -> SectorBitmap {
        SectorBitmap {
            bytes: bytes.into_boxed_slice(),
        }
    }

    /// A bitmap of `len` bytes with every sector in the parent.
    pub fn clear(len: usize) -> SectorBitmap {
        SectorBitmap::from_bytes(vec![0; len])
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn is_set(&self, sector: u64) -> bool {
        self.bytes[(sector / 8) as usize] & (0x80 >> (sector % 8)) != 0
    }

    pub fn set(&mut self, sectors: Range<u64>) {
        for sector in sectors {
            self.bytes[(sector / 8) as usize] |= 0x80 >> (sector % 8);
        }
    }

    pub fn all_set(&self, sectors: Range<u64>) -> bool {
        sectors.into_iter().all(|sector| self.is_set(sector))
    }

    /// `sectors` split into maximal runs of equal bits, in order, with the bit of each.
    pub fn runs(&self, sectors: Range<u64>) -> Vec<(Range<u64>, bool)> {
        let mut runs: Vec<(Range<u64>, bool)> = Vec::new();
        for sector in sectors {
            let bit = self.is_set(sector);
            match runs.last_mut() {
                Some((run, last)) if *last == bit => run.end = sector + 1,
                _ => runs.push((sector..sector + 1, bit)),
            }
        }
        runs
    }

    /// The bytes, in whole sectors, holding the bits of `sectors`: the part of the bitmap
    /// to rewrite after changing those bits, each sector of it written whole.
    pub fn sectors_holding(&self, sectors: Range<u64>) -> Range<usize> {
        let first = (sectors.start / 8) as usize / SECTOR * SECTOR;
        let end = ((sectors.end.max(1) - 1) / 8) as usize / SECTOR * SECTOR + SECTOR;
        first..end.min(self.bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_most_significant_first() {
        let mut bitmap = SectorBitmap::clear(512);
        bitmap.set(0..1);
        bitmap.set(9..11);
        assert_eq!(&bitmap.bytes()[..3], &[0x80, 0x60, 0x00]);
        assert!(bitmap.is_set(0) && !bitmap.is_set(1) && bitmap.is_set(10));
        assert!(bitmap.all_set(9..11) && !bitmap.all_set(8..11));
        let parsed = SectorBitmap::from_bytes(bitmap.bytes().to_vec());
        assert_eq!(parsed, bitmap);
        // Bits written by Windows for a block whose first 0x7F sectors were written.
        let mut windows = vec![0xFF; 15];
        windows.push(0xFE);
        windows.resize(512, 0);
        let windows = SectorBitmap::from_bytes(windows);
        assert_eq!(
            windows.runs(0..4096),
            vec![(0..127, true), (127..4096, false)]
        );
    }

    #[test]
    fn runs_split_where_bits_change() {
        let mut bitmap = SectorBitmap::clear(512);
        bitmap.set(3..5);
        bitmap.set(7..8);
        assert_eq!(
            bitmap.runs(2..9),
            vec![
                (2..3, false),
                (3..5, true),
                (5..7, false),
                (7..8, true),
                (8..9, false)
            ]
        );
        assert_eq!(bitmap.runs(3..3), vec![]);
    }

    #[test]
    fn sectors_holding_bits_cover_whole_bitmap_sectors() {
        // 32 MiB blocks: 65536 sectors, 8192 bytes of bitmap.
        let bitmap = SectorBitmap::clear(8192);
        assert_eq!(bitmap.sectors_holding(0..1), 0..512);
        assert_eq!(bitmap.sectors_holding(4095..4097), 0..1024);
        assert_eq!(bitmap.sectors_holding(4096..4097), 512..1024);
        assert_eq!(bitmap.sectors_holding(65535..65536), 7680..8192);
    }
}

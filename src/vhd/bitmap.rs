//! The sector bitmap in front of each block's data (FORMATS.md §8.7): one bit per data
//! sector, most significant bit first (bit 7 of byte 0 is the block's first sector), padded
//! to whole sectors. In a differencing disk a set bit means the sector's data is in this
//! file, a clear one that it is in the parent.

use crate::bit_runs::{self, BitOrder};
use std::ops::Range;

const SECTOR: usize = 512;

/// The bits of one block; only the bytes that hold bits are kept, not the padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectorBitmap {
    bytes: Box<[u8]>,
}

impl SectorBitmap {
    /// A bitmap for `sectors` sectors with every sector in the parent.
    pub fn clear(sectors: u64) -> SectorBitmap {
        SectorBitmap {
            bytes: vec![0; sectors.div_ceil(8) as usize].into_boxed_slice(),
        }
    }

    /// The bitmap of a block of `sectors` sectors from its stored bytes (padding included).
    pub fn from_stored(mut stored: Vec<u8>, sectors: u64) -> SectorBitmap {
        stored.truncate(sectors.div_ceil(8) as usize);
        SectorBitmap {
            bytes: stored.into_boxed_slice(),
        }
    }

    #[cfg(test)]
    pub fn is_set(&self, sector: u64) -> bool {
        bit_runs::is_set(&self.bytes, sector, BitOrder::MsbFirst)
    }

    pub fn set(&mut self, sectors: Range<u64>) {
        bit_runs::assign(&mut self.bytes, sectors, true, BitOrder::MsbFirst);
    }

    pub fn all_set(&self, sectors: Range<u64>) -> bool {
        matches!(self.runs(sectors)[..], [] | [(_, true)])
    }

    /// `sectors` split into maximal runs of equal bits, in order, with the bit of each.
    pub fn runs(&self, sectors: Range<u64>) -> Vec<(Range<u64>, bool)> {
        bit_runs::runs(&self.bytes, sectors, BitOrder::MsbFirst)
    }

    /// The whole sectors of the stored bitmap that hold the bits of `sectors`, as they
    /// must be written after changing those bits: their offset in the stored bitmap and
    /// their bytes, padding zeroed.
    pub fn stored_sectors(&self, sectors: Range<u64>) -> (u64, Vec<u8>) {
        let first = (sectors.start / 8) as usize / SECTOR * SECTOR;
        let end = ((sectors.end.max(1) - 1) / 8) as usize / SECTOR * SECTOR + SECTOR;
        let mut stored = vec![0u8; end - first];
        let held = self.bytes.len().min(end);
        if first < held {
            stored[..held - first].copy_from_slice(&self.bytes[first..held]);
        }
        (first as u64, stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_most_significant_first() {
        let mut bitmap = SectorBitmap::clear(4096);
        bitmap.set(0..1);
        bitmap.set(9..11);
        let (at, stored) = bitmap.stored_sectors(0..4096);
        assert_eq!((at, stored.len()), (0, 512));
        assert_eq!(&stored[..3], &[0x80, 0x60, 0x00]);
        assert!(bitmap.is_set(0) && !bitmap.is_set(1) && bitmap.is_set(10));
        assert!(bitmap.all_set(9..11) && !bitmap.all_set(8..11));
        assert_eq!(SectorBitmap::from_stored(stored, 4096), bitmap);
        // Bits written by Windows for a block whose first 0x7F sectors were written.
        let mut windows = vec![0xFF; 15];
        windows.push(0xFE);
        windows.resize(512, 0);
        let windows = SectorBitmap::from_stored(windows, 4096);
        assert_eq!(
            windows.runs(0..4096),
            vec![(0..127, true), (127..4096, false)]
        );
    }

    #[test]
    fn runs_split_where_bits_change() {
        let mut bitmap = SectorBitmap::clear(64);
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
    fn only_bytes_holding_bits_are_kept_and_padding_is_written_as_zeros() {
        // 4 KiB blocks: 8 sectors, one byte of bits in a 512-byte stored bitmap.
        let mut stored = vec![0xAAu8; 512];
        stored[0] = 0x0F;
        let mut small = SectorBitmap::from_stored(stored, 8);
        assert_eq!(small.bytes.len(), 1);
        small.set(0..2);
        let (at, sector) = small.stored_sectors(0..8);
        assert_eq!(at, 0);
        assert_eq!(sector[0], 0xCF);
        assert!(sector[1..].iter().all(|&b| b == 0));
        // One sector per block still has a byte of bits.
        assert_eq!(SectorBitmap::clear(1).bytes.len(), 1);
    }

    #[test]
    fn stored_sectors_cover_whole_bitmap_sectors() {
        // 32 MiB blocks: 65536 sectors, 8192 bytes of bits.
        let mut bitmap = SectorBitmap::clear(65536);
        bitmap.set(4095..4097);
        assert_eq!(bitmap.stored_sectors(0..1).0, 0);
        let (at, bytes) = bitmap.stored_sectors(4095..4097);
        assert_eq!((at, bytes.len()), (0, 1024));
        assert_eq!((bytes[511], bytes[512]), (0x01, 0x80));
        assert_eq!(bitmap.stored_sectors(4096..4097).0, 512);
        assert_eq!(bitmap.stored_sectors(65535..65536), (7680, vec![0; 512]));
    }
}

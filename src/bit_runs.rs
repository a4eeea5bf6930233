//! Runs of equal bits in the sector bitmaps of differencing images. VHD numbers a byte's
//! bits from the most significant one, VHDX from the least; both ask the same question:
//! which consecutive sectors of a range are in this file, and which are the parent's.

use std::ops::Range;

/// Which bit of a byte holds the first of its eight sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitOrder {
    /// Bit 7 first (VHD).
    MsbFirst,
    /// Bit 0 first (VHDX).
    LsbFirst,
}

impl BitOrder {
    fn mask(self, bit: u64) -> u8 {
        match self {
            BitOrder::MsbFirst => 0x80 >> (bit % 8),
            BitOrder::LsbFirst => 1 << (bit % 8),
        }
    }
}

/// Whether bit `bit` of `bytes` is set; bits past the end of `bytes` are clear.
#[cfg(test)]
pub fn is_set(bytes: &[u8], bit: u64, order: BitOrder) -> bool {
    usize::try_from(bit / 8)
        .ok()
        .and_then(|i| bytes.get(i))
        .is_some_and(|&byte| byte & order.mask(bit) != 0)
}

/// Sets or clears `bits` of `bytes`, which must hold them.
pub fn assign(bytes: &mut [u8], bits: Range<u64>, value: bool, order: BitOrder) {
    for bit in bits {
        let byte = &mut bytes[(bit / 8) as usize];
        if value {
            *byte |= order.mask(bit);
        } else {
            *byte &= !order.mask(bit);
        }
    }
}

/// Appends `bits` of `bytes` (`None`: all clear) split into maximal runs of equal bits,
/// each numbered from `base` on and merged into the last run of `runs` where they
/// continue it. Whole bytes of one value are taken eight bits at a time.
pub fn push_runs(
    runs: &mut Vec<(Range<u64>, bool)>,
    bytes: Option<&[u8]>,
    bits: Range<u64>,
    base: u64,
    order: BitOrder,
) {
    let mut bit = bits.start;
    while bit < bits.end {
        let byte = bytes.map_or(0, |b| b.get((bit / 8) as usize).copied().unwrap_or(0));
        let (value, n) = if bit.is_multiple_of(8) && (byte == 0 || byte == 0xFF) {
            (byte == 0xFF, 8.min(bits.end - bit))
        } else {
            (byte & order.mask(bit) != 0, 1)
        };
        let (start, end) = (base + bit, base + bit + n);
        match runs.last_mut() {
            Some((run, last)) if *last == value && run.end == start => run.end = end,
            _ => runs.push((start..end, value)),
        }
        bit += n;
    }
}

/// `bits` of `bytes` split into maximal runs of equal bits, in order.
pub fn runs(bytes: &[u8], bits: Range<u64>, order: BitOrder) -> Vec<(Range<u64>, bool)> {
    let mut runs = Vec::new();
    push_runs(&mut runs, Some(bytes), bits, 0, order);
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit by bit, the obvious way.
    fn slow_runs(bytes: &[u8], bits: Range<u64>, order: BitOrder) -> Vec<(Range<u64>, bool)> {
        let mut out: Vec<(Range<u64>, bool)> = Vec::new();
        for bit in bits {
            let value = is_set(bytes, bit, order);
            match out.last_mut() {
                Some((run, last)) if *last == value => run.end = bit + 1,
                _ => out.push((bit..bit + 1, value)),
            }
        }
        out
    }

    #[test]
    fn both_orders_agree_with_bit_by_bit_runs() {
        let bytes = [0x00, 0xFF, 0b1010_0001, 0xFF, 0xFF, 0x00, 0x0F, 0x80];
        for order in [BitOrder::MsbFirst, BitOrder::LsbFirst] {
            for start in 0..64 {
                for end in start..=70 {
                    assert_eq!(
                        runs(&bytes, start..end, order),
                        slow_runs(&bytes, start..end, order),
                        "{order:?} {start}..{end}"
                    );
                }
            }
        }
        assert_eq!(
            runs(&[0b0000_0110], 0..4, BitOrder::LsbFirst),
            [(0..1, false), (1..3, true), (3..4, false)]
        );
        assert_eq!(
            runs(&[0b0110_0000], 0..4, BitOrder::MsbFirst),
            [(0..1, false), (1..3, true), (3..4, false)]
        );
    }

    #[test]
    fn runs_continue_across_calls_and_missing_bytes_are_clear() {
        let mut out = Vec::new();
        push_runs(&mut out, Some(&[0xFF]), 4..8, 0, BitOrder::MsbFirst);
        push_runs(&mut out, Some(&[0xF0]), 0..8, 8, BitOrder::MsbFirst);
        push_runs(&mut out, None, 0..16, 16, BitOrder::MsbFirst);
        assert_eq!(out, [(4..12, true), (12..32, false)]);
    }

    #[test]
    fn assign_sets_and_clears_in_either_order() {
        let mut bytes = [0u8; 2];
        assign(&mut bytes, 1..10, true, BitOrder::LsbFirst);
        assert_eq!(bytes, [0xFE, 0x03]);
        assign(&mut bytes, 2..4, false, BitOrder::LsbFirst);
        assert_eq!(bytes, [0xF2, 0x03]);
        let mut bytes = [0u8; 2];
        assign(&mut bytes, 1..10, true, BitOrder::MsbFirst);
        assert_eq!(bytes, [0x7F, 0xC0]);
    }
}

//! The checksum shared by the VHD footer and dynamic header (FORMATS.md §3.2): the one's
//! complement of the byte sum, with the checksum field itself counted as zeros.

/// Checksum of `bytes` as the format defines it, skipping the 4-byte field at `field`.
pub fn vhd_checksum(bytes: &[u8], field: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |sum, (_, &b)| sum.wrapping_add(u32::from(b)));
    !sum
}

/// Test helper for the structures' rejection tests: sets the bytes at `at` and repairs
/// the checksum at `field`, so only the changed field is wrong.
#[cfg(test)]
pub fn set_field_keeping_checksum(bytes: &mut [u8], at: usize, value: &[u8], field: usize) {
    bytes[at..at + value.len()].copy_from_slice(value);
    let checksum = vhd_checksum(bytes, field);
    bytes[field..field + 4].copy_from_slice(&checksum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_ignores_its_own_field() {
        let mut bytes = [1u8; 16];
        let plain = vhd_checksum(&bytes, 4);
        assert_eq!(plain, !12u32);
        bytes[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(vhd_checksum(&bytes, 4), plain);
    }

    #[test]
    fn checksum_changes_with_any_other_byte() {
        let mut bytes = [0u8; 512];
        let zero = vhd_checksum(&bytes, 64);
        assert_eq!(zero, 0xFFFF_FFFF);
        bytes[511] = 1;
        assert_ne!(vhd_checksum(&bytes, 64), zero);
    }
}

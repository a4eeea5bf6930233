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

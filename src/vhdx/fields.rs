//! Little-endian field access, GUIDs and CRC-32C as every VHDX structure stores them.
//!
//! Structures are parsed from byte slices that their callers have already sized, so the
//! accessors index directly; a wrong offset is a programming error caught by the unit
//! tests, never something an image can cause.

use uuid::Uuid;

pub fn u16_at(buf: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(buf[off..off + 2].try_into().unwrap())
}

pub fn u32_at(buf: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(buf[off..off + 4].try_into().unwrap())
}

pub fn u64_at(buf: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(buf[off..off + 8].try_into().unwrap())
}

/// GUIDs are stored in the Microsoft mixed-endian layout (first three fields little-endian).
pub fn guid_at(buf: &[u8], off: usize) -> Uuid {
    Uuid::from_bytes_le(buf[off..off + 16].try_into().unwrap())
}

pub fn put_u16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_guid(buf: &mut [u8], off: usize, g: &Uuid) {
    buf[off..off + 16].copy_from_slice(&g.to_bytes_le());
}

/// CRC-32C of `buf` with its 4-byte checksum field at `field` taken as zero, which is how
/// headers, region tables and log entries are all checksummed.
pub fn crc32c_without_field(buf: &[u8], field: usize) -> u32 {
    let crc = crc32c::crc32c_append(0, &buf[..field]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &buf[field + 4..])
}

/// Stores the checksum of `buf` into its checksum field at `field`.
pub fn seal_crc32c(buf: &mut [u8], field: usize) {
    let crc = crc32c_without_field(buf, field);
    put_u32(buf, field, crc);
}

/// Whether the checksum field at `field` holds the checksum of `buf`.
pub fn crc32c_matches(buf: &[u8], field: usize) -> bool {
    crc32c_without_field(buf, field) == u32_at(buf, field)
}

pub const MIB: u64 = 1 << 20;

pub fn is_mib_aligned(v: u64) -> bool {
    v.is_multiple_of(MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnoli() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c::crc32c(&[0u8; 4096]), 0x98F9_4189);
    }

    #[test]
    fn checksum_ignores_its_own_field() {
        let mut buf = vec![7u8; 64];
        seal_crc32c(&mut buf, 4);
        assert!(crc32c_matches(&buf, 4));
        let mut zeroed = buf.clone();
        put_u32(&mut zeroed, 4, 0);
        assert_eq!(crc32c::crc32c(&zeroed), u32_at(&buf, 4));
        buf[40] ^= 1;
        assert!(!crc32c_matches(&buf, 4));
    }

    #[test]
    fn guids_use_mixed_endian_layout() {
        let bat = Uuid::from_u128(0x2DC27766_F623_4200_9D64_115E9BFD4A08);
        let mut buf = [0u8; 16];
        put_guid(&mut buf, 0, &bat);
        assert_eq!(
            buf,
            [
                0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD,
                0x4A, 0x08
            ]
        );
        assert_eq!(guid_at(&buf, 0), bat);
    }
}

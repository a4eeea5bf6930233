//! The 512-byte hard disk footer (FORMATS.md §8.2): at the end of every VHD, and copied to
//! offset 0 of dynamic and differencing disks. Big-endian throughout.

use super::checksum::vhd_checksum;
use super::geometry::Geometry;
use crate::error::{CorruptionKind, Error, Result};

pub const FOOTER_SIZE: usize = 512;
/// Virtual PC before 2004 wrote the footer one byte short; the missing byte is reserved.
pub const LEGACY_FOOTER_SIZE: usize = 511;

pub(super) const COOKIE: &[u8; 8] = b"conectix";
// Field offsets inside the footer.
const OFF_COOKIE: usize = 0; // 8 bytes, "conectix"
const OFF_FEATURES: usize = 8; // u32
const OFF_VERSION: usize = 12; // u32, major version in the high 16 bits
pub(super) const OFF_DATA_OFFSET: usize = 16; // u64, dynamic header offset (all ones for fixed)
const OFF_TIMESTAMP: usize = 24; // u32, seconds since 2000-01-01 UTC
const OFF_CREATOR_APP: usize = 28; // 4 ASCII bytes
const OFF_CREATOR_VERSION: usize = 32; // u32
const OFF_CREATOR_HOST_OS: usize = 36; // 4 ASCII bytes
const OFF_ORIGINAL_SIZE: usize = 40; // u64
const OFF_CURRENT_SIZE: usize = 48; // u64
const OFF_CYLINDERS: usize = 56; // u16
const OFF_HEADS: usize = 58; // u8
const OFF_SECTORS_PER_TRACK: usize = 59; // u8
const OFF_DISK_TYPE: usize = 60; // u32
pub(super) const OFF_CHECKSUM: usize = 64; // u32
const OFF_UNIQUE_ID: usize = 68; // 16 bytes
const OFF_SAVED_STATE: usize = 84; // u8; bytes 85..512 are reserved

const SUPPORTED_MAJOR_VERSION: u32 = 1;
/// Data Offset of a fixed disk: the specification says 0xFFFFFFFF, tools write all ones.
pub const NO_DATA_OFFSET: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    fn from_field(value: u32) -> Option<DiskType> {
        match value {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }

    fn field(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_host_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: Geometry,
    pub disk_type: DiskType,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
}

pub(super) fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4-byte field"))
}

pub(super) fn be_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8-byte field"))
}

impl Footer {
    /// Parses and validates a footer; `structure` names where it was found, for errors.
    pub fn parse(bytes: &[u8; FOOTER_SIZE], structure: &str) -> Result<Footer> {
        if &bytes[OFF_COOKIE..OFF_COOKIE + 8] != COOKIE {
            return Err(Error::corrupt(
                CorruptionKind::BadSignature,
                structure,
                "Cookie field is not \"conectix\"",
            ));
        }
        let stored = be_u32(bytes, OFF_CHECKSUM);
        let computed = vhd_checksum(bytes, OFF_CHECKSUM);
        if stored != computed {
            return Err(Error::corrupt(
                CorruptionKind::BadChecksum,
                structure,
                format!(
                    "Checksum field holds {stored:#010x}, the contents sum to {computed:#010x}"
                ),
            ));
        }
        let version = be_u32(bytes, OFF_VERSION);
        if version >> 16 != SUPPORTED_MAJOR_VERSION {
            return Err(Error::corrupt(
                CorruptionKind::InvalidField,
                structure,
                format!("File Format Version {version:#010x} is not 1.x"),
            ));
        }
        let type_field = be_u32(bytes, OFF_DISK_TYPE);
        let disk_type = DiskType::from_field(type_field).ok_or_else(|| {
            Error::corrupt(
                CorruptionKind::InvalidField,
                structure,
                format!("Disk Type {type_field} is not fixed (2), dynamic (3) or differencing (4)"),
            )
        })?;
        Ok(Footer {
            features: be_u32(bytes, OFF_FEATURES),
            version,
            data_offset: be_u64(bytes, OFF_DATA_OFFSET),
            timestamp: be_u32(bytes, OFF_TIMESTAMP),
            creator_app: bytes[OFF_CREATOR_APP..OFF_CREATOR_APP + 4]
                .try_into()
                .unwrap(),
            creator_version: be_u32(bytes, OFF_CREATOR_VERSION),
            creator_host_os: bytes[OFF_CREATOR_HOST_OS..OFF_CREATOR_HOST_OS + 4]
                .try_into()
                .unwrap(),
            original_size: be_u64(bytes, OFF_ORIGINAL_SIZE),
            current_size: be_u64(bytes, OFF_CURRENT_SIZE),
            geometry: Geometry {
                cylinders: u16::from_be_bytes([bytes[OFF_CYLINDERS], bytes[OFF_CYLINDERS + 1]]),
                heads: bytes[OFF_HEADS],
                sectors_per_track: bytes[OFF_SECTORS_PER_TRACK],
            },
            disk_type,
            unique_id: bytes[OFF_UNIQUE_ID..OFF_UNIQUE_ID + 16].try_into().unwrap(),
            saved_state: bytes[OFF_SAVED_STATE],
        })
    }

    /// The footer's bytes with a fresh checksum; reserved bytes are zero. Used to create
    /// images: the driver rewrites the footer it found, reserved bytes and all.
    pub fn serialize(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[OFF_COOKIE..OFF_COOKIE + 8].copy_from_slice(COOKIE);
        b[OFF_FEATURES..OFF_FEATURES + 4].copy_from_slice(&self.features.to_be_bytes());
        b[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&self.version.to_be_bytes());
        b[OFF_DATA_OFFSET..OFF_DATA_OFFSET + 8].copy_from_slice(&self.data_offset.to_be_bytes());
        b[OFF_TIMESTAMP..OFF_TIMESTAMP + 4].copy_from_slice(&self.timestamp.to_be_bytes());
        b[OFF_CREATOR_APP..OFF_CREATOR_APP + 4].copy_from_slice(&self.creator_app);
        b[OFF_CREATOR_VERSION..OFF_CREATOR_VERSION + 4]
            .copy_from_slice(&self.creator_version.to_be_bytes());
        b[OFF_CREATOR_HOST_OS..OFF_CREATOR_HOST_OS + 4].copy_from_slice(&self.creator_host_os);
        b[OFF_ORIGINAL_SIZE..OFF_ORIGINAL_SIZE + 8]
            .copy_from_slice(&self.original_size.to_be_bytes());
        b[OFF_CURRENT_SIZE..OFF_CURRENT_SIZE + 8].copy_from_slice(&self.current_size.to_be_bytes());
        b[OFF_CYLINDERS..OFF_CYLINDERS + 2].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        b[OFF_HEADS] = self.geometry.heads;
        b[OFF_SECTORS_PER_TRACK] = self.geometry.sectors_per_track;
        b[OFF_DISK_TYPE..OFF_DISK_TYPE + 4].copy_from_slice(&self.disk_type.field().to_be_bytes());
        b[OFF_UNIQUE_ID..OFF_UNIQUE_ID + 16].copy_from_slice(&self.unique_id);
        b[OFF_SAVED_STATE] = self.saved_state;
        let checksum = vhd_checksum(&b, OFF_CHECKSUM);
        b[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&checksum.to_be_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first 96 bytes of a fixed-disk footer exported by Azure; the rest is zero.
    const AZURE_FOOTER_HEAD: [u8; 96] = [
        0x63, 0x6f, 0x6e, 0x65, 0x63, 0x74, 0x69, 0x78, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01, 0x00,
        0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x2e, 0xc7, 0x9b, 0x96, 0x77, 0x61,
        0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x57, 0x69, 0x32, 0x6b, 0x00, 0x00, 0x00, 0x01, 0x40,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x40, 0x00, 0x00, 0x00, 0x28, 0xa2, 0x10, 0x3f,
        0x00, 0x00, 0x00, 0x02, 0xff, 0xff, 0xe7, 0x47, 0x8c, 0x54, 0xdf, 0x94, 0xbd, 0x35, 0x71,
        0x4c, 0x94, 0x5f, 0xe5, 0x44, 0x44, 0x53, 0x92, 0x1a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    fn azure_footer() -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[..96].copy_from_slice(&AZURE_FOOTER_HEAD);
        b
    }

    fn sample() -> Footer {
        Footer {
            features: 2,
            version: 0x0001_0000,
            data_offset: 512,
            timestamp: 0x2ec7_9b96,
            creator_app: *b"test",
            creator_version: 0x0001_0002,
            creator_host_os: *b"Wi2k",
            original_size: 20 << 20,
            current_size: 20 << 20,
            geometry: Geometry::for_size(20 << 20),
            disk_type: DiskType::Dynamic,
            unique_id: [7; 16],
            saved_state: 0,
        }
    }

    #[test]
    fn azure_footer_vector_parses_with_its_checksum() {
        let bytes = azure_footer();
        assert_eq!(vhd_checksum(&bytes, OFF_CHECKSUM), 0xFFFF_E747);
        let footer = Footer::parse(&bytes, "VHD footer").unwrap();
        assert_eq!(footer.disk_type, DiskType::Fixed);
        assert_eq!(&footer.creator_app, b"wa\0\0");
        assert_eq!(footer.creator_version, 0x0007_0000);
        assert_eq!(footer.current_size, 5 << 30);
        assert_eq!(footer.original_size, 5 << 30);
        assert_eq!(footer.data_offset, NO_DATA_OFFSET);
        assert_eq!(footer.geometry, Geometry::for_size(5 << 30));
        assert_eq!(footer.timestamp, 0x2EC7_9B96);
        assert_eq!(footer.unique_id[..4], [0x8c, 0x54, 0xdf, 0x94]);
        // Re-serializing reproduces the exact bytes, checksum included.
        assert_eq!(footer.serialize(), bytes);
    }

    #[test]
    fn round_trip() {
        let footer = sample();
        let bytes = footer.serialize();
        assert_eq!(Footer::parse(&bytes, "VHD footer").unwrap(), footer);
    }

    fn rejected(bytes: &[u8; FOOTER_SIZE]) -> (CorruptionKind, String) {
        let err = Footer::parse(bytes, "VHD footer").unwrap_err();
        (err.corruption_kind().unwrap(), err.to_string())
    }

    /// Sets a field and repairs the checksum, so only the field itself is wrong.
    fn with_field(at: usize, value: &[u8]) -> [u8; FOOTER_SIZE] {
        let mut b = sample().serialize();
        super::super::checksum::set_field_keeping_checksum(&mut b, at, value, OFF_CHECKSUM);
        b
    }

    #[test]
    fn rejects_a_bad_cookie() {
        let (kind, msg) = rejected(&with_field(OFF_COOKIE, b"conectiX"));
        assert_eq!(kind, CorruptionKind::BadSignature);
        assert!(msg.starts_with("VHD footer: Cookie"), "{msg}");
    }

    #[test]
    fn rejects_a_bad_checksum() {
        for at in [OFF_CURRENT_SIZE, OFF_CHECKSUM, 511] {
            let mut b = sample().serialize();
            b[at] ^= 1;
            let (kind, msg) = rejected(&b);
            assert_eq!(kind, CorruptionKind::BadChecksum);
            assert!(msg.starts_with("VHD footer: Checksum field"), "{msg}");
        }
    }

    #[test]
    fn rejects_an_unknown_version() {
        let (kind, msg) = rejected(&with_field(OFF_VERSION, &0x0002_0000u32.to_be_bytes()));
        assert_eq!(kind, CorruptionKind::InvalidField);
        assert!(msg.contains("File Format Version"), "{msg}");
    }

    #[test]
    fn rejects_unknown_disk_types() {
        for value in [0u32, 1, 5, 6, 0xFFFF_FFFF] {
            let (kind, msg) = rejected(&with_field(OFF_DISK_TYPE, &value.to_be_bytes()));
            assert_eq!(kind, CorruptionKind::InvalidField);
            assert!(msg.contains("Disk Type"), "{msg}");
        }
    }
}

//! The 512-byte hard disk footer (FORMATS.md §8.2): at the end of every VHD, and copied to
//! offset 0 of dynamic and differencing disks. Big-endian throughout.

use super::checksum::vhd_checksum;
use super::format::RawFooter;
use super::geometry::Geometry;
use crate::error::{CorruptionKind, Error, Result};
use core::mem::offset_of;
use zerocopy::{FromZeros, IntoBytes};

pub const FOOTER_SIZE: usize = size_of::<RawFooter>();
/// Virtual PC before 2004 wrote the footer one byte short; the missing byte is reserved.
pub const LEGACY_FOOTER_SIZE: usize = 511;

pub(super) const COOKIE: &[u8; 8] = b"conectix";
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

impl Footer {
    /// Parses and validates a footer; `structure` names where it was found, for errors.
    pub fn parse(bytes: &[u8; FOOTER_SIZE], structure: &str) -> Result<Footer> {
        let raw: &RawFooter = zerocopy::transmute_ref!(bytes);
        if &raw.cookie != COOKIE {
            return Err(Error::corrupt(
                CorruptionKind::BadSignature,
                structure,
                "Cookie field is not \"conectix\"",
            ));
        }
        let stored = raw.checksum.get();
        let computed = vhd_checksum(bytes, offset_of!(RawFooter, checksum));
        if stored != computed {
            return Err(Error::corrupt(
                CorruptionKind::BadChecksum,
                structure,
                format!(
                    "Checksum field holds {stored:#010x}, the contents sum to {computed:#010x}"
                ),
            ));
        }
        let version = raw.version.get();
        if version >> 16 != SUPPORTED_MAJOR_VERSION {
            return Err(Error::corrupt(
                CorruptionKind::InvalidField,
                structure,
                format!("File Format Version {version:#010x} is not 1.x"),
            ));
        }
        let type_field = raw.disk_type.get();
        let disk_type = DiskType::from_field(type_field).ok_or_else(|| {
            Error::corrupt(
                CorruptionKind::InvalidField,
                structure,
                format!("Disk Type {type_field} is not fixed (2), dynamic (3) or differencing (4)"),
            )
        })?;
        Ok(Footer {
            features: raw.features.get(),
            version,
            data_offset: raw.data_offset.get(),
            timestamp: raw.timestamp.get(),
            creator_app: raw.creator_app,
            creator_version: raw.creator_version.get(),
            creator_host_os: raw.creator_host_os,
            original_size: raw.original_size.get(),
            current_size: raw.current_size.get(),
            geometry: Geometry {
                cylinders: raw.cylinders.get(),
                heads: raw.heads,
                sectors_per_track: raw.sectors_per_track,
            },
            disk_type,
            unique_id: raw.unique_id,
            saved_state: raw.saved_state,
        })
    }

    /// The footer's bytes with a fresh checksum; reserved bytes are zero. Used to create
    /// images: the driver rewrites the footer it found, reserved bytes and all.
    pub fn serialize(&self) -> [u8; FOOTER_SIZE] {
        let mut raw = RawFooter {
            cookie: *COOKIE,
            features: self.features.into(),
            version: self.version.into(),
            data_offset: self.data_offset.into(),
            timestamp: self.timestamp.into(),
            creator_app: self.creator_app,
            creator_version: self.creator_version.into(),
            creator_host_os: self.creator_host_os,
            original_size: self.original_size.into(),
            current_size: self.current_size.into(),
            cylinders: self.geometry.cylinders.into(),
            heads: self.geometry.heads,
            sectors_per_track: self.geometry.sectors_per_track,
            disk_type: self.disk_type.field().into(),
            checksum: 0.into(),
            unique_id: self.unique_id,
            saved_state: self.saved_state,
            reserved: FromZeros::new_zeroed(),
        };
        raw.checksum = vhd_checksum(raw.as_bytes(), offset_of!(RawFooter, checksum)).into();
        zerocopy::transmute!(raw)
    }
}

/// The footer `bytes` (a valid one) describing a disk of `size` bytes with `geometry`,
/// checksum renewed; every other byte stays as it was. Original Size changes too: the
/// specification calls it informational (the size at creation), but libvhdi takes the
/// disk's size from it, and would not see past the old end of a grown disk.
pub fn resized(bytes: &[u8; FOOTER_SIZE], size: u64, geometry: Geometry) -> [u8; FOOTER_SIZE] {
    let mut raw: RawFooter = zerocopy::transmute!(*bytes);
    raw.current_size = size.into();
    raw.original_size = size.into();
    raw.cylinders = geometry.cylinders.into();
    raw.heads = geometry.heads;
    raw.sectors_per_track = geometry.sectors_per_track;
    raw.checksum = vhd_checksum(raw.as_bytes(), offset_of!(RawFooter, checksum)).into();
    zerocopy::transmute!(raw)
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
        assert_eq!(
            vhd_checksum(&bytes, offset_of!(RawFooter, checksum)),
            0xFFFF_E747
        );
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
    fn resizing_changes_only_sizes_geometry_and_checksum() {
        let mut bytes = sample().serialize();
        // A reserved byte another tool left set survives.
        bytes[500] = 7;
        let seal = vhd_checksum(&bytes, offset_of!(RawFooter, checksum)).to_be_bytes();
        bytes[64..68].copy_from_slice(&seal);
        let geometry = Geometry::for_size(40 << 20);
        let resized = resized(&bytes, 40 << 20, geometry);
        let footer = Footer::parse(&resized, "VHD footer").unwrap();
        assert_eq!(
            footer,
            Footer {
                current_size: 40 << 20,
                original_size: 40 << 20,
                geometry,
                ..sample()
            }
        );
        assert_eq!(resized[500], 7);
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
        super::super::checksum::set_field_keeping_checksum(
            &mut b,
            at,
            value,
            offset_of!(RawFooter, checksum),
        );
        b
    }

    #[test]
    fn rejects_a_bad_cookie() {
        let (kind, msg) = rejected(&with_field(offset_of!(RawFooter, cookie), b"conectiX"));
        assert_eq!(kind, CorruptionKind::BadSignature);
        assert!(msg.starts_with("VHD footer: Cookie"), "{msg}");
    }

    #[test]
    fn rejects_a_bad_checksum() {
        for at in [
            offset_of!(RawFooter, current_size),
            offset_of!(RawFooter, checksum),
            511,
        ] {
            let mut b = sample().serialize();
            b[at] ^= 1;
            let (kind, msg) = rejected(&b);
            assert_eq!(kind, CorruptionKind::BadChecksum);
            assert!(msg.starts_with("VHD footer: Checksum field"), "{msg}");
        }
    }

    #[test]
    fn rejects_an_unknown_version() {
        let (kind, msg) = rejected(&with_field(
            offset_of!(RawFooter, version),
            &0x0002_0000u32.to_be_bytes(),
        ));
        assert_eq!(kind, CorruptionKind::InvalidField);
        assert!(msg.contains("File Format Version"), "{msg}");
    }

    #[test]
    fn rejects_unknown_disk_types() {
        for value in [0u32, 1, 5, 6, 0xFFFF_FFFF] {
            let (kind, msg) = rejected(&with_field(
                offset_of!(RawFooter, disk_type),
                &value.to_be_bytes(),
            ));
            assert_eq!(kind, CorruptionKind::InvalidField);
            assert!(msg.contains("Disk Type"), "{msg}");
        }
    }
}

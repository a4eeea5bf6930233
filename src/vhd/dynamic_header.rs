//! The 1024-byte dynamic disk header (FORMATS.md §8.5), found at the footer's Data Offset
//! in dynamic and differencing disks. Big-endian throughout.

use super::checksum::vhd_checksum;
pub(super) use super::format::PARENT_LOCATORS_LEN;
use super::format::{PARENT_NAME_LEN, RawDynamicHeader};
use super::parent_locator::{ENTRY_SIZE, ParentLocator, Platform, encode_utf16le};
use crate::error::{CorruptionKind, Error, Result};
use core::mem::offset_of;
use zerocopy::{FromZeros, IntoBytes};

pub const HEADER_SIZE: usize = size_of::<RawDynamicHeader>();

pub(super) const COOKIE: &[u8; 8] = b"cxsparse";
const SUPPORTED_MAJOR_VERSION: u32 = 1;
const MIN_BLOCK_SIZE: u32 = 512;
const SECTOR: u64 = 512;
/// Largest disk the format allows: 0xFF000000 sectors (2040 GiB).
pub const MAX_DISK_SIZE: u64 = 0xFF00_0000 * 512;
/// Bytes of the header that hold every field a resize changes, checksum included.
pub const TABLE_FIELDS_LEN: usize = 512;
const _: () = assert!(offset_of!(RawDynamicHeader, checksum) + 4 <= TABLE_FIELDS_LEN);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    pub data_offset: u64,
    pub table_offset: u64,
    pub version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_unique_id: [u8; 16],
    pub parent_timestamp: u32,
    pub parent_name: [u8; PARENT_NAME_LEN],
    /// Kept as stored: only differencing disks use them.
    pub parent_locators: [u8; PARENT_LOCATORS_LEN],
}

const STRUCTURE: &str = "VHD dynamic header";

/// A parent locator's data and the file offset it goes to.
pub type LocatorData = (u64, Vec<u8>);

fn invalid(problem: String) -> Error {
    Error::corrupt(CorruptionKind::InvalidField, STRUCTURE, problem)
}

impl DynamicHeader {
    pub fn parse(bytes: &[u8; HEADER_SIZE]) -> Result<DynamicHeader> {
        let raw: &RawDynamicHeader = zerocopy::transmute_ref!(bytes);
        if &raw.cookie != COOKIE {
            return Err(Error::corrupt(
                CorruptionKind::BadSignature,
                STRUCTURE,
                "Cookie field is not \"cxsparse\"",
            ));
        }
        let stored = raw.checksum.get();
        let computed = vhd_checksum(bytes, offset_of!(RawDynamicHeader, checksum));
        if stored != computed {
            return Err(Error::corrupt(
                CorruptionKind::BadChecksum,
                STRUCTURE,
                format!(
                    "Checksum field holds {stored:#010x}, the contents sum to {computed:#010x}"
                ),
            ));
        }
        let version = raw.version.get();
        if version >> 16 != SUPPORTED_MAJOR_VERSION {
            return Err(invalid(format!(
                "Header Version {version:#010x} is not 1.x"
            )));
        }
        let block_size = raw.block_size.get();
        if !block_size.is_power_of_two() || block_size < MIN_BLOCK_SIZE {
            return Err(invalid(format!(
                "Block Size {block_size} is not a power of two of at least {MIN_BLOCK_SIZE}"
            )));
        }
        let max_table_entries = raw.max_table_entries.get();
        // Tables a little longer than the disk needs are normal (older creators added an
        // entry; shrunk disks keep theirs), but none may describe more than the format's
        // largest disk.
        let most_entries = MAX_DISK_SIZE.div_ceil(u64::from(block_size)) + 1;
        if u64::from(max_table_entries) > most_entries {
            return Err(invalid(format!(
                "Max Table Entries {max_table_entries} exceeds {most_entries}, the most a \
                 {block_size}-byte block size needs for the largest VHD"
            )));
        }
        Ok(DynamicHeader {
            data_offset: raw.data_offset.get(),
            table_offset: raw.table_offset.get(),
            version,
            max_table_entries,
            block_size,
            parent_unique_id: raw.parent_unique_id,
            parent_timestamp: raw.parent_timestamp.get(),
            parent_name: raw.parent_name,
            parent_locators: raw.parent_locators,
        })
    }

    /// The header's bytes with a fresh checksum; reserved bytes are zero. Used to create
    /// images: the driver never rewrites a header.
    pub fn serialize(&self) -> [u8; HEADER_SIZE] {
        let mut raw = RawDynamicHeader {
            cookie: *COOKIE,
            data_offset: self.data_offset.into(),
            table_offset: self.table_offset.into(),
            version: self.version.into(),
            max_table_entries: self.max_table_entries.into(),
            block_size: self.block_size.into(),
            checksum: 0.into(),
            parent_unique_id: self.parent_unique_id,
            parent_timestamp: self.parent_timestamp.into(),
            reserved1: FromZeros::new_zeroed(),
            parent_name: self.parent_name,
            parent_locators: self.parent_locators,
            reserved2: FromZeros::new_zeroed(),
        };
        raw.checksum = vhd_checksum(raw.as_bytes(), offset_of!(RawDynamicHeader, checksum)).into();
        zerocopy::transmute!(raw)
    }

    /// The header `bytes` (a valid one) with the BAT at `table_offset` holding
    /// `max_table_entries` entries, checksum renewed; every other byte stays. Both fields
    /// and the checksum lie in the first sector, so writing that sector alone replaces the
    /// header in one atomic step.
    pub fn with_table(
        bytes: &[u8; HEADER_SIZE],
        table_offset: u64,
        max_table_entries: u32,
    ) -> [u8; HEADER_SIZE] {
        let mut raw: RawDynamicHeader = zerocopy::transmute!(*bytes);
        raw.table_offset = table_offset.into();
        raw.max_table_entries = max_table_entries.into();
        raw.checksum = vhd_checksum(raw.as_bytes(), offset_of!(RawDynamicHeader, checksum)).into();
        zerocopy::transmute!(raw)
    }

    /// Names the parent as a new child records it: the Parent Unicode Name `name`, and
    /// the paths `relative` (W2ru) and `absolute` (W2ku) in the first two locators, each
    /// with its data (UTF-16LE, in whole sectors) laid out from file offset `at`. Returns
    /// where each piece of data goes, and where they end.
    pub fn name_parent(
        &mut self,
        name: &str,
        relative: &str,
        absolute: &str,
        at: u64,
    ) -> Result<(Vec<LocatorData>, u64)> {
        let invalid = |problem: String| Error::invalid_input(problem);
        let encoded: Vec<u8> = name.encode_utf16().flat_map(u16::to_be_bytes).collect();
        if encoded.len() > PARENT_NAME_LEN {
            return Err(invalid(format!(
                "the parent's file name '{name}' is longer than the 256 UTF-16 units a VHD can \
                 record"
            )));
        }
        self.parent_name = [0; PARENT_NAME_LEN];
        self.parent_name[..encoded.len()].copy_from_slice(&encoded);
        self.parent_locators = [0; PARENT_LOCATORS_LEN];
        let mut end = at;
        let mut data = Vec::new();
        for (slot, (platform, text)) in [(Platform::W2ru, relative), (Platform::W2ku, absolute)]
            .into_iter()
            .enumerate()
        {
            let bytes = encode_utf16le(text);
            let space = (bytes.len() as u64).max(1).next_multiple_of(SECTOR);
            let too_long = || invalid(format!("parent path '{text}' is too long"));
            let locator = ParentLocator {
                platform,
                data_space: u32::try_from(space).map_err(|_| too_long())?,
                data_length: bytes.len() as u32,
                data_offset: end,
            };
            locator
                .data_range(slot, end + space)
                .map_err(|_| too_long())?;
            self.parent_locators[slot * ENTRY_SIZE..(slot + 1) * ENTRY_SIZE]
                .copy_from_slice(&locator.serialize());
            data.push((end, bytes));
            end += space;
        }
        Ok((data, end))
    }

    /// The Parent Unicode Name (UTF-16BE, up to the first NUL); undecodable units show as
    /// U+FFFD.
    pub fn parent_name(&self) -> String {
        let units: Vec<u16> = self
            .parent_name
            .chunks_exact(2)
            .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
            .take_while(|&unit| unit != 0)
            .collect();
        String::from_utf16_lossy(&units)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DynamicHeader {
        let mut parent_name = [0u8; PARENT_NAME_LEN];
        for (i, unit) in "parent.vhd".encode_utf16().enumerate() {
            parent_name[2 * i..2 * i + 2].copy_from_slice(&unit.to_be_bytes());
        }
        DynamicHeader {
            data_offset: u64::MAX,
            table_offset: 1536,
            version: 0x0001_0000,
            max_table_entries: 10,
            block_size: 2 << 20,
            parent_unique_id: [3; 16],
            parent_timestamp: 12345,
            parent_name,
            parent_locators: [5; PARENT_LOCATORS_LEN],
        }
    }

    #[test]
    fn round_trip() {
        let header = sample();
        let bytes = header.serialize();
        assert_eq!(DynamicHeader::parse(&bytes).unwrap(), header);
        assert_eq!(header.parent_name(), "parent.vhd");
    }

    #[test]
    fn a_new_table_changes_the_first_sector_only() {
        let mut bytes = sample().serialize();
        // A reserved byte another tool left set in the second sector counts in the sum.
        bytes[1000] = 9;
        let at = offset_of!(RawDynamicHeader, checksum);
        let seal = vhd_checksum(&bytes, at).to_be_bytes();
        bytes[at..at + 4].copy_from_slice(&seal);
        let moved = DynamicHeader::with_table(&bytes, 1 << 20, 700);
        assert_eq!(moved[TABLE_FIELDS_LEN..], bytes[TABLE_FIELDS_LEN..]);
        let header = DynamicHeader::parse(&moved).unwrap();
        assert_eq!(
            header,
            DynamicHeader {
                table_offset: 1 << 20,
                max_table_entries: 700,
                ..sample()
            }
        );
    }

    #[test]
    fn checksum_matches_a_header_written_by_qemu() {
        // Dynamic header written by `qemu-img convert -O vpc` for a disk of three 2 MiB blocks.
        let header = DynamicHeader {
            data_offset: u64::MAX,
            table_offset: 1536,
            version: 0x0001_0000,
            max_table_entries: 3,
            block_size: 2 << 20,
            parent_unique_id: [0; 16],
            parent_timestamp: 0,
            parent_name: [0; PARENT_NAME_LEN],
            parent_locators: [0; PARENT_LOCATORS_LEN],
        };
        let bytes = header.serialize();
        let raw: &RawDynamicHeader = zerocopy::transmute_ref!(&bytes);
        assert_eq!(raw.checksum.get(), 0xFFFF_F474);
    }

    fn rejected(bytes: &[u8; HEADER_SIZE]) -> (CorruptionKind, String) {
        let err = DynamicHeader::parse(bytes).unwrap_err();
        (err.corruption_kind().unwrap(), err.to_string())
    }

    /// Sets a field and repairs the checksum, so only the field itself is wrong.
    fn with_field(at: usize, value: &[u8]) -> [u8; HEADER_SIZE] {
        let mut b = sample().serialize();
        super::super::checksum::set_field_keeping_checksum(
            &mut b,
            at,
            value,
            offset_of!(RawDynamicHeader, checksum),
        );
        b
    }

    #[test]
    fn rejects_a_bad_cookie() {
        let (kind, msg) = rejected(&with_field(
            offset_of!(RawDynamicHeader, cookie),
            b"cxsparsE",
        ));
        assert_eq!(kind, CorruptionKind::BadSignature);
        assert!(msg.starts_with("VHD dynamic header: Cookie"), "{msg}");
    }

    #[test]
    fn rejects_a_bad_checksum() {
        for at in [
            offset_of!(RawDynamicHeader, table_offset),
            offset_of!(RawDynamicHeader, checksum) + 3,
            HEADER_SIZE - 1,
        ] {
            let mut b = sample().serialize();
            b[at] ^= 0x80;
            let (kind, msg) = rejected(&b);
            assert_eq!(kind, CorruptionKind::BadChecksum);
            assert!(
                msg.starts_with("VHD dynamic header: Checksum field"),
                "{msg}"
            );
        }
    }

    #[test]
    fn rejects_an_unknown_version() {
        let (kind, msg) = rejected(&with_field(
            offset_of!(RawDynamicHeader, version),
            &0x0002_0000u32.to_be_bytes(),
        ));
        assert_eq!(kind, CorruptionKind::InvalidField);
        assert!(msg.contains("Header Version"), "{msg}");
    }

    #[test]
    fn rejects_bad_block_sizes() {
        for size in [0u32, 256, 511, 513, 3 << 20, 0xFFFF_FFFF] {
            let (kind, msg) = rejected(&with_field(
                offset_of!(RawDynamicHeader, block_size),
                &size.to_be_bytes(),
            ));
            assert_eq!(kind, CorruptionKind::InvalidField);
            assert!(msg.contains("Block Size"), "{msg}");
        }
        for size in [512u32, 4096, 2 << 20, 1 << 31] {
            let bytes = with_field(
                offset_of!(RawDynamicHeader, block_size),
                &size.to_be_bytes(),
            );
            assert_eq!(DynamicHeader::parse(&bytes).unwrap().block_size, size);
        }
    }

    #[test]
    fn rejects_huge_tables() {
        // 2 MiB blocks: 1020 * 1024 entries cover the largest disk, one spare is tolerated.
        let most = 1020 * 1024 + 1u32;
        let ok = with_field(
            offset_of!(RawDynamicHeader, max_table_entries),
            &most.to_be_bytes(),
        );
        assert_eq!(DynamicHeader::parse(&ok).unwrap().max_table_entries, most);
        for entries in [most + 1, u32::MAX] {
            let (kind, msg) = rejected(&with_field(
                offset_of!(RawDynamicHeader, max_table_entries),
                &entries.to_be_bytes(),
            ));
            assert_eq!(kind, CorruptionKind::InvalidField);
            assert!(msg.contains("Max Table Entries"), "{msg}");
        }
    }

    #[test]
    fn parent_name_stops_at_nul_and_survives_bad_utf16() {
        let mut header = sample();
        header.parent_name = [0; PARENT_NAME_LEN];
        header.parent_name[..6].copy_from_slice(&[0x00, 0x61, 0xD8, 0x00, 0x00, 0x62]);
        assert_eq!(header.parent_name(), "a\u{FFFD}b");
    }
}

//! The VHDX structures as they lie on disk (MS-VHDX §2): little-endian fields in packed
//! layouts, read and written whole. Meaning (validation, checksums) lives with each
//! structure's own module.

use uuid::Uuid;
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// A GUID in the Microsoft mixed-endian layout (first three fields little-endian), which
/// `Uuid` itself does not use.
#[repr(transparent)]
#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct Guid([u8; 16]);

impl Guid {
    pub fn get(self) -> Uuid {
        Uuid::from_bytes_le(self.0)
    }
}

impl From<Uuid> for Guid {
    fn from(uuid: Uuid) -> Guid {
        Guid(uuid.to_bytes_le())
    }
}

/// One of the two headers (§2.2.2).
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawHeader {
    pub signature: [u8; 4],
    /// CRC-32C of the whole 4 KiB with this field zeroed.
    pub checksum: U32,
    /// The higher of two valid headers is current.
    pub sequence_number: U64,
    /// Changed once per writable session.
    pub file_write_guid: Guid,
    /// Changed before the first user-visible change.
    pub data_write_guid: Guid,
    /// Zero when the log is empty.
    pub log_guid: Guid,
    pub log_version: U16,
    pub version: U16,
    /// Bytes, a multiple of 1 MiB.
    pub log_length: U32,
    /// File offset, a multiple of 1 MiB.
    pub log_offset: U64,
    pub reserved: [u8; 4016],
}

/// The region table (§2.2.3); its entries fill the 64 KiB but for 16 reserved bytes.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawRegionTable {
    pub signature: [u8; 4],
    /// CRC-32C of the whole 64 KiB with this field zeroed.
    pub checksum: U32,
    pub entry_count: U32,
    pub reserved: [u8; 4],
    pub entries: [RawRegionTableEntry; REGION_TABLE_MAX_ENTRIES],
    pub reserved2: [u8; 16],
}

pub const REGION_TABLE_MAX_ENTRIES: usize = 2047;

#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawRegionTableEntry {
    /// The region's type.
    pub guid: Guid,
    /// A multiple of 1 MiB, at least 1 MiB.
    pub file_offset: U64,
    /// A multiple of 1 MiB.
    pub length: U32,
    /// Bit 0: refuse to open the file if the GUID is unknown.
    pub required: U32,
}

/// The metadata table (§2.6.1); its entries fill the rest of the 64 KiB.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawMetadataTable {
    pub signature: [u8; 8],
    pub reserved: [u8; 2],
    pub entry_count: U16,
    pub reserved2: [u8; 20],
    pub entries: [RawMetadataTableEntry; METADATA_TABLE_MAX_ENTRIES],
}

pub const METADATA_TABLE_MAX_ENTRIES: usize = 2047;

#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawMetadataTableEntry {
    pub item_id: Guid,
    /// From the start of the metadata region, at least 64 KiB (0 if the item is empty).
    pub offset: U32,
    /// At most 1 MiB.
    pub length: U32,
    /// Bit 0 IsUser, bit 1 IsVirtualDisk, bit 2 IsRequired.
    pub flags: U32,
    pub reserved: [u8; 4],
}

/// The File Parameters metadata item (§2.6.2.1).
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawFileParameters {
    pub block_size: U32,
    /// Bit 0 LeaveBlocksAllocated, bit 1 HasParent.
    pub flags: U32,
}

/// A log entry's header (§2.3.1.1), at the start of its first sector; descriptors follow.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawLogEntryHeader {
    pub signature: [u8; 4],
    /// CRC-32C over EntryLength bytes with this field zeroed.
    pub checksum: U32,
    /// A multiple of 4 KiB.
    pub entry_length: U32,
    /// Log offset of the sequence's oldest entry.
    pub tail: U32,
    /// Non-zero, one more for each entry of a sequence.
    pub sequence_number: U64,
    pub descriptor_count: U32,
    pub reserved: [u8; 4],
    /// Must equal the header's LogGuid.
    pub log_guid: Guid,
    /// The durable file size when the entry was written.
    pub flushed_file_offset: U64,
    /// The file size that holds every structure.
    pub last_file_offset: U64,
}

/// A zero descriptor (§2.3.1.2): a range to fill with zeros.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawZeroDescriptor {
    pub signature: [u8; 4],
    pub reserved: [u8; 4],
    /// A multiple of 4 KiB.
    pub zero_length: U64,
    /// A multiple of 4 KiB.
    pub file_offset: U64,
    /// The entry's sequence number.
    pub sequence_number: U64,
}

/// A data descriptor (§2.3.1.3): one page, whose ends it holds itself (see `RawLoggedPage`).
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawDataDescriptor {
    pub signature: [u8; 4],
    pub trailing_bytes: [u8; 4],
    pub leading_bytes: [u8; 8],
    /// A multiple of 4 KiB.
    pub file_offset: U64,
    /// The entry's sequence number.
    pub sequence_number: U64,
}

/// A data sector (§2.3.1.4): the middle of one page, between halves of the sequence number.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawDataSector {
    pub signature: [u8; 4],
    pub sequence_high: U32,
    pub data: [u8; 4084],
    pub sequence_low: U32,
}

/// A logged 4 KiB page as the log splits it between its descriptor and its data sector.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawLoggedPage {
    pub leading_bytes: [u8; 8],
    pub data: [u8; 4084],
    pub trailing_bytes: [u8; 4],
}

const _: () = assert!(size_of::<RawHeader>() == 4096);
const _: () = assert!(size_of::<RawRegionTable>() == 64 * 1024);
const _: () = assert!(size_of::<RawRegionTableEntry>() == 32);
const _: () = assert!(size_of::<RawMetadataTable>() == 64 * 1024);
const _: () = assert!(size_of::<RawMetadataTableEntry>() == 32);
const _: () = assert!(size_of::<RawFileParameters>() == 8);
const _: () = assert!(size_of::<RawLogEntryHeader>() == 64);
const _: () = assert!(size_of::<RawZeroDescriptor>() == 32);
const _: () = assert!(size_of::<RawDataDescriptor>() == 32);
const _: () = assert!(size_of::<RawDataSector>() == 4096);
const _: () = assert!(size_of::<RawLoggedPage>() == 4096);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_use_mixed_endian_layout() {
        let bat = Uuid::from_u128(0x2DC27766_F623_4200_9D64_115E9BFD4A08);
        assert_eq!(
            Guid::from(bat).as_bytes(),
            [
                0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD,
                0x4A, 0x08
            ]
        );
        assert_eq!(Guid::from(bat).get(), bat);
    }
}

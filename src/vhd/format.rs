//! The VHD structures as they lie on disk (FORMATS.md §8): big-endian fields in packed
//! layouts, read and written whole. Meaning (validation, checksums) lives with each
//! structure's own module.

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const PARENT_NAME_LEN: usize = 512;
pub const PARENT_LOCATORS_LEN: usize = 8 * size_of::<RawParentLocator>();

/// The hard disk footer (§8.2).
#[repr(C)]
#[derive(Clone, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawFooter {
    pub cookie: [u8; 8],
    pub features: U32,
    /// Major version in the high 16 bits.
    pub version: U32,
    /// Offset of the dynamic header; all ones for fixed disks.
    pub data_offset: U64,
    /// Seconds since 2000-01-01 UTC.
    pub timestamp: U32,
    pub creator_app: [u8; 4],
    pub creator_version: U32,
    pub creator_host_os: [u8; 4],
    pub original_size: U64,
    pub current_size: U64,
    pub cylinders: U16,
    pub heads: u8,
    pub sectors_per_track: u8,
    pub disk_type: U32,
    pub checksum: U32,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
    pub reserved: [u8; 427],
}

/// The dynamic disk header (§8.5).
#[repr(C)]
#[derive(Clone, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawDynamicHeader {
    pub cookie: [u8; 8],
    /// Unused (all ones).
    pub data_offset: U64,
    /// Absolute offset of the BAT.
    pub table_offset: U64,
    /// Major version in the high 16 bits.
    pub version: U32,
    pub max_table_entries: U32,
    /// Data bytes per block, bitmap excluded.
    pub block_size: U32,
    pub checksum: U32,
    pub parent_unique_id: [u8; 16],
    pub parent_timestamp: U32,
    pub reserved1: [u8; 4],
    /// UTF-16BE, NUL-padded.
    pub parent_name: [u8; PARENT_NAME_LEN],
    /// Eight `RawParentLocator`s, kept as bytes: only differencing disks read them.
    pub parent_locators: [u8; PARENT_LOCATORS_LEN],
    pub reserved2: [u8; 256],
}

/// One parent locator entry (§8.6).
#[repr(C)]
#[derive(Clone, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawParentLocator {
    /// Four ASCII characters; 0 marks an unused entry.
    pub platform_code: U32,
    /// Room reserved for the data (see `ParentLocator::space_bytes`).
    pub data_space: U32,
    pub data_length: U32,
    pub reserved: [u8; 4],
    /// Absolute file offset of the data.
    pub data_offset: U64,
}

const _: () = assert!(size_of::<RawFooter>() == 512);
const _: () = assert!(size_of::<RawDynamicHeader>() == 1024);
const _: () = assert!(size_of::<RawParentLocator>() == 24);

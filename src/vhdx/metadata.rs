//! The metadata region: a 64 KiB table of items, and the disk parameters those items hold
//! (block size, virtual size, sector sizes, disk id).

use super::fields::MIB;
use super::format::{
    Guid, METADATA_TABLE_MAX_ENTRIES, RawFileParameters, RawMetadataTable, RawMetadataTableEntry,
};
use crate::error::{CorruptionKind, Error, Result};
use uuid::Uuid;
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

pub const METADATA_TABLE_LEN: usize = size_of::<RawMetadataTable>();

pub const FILE_PARAMETERS: Uuid = Uuid::from_u128(0xCAA16737_FA36_4D43_B3B6_33F0AA44E76B);
pub const VIRTUAL_DISK_SIZE: Uuid = Uuid::from_u128(0x2FA54224_CD1B_4876_B211_5DBED83BF4B8);
pub const VIRTUAL_DISK_ID: Uuid = Uuid::from_u128(0xBECA12AB_B2E6_4523_93EF_C309E000C746);
pub const LOGICAL_SECTOR_SIZE: Uuid = Uuid::from_u128(0x8141BF1D_A96F_4709_BA47_F233A8FAAB5F);
pub const PHYSICAL_SECTOR_SIZE: Uuid = Uuid::from_u128(0xCDA348C7_445D_4471_9CC9_E9885251C556);
pub const PARENT_LOCATOR: Uuid = Uuid::from_u128(0xA8D35F2D_B30B_454D_ABF7_D3D84834AB0C);

const SIGNATURE: &[u8; 8] = b"metadata";
const MAX_ENTRIES: u16 = METADATA_TABLE_MAX_ENTRIES as u16;
const MAX_ITEM_LEN: u32 = 1024 * 1024;
/// The largest virtual disk the format allows (64 TiB).
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
const FLAG_IS_USER: u32 = 1;
const FLAG_IS_VIRTUAL_DISK: u32 = 2;
const FLAG_IS_REQUIRED: u32 = 4;
const FILE_PARAMETERS_LEAVE_BLOCKS_ALLOCATED: u32 = 1;
const FILE_PARAMETERS_HAS_PARENT: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataItem {
    pub id: Uuid,
    /// Offset from the start of the metadata region.
    pub offset: u32,
    pub length: u32,
    pub is_user: bool,
    pub is_virtual_disk: bool,
    pub is_required: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataTable {
    pub items: Vec<MetadataItem>,
}

impl MetadataTable {
    /// Parses the table at the start of a metadata region of `region_len` bytes.
    pub fn parse(buf: &[u8], region_len: u64) -> Result<Self> {
        let corrupt = |kind, problem: String| Error::corrupt(kind, "metadata table", problem);
        let raw = RawMetadataTable::ref_from_bytes(buf).map_err(|_| {
            corrupt(
                CorruptionKind::Truncated,
                format!("is {} bytes, expected 64 KiB", buf.len()),
            )
        })?;
        if &raw.signature != SIGNATURE {
            return Err(corrupt(
                CorruptionKind::BadSignature,
                "signature is not 'metadata'".into(),
            ));
        }
        let count = raw.entry_count.get();
        if count > MAX_ENTRIES {
            return Err(corrupt(
                CorruptionKind::InvalidField,
                format!("entry count {count} exceeds {MAX_ENTRIES}"),
            ));
        }
        let mut items: Vec<MetadataItem> = Vec::with_capacity(usize::from(count));
        for e in &raw.entries[..usize::from(count)] {
            let flags = e.flags.get();
            let item = MetadataItem {
                id: e.item_id.get(),
                offset: e.offset.get(),
                length: e.length.get(),
                is_user: flags & FLAG_IS_USER != 0,
                is_virtual_disk: flags & FLAG_IS_VIRTUAL_DISK != 0,
                is_required: flags & FLAG_IS_REQUIRED != 0,
            };
            let bad = |kind, problem: String| {
                Error::corrupt(kind, format!("metadata item {}", item.id), problem)
            };
            let end = u64::from(item.offset) + u64::from(item.length);
            if item.length > MAX_ITEM_LEN {
                return Err(bad(
                    CorruptionKind::InvalidField,
                    format!("length {:#x} exceeds 1 MiB", item.length),
                ));
            }
            if item.length == 0 {
                if item.offset != 0 {
                    return Err(bad(
                        CorruptionKind::InvalidField,
                        format!("is empty but has offset {:#x}", item.offset),
                    ));
                }
            } else if (item.offset as usize) < METADATA_TABLE_LEN || end > region_len {
                return Err(bad(
                    CorruptionKind::OutOfBounds,
                    format!(
                        "at {:#x} ({:#x} bytes) lies outside the metadata region's item area",
                        item.offset, item.length
                    ),
                ));
            }
            if items
                .iter()
                .any(|o| o.id == item.id && o.is_user == item.is_user)
            {
                return Err(bad(CorruptionKind::InvalidField, "appears twice".into()));
            }
            if let Some(other) = items.iter().find(|o| {
                o.length != 0
                    && item.length != 0
                    && o.offset < item.offset + item.length
                    && item.offset < o.offset + o.length
            }) {
                return Err(bad(
                    CorruptionKind::OutOfBounds,
                    format!("overlaps item {}", other.id),
                ));
            }
            items.push(item);
        }
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            VIRTUAL_DISK_ID,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
            PARENT_LOCATOR,
        ];
        if let Some(unknown) = items
            .iter()
            .find(|i| i.is_required && (i.is_user || !known.contains(&i.id)))
        {
            return Err(Error::unsupported(format!(
                "metadata table: unknown required item {}",
                unknown.id
            )));
        }
        Ok(MetadataTable { items })
    }

    /// The system (non-user) item with this id.
    pub fn find(&self, id: Uuid) -> Option<&MetadataItem> {
        self.items.iter().find(|i| i.id == id && !i.is_user)
    }

    /// Gives system item `id` room for `len` bytes in a region of `region_len` bytes:
    /// where it is, if no other item starts before it would end, else after the last
    /// item. Returns the offset; the table then says both.
    pub fn resize_item(&mut self, id: Uuid, len: u32, region_len: u64) -> Result<u32> {
        let index = self
            .items
            .iter()
            .position(|i| i.id == id && !i.is_user)
            .ok_or_else(|| {
                Error::corrupt(
                    CorruptionKind::InvalidField,
                    "metadata table",
                    format!("has no item {id}"),
                )
            })?;
        let end = |i: &MetadataItem| u64::from(i.offset) + u64::from(i.length);
        let fits_at = |at: u64| {
            at + u64::from(len) <= region_len
                && self.items.iter().enumerate().all(|(i, other)| {
                    i == index
                        || other.length == 0
                        || at + u64::from(len) <= u64::from(other.offset)
                        || end(other) <= at
                })
        };
        let current = &self.items[index];
        let after_all = self
            .items
            .iter()
            .map(end)
            .fold(METADATA_TABLE_LEN as u64, u64::max);
        let at = [
            (current.length != 0).then_some(u64::from(current.offset)),
            Some(after_all),
        ]
        .into_iter()
        .flatten()
        .find(|&at| fits_at(at))
        .ok_or_else(|| {
            Error::unsupported(format!(
                "metadata region: no room for {len} bytes of item {id}"
            ))
        })?;
        // Below the region's length, itself a u32.
        let at = at as u32;
        self.items[index].offset = at;
        self.items[index].length = len;
        Ok(at)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut raw = RawMetadataTable::new_zeroed();
        raw.signature = *SIGNATURE;
        raw.entry_count = (self.items.len() as u16).into();
        for (slot, item) in raw.entries.iter_mut().zip(&self.items) {
            let flags = [
                (item.is_user, FLAG_IS_USER),
                (item.is_virtual_disk, FLAG_IS_VIRTUAL_DISK),
                (item.is_required, FLAG_IS_REQUIRED),
            ]
            .iter()
            .filter(|(set, _)| *set)
            .fold(0, |acc, (_, bit)| acc | bit);
            *slot = RawMetadataTableEntry {
                item_id: item.id.into(),
                offset: item.offset.into(),
                length: item.length.into(),
                flags: flags.into(),
                reserved: [0; 4],
            };
        }
        raw.as_bytes().to_vec()
    }
}

/// What the required metadata items say about the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskParameters {
    pub block_size: u32,
    pub leave_blocks_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub disk_id: Uuid,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
}

impl DiskParameters {
    /// Reads and validates the required items; `read_item(offset, buf)` fills `buf` with
    /// the bytes at `offset` from the start of the metadata region.
    pub fn read(
        table: &MetadataTable,
        mut read_item: impl FnMut(u32, &mut [u8]) -> Result<()>,
    ) -> Result<Self> {
        let file_parameters: RawFileParameters =
            item(table, &mut read_item, FILE_PARAMETERS, "File Parameters")?;
        let virtual_size: U64 = item(
            table,
            &mut read_item,
            VIRTUAL_DISK_SIZE,
            "Virtual Disk Size",
        )?;
        let disk_id: Guid = item(table, &mut read_item, VIRTUAL_DISK_ID, "Virtual Disk ID")?;
        let logical_sector_size: U32 = item(
            table,
            &mut read_item,
            LOGICAL_SECTOR_SIZE,
            "Logical Sector Size",
        )?;
        let physical_sector_size: U32 = item(
            table,
            &mut read_item,
            PHYSICAL_SECTOR_SIZE,
            "Physical Sector Size",
        )?;
        let flags = file_parameters.flags.get();
        let params = DiskParameters {
            block_size: file_parameters.block_size.get(),
            leave_blocks_allocated: flags & FILE_PARAMETERS_LEAVE_BLOCKS_ALLOCATED != 0,
            has_parent: flags & FILE_PARAMETERS_HAS_PARENT != 0,
            virtual_size: virtual_size.get(),
            disk_id: disk_id.get(),
            logical_sector_size: logical_sector_size.get(),
            physical_sector_size: physical_sector_size.get(),
        };
        params.check()?;
        Ok(params)
    }

    fn check(&self) -> Result<()> {
        let bad = |name: &str, problem: String| {
            Err(Error::corrupt(
                CorruptionKind::InvalidField,
                format!("metadata item {name}"),
                problem,
            ))
        };
        let bs = u64::from(self.block_size);
        if !self.block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&bs) {
            return bad(
                "File Parameters",
                format!(
                    "block size {:#x} is not a power of two from 1 to 256 MiB",
                    self.block_size
                ),
            );
        }
        for (name, size) in [
            ("Logical Sector Size", self.logical_sector_size),
            ("Physical Sector Size", self.physical_sector_size),
        ] {
            if size != 512 && size != 4096 {
                return bad(name, format!("{size} is neither 512 nor 4096"));
            }
        }
        if self.virtual_size == 0
            || self.virtual_size > MAX_VIRTUAL_SIZE
            || !self
                .virtual_size
                .is_multiple_of(u64::from(self.logical_sector_size))
        {
            return bad(
                "Virtual Disk Size",
                format!(
                    "{} is not a non-zero multiple of the {}-byte sector up to 64 TiB",
                    self.virtual_size, self.logical_sector_size
                ),
            );
        }
        Ok(())
    }
}

/// The required system item `id`, at least as long as a `T`, read as one.
fn item<T: FromBytes + IntoBytes>(
    table: &MetadataTable,
    read_item: &mut impl FnMut(u32, &mut [u8]) -> Result<()>,
    id: Uuid,
    name: &str,
) -> Result<T> {
    let entry = table.find(id).ok_or_else(|| {
        Error::corrupt(
            CorruptionKind::InvalidField,
            "metadata table",
            format!("required item {name} is missing"),
        )
    })?;
    let len = size_of::<T>();
    if (entry.length as usize) < len {
        return Err(Error::corrupt(
            CorruptionKind::InvalidField,
            format!("metadata item {name}"),
            format!("is {} bytes, expected {len}", entry.length),
        ));
    }
    let mut value = T::new_zeroed();
    read_item(entry.offset, value.as_mut_bytes())?;
    Ok(value)
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
pub(crate) mod tests {
    use super::*;

    /// A metadata region (`len` bytes) holding the five required items.
    pub(crate) fn region_with(params: &DiskParameters, len: usize) -> Vec<u8> {
        let ids = [
            (FILE_PARAMETERS, 8, false),
            (VIRTUAL_DISK_SIZE, 8, true),
            (VIRTUAL_DISK_ID, 16, true),
            (LOGICAL_SECTOR_SIZE, 4, true),
            (PHYSICAL_SECTOR_SIZE, 4, true),
        ];
        let mut items = Vec::new();
        let mut offset = METADATA_TABLE_LEN as u32;
        for (id, length, is_virtual_disk) in ids {
            items.push(MetadataItem {
                id,
                offset,
                length,
                is_user: false,
                is_virtual_disk,
                is_required: true,
            });
            offset += length;
        }
        let mut region = MetadataTable { items }.to_bytes();
        region.resize(len, 0);
        let base = METADATA_TABLE_LEN;
        let flags = if params.has_parent {
            FILE_PARAMETERS_HAS_PARENT
        } else {
            u32::from(params.leave_blocks_allocated)
        };
        let file_parameters = RawFileParameters {
            block_size: params.block_size.into(),
            flags: flags.into(),
        };
        for (at, value) in [
            (0, file_parameters.as_bytes()),
            (8, U64::new(params.virtual_size).as_bytes()),
            (16, Guid::from(params.disk_id).as_bytes()),
            (32, U32::new(params.logical_sector_size).as_bytes()),
            (36, U32::new(params.physical_sector_size).as_bytes()),
        ] {
            region[base + at..base + at + value.len()].copy_from_slice(value);
        }
        region
    }

    pub(crate) fn params() -> DiskParameters {
        DiskParameters {
            block_size: 2 * MIB as u32,
            leave_blocks_allocated: false,
            has_parent: false,
            virtual_size: 10 * MIB + 512,
            disk_id: Uuid::from_u128(0xabc),
            logical_sector_size: 512,
            physical_sector_size: 4096,
        }
    }

    fn read(region: &[u8]) -> Result<DiskParameters> {
        let table = MetadataTable::parse(&region[..METADATA_TABLE_LEN], region.len() as u64)?;
        DiskParameters::read(&table, |off, buf| {
            buf.copy_from_slice(&region[off as usize..off as usize + buf.len()]);
            Ok(())
        })
    }

    #[test]
    fn round_trips_required_items() {
        let p = params();
        let region = region_with(&p, MIB as usize);
        assert_eq!(read(&region).unwrap(), p);
        let table = MetadataTable::parse(&region[..METADATA_TABLE_LEN], MIB).unwrap();
        assert_eq!(MetadataTable::parse(&table.to_bytes(), MIB).unwrap(), table);
    }

    #[test]
    fn rejects_bad_parameter_values() {
        let cases: [(fn(&mut DiskParameters), &str); 6] = [
            (|p| p.block_size = 3 * MIB as u32, "block size"),
            (|p| p.block_size = 512 * 1024, "block size"),
            (|p| p.block_size = 512 * MIB as u32, "block size"),
            (|p| p.logical_sector_size = 1024, "1024 is neither"),
            (|p| p.virtual_size = 1000, "Virtual Disk Size"),
            (|p| p.virtual_size = (64 << 40) + 512, "Virtual Disk Size"),
        ];
        for (mutate, text) in cases {
            let mut p = params();
            mutate(&mut p);
            let err = read(&region_with(&p, MIB as usize)).unwrap_err();
            assert!(err.to_string().contains(text), "{err} lacks {text}");
        }
        let mut p = params();
        p.logical_sector_size = 4096;
        p.virtual_size = 4096 * 3;
        assert_eq!(read(&region_with(&p, MIB as usize)).unwrap(), p);
    }

    fn table(region: &mut [u8]) -> &mut RawMetadataTable {
        RawMetadataTable::mut_from_prefix(region).unwrap().0
    }

    #[test]
    fn rejects_corrupt_table_entries() {
        let region = region_with(&params(), MIB as usize);
        let cases: [(fn(&mut Vec<u8>), &str); 7] = [
            (|r| r[0] = b'M', "signature"),
            (|r| table(r).entry_count = 2048.into(), "entry count 2048"),
            (
                |r| table(r).entries[0].offset = 100.into(),
                "outside the metadata region",
            ),
            (
                |r| table(r).entries[0].offset = (MIB as u32 - 4).into(),
                "outside the metadata region",
            ),
            (
                |r| table(r).entries[0].length = (2 << 20).into(),
                "exceeds 1 MiB",
            ),
            (
                |r| {
                    let t = table(r);
                    t.entries[1].item_id = t.entries[0].item_id;
                },
                "appears twice",
            ),
            (
                |r| table(r).entry_count = 4.into(),
                "Physical Sector Size is missing",
            ),
        ];
        for (mutate, text) in cases {
            let mut r = region.clone();
            mutate(&mut r);
            let err = read(&r).unwrap_err();
            assert!(err.to_string().contains(text), "{err} lacks {text}");
        }
        let mut r = region.clone();
        table(&mut r).entries[1].offset = (METADATA_TABLE_LEN as u32 + 4).into();
        assert!(read(&r).unwrap_err().to_string().contains("overlaps item"));
        let mut r = region.clone();
        let t = table(&mut r);
        t.entry_count = 6.into();
        t.entries[5].item_id = Uuid::from_u128(42).into();
        t.entries[5].flags = FLAG_IS_REQUIRED.into();
        assert_eq!(
            read(&r).unwrap_err().to_string(),
            "metadata table: unknown required item 00000000-0000-0000-0000-00000000002a"
        );
        table(&mut r).entries[5].flags = 0.into();
        assert!(read(&r).is_ok(), "unknown optional items are ignored");
    }

    #[test]
    fn a_resized_item_stays_where_it_has_room_and_moves_past_the_others_otherwise() {
        let region = region_with(&params(), MIB as usize);
        let mut table = MetadataTable::parse(&region[..METADATA_TABLE_LEN], MIB).unwrap();
        let base = METADATA_TABLE_LEN as u32;
        // Virtual Disk ID (16 bytes at 16) has the Logical Sector Size right after it.
        assert_eq!(
            table.resize_item(VIRTUAL_DISK_ID, 12, MIB).unwrap(),
            base + 16
        );
        assert_eq!(
            table.resize_item(VIRTUAL_DISK_ID, 16, MIB).unwrap(),
            base + 16
        );
        assert_eq!(
            table.resize_item(VIRTUAL_DISK_ID, 17, MIB).unwrap(),
            base + 40
        );
        // The last item grows in place.
        assert_eq!(
            table.resize_item(VIRTUAL_DISK_ID, 100, MIB).unwrap(),
            base + 40
        );
        let item = table.find(VIRTUAL_DISK_ID).unwrap();
        assert_eq!((item.offset, item.length), (base + 40, 100));
        assert_eq!(
            table.resize_item(LOGICAL_SECTOR_SIZE, 20, MIB).unwrap(),
            base + 140
        );
        assert_eq!(MetadataTable::parse(&table.to_bytes(), MIB).unwrap(), table);
        let err = table
            .resize_item(PHYSICAL_SECTOR_SIZE, MIB as u32, MIB)
            .unwrap_err();
        assert!(err.to_string().contains("no room"), "{err}");
        assert!(table.resize_item(PARENT_LOCATOR, 4, MIB).is_err());
    }
}

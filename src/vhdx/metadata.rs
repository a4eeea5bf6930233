//! The metadata region: a 64 KiB table of items, and the disk parameters those items hold
//! (block size, virtual size, sector sizes, disk id).

use super::fields::{MIB, guid_at, put_guid, put_u16, put_u32, u16_at, u32_at, u64_at};
use crate::error::{CorruptionKind, Error, Result};
use uuid::Uuid;

pub const METADATA_TABLE_LEN: usize = 64 * 1024;

pub const FILE_PARAMETERS: Uuid = Uuid::from_u128(0xCAA16737_FA36_4D43_B3B6_33F0AA44E76B);
pub const VIRTUAL_DISK_SIZE: Uuid = Uuid::from_u128(0x2FA54224_CD1B_4876_B211_5DBED83BF4B8);
pub const VIRTUAL_DISK_ID: Uuid = Uuid::from_u128(0xBECA12AB_B2E6_4523_93EF_C309E000C746);
pub const LOGICAL_SECTOR_SIZE: Uuid = Uuid::from_u128(0x8141BF1D_A96F_4709_BA47_F233A8FAAB5F);
pub const PHYSICAL_SECTOR_SIZE: Uuid = Uuid::from_u128(0xCDA348C7_445D_4471_9CC9_E9885251C556);
pub const PARENT_LOCATOR: Uuid = Uuid::from_u128(0xA8D35F2D_B30B_454D_ABF7_D3D84834AB0C);

const SIGNATURE: &[u8; 8] = b"metadata";
const MAX_ENTRIES: u16 = 2047;
const MAX_ITEM_LEN: u32 = 1024 * 1024;
/// The largest virtual disk the format allows (64 TiB).
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
// Offsets inside the table header.
const SIGNATURE_OFF: usize = 0; // 8 bytes "metadata"
const ENTRY_COUNT_OFF: usize = 10; // u16, at most 2047
const ENTRIES_OFF: usize = 32; // first 32-byte entry
const ENTRY_LEN: usize = 32;
// Offsets inside one entry.
const ITEM_ID_OFF: usize = 0; // GUID
const ITEM_OFFSET_OFF: usize = 16; // u32 from region start, at least 64 KiB (0 if empty)
const ITEM_LENGTH_OFF: usize = 20; // u32, at most 1 MiB
const ITEM_FLAGS_OFF: usize = 24; // u32: bit 0 IsUser, bit 1 IsVirtualDisk, bit 2 IsRequired
const FLAG_IS_USER: u32 = 1;
const FLAG_IS_VIRTUAL_DISK: u32 = 2;
const FLAG_IS_REQUIRED: u32 = 4;
// File Parameters item: u32 BlockSize, u32 flags.
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
        if buf.len() != METADATA_TABLE_LEN {
            return Err(corrupt(
                CorruptionKind::Truncated,
                format!("is {} bytes, expected 64 KiB", buf.len()),
            ));
        }
        if &buf[SIGNATURE_OFF..SIGNATURE_OFF + 8] != SIGNATURE {
            return Err(corrupt(
                CorruptionKind::BadSignature,
                "signature is not 'metadata'".into(),
            ));
        }
        let count = u16_at(buf, ENTRY_COUNT_OFF);
        if count > MAX_ENTRIES {
            return Err(corrupt(
                CorruptionKind::InvalidField,
                format!("entry count {count} exceeds {MAX_ENTRIES}"),
            ));
        }
        let mut items: Vec<MetadataItem> = Vec::with_capacity(usize::from(count));
        for i in 0..usize::from(count) {
            let e = &buf[ENTRIES_OFF + i * ENTRY_LEN..ENTRIES_OFF + (i + 1) * ENTRY_LEN];
            let flags = u32_at(e, ITEM_FLAGS_OFF);
            let item = MetadataItem {
                id: guid_at(e, ITEM_ID_OFF),
                offset: u32_at(e, ITEM_OFFSET_OFF),
                length: u32_at(e, ITEM_LENGTH_OFF),
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

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut buf = vec![0u8; METADATA_TABLE_LEN];
        buf[..8].copy_from_slice(SIGNATURE);
        put_u16(&mut buf, ENTRY_COUNT_OFF, self.items.len() as u16);
        for (i, item) in self.items.iter().enumerate() {
            let e = &mut buf[ENTRIES_OFF + i * ENTRY_LEN..ENTRIES_OFF + (i + 1) * ENTRY_LEN];
            put_guid(e, ITEM_ID_OFF, &item.id);
            put_u32(e, ITEM_OFFSET_OFF, item.offset);
            put_u32(e, ITEM_LENGTH_OFF, item.length);
            let flags = [
                (item.is_user, FLAG_IS_USER),
                (item.is_virtual_disk, FLAG_IS_VIRTUAL_DISK),
                (item.is_required, FLAG_IS_REQUIRED),
            ]
            .iter()
            .filter(|(set, _)| *set)
            .fold(0, |acc, (_, bit)| acc | bit);
            put_u32(e, ITEM_FLAGS_OFF, flags);
        }
        buf
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
    /// Reads and validates the required items; `read_item(offset, len)` returns `len`
    /// bytes at `offset` from the start of the metadata region.
    pub fn read(
        table: &MetadataTable,
        mut read_item: impl FnMut(u32, usize) -> Result<Vec<u8>>,
    ) -> Result<Self> {
        let mut item = |id: Uuid, name: &str, len: usize| -> Result<Vec<u8>> {
            let entry = table.find(id).ok_or_else(|| {
                Error::corrupt(
                    CorruptionKind::InvalidField,
                    "metadata table",
                    format!("required item {name} is missing"),
                )
            })?;
            if (entry.length as usize) < len {
                return Err(Error::corrupt(
                    CorruptionKind::InvalidField,
                    format!("metadata item {name}"),
                    format!("is {} bytes, expected {len}", entry.length),
                ));
            }
            read_item(entry.offset, len)
        };
        let file_parameters = item(FILE_PARAMETERS, "File Parameters", 8)?;
        let virtual_size = u64_at(&item(VIRTUAL_DISK_SIZE, "Virtual Disk Size", 8)?, 0);
        let disk_id = guid_at(&item(VIRTUAL_DISK_ID, "Virtual Disk ID", 16)?, 0);
        let logical_sector_size = u32_at(&item(LOGICAL_SECTOR_SIZE, "Logical Sector Size", 4)?, 0);
        let physical_sector_size =
            u32_at(&item(PHYSICAL_SECTOR_SIZE, "Physical Sector Size", 4)?, 0);
        let flags = u32_at(&file_parameters, 4);
        let params = DiskParameters {
            block_size: u32_at(&file_parameters, 0),
            leave_blocks_allocated: flags & FILE_PARAMETERS_LEAVE_BLOCKS_ALLOCATED != 0,
            has_parent: flags & FILE_PARAMETERS_HAS_PARENT != 0,
            virtual_size,
            disk_id,
            logical_sector_size,
            physical_sector_size,
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

#[cfg(test)]
#[allow(clippy::type_complexity)]
pub(crate) mod tests {
    use super::*;
    use crate::vhdx::fields::put_u64;

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
        put_u32(&mut region, base, params.block_size);
        put_u32(&mut region, base + 4, flags);
        put_u64(&mut region, base + 8, params.virtual_size);
        put_guid(&mut region, base + 16, &params.disk_id);
        put_u32(&mut region, base + 32, params.logical_sector_size);
        put_u32(&mut region, base + 36, params.physical_sector_size);
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
        DiskParameters::read(&table, |off, len| {
            Ok(region[off as usize..off as usize + len].to_vec())
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

    #[test]
    fn rejects_corrupt_table_entries() {
        let region = region_with(&params(), MIB as usize);
        let entry = |i: usize| ENTRIES_OFF + i * ENTRY_LEN;
        let cases: [(fn(&mut Vec<u8>), &str); 7] = [
            (|r| r[0] = b'M', "signature"),
            (|r| put_u16(r, ENTRY_COUNT_OFF, 2048), "entry count 2048"),
            (
                |r| put_u32(r, ENTRIES_OFF + ITEM_OFFSET_OFF, 100),
                "outside the metadata region",
            ),
            (
                |r| put_u32(r, ENTRIES_OFF + ITEM_OFFSET_OFF, MIB as u32 - 4),
                "outside the metadata region",
            ),
            (
                |r| put_u32(r, ENTRIES_OFF + ITEM_LENGTH_OFF, 2 << 20),
                "exceeds 1 MiB",
            ),
            (
                |r| r.copy_within(ENTRIES_OFF..ENTRIES_OFF + 16, ENTRIES_OFF + ENTRY_LEN),
                "appears twice",
            ),
            (
                |r| put_u16(r, ENTRY_COUNT_OFF, 4),
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
        put_u32(
            &mut r,
            entry(1) + ITEM_OFFSET_OFF,
            METADATA_TABLE_LEN as u32 + 4,
        );
        assert!(read(&r).unwrap_err().to_string().contains("overlaps item"));
        let mut r = region.clone();
        put_u16(&mut r, ENTRY_COUNT_OFF, 6);
        put_guid(&mut r, entry(5), &Uuid::from_u128(42));
        put_u32(&mut r, entry(5) + ITEM_FLAGS_OFF, FLAG_IS_REQUIRED);
        assert_eq!(
            read(&r).unwrap_err().to_string(),
            "metadata table: unknown required item 00000000-0000-0000-0000-00000000002a"
        );
        put_u32(&mut r, entry(5) + ITEM_FLAGS_OFF, 0);
        assert!(read(&r).is_ok(), "unknown optional items are ignored");
    }
}

//! The GUID partition table (UEFI §5.3): a header at LBA 1 and a backup header, usually
//! at the last LBA, each naming an array of entries and carrying the CRC-32 of itself
//! and of that array. A header is taken only if it passes every check Linux's
//! `is_gpt_valid` makes (entry size aside, see the module above).

use super::{Entry, Found, MAX_ENTRY_ARRAY, NUMBER_LIMIT, Sectors};
#[cfg(any(test, feature = "fuzzing"))]
use crate::disk::VirtualDisk;
use crate::error::Result;
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const SIGNATURE: [u8; 8] = *b"EFI PART";
pub const PRIMARY_LBA: u64 = 1;
/// Entry sizes are multiples of it.
pub const ENTRY_UNIT: u32 = 128;

/// A header as it lies on disk; the rest of its sector is reserved.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawHeader {
    pub signature: [u8; 8],
    pub revision: U32,
    /// Bytes covered by `header_crc`: at least this structure, at most a sector.
    pub header_size: U32,
    /// CRC-32 of the first `header_size` bytes, this field taken as zero.
    pub header_crc: U32,
    pub reserved: U32,
    pub my_lba: U64,
    pub alternate_lba: U64,
    pub first_usable: U64,
    pub last_usable: U64,
    pub disk_guid: [u8; 16],
    pub entries_lba: U64,
    pub entry_count: U32,
    pub entry_size: U32,
    /// CRC-32 of the whole entry array.
    pub entries_crc: U32,
}

/// The first 128 bytes of an entry; longer entries reserve the rest.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawEntry {
    /// All zero for an unused entry.
    pub type_guid: [u8; 16],
    pub unique_guid: [u8; 16],
    pub first_lba: U64,
    /// Inclusive.
    pub last_lba: U64,
    pub attributes: U64,
    pub name: [u8; 72],
}

const CRC_FIELD: std::ops::Range<usize> = 16..20;

/// A check a header or its entry array failed, as a phrase.
type Checked<T> = std::result::Result<T, String>;

/// What the table needs of a header that passed its own checks.
struct Header {
    alternate_lba: u64,
    entries_lba: u64,
    entry_size: u32,
    /// Bytes, at most MAX_ENTRY_ARRAY.
    entries_len: u64,
    entries_crc: u32,
}

/// A valid header's entry array.
struct Table {
    alternate_lba: u64,
    entry_size: u32,
    entries: Vec<u8>,
}

/// Reads the GPT of a disk whose MBR is protective into `found`: the primary when it is
/// valid, else the backup at the last LBA, saying so; false when neither is valid.
pub fn read(sectors: &mut Sectors, found: &mut Found) -> Result<bool> {
    let table = match read_table(sectors, PRIMARY_LBA)? {
        Ok(primary) => {
            let at = primary.alternate_lba;
            if let Err(why) = read_table(sectors, at)? {
                found.notes.push(format!(
                    "backup GPT header at LBA {at} is damaged ({why}); using the primary"
                ));
            }
            primary
        }
        Err(why) => {
            let at = sectors.last();
            match read_table(sectors, at)? {
                Ok(backup) => {
                    found.notes.push(format!(
                        "primary GPT header is damaged ({why}); using the backup at LBA {at}"
                    ));
                    backup
                }
                Err(backup_why) => {
                    found.notes.push(format!(
                        "primary GPT header is damaged ({why}), and so is the backup at LBA \
                         {at} ({backup_why}); no partition is read"
                    ));
                    return Ok(false);
                }
            }
        }
    };
    let entries = table.entries.chunks_exact(table.entry_size as usize);
    for (number, bytes) in (1..).zip(entries) {
        let Ok((raw, _)) = RawEntry::ref_from_prefix(bytes) else {
            continue;
        };
        if raw.type_guid == [0; 16] {
            continue;
        }
        let entry = Entry {
            number,
            first: raw.first_lba.get(),
            last: raw.last_lba.get(),
        };
        if number >= NUMBER_LIMIT {
            let limit = NUMBER_LIMIT - 1;
            found.refused.push((
                number,
                format!("{entry} is past Linux's limit of {limit} partitions"),
            ));
        } else if entry.last < entry.first {
            found
                .refused
                .push((number, format!("{entry} ends before it starts")));
        } else {
            found.entries.push(entry);
        }
    }
    Ok(true)
}

/// The header at `lba` and its entry array, or why they are not valid.
fn read_table(sectors: &mut Sectors, lba: u64) -> Result<Checked<Table>> {
    let Some(sector) = sectors.read(lba, sectors.size)? else {
        return Ok(Err(format!("LBA {lba} lies past the end of the disk")));
    };
    let header = match check_header(&sector, lba, sectors.last()) {
        Ok(header) => header,
        Err(why) => return Ok(Err(why)),
    };
    let Some(entries) = sectors.read(header.entries_lba, header.entries_len)? else {
        return Ok(Err(format!(
            "its entry array at LBA {} ends past the end of the disk",
            header.entries_lba
        )));
    };
    if crc32fast::hash(&entries) != header.entries_crc {
        return Ok(Err("entry array CRC mismatch".to_string()));
    }
    Ok(Ok(Table {
        alternate_lba: header.alternate_lba,
        entry_size: header.entry_size,
        entries,
    }))
}

/// Linux's checks of the header in `sector`, read from `lba` of a disk whose last
/// sector is `last`, and the cap on its entry array.
fn check_header(sector: &[u8], lba: u64, last: u64) -> Checked<Header> {
    let Ok((raw, _)) = RawHeader::ref_from_prefix(sector) else {
        return Err(format!("a {}-byte sector cannot hold one", sector.len()));
    };
    if raw.signature != SIGNATURE {
        return Err("no GPT signature".to_string());
    }
    let header_size = raw.header_size.get() as usize;
    if !(size_of::<RawHeader>()..=sector.len()).contains(&header_size) {
        return Err(format!(
            "header size {header_size} is outside {}-{}",
            size_of::<RawHeader>(),
            sector.len()
        ));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&sector[..CRC_FIELD.start]);
    crc.update(&[0; 4]);
    crc.update(&sector[CRC_FIELD.end..header_size]);
    if crc.finalize() != raw.header_crc.get() {
        return Err("header CRC mismatch".to_string());
    }
    let my_lba = raw.my_lba.get();
    if my_lba != lba {
        return Err(format!("it says it lies at LBA {my_lba}"));
    }
    let (first, last_usable) = (raw.first_usable.get(), raw.last_usable.get());
    if first > last || last_usable > last {
        return Err(format!(
            "its usable sectors {first}-{last_usable} end past the end of the disk (last \
             sector {last})"
        ));
    }
    if last_usable < first {
        return Err(format!(
            "its usable sectors {first}-{last_usable} end before they start"
        ));
    }
    let entry_size = raw.entry_size.get();
    if entry_size == 0 || !entry_size.is_multiple_of(ENTRY_UNIT) {
        return Err(format!(
            "entry size {entry_size} is not a multiple of {ENTRY_UNIT}"
        ));
    }
    let entry_count = raw.entry_count.get();
    if entry_count == 0 {
        return Err("it has no entries".to_string());
    }
    let entries_len = u64::from(entry_count) * u64::from(entry_size);
    if entries_len > MAX_ENTRY_ARRAY {
        return Err(format!(
            "its {entry_count} entries of {entry_size} bytes are more than the \
             {MAX_ENTRY_ARRAY} bytes read"
        ));
    }
    Ok(Header {
        alternate_lba: raw.alternate_lba.get(),
        entries_lba: raw.entries_lba.get(),
        entry_size,
        entries_len,
        entries_crc: raw.entries_crc.get(),
    })
}

/// Rewrites the CRCs of the GPT headers at LBA 1 and the last LBA, and of the entry
/// arrays they name, so that a fuzzer's mutations reach the checks behind them.
#[cfg(any(test, feature = "fuzzing"))]
pub fn seal_checksums(disk: &dyn VirtualDisk) {
    let sector = u64::from(disk.logical_sector_size());
    let count = disk.size().checked_div(sector).unwrap_or(0);
    for lba in [PRIMARY_LBA, count.saturating_sub(1)] {
        let mut bytes = vec![0u8; sector as usize];
        if lba >= count || disk.read_at(&mut bytes, lba * sector).is_err() {
            continue;
        }
        let Ok((header, _)) = RawHeader::mut_from_prefix(&mut bytes) else {
            continue;
        };
        let covered = header.header_size.get() as usize;
        if header.signature != SIGNATURE
            || !(size_of::<RawHeader>()..=sector as usize).contains(&covered)
        {
            continue;
        }
        let len = u64::from(header.entry_count.get()) * u64::from(header.entry_size.get());
        let mut entries = vec![0u8; len.min(MAX_ENTRY_ARRAY) as usize];
        let at = header.entries_lba.get().checked_mul(sector);
        if len <= MAX_ENTRY_ARRAY
            && let Some(at) = at
            && disk.read_at(&mut entries, at).is_ok()
        {
            header.entries_crc = crc32fast::hash(&entries).into();
        }
        header.header_crc = 0.into();
        let crc = crc32fast::hash(&bytes[..covered]);
        bytes[CRC_FIELD].copy_from_slice(&crc.to_le_bytes());
        let _ = disk.write_at(&bytes, lba * sector);
    }
}

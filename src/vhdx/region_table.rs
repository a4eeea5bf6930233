//! The region table (two 64 KiB copies at 192 KiB and 256 KiB): where the BAT and the
//! metadata region live.

use super::fields::{MIB, crc32c_matches, is_mib_aligned, seal_crc32c};
use super::format::{REGION_TABLE_MAX_ENTRIES, RawRegionTable, RawRegionTableEntry};
use crate::error::{CorruptionKind, Error, Result};
use crate::finding::{Finding, Fix, Problems};
use core::mem::offset_of;
use uuid::Uuid;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

pub const REGION_TABLE_LEN: usize = size_of::<RawRegionTable>();
/// File offsets of the two copies.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * 1024, 256 * 1024];

pub const BAT_REGION: Uuid = Uuid::from_u128(0x2DC27766_F623_4200_9D64_115E9BFD4A08);
pub const METADATA_REGION: Uuid = Uuid::from_u128(0x8B7CA206_4790_4B9A_B8FE_575F050F886E);

pub(super) const SIGNATURE: &[u8; 4] = b"regi";
const MAX_ENTRIES: u32 = REGION_TABLE_MAX_ENTRIES as u32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionEntry {
    pub guid: Uuid,
    pub file_offset: u64,
    pub length: u32,
    pub required: bool,
}

impl RegionEntry {
    pub fn end(&self) -> u64 {
        // Cannot overflow: checked by `RegionTable::parse`.
        self.file_offset + u64::from(self.length)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionTable {
    pub entries: Vec<RegionEntry>,
}

impl RegionTable {
    /// Parses one copy; `name` ("region table 1"/"region table 2") goes into the error.
    pub fn parse(buf: &[u8], name: &str) -> Result<Self> {
        let corrupt = |kind, problem: String| Error::corrupt(kind, name, problem);
        let raw = RawRegionTable::ref_from_bytes(buf).map_err(|_| {
            corrupt(
                CorruptionKind::Truncated,
                format!("is {} bytes, expected 64 KiB", buf.len()),
            )
        })?;
        if &raw.signature != SIGNATURE {
            return Err(corrupt(
                CorruptionKind::BadSignature,
                "signature is not 'regi'".into(),
            ));
        }
        if !crc32c_matches(buf, offset_of!(RawRegionTable, checksum)) {
            return Err(corrupt(
                CorruptionKind::BadChecksum,
                "checksum mismatch".into(),
            ));
        }
        let count = raw.entry_count.get();
        if count > MAX_ENTRIES {
            return Err(corrupt(
                CorruptionKind::InvalidField,
                format!("entry count {count} exceeds {MAX_ENTRIES}"),
            ));
        }
        let mut entries: Vec<RegionEntry> = Vec::with_capacity(count as usize);
        for e in &raw.entries[..count as usize] {
            let entry = RegionEntry {
                guid: e.guid.get(),
                file_offset: e.file_offset.get(),
                length: e.length.get(),
                required: e.required.get() & 1 != 0,
            };
            let what = |problem: String| {
                corrupt(
                    CorruptionKind::OutOfBounds,
                    format!("region {}: {problem}", entry.guid),
                )
            };
            if entry.file_offset < MIB || !is_mib_aligned(entry.file_offset) {
                return Err(what(format!(
                    "offset {:#x} is not 1 MiB aligned past the header area",
                    entry.file_offset
                )));
            }
            if entry.length == 0 || !is_mib_aligned(u64::from(entry.length)) {
                return Err(what(format!(
                    "length {:#x} is not a non-zero multiple of 1 MiB",
                    entry.length
                )));
            }
            if entry
                .file_offset
                .checked_add(u64::from(entry.length))
                .is_none()
            {
                return Err(what("ends past the largest file offset".into()));
            }
            if entries.iter().any(|other| other.guid == entry.guid) {
                return Err(corrupt(
                    CorruptionKind::InvalidField,
                    format!("region {} appears twice", entry.guid),
                ));
            }
            if let Some(other) = entries
                .iter()
                .find(|o| o.file_offset < entry.end() && entry.file_offset < o.end())
            {
                return Err(what(format!("overlaps region {}", other.guid)));
            }
            entries.push(entry);
        }
        for entry in &entries {
            if entry.required && entry.guid != BAT_REGION && entry.guid != METADATA_REGION {
                return Err(Error::unsupported(format!(
                    "{name}: unknown required region {}",
                    entry.guid
                )));
            }
        }
        for (guid, region) in [(BAT_REGION, "BAT"), (METADATA_REGION, "metadata")] {
            if !entries.iter().any(|e| e.guid == guid) {
                return Err(corrupt(
                    CorruptionKind::InvalidField,
                    format!("has no {region} region"),
                ));
            }
        }
        Ok(RegionTable { entries })
    }

    /// Parses copy 1, falling back to copy 2 when copy 1 is damaged (which goes to
    /// `problems`). A check also hears of a damaged copy 2, or one that differs from a
    /// sound copy 1 (which readers use).
    pub fn parse_either(copies: [&[u8]; 2], problems: &mut Problems) -> Result<Self> {
        match Self::parse(copies[0], "region table 1") {
            Ok(table) => {
                let second = match Self::parse(copies[1], "region table 2") {
                    Err(e) if e.corruption_kind().is_some() => Some(Finding::from_error(
                        &e,
                        Some(REGION_TABLE_OFFSETS[1]),
                        Fix::RewriteCopy,
                    )),
                    _ if copies[0] != copies[1] => Some(Finding::corruption(
                        CorruptionKind::InvalidField,
                        "region table 2",
                        Some(REGION_TABLE_OFFSETS[1]),
                        "differs from region table 1, which readers use",
                        Fix::RewriteCopy,
                    )),
                    _ => None,
                };
                second.into_iter().for_each(|f| problems.note(f));
                Ok(table)
            }
            Err(first) if first.corruption_kind().is_some() => {
                let table = Self::parse(copies[1], "region table 2").map_err(|second| {
                    Error::corrupt(
                        first.corruption_kind().unwrap(),
                        "region tables",
                        format!("no valid copy ({first}; {second})"),
                    )
                })?;
                problems.tolerate(
                    Finding::from_error(&first, Some(REGION_TABLE_OFFSETS[0]), Fix::RewriteCopy)
                        .adding("; region table 2 is used"),
                );
                Ok(table)
            }
            Err(unsupported) => Err(unsupported),
        }
    }

    pub fn find(&self, guid: Uuid) -> &RegionEntry {
        // Both known regions are guaranteed by `parse`.
        self.entries.iter().find(|e| e.guid == guid).unwrap()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut raw = RawRegionTable::new_zeroed();
        raw.signature = *SIGNATURE;
        raw.entry_count = (self.entries.len() as u32).into();
        for (slot, entry) in raw.entries.iter_mut().zip(&self.entries) {
            *slot = RawRegionTableEntry {
                guid: entry.guid.into(),
                file_offset: entry.file_offset.into(),
                length: entry.length.into(),
                required: u32::from(entry.required).into(),
            };
        }
        let mut buf = raw.as_bytes().to_vec();
        seal_crc32c(&mut buf, offset_of!(RawRegionTable, checksum));
        buf
    }
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;

    fn sample() -> RegionTable {
        RegionTable {
            entries: vec![
                RegionEntry {
                    guid: BAT_REGION,
                    file_offset: 2 * MIB,
                    length: MIB as u32,
                    required: true,
                },
                RegionEntry {
                    guid: METADATA_REGION,
                    file_offset: 3 * MIB,
                    length: MIB as u32,
                    required: true,
                },
                RegionEntry {
                    guid: Uuid::from_u128(77),
                    file_offset: 9 * MIB,
                    length: 2 * MIB as u32,
                    required: false,
                },
            ],
        }
    }

    fn parse(t: &RegionTable) -> Result<RegionTable> {
        RegionTable::parse(&t.to_bytes(), "region table 1")
    }

    #[test]
    fn round_trips_known_and_optional_regions() {
        let t = sample();
        assert_eq!(parse(&t).unwrap(), t);
        assert_eq!(t.find(METADATA_REGION).file_offset, 3 * MIB);
    }

    #[test]
    fn rejects_corrupt_fields() {
        let cases: [(fn(&mut RegionTable), &str); 6] = [
            (|t| t.entries[0].file_offset = 4096, "not 1 MiB aligned"),
            (|t| t.entries[1].file_offset = 0, "not 1 MiB aligned"),
            (|t| t.entries[0].length = 0, "non-zero multiple"),
            (|t| t.entries[1].file_offset = 2 * MIB, "overlaps region"),
            (|t| t.entries[2].guid = BAT_REGION, "appears twice"),
            (|t| t.entries.truncate(1), "has no metadata region"),
        ];
        for (mutate, text) in cases {
            let mut t = sample();
            mutate(&mut t);
            let err = parse(&t).unwrap_err();
            assert!(err.to_string().contains(text), "{err} lacks {text}");
            assert!(err.to_string().starts_with("region table 1: "));
        }
        let mut t = sample();
        t.entries[0].file_offset = !(MIB - 1);
        assert!(
            parse(&t)
                .unwrap_err()
                .to_string()
                .contains("past the largest")
        );
    }

    #[test]
    fn unknown_required_region_is_refused_by_name() {
        let mut t = sample();
        t.entries[2].required = true;
        let err = parse(&t).unwrap_err();
        assert_eq!(
            err.to_string(),
            "region table 1: unknown required region 00000000-0000-0000-0000-00000000004d"
        );
    }

    #[test]
    fn damaged_copy_1_falls_back_to_copy_2() {
        let good = sample().to_bytes();
        let mut bad = good.clone();
        bad[40] ^= 1;
        let err = RegionTable::parse(&bad, "region table 1").unwrap_err();
        assert_eq!(err.to_string(), "region table 1: checksum mismatch");
        let mut found = Vec::new();
        let mut record = Problems::Record(&mut found);
        assert_eq!(
            RegionTable::parse_either([&bad, &good], &mut record).unwrap(),
            sample()
        );
        assert_eq!(
            RegionTable::parse_either([&good, &bad], &mut record).unwrap(),
            sample()
        );
        let mut other = sample();
        other.entries.pop();
        RegionTable::parse_either([&good, &other.to_bytes()], &mut record).unwrap();
        RegionTable::parse_either([&good, &good], &mut record).unwrap();
        assert_eq!(
            found.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "region table 1 at 0x30000: checksum mismatch; region table 2 is used",
                "region table 2 at 0x40000: checksum mismatch",
                "region table 2 at 0x40000: differs from region table 1, which readers use",
            ]
        );
        let mut bad_sig = good.clone();
        bad_sig[0] = b'R';
        let err = RegionTable::parse_either([&bad, &bad_sig], &mut Problems::Refuse).unwrap_err();
        assert!(err.to_string().starts_with("region tables: no valid copy"));
        let mut many = good.clone();
        RawRegionTable::mut_from_bytes(&mut many)
            .unwrap()
            .entry_count = 2048.into();
        seal_crc32c(&mut many, offset_of!(RawRegionTable, checksum));
        assert!(
            RegionTable::parse(&many, "region table 1")
                .unwrap_err()
                .to_string()
                .contains("entry count 2048")
        );
    }
}

//! The parent locator metadata item of a differencing VHDX: which image is the parent
//! (its DataWriteGuid) and the paths it was last seen at, as UTF-16LE key/value pairs.

use super::fields::{guid_at, put_guid, put_u16, put_u32, u16_at, u32_at};
use crate::error::{CorruptionKind, Error, Result};
use crate::layer::{ParentPath, StoredParentPaths};
use crate::windows_path::WindowsPath;
use uuid::Uuid;

/// The only locator type defined: a VHDX parent.
pub const VHDX_LOCATOR_TYPE: Uuid = Uuid::from_u128(0xB04AEFB7_D19E_4A81_B789_25B8E9445913);

// Offsets inside the item header.
const LOCATOR_TYPE_OFF: usize = 0; // GUID
const KEY_VALUE_COUNT_OFF: usize = 18; // u16, after a reserved u16 at 16
const ENTRIES_OFF: usize = 20; // first 12-byte entry
const ENTRY_LEN: usize = 12;
// Offsets inside one entry; string offsets count from the start of the item.
const KEY_OFFSET_OFF: usize = 0; // u32
const VALUE_OFFSET_OFF: usize = 4; // u32
const KEY_LENGTH_OFF: usize = 8; // u16 bytes
const VALUE_LENGTH_OFF: usize = 10; // u16 bytes

pub const PARENT_LINKAGE: &str = "parent_linkage";
/// Accepted as the parent's identity too (used while merging a child into its parent).
pub const PARENT_LINKAGE2: &str = "parent_linkage2";
pub const RELATIVE_PATH: &str = "relative_path";
pub const VOLUME_PATH: &str = "volume_path";
pub const ABSOLUTE_WIN32_PATH: &str = "absolute_win32_path";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLocator {
    /// Key/value pairs in stored order.
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    pub fn parse(item: &[u8]) -> Result<Self> {
        let bad = |kind, problem: String| Error::corrupt(kind, "parent locator", problem);
        if item.len() < ENTRIES_OFF {
            return Err(bad(
                CorruptionKind::Truncated,
                format!("is {} bytes, shorter than its 20-byte header", item.len()),
            ));
        }
        let locator_type = guid_at(item, LOCATOR_TYPE_OFF);
        if locator_type != VHDX_LOCATOR_TYPE {
            return Err(Error::unsupported(format!(
                "parent locator: type {locator_type} is not a VHDX parent"
            )));
        }
        let count = usize::from(u16_at(item, KEY_VALUE_COUNT_OFF));
        if ENTRIES_OFF + count * ENTRY_LEN > item.len() {
            return Err(bad(
                CorruptionKind::OutOfBounds,
                format!("{count} entries do not fit in {} bytes", item.len()),
            ));
        }
        let string = |index: usize, what: &str, offset: u32, len: u16| -> Result<String> {
            let (start, len) = (offset as usize, usize::from(len));
            let end = start.checked_add(len).filter(|&end| end <= item.len());
            match end {
                Some(end) if start > 0 && len > 0 && len % 2 == 0 => {
                    let units: Vec<u16> = item[start..end]
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect();
                    String::from_utf16(&units).map_err(|_| {
                        bad(
                            CorruptionKind::InvalidField,
                            format!("entry {index}: {what} is not UTF-16"),
                        )
                    })
                }
                _ => Err(bad(
                    CorruptionKind::OutOfBounds,
                    format!(
                        "entry {index}: {what} at {offset:#x} ({len} bytes) lies outside the item"
                    ),
                )),
            }
        };
        let mut entries: Vec<(String, String)> = Vec::with_capacity(count);
        for i in 0..count {
            let e = &item[ENTRIES_OFF + i * ENTRY_LEN..ENTRIES_OFF + (i + 1) * ENTRY_LEN];
            let key = string(
                i,
                "key",
                u32_at(e, KEY_OFFSET_OFF),
                u16_at(e, KEY_LENGTH_OFF),
            )?;
            let value = string(
                i,
                "value",
                u32_at(e, VALUE_OFFSET_OFF),
                u16_at(e, VALUE_LENGTH_OFF),
            )?;
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(bad(
                    CorruptionKind::InvalidField,
                    format!("key {key} appears twice"),
                ));
            }
            entries.push((key, value));
        }
        Ok(ParentLocator { entries })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut buf = vec![0u8; ENTRIES_OFF + self.entries.len() * ENTRY_LEN];
        put_guid(&mut buf, LOCATOR_TYPE_OFF, &VHDX_LOCATOR_TYPE);
        put_u16(&mut buf, KEY_VALUE_COUNT_OFF, self.entries.len() as u16);
        let append = |buf: &mut Vec<u8>, text: &str| -> (u32, u16) {
            let offset = buf.len() as u32;
            buf.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
            (offset, (buf.len() as u32 - offset) as u16)
        };
        for (i, (key, value)) in self.entries.iter().enumerate() {
            let (key_offset, key_len) = append(&mut buf, key);
            let (value_offset, value_len) = append(&mut buf, value);
            let e = ENTRIES_OFF + i * ENTRY_LEN;
            put_u32(&mut buf, e + KEY_OFFSET_OFF, key_offset);
            put_u32(&mut buf, e + VALUE_OFFSET_OFF, value_offset);
            put_u16(&mut buf, e + KEY_LENGTH_OFF, key_len);
            put_u16(&mut buf, e + VALUE_LENGTH_OFF, value_len);
        }
        buf
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The DataWriteGuids a parent may carry: `parent_linkage`, then `parent_linkage2`.
    pub fn linkages(&self) -> Result<Vec<Uuid>> {
        let mut found = Vec::new();
        for key in [PARENT_LINKAGE, PARENT_LINKAGE2] {
            if let Some(text) = self.get(key) {
                let guid = Uuid::parse_str(text.trim()).map_err(|_| {
                    Error::corrupt(
                        CorruptionKind::InvalidField,
                        "parent locator",
                        format!("{key} '{text}' is not a GUID"),
                    )
                })?;
                found.push(guid);
            }
        }
        if self.get(PARENT_LINKAGE).is_none() {
            return Err(Error::corrupt(
                CorruptionKind::InvalidField,
                "parent locator",
                "has no parent_linkage",
            ));
        }
        Ok(found)
    }

    /// This locator naming the parent by `linkages`: the first as `parent_linkage`, a
    /// second as `parent_linkage2`, which goes when there is none. Braced, and upper case
    /// if the stored `parent_linkage` was.
    pub fn relinked(&self, linkages: &[Uuid]) -> ParentLocator {
        let upper = self
            .get(PARENT_LINKAGE)
            .is_some_and(|v| v.chars().any(|c| c.is_ascii_uppercase()));
        let text = |id: &Uuid| {
            let braced = format!("{{{}}}", id.hyphenated());
            if upper { braced.to_uppercase() } else { braced }
        };
        let mut entries: Vec<(String, String)> = self
            .entries
            .iter()
            .filter(|(key, _)| key != PARENT_LINKAGE && key != PARENT_LINKAGE2)
            .cloned()
            .collect();
        let named = [PARENT_LINKAGE, PARENT_LINKAGE2]
            .iter()
            .zip(linkages)
            .map(|(key, id)| (key.to_string(), text(id)));
        entries.splice(0..0, named);
        ParentLocator { entries }
    }

    /// This locator naming the parent at `paths` instead: the relative path from the
    /// child's directory (what Hyper-V and this library try first), and the volume and
    /// absolute Windows paths `paths` knows. Stored Windows paths stay unless replaced
    /// (this host cannot tell whether they still lead to the parent); an absolute path
    /// holding a host path, as earlier versions wrote, goes. Every other entry stays.
    pub fn with_paths(&self, paths: &StoredParentPaths) -> ParentLocator {
        let mut entries: Vec<(String, String)> = self
            .entries
            .iter()
            .filter(|(key, value)| match key.as_str() {
                RELATIVE_PATH => false,
                VOLUME_PATH => paths.volume.is_none(),
                ABSOLUTE_WIN32_PATH => paths.windows.is_none() && WindowsPath::parse(value).is_ok(),
                _ => true,
            })
            .cloned()
            .collect();
        entries.push((RELATIVE_PATH.to_string(), paths.relative.clone()));
        if let Some(volume) = &paths.volume {
            entries.push((VOLUME_PATH.to_string(), volume.clone()));
        }
        if let Some(windows) = &paths.windows {
            entries.push((ABSOLUTE_WIN32_PATH.to_string(), windows.extended()));
        }
        ParentLocator { entries }
    }

    /// The stored paths in the order the specification tries them.
    pub fn paths(&self) -> Vec<ParentPath> {
        [
            (
                RELATIVE_PATH,
                ParentPath::Relative as fn(String) -> ParentPath,
            ),
            (VOLUME_PATH, ParentPath::Absolute),
            (ABSOLUTE_WIN32_PATH, ParentPath::Absolute),
        ]
        .into_iter()
        .filter_map(|(key, kind)| self.get(key).map(|v| kind(v.to_string())))
        .collect()
    }
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;

    fn locator() -> ParentLocator {
        ParentLocator {
            entries: vec![
                (
                    PARENT_LINKAGE.into(),
                    "{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}".into(),
                ),
                (ABSOLUTE_WIN32_PATH.into(), "\\\\?\\d:\\p\\base.vhdx".into()),
                (RELATIVE_PATH.into(), "..\\p\\base.vhdx".into()),
                (
                    VOLUME_PATH.into(),
                    "\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\p\\base.vhdx".into(),
                ),
            ],
        }
    }

    #[test]
    fn round_trips_and_orders_paths_as_the_specification_tries_them() {
        let l = locator();
        let parsed = ParentLocator::parse(&l.to_bytes()).unwrap();
        assert_eq!(parsed, l);
        assert_eq!(
            parsed.linkages().unwrap(),
            [Uuid::from_u128(0x83ed0ec3_24c8_49a6_a959_5e4bf1288bfb)]
        );
        assert_eq!(
            parsed.paths(),
            [
                ParentPath::Relative("..\\p\\base.vhdx".into()),
                ParentPath::Absolute(
                    "\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\p\\base.vhdx".into()
                ),
                ParentPath::Absolute("\\\\?\\d:\\p\\base.vhdx".into()),
            ]
        );
    }

    #[test]
    fn new_paths_replace_the_relative_one_and_host_paths_but_keep_windows_ones() {
        let paths = StoredParentPaths {
            canonical: "/srv/vm/base.vhdx".into(),
            relative: "..\\vm\\base.vhdx".into(),
            absolute: "\\srv\\vm\\base.vhdx".into(),
            windows: None,
            volume: None,
        };
        let relative = (RELATIVE_PATH.to_string(), "..\\vm\\base.vhdx".to_string());
        let mut expected = locator().entries;
        expected.retain(|(key, _)| key != RELATIVE_PATH);
        expected.push(relative.clone());
        assert_eq!(locator().with_paths(&paths).entries, expected);
        // An absolute path holding a host path, as earlier versions wrote, goes.
        let old = ParentLocator {
            entries: vec![
                locator().entries[0].clone(),
                (
                    ABSOLUTE_WIN32_PATH.into(),
                    "\\?\\srv\\old\\base.vhdx".into(),
                ),
            ],
        };
        assert_eq!(
            old.with_paths(&paths).entries,
            [locator().entries[0].clone(), relative]
        );
    }

    #[test]
    fn uppercase_linkage_and_linkage2_are_accepted() {
        let l = ParentLocator {
            entries: vec![
                (
                    PARENT_LINKAGE.into(),
                    "{83ED0EC3-24C8-49A6-A959-5E4BF1288BFB}".into(),
                ),
                (
                    PARENT_LINKAGE2.into(),
                    "{00000000-0000-0000-0000-000000000007}".into(),
                ),
            ],
        };
        assert_eq!(
            l.linkages().unwrap(),
            [
                Uuid::from_u128(0x83ed0ec3_24c8_49a6_a959_5e4bf1288bfb),
                Uuid::from_u128(7)
            ]
        );
    }

    #[test]
    fn rejects_damaged_items() {
        let good = locator().to_bytes();
        let cases: [(fn(&mut Vec<u8>), &str); 6] = [
            (|b| b.truncate(10), "shorter than its 20-byte header"),
            (|b| b[0] ^= 1, "is not a VHDX parent"),
            (
                |b| put_u16(b, KEY_VALUE_COUNT_OFF, 900),
                "900 entries do not fit",
            ),
            (
                |b| put_u32(b, ENTRIES_OFF + KEY_OFFSET_OFF, 0),
                "entry 0: key at 0x0",
            ),
            (
                |b| put_u16(b, ENTRIES_OFF + ENTRY_LEN + VALUE_LENGTH_OFF, 0xfffe),
                "entry 1: value",
            ),
            (
                |b| {
                    let second = b[ENTRIES_OFF + ENTRY_LEN..ENTRIES_OFF + 2 * ENTRY_LEN].to_vec();
                    b[ENTRIES_OFF..ENTRIES_OFF + ENTRY_LEN].copy_from_slice(&second);
                },
                "appears twice",
            ),
        ];
        for (mutate, text) in cases {
            let mut b = good.clone();
            mutate(&mut b);
            let err = ParentLocator::parse(&b).unwrap_err();
            assert!(err.to_string().contains(text), "{err} lacks {text}");
        }
        let no_linkage = ParentLocator {
            entries: vec![(RELATIVE_PATH.into(), "x.vhdx".into())],
        };
        assert!(
            no_linkage
                .linkages()
                .unwrap_err()
                .to_string()
                .contains("has no parent_linkage")
        );
        let bad_guid = ParentLocator {
            entries: vec![(PARENT_LINKAGE.into(), "{nope}".into())],
        };
        assert!(bad_guid.linkages().is_err());
    }

    #[test]
    fn relinking_names_one_or_two_parents_in_the_stored_letter_case() {
        let (a, b) = (Uuid::from_u128(0xabcdef), Uuid::from_u128(0x12));
        let both = locator().relinked(&[a, b]);
        assert_eq!(both.linkages().unwrap(), [a, b]);
        assert_eq!(
            both.get(PARENT_LINKAGE2),
            Some("{00000000-0000-0000-0000-000000000012}")
        );
        assert_eq!(both.paths(), locator().paths());
        let one = both.relinked(&[b]);
        assert_eq!(one.linkages().unwrap(), [b]);
        assert_eq!(one.get(PARENT_LINKAGE2), None);
        assert_eq!(one.entries.len(), locator().entries.len());
        assert_eq!(ParentLocator::parse(&one.to_bytes()).unwrap(), one);

        let mut upper = locator();
        upper.entries[0].1 = upper.entries[0].1.to_uppercase();
        assert_eq!(
            upper.relinked(&[a]).get(PARENT_LINKAGE),
            Some("{00000000-0000-0000-0000-000000ABCDEF}")
        );
    }
}

//! Parent locator entries of differencing disks (FORMATS.md §8.6): eight 24-byte entries at
//! the end of the dynamic header, each pointing at a data area elsewhere in the file that
//! holds one way to find the parent (a relative or absolute path, by platform).

use super::format::{PARENT_LOCATORS_LEN, RawParentLocator};
use crate::error::{CorruptionKind, Error, Result};
use crate::layer::ParentPath;

pub const ENTRY_SIZE: usize = size_of::<RawParentLocator>();
pub const ENTRY_COUNT: usize = PARENT_LOCATORS_LEN / ENTRY_SIZE;

/// Most locator data read: a Windows path is at most 32767 UTF-16 units.
pub const MAX_DATA_LENGTH: u32 = 65536;
const SECTOR: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// Unused entry.
    None,
    /// Windows relative path, single-byte characters (deprecated).
    Wi2r,
    /// Windows absolute path, single-byte characters (deprecated).
    Wi2k,
    /// Windows relative path, UTF-16LE.
    W2ru,
    /// Windows absolute path, UTF-16LE.
    W2ku,
    /// Mac OS X file URL, UTF-8.
    MacX,
    /// Anything else, such as a classic Mac OS alias: of no use on this host.
    Other(u32),
}

impl Platform {
    pub fn from_code(code: u32) -> Platform {
        match &code.to_be_bytes() {
            [0, 0, 0, 0] => Platform::None,
            b"Wi2r" => Platform::Wi2r,
            b"Wi2k" => Platform::Wi2k,
            b"W2ru" => Platform::W2ru,
            b"W2ku" => Platform::W2ku,
            b"MacX" => Platform::MacX,
            _ => Platform::Other(code),
        }
    }

    pub fn code(self) -> u32 {
        let tag: &[u8; 4] = match self {
            Platform::None => &[0; 4],
            Platform::Wi2r => b"Wi2r",
            Platform::Wi2k => b"Wi2k",
            Platform::W2ru => b"W2ru",
            Platform::W2ku => b"W2ku",
            Platform::MacX => b"MacX",
            Platform::Other(code) => return code,
        };
        u32::from_be_bytes(*tag)
    }

    /// Preference when several entries name the parent: relative paths first, then
    /// absolute ones, Unicode before single-byte. `None` for entries of no use here.
    pub fn rank(self) -> Option<u8> {
        match self {
            Platform::W2ru => Some(0),
            Platform::Wi2r => Some(1),
            Platform::W2ku => Some(2),
            Platform::Wi2k => Some(3),
            Platform::MacX => Some(4),
            Platform::None | Platform::Other(_) => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParentLocator {
    pub platform: Platform,
    pub data_space: u32,
    pub data_length: u32,
    pub data_offset: u64,
}

/// Names an entry in messages: "VHD parent locator 2 (W2ru)".
fn structure(index: usize, platform: Platform) -> String {
    let tag = platform.code().to_be_bytes();
    format!(
        "VHD parent locator {index} ({})",
        String::from_utf8_lossy(&tag).trim_end_matches('\0')
    )
}

impl ParentLocator {
    pub fn parse(bytes: &[u8; ENTRY_SIZE]) -> ParentLocator {
        let raw: &RawParentLocator = zerocopy::transmute_ref!(bytes);
        ParentLocator {
            platform: Platform::from_code(raw.platform_code.get()),
            data_space: raw.data_space.get(),
            data_length: raw.data_length.get(),
            data_offset: raw.data_offset.get(),
        }
    }

    /// All eight entries of a header's locator field.
    pub fn parse_all(bytes: &[u8; PARENT_LOCATORS_LEN]) -> Vec<ParentLocator> {
        let entries: &[[u8; ENTRY_SIZE]; ENTRY_COUNT] = zerocopy::transmute_ref!(bytes);
        entries.iter().map(ParentLocator::parse).collect()
    }

    pub fn serialize(&self) -> [u8; ENTRY_SIZE] {
        zerocopy::transmute!(RawParentLocator {
            platform_code: self.platform.code().into(),
            data_space: self.data_space.into(),
            data_length: self.data_length.into(),
            reserved: [0; 4],
            data_offset: self.data_offset.into(),
        })
    }

    /// Bytes reserved for the data. The specification counts Data Space in sectors, but
    /// Windows writes bytes (always a multiple of 512); a value below 512 can only be
    /// sectors, anything else is taken as bytes.
    pub fn space_bytes(&self) -> u64 {
        let space = u64::from(self.data_space);
        if space < SECTOR {
            space * SECTOR
        } else {
            space
        }
    }

    /// Where the data lies, once checked to fit its space and a file whose data area ends
    /// at `data_end`. `index` numbers the entry in messages.
    pub fn data_range(&self, index: usize, data_end: u64) -> Result<std::ops::Range<u64>> {
        let name = || structure(index, self.platform);
        if self.data_length > MAX_DATA_LENGTH {
            return Err(Error::corrupt(
                CorruptionKind::InvalidField,
                name(),
                format!(
                    "Platform Data Length {} exceeds the {MAX_DATA_LENGTH} bytes any path needs",
                    self.data_length
                ),
            ));
        }
        if u64::from(self.data_length) > self.space_bytes() {
            return Err(Error::corrupt(
                CorruptionKind::OutOfBounds,
                name(),
                format!(
                    "Platform Data Length {} exceeds the Platform Data Space of {} bytes",
                    self.data_length,
                    self.space_bytes()
                ),
            ));
        }
        match self.data_offset.checked_add(u64::from(self.data_length)) {
            Some(end) if self.data_offset >= SECTOR && end <= data_end => Ok(self.data_offset..end),
            _ => Err(Error::corrupt(
                CorruptionKind::OutOfBounds,
                name(),
                format!(
                    "{} bytes of data at Platform Data Offset {:#x} lie outside the file's \
                     data area (up to {data_end:#x})",
                    self.data_length, self.data_offset
                ),
            )),
        }
    }

    /// The parent path in `data`, the entry's data; `None` for entries of no use here or
    /// holding nothing.
    pub fn decode(&self, index: usize, data: &[u8]) -> Result<Option<ParentPath>> {
        let text = match self.platform {
            Platform::W2ru | Platform::W2ku => {
                if !data.len().is_multiple_of(2) {
                    return Err(Error::corrupt(
                        CorruptionKind::InvalidField,
                        structure(index, self.platform),
                        format!(
                            "Platform Data Length {} is odd, but the data is UTF-16",
                            data.len()
                        ),
                    ));
                }
                let units: Vec<u16> = data
                    .chunks_exact(2)
                    .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
                    .take_while(|&unit| unit != 0)
                    .collect();
                String::from_utf16_lossy(&units)
            }
            // Single-byte text of unknown code page: bytes above 0x7F are taken as Latin-1.
            Platform::Wi2r | Platform::Wi2k => data
                .iter()
                .take_while(|&&b| b != 0)
                .map(|&b| char::from(b))
                .collect(),
            Platform::MacX => {
                let text = String::from_utf8_lossy(data);
                let text = text.trim_end_matches('\0');
                let path = ["file://localhost", "file://"]
                    .iter()
                    .find_map(|prefix| text.strip_prefix(prefix))
                    .unwrap_or(text);
                percent_decode(path)
            }
            Platform::None | Platform::Other(_) => return Ok(None),
        };
        if text.is_empty() {
            return Ok(None);
        }
        Ok(Some(match self.platform {
            Platform::W2ru | Platform::Wi2r => ParentPath::Relative(text),
            _ => ParentPath::Absolute(text),
        }))
    }
}

/// Undoes URL escapes (`%20`); malformed escapes stay as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `text` as UTF-16LE, the encoding of W2ru and W2ku data.
pub fn encode_utf16le(text: &str) -> Vec<u8> {
    text.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w2ru(offset: u64, length: u32, space: u32) -> ParentLocator {
        ParentLocator {
            platform: Platform::W2ru,
            data_space: space,
            data_length: length,
            data_offset: offset,
        }
    }

    #[test]
    fn round_trip() {
        let entries = [
            w2ru(0x3000, 0x20, 0x10000),
            ParentLocator {
                platform: Platform::W2ku,
                data_space: 1,
                data_length: 84,
                data_offset: 0x1000,
            },
            ParentLocator {
                platform: Platform::Other(u32::from_be_bytes(*b"Mac ")),
                data_space: 1,
                data_length: 300,
                data_offset: u64::MAX,
            },
        ];
        let mut area = [0u8; ENTRY_SIZE * ENTRY_COUNT];
        for (slot, entry) in area.chunks_exact_mut(ENTRY_SIZE).zip(&entries) {
            slot.copy_from_slice(&entry.serialize());
        }
        let parsed = ParentLocator::parse_all(&area);
        assert_eq!(&parsed[..3], &entries);
        assert!(parsed[3..].iter().all(|e| e.platform == Platform::None));
        // The bytes Windows diskpart wrote for its W2ru entry.
        let windows: [u8; 24] = [
            0x57, 0x32, 0x72, 0x75, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x20, 0, 0, 0, 0, 0,
            0, 0, 0, 0x00, 0x00, 0x30, 0x00,
        ];
        assert_eq!(ParentLocator::parse(&windows), entries[0]);
        assert_eq!(entries[0].serialize(), windows);
    }

    #[test]
    fn data_space_in_sectors_or_bytes() {
        assert_eq!(w2ru(512, 0, 1).space_bytes(), 512);
        assert_eq!(w2ru(512, 0, 511).space_bytes(), 511 * 512);
        assert_eq!(w2ru(512, 0, 512).space_bytes(), 512);
        assert_eq!(w2ru(512, 0, 0x10000).space_bytes(), 0x10000);
    }

    #[test]
    fn decodes_each_platform() {
        let path = ".\\fat-parent.vhd";
        assert_eq!(
            w2ru(0x3000, 32, 0x10000)
                .decode(0, &[encode_utf16le(path), vec![0; 4]].concat())
                .unwrap(),
            Some(ParentPath::Relative(path.into()))
        );
        let absolute = ParentLocator {
            platform: Platform::W2ku,
            ..w2ru(0, 0, 0)
        };
        assert_eq!(
            absolute
                .decode(1, &encode_utf16le("C:\\Dir\\P\u{e9}re.vhd"))
                .unwrap(),
            Some(ParentPath::Absolute("C:\\Dir\\P\u{e9}re.vhd".into()))
        );
        let legacy = ParentLocator {
            platform: Platform::Wi2r,
            ..w2ru(0, 0, 0)
        };
        assert_eq!(
            legacy.decode(2, b".\\p\xe9re.vhd\0\0").unwrap(),
            Some(ParentPath::Relative(".\\p\u{e9}re.vhd".into()))
        );
        let mac = ParentLocator {
            platform: Platform::MacX,
            ..w2ru(0, 0, 0)
        };
        assert_eq!(
            mac.decode(3, b"file://localhost/Users/me/My%20Disk.vhd\0")
                .unwrap(),
            Some(ParentPath::Absolute("/Users/me/My Disk.vhd".into()))
        );
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        assert_eq!(absolute.decode(1, &[0, 0, 0, 0]).unwrap(), None);
    }

    #[test]
    fn unknown_platforms_are_ignored() {
        for code in [*b"Mac ", *b"W2xx", [0xFF; 4]] {
            let entry = ParentLocator {
                platform: Platform::from_code(u32::from_be_bytes(code)),
                ..w2ru(0, 3, 0)
            };
            assert_eq!(entry.platform.rank(), None);
            assert_eq!(entry.decode(0, b"abc").unwrap(), None);
        }
    }

    #[test]
    fn rejects_data_outside_the_file_or_its_space() {
        let data_end = 0x4000;
        assert_eq!(
            w2ru(0x3000, 0x20, 0x10000).data_range(0, data_end).unwrap(),
            0x3000..0x3020
        );
        for (entry, kind, problem) in [
            (
                w2ru(0x3FF0, 0x20, 1),
                CorruptionKind::OutOfBounds,
                "lie outside the file's data area",
            ),
            (
                w2ru(u64::MAX - 4, 0x20, 1),
                CorruptionKind::OutOfBounds,
                "lie outside",
            ),
            (w2ru(0, 0x20, 1), CorruptionKind::OutOfBounds, "lie outside"),
            (
                w2ru(0x1000, 0x400, 1),
                CorruptionKind::OutOfBounds,
                "exceeds the Platform Data Space of 512 bytes",
            ),
            (
                w2ru(0x1000, 0x201, 0x200),
                CorruptionKind::OutOfBounds,
                "exceeds the Platform Data Space",
            ),
            (
                w2ru(0x1000, MAX_DATA_LENGTH + 2, u32::MAX),
                CorruptionKind::InvalidField,
                "exceeds the 65536 bytes",
            ),
        ] {
            let err = entry.data_range(3, data_end).unwrap_err();
            assert_eq!(err.corruption_kind(), Some(kind), "{err}");
            let msg = err.to_string();
            assert!(msg.starts_with("VHD parent locator 3 (W2ru): "), "{msg}");
            assert!(msg.contains(problem), "{msg}");
        }
    }

    #[test]
    fn rejects_odd_utf16_lengths() {
        let err = w2ru(0x1000, 5, 1).decode(4, b"a\0b\0c").unwrap_err();
        assert_eq!(err.corruption_kind(), Some(CorruptionKind::InvalidField));
        assert_eq!(
            err.to_string(),
            "VHD parent locator 4 (W2ru): Platform Data Length 5 is odd, but the data is UTF-16"
        );
    }
}

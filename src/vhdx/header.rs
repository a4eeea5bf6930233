//! The two 4 KiB headers at 64 KiB and 128 KiB: which one is current, and how a new one
//! replaces it.

use super::fields::{
    MIB, crc32c_matches, guid_at, is_mib_aligned, put_guid, put_u16, put_u32, put_u64, seal_crc32c,
    u16_at, u32_at, u64_at,
};
use crate::error::{CorruptionKind, Error, Result};
use uuid::Uuid;

pub const HEADER_LEN: usize = 4096;
/// File offsets of the two header slots.
pub const HEADER_OFFSETS: [u64; 2] = [64 * 1024, 128 * 1024];

pub(super) const SIGNATURE: &[u8; 4] = b"head";
// Offsets inside the header.
const SIGNATURE_OFF: usize = 0; // 4 bytes "head"
pub(super) const CHECKSUM_OFF: usize = 4; // u32 CRC-32C of the 4096 bytes, this field zeroed
const SEQUENCE_OFF: usize = 8; // u64, the higher of two valid headers is current
const FILE_WRITE_GUID_OFF: usize = 16; // GUID, changed once per writable session
const DATA_WRITE_GUID_OFF: usize = 32; // GUID, changed before the first user-visible change
const LOG_GUID_OFF: usize = 48; // GUID, zero = log empty
const LOG_VERSION_OFF: usize = 64; // u16, must be 0
const VERSION_OFF: usize = 66; // u16, must be 1
const LOG_LENGTH_OFF: usize = 68; // u32 bytes, multiple of 1 MiB
const LOG_OFFSET_OFF: usize = 72; // u64 file offset, multiple of 1 MiB

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence_number: u64,
    pub file_write_guid: Uuid,
    pub data_write_guid: Uuid,
    pub log_guid: Uuid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// Parses one slot; `name` ("header 1"/"header 2") goes into the error.
    pub fn parse(buf: &[u8; HEADER_LEN], name: &str) -> Result<Self> {
        if &buf[SIGNATURE_OFF..SIGNATURE_OFF + 4] != SIGNATURE {
            return Err(Error::corrupt(
                CorruptionKind::BadSignature,
                name,
                "signature is not 'head'",
            ));
        }
        if !crc32c_matches(buf, CHECKSUM_OFF) {
            return Err(Error::corrupt(
                CorruptionKind::BadChecksum,
                name,
                "checksum mismatch",
            ));
        }
        Ok(Header {
            sequence_number: u64_at(buf, SEQUENCE_OFF),
            file_write_guid: guid_at(buf, FILE_WRITE_GUID_OFF),
            data_write_guid: guid_at(buf, DATA_WRITE_GUID_OFF),
            log_guid: guid_at(buf, LOG_GUID_OFF),
            log_version: u16_at(buf, LOG_VERSION_OFF),
            version: u16_at(buf, VERSION_OFF),
            log_length: u32_at(buf, LOG_LENGTH_OFF),
            log_offset: u64_at(buf, LOG_OFFSET_OFF),
        })
    }

    /// The 4 KiB on-disk form with its checksum; reserved bytes are zero.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut buf = [0u8; HEADER_LEN];
        buf[SIGNATURE_OFF..SIGNATURE_OFF + 4].copy_from_slice(SIGNATURE);
        put_u64(&mut buf, SEQUENCE_OFF, self.sequence_number);
        put_guid(&mut buf, FILE_WRITE_GUID_OFF, &self.file_write_guid);
        put_guid(&mut buf, DATA_WRITE_GUID_OFF, &self.data_write_guid);
        put_guid(&mut buf, LOG_GUID_OFF, &self.log_guid);
        put_u16(&mut buf, LOG_VERSION_OFF, self.log_version);
        put_u16(&mut buf, VERSION_OFF, self.version);
        put_u32(&mut buf, LOG_LENGTH_OFF, self.log_length);
        put_u64(&mut buf, LOG_OFFSET_OFF, self.log_offset);
        seal_crc32c(&mut buf, CHECKSUM_OFF);
        buf
    }

    /// Whether the log holds entries that must be replayed before anything else is read.
    pub fn log_is_dirty(&self) -> bool {
        !self.log_guid.is_nil()
    }

    /// Checks the fields that are not part of validity but decide whether the file can be
    /// processed, and the log's place in a file of `file_len` bytes.
    pub fn check(&self, file_len: u64) -> Result<()> {
        let fail = |kind, problem: String| Err(Error::corrupt(kind, "header", problem));
        if self.version != 1 {
            return fail(
                CorruptionKind::InvalidField,
                format!("unsupported version {} (expected 1)", self.version),
            );
        }
        if self.log_is_dirty() && self.log_version != 0 {
            return fail(
                CorruptionKind::InvalidField,
                format!("unsupported log version {}", self.log_version),
            );
        }
        let len = u64::from(self.log_length);
        if len == 0 || !is_mib_aligned(len) {
            return fail(
                CorruptionKind::InvalidField,
                format!("log length {len:#x} is not a non-zero multiple of 1 MiB"),
            );
        }
        if self.log_offset < MIB || !is_mib_aligned(self.log_offset) {
            return fail(
                CorruptionKind::OutOfBounds,
                format!(
                    "log offset {:#x} is not 1 MiB aligned past the header area",
                    self.log_offset
                ),
            );
        }
        match self.log_offset.checked_add(len) {
            Some(end) if end <= file_len => Ok(()),
            _ => fail(
                CorruptionKind::OutOfBounds,
                format!(
                    "log at {:#x} ({len:#x} bytes) extends past end of file ({file_len:#x})",
                    self.log_offset
                ),
            ),
        }
    }
}

/// Picks the current header from the two slots; returns it and its slot index (0 or 1).
///
/// The higher sequence number wins; one damaged slot is survivable. Two valid headers with
/// equal sequence numbers are accepted only when byte-identical, as Disk2vhd writes them.
pub fn select_current(slots: [&[u8; HEADER_LEN]; 2]) -> Result<(Header, usize)> {
    let parsed = [
        Header::parse(slots[0], "header 1"),
        Header::parse(slots[1], "header 2"),
    ];
    match parsed {
        [Ok(a), Ok(b)] => {
            if a.sequence_number > b.sequence_number {
                Ok((a, 0))
            } else if b.sequence_number > a.sequence_number {
                Ok((b, 1))
            } else if slots[0] == slots[1] {
                Ok((a, 0))
            } else {
                Err(Error::corrupt(
                    CorruptionKind::InvalidField,
                    "headers",
                    format!("both have sequence number {} but differ", a.sequence_number),
                ))
            }
        }
        [Ok(a), Err(e)] => {
            log::warn!("{e}; using header 1");
            Ok((a, 0))
        }
        [Err(e), Ok(b)] => {
            log::warn!("{e}; using header 2");
            Ok((b, 1))
        }
        [Err(a), Err(b)] => Err(Error::corrupt(
            a.corruption_kind().unwrap_or(CorruptionKind::BadChecksum),
            "headers",
            format!("no valid header ({a}; {b})"),
        )),
    }
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;

    fn sample(seq: u64) -> Header {
        Header {
            sequence_number: seq,
            file_write_guid: Uuid::from_u128(1),
            data_write_guid: Uuid::from_u128(2),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        }
    }

    #[test]
    fn round_trips_every_field() {
        let mut h = sample(9);
        h.log_guid = Uuid::from_u128(0x1234_5678_9abc_def0_1122_3344_5566_7788);
        h.log_offset = 7 * MIB;
        h.log_length = 8 * MIB as u32;
        assert_eq!(Header::parse(&h.to_bytes(), "header 1").unwrap(), h);
    }

    #[test]
    fn rejects_bad_signature_and_checksum() {
        let mut buf = sample(1).to_bytes();
        buf[0] = b'H';
        let err = Header::parse(&buf, "header 2").unwrap_err();
        assert_eq!(err.corruption_kind(), Some(CorruptionKind::BadSignature));
        assert_eq!(err.to_string(), "header 2: signature is not 'head'");

        let mut buf = sample(1).to_bytes();
        buf[100] = 1;
        let err = Header::parse(&buf, "header 1").unwrap_err();
        assert_eq!(err.to_string(), "header 1: checksum mismatch");
    }

    #[test]
    fn higher_sequence_wins_and_one_bad_slot_is_survivable() {
        let (a, b) = (sample(5).to_bytes(), sample(6).to_bytes());
        assert_eq!(select_current([&a, &b]).unwrap().1, 1);
        assert_eq!(select_current([&b, &a]).unwrap().1, 0);
        let mut bad = b;
        bad[20] ^= 0xff;
        let (h, slot) = select_current([&a, &bad]).unwrap();
        assert_eq!((h.sequence_number, slot), (5, 0));
        let mut bad_a = a;
        bad_a[8] ^= 1;
        assert!(select_current([&bad_a, &bad]).is_err());
    }

    #[test]
    fn equal_sequence_numbers_need_identical_headers() {
        let a = sample(3).to_bytes();
        assert_eq!(select_current([&a, &a]).unwrap().0.sequence_number, 3);
        let mut other = sample(3);
        other.data_write_guid = Uuid::from_u128(99);
        let b = other.to_bytes();
        let err = select_current([&a, &b]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "headers: both have sequence number 3 but differ"
        );
    }

    #[test]
    fn check_rejects_each_bad_field() {
        let file_len = 10 * MIB;
        assert!(sample(1).check(file_len).is_ok());
        let cases: [(fn(&mut Header), &str); 6] = [
            (|h| h.version = 2, "unsupported version 2"),
            (
                |h| {
                    h.log_guid = Uuid::from_u128(5);
                    h.log_version = 1
                },
                "unsupported log version 1",
            ),
            (|h| h.log_length = 4096, "log length"),
            (|h| h.log_offset = 4096, "log offset"),
            (|h| h.log_offset = 3 * MIB + 4096, "log offset"),
            (|h| h.log_offset = 10 * MIB, "past end of file"),
        ];
        for (mutate, text) in cases {
            let mut h = sample(1);
            mutate(&mut h);
            let err = h.check(file_len).unwrap_err();
            assert!(err.to_string().contains(text), "{err} lacks {text}");
        }
    }
}

//! The two 4 KiB headers at 64 KiB and 128 KiB: which one is current, and how a new one
//! replaces it.

use super::fields::{MIB, crc32c_matches, is_mib_aligned, seal_crc32c};
use super::format::RawHeader;
use crate::error::{CorruptionKind, Error, Result};
use crate::finding::{Finding, Fix, Problems};
use core::mem::offset_of;
use uuid::Uuid;
use zerocopy::FromZeros;

pub const HEADER_LEN: usize = size_of::<RawHeader>();
/// File offsets of the two header slots.
pub const HEADER_OFFSETS: [u64; 2] = [64 * 1024, 128 * 1024];

pub(super) const SIGNATURE: &[u8; 4] = b"head";

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
        let raw: &RawHeader = zerocopy::transmute_ref!(buf);
        if &raw.signature != SIGNATURE {
            return Err(Error::corrupt(
                CorruptionKind::BadSignature,
                name,
                "signature is not 'head'",
            ));
        }
        if !crc32c_matches(buf, offset_of!(RawHeader, checksum)) {
            return Err(Error::corrupt(
                CorruptionKind::BadChecksum,
                name,
                "checksum mismatch",
            ));
        }
        Ok(Header {
            sequence_number: raw.sequence_number.get(),
            file_write_guid: raw.file_write_guid.get(),
            data_write_guid: raw.data_write_guid.get(),
            log_guid: raw.log_guid.get(),
            log_version: raw.log_version.get(),
            version: raw.version.get(),
            log_length: raw.log_length.get(),
            log_offset: raw.log_offset.get(),
        })
    }

    /// The 4 KiB on-disk form with its checksum; reserved bytes are zero.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut buf: [u8; HEADER_LEN] = zerocopy::transmute!(RawHeader {
            signature: *SIGNATURE,
            checksum: 0.into(),
            sequence_number: self.sequence_number.into(),
            file_write_guid: self.file_write_guid.into(),
            data_write_guid: self.data_write_guid.into(),
            log_guid: self.log_guid.into(),
            log_version: self.log_version.into(),
            version: self.version.into(),
            log_length: self.log_length.into(),
            log_offset: self.log_offset.into(),
            reserved: FromZeros::new_zeroed(),
        });
        seal_crc32c(&mut buf, offset_of!(RawHeader, checksum));
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
/// The higher sequence number wins; one damaged slot is survivable, and goes to
/// `problems`. Two valid headers with equal sequence numbers are accepted only when
/// byte-identical, as Disk2vhd writes them.
pub fn select_current(
    slots: [&[u8; HEADER_LEN]; 2],
    problems: &mut Problems,
) -> Result<(Header, usize)> {
    let damaged = |e: &Error, slot: usize| {
        Finding::from_error(e, Some(HEADER_OFFSETS[slot]), Fix::RewriteCopy)
            .adding(&format!("; header {} is used", 2 - slot))
    };
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
            problems.tolerate(damaged(&e, 1));
            Ok((a, 0))
        }
        [Err(e), Ok(b)] => {
            problems.tolerate(damaged(&e, 0));
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

    fn select(slots: [&[u8; HEADER_LEN]; 2]) -> Result<(Header, usize)> {
        select_current(slots, &mut Problems::Refuse)
    }

    #[test]
    fn higher_sequence_wins_and_one_bad_slot_is_survivable() {
        let (a, b) = (sample(5).to_bytes(), sample(6).to_bytes());
        assert_eq!(select([&a, &b]).unwrap().1, 1);
        assert_eq!(select([&b, &a]).unwrap().1, 0);
        let mut bad = b;
        bad[20] ^= 0xff;
        let mut found = Vec::new();
        let (h, slot) = select_current([&a, &bad], &mut Problems::Record(&mut found)).unwrap();
        assert_eq!((h.sequence_number, slot), (5, 0));
        assert_eq!(
            found.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["header 2 at 0x20000: checksum mismatch; header 1 is used"]
        );
        assert_eq!(found[0].fix, Fix::RewriteCopy);
        let mut bad_a = a;
        bad_a[8] ^= 1;
        assert!(select([&bad_a, &bad]).is_err());
    }

    #[test]
    fn equal_sequence_numbers_need_identical_headers() {
        let a = sample(3).to_bytes();
        assert_eq!(select([&a, &a]).unwrap().0.sequence_number, 3);
        let mut other = sample(3);
        other.data_write_guid = Uuid::from_u128(99);
        let b = other.to_bytes();
        let err = select([&a, &b]).unwrap_err();
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

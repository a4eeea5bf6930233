//! Entry points for the fuzz targets (feature `fuzzing`): the log scan and the structure
//! parsers on their own, and the checksum repair that lets mutated images reach them.

use super::fields::seal_crc32c;
use super::format::{RawHeader, RawLogEntryHeader, RawRegionTable};
use super::header::{self, HEADER_LEN, HEADER_OFFSETS, Header};
use super::log::{self, LOG_SECTOR};
use super::metadata::{DiskParameters, METADATA_TABLE_LEN, MetadataTable};
use super::parent_locator::ParentLocator;
use super::region_table::{self, REGION_TABLE_LEN, REGION_TABLE_OFFSETS, RegionTable};
use crate::finding::Problems;
use crate::storage::Storage;
use core::mem::offset_of;
use uuid::Uuid;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

/// Scans `bytes` as a log ring (its first 16 bytes are the LogGuid to look for) and checks
/// what the scan promises: the entries it returns are consecutive, well inside the ring,
/// and the head's Tail is the first of them.
pub fn scan_log(bytes: &[u8]) {
    let Some((guid, ring)) = bytes.split_first_chunk::<16>() else {
        return;
    };
    let ring = &ring[..ring.len() - ring.len() % LOG_SECTOR];
    if ring.is_empty() {
        return;
    }
    let guid = Uuid::from_bytes_le(*guid);
    let Ok(Some(sequence)) = log::find_active_sequence(ring, guid) else {
        return;
    };
    let head = sequence.head();
    assert_eq!(sequence.entries[0].position, head.tail);
    for pair in sequence.entries.windows(2) {
        assert_eq!(pair[1].sequence, pair[0].sequence + 1);
        assert_eq!(
            pair[1].position,
            (pair[0].position + pair[0].length) % ring.len() as u64
        );
    }
    let _ = log::check_sequence_against_file(&sequence, u64::MAX);
}

/// Runs the header, region table, metadata table and parent locator parsers over `bytes`,
/// each from its own slice.
pub fn parse_structures(bytes: &[u8]) {
    if let Some((header, rest)) = bytes.split_first_chunk::<HEADER_LEN>() {
        if let Ok(header) = Header::parse(header, "header 1") {
            let _ = header.check(u64::MAX);
        }
        if let Some(table) = rest.get(..REGION_TABLE_LEN) {
            let _ = RegionTable::parse_either([table, table], &mut Problems::Refuse);
        }
    }
    let mut table = vec![0u8; METADATA_TABLE_LEN];
    let n = bytes.len().min(METADATA_TABLE_LEN);
    table[..n].copy_from_slice(&bytes[..n]);
    if let Ok(table) = MetadataTable::parse(&table, u64::from(u32::MAX)) {
        let _ = DiskParameters::read(&table, |offset, item| {
            let start = (offset as usize).min(bytes.len());
            let available = &bytes[start..(start + item.len()).min(bytes.len())];
            item[..available.len()].copy_from_slice(available);
            Ok(())
        });
    }
    if let Ok(locator) = ParentLocator::parse(bytes) {
        let _ = locator.linkages();
        let _ = locator.paths();
    }
}

/// Rewrites the checksums of the headers, of the log entries the current header's log
/// holds when it is dirty, and of the region tables, so that mutated fields are checked
/// by what lies beyond.
pub fn seal_checksums(storage: &dyn Storage) {
    let mut headers = [[0u8; HEADER_LEN]; 2];
    for (bytes, at) in headers.iter_mut().zip(HEADER_OFFSETS) {
        if storage.read_at(bytes, at).is_ok() && &bytes[..4] == header::SIGNATURE {
            seal_crc32c(bytes, offset_of!(RawHeader, checksum));
            let _ = storage.write_at(bytes, at);
        }
    }
    if let Ok((current, _)) =
        header::select_current([&headers[0], &headers[1]], &mut Problems::Refuse)
        && current.log_is_dirty()
    {
        seal_log_entries(storage, current.log_offset, current.log_length);
    }
    for at in REGION_TABLE_OFFSETS {
        let mut table = RawRegionTable::new_zeroed();
        if storage.read_at(table.as_mut_bytes(), at).is_ok()
            && &table.signature == region_table::SIGNATURE
        {
            seal_crc32c(table.as_mut_bytes(), offset_of!(RawRegionTable, checksum));
            let _ = storage.write_at(table.as_bytes(), at);
        }
    }
}

/// Seals every sector of the log ring that starts an entry, as far as its length allows.
fn seal_log_entries(storage: &dyn Storage, log_offset: u64, log_length: u32) {
    if !(log_length as usize).is_multiple_of(LOG_SECTOR) {
        return;
    }
    let Ok(mut ring) = log::read_ring(storage, log_offset, log_length) else {
        return;
    };
    let ring_len = ring.len();
    let mut changed = false;
    for start in (0..ring_len).step_by(LOG_SECTOR) {
        let Ok((header, _)) = RawLogEntryHeader::ref_from_prefix(&ring[start..]) else {
            continue;
        };
        if &header.signature != log::ENTRY_SIGNATURE {
            continue;
        }
        let len = header.entry_length.get() as usize;
        if len == 0 || !len.is_multiple_of(LOG_SECTOR) || len > ring_len {
            continue;
        }
        let mut entry: Vec<u8> = (0..len).map(|i| ring[(start + i) % ring_len]).collect();
        seal_crc32c(&mut entry, offset_of!(RawLogEntryHeader, checksum));
        for (i, byte) in entry.into_iter().enumerate() {
            ring[(start + i) % ring_len] = byte;
        }
        changed = true;
    }
    if changed {
        let _ = storage.write_at(&ring, log_offset);
    }
}

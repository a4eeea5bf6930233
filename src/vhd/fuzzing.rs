//! Entry points for the fuzz targets (feature `fuzzing`): the VHD structure parsers on
//! their own, and the checksum repair that lets mutated images reach them.

use super::checksum::vhd_checksum;
use super::dynamic_header::{self, DynamicHeader, HEADER_SIZE};
use super::footer::{self, FOOTER_SIZE, Footer};
use super::parent_locator::ParentLocator;
use crate::storage::Storage;

/// Runs the footer, dynamic header and parent locator parsers over `bytes`: a footer, a
/// dynamic header, then locator data addressed from offset 0 of `bytes`.
pub fn parse_structures(bytes: &[u8]) {
    let Some((footer, rest)) = bytes.split_first_chunk::<FOOTER_SIZE>() else {
        return;
    };
    let _ = Footer::parse(footer, "VHD footer");
    let Some((header, _)) = rest.split_first_chunk::<HEADER_SIZE>() else {
        return;
    };
    let Ok(header) = DynamicHeader::parse(header) else {
        return;
    };
    for (index, locator) in ParentLocator::parse_all(&header.parent_locators)
        .iter()
        .enumerate()
    {
        if let Ok(range) = locator.data_range(index, bytes.len() as u64) {
            let _ = locator.decode(index, &bytes[range.start as usize..range.end as usize]);
        }
    }
}

/// Rewrites the checksums of the footers (trailing and copy at 0) and of the dynamic header
/// the trailing footer points at, so that mutated fields are checked by what lies beyond.
pub fn seal_checksums(storage: &dyn Storage) {
    let Ok(len) = storage.len() else { return };
    let mut dynamic_header_at = None;
    for at in [len.checked_sub(FOOTER_SIZE as u64), Some(0)]
        .into_iter()
        .flatten()
    {
        let mut bytes = [0u8; FOOTER_SIZE];
        if storage.read_at(&mut bytes, at).is_err() || &bytes[..8] != footer::COOKIE {
            continue;
        }
        seal(&mut bytes, footer::OFF_CHECKSUM);
        let _ = storage.write_at(&bytes, at);
        let data_offset = &bytes[footer::OFF_DATA_OFFSET..footer::OFF_DATA_OFFSET + 8];
        dynamic_header_at.get_or_insert(u64::from_be_bytes(data_offset.try_into().unwrap()));
    }
    if let Some(at) = dynamic_header_at {
        let mut header = [0u8; HEADER_SIZE];
        if storage.read_at(&mut header, at).is_ok() && &header[..8] == dynamic_header::COOKIE {
            seal(&mut header, dynamic_header::OFF_CHECKSUM);
            let _ = storage.write_at(&header, at);
        }
    }
}

fn seal(bytes: &mut [u8], field: usize) {
    let sum = vhd_checksum(bytes, field);
    bytes[field..field + 4].copy_from_slice(&sum.to_be_bytes());
}

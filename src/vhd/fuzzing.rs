//! Entry points for the fuzz targets (feature `fuzzing`): the VHD structure parsers on
//! their own, and the checksum repair that lets mutated images reach them.

use super::checksum::vhd_checksum;
use super::dynamic_header::{self, DynamicHeader, HEADER_SIZE};
use super::footer::{self, FOOTER_SIZE, Footer};
use super::format::{RawDynamicHeader, RawFooter};
use super::parent_locator::ParentLocator;
use crate::storage::Storage;
use core::mem::offset_of;
use zerocopy::{FromZeros, IntoBytes};

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
        let mut footer = RawFooter::new_zeroed();
        if storage.read_at(footer.as_mut_bytes(), at).is_err() || &footer.cookie != footer::COOKIE {
            continue;
        }
        footer.checksum = vhd_checksum(footer.as_bytes(), offset_of!(RawFooter, checksum)).into();
        let _ = storage.write_at(footer.as_bytes(), at);
        dynamic_header_at.get_or_insert(footer.data_offset.get());
    }
    if let Some(at) = dynamic_header_at {
        let mut header = RawDynamicHeader::new_zeroed();
        if storage.read_at(header.as_mut_bytes(), at).is_ok()
            && &header.cookie == dynamic_header::COOKIE
        {
            header.checksum =
                vhd_checksum(header.as_bytes(), offset_of!(RawDynamicHeader, checksum)).into();
            let _ = storage.write_at(header.as_bytes(), at);
        }
    }
}

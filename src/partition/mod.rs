//! The partition table of a virtual disk, read as Linux reads it (block/partitions/efi.c
//! and msdos.c), so that partition N here is the kernel's pN of the same disk: an MBR with
//! its logical partitions, or a GPT with its backup.
//!
//! Hand-written rather than taken from the `gpt` (4.1) and `mbrman` (0.6) crates, which
//! fail the rules for image contents: `gpt`'s `partition::file_read_partitions` asserts
//! an entry size of 128 (a header saying 256 panics), allocates the entry array a header
//! claims (`vec![0; num_parts * part_size]`, also in `header::partentry_checksum`), never
//! checks a header's size, own LBA or usable range, and fails the whole disk when the
//! primary's entries are damaged instead of taking the backup; `mbrman`'s
//! `MBR::read_from` adds EBR offsets in unchecked `u32` (a logical partition starting at
//! 2^32 - 1 panics with overflow checks), reads only the first entry of an EBR as data,
//! and drops the whole table, primaries included, for a chain that is not in ascending
//! order (`InconsistentEBR`), which Linux reads. Both read through `Read + Seek` only.
//!
//! As Linux: a protective MBR (a type 0xEE entry starting at LBA 1, hybrid or not) means
//! GPT, and its other entries are ignored; a GPT partition is numbered by its entry's
//! index + 1, unused entries (type GUID zero) leaving gaps; MBR primaries keep their slot
//! number 1-4; logical partitions are numbered from 5 in the order of the EBR chain, each
//! EBR giving every non-empty, non-extended entry (the third and fourth only when they
//! lie inside the extended partition) and following its first extended entry; a chain
//! stops after 100 EBRs in a row without a logical partition; numbers stay below Linux's
//! limit of 256. An extended partition itself is not listed (Linux makes a 1 KiB device
//! of it to keep mkfs off its EBR); BSD, Solaris, Minix and UnixWare labels inside an MBR
//! partition are not read (Linux numbers theirs after the logical partitions, so no number
//! here changes).
//!
//! Where this differs from Linux, so that writing one partition can never reach another:
//! - an entry ending past the end of the disk is refused (Linux cuts it at the end);
//! - entries that overlap are all refused, each side of the overlap (Linux serves both);
//! - a chain of EBRs ends at an EBR it has visited (Linux follows a loop for as long as it
//!   finds logical partitions) and after [`MAX_EBRS`] EBRs in all.
//!
//! And where it reads what Linux would not, as fdisk and the UEFI specification do:
//! - a damaged primary GPT gives way to the backup at the last LBA, with a note (Linux
//!   does that only with `gpt` on its command line, and otherwise reads no partitions);
//! - GPT entries may be any multiple of 128 bytes long (Linux takes exactly 128).
//!
//! An entry array larger than [`MAX_ENTRY_ARRAY`] makes its header invalid (Linux's cap
//! is KMALLOC_MAX_SIZE, 4 MiB on x86-64).
//!
//! Every offset and length from the disk is checked against its size before it is read,
//! and what is read is bounded by the caps above, whatever a header claims. A damaged or
//! missing table is not an error (no scheme, or entries refused with a reason); failing
//! reads are.

mod gpt;
mod mbr;

use crate::disk::VirtualDisk;
use crate::error::Result;
use std::fmt;
use std::ops::Range;

#[cfg(any(test, feature = "fuzzing"))]
pub use gpt::seal_checksums;

/// Linux's DISK_MAX_PARTS: partition numbers stay below it.
const NUMBER_LIMIT: u32 = 256;
/// EBRs read in all, over every chain of a disk. A real chain has one per logical
/// partition, and there are at most 251 of those.
pub const MAX_EBRS: u32 = 1024;
/// The largest GPT entry array read: 8192 entries of 128 bytes, 64 times the usual 128.
pub const MAX_ENTRY_ARRAY: u64 = 1 << 20;

/// A partition the table describes and that may be served: inside the disk and
/// overlapping no other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// As Linux numbers it (pN).
    pub number: u32,
    /// Bytes from the start of the disk.
    pub offset: u64,
    /// Bytes, never zero.
    pub len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// No partition table Linux would read.
    None,
    Mbr,
    Gpt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionTable {
    pub scheme: Scheme,
    /// The partitions that may be served, by ascending number.
    pub partitions: Vec<Partition>,
    /// One line for each entry described but not served, and why, by ascending number.
    pub refused: Vec<String>,
    /// What else was found wrong or unusual (a damaged GPT copy, a chain cut short).
    pub notes: Vec<String>,
    /// The byte ranges of the disk the table was read from, merged and ascending: sector
    /// 0, every EBR, the GPT headers and the entry arrays of those that passed their own
    /// checks, and, without a table, LBA 1 (where a new GPT header goes). A write
    /// overlapping one may change the table.
    pub table_ranges: Vec<Range<u64>>,
}

/// Reads the partition table of `disk` through its `read_at`, in units of its logical
/// sector size.
pub fn read_partition_table(disk: &dyn VirtualDisk) -> Result<PartitionTable> {
    let mut sectors = Sectors::new(disk);
    let mut found = Found::default();
    let scheme = match mbr::BootRecord::read(&mut sectors, 0)? {
        None => Scheme::None,
        Some(boot) if boot.is_protective() => {
            if boot.is_hybrid() {
                found.notes.push(
                    "sector 0 is a hybrid MBR; its entries other than the GPT's are ignored"
                        .to_string(),
                );
            }
            match gpt::read(&mut sectors, &mut found)? {
                true => Scheme::Gpt,
                false => Scheme::None,
            }
        }
        Some(boot) => match mbr::read(&mut sectors, &boot, &mut found)? {
            true => Scheme::Mbr,
            false => Scheme::None,
        },
    };
    let (partitions, refused) = accept(found.entries, found.refused, &sectors);
    let mut ranges = sectors.ranges;
    ranges.push(0..sectors.size);
    if scheme == Scheme::None {
        ranges.push(sectors.size..2 * sectors.size);
    }
    Ok(PartitionTable {
        scheme,
        partitions,
        refused,
        notes: found.notes,
        table_ranges: merge(ranges),
    })
}

/// The disk in logical sectors, remembering what was read of it.
struct Sectors<'a> {
    disk: &'a dyn VirtualDisk,
    /// Bytes in a logical sector.
    size: u64,
    /// Whole sectors in the disk.
    count: u64,
    ranges: Vec<Range<u64>>,
}

impl<'a> Sectors<'a> {
    fn new(disk: &'a dyn VirtualDisk) -> Self {
        let size = u64::from(disk.logical_sector_size());
        Sectors {
            disk,
            size,
            count: disk.size().checked_div(size).unwrap_or(0),
            ranges: Vec::new(),
        }
    }

    /// The last sector; only asked once sector 0 was read, so the disk has one.
    fn last(&self) -> u64 {
        self.count.saturating_sub(1)
    }

    /// `len` bytes from the start of sector `lba`, or `None` if they do not lie inside
    /// the disk's whole sectors.
    fn read(&mut self, lba: u64, len: u64) -> Result<Option<Vec<u8>>> {
        let Some(range) = lba
            .checked_mul(self.size)
            .and_then(|start| Some(start..start.checked_add(len)?))
            .filter(|range| range.end <= self.count * self.size)
        else {
            return Ok(None);
        };
        // Callers bound `len` (one sector, or MAX_ENTRY_ARRAY), so it fits in memory.
        let mut buf = vec![0u8; len as usize];
        self.disk.read_at(&mut buf, range.start)?;
        self.ranges.push(range);
        Ok(Some(buf))
    }
}

/// What a table describes, before the checks every scheme shares.
#[derive(Default)]
struct Found {
    entries: Vec<Entry>,
    /// Entries refused by the scheme's own rules, with their number.
    refused: Vec<(u32, String)>,
    notes: Vec<String>,
}

/// A partition as its table entry gives it, in sectors.
#[derive(Debug, Clone, Copy)]
struct Entry {
    number: u32,
    first: u64,
    /// Inclusive, never below `first`.
    last: u64,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "partition {} (sectors {}-{})",
            self.number, self.first, self.last
        )
    }
}

/// Refuses the entries that end past the disk, then every entry that overlaps another
/// (both sides: writing either could corrupt the other), and returns the rest as
/// partitions and every refusal, each by ascending number.
fn accept(
    entries: Vec<Entry>,
    mut refused: Vec<(u32, String)>,
    sectors: &Sectors,
) -> (Vec<Partition>, Vec<String>) {
    let count = sectors.count;
    let mut inside = Vec::new();
    for entry in entries {
        if entry.last < count {
            inside.push(entry);
        } else {
            refused.push((
                entry.number,
                format!("{entry} ends past the end of the disk ({count} sectors)"),
            ));
        }
    }
    inside.sort_by_key(|e| (e.first, e.number));
    let mut overlapped: Vec<Vec<u32>> = vec![Vec::new(); inside.len()];
    for i in 0..inside.len() {
        for j in i + 1..inside.len() {
            if inside[j].first > inside[i].last {
                break;
            }
            overlapped[i].push(inside[j].number);
            overlapped[j].push(inside[i].number);
        }
    }
    let mut partitions = Vec::new();
    for (entry, mut others) in inside.into_iter().zip(overlapped) {
        if others.is_empty() {
            partitions.push(Partition {
                number: entry.number,
                // Inside the disk, so neither overflows.
                offset: entry.first * sectors.size,
                len: (entry.last - entry.first + 1) * sectors.size,
            });
            continue;
        }
        others.sort_unstable();
        let list = others
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let plural = if others.len() == 1 { "" } else { "s" };
        refused.push((
            entry.number,
            format!("{entry} overlaps partition{plural} {list}"),
        ));
    }
    partitions.sort_by_key(|p| p.number);
    refused.sort_by_key(|(number, _)| *number);
    (
        partitions,
        refused.into_iter().map(|(_, line)| line).collect(),
    )
}

/// `ranges` sorted, with those that overlap or touch joined.
fn merge(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::new();
    for range in ranges {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    merged
}

#[cfg(test)]
mod tests;

//! The partition files of a mount: one per partition the disk's table describes, read
//! again whenever a change may have rewritten the table.

use super::FIRST_PARTITION_INO;
use crate::disk::VirtualDisk;
use crate::partition::{Partition, read_partition_table};
use std::ops::Range;

/// Which files the mount shows: `-o partitions=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PartitionFiles {
    /// `disk.img` and a file per partition.
    #[default]
    Auto,
    /// `disk.img` alone.
    Off,
    /// The partition files alone.
    Only,
}

/// One partition file: where its bytes are on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PartitionFile {
    pub number: u32,
    pub name: String,
    pub start: u64,
    pub len: u64,
}

impl PartitionFile {
    pub fn ino(&self) -> u64 {
        FIRST_PARTITION_INO + u64::from(self.number).saturating_sub(1)
    }
}

/// The partition files as the table read last describes them.
#[derive(Debug, Default)]
pub(super) struct PartitionSet {
    /// Ascending by number.
    pub files: Vec<PartitionFile>,
    /// Where the table lives on the disk: a change there may change the files.
    table_ranges: Vec<Range<u64>>,
}

impl PartitionSet {
    /// Reads the table; what it cannot use (a damaged table, refused entries) is logged,
    /// and the disk itself is still served.
    pub fn read(disk: &dyn VirtualDisk) -> PartitionSet {
        let table = match read_partition_table(disk) {
            Ok(table) => table,
            Err(e) => {
                log::warn!("cannot read the partition table: {e}; no partition files");
                // Sector 0 and the GPT header after it: a table written later lands there.
                let sectors = u64::from(disk.logical_sector_size()) * 2;
                return PartitionSet {
                    files: Vec::new(),
                    table_ranges: std::iter::once(0..sectors).collect(),
                };
            }
        };
        for note in &table.notes {
            log::warn!("partition table: {note}");
        }
        for refused in &table.refused {
            log::warn!("partition table: {refused}; no file for it");
        }
        let files = table
            .partitions
            .iter()
            .map(
                |&Partition {
                     number,
                     offset,
                     len,
                 }| PartitionFile {
                    number,
                    name: format!("part{number}.img"),
                    start: offset,
                    len,
                },
            )
            .collect();
        PartitionSet {
            files,
            table_ranges: table.table_ranges,
        }
    }

    pub fn by_ino(&self, ino: u64) -> Option<&PartitionFile> {
        let number = ino.checked_sub(FIRST_PARTITION_INO)?.checked_add(1)?;
        self.files.iter().find(|f| u64::from(f.number) == number)
    }

    pub fn by_name(&self, name: &str) -> Option<&PartitionFile> {
        self.files.iter().find(|f| f.name == name)
    }

    /// Whether a change to `range` of the disk may have changed the table.
    pub fn holds_table_in(&self, range: &Range<u64>) -> bool {
        self.table_ranges
            .iter()
            .any(|t| t.start < range.end && range.start < t.end)
    }

    /// The files that differ between `self` and `newer`: gone, added, moved or resized.
    pub fn changed<'a>(&'a self, newer: &'a PartitionSet) -> Vec<&'a PartitionFile> {
        let gone_or_changed = self.files.iter().filter(|f| !newer.files.contains(f));
        let added_or_changed = newer.files.iter().filter(|f| !self.files.contains(f));
        gone_or_changed.chain(added_or_changed).collect()
    }
}

//! Changing a disk's size in place. The size is the Virtual Disk Size metadata item and
//! the BAT's extent is the region table's BAT entry; both change in one log entry, the
//! commit point, so a crash leaves the old geometry or the new one. Everything before it
//! touches only what the old disk does not use:
//!
//! 1. A BAT region too small for the larger disk grows in place when only blocks (or
//!    nothing) follow it, and those move out first, each copied and flushed before its
//!    entry changes through the log (`relocation::clear`); else the region moves to free
//!    space or the file's end.
//! 2. The old last block, when the disk ended inside it, gets the rest of its space:
//!    zeroed where nothing uses it, else the block moves to a whole block's space.
//! 3. The entries past the old disk (NOT_PRESENT; a fixed disk's new blocks FULLY_PRESENT
//!    in space past the end of the file, a hole) go into the region: through the log where
//!    the current region holds them (ignored by the old disk, which is shorter), written
//!    straight into space no region uses yet otherwise; then flushed.
//! 4. DataWriteGuid is renewed (a size change is user-visible), and the log entry with the
//!    metadata item and both region tables is written and applied.
//!
//! Shrinking commits the metadata item alone (the region keeps its larger size, which the
//! format allows), then gives back the blocks past the end and cuts the file after the
//! last one, as compaction does.

use super::create::check_size;
use super::*;
use crate::relocation::{Unit, clear};
use metadata::VIRTUAL_DISK_SIZE;

/// Where the disk's size and BAT are described in the file, read again for a resize.
struct Description {
    regions: RegionTable,
    /// File offset of the Virtual Disk Size item.
    size_at: u64,
}

impl VhdxDisk {
    fn describe(&self) -> Result<Description> {
        let storage = self.storage.as_ref();
        let mut copies = [vec![0u8; REGION_TABLE_LEN], vec![0u8; REGION_TABLE_LEN]];
        for (copy, offset) in copies.iter_mut().zip(REGION_TABLE_OFFSETS) {
            storage
                .read_at(copy, offset)
                .context(|| format!("reading the region table at {offset:#x}"))?;
        }
        let regions = RegionTable::parse_either([&copies[0], &copies[1]], &mut Problems::Refuse)?;
        let metadata = regions.find(METADATA_REGION);
        let mut table = vec![0u8; METADATA_TABLE_LEN];
        storage
            .read_at(&mut table, metadata.file_offset)
            .context(|| "reading the metadata table".to_string())?;
        let table = MetadataTable::parse(&table, u64::from(metadata.length))?;
        // Present and 8 bytes long: checked when the image was opened.
        let item = table.find(VIRTUAL_DISK_SIZE).ok_or_else(|| {
            Error::corrupt(
                CorruptionKind::InvalidField,
                "metadata table",
                "required item Virtual Disk Size is missing",
            )
        })?;
        Ok(Description {
            size_at: metadata.file_offset + u64::from(item.offset),
            regions,
        })
    }

    /// The layout of the same disk at `size` bytes.
    fn layout_for(&self, size: u64) -> BatLayout {
        BatLayout::new(
            size,
            self.params.block_size,
            self.params.logical_sector_size,
            self.params.has_parent,
        )
    }

    /// The log updates that make the file hold each `(offset, bytes)`: the pages they
    /// touch, merged with what the file holds, where that changes.
    fn page_updates(&self, writes: &[(u64, &[u8])]) -> Result<Vec<LogUpdate>> {
        let read = |offset: u64| {
            let mut page = [0u8; log::LOG_SECTOR];
            self.storage
                .read_at(&mut page, offset)
                .context(|| format!("reading metadata at {offset:#x}"))?;
            Ok(page)
        };
        let mut updates = Vec::new();
        for (file_offset, data) in log::merge_into_pages(writes, read)? {
            if *data != read(file_offset)? {
                updates.push(LogUpdate::Page { file_offset, data });
            }
        }
        Ok(updates)
    }

    /// Gives the old last block, which the disk ended inside, the space up to where the
    /// disk of `size` bytes ends in it, reading as zeros. Returns how many blocks moved.
    fn complete_last_block(&self, size: u64) -> Result<u64> {
        let block_size = self.layout.block_size;
        let old = self.size();
        let used = old % block_size;
        let block = old / block_size;
        let index = self.layout.payload_index(block);
        let entry = self.bat.read().payload(block);
        if used == 0
            || !matches!(
                entry.payload_state(),
                Some(PayloadState::FullyPresent | PayloadState::PartiallyPresent)
            )
        {
            return Ok(0);
        }
        let at = entry.file_offset();
        let tail = at + used..at + block_size.min(size - block * block_size);
        let unused = {
            let space = self.allocator.lock();
            space.free.covers(tail.start..tail.end.min(space.file_end))
        };
        if unused {
            self.claim(tail.clone())?;
            storage::zero_range(
                self.storage.as_ref(),
                tail.start,
                tail.end - tail.start,
                true,
            )
            .context(|| format!("clearing block {block} past the old end"))?;
            return Ok(0);
        }
        // Space that reads as zeros past the copied part.
        let to = self.reserve(block_size)?;
        let unit = Unit {
            id: index,
            at,
            len: used,
            releasable: None,
        };
        self.relocate(&[(unit, to)])?;
        Ok(1)
    }

    /// Entries without data that still name an old location inside `range` (which
    /// readers take as unused) name none any more, so no entry points into the BAT
    /// growing there. They read as zeros either way.
    fn forget_old_locations(&self, range: &Range<u64>) -> Result<()> {
        let mut j = self.journal.lock();
        let changes: Vec<(u64, BatEntry)> = {
            let bat = self.bat.read();
            (0..self.layout.total_entries)
                .filter(|&index| {
                    !self.layout.is_sector_bitmap_index(index)
                        && self.layout.block_of_index(index) < self.layout.payload_blocks
                })
                .filter_map(|index| {
                    let entry = bat.entry(index);
                    let state = entry.payload_state()?;
                    let at = entry.file_offset();
                    let end = at + bat.used_len(index, self.size());
                    let present = matches!(
                        state,
                        PayloadState::FullyPresent | PayloadState::PartiallyPresent
                    );
                    (!present && at != 0 && at < range.end && range.start < end)
                        .then(|| (index, BatEntry::new(state, 0)))
                })
                .collect()
        };
        if changes.is_empty() {
            return Ok(());
        }
        self.commit(&mut j, &changes, &[])
    }

    fn grow(&self, size: u64) -> Result<u64> {
        let old_layout = self.layout;
        let layout = self.layout_for(size);
        let described = self.describe()?;
        let region = described.regions.find(BAT_REGION).clone();
        let (old_at, old_len) = (region.file_offset, u64::from(region.length));
        let len = (layout.total_entries * BAT_ENTRY_LEN)
            .next_multiple_of(MIB)
            .max(old_len);
        let mut moved = 0;
        let at = if len == old_len {
            old_at
        } else {
            let growth = old_at + old_len..old_at + len;
            let log = {
                let header = &self.journal.lock().header;
                header.log_offset..header.log_offset + u64::from(header.log_length)
            };
            let blocked = described
                .regions
                .entries
                .iter()
                .filter(|r| r.guid != BAT_REGION)
                .map(|r| r.file_offset..r.end())
                .chain([log])
                .any(|r| r.start < growth.end && growth.start < r.end);
            if blocked {
                self.reserve(len)?
            } else {
                moved += clear(self, growth.clone())?;
                self.forget_old_locations(&growth)?;
                // Blocks that moved out left their data behind.
                storage::zero_range(self.storage.as_ref(), growth.start, len - old_len, true)
                    .context(|| "clearing the space the BAT grows into".to_string())?;
                old_at
            }
        };
        moved += self.complete_last_block(size)?;

        let fixed = self.params.leave_blocks_allocated && self.differencing.is_none();
        // A fixed disk's new blocks, in one run: a hole past the end of the file, as
        // `vdisk create` leaves its data area.
        let new_blocks = layout.payload_blocks - old_layout.payload_blocks;
        let fixed_at = match fixed && new_blocks > 0 {
            true => Some(self.reserve(new_blocks * layout.block_size)?),
            false => None,
        };
        let mut bat = self.bat.read().grown(layout);
        let first = old_layout
            .payload_index(old_layout.payload_blocks)
            .min(old_layout.total_entries);
        for index in first..layout.total_entries {
            let entry = if layout.is_sector_bitmap_index(index) {
                if index < old_layout.total_entries {
                    // A chunk the old disk has too: its bitmap stays.
                    continue;
                }
                BatEntry(0)
            } else if let Some(at) =
                fixed_at.filter(|_| layout.block_of_index(index) < layout.payload_blocks)
            {
                let nth = layout.block_of_index(index) - old_layout.payload_blocks;
                BatEntry::new(PayloadState::FullyPresent, at + nth * layout.block_size)
            } else {
                BatEntry(0)
            };
            bat.set(index, entry);
        }
        let pages = (layout.total_entries * BAT_ENTRY_LEN).div_ceil(BAT_PAGE_LEN as u64);
        let first_page = match at == old_at {
            true => first * BAT_ENTRY_LEN / BAT_PAGE_LEN as u64,
            false => 0,
        };
        // Pages the current region holds go through the log; the rest, one run at the end,
        // is written straight.
        let mut logged = Vec::new();
        let mut direct: Option<(u64, Vec<u8>)> = None;
        for page in first_page..pages {
            let bytes = bat.page_bytes(page as usize);
            let file_offset = at + page * BAT_PAGE_LEN as u64;
            if at == old_at && file_offset < old_at + old_len {
                logged.push((file_offset, bytes));
            } else {
                direct
                    .get_or_insert_with(|| (file_offset, Vec::new()))
                    .1
                    .extend_from_slice(&bytes);
            }
        }
        if let Some((file_offset, bytes)) = direct {
            self.storage
                .write_at(&bytes, file_offset)
                .context(|| format!("writing the BAT at {file_offset:#x}"))?;
        }
        self.storage
            .flush()
            .context(|| "flushing the BAT".to_string())?;
        let writes: Vec<(u64, &[u8])> = logged.iter().map(|(o, b)| (*o, &b[..])).collect();
        let entries = self.page_updates(&writes)?;
        if !entries.is_empty() {
            self.journal_pages(&mut self.journal.lock(), &entries, false)?;
        }

        let mut regions = described.regions.clone();
        for region in regions.entries.iter_mut().filter(|r| r.guid == BAT_REGION) {
            region.file_offset = at;
            // The old length, or at most 32 MiB: `fit_size` checked the BAT against what a
            // reader loads.
            region.length = len as u32;
        }
        self.commit_size(&described, size, Some(&regions))?;
        Ok(moved)
    }

    /// The commit point: one log entry with the Virtual Disk Size item and, when the BAT
    /// region changed, both region tables.
    fn commit_size(
        &self,
        described: &Description,
        size: u64,
        regions: Option<&RegionTable>,
    ) -> Result<()> {
        self.begin_user_write()?;
        let size_bytes = size.to_le_bytes();
        let mut writes: Vec<(u64, &[u8])> = vec![(described.size_at, &size_bytes)];
        let table = regions
            .filter(|r| **r != described.regions)
            .map(RegionTable::to_bytes);
        if let Some(table) = &table {
            writes.extend(REGION_TABLE_OFFSETS.map(|offset| (offset, &table[..])));
        }
        // A few pages, which one log entry applies whole or not at all.
        let updates = self.page_updates(&writes)?;
        self.journal_pages(&mut self.journal.lock(), &updates, true)
    }

    fn shrink_to(&self, size: u64) -> Result<()> {
        let described = self.describe()?;
        self.commit_size(&described, size, None)?;
        let layout = self.layout_for(size);
        let mut j = self.journal.lock();
        let mut changes = Vec::new();
        let mut spaces = Vec::new();
        {
            let bat = self.bat.read();
            for index in layout.payload_index(layout.payload_blocks)..self.layout.total_entries {
                let is_bitmap = layout.is_sector_bitmap_index(index);
                if is_bitmap && index < layout.total_entries {
                    // The bitmap of a chunk the smaller disk still has.
                    continue;
                }
                let entry = bat.entry(index);
                if entry.0 == 0 {
                    continue;
                }
                changes.push((index, BatEntry(0)));
                let holds_space = match is_bitmap {
                    true => entry.payload_state() == Some(PayloadState::FullyPresent),
                    false => matches!(
                        entry.payload_state(),
                        Some(PayloadState::FullyPresent | PayloadState::PartiallyPresent)
                    ),
                };
                if holds_space {
                    let start = entry.file_offset();
                    spaces.push(start..start + bat.used_len(index, self.size()));
                }
            }
        }
        self.give_back(&mut j, &changes, spaces)?;
        drop(j);
        self.shrink()?;
        Ok(())
    }
}

impl Resize for VhdxDisk {
    fn fit_size(&self, size: u64) -> Result<u64> {
        check_size(size, self.params.logical_sector_size)?;
        let layout = self.layout_for(size);
        let needed = (layout.total_entries * BAT_ENTRY_LEN).next_multiple_of(MIB);
        Bat::loaded_len(&layout, needed)?;
        Ok(size)
    }

    fn resize(&self, size: u64) -> Result<u64> {
        self.check_writable()?;
        let moved = match size.cmp(&self.size()) {
            std::cmp::Ordering::Equal => 0,
            std::cmp::Ordering::Greater => self.grow(size)?,
            std::cmp::Ordering::Less => self.shrink_to(size).map(|()| 0)?,
        };
        self.close()?;
        Ok(moved)
    }
}

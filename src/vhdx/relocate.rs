//! Compaction: payload and sector bitmap blocks move down into free space, each batch
//! copied and flushed before its BAT entries change through the log; then the log is
//! closed and the file cut after the last block, at a 1 MiB boundary.

use super::*;
use crate::relocation::{Releasable, Unit, account_moves, copy_units};

impl VhdxDisk {
    /// The file range BAT entry `index` names, if it names one inside the file: the whole
    /// block where the file holds it, else the part inside the disk (a last block cut
    /// short by its creator). Present blocks were checked at open; an entry without data
    /// may still name any old location, which counts only if it lies in the file.
    fn entry_extent(&self, bat: &Bat, index: u64, file_end: u64) -> Option<Range<u64>> {
        let entry = bat.entry(index);
        let at = entry.file_offset();
        let is_bitmap = self.layout.is_sector_bitmap_index(index);
        if at == 0
            || (is_bitmap && entry.payload_state() != Some(PayloadState::FullyPresent))
            || (!is_bitmap && self.layout.block_of_index(index) >= self.layout.payload_blocks)
        {
            return None;
        }
        let len = match at.checked_add(self.layout.block_size) {
            Some(end) if !is_bitmap && end <= file_end => self.layout.block_size,
            _ => bat.used_len(index, self.params.virtual_size),
        };
        let end = at.checked_add(len).filter(|&end| end <= file_end)?;
        Some(at..end)
    }
}

impl Relocation for VhdxDisk {
    fn units(&self) -> Vec<Unit> {
        let file_end = self.allocator.lock().file_end;
        let bat = self.bat.read();
        let releasable_image = !self.params.leave_blocks_allocated;
        (0..self.layout.total_entries)
            .filter_map(|index| {
                let entry = bat.entry(index);
                let present = match entry.payload_state() {
                    Some(PayloadState::FullyPresent) => true,
                    Some(PayloadState::PartiallyPresent) => false,
                    // Old locations of blocks without data stay where they are.
                    _ => return None,
                };
                let extent = self.entry_extent(&bat, index, file_end)?;
                let is_payload = !self.layout.is_sector_bitmap_index(index);
                let releasable = (is_payload && present && releasable_image).then(|| {
                    let start = self.layout.block_of_index(index) * self.layout.block_size;
                    Releasable {
                        disk_range: start..(start + self.layout.block_size).min(self.size()),
                        data_at: extent.start,
                    }
                });
                Some(Unit {
                    id: index,
                    at: extent.start,
                    len: extent.end - extent.start,
                    releasable,
                })
            })
            .collect()
    }

    fn free_space(&self) -> FreeSpace {
        self.allocator.lock().free.settled()
    }

    fn place(&self, range: Range<u64>, len: u64) -> Option<u64> {
        aligned_place(range, len, 0, MIB, MIB)
    }

    fn relocate(&self, moves: &[(Unit, u64)]) -> Result<()> {
        self.check_writable()?;
        let mut j = self.journal.lock();
        let storage = self.storage.as_ref();
        let mut changes = Vec::with_capacity(moves.len());
        for (unit, to) in moves {
            let entry = self.bat.read().entry(unit.id);
            let state = entry.payload_state().ok_or_else(|| {
                Error::invalid_input(format!("BAT entry {} has nothing to move", unit.id))
            })?;
            changes.push((unit.id, BatEntry::new(state, *to)));
        }
        copy_units(storage, moves)?;
        self.commit(&mut j, &changes, &[])?;
        account_moves(&mut self.allocator.lock().free, moves);
        Ok(())
    }

    fn shrink(&self) -> Result<u64> {
        self.check_writable()?;
        // A log entry names the file size it was written at; replaying it over a shorter
        // file would be refused. Close the log first.
        self.close()?;
        let _j = self.journal.lock();
        let file_end = self.allocator.lock().file_end;
        let end = {
            let bat = self.bat.read();
            (0..self.layout.total_entries)
                .filter_map(|index| self.entry_extent(&bat, index, file_end))
                .map(|extent| extent.end)
                .fold(self.metadata_end, u64::max)
                .next_multiple_of(MIB)
        };
        if end >= file_end {
            return Ok(file_end);
        }
        let mut space = self.allocator.lock();
        self.storage
            .set_len(end)
            .context(|| format!("cutting the file at {end:#x}"))?;
        self.storage
            .flush()
            .context(|| "flushing the shorter file".to_string())?;
        space.file_end = end;
        space.flushed_end = end;
        space.free.remove(end..u64::MAX);
        Ok(end)
    }

    fn reserve(&self, len: u64) -> Result<u64> {
        self.check_writable()?;
        // Whole MiB, so the file's end stays where a log entry may name it.
        self.allocate_space(len.next_multiple_of(MIB), "moved data")
    }

    fn claim(&self, range: Range<u64>) -> Result<()> {
        self.check_writable()?;
        let mut space = self.allocator.lock();
        if range.end > space.file_end {
            let end = range.end.next_multiple_of(MIB);
            self.storage
                .set_len(end)
                .context(|| format!("extending the file to {end:#x}"))?;
            let old_end = space.file_end;
            space.free.insert(old_end..end);
            space.file_end = end;
        }
        space.free.remove(range);
        Ok(())
    }
}

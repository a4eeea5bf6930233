//! Compaction of a dynamic or differencing disk: blocks move down into free space, each
//! batch copied and flushed before the BAT entries change and are flushed; the file is
//! cut after the last block by writing the footer there first.

use super::*;
use crate::relocation::{Releasable, Unit, account_moves, copy_units};
use std::ops::Range;

impl VhdDisk {
    fn dynamic_part(&self) -> &Dynamic {
        self.dynamic
            .as_ref()
            .expect("only dynamic disks offer relocation")
    }
}

impl Relocation for VhdDisk {
    fn units(&self) -> Vec<Unit> {
        let d = self.dynamic_part();
        let block_size = d.layout.block_size;
        d.bat
            .read()
            .allocated_blocks()
            .map(|(block, at)| {
                let start = block * block_size;
                Unit {
                    id: block,
                    at,
                    len: d.layout.span(),
                    // A differencing block's unset bits are its parent's: never released.
                    releasable: d.differencing.is_none().then(|| Releasable {
                        disk_range: start..(start + block_size).min(self.size),
                        data_at: at + d.layout.bitmap_bytes,
                    }),
                }
            })
            .collect()
    }

    fn free_space(&self) -> FreeSpace {
        self.dynamic_part().allocator.lock().free.settled()
    }

    fn place(&self, range: Range<u64>, len: u64) -> Option<u64> {
        let d = self.dynamic_part();
        let alignment = d.layout.block_size.min(DATA_ALIGNMENT);
        aligned_place(range, len, d.layout.bitmap_bytes, alignment, SECTOR)
    }

    fn relocate(&self, moves: &[(Unit, u64)]) -> Result<()> {
        self.check_writable()?;
        let d = self.dynamic_part();
        let mut allocator = d.allocator.lock();
        let storage = self.storage.as_ref();
        let entries = moves
            .iter()
            .map(|(unit, to)| Ok((unit.id, block_sector(unit.id, *to)?)))
            .collect::<Result<Vec<(u64, u32)>>>()?;
        copy_units(storage, moves)?;
        self.write_bat_entries(d, &entries, "moving")?;
        account_moves(&mut allocator.free, moves);
        Ok(())
    }

    fn shrink(&self) -> Result<u64> {
        self.check_writable()?;
        let d = self.dynamic_part();
        let mut allocator = d.allocator.lock();
        let storage = self.storage.as_ref();
        let end = d.structures_end().next_multiple_of(SECTOR);
        if end >= allocator.next_block {
            return storage
                .len()
                .context(|| "reading the file size".to_string());
        }
        end_with_footer(storage, &self.footer_bytes.lock(), end)?;
        allocator.next_block = end;
        allocator.free.remove(end..u64::MAX);
        Ok(end + FOOTER_SIZE as u64)
    }

    fn reserve(&self, len: u64) -> Result<u64> {
        self.check_writable()?;
        let d = self.dynamic_part();
        let mut allocator = d.allocator.lock();
        if let Some(at) = allocator
            .free
            .take(len, &d.space, |range| self.place(range, len))
        {
            return Ok(at);
        }
        let at = self
            .place(allocator.next_block..u64::MAX, len)
            .ok_or_else(|| {
                Error::invalid_input("the image file would exceed the largest offset")
            })?;
        let footer_at = (at + len).next_multiple_of(SECTOR);
        self.move_footer(&allocator, footer_at, &|step| {
            format!("making room for {len} bytes: {step}")
        })?;
        allocator.next_block = footer_at;
        Ok(at)
    }

    fn claim(&self, range: Range<u64>) -> Result<()> {
        self.check_writable()?;
        let d = self.dynamic_part();
        let mut allocator = d.allocator.lock();
        if range.end > allocator.next_block {
            let footer_at = range.end.next_multiple_of(SECTOR);
            self.move_footer(&allocator, footer_at, &|step| {
                format!("growing the file to {footer_at:#x}: {step}")
            })?;
            allocator.next_block = footer_at;
        }
        allocator.free.remove(range);
        Ok(())
    }
}

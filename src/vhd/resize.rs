//! Changing a disk's size in place. What readers take as the size is in the footer (Current
//! Size and geometry), which lives at the end of the file and, for dynamic disks, as a copy
//! at 0; readers take the trailing one (qemu the copy), so the trailing footer is the
//! commit point and everything before it must leave the disk as it was.
//!
//! Growing a dynamic disk needs a BAT of `ceil(size / block)` entries:
//!
//! 1. Room for a longer table: in place when only blocks (or nothing) follow it, and those
//!    blocks move out first, each copied and flushed before its entry points at its new
//!    place (`relocation::clear`); else the table moves to free space or the file's end.
//!    The image is the old disk throughout.
//! 2. The whole table is written where it goes, entries past the old disk unallocated, and
//!    the old last block's data past the old end zeroed (a shrink may have left data
//!    there), then flushed. Past the old disk's end, so the old disk reads the same; a
//!    table rewritten in place gets the bytes it already holds.
//! 3. The dynamic header's first sector, which holds Table Offset, Max Table Entries and
//!    the checksum, is written alone and flushed: one sector reaches the disk whole, so a
//!    crash leaves the old header or the new one, and either describes the old disk with
//!    a table that covers it.
//! 4. The trailing footer (new Current Size and geometry) is written where it was and
//!    flushed: the disk is now the larger one, its new range unallocated (zeros, or a
//!    parent's end, past which a parent reads zeros). Then the copy at 0.
//!
//! Shrinking writes the footers first (the data past the new end just stops counting),
//! then gives back the blocks past the end and cuts the file after the last block, as
//! compaction does. Max Table Entries keeps its larger value, which the format allows.
//!
//! A fixed disk is its data followed by the footer: growing writes a footer with the old
//! size at the new end (the file always ends in a valid footer), zeroes what lay between
//! the old end and it, then rewrites that footer with the new size. Shrinking rewrites the
//! trailing footer with the new size where it is, then writes it at the new end and cuts
//! the file after it. The new data area is a hole, as `vdisk create` leaves it.
//!
//! A crash after the commit point of a dynamic disk may leave the copy at 0 with the old
//! size, which qemu reads: resizing to the size the disk has rewrites both footers as the
//! trailing one is. Blocks a shrink did not give back yet stay, harmless, past the end.

use super::create::{block_count, check_size};
use super::*;
use crate::relocation::clear;
use dynamic_header::TABLE_FIELDS_LEN;
use std::cmp::Ordering;

impl VhdDisk {
    /// The size a resize to `size` gives and the geometry that goes with it: a disk whose
    /// size its readers take from the geometry grows to the next size a geometry holds.
    fn fitted(&self, size: u64) -> (u64, Geometry) {
        let by_geometry = |g: Geometry| {
            size_source(&self.footer.creator_app, g, self.size_rule) == SizeSource::Geometry
        };
        if !by_geometry(Geometry::for_size(size)) {
            return (size, Geometry::for_size(size));
        }
        let geometry = Geometry::covering(size);
        match by_geometry(geometry) {
            true => (geometry.bytes(), geometry),
            false => (size, geometry),
        }
    }

    /// Writes `new`, the footer: the trailing one (the commit point) at `at` and, for
    /// dynamic disks, the copy at 0, each flushed.
    fn write_footers(&self, new: &[u8; FOOTER_SIZE], at: u64) -> Result<()> {
        end_with_footer(self.storage.as_ref(), new, at)?;
        if self.dynamic.is_some() {
            self.storage
                .write_at(new, 0)
                .context(|| "writing the footer copy at 0".to_string())?;
            self.storage
                .flush()
                .context(|| "flushing the footer copy".to_string())?;
        }
        *self.footer_bytes.lock() = *new;
        Ok(())
    }

    fn grow_fixed(&self, size: u64, footer: &[u8; FOOTER_SIZE]) -> Result<()> {
        let storage = self.storage.as_ref();
        let file_len = storage
            .len()
            .context(|| "reading the file size".to_string())?;
        // The old footer, unchanged, first ends the file at the new end.
        let old = *self.footer_bytes.lock();
        end_with_footer(storage, &old, size)?;
        // Between the old end and the new footer lie the old footer and whatever followed
        // it: past the old disk, so zeroing them changes nothing a reader sees yet.
        let stale_end = file_len.min(size);
        storage::write_zeros(storage, self.size, stale_end.saturating_sub(self.size))
            .context(|| "clearing the old footer".to_string())?;
        storage
            .flush()
            .context(|| "flushing the cleared footer".to_string())?;
        self.write_footers(footer, size)
    }

    fn shrink_fixed(&self, size: u64, footer: &[u8; FOOTER_SIZE]) -> Result<()> {
        let storage = self.storage.as_ref();
        let file_len = storage
            .len()
            .context(|| "reading the file size".to_string())?;
        // Where it is, the new footer leaves a data area larger than the disk, which
        // readers accept; then it moves to the new end.
        self.write_footers(footer, file_len - FOOTER_SIZE as u64)?;
        end_with_footer(storage, footer, size)
    }

    /// The dynamic header's bytes as the file holds them, and what they say.
    fn read_header(&self) -> Result<([u8; HEADER_SIZE], DynamicHeader)> {
        let mut header = [0u8; HEADER_SIZE];
        self.storage
            .read_at(&mut header, self.footer.data_offset)
            .context(|| "reading the VHD dynamic header".to_string())?;
        let parsed = DynamicHeader::parse(&header)?;
        Ok((header, parsed))
    }

    fn grow_dynamic(&self, d: &Dynamic, size: u64, footer: &[u8; FOOTER_SIZE]) -> Result<u64> {
        let storage = self.storage.as_ref();
        let header_at = self.footer.data_offset;
        let (header, old) = self.read_header()?;
        // `fit_size` bounded the count far below u32::MAX.
        let entries = old
            .max_table_entries
            .max(size.div_ceil(d.layout.block_size) as u32);
        let (old_len, len) = (
            bat::table_bytes(old.max_table_entries),
            bat::table_bytes(entries),
        );
        let mut moved = 0;
        let table_at = if len == old_len {
            old.table_offset
        } else {
            let growth = old.table_offset + old_len..old.table_offset + len;
            let blocked = d
                .structures
                .iter()
                .any(|s| s.start < growth.end && growth.start < s.end);
            if blocked {
                self.reserve(len)?
            } else {
                moved = clear(self, growth)?;
                old.table_offset
            }
        };

        let table = d.bat.read().serialize(entries);
        storage
            .write_at(&table, table_at)
            .context(|| format!("writing the BAT at {table_at:#x}"))?;
        let in_last = self.size % d.layout.block_size;
        let last_block = (in_last > 0)
            .then(|| d.bat.read().block_offset(self.size / d.layout.block_size))
            .flatten();
        if let Some(block_at) = last_block {
            let data_at = block_at + d.layout.bitmap_bytes;
            storage::write_zeros(storage, data_at + in_last, d.layout.block_size - in_last)
                .context(|| "clearing the last block past the old end".to_string())?;
        }
        storage.flush().context(|| "flushing the BAT".to_string())?;

        if (table_at, entries) != (old.table_offset, old.max_table_entries) {
            let new = DynamicHeader::with_table(&header, table_at, entries);
            storage
                .write_at(&new[..TABLE_FIELDS_LEN], header_at)
                .context(|| "writing the VHD dynamic header".to_string())?;
            storage
                .flush()
                .context(|| "flushing the VHD dynamic header".to_string())?;
        }
        let footer_at = d.allocator.lock().next_block;
        self.write_footers(footer, footer_at)?;
        Ok(moved)
    }

    fn shrink_dynamic(&self, d: &Dynamic, size: u64, footer: &[u8; FOOTER_SIZE]) -> Result<()> {
        let mut allocator = d.allocator.lock();
        self.write_footers(footer, allocator.next_block)?;
        let first_cut = size.div_ceil(d.layout.block_size);
        let cut: Vec<(u64, u64)> = d
            .bat
            .read()
            .allocated_blocks()
            .filter(|&(block, _)| block >= first_cut)
            .collect();
        self.unallocate(d, &mut allocator, &cut)?;
        // Entries past the disk that this session never loaded (a shrink interrupted
        // before it gave their blocks back) would point past the end of the cut file.
        let (_, header) = self.read_header()?;
        let stale =
            first_cut * bat::ENTRY_SIZE..u64::from(header.max_table_entries) * bat::ENTRY_SIZE;
        if !stale.is_empty() {
            let at = header.table_offset + stale.start;
            self.storage
                .write_at(&vec![0xFF; (stale.end - stale.start) as usize], at)
                .context(|| format!("clearing BAT entries past the end at {at:#x}"))?;
            self.storage
                .flush()
                .context(|| "flushing the BAT".to_string())?;
        }
        drop(allocator);
        self.shrink()?;
        Ok(())
    }
}

impl Resize for VhdDisk {
    fn fit_size(&self, size: u64) -> Result<u64> {
        if self.footer.saved_state != 0 {
            return Err(Error::unsupported(
                "the VHD footer says a virtual machine's saved state belongs to this disk, \
                 which must not be resized (resume and shut the machine down first)",
            ));
        }
        check_size(size)?;
        let (size, _) = self.fitted(size);
        check_size(size)?;
        if let Some(d) = &self.dynamic {
            block_count(size, d.layout.block_size as u32)?;
        }
        Ok(size)
    }

    /// The size the disk has already rewrites a dynamic disk's footers as the trailing
    /// one is, which finishes a resize interrupted after its commit point.
    fn resize(&self, size: u64) -> Result<u64> {
        self.check_writable()?;
        let footer = match size == self.size {
            true => *self.footer_bytes.lock(),
            false => footer::resized(&self.footer_bytes.lock(), size, self.fitted(size).1),
        };
        let moved = match (&self.dynamic, size.cmp(&self.size)) {
            (None, Ordering::Equal) => 0,
            (None, Ordering::Greater) => self.grow_fixed(size, &footer).map(|()| 0)?,
            (None, Ordering::Less) => self.shrink_fixed(size, &footer).map(|()| 0)?,
            (Some(d), Ordering::Equal) => {
                let at = d.allocator.lock().next_block;
                self.write_footers(&footer, at).map(|()| 0)?
            }
            (Some(d), Ordering::Greater) => self.grow_dynamic(d, size, &footer)?,
            (Some(d), Ordering::Less) => self.shrink_dynamic(d, size, &footer).map(|()| 0)?,
        };
        self.close()?;
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{BLOCK, assemble, footer_for, header_for};
    use super::*;
    use crate::storage::MemStorage;
    use std::sync::Arc;

    fn image(size: u64, creator: &[u8; 4], saved_state: u8) -> Vec<u8> {
        let footer = Footer {
            creator_app: *creator,
            saved_state,
            ..footer_for(size, DiskType::Dynamic)
        };
        let entries = size.div_ceil(u64::from(BLOCK)) as u32;
        assemble(&footer, &header_for(entries, BLOCK))
    }

    fn open(storage: Arc<MemStorage>) -> VhdDisk {
        VhdDisk::open(Box::new(storage), &OpenOptions::default()).unwrap()
    }

    #[test]
    fn a_disk_sized_by_its_geometry_grows_to_the_next_size_a_geometry_holds() {
        // 121/4/17, as qemu-img made it.
        let storage = Arc::new(MemStorage::from_vec(image(4_212_736, b"qemu", 0)));
        let disk = open(storage.clone());
        let wanted = 20 << 20;
        let size = disk.fit_size(wanted).unwrap();
        assert_eq!(size, Geometry::covering(wanted).bytes());
        assert!(size > wanted);
        disk.resize(size).unwrap();
        let disk = open(storage.clone());
        assert_eq!(disk.size(), size);
        assert_eq!(disk.footer.current_size, size);
        assert_eq!(disk.geometry(), Geometry::covering(wanted));
        // libvhdi reads the size from Original Size.
        assert_eq!(disk.footer.original_size, size);
        let copy: [u8; FOOTER_SIZE] = storage.contents()[..FOOTER_SIZE].try_into().unwrap();
        assert_eq!(Footer::parse(&copy, "copy").unwrap(), disk.footer);
        // A disk sized by Current Size takes any whole number of sectors.
        let other = open(Arc::new(MemStorage::from_vec(image(4_212_736, b"win ", 0))));
        assert_eq!(other.fit_size(wanted + 512).unwrap(), wanted + 512);
    }

    /// A dynamic disk of 32 blocks, all written, shrunk to 8 but stopped right after
    /// the first `writes` writes.
    fn interrupted_shrink(writes: u64) -> Arc<MemStorage> {
        let storage = Arc::new(MemStorage::from_vec(image(
            32 * u64::from(BLOCK),
            b"win ",
            0,
        )));
        let disk = open(storage.clone());
        for block in 0..32 {
            disk.write_at(&[1; 512], block * u64::from(BLOCK)).unwrap();
        }
        storage.fail_writes_after(writes, libc::EIO);
        disk.resize(8 * u64::from(BLOCK)).unwrap_err();
        storage.clear_faults();
        assert_eq!(open(storage.clone()).size(), 8 * u64::from(BLOCK));
        storage
    }

    /// The BAT entries the header has room for that point at a block, by index.
    fn allocated_entries(file: &[u8]) -> Vec<(usize, u64)> {
        let header = DynamicHeader::parse(file[512..1536].try_into().unwrap()).unwrap();
        let table = &file[header.table_offset as usize..][..header.max_table_entries as usize * 4];
        table
            .chunks_exact(4)
            .map(|entry| u32::from_be_bytes(entry.try_into().unwrap()))
            .enumerate()
            .filter(|&(_, sector)| sector != bat::UNALLOCATED)
            .map(|(index, sector)| (index, u64::from(sector) * 512))
            .collect()
    }

    #[test]
    fn resizing_to_the_current_size_finishes_the_footer_copy() {
        // The trailing footer written, the copy at 0 not.
        let storage = interrupted_shrink(1);
        let disk = open(storage.clone());
        disk.resize(disk.size()).unwrap();
        let file = storage.contents();
        assert_eq!(file[..FOOTER_SIZE], file[file.len() - FOOTER_SIZE..]);
        // qemu checks every entry the header has room for against the file's length.
        for (index, at) in allocated_entries(&file) {
            assert!(
                at + 512 + u64::from(BLOCK) <= file.len() as u64,
                "entry {index}"
            );
        }
    }

    #[test]
    fn a_shrink_clears_every_entry_past_the_new_end() {
        // Both footers written, no block given back: entries 8 to 31 left behind, which
        // a session of 8 blocks does not load.
        let storage = interrupted_shrink(2);
        open(storage.clone()).resize(4 * u64::from(BLOCK)).unwrap();
        let file = storage.contents();
        for (index, at) in allocated_entries(&file) {
            assert!(index < 4, "entry {index} is left");
            assert!(
                at + 512 + u64::from(BLOCK) <= file.len() as u64,
                "entry {index}"
            );
        }
    }

    #[test]
    fn a_disk_with_a_saved_machine_state_is_not_resized() {
        let disk = open(Arc::new(MemStorage::from_vec(image(1 << 20, b"win ", 1))));
        let err = disk.fit_size(2 << 20).unwrap_err().to_string();
        assert!(err.contains("saved state"), "{err}");
    }

    #[test]
    fn a_bat_with_parent_locators_after_it_moves_to_grow() {
        // A table of one sector, then locator data, as `vdisk create --parent` lays it out.
        let mut header = header_for(8, BLOCK);
        let mut locators = [0u8; dynamic_header::PARENT_LOCATORS_LEN];
        locators[..4].copy_from_slice(b"W2ru");
        locators[4..8].copy_from_slice(&1u32.to_be_bytes());
        locators[8..12].copy_from_slice(&8u32.to_be_bytes());
        locators[16..24].copy_from_slice(&2048u64.to_be_bytes());
        header.parent_locators = locators;
        let footer = footer_for(8 * u64::from(BLOCK), DiskType::Differencing);
        let mut image = assemble(&footer, &header);
        let footer_at = image.len() - FOOTER_SIZE;
        image.splice(footer_at..footer_at, std::iter::repeat_n(0, 512));
        image[2048..2056].copy_from_slice(&[b'.', 0, b'\\', 0, b'p', 0, 0, 0]);
        let storage = Arc::new(MemStorage::from_vec(image));
        let disk = open(storage.clone());
        // A whole block needs nothing from the parent, which is not there.
        disk.write_at(&[9; 4096], 0).unwrap();
        let size = 200 * u64::from(BLOCK);
        disk.resize(size).unwrap();
        let disk = open(storage.clone());
        assert_eq!(disk.size(), size);
        let d = disk.dynamic.as_ref().unwrap();
        assert_ne!(d.table_offset, 1536);
        assert!(d.structures.iter().any(|s| s.start == 2048));
        let mut first = [0u8; 4096];
        disk.read_mapped(&mut first, d.bat.read().block_offset(0).unwrap() + 512)
            .unwrap();
        assert_eq!(first, [9; 4096]);
    }
}

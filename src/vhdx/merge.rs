//! Merging a differencing VHDX into its parent, once the parent holds what the child
//! shows: the child's blocks handed back to the parent, and the parent renamed.
//!
//! A child names its parent by the parent's DataWriteGuid, which changed data calls for
//! renewing (other children of the old data must refuse it). The child accepts two
//! (`parent_linkage` and `parent_linkage2`), so the rename goes in three atomic steps, the
//! child opening against its parent after each: the child accepts the new GUID beside the
//! old one (log entry), the parent takes the new one (header update), the child drops the
//! old one (log entry).

use super::*;
use std::any::Any;

impl VhdxDisk {
    /// Clears every sector bitmap bit, then makes every payload block NOT_PRESENT, through
    /// the log, and gives their space back. Either step alone leaves sectors reading from
    /// the parent what they read before; bits first, because some readers (libvhdi)
    /// consult them even in NOT_PRESENT blocks.
    pub(super) fn clear_blocks_to_parent(&self) -> Result<()> {
        self.check_writable()?;
        let Some(d) = &self.differencing else {
            return Err(Error::invalid_input("not a VHDX differencing disk"));
        };
        let mut j = self.journal.lock();
        let cleared: Vec<BitmapPageChange> = {
            let bat = self.bat.read();
            d.bitmaps
                .read()
                .held_pages()
                .into_iter()
                .map(|(chunk, page)| BitmapPageChange {
                    chunk,
                    page,
                    file_offset: bat
                        .sector_bitmap(chunk * self.layout.chunk_ratio)
                        .file_offset()
                        + page * BAT_PAGE_LEN as u64,
                    contents: Box::new([0; BAT_PAGE_LEN]),
                })
                .collect()
        };
        if !cleared.is_empty() {
            self.commit(&mut j, &[], &cleared)?;
        }
        let blocks: Vec<u64> = {
            let bat = self.bat.read();
            (0..self.layout.payload_blocks)
                .filter(|&b| bat.payload(b).payload_state() != Some(PayloadState::NotPresent))
                .collect()
        };
        self.retire_blocks(&mut j, &blocks, PayloadState::NotPresent)
    }

    /// Gives the attached parent a new DataWriteGuid, naming it in this image first (see
    /// the module's comment).
    pub(super) fn relink_parent(&self) -> Result<()> {
        let Some(d) = &self.differencing else {
            return Ok(());
        };
        let parent = d
            .parent
            .as_ref()
            .ok_or_else(|| Error::invalid_input("differencing image opened without its parent"))?;
        let layer: &dyn Any = parent.layer.as_ref();
        let parent_disk = layer.downcast_ref::<VhdxDisk>().ok_or_else(|| {
            Error::invalid_input(format!(
                "parent {}: not a VHDX image",
                parent.path.display()
            ))
        })?;
        let old = parent_disk.journal.lock().header.data_write_guid;
        let new = Uuid::new_v4();
        self.set_parent_linkages(d, &[new, old])?;
        parent_disk
            .set_data_write_guid(new)
            .map_err(|e| e.with_file(&parent.path))?;
        self.set_parent_linkages(d, &[new])
    }

    /// Gives the image DataWriteGuid `guid`: one header update, atomic.
    fn set_data_write_guid(&self, guid: Uuid) -> Result<()> {
        self.check_writable()?;
        let mut j = self.journal.lock();
        update_header(self.storage.as_ref(), &mut j, |h| h.data_write_guid = guid)?;
        j.data_write_guid_changed = true;
        Ok(())
    }

    /// Records `linkages` as the DataWriteGuids the parent may carry, in one log entry.
    fn set_parent_linkages(&self, d: &Differencing, linkages: &[Uuid]) -> Result<()> {
        self.replace_parent_locator(d, |locator| locator.relinked(linkages))
    }

    /// Replaces the parent locator by what `change` makes of it, in one log entry: the
    /// item (moved inside the metadata region if it outgrew its room; what it leaves is
    /// cleared) and the table entry that says where it is.
    pub(super) fn replace_parent_locator(
        &self,
        d: &Differencing,
        change: impl FnOnce(&ParentLocator) -> ParentLocator,
    ) -> Result<()> {
        self.check_writable()?;
        let mut j = self.journal.lock();
        let region = &d.metadata_region;
        let read = |buf: &mut [u8], at: u64| {
            self.storage
                .read_at(buf, at)
                .context(|| format!("reading the metadata region at {at:#x}"))
        };
        let mut table_bytes = vec![0u8; METADATA_TABLE_LEN];
        read(&mut table_bytes, region.start)?;
        let mut table = MetadataTable::parse(&table_bytes, region.end - region.start)?;
        let old = table.find(PARENT_LOCATOR).cloned().ok_or_else(|| {
            Error::corrupt(
                CorruptionKind::InvalidField,
                "metadata table",
                "a differencing image has no parent locator item",
            )
        })?;
        let locator = change(&d.locator.read());
        let item = locator.to_bytes();
        let len = u32::try_from(item.len())
            .map_err(|_| Error::invalid_input("the parent locator is too long"))?;
        let at = table.resize_item(PARENT_LOCATOR, len, region.end - region.start)?;
        let cleared = vec![0u8; old.length as usize];
        let table_bytes = table.to_bytes();
        let ranges: [(u64, &[u8]); 3] = [
            (region.start + u64::from(old.offset), &cleared),
            (region.start, &table_bytes),
            (region.start + u64::from(at), &item),
        ];
        let pages = log::merge_into_pages(&ranges, |page_offset| {
            let mut page = [0u8; BAT_PAGE_LEN];
            read(&mut page, page_offset)?;
            Ok(page)
        })?;
        let mut updates = Vec::new();
        for (file_offset, data) in pages {
            let mut current = [0u8; BAT_PAGE_LEN];
            read(&mut current, file_offset)?;
            if current != *data {
                updates.push(LogUpdate::Page { file_offset, data });
            }
        }
        self.journal_pages(&mut j, &updates, true)?;
        *d.locator.write() = locator;
        Ok(())
    }
}

//! Metadata changes on disk, serialized by the journal mutex: header updates, and BAT and
//! sector bitmap pages written through the log.

use super::*;

/// Everything that changes metadata on disk, serialized.
pub(super) struct Journal {
    pub(super) header: Header,
    pub(super) current_slot: usize,
    pub(super) file_write_guid_changed: bool,
    pub(super) data_write_guid_changed: bool,
    /// Set once this session has installed its own LogGuid.
    pub(super) writer: Option<LogWriter>,
}

impl VhdxDisk {
    /// Before the first user-visible change of a session: new FileWriteGuid and
    /// DataWriteGuid in both headers (FileWriteGuid alone when the identity is kept).
    pub(super) fn begin_user_write(&self) -> Result<()> {
        if self.data_write_started.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut j = self.journal.lock();
        if !j.data_write_guid_changed {
            let keep = self.keep_identity;
            update_header(self.storage.as_ref(), &mut j, |h| {
                if !keep {
                    h.data_write_guid = Uuid::new_v4()
                }
            })?;
            j.data_write_guid_changed = true;
        }
        self.data_write_started.store(true, Ordering::Release);
        Ok(())
    }

    /// Journals and applies BAT entry and sector bitmap page changes: log entry durable,
    /// then the pages in place durable, then the in-memory bitmaps and BAT (bitmaps first,
    /// so a reader that sees a new PARTIALLY_PRESENT entry sees its bits).
    pub(super) fn commit(
        &self,
        j: &mut Journal,
        changes: &[(u64, BatEntry)],
        bitmap_pages: &[BitmapPageChange],
    ) -> Result<()> {
        let encoded: Vec<(u64, [u8; 8])> = changes
            .iter()
            .map(|&(index, entry)| {
                (
                    self.bat_offset + index * BAT_ENTRY_LEN,
                    entry.0.to_le_bytes(),
                )
            })
            .collect();
        let ranges: Vec<(u64, &[u8])> = encoded.iter().map(|(o, b)| (*o, &b[..])).collect();
        let pages =
            {
                let bat = self.bat.read();
                log::merge_into_pages(&ranges, |page_offset| {
                    Ok(bat.page_bytes(
                        ((page_offset - self.bat_offset) / BAT_PAGE_LEN as u64) as usize,
                    ))
                })?
            };
        let updates: Vec<LogUpdate> = pages
            .into_iter()
            .chain(
                bitmap_pages
                    .iter()
                    .map(|change| (change.file_offset, change.contents.clone())),
            )
            .map(|(file_offset, data)| LogUpdate::Page { file_offset, data })
            .collect();
        self.journal_pages(j, &updates, false)?;
        if let Some(d) = &self.differencing {
            let mut bitmaps = d.bitmaps.write();
            for change in bitmap_pages {
                bitmaps.apply_page(change.chunk, change.page, &change.contents);
            }
        }
        let mut bat = self.bat.write();
        for &(index, entry) in changes {
            bat.set(index, entry);
        }
        Ok(())
    }

    /// Writes whole metadata pages through the log: each entry durable, then its pages in
    /// place durable. Updates go in order, as few entries as fit; each entry is atomic.
    /// `atomic` refuses, before writing any, updates that need more than one entry.
    pub(super) fn journal_pages(
        &self,
        j: &mut Journal,
        updates: &[LogUpdate],
        atomic: bool,
    ) -> Result<()> {
        if j.writer.is_none() {
            let unaligned = {
                let mut space = self.allocator.lock();
                let aligned = space.file_end.next_multiple_of(MIB);
                let unaligned = aligned != space.file_end;
                if unaligned {
                    // FlushedFileOffset must be a durable, 1 MiB aligned file size.
                    self.storage
                        .set_len(aligned)
                        .context(|| "extending file to a 1 MiB boundary".to_string())?;
                    space.file_end = aligned;
                }
                unaligned
            };
            if unaligned {
                self.flush_storage()?;
            }
            let log_guid = Uuid::new_v4();
            update_header(self.storage.as_ref(), j, |h| h.log_guid = log_guid)?;
            j.writer = Some(LogWriter::new(
                j.header.log_offset,
                j.header.log_length,
                log_guid,
            ));
        }
        let writer = j.writer.as_mut().unwrap();
        let groups = writer.split(updates);
        if atomic && groups.len() > 1 {
            return Err(Error::unsupported(format!(
                "a metadata change of {} pages does not fit one log entry",
                updates.len()
            )));
        }
        for group in groups {
            // Other writers may be extending the file meanwhile: the entry names the
            // length a flush made durable, and the length that holds every block reserved.
            let (flushed, last) = {
                let space = self.allocator.lock();
                (
                    space.flushed_end - space.flushed_end % MIB,
                    space.file_end.next_multiple_of(MIB),
                )
            };
            writer.write_entry(self.storage.as_ref(), group, flushed, last)?;
            self.flush_storage()?;
            let applied = group.iter().try_for_each(|u| match u {
                LogUpdate::Page { file_offset, data } => self
                    .storage
                    .write_at(&data[..], *file_offset)
                    .context(|| format!("writing metadata page at {file_offset:#x}")),
                LogUpdate::Zero { .. } => unreachable!("metadata changes are whole pages"),
            });
            if let Err(e) = applied.and_then(|_| self.flush_storage()) {
                self.poisoned.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Sets the payload entries of `blocks` to `state` (which holds no data) through the
    /// log, then gives their space back (`give_back`).
    pub(super) fn retire_blocks(
        &self,
        j: &mut Journal,
        blocks: &[u64],
        state: PayloadState,
    ) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        let block_size = self.layout.block_size;
        let mut changes = Vec::with_capacity(blocks.len());
        let mut spaces = Vec::new();
        for &block in blocks {
            let entry = self.bat.read().payload(block);
            if matches!(
                entry.payload_state(),
                Some(PayloadState::FullyPresent | PayloadState::PartiallyPresent)
            ) {
                let len = block_size.min(self.size() - block * block_size);
                spaces.push(entry.file_offset()..entry.file_offset() + len);
            }
            changes.push((self.layout.payload_index(block), BatEntry::new(state, 0)));
        }
        self.give_back(j, &changes, spaces)
    }
}

/// Replaces the current header by the two-step procedure: the changed header goes to the
/// other slot and is flushed, then to the first slot. The first update of a session also
/// installs a new FileWriteGuid.
pub(super) fn update_header(
    storage: &dyn Storage,
    j: &mut Journal,
    change: impl FnOnce(&mut Header),
) -> Result<()> {
    let mut next = j.header.clone();
    change(&mut next);
    if !j.file_write_guid_changed {
        next.file_write_guid = Uuid::new_v4();
    }
    for _ in 0..2 {
        next.sequence_number = j.header.sequence_number.checked_add(1).ok_or_else(|| {
            Error::corrupt(
                CorruptionKind::InvalidField,
                "header",
                "sequence number exhausted",
            )
        })?;
        let slot = 1 - j.current_slot;
        storage
            .write_at(&next.to_bytes(), HEADER_OFFSETS[slot])
            .context(|| format!("writing header {}", slot + 1))?;
        storage
            .flush()
            .context(|| format!("flushing header {}", slot + 1))?;
        j.header = next.clone();
        j.current_slot = slot;
    }
    j.file_write_guid_changed = true;
    Ok(())
}

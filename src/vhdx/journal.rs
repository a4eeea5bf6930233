//! Metadata changes on disk, serialized by the journal mutex: header updates, file
//! extension, and BAT and sector bitmap pages written through the log.

use super::*;

/// Everything that changes metadata on disk, serialized.
pub(super) struct Journal {
    pub(super) header: Header,
    pub(super) current_slot: usize,
    pub(super) file_write_guid_changed: bool,
    pub(super) data_write_guid_changed: bool,
    /// Set once this session has installed its own LogGuid.
    pub(super) writer: Option<LogWriter>,
    /// File length; 1 MiB aligned once this session has changed metadata.
    pub(super) file_end: u64,
    /// File space before `file_end` that nothing uses: gaps found at open and blocks
    /// released since.
    pub(super) free: FreeSpace,
}

impl VhdxDisk {
    /// Before the first user-visible change of a session: new FileWriteGuid and
    /// DataWriteGuid in both headers.
    pub(super) fn begin_user_write(&self) -> Result<()> {
        if self.data_write_started.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut j = self.journal.lock();
        if !j.data_write_guid_changed {
            update_header(self.storage.as_ref(), &mut j, |h| {
                h.data_write_guid = Uuid::new_v4()
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
        self.log_pages(j, &updates)?;
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

    /// Writes whole-page metadata updates through the log: each entry durable, then its
    /// pages in place durable. The first change of a session installs a fresh LogGuid.
    pub(super) fn log_pages(&self, j: &mut Journal, updates: &[LogUpdate]) -> Result<()> {
        if j.writer.is_none() {
            let aligned = j.file_end.next_multiple_of(MIB);
            if aligned != j.file_end {
                // FlushedFileOffset must be a durable, 1 MiB aligned file size.
                self.storage
                    .set_len(aligned)
                    .context(|| "extending file to a 1 MiB boundary".to_string())?;
                self.storage
                    .flush()
                    .context(|| "flushing file extension".to_string())?;
                j.file_end = aligned;
            }
            let log_guid = Uuid::new_v4();
            update_header(self.storage.as_ref(), j, |h| h.log_guid = log_guid)?;
            j.writer = Some(LogWriter::new(
                j.header.log_offset,
                j.header.log_length,
                log_guid,
            ));
        }
        let file_end = j.file_end;
        let writer = j.writer.as_mut().unwrap();
        for group in writer.split(updates) {
            writer.write_entry(self.storage.as_ref(), group, file_end, file_end)?;
            self.storage
                .flush()
                .context(|| "flushing log entry".to_string())?;
            let applied = group.iter().try_for_each(|u| match u {
                LogUpdate::Page { file_offset, data } => self
                    .storage
                    .write_at(&data[..], *file_offset)
                    .context(|| format!("writing metadata page at {file_offset:#x}")),
                LogUpdate::Zero { .. } => unreachable!("metadata changes are whole pages"),
            });
            if let Err(e) = applied.and_then(|_| {
                self.storage
                    .flush()
                    .context(|| "flushing metadata pages".to_string())
            }) {
                self.poisoned.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Reserves `len` bytes reading as zeros at a 1 MiB boundary, in free space if some
    /// fits (cleared first), else past the end of the file; returns where they start.
    pub(super) fn allocate_space(&self, j: &mut Journal, len: u64, what: &str) -> Result<u64> {
        let Some(at) = j.free.take(len, &self.space, |free| {
            aligned_place(free, len, 0, MIB, MIB)
        }) else {
            return self.extend_file(j, len, what);
        };
        let cleared = storage::zero_range(self.storage.as_ref(), at, len, true)
            .context(|| format!("clearing reused space at {at:#x} for {what}"));
        if let Err(e) = cleared {
            j.free.insert(at..at + len);
            return Err(e);
        }
        Ok(at)
    }

    /// Reserves `len` bytes at the next 1 MiB boundary past the end of the file (reading
    /// as zeros) and returns where they start.
    fn extend_file(&self, j: &mut Journal, len: u64, what: &str) -> Result<u64> {
        let start = j.file_end.next_multiple_of(MIB);
        let end = start
            .checked_add(len)
            .ok_or_else(|| Error::invalid_input("image file would exceed the largest offset"))?;
        self.storage
            .set_len(end)
            .context(|| format!("extending file for {what}"))?;
        j.file_end = end;
        Ok(start)
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

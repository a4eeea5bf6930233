//! Log replay at open: into the file for read/write opens, or into an in-memory view of
//! the replayed file for read-only ones, which must leave the file untouched.

use super::*;

/// The replayed view of a dirty image opened read-only: the log's updates laid over the
/// file, which is taken as extended to the log's LastFileOffset.
#[derive(Debug)]
pub(super) struct Overlay {
    pub(super) updates: Vec<LogUpdate>,
    pub(super) physical_len: u64,
    pub(super) logical_len: u64,
}

impl Overlay {
    pub(super) fn read(&self, storage: &dyn Storage, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.logical_len)
            .ok_or_else(|| {
                Error::corrupt(
                    CorruptionKind::OutOfBounds,
                    "image",
                    format!("read at {offset:#x} past end of file"),
                )
            })?;
        let in_file = self
            .physical_len
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize;
        if in_file > 0 {
            storage
                .read_at(&mut buf[..in_file], offset)
                .context(|| format!("reading {} bytes at {offset:#x}", buf.len()))?;
        }
        buf[in_file..].fill(0);
        for update in &self.updates {
            let (start, len) = (update.file_offset(), update.covered_len());
            let (lo, hi) = (start.max(offset), (start + len).min(end));
            if lo >= hi {
                continue;
            }
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match update {
                LogUpdate::Page { data, .. } => {
                    dst.copy_from_slice(&data[(lo - start) as usize..(hi - start) as usize])
                }
                LogUpdate::Zero { .. } => dst.fill(0),
            }
        }
        Ok(())
    }
}

/// Reads metadata at open: from the file, or through the replayed view when the log was
/// replayed in memory.
pub(super) fn read_structure(
    storage: &dyn Storage,
    overlay: Option<&Overlay>,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<()> {
    match overlay {
        Some(overlay) => overlay.read(storage, buf, offset),
        None => storage
            .read_at(buf, offset)
            .context(|| format!("reading {what} at {offset:#x}")),
    }
}

/// Replays a dirty log: into the file for read/write opens, or into the returned overlay
/// for read-only ones, which must leave the file untouched. `None` when the log holds no
/// valid sequence, which the specification says to take as empty.
pub(super) fn replay_log(
    storage: &dyn Storage,
    journal: &Journal,
    file_len: u64,
) -> Result<Option<Overlay>> {
    let h = &journal.header;
    if !h.log_is_dirty() {
        return Ok(None);
    }
    let ring = log::read_ring(storage, h.log_offset, h.log_length)?;
    let Some(sequence) = log::find_active_sequence(&ring, h.log_guid)? else {
        return Ok(None);
    };
    log::check_sequence_against_file(&sequence, file_len)?;
    let logical_len = file_len.max(sequence.head().last_file_offset);
    let mut updates = Vec::new();
    for entry in sequence.entries {
        for update in entry.updates {
            if update.file_offset() + update.covered_len() > logical_len {
                return Err(Error::corrupt(
                    CorruptionKind::OutOfBounds,
                    format!("log entry {}", entry.sequence),
                    format!(
                        "update at {:#x} lies past the end of the file",
                        update.file_offset()
                    ),
                ));
            }
            updates.push(update);
        }
    }
    Ok(Some(Overlay {
        updates,
        physical_len: file_len,
        logical_len,
    }))
}

/// Replays the log's updates into the file, then marks the log empty. The header update
/// before replay keeps the LogGuid, so a crash during replay leaves the log replayable.
pub(super) fn replay_to_file(
    storage: &dyn Storage,
    j: &mut Journal,
    replay: &Overlay,
) -> Result<()> {
    update_header(storage, j, |_| {})?;
    for update in &replay.updates {
        match update {
            LogUpdate::Page { file_offset, data } => storage
                .write_at(&data[..], *file_offset)
                .context(|| format!("replaying log page to {file_offset:#x}"))?,
            // Past the end of the file is zeros already, or will be once the file is
            // extended below: only what the file holds is written, whatever length a
            // damaged entry claims.
            LogUpdate::Zero {
                file_offset,
                length,
            } => {
                let file_len = storage
                    .len()
                    .context(|| "cannot read file size".to_string())?;
                let end = (file_offset + length).min(file_len);
                if end > *file_offset {
                    write_zeros(storage, *file_offset, end - file_offset)
                        .context(|| format!("replaying log zeros to {file_offset:#x}"))?;
                }
            }
        }
    }
    let len = storage
        .len()
        .context(|| "cannot read file size".to_string())?;
    if len < replay.logical_len {
        storage
            .set_len(replay.logical_len)
            .context(|| "extending file to the log's LastFileOffset".to_string())?;
    }
    storage
        .flush()
        .context(|| "flushing replayed log".to_string())?;
    update_header(storage, j, |h| h.log_guid = Uuid::nil())
}

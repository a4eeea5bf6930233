//! The image file's space: where new blocks go (free ranges first, then past the end),
//! and flushes, which also tell the log how long a file a crash can no longer shorten.

use super::*;

/// The file's length and the space in it that nothing uses, under the allocator mutex,
/// which is held only to take or give back space.
pub(super) struct Allocator {
    /// File length; 1 MiB aligned once this session has changed metadata.
    pub(super) file_end: u64,
    /// A file length that a flush made durable: a log entry may name it as the length the
    /// file has at least, even while other writers extend the file.
    pub(super) flushed_end: u64,
    /// File space before `file_end` that nothing uses: gaps found at open, blocks released
    /// since, and space reserved by writes that failed before their change was committed.
    pub(super) free: FreeSpace,
}

impl VhdxDisk {
    /// Reserves `len` bytes reading as zeros at a 1 MiB boundary, in free space if some
    /// fits (cleared first, outside the lock), else past the end of the file; returns
    /// where they start.
    pub(super) fn allocate_space(&self, len: u64, what: &str) -> Result<u64> {
        let at = {
            let mut space = self.allocator.lock();
            let taken = space.free.take(len, &self.space, |free| {
                aligned_place(free, len, 0, MIB, MIB)
            });
            match taken {
                Some(at) => at,
                None => return self.extend_file(&mut space, len, what),
            }
        };
        let cleared = storage::zero_range(self.storage.as_ref(), at, len, true)
            .context(|| format!("clearing reused space at {at:#x} for {what}"));
        if let Err(e) = cleared {
            self.unreserve(std::iter::once(at..at + len));
            return Err(e);
        }
        Ok(at)
    }

    /// Reserves `len` bytes at the next 1 MiB boundary past the end of the file (reading
    /// as zeros) and returns where they start.
    fn extend_file(&self, space: &mut Allocator, len: u64, what: &str) -> Result<u64> {
        let start = space.file_end.next_multiple_of(MIB);
        let end = start
            .checked_add(len)
            .ok_or_else(|| Error::invalid_input("image file would exceed the largest offset"))?;
        self.storage
            .set_len(end)
            .context(|| format!("extending file for {what}"))?;
        space.file_end = end;
        Ok(start)
    }

    /// Space reserved by `allocate_space` that no metadata ever named, and no I/O but the
    /// reserver's reached: free again at once.
    pub(super) fn unreserve(&self, ranges: impl IntoIterator<Item = Range<u64>>) {
        let mut space = self.allocator.lock();
        for range in ranges {
            space.free.insert(range);
        }
    }

    /// Makes every write completed before the call durable. Callers flush side by side:
    /// the kernel writes back what each needs and merges their cache flushes, and one that
    /// waited for a flush running already (which began before its writes ended) would
    /// wait for two.
    pub(super) fn flush_storage(&self) -> Result<()> {
        // A length set before the flush starts is durable once it ends.
        let end = self.allocator.lock().file_end;
        self.storage
            .flush()
            .context(|| "flushing the image file".to_string())?;
        let mut space = self.allocator.lock();
        space.flushed_end = space.flushed_end.max(end);
        Ok(())
    }
}

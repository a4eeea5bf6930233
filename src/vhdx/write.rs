//! Writes: in place where the block already holds the sectors in this file, otherwise
//! allocating blocks and sector bitmap bits under a claim, data first and flushed, then
//! journaled in a group with the changes of other writers.

use super::*;

/// The metadata changes of one write, or of a group of writes committed together.
#[derive(Default)]
pub(super) struct Change {
    /// Sector bitmap blocks new to their chunk, committed before the entries: a
    /// PARTIALLY_PRESENT entry must never be durable before its chunk's bitmap entry.
    new_bitmaps: Vec<(u64, BatEntry)>,
    /// Payload entries.
    entries: Vec<(u64, BatEntry)>,
    bits: BitAssignments,
}

impl Change {
    /// Adds another write's change; writes change disjoint entries and bits (each holds
    /// a claim on its blocks).
    fn absorb(&mut self, other: Change) {
        self.new_bitmaps.extend(other.new_bitmaps);
        self.entries.extend(other.entries);
        for (chunk, assign) in other.bits {
            for (sectors, value) in assign {
                add_bits(&mut self.bits, chunk, sectors, value);
            }
        }
    }
}

impl VhdxDisk {
    /// Writes pieces that need metadata changes, once it holds a claim on every entry they
    /// change; while another writer holds one, waits for it and looks again.
    pub(super) fn write_allocating(&self, pieces: &[(u64, u64, &[u8])]) -> Result<()> {
        let mut pieces = pieces.to_vec();
        loop {
            // Another writer may have allocated a block, or set its bits, meanwhile.
            let mut left = Vec::with_capacity(pieces.len());
            for (block, in_block, data) in pieces {
                if !self.write_in_place(data, block, in_block)? {
                    left.push((block, in_block, data));
                }
            }
            pieces = left;
            if pieces.is_empty() {
                return Ok(());
            }
            let Some(claim) = self.claims.claim(self.entries_changed(&pieces)) else {
                continue;
            };
            // The claimed entries cannot change any more, but what the pieces need was
            // seen before: go on only if the claim still covers it.
            if self
                .entries_changed(&pieces)
                .iter()
                .all(|entry| claim.covers(entry.start))
            {
                return self.write_claimed(&pieces);
            }
        }
    }

    /// The BAT entries that writing `pieces` would change: each block's, and the sector
    /// bitmap entry of a child's chunk that a new block needs and that has none.
    fn entries_changed(&self, pieces: &[(u64, u64, &[u8])]) -> Vec<Range<u64>> {
        let bat = self.bat.read();
        let mut entries = Vec::with_capacity(pieces.len());
        for &(block, _, _) in pieces {
            let index = self.layout.payload_index(block);
            entries.push(index..index + 1);
            let needs_bitmap = self.differencing.is_some()
                && bat.payload(block).payload_state() == Some(PayloadState::NotPresent)
                && bat.sector_bitmap(block).payload_state() != Some(PayloadState::FullyPresent);
            if needs_bitmap {
                let index = self.layout.sector_bitmap_index(block);
                entries.push(index..index + 1);
            }
        }
        entries
    }

    /// Allocates blocks (and sector bitmap blocks) for `pieces`, whose entries the caller
    /// has claimed, writes their data, and commits the change with whatever other writers
    /// queued meanwhile. Space of a write that fails before its change is queued is free
    /// again at once: nothing names it.
    fn write_claimed(&self, pieces: &[(u64, u64, &[u8])]) -> Result<()> {
        let mut change = Change::default();
        let mut reserved = Vec::new();
        if let Err(e) = self.write_reserving(pieces, &mut change, &mut reserved) {
            self.unreserve(reserved);
            return Err(e);
        }
        if change.entries.is_empty() && change.bits.is_empty() {
            return Ok(());
        }
        self.commits.commit(Some(change), |changes| {
            let group = changes
                .into_iter()
                .fold(Change::default(), |mut group, change| {
                    group.absorb(change);
                    group
                });
            self.commit_group(group)
        })
    }

    /// Writes each piece, into space reserved for it (listed in `reserved`) if its block
    /// has none, and records the metadata change it needs. The claim keeps a block that
    /// has space where it is: a discard would have to claim it first.
    fn write_reserving(
        &self,
        pieces: &[(u64, u64, &[u8])],
        change: &mut Change,
        reserved: &mut Vec<Range<u64>>,
    ) -> Result<()> {
        let layout = self.layout;
        let mut reserve = |len: u64, what: &str| -> Result<u64> {
            let at = self.allocate_space(len, what)?;
            reserved.push(at..at + len);
            Ok(at)
        };
        for &(block, in_block, data) in pieces {
            if self.write_in_place(data, block, in_block)? {
                continue;
            }
            let (index, entry) = {
                let bat = self.bat.read();
                (layout.payload_index(block), bat.payload(block))
            };
            let written = in_block..in_block + data.len() as u64;
            match (entry.payload_state(), &self.differencing) {
                (Some(PayloadState::PartiallyPresent), Some(d)) => {
                    self.write_sectors(d, block, entry.file_offset(), in_block, data, false)?;
                    let (chunk, sectors, _) = self.sector_bits(block, &written);
                    add_bits(&mut change.bits, chunk, sectors, true);
                }
                (Some(PayloadState::NotPresent), Some(d)) => {
                    let start = reserve(layout.block_size, "a block")?;
                    self.write_sectors(d, block, start, in_block, data, true)?;
                    let (chunk, sectors, base) = self.sector_bits(block, &written);
                    // Bits of a block that had no data mean nothing: start from clear.
                    let per_block = layout.block_size / u64::from(self.params.logical_sector_size);
                    add_bits(&mut change.bits, chunk, base..base + per_block, false);
                    add_bits(&mut change.bits, chunk, sectors, true);
                    let has_bitmap = self.bat.read().sector_bitmap(block).payload_state()
                        == Some(PayloadState::FullyPresent);
                    let bitmap_index = layout.sector_bitmap_index(block);
                    if !has_bitmap && !change.new_bitmaps.iter().any(|(i, _)| *i == bitmap_index) {
                        let at = reserve(MIB, "a sector bitmap")?;
                        change
                            .new_bitmaps
                            .push((bitmap_index, BatEntry::new(PayloadState::FullyPresent, at)));
                    }
                    change
                        .entries
                        .push((index, BatEntry::new(PayloadState::PartiallyPresent, start)));
                }
                // Blocks that read as zeros: reserved space reads as zeros, so the block
                // holds exactly what it must once the data is in.
                _ => {
                    let start = reserve(layout.block_size, "a block")?;
                    self.write_payload(data, start + in_block)?;
                    change
                        .entries
                        .push((index, BatEntry::new(PayloadState::FullyPresent, start)));
                }
            }
        }
        Ok(())
    }

    /// Commits a group of writes' changes: one flush makes all their data durable, then
    /// new sector bitmap blocks are journaled, and after them the payload entries and
    /// bitmap bits, each set in one log entry as far as it fits.
    fn commit_group(&self, group: Change) -> Result<()> {
        self.flush_storage()?;
        let mut j = self.journal.lock();
        if !group.new_bitmaps.is_empty() {
            self.commit(&mut j, &group.new_bitmaps, &[])?;
        }
        // Pages from the bitmaps as they are now, under the journal lock, so the bits of
        // every write in the group (and of earlier groups) land in them.
        let pages = match &self.differencing {
            Some(d) => self.bitmap_changes(d, &group.bits),
            None => Vec::new(),
        };
        self.commit(&mut j, &group.entries, &pages)
    }

    /// The sector bitmap pages that change when `bits` are assigned, each where it lies in
    /// its chunk's bitmap block (which must have one).
    pub(super) fn bitmap_changes(
        &self,
        d: &Differencing,
        bits: &BitAssignments,
    ) -> Vec<BitmapPageChange> {
        let bat = self.bat.read();
        let bitmaps = d.bitmaps.read();
        let mut pages = Vec::new();
        for (chunk, assign) in bits {
            let at = bat
                .sector_bitmap(chunk * self.layout.chunk_ratio)
                .file_offset();
            for (page, contents) in bitmaps.changed_pages(*chunk, assign) {
                pages.push(BitmapPageChange {
                    chunk: *chunk,
                    page,
                    file_offset: at + page * BAT_PAGE_LEN as u64,
                    contents,
                });
            }
        }
        pages
    }

    /// The bits of the blocks of `blocks` that have any set, to be cleared.
    pub(super) fn clearing_bits(
        &self,
        d: &Differencing,
        blocks: impl Iterator<Item = u64>,
    ) -> BitAssignments {
        let mut bits = Vec::new();
        let whole_block = 0..self.layout.block_size;
        for block in blocks {
            if self
                .sector_runs(d, block, &whole_block)
                .iter()
                .any(|&(_, set)| set)
            {
                let (chunk, sectors, _) = self.sector_bits(block, &whole_block);
                add_bits(&mut bits, chunk, sectors, false);
            }
        }
        bits
    }

    /// Writes `data` where block `block` already keeps it in this file; `false` when the
    /// write needs metadata changes first.
    pub(super) fn write_in_place(&self, data: &[u8], block: u64, in_block: u64) -> Result<bool> {
        let _pin = self.space.pin();
        let entry = self.bat.read().payload(block);
        match (entry.payload_state(), &self.differencing) {
            (Some(PayloadState::FullyPresent), _) => {}
            (Some(PayloadState::PartiallyPresent), Some(d)) => {
                let written = in_block..in_block + data.len() as u64;
                if self
                    .sector_runs(d, block, &written)
                    .iter()
                    .any(|(_, present)| !present)
                {
                    return Ok(false);
                }
            }
            (Some(PayloadState::PartiallyPresent), None) => {
                return Err(self.partially_present(block));
            }
            _ => return Ok(false),
        }
        self.write_payload(data, entry.file_offset() + in_block)?;
        Ok(true)
    }

    /// Writes `data` at `in_block` of a child's block stored at `file_start`, filling the
    /// rest of its first and last sectors with the parent's bytes where those sectors are
    /// still the parent's (all of them if `all_parent`), so whole sectors can become this
    /// file's.
    pub(super) fn write_sectors(
        &self,
        d: &Differencing,
        block: u64,
        file_start: u64,
        in_block: u64,
        data: &[u8],
        all_parent: bool,
    ) -> Result<()> {
        let sector = u64::from(self.params.logical_sector_size);
        let end = in_block + data.len() as u64;
        let parents = |at: u64| all_parent || !self.sector_runs(d, block, &(at..at + 1))[0].1;
        let head = in_block - in_block % sector;
        let start = if head < in_block && parents(head) {
            head
        } else {
            in_block
        };
        let tail = end.next_multiple_of(sector);
        let stop = if tail > end && parents(end - end % sector) {
            tail
        } else {
            end
        };
        if (start, stop) == (in_block, end) {
            return self.write_payload(data, file_start + in_block);
        }
        let block_start = block * self.layout.block_size;
        let merged = copy_up(
            d.parent.as_ref(),
            block_start + start..block_start + stop,
            block_start + in_block,
            data,
        )?;
        self.write_payload(&merged, file_start + start)
    }

    /// The chunk of `block`, the bitmap bits of the sectors that the byte range `bytes`
    /// of the block touches, and the block's first bit.
    pub(super) fn sector_bits(&self, block: u64, bytes: &Range<u64>) -> (u64, Range<u64>, u64) {
        let sector = u64::from(self.params.logical_sector_size);
        let ratio = self.layout.chunk_ratio;
        let base = (block % ratio) * (self.layout.block_size / sector);
        (
            block / ratio,
            base + bytes.start / sector..base + bytes.end.div_ceil(sector),
            base,
        )
    }

    /// Splits `bytes` (offsets inside `block`) into runs held by this file (`true`) or by
    /// the parent, as the block's sector bitmap says.
    pub(super) fn sector_runs(
        &self,
        d: &Differencing,
        block: u64,
        bytes: &Range<u64>,
    ) -> Vec<(Range<u64>, bool)> {
        let sector = u64::from(self.params.logical_sector_size);
        let (chunk, bits, base) = self.sector_bits(block, bytes);
        d.bitmaps
            .read()
            .runs(chunk, bits)
            .into_iter()
            .map(|(run, present)| {
                (
                    ((run.start - base) * sector).max(bytes.start)
                        ..((run.end - base) * sector).min(bytes.end),
                    present,
                )
            })
            .collect()
    }

    pub(super) fn write_payload(&self, data: &[u8], file_offset: u64) -> Result<()> {
        self.storage
            .write_at(data, file_offset)
            .context(|| format!("writing {} bytes at {file_offset:#x}", data.len()))
    }
}

/// A sector bitmap page to journal: its new contents and where it goes.
pub(super) struct BitmapPageChange {
    pub(super) chunk: u64,
    pub(super) page: u64,
    pub(super) file_offset: u64,
    pub(super) contents: BitmapPage,
}

/// Per chunk, sector ranges and the value their bits take, later ranges winning.
pub(super) type BitAssignments = Vec<(u64, Vec<(Range<u64>, bool)>)>;

/// Records that `sectors` (bits of `chunk`) take `value`; later records win.
fn add_bits(bits: &mut BitAssignments, chunk: u64, sectors: Range<u64>, value: bool) {
    match bits.iter_mut().find(|(c, _)| *c == chunk) {
        Some((_, assign)) => assign.push((sectors, value)),
        None => bits.push((chunk, vec![(sectors, value)])),
    }
}

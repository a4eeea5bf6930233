//! What checking a VHDX adds to an open (which reports damaged copies, bad BAT entries and
//! a dirty log through its `Problems`): entry states the image type forbids, and the
//! repairs of what the checks found. Every repair goes through the paths writes take: a
//! header through the two-slot update, region tables, BAT entries and the parent locator
//! through the log.

use super::*;
use crate::layer::StoredParentPaths;

impl VhdxDisk {
    /// What an open does not look at: PARTIALLY_PRESENT blocks in an image without a
    /// parent (refused only when read), sector bitmap bits of a child's NOT_PRESENT
    /// blocks, and a fixed image's blocks that are not allocated.
    pub fn check_more(&self, findings: &mut Vec<Finding>) {
        if let Some(d) = &self.differencing {
            let stale = self.clearing_bits(d, self.blocks_reading_the_parent());
            let blocks: usize = stale.iter().map(|(_, ranges)| ranges.len()).sum();
            if blocks > 0 {
                findings.push(Finding::corruption(
                    CorruptionKind::InvalidField,
                    "sector bitmaps",
                    None,
                    format!(
                        "bits are set for {blocks} NOT_PRESENT blocks: the format reads \
                         those blocks from the parent, but libvhdi reads the sectors whose \
                         bits are set from the file"
                    ),
                    Fix::ClearStaleBits,
                ));
            }
        }
        let bat = self.bat.read();
        let layout = self.layout;
        let mut unallocated = 0;
        for block in 0..layout.payload_blocks {
            let entry = bat.payload(block);
            match entry.payload_state() {
                Some(PayloadState::PartiallyPresent) if self.differencing.is_none() => {
                    let index = layout.payload_index(block);
                    findings.push(Finding::from_error(
                        &self.partially_present(block),
                        Some(self.bat_offset + index * BAT_ENTRY_LEN),
                        Fix::GiveUp {
                            entry: index,
                            disk_start: block * layout.block_size,
                            disk_end: ((block + 1) * layout.block_size).min(self.size()),
                        },
                    ));
                }
                Some(PayloadState::FullyPresent) => {}
                _ => unallocated += 1,
            }
        }
        if self.params.leave_blocks_allocated && self.differencing.is_none() && unallocated > 0 {
            findings.push(Finding::info(
                "BAT",
                Some(self.bat_offset),
                format!(
                    "{unallocated} of the {} blocks of this fixed image are not allocated",
                    layout.payload_blocks
                ),
                Fix::None,
            ));
        }
    }

    /// Applies `fixes` to an image opened for writing as a check opens it (bad entries
    /// taken as naming nothing), whose log the open replayed; returns what was done.
    pub fn repair(&self, fixes: &[&Fix]) -> Result<Vec<String>> {
        self.check_writable()?;
        let mut done = Vec::new();
        if fixes.contains(&&Fix::RewriteCopy) {
            done.extend(self.rewrite_copies()?);
        }
        if fixes.contains(&&Fix::ReplayLog) {
            done.push("log replayed".to_string());
        }
        let given_up: Vec<u64> = fixes
            .iter()
            .filter_map(|fix| match fix {
                Fix::GiveUp { entry, .. } => Some(*entry),
                _ => None,
            })
            .collect();
        if !given_up.is_empty() {
            // Blocks reading zeros instead of their data is a change children would see.
            self.begin_user_write()?;
            let changes: Vec<(u64, BatEntry)> = given_up
                .iter()
                .map(|&index| (index, self.layout.naming_nothing(index)))
                .collect();
            self.commit(&mut self.journal.lock(), &changes, &[])?;
        }
        if let Some(d) = &self.differencing
            && fixes.contains(&&Fix::ClearStaleBits)
        {
            let bits = self.clearing_bits(d, self.blocks_reading_the_parent());
            let blocks: usize = bits.iter().map(|(_, ranges)| ranges.len()).sum();
            if blocks > 0 {
                let pages = self.bitmap_changes(d, &bits);
                self.commit(&mut self.journal.lock(), &[], &pages)?;
                done.push(format!("sector bitmap bits of {blocks} blocks cleared"));
            }
        }
        Ok(done)
    }

    /// The blocks of a child that read their parent whatever their sector bitmap says.
    fn blocks_reading_the_parent(&self) -> impl Iterator<Item = u64> {
        let bat = self.bat.read();
        let blocks: Vec<u64> = (0..self.layout.payload_blocks)
            .filter(|&b| bat.payload(b).payload_state() == Some(PayloadState::NotPresent))
            .collect();
        blocks.into_iter()
    }

    /// Writes a damaged header again (both slots, as every header update does) and a
    /// damaged or differing region table from the one readers use (through the log).
    fn rewrite_copies(&self) -> Result<Vec<String>> {
        let storage = self.storage.as_ref();
        let mut done = Vec::new();
        let mut j = self.journal.lock();
        let mut slot = [0u8; HEADER_LEN];
        for (i, at) in HEADER_OFFSETS.into_iter().enumerate() {
            storage
                .read_at(&mut slot, at)
                .context(|| format!("reading header {}", i + 1))?;
            if Header::parse(&slot, "header").is_err() {
                update_header(storage, &mut j, |_| {})?;
                done.push(format!("header {} rewritten", i + 1));
                break;
            }
        }
        let mut copies = [vec![0u8; REGION_TABLE_LEN], vec![0u8; REGION_TABLE_LEN]];
        for (copy, at) in copies.iter_mut().zip(REGION_TABLE_OFFSETS) {
            storage
                .read_at(copy, at)
                .context(|| format!("reading the region table at {at:#x}"))?;
        }
        let good = match RegionTable::parse(&copies[0], "region table 1") {
            Ok(_) => 0,
            Err(_) => 1,
        };
        let other = 1 - good;
        if copies[good] != copies[other] {
            let updates: Vec<LogUpdate> = copies[good]
                .chunks_exact(BAT_PAGE_LEN)
                .enumerate()
                .map(|(page, bytes)| LogUpdate::Page {
                    file_offset: REGION_TABLE_OFFSETS[other] + (page * BAT_PAGE_LEN) as u64,
                    data: Box::new(bytes.try_into().expect("whole pages")),
                })
                .collect();
            self.journal_pages(&mut j, &updates, false)?;
            done.push(format!(
                "region table {} rewritten from region table {}",
                other + 1,
                good + 1
            ));
        }
        Ok(done)
    }

    /// Writes the parent locator again naming the parent at `paths`, through the log.
    pub fn rewrite_parent_paths(&self, paths: &StoredParentPaths) -> Result<String> {
        self.check_writable()?;
        let Some(d) = &self.differencing else {
            return Err(Error::invalid_input("not a differencing image"));
        };
        self.replace_parent_locator(d, |locator| locator.with_paths(paths))?;
        Ok(format!(
            "parent locator rewritten: relative_path {}",
            paths.relative
        ))
    }
}

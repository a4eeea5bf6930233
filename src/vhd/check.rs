//! What checking a VHD adds to an open (which reports a damaged trailing footer and bad
//! BAT entries through its `Problems`): the footer copy at offset 0, which an open never
//! reads while the trailing footer is sound; and the repairs of what the checks found.

use super::*;
use crate::layer::StoredParentPaths;

impl VhdDisk {
    /// The footer copy at offset 0 of a dynamic or differencing disk must be a sound copy
    /// of the footer in use: qemu reads that copy rather than the trailing footer.
    pub fn check_more(&self, findings: &mut Vec<Finding>) -> Result<()> {
        if self.dynamic.is_none() {
            return Ok(());
        }
        let mut copy = [0u8; FOOTER_SIZE];
        self.storage
            .read_at(&mut copy, 0)
            .context(|| "reading the VHD footer copy at offset 0".to_string())?;
        const COPY: &str = "VHD footer copy";
        match Footer::parse(&copy, COPY) {
            Ok(footer) if footer == self.footer => {}
            Ok(_) => findings.push(Finding::corruption(
                CorruptionKind::InvalidField,
                COPY,
                Some(0),
                "differs from the footer at the end of the file",
                Fix::RewriteCopy,
            )),
            Err(e) => findings.push(Finding::from_error(&e, Some(0), Fix::RewriteCopy)),
        }
        Ok(())
    }

    /// Applies `fixes` to a disk opened for writing as a check opens it (bad entries
    /// taken as unallocated); returns what was done.
    pub fn repair(&self, fixes: &[&Fix]) -> Result<Vec<String>> {
        self.check_writable()?;
        let mut done = Vec::new();
        let Some(d) = &self.dynamic else {
            return Ok(done);
        };
        if fixes.contains(&&Fix::RewriteCopy) {
            done.push(self.rewrite_footer(d)?);
        }
        let given_up: Vec<(u64, u64, u64)> = fixes
            .iter()
            .filter_map(|fix| match fix {
                Fix::GiveUp {
                    entry,
                    disk_start,
                    disk_end,
                } => Some((*entry, *disk_start, *disk_end)),
                _ => None,
            })
            .collect();
        if !given_up.is_empty() {
            let entries: Vec<(u64, u32)> =
                given_up.iter().map(|&(b, ..)| (b, UNALLOCATED)).collect();
            self.write_bat_entries(d, &entries, "giving up")?;
            // An unallocated block of a child reads its parent: zeros written over it
            // take a block of their own.
            if d.differencing.is_some() {
                for &(_, start, end) in &given_up {
                    storage::zero_chunks(start, end - start, |zeros, at| self.write_at(zeros, at))?;
                }
                self.flush()?;
            }
        }
        Ok(done)
    }

    /// Writes the footer in use where a copy of it is damaged, missing or different: over
    /// a damaged trailing footer (one that still has its cookie), else after everything
    /// the file holds; and at offset 0. The good copy stays untouched until the other is
    /// durable, so the disk opens at every instant.
    fn rewrite_footer(&self, d: &Dynamic) -> Result<String> {
        let storage = self.storage.as_ref();
        let file_len = storage
            .len()
            .context(|| "reading the file size".to_string())?;
        let mut trailing = Vec::new();
        locate_footer(storage, file_len, &mut Problems::Record(&mut trailing))?;
        let footer_bytes = *self.footer_bytes.lock();
        let done = if trailing.is_empty() {
            storage
                .write_at(&footer_bytes, 0)
                .context(|| "writing the footer copy at offset 0".to_string())?;
            "VHD footer copy at offset 0 rewritten".to_string()
        } else {
            let last = file_len.saturating_sub(FOOTER_SIZE as u64);
            let mut cookie = [0u8; 8];
            storage
                .read_at(&mut cookie, last)
                .context(|| "reading the end of the file".to_string())?;
            let at = match &cookie == footer::COOKIE {
                true => last,
                false => file_len.max(d.structures_end()),
            }
            .next_multiple_of(SECTOR);
            storage
                .write_at(&footer_bytes, at)
                .context(|| format!("writing the footer at {at:#x}"))?;
            format!("VHD footer at {at:#x} rewritten from the copy at offset 0")
        };
        storage
            .flush()
            .context(|| "flushing the footer".to_string())?;
        Ok(done)
    }

    /// Names the parent at `paths` (its file name `name`), as Hyper-V does when it finds a
    /// parent moved. The dynamic header has no second copy to fall back on while it is
    /// rewritten in place, so the new header and its locator data go where the footer is,
    /// a footer past them first; only once they are durable does the trailing footer (one
    /// sector) point at the new header, then the copy at offset 0. The old header stays
    /// whole until then, so the disk opens at every instant.
    pub fn rewrite_parent_paths(&self, name: &str, paths: &StoredParentPaths) -> Result<String> {
        self.check_writable()?;
        let Some(d) = self.dynamic.as_ref().filter(|d| d.differencing.is_some()) else {
            return Err(Error::invalid_input("not a differencing disk"));
        };
        let storage = self.storage.as_ref();
        let mut allocator = d.allocator.lock();
        let mut bytes = [0u8; HEADER_SIZE];
        storage
            .read_at(&mut bytes, self.footer.data_offset)
            .context(|| "reading the VHD dynamic header".to_string())?;
        let mut header = DynamicHeader::parse(&bytes)?;
        let header_at = allocator.next_block;
        let header_end = header_at + HEADER_SIZE as u64;
        let (data, end) =
            header.name_parent(name, &paths.relative, &paths.vhd_absolute(), header_end)?;
        let footer_at = end.next_multiple_of(SECTOR);
        let context = |step: &str| format!("rewriting the parent's paths: {step}");
        storage
            .write_at(&*self.footer_bytes.lock(), footer_at)
            .context(|| context("writing the footer at the new end"))?;
        storage
            .flush()
            .context(|| context("flushing the new footer"))?;
        storage
            .write_at(&header.serialize(), header_at)
            .context(|| context("writing the new dynamic header"))?;
        for (at, bytes) in &data {
            storage
                .write_at(bytes, *at)
                .context(|| context("writing parent locator data"))?;
        }
        storage
            .flush()
            .context(|| context("flushing the new header"))?;
        let footer = Footer {
            data_offset: header_at,
            ..self.footer.clone()
        }
        .serialize();
        for (at, which) in [(footer_at, "footer"), (0, "footer copy")] {
            storage
                .write_at(&footer, at)
                .context(|| context(&format!("writing the {which}")))?;
            storage
                .flush()
                .context(|| context(&format!("flushing the {which}")))?;
        }
        allocator.next_block = footer_at;
        Ok(format!(
            "parent locators rewritten at {header_at:#x}: W2ru {}, W2ku {}",
            paths.relative, paths.absolute
        ))
    }
}

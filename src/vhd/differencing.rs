//! Differencing disks (FORMATS.md §8.10): a dynamic disk whose sectors default to its
//! parent's. Each allocated block's bitmap says, per sector, whether the data is in this
//! file (bit set) or in the parent (clear); blocks never allocated are the parent's whole.
//! Past the parent's end, a larger child reads zeros.
//!
//! The bitmaps are read once at open and kept in memory beside the BAT, so reads never
//! go to metadata on disk. Writes that only touch sectors already in this file go
//! straight to the data. Anything else runs with the block claimed (see the module above;
//! writers of other blocks carry on):
//!
//! * a new block is placed like any dynamic block (see the module above), but its bitmap
//!   goes down clear and its data in whole groups of 8 sectors (one bitmap byte, 4 KiB),
//!   the parent's bytes filling whatever the write leaves of them;
//! * in an allocated block, sectors of those groups still in the parent are written in
//!   the same way;
//! * the groups' bits are then set in memory only, so reads see the new data at once,
//!   and the block is noted as having bits the file lacks.
//!
//! A flush takes those blocks' bitmaps as they are, makes the data durable, then writes
//! the bitmaps and flushes again; one such saving runs at a time. A crash before that
//! leaves the sectors reading from the parent, as if never written (they were not
//! acknowledged); a set bit on disk never covers data that may not be on the medium.
//! Deferring the bits to the flush costs no extra flush per write.
//!
//! Moving whole bitmap bytes rather than single sectors costs a little copying but keeps
//! every byte of bitmaps written here 0x00 or 0xFF. libvhdi (vhdimount 20210425) reads a
//! sector after a set bit in a partly set byte from the child instead of the parent; images
//! written here read correctly there too. Partly set bytes written by others (Windows
//! writes them) are read per bit.

use super::bat::{Bat, BlockLayout};
use super::bitmap::SectorBitmap;
use super::dynamic_header::DynamicHeader;
use super::parent_locator::ParentLocator;
use super::{Dynamic, SECTOR, VhdDisk};
use crate::commit_queue::CommitQueue;
use crate::disk::Format;
use crate::error::{Error, IoContext, Result};
use crate::layer::{
    BlockPiece, MappedRun, Mapping, MetadataBudget, Parent, ParentLink, ParentPath, block_pieces,
    copy_up, push_run,
};
use crate::storage::Storage;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

/// How a differencing disk names its parent, and where in the file those names lie.
#[derive(Debug, Default)]
pub(super) struct ParentPaths {
    /// Most trusted first: locators by platform, then the Parent Unicode Name.
    pub paths: Vec<ParentPath>,
    /// File ranges holding locator data, which no block may overlap.
    pub areas: Vec<Range<u64>>,
    /// The whole Platform Data Space of each locator (within the data area), which a
    /// writer such as Windows keeps for longer paths: never free for new blocks.
    pub spaces: Vec<Range<u64>>,
}

/// Reads the parent locators of `header` from a file whose data area ends at `data_end`.
pub(super) fn read_parent_paths(
    storage: &dyn Storage,
    header: &DynamicHeader,
    data_end: u64,
) -> Result<ParentPaths> {
    let mut ranked = Vec::new();
    let mut areas = Vec::new();
    let mut spaces = Vec::new();
    for (index, locator) in ParentLocator::parse_all(&header.parent_locators)
        .into_iter()
        .enumerate()
    {
        let Some(rank) = locator.platform.rank() else {
            continue;
        };
        let range = locator.data_range(index, data_end)?;
        // `data_range` bounds the length to a path's.
        let mut data = vec![0u8; (range.end - range.start) as usize];
        storage
            .read_at(&mut data, range.start)
            .context(|| format!("reading the data of VHD parent locator {index}"))?;
        if let Some(path) = locator.decode(index, &data)? {
            ranked.push((rank, index, path));
        }
        let space_end = range
            .start
            .saturating_add(locator.space_bytes())
            .min(data_end);
        spaces.push(range.start..space_end.max(range.end));
        if !range.is_empty() {
            areas.push(range);
        }
    }
    ranked.sort_by_key(|&(rank, index, _)| (rank, index));
    let mut paths: Vec<ParentPath> = ranked.into_iter().map(|(_, _, path)| path).collect();
    let name = header.parent_name();
    if !name.is_empty() {
        paths.push(ParentPath::FileName(name));
    }
    Ok(ParentPaths {
        paths,
        areas,
        spaces,
    })
}

/// Most memory the bitmaps of one disk may take, with a per-block allowance for the table
/// that holds them: enough for about 450 GiB of data written to a differencing disk of
/// 2 MiB blocks, while keeping the daemon well inside a few hundred MiB whatever a crafted
/// sparse file claims to have allocated.
const MAX_BITMAP_MEMORY: u64 = 128 << 20;
const BITMAP_OVERHEAD: u64 = 64;

#[derive(Debug, Clone)]
struct DiffBlock {
    /// File offset of the block's bitmap.
    at: u64,
    bitmap: SectorBitmap,
}

pub(super) struct Differencing {
    /// The parent the image names.
    pub link: ParentLink,
    /// Opened read-only (other children may share it, unless a merge writes into it)
    /// and attached by the chain module.
    pub parent: Option<Parent>,
    /// Every allocated block with its bitmap as reads must see it.
    blocks: RwLock<HashMap<u64, DiffBlock>>,
    /// Blocks whose bitmap in memory has bits the file does not have yet: a writer adds
    /// its block once the bits are set, a saving takes every block before its flush.
    unsaved_bitmaps: Mutex<BTreeSet<u64>>,
    /// Savings of those bitmaps, one at a time.
    saving: CommitQueue<()>,
}

/// Sectors of a block touched by `len` bytes at `in_block`.
fn sector_span(in_block: u64, len: usize) -> Range<u64> {
    in_block / SECTOR..(in_block + len as u64).div_ceil(SECTOR)
}

/// The bytes of `sectors` that `len` bytes at `in_block` cover, as offsets in the block.
fn clip(sectors: &Range<u64>, in_block: u64, len: usize) -> Range<u64> {
    (sectors.start * SECTOR).max(in_block)..(sectors.end * SECTOR).min(in_block + len as u64)
}

impl Differencing {
    /// Reads the bitmap of every block `bat` allocates; the parent comes later.
    pub(super) fn open(
        storage: &dyn Storage,
        header: &DynamicHeader,
        paths: &[ParentPath],
        bat: &Bat,
        layout: BlockLayout,
        budget: &MetadataBudget,
    ) -> Result<Differencing> {
        let sectors = layout.block_size / SECTOR;
        let bitmap_memory = bat
            .allocated()
            .checked_mul(sectors.div_ceil(8) + BITMAP_OVERHEAD);
        if bitmap_memory.is_none_or(|bytes| bytes > MAX_BITMAP_MEMORY) {
            return Err(Error::unsupported(format!(
                "VHD differencing disk: the bitmaps of {} allocated blocks take more than the \
                 {MAX_BITMAP_MEMORY} bytes this reader keeps in memory",
                bat.allocated()
            )));
        }
        budget.charge(
            bitmap_memory.unwrap_or(u64::MAX),
            "the sector bitmaps of this VHD differencing disk",
        )?;
        let mut blocks = HashMap::new();
        for (block, at) in bat.allocated_blocks() {
            let mut bytes = vec![0u8; layout.bitmap_bytes as usize];
            storage
                .read_at(&mut bytes, at)
                .context(|| format!("reading the sector bitmap of block {block}"))?;
            blocks.insert(
                block,
                DiffBlock {
                    at,
                    bitmap: SectorBitmap::from_stored(bytes, sectors),
                },
            );
        }
        Ok(Differencing {
            link: ParentLink {
                paths: paths.to_vec(),
                identities: vec![header.parent_unique_id],
                format: Format::Vhd,
                child_kind: "VHD differencing disk",
            },
            parent: None,
            blocks: RwLock::new(blocks),
            unsaved_bitmaps: Mutex::new(BTreeSet::new()),
            saving: CommitQueue::default(),
        })
    }

    /// Appends where each piece lies: sectors whose bit is set in this file, the rest in
    /// the parent; `data_at(block offset, offset in block)` gives a file offset.
    pub(super) fn map(
        &self,
        pieces: impl Iterator<Item = BlockPiece>,
        data_at: impl Fn(u64, u64) -> u64,
        runs: &mut Vec<MappedRun>,
    ) {
        let blocks = self.blocks.read();
        for piece in pieces {
            let Some(block) = blocks.get(&piece.block) else {
                push_run(runs, piece.len as u64, Mapping::Parent);
                continue;
            };
            for (sectors, present) in block.bitmap.runs(sector_span(piece.in_block, piece.len)) {
                let bytes = clip(&sectors, piece.in_block, piece.len);
                let mapping = if present {
                    Mapping::File(data_at(block.at, bytes.start))
                } else {
                    Mapping::Parent
                };
                push_run(runs, bytes.end - bytes.start, mapping);
            }
        }
    }

    /// Drops `blocks`, whose BAT entries are unallocated now: they read from the parent,
    /// and have no bitmap left to write. Called with the allocator held.
    pub(super) fn forget(&self, blocks: impl Iterator<Item = u64>) {
        let mut map = self.blocks.write();
        let mut unsaved = self.unsaved_bitmaps.lock();
        for block in blocks {
            map.remove(&block);
            unsaved.remove(&block);
        }
    }

    /// The bytes `span` (offsets in the block starting at virtual `block_start`) should
    /// hold once `data` is written at `in_block` inside it: the parent's bytes around it.
    fn widen_with_parent(
        &self,
        block_start: u64,
        span: Range<u64>,
        in_block: u64,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        copy_up(
            self.parent.as_ref(),
            block_start + span.start..block_start + span.end,
            block_start + in_block,
            data,
        )
    }
}

/// Sectors covered by one bitmap byte: the unit in which sectors move into the child.
const GROUP: u64 = 8;

/// `sectors` widened to whole bitmap bytes, within a block of `block_sectors` sectors.
fn whole_groups(sectors: &Range<u64>, block_sectors: u64) -> Range<u64> {
    sectors.start / GROUP * GROUP..sectors.end.next_multiple_of(GROUP).min(block_sectors)
}

impl VhdDisk {
    pub(super) fn write_differencing(
        &self,
        d: &Dynamic,
        diff: &Differencing,
        buf: &[u8],
        offset: u64,
    ) -> Result<()> {
        for piece in block_pieces(offset, buf.len() as u64, d.layout.block_size) {
            let data = &buf[piece.range()];
            self.write_differencing_piece(d, diff, piece.block, piece.in_block, data)?;
        }
        Ok(())
    }

    fn write_differencing_piece(
        &self,
        d: &Dynamic,
        diff: &Differencing,
        block: u64,
        in_block: u64,
        data: &[u8],
    ) -> Result<()> {
        let sectors = sector_span(in_block, data.len());
        if self.write_in_child(d, diff, block, &sectors, in_block, data)? {
            return Ok(());
        }
        let _claim = d.claims.claim_when_free(block..block + 1);
        // Another writer may have moved the sectors into this file while this one waited.
        if self.write_in_child(d, diff, block, &sectors, in_block, data)? {
            return Ok(());
        }
        let storage = self.storage.as_ref();
        let block_start = block * d.layout.block_size;
        let data_at = |block_at: u64, in_block: u64| block_at + d.layout.bitmap_bytes + in_block;
        let group = whole_groups(&sectors, d.layout.block_size / SECTOR);
        // The claim keeps other writers from changing the block's bitmap meanwhile.
        let pin = d.space.pin();
        let existing = diff
            .blocks
            .read()
            .get(&block)
            .map(|b| (b.at, b.bitmap.runs(group.clone())));
        match existing {
            None => {
                drop(pin);
                let span = group.start * SECTOR..group.end * SECTOR;
                let merged = diff.widen_with_parent(block_start, span.clone(), in_block, data)?;
                let clear = vec![0u8; d.layout.bitmap_bytes as usize];
                let at = self.allocate(d, block, |block_at, context| {
                    storage
                        .write_at(&clear, block_at)
                        .context(|| context("writing the sector bitmap"))?;
                    storage
                        .write_at(&merged, data_at(block_at, span.start))
                        .context(|| context("writing data"))
                })?;
                let mut bitmap = SectorBitmap::clear(d.layout.block_size / SECTOR);
                bitmap.set(group);
                diff.blocks.write().insert(block, DiffBlock { at, bitmap });
            }
            Some((at, runs)) => {
                for (run, present) in runs {
                    let overlap = clip(&run, in_block, data.len());
                    let part = if overlap.start < overlap.end {
                        &data
                            [(overlap.start - in_block) as usize..(overlap.end - in_block) as usize]
                    } else {
                        &[]
                    };
                    let written = if present {
                        if part.is_empty() {
                            continue;
                        }
                        storage.write_at(part, data_at(at, overlap.start))
                    } else {
                        let span = run.start * SECTOR..run.end * SECTOR;
                        let from = overlap.start.clamp(span.start, span.end);
                        let merged =
                            diff.widen_with_parent(block_start, span.clone(), from, part)?;
                        storage.write_at(&merged, data_at(at, span.start))
                    };
                    written.context(|| format!("writing {} bytes to block {block}", part.len()))?;
                }
                if let Some(b) = diff.blocks.write().get_mut(&block) {
                    b.bitmap.set(group);
                }
                drop(pin);
            }
        }
        // Only after the bits: a saving that takes the block from the set reads them.
        diff.unsaved_bitmaps.lock().insert(block);
        Ok(())
    }

    /// Writes `data` at `in_block` into `block` if every sector it touches is in this file
    /// already; false if not.
    fn write_in_child(
        &self,
        d: &Dynamic,
        diff: &Differencing,
        block: u64,
        sectors: &Range<u64>,
        in_block: u64,
        data: &[u8],
    ) -> Result<bool> {
        let _pin = d.space.pin();
        let in_this_file = diff
            .blocks
            .read()
            .get(&block)
            .filter(|b| b.bitmap.all_set(sectors.clone()))
            .map(|b| b.at);
        match in_this_file {
            Some(block_at) => self
                .write_data(d, block, block_at, in_block, data)
                .map(|()| true),
            None => Ok(false),
        }
    }

    /// Makes every completed write durable: data first, then the bitmaps that mark it.
    /// One saving runs at a time (others join it, as commits do), so no bitmap written
    /// lands after a newer one of the same block.
    pub(super) fn flush_differencing(&self, d: &Dynamic, diff: &Differencing) -> Result<()> {
        diff.saving.commit(None, |_| {
            let unsaved: Vec<u64> = std::mem::take(&mut *diff.unsaved_bitmaps.lock())
                .into_iter()
                .collect();
            let saved = self.save_bitmaps(d, diff, &unsaved);
            if saved.is_err() {
                diff.unsaved_bitmaps.lock().extend(unsaved);
            }
            saved
        })
    }

    /// Writes the bitmaps of `blocks` as they are now, once the data they mark is durable.
    fn save_bitmaps(&self, d: &Dynamic, diff: &Differencing, blocks: &[u64]) -> Result<()> {
        let sectors = d.layout.block_size / SECTOR;
        // Taken before the flush, so every bit they hold covers data it makes durable.
        let stored: Vec<(u64, u64, Vec<u8>)> = {
            let map = diff.blocks.read();
            blocks
                .iter()
                .filter_map(|block| {
                    let b = map.get(block)?;
                    Some((*block, b.at, b.bitmap.stored_sectors(0..sectors).1))
                })
                .collect()
        };
        self.commit(d, None)?;
        if stored.is_empty() {
            return Ok(());
        }
        for (block, at, bytes) in &stored {
            let _pin = d.space.pin();
            // A block given back meanwhile keeps its old bits out of space that may be
            // handed out again.
            if diff.blocks.read().get(block).is_some_and(|b| b.at == *at) {
                self.storage
                    .write_at(bytes, *at)
                    .context(|| format!("writing the sector bitmap of block {block}"))?;
            }
        }
        self.commit(d, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{Allocation, Extent, OpenOptions, VirtualDisk};
    use crate::error::ErrorKind;
    use crate::layer::Layer;
    use crate::storage::MemStorage;
    use crate::vhd::DiskType;
    use crate::vhd::tests::{
        BLOCK, FlushGate, Model, Shared, assemble, assert_same, crash_images, dynamic_image,
        footer_for, header_for, new_block_data_at, read_all,
    };
    use parking_lot::Mutex;
    use rand::rngs::StdRng;
    use rand::{Rng, RngExt, SeedableRng};
    use std::sync::Arc;

    const PARENT_ID: [u8; 16] = [9; 16];

    /// A dynamic parent of `size` bytes filled with random data (no byte zero, so a sector
    /// wrongly read from elsewhere shows), as image bytes and as contents.
    fn parent_image(size: u64, seed: u64) -> (Vec<u8>, Vec<u8>) {
        let storage = Arc::new(MemStorage::from_vec(dynamic_image(size)));
        let disk = VhdDisk::open(Shared::new(storage.clone()), &OpenOptions::default()).unwrap();
        let mut data = vec![0u8; size as usize];
        StdRng::seed_from_u64(seed).fill_bytes(&mut data);
        for b in &mut data {
            *b |= 1;
        }
        // Leave the second block unallocated: it reads zeros from the parent.
        disk.write_at(&data[..BLOCK as usize], 0).unwrap();
        disk.write_at(&data[2 * BLOCK as usize..], 2 * u64::from(BLOCK))
            .unwrap();
        data[BLOCK as usize..2 * BLOCK as usize].fill(0);
        disk.flush().unwrap();
        (storage.contents(), data)
    }

    /// Children's blocks: 32 sectors, four bitmap bytes.
    const CHILD_BLOCK: u32 = 4 * BLOCK;

    /// An empty differencing image of `size` bytes in blocks of `block` bytes whose
    /// parent has id `PARENT_ID`.
    fn child_image(size: u64, block: u32) -> Vec<u8> {
        let mut header = header_for(size.div_ceil(u64::from(block)) as u32, block);
        header.parent_unique_id = PARENT_ID;
        assemble(&footer_for(size, DiskType::Differencing), &header)
    }

    /// Opens `child` over a read-only parent made of `parent` image bytes; the parent's
    /// storage is returned too, to check it is never written.
    fn open_child(child: Box<dyn Storage>, parent: &[u8]) -> (VhdDisk, Arc<MemStorage>) {
        let parent_storage = Arc::new(MemStorage::from_vec(parent.to_vec()));
        let parent_disk = VhdDisk::open(
            Shared::new(parent_storage.clone()),
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(parent_disk.identity(), Some(PARENT_ID));
        let mut child = VhdDisk::open(child, &OpenOptions::default()).unwrap();
        assert_eq!(child.parent_link().unwrap().identities, [PARENT_ID]);
        child.attach_parent(Parent {
            path: "parent.vhd".into(),
            layer: Box::new(parent_disk),
        });
        (child, parent_storage)
    }

    #[test]
    fn random_writes_over_a_smaller_parent_match_a_model() {
        let parent_size = 5 * u64::from(BLOCK) + 3 * 512;
        let size = 9 * u64::from(BLOCK);
        let (parent, parent_data) = parent_image(parent_size, 1);
        for block in [BLOCK, CHILD_BLOCK, 512] {
            random_writes_over(&parent, &parent_data, size, block);
        }
    }

    fn random_writes_over(parent: &[u8], parent_data: &[u8], size: u64, block: u32) {
        let storage = Arc::new(MemStorage::from_vec(child_image(size, block)));
        let (disk, parent_storage) = open_child(Shared::new(storage.clone()), parent);
        let mut model = parent_data.to_vec();
        model.resize(size as usize, 0);
        assert_same(&read_all(&disk), &model);

        let mut rng = StdRng::seed_from_u64(u64::from(block));
        for round in 0..300 {
            let len = rng.random_range(1..2 * BLOCK as usize);
            let offset = rng.random_range(0..size as usize - len + 1);
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            disk.write_at(&data, offset as u64).unwrap();
            model[offset..offset + len].copy_from_slice(&data);
            if round % 50 == 0 {
                assert_same(&read_all(&disk), &model);
            }
            let len = rng.random_range(0..3 * BLOCK as usize);
            let offset = rng.random_range(0..size as usize - len + 1);
            let mut buf = vec![0u8; len];
            disk.read_at(&mut buf, offset as u64).unwrap();
            assert_same(&buf, &model[offset..offset + len]);
        }
        disk.close().unwrap();
        assert_eq!(parent_storage.contents(), parent);
        assert_eq!(parent_storage.write_count(), 0);
        let (reopened, _) = open_child(Box::new(MemStorage::from_vec(storage.contents())), parent);
        assert_same(&read_all(&reopened), &model);
    }

    #[test]
    fn a_partial_sector_write_copies_its_bitmap_byte_from_the_parent() {
        let size = 2 * u64::from(CHILD_BLOCK);
        let (parent, parent_data) = parent_image(size, 3);
        let storage = Arc::new(MemStorage::from_vec(child_image(size, CHILD_BLOCK)));
        let (disk, _) = open_child(Shared::new(storage.clone()), &parent);
        let data_at = new_block_data_at(storage.len().unwrap() - 512, 0) as usize;
        let block_file_at = data_at - 512;
        let block_start = CHILD_BLOCK as usize;
        // Three bytes inside sector 13 of block 1: sectors 8 to 15 move into the child.
        let at = block_start + 13 * 512 + 100;
        disk.write_at(b"abc", at as u64).unwrap();
        disk.flush().unwrap();
        let image = storage.contents();
        let bitmap = &image[block_file_at..block_file_at + 512];
        assert_eq!(&bitmap[..2], &[0x00, 0xFF]);
        assert!(bitmap[2..].iter().all(|&b| b == 0));
        let mut expected = parent_data.clone();
        expected[at..at + 3].copy_from_slice(b"abc");
        let group = 8 * 512..16 * 512;
        assert_eq!(
            &image[data_at + group.start..data_at + group.end],
            &expected[block_start + group.start..block_start + group.end]
        );
        // The rest of the new block was never written.
        assert!(
            image[data_at..data_at + group.start]
                .iter()
                .all(|&b| b == 0)
        );
        let block_end = data_at + CHILD_BLOCK as usize;
        assert!(
            image[data_at + group.end..block_end]
                .iter()
                .all(|&b| b == 0)
        );
        assert_same(&read_all(&disk), &expected);

        // A second write to sectors now in the child goes straight to the data.
        let writes = storage.write_count();
        let flushes = storage.flush_count();
        disk.write_at(b"Z", at as u64 + 1000).unwrap();
        assert_eq!(storage.write_count(), writes + 1);
        assert_eq!(storage.flush_count(), flushes);
        expected[at + 1000] = b'Z';

        // Sectors 6 to 9 and 17 written in the now allocated block: sectors 0 to 7 and
        // 16 to 23 copied. No flush of their own: the bits wait for the next flush.
        disk.write_at(&[7; 2048], (block_start + 6 * 512) as u64)
            .unwrap();
        disk.write_at(&[8; 512], (block_start + 17 * 512) as u64)
            .unwrap();
        expected[block_start + 6 * 512..block_start + 10 * 512].fill(7);
        expected[block_start + 17 * 512..block_start + 18 * 512].fill(8);
        assert_eq!(storage.flush_count(), flushes);
        let on_disk = storage.contents();
        assert_eq!(
            &on_disk[block_file_at..block_file_at + 4],
            &[0x00, 0xFF, 0x00, 0x00]
        );
        assert_same(&read_all(&disk), &expected);
        disk.flush().unwrap();
        // Data, then bitmaps, each flushed.
        assert_eq!(storage.flush_count(), flushes + 2);
        let image = storage.contents();
        assert_eq!(
            &image[block_file_at..block_file_at + 4],
            &[0xFF, 0xFF, 0xFF, 0x00]
        );
        assert_eq!(
            &image[data_at..data_at + 24 * 512],
            &expected[block_start..block_start + 24 * 512]
        );
        assert_same(&read_all(&disk), &expected);
    }

    /// A bitmap byte set sector by sector, as Windows writes them: each bit counts.
    #[test]
    fn partly_set_bitmap_bytes_are_read_per_sector() {
        let size = 2 * u64::from(BLOCK);
        let (parent, parent_data) = parent_image(size, 10);
        let mut image = child_image(size, BLOCK);
        let block_at = image.len() - 512;
        let footer = image[block_at..].to_vec();
        image.truncate(block_at);
        let mut bitmap = vec![0u8; 512];
        bitmap[0] = 0b0100_1000; // sectors 1 and 4
        image.extend_from_slice(&bitmap);
        image.extend((0..BLOCK).map(|i| (i / 512) as u8 + 0x40));
        image.extend_from_slice(&footer);
        image[1536..1540].copy_from_slice(&((block_at / 512) as u32).to_be_bytes());
        let (disk, _) = open_child(Box::new(MemStorage::from_vec(image)), &parent);
        let mut expected = parent_data.clone();
        expected[512..1024].fill(0x41);
        expected[2048..2560].fill(0x44);
        assert_same(&read_all(&disk), &expected);
    }

    #[test]
    fn allocation_follows_the_bitmap_then_the_parent() {
        let b = u64::from(BLOCK);
        let (parent, _) = parent_image(3 * b, 4);
        let size = 8 * b;
        let (disk, _) = open_child(
            Box::new(MemStorage::from_vec(child_image(size, CHILD_BLOCK))),
            &parent,
        );
        // Inside the parent's unallocated block 1, and past the parent's end: one bitmap
        // byte (4 KiB) each.
        disk.write_at(&[1; 512], b + 1024).unwrap();
        disk.write_at(&[2; 10], 5 * b + 5).unwrap();
        let extent = |offset: u64, len: u64, state| Extent { offset, len, state };
        assert_eq!(
            disk.allocation(0, size).unwrap(),
            vec![
                extent(0, 3 * b, Allocation::Data),
                extent(3 * b, 2 * b, Allocation::Zero),
                extent(5 * b, b, Allocation::Data),
                extent(6 * b, 2 * b, Allocation::Zero),
            ]
        );
        // Byte-granular queries clip to the request.
        assert_eq!(
            disk.allocation(5 * b - 100, 200).unwrap(),
            vec![
                extent(5 * b - 100, 100, Allocation::Zero),
                extent(5 * b, 100, Allocation::Data),
            ]
        );
        assert_eq!(
            disk.allocation(b + 7, 1).unwrap(),
            vec![extent(b + 7, 1, Allocation::Data)]
        );
    }

    #[test]
    fn discard_reads_zeros_instead_of_the_parent() {
        let size = 4 * u64::from(BLOCK);
        let (parent, parent_data) = parent_image(size, 5);
        let (disk, _) = open_child(
            Box::new(MemStorage::from_vec(child_image(size, CHILD_BLOCK))),
            &parent,
        );
        disk.discard(700, u64::from(BLOCK) + 1000).unwrap();
        let mut expected = parent_data.clone();
        expected[700..700 + BLOCK as usize + 1000].fill(0);
        assert_same(&read_all(&disk), &expected);
        assert_eq!(
            disk.allocation(512, 512).unwrap(),
            vec![Extent {
                offset: 512,
                len: 512,
                state: Allocation::Data
            }]
        );
    }

    #[test]
    fn concurrent_writers_to_one_bitmap_byte_keep_every_write() {
        let size = 2 * u64::from(CHILD_BLOCK);
        let (parent, parent_data) = parent_image(size, 11);
        let storage = Arc::new(MemStorage::from_vec(child_image(size, CHILD_BLOCK)));
        let (disk, _) = open_child(Shared::new(storage.clone()), &parent);
        let barrier = std::sync::Barrier::new(8);
        std::thread::scope(|scope| {
            for thread in 0..8u64 {
                let (disk, barrier) = (&disk, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    // Every thread writes part of one sector in each group of each block.
                    for group in 0..2 * u64::from(CHILD_BLOCK) / 4096 {
                        let at = group * 4096 + thread * 512 + 100;
                        disk.write_at(&[thread as u8 + 1; 300], at).unwrap();
                    }
                });
            }
        });
        let mut expected = parent_data.clone();
        for group in 0..2 * CHILD_BLOCK as usize / 4096 {
            for thread in 0..8 {
                let at = group * 4096 + thread * 512 + 100;
                expected[at..at + 300].fill(thread as u8 + 1);
            }
        }
        assert_same(&read_all(&disk), &expected);
        disk.close().unwrap();
        let (reopened, _) = open_child(Box::new(MemStorage::from_vec(storage.contents())), &parent);
        assert_same(&read_all(&reopened), &expected);
    }

    #[test]
    fn a_failed_flush_keeps_the_bits_for_the_next_one() {
        let size = 2 * u64::from(CHILD_BLOCK);
        let (parent, parent_data) = parent_image(size, 12);
        let storage = Arc::new(MemStorage::from_vec(child_image(size, CHILD_BLOCK)));
        let (disk, _) = open_child(Shared::new(storage.clone()), &parent);
        disk.write_at(&[3; 5000], 100).unwrap();
        let mut expected = parent_data.clone();
        expected[100..5100].fill(3);
        for fail in [libc::EIO, libc::ENOSPC] {
            if fail == libc::EIO {
                storage.fail_flushes(fail);
            } else {
                // The data flush succeeds, the bitmap write does not.
                storage.fail_writes_after(0, fail);
            }
            let err = disk.flush().unwrap_err();
            assert_eq!(err.errno(), fail, "{err}");
            storage.clear_faults();
            assert_same(&read_all(&disk), &expected);
        }
        disk.flush().unwrap();
        let (reopened, _) = open_child(Box::new(storage.power_loss_dropping_unflushed()), &parent);
        assert_same(&read_all(&reopened), &expected);
    }

    #[test]
    fn read_only_children_refuse_writes() {
        let size = 2 * u64::from(BLOCK);
        let (parent, _) = parent_image(size, 6);
        let parent_disk = VhdDisk::open(
            Box::new(MemStorage::from_vec(parent)),
            &OpenOptions::default(),
        )
        .unwrap();
        let mut child = VhdDisk::open(
            Box::new(MemStorage::from_vec(child_image(size, CHILD_BLOCK))),
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        child.attach_parent(Parent {
            path: "parent.vhd".into(),
            layer: Box::new(parent_disk),
        });
        let err = child.write_at(&[1], 0).unwrap_err();
        assert!(matches!(err.kind(), ErrorKind::ReadOnly));
    }

    #[test]
    fn a_crash_at_any_request_keeps_acknowledged_writes_and_sets_no_early_bits() {
        let parent_size = 6 * u64::from(BLOCK);
        let size = 9 * u64::from(BLOCK);
        let (parent, parent_data) = parent_image(parent_size, 7);
        let mut initial = parent_data.clone();
        initial.resize(size as usize, 0);
        let storage = Arc::new(MemStorage::from_vec(child_image(size, CHILD_BLOCK)));
        let model = Arc::new(Mutex::new(Model {
            acked: initial.clone(),
            current: initial,
            in_flight: vec![false; size as usize],
        }));
        let checks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let check = {
            let parent = parent.clone();
            move |storage: &MemStorage, model: &Model, rng: &mut StdRng| {
                for (what, crashed) in crash_images(storage, rng) {
                    let (disk, _) = open_child(Box::new(crashed), &parent);
                    model.check(&read_all(&disk), &what);
                }
            }
        };
        let hook = {
            let (model, checks, check) = (model.clone(), checks.clone(), check.clone());
            let rng = Mutex::new(StdRng::seed_from_u64(8));
            move |storage: &MemStorage| {
                let model = model.lock().clone();
                check(storage, &model, &mut rng.lock());
                checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        };
        let (disk, _) = open_child(Shared::with_hook(storage.clone(), hook), &parent);
        let mut rng = StdRng::seed_from_u64(9);
        for _epoch in 0..5 {
            for _ in 0..3 {
                // Writes within one epoch never overlap, so each byte has one new value.
                let (offset, len) = loop {
                    let len = rng.random_range(1..BLOCK as usize + 1024);
                    let offset = rng.random_range(0..size as usize - len);
                    if !model.lock().in_flight[offset..offset + len].contains(&true) {
                        break (offset, len);
                    }
                };
                // Zeros are the likeliest wrong answer: write none.
                let data: Vec<u8> = (0..len).map(|_| rng.random::<u8>() | 0x80).collect();
                model.lock().write(offset, &data);
                disk.write_at(&data, offset as u64).unwrap();
            }
            disk.flush().unwrap();
            model.lock().flushed();
        }
        assert!(checks.load(std::sync::atomic::Ordering::Relaxed) > 40);
        check(&storage, &model.lock(), &mut rng);
    }

    #[test]
    fn copy_ups_and_new_blocks_go_ahead_while_an_allocation_waits_for_its_flush() {
        let size = 4 * u64::from(CHILD_BLOCK);
        let (parent, parent_data) = parent_image(size, 13);
        let gate = FlushGate::new(child_image(size, CHILD_BLOCK));
        let (disk, _) = open_child(Box::new(gate.clone()), &parent);
        let mut expected = parent_data.clone();
        // Block 0 allocated, and room made for the others.
        disk.write_at(&[1; 512], 0).unwrap();
        disk.flush().unwrap();
        expected[..512].fill(1);
        let block = |i: u64| i * u64::from(CHILD_BLOCK);
        gate.hold(true);
        std::thread::scope(|scope| {
            let a = scope.spawn(|| disk.write_at(&[0xA1; 700], block(1) + 100));
            gate.wait_until("writer A's data flush", |s| s.held == 1);
            // Sectors of the allocated block move in from the parent, and the write is
            // done, while A waits.
            disk.write_at(&[0xB2; 700], block(0) + 5000).unwrap();
            // A whole bitmap byte's sectors, so the data written starts with C's bytes.
            let c = scope.spawn(|| disk.write_at(&[0xC3; 4096], block(2) + 8192));
            gate.wait_until("writer C's data write", |s| s.writes.contains(&0xC3));
            gate.hold(false);
            a.join().unwrap().unwrap();
            c.join().unwrap().unwrap();
        });
        expected[block(1) as usize + 100..][..700].fill(0xA1);
        expected[5000..5700].fill(0xB2);
        expected[block(2) as usize + 8192..][..4096].fill(0xC3);
        assert_same(&read_all(&disk), &expected);
        disk.flush().unwrap();
        let (reopened, _) = open_child(
            Box::new(gate.inner.power_loss_dropping_unflushed()),
            &parent,
        );
        assert_same(&read_all(&reopened), &expected);
    }
}

//! `vdisk compact`: rewrites a VHD or VHDX in place so no file space is left unused.
//! Blocks move down into free space, highest first, in batches that are each durable
//! before the tables point at them; then the file is cut after its last block. The image
//! is locked like a read-write mount for the whole run, and a crash at any instant leaves
//! it openable with the same contents.

use crate::chain;
use crate::disk::{Format, OpenOptions};
use crate::error::{Error, IoContext, Result};
use crate::free_space::{FreeSpace, SpaceGate};
use crate::layer::{Layer, MetadataBudget};
use crate::lock;
use crate::open::open_layer;
use crate::relocation::{Releasable, Relocation, Unit};
use crate::storage::FileStorage;
use serde::Serialize;
use std::fmt;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Most bytes moved between two flushes.
const BATCH_BYTES: u64 = 256 << 20;
/// Bytes read at a time when looking for blocks of zeros.
const ZERO_CHECK_CHUNK: usize = 4 << 20;

#[derive(Debug, Clone, Default)]
pub struct CompactOptions {
    /// Also give back blocks whose data is all zeros.
    pub zero_blocks: bool,
    /// Compact even an image that differencing images beside it name as their parent.
    pub force: bool,
}

/// How far a compaction has come, for a progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub stage: Stage,
    pub done: u64,
    pub total: u64,
    /// File bytes moved so far.
    pub moved_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Reading blocks to find those holding only zeros.
    FindingZeroBlocks,
    /// Moving blocks into free space.
    Moving,
}

/// What a compaction did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CompactReport {
    pub image: String,
    pub format: String,
    /// File length before and after.
    pub length_before: u64,
    pub length_after: u64,
    /// Bytes the host filesystem held for the file before and after.
    pub allocated_before: u64,
    pub allocated_after: u64,
    #[serde(flatten)]
    pub work: Compaction,
}

/// What compacting an open image did.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Compaction {
    pub blocks_moved: u64,
    pub bytes_moved: u64,
    /// Blocks of zeros given back (`--zero-blocks`).
    pub zero_blocks_released: u64,
}

impl fmt::Display for CompactReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} -> {} ({} blocks moved",
            self.image,
            human(self.length_before),
            human(self.length_after),
            self.work.blocks_moved
        )?;
        if self.work.zero_blocks_released > 0 {
            write!(
                f,
                ", {} blocks of zeros released",
                self.work.zero_blocks_released
            )?;
        }
        writeln!(
            f,
            "; {} -> {} on disk)",
            human(self.allocated_before),
            human(self.allocated_after)
        )
    }
}

/// Sizes as people read them: `1.8 GiB`, `412 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} bytes"),
        _ if value < 10.0 => format!("{value:.1} {}", UNITS[unit]),
        _ => format!("{value:.0} {}", UNITS[unit]),
    }
}

/// Compacts the image at `path` in place, calling `progress` as it goes.
pub fn compact(
    path: &Path,
    options: &CompactOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<CompactReport> {
    compact_file(path, options, progress).map_err(|e| e.with_file(path))
}

fn compact_file(
    path: &Path,
    options: &CompactOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<CompactReport> {
    let file = lock::open_locked(path, false)?;
    if !options.force {
        let children = chain::children_beside(path)?;
        if !children.is_empty() {
            return Err(Error::invalid_input(format!(
                "{} is the parent of the differencing image {}. Compacting keeps the \
                 contents and the identity children check, but moves blocks a child's \
                 reader may be using right now if it does not honour image locks (another \
                 host, Hyper-V over a share); pass --force if nothing uses the chain",
                path.display(),
                chain::name_children(&children),
            )));
        }
    }
    let before = file
        .metadata()
        .context(|| "cannot read file attributes".to_string())?;
    let open = OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    };
    let layer = open_layer(
        Box::new(FileStorage::new(file)),
        &open,
        &MetadataBudget::default(),
    )?;
    let mut report = CompactReport {
        image: path.display().to_string(),
        format: layer.format().to_string(),
        length_before: before.len(),
        length_after: before.len(),
        allocated_before: before.blocks() * 512,
        allocated_after: before.blocks() * 512,
        work: Compaction::default(),
    };
    if layer.format() == Format::Raw {
        return Err(Error::unsupported(
            "a raw image has no block tables to compact (`fallocate --dig-holes` makes its \
             zeros holes)",
        ));
    }
    report.work = compact_layer(layer.as_ref(), options, progress)?;
    drop(layer);
    let after = std::fs::metadata(path).context(|| "cannot read file attributes".to_string())?;
    report.length_after = after.len();
    report.allocated_after = after.blocks() * 512;
    Ok(report)
}

/// Compacts the file of `layer`, opened writable and used by nothing else, and closes
/// the image. [`compact`] does this for an image file, with the locks and checks a user
/// needs.
pub fn compact_layer(
    layer: &dyn Layer,
    options: &CompactOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Compaction> {
    let mut work = Compaction::default();
    if let Some(relocation) = layer.relocation() {
        if options.zero_blocks {
            work.zero_blocks_released = release_zero_blocks(layer, relocation, progress)?;
        }
        move_blocks(relocation, &mut work, progress)?;
        relocation.shrink()?;
    }
    layer.close()?;
    Ok(work)
}

/// Gives back every block that may be released and whose data reads as zeros.
fn release_zero_blocks(
    layer: &dyn Layer,
    relocation: &dyn Relocation,
    progress: &mut dyn FnMut(&Progress),
) -> Result<u64> {
    let blocks: Vec<Releasable> = relocation
        .units()
        .into_iter()
        .filter_map(|u| u.releasable)
        .collect();
    let total = blocks.len() as u64;
    let mut buf = vec![0u8; ZERO_CHECK_CHUNK];
    // Neighbouring blocks of zeros go together: one table update for the run.
    let mut run: Vec<Range<u64>> = Vec::new();
    let mut released = 0;
    for (i, block) in blocks.iter().enumerate() {
        let range = block.disk_range.clone();
        let zeros = reads_zeros(layer, block, &mut buf)?;
        if !zeros || run.last().is_some_and(|last| last.end != range.start) {
            released += release_run(layer, &mut run)?;
        }
        if zeros {
            run.push(range);
        }
        progress(&Progress {
            stage: Stage::FindingZeroBlocks,
            done: i as u64 + 1,
            total,
            moved_bytes: 0,
        });
    }
    released += release_run(layer, &mut run)?;
    Ok(released)
}

/// Whether the data of `block` in the file is all zeros.
fn reads_zeros(layer: &dyn Layer, block: &Releasable, buf: &mut [u8]) -> Result<bool> {
    let len = block.disk_range.end - block.disk_range.start;
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        layer.read_mapped(&mut buf[..n], block.data_at + at)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// Releases the neighbouring disk ranges of `run` with one request and empties it;
/// returns how many of them were released.
fn release_run(layer: &dyn Layer, run: &mut Vec<Range<u64>>) -> Result<u64> {
    let (Some(first), Some(last)) = (run.first(), run.last()) else {
        return Ok(0);
    };
    let (start, end) = (first.start, last.end);
    let kept = layer.release_blocks(start, end - start)?;
    let released = run
        .iter()
        .filter(|r| {
            !kept
                .iter()
                .any(|&(at, len)| at < r.end && r.start < at + len)
        })
        .count();
    run.clear();
    Ok(released as u64)
}

/// Moves blocks, the highest in the file first, into the lowest free space below them
/// that fits them, in batches.
fn move_blocks(
    relocation: &dyn Relocation,
    report: &mut Compaction,
    progress: &mut dyn FnMut(&Progress),
) -> Result<()> {
    let mut free = relocation.free_space();
    let mut units = relocation.units();
    units.sort_unstable_by_key(|u| std::cmp::Reverse(u.at));
    let total = units.len() as u64;
    // Nothing runs beside a compaction: the gate is never pinned.
    let gate = SpaceGate::default();
    let mut batch: Vec<(Unit, u64)> = Vec::new();
    let mut batch_bytes = 0;
    for (i, unit) in units.into_iter().enumerate() {
        let to = free.take(unit.len, &gate, |range| {
            relocation
                .place(range, unit.len)
                .filter(|&at| at + unit.len <= unit.at)
        });
        if let Some(to) = to {
            batch_bytes += unit.len;
            batch.push((unit, to));
            if batch_bytes >= BATCH_BYTES {
                commit_batch(relocation, &mut batch, &mut free, report)?;
                batch_bytes = 0;
            }
        }
        progress(&Progress {
            stage: Stage::Moving,
            done: i as u64 + 1,
            total,
            moved_bytes: report.bytes_moved + batch_bytes,
        });
    }
    commit_batch(relocation, &mut batch, &mut free, report)
}

/// Moves a batch; only then is the space the blocks left free for later ones.
fn commit_batch(
    relocation: &dyn Relocation,
    batch: &mut Vec<(Unit, u64)>,
    free: &mut FreeSpace,
    report: &mut Compaction,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    relocation.relocate(batch)?;
    for (unit, _) in batch.drain(..) {
        free.insert(unit.at..unit.at + unit.len);
        report.blocks_moved += 1;
        report.bytes_moved += unit.len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Crashing, MemStorage, Storage};
    use crate::vhd::{VhdCreateOptions, VhdKind, create_vhd};
    use crate::vhdx::create::{VhdxCreateOptions, VhdxKind, create_vhdx};
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use std::sync::Arc;

    const MIB: u64 = 1 << 20;

    /// The image kinds compacted here: (name, disk size, block size, logical sector).
    const KINDS: [(&str, u64, u64, u32); 3] = [
        ("vhd", 6 * MIB, 64 << 10, 512),
        ("vhdx", 16 * MIB, MIB, 512),
        ("vhdx", 16 * MIB, MIB, 4096),
    ];

    fn create(format: &str, size: u64, block: u64, sector: u32) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        match format {
            "vhd" => {
                let mut options = VhdCreateOptions::new(size, VhdKind::Dynamic);
                options.block_size = block as u32;
                create_vhd(&path, &options).unwrap();
            }
            _ => {
                let mut options = VhdxCreateOptions::new(size, VhdxKind::Dynamic);
                options.block_size = block as u32;
                options.logical_sector_size = sector;
                create_vhdx(&path, &options).unwrap();
            }
        }
        std::fs::read(path).unwrap()
    }

    fn open(storage: Box<dyn Storage>, read_only: bool) -> Result<Box<dyn Layer>> {
        let options = OpenOptions {
            read_only,
            ..OpenOptions::default()
        };
        open_layer(storage, &options, &MetadataBudget::default())
    }

    fn read_all(disk: &dyn Layer) -> Vec<u8> {
        let mut all = vec![0u8; disk.size() as usize];
        disk.read_at(&mut all, 0).unwrap();
        all
    }

    /// An image whose blocks were written in a shuffled order, then a third of them
    /// discarded and some overwritten with zeros: holes everywhere in the file. Returns
    /// the file and its disk's contents.
    fn fragmented(format: &str, size: u64, block: u64, sector: u32) -> (Vec<u8>, Vec<u8>) {
        let storage = Arc::new(MemStorage::from_vec(create(format, size, block, sector)));
        let disk = open(Box::new(storage.clone()), false).unwrap();
        let blocks = size / block;
        let mut order: Vec<u64> = (0..blocks).collect();
        let mut rng = StdRng::seed_from_u64(blocks);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        for &b in &order {
            let mut data = vec![0u8; block as usize];
            rng.fill(&mut data[..]);
            disk.write_at(&data, b * block).unwrap();
        }
        for &b in order.iter().step_by(3) {
            disk.discard(b * block, block).unwrap();
        }
        for &b in order.iter().skip(1).step_by(5) {
            disk.write_at(&vec![0; block as usize], b * block).unwrap();
        }
        let contents = read_all(disk.as_ref());
        disk.close().unwrap();
        (storage.contents(), contents)
    }

    fn compact_mem(storage: Box<dyn Storage>, zero_blocks: bool) -> Result<Compaction> {
        let disk = open(storage, false)?;
        let options = CompactOptions {
            zero_blocks,
            force: false,
        };
        compact_layer(disk.as_ref(), &options, &mut |_| {})
    }

    #[test]
    fn compaction_packs_the_blocks_and_keeps_the_contents() {
        for (format, size, block, sector) in KINDS {
            let what = format!("{format} with {sector}-byte sectors");
            let (image, contents) = fragmented(format, size, block, sector);
            let units_before = open(Box::new(MemStorage::from_vec(image.clone())), true)
                .unwrap()
                .relocation()
                .unwrap()
                .units()
                .len();
            for zero_blocks in [false, true] {
                let storage = Arc::new(MemStorage::from_vec(image.clone()));
                let report = compact_mem(Box::new(storage.clone()), zero_blocks).unwrap();
                assert!(report.blocks_moved > 0, "{what}: {report:?}");
                let disk = open(Box::new(storage.clone()), true).unwrap();
                assert!(
                    read_all(disk.as_ref()) == contents,
                    "{what}: contents changed"
                );
                let units = disk.relocation().unwrap().units();
                let live: u64 = units.iter().map(|u| u.len).sum();
                // VHD blocks keep their data on page boundaries: up to a page per block.
                let metadata = match format {
                    "vhd" => (64 << 10) + units.len() as u64 * 4096,
                    _ => 4 * MIB,
                };
                let len = storage.len().unwrap();
                assert!(
                    len <= live + metadata + 2 * block,
                    "{what}: {len} bytes left for {live} bytes of blocks"
                );
                let blocks_with_data = contents
                    .chunks(block as usize)
                    .filter(|b| b.iter().any(|&x| x != 0))
                    .count();
                let expected = match zero_blocks {
                    true => blocks_with_data,
                    false => units_before,
                };
                assert_eq!(units.len(), expected, "{what}: zero_blocks={zero_blocks}");
                drop(disk);
                let again = compact_mem(Box::new(storage.clone()), zero_blocks).unwrap();
                assert_eq!(again.blocks_moved, 0, "{what}: a second run moved blocks");
            }
        }
    }

    #[test]
    fn a_crash_at_any_instant_of_a_compaction_keeps_the_contents() {
        for (format, size, block, sector) in [
            ("vhd", 2 * MIB, 64 << 10, 512),
            ("vhdx", 8 * MIB, MIB, 4096),
        ] {
            let (image, contents) = fragmented(format, size, block, sector);
            let storage = Arc::new(Crashing::new(
                MemStorage::from_vec(image),
                move |crashed, what| {
                    let disk =
                        open(Box::new(crashed), true).unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(
                        read_all(disk.as_ref()) == contents,
                        "{what}: the contents changed"
                    );
                },
            ));
            compact_mem(Box::new(storage.clone()), true).unwrap();
            storage.check_crashes();
            let checked = storage.checked();
            assert!(checked > 30, "{format}: only {checked} crash states");
        }
    }
}

//! `vdisk resize`: changes a VHD's or VHDX's disk size in place. A larger disk reads zeros
//! in its new range; a smaller one is cut only when asked (`shrink`), and only where the
//! cut range holds no data unless forced. The drivers make room for a larger block table
//! and write the new size crash-safely ([`Resize`]); here the image is locked like a
//! read-write mount and the user's intent checked.
//!
//! [`Resize`]: crate::relocation::Resize

use crate::chain::{self, ImageContext};
use crate::compact::human;
use crate::disk::{Allocation, OpenOptions, VirtualDisk};
use crate::error::{Error, IoContext, Result};
use crate::lock;
use serde::Serialize;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bytes read at a time when looking for data in the range a shrink cuts off.
const CHUNK: usize = 4 << 20;

#[derive(Debug, Clone, Default)]
pub struct ResizeOptions {
    /// Allow a smaller size.
    pub shrink: bool,
    /// Cut off data past a smaller size, and resize a parent of differencing images found
    /// beside it.
    pub force: bool,
}

/// What a resize did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ResizeReport {
    pub image: String,
    pub format: String,
    pub size_before: u64,
    /// The size asked for, or the next the image can express (a VHD sized by geometry).
    pub size_after: u64,
    /// File length before and after.
    pub length_before: u64,
    pub length_after: u64,
    /// Blocks moved out of the way of a growing block table.
    pub blocks_moved: u64,
    /// Bytes of the disk's data (as its allocation map shows it) past a smaller size,
    /// dropped with `force`.
    pub data_discarded: u64,
}

impl fmt::Display for ResizeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} -> {} ({} bytes)",
            self.image,
            human(self.size_before),
            human(self.size_after),
            self.size_after
        )?;
        if self.blocks_moved > 0 {
            write!(
                f,
                "; {} blocks moved to make room for the block table",
                self.blocks_moved
            )?;
        }
        if self.data_discarded > 0 {
            write!(
                f,
                "; {} of data past the new end discarded",
                human(self.data_discarded)
            )?;
        }
        writeln!(f)
    }
}

/// Resizes the disk of the image at `path` to `size` bytes (or the next size it can
/// express).
pub fn resize(path: &Path, size: u64, options: &ResizeOptions) -> Result<ResizeReport> {
    resize_file(path, size, options).map_err(|e| e.with_file(path))
}

fn resize_file(path: &Path, size: u64, options: &ResizeOptions) -> Result<ResizeReport> {
    let file = lock::open_locked(path, false)?;
    if !options.force {
        let children = chain::children_beside(path)?;
        if let Some(child) = children.first() {
            return Err(Error::invalid_input(format!(
                "{} is the parent of the differencing image {}{}. A VHDX child stops opening \
                 once its parent's DataWriteGuid changes, as a resize changes it, and a VHD \
                 child reads past its parent's old end whatever the parent holds there; \
                 pass --force to resize anyway",
                path.display(),
                child.display(),
                match children.len() {
                    1 => String::new(),
                    n => format!(" (and {} more)", n - 1),
                }
            )));
        }
    }
    let meta = file
        .metadata()
        .context(|| "cannot read file attributes".to_string())?;
    let open = OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    };
    let context = ImageContext::top(path, &meta, None)?;
    let disk = chain::open_chain(
        Box::new(crate::storage::FileStorage::new(file)),
        &open,
        &context,
    )?;
    let resizing = disk.resizing().ok_or_else(|| {
        Error::unsupported(format!("a {} image cannot be resized", disk.format()))
    })?;
    let before = disk.size();
    let after = resizing.fit_size(size)?;
    let mut report = ResizeReport {
        image: path.display().to_string(),
        format: disk.format().to_string(),
        size_before: before,
        size_after: after,
        length_before: meta.len(),
        length_after: meta.len(),
        blocks_moved: 0,
        data_discarded: 0,
    };
    if after < before {
        if !options.shrink {
            return Err(Error::invalid_input(format!(
                "{after} bytes is smaller than the disk's {before}; pass --shrink to cut it"
            )));
        }
        if let Some(parent) = disk.parent_layer() {
            let parent_size = parent.layer.size();
            if after < parent_size {
                return Err(Error::invalid_input(format!(
                    "a differencing disk cannot be smaller than its parent {} ({parent_size} \
                     bytes): its end would read the parent's data again once it grows",
                    parent.path.display()
                )));
            }
        }
        report.data_discarded = data_past(disk.as_ref(), after, options.force)?;
    }
    // A fixed image the host had fully allocated (as `create` makes it, so Hyper-V takes
    // it) stays so; one made `--sparse` stays sparse.
    let keep_allocated = disk.facts().subtype == "fixed" && meta.blocks() * 512 >= meta.len();
    report.blocks_moved = resizing.resize(after)?;
    drop(disk);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .context(|| "cannot reopen image".to_string())?;
    report.length_after = file
        .metadata()
        .context(|| "cannot read file attributes".to_string())?
        .len();
    if keep_allocated {
        crate::storage::allocate(&file, report.length_after)
            .context(|| "allocating the grown image on the host".to_string())?;
    }
    Ok(report)
}

/// Bytes of data the allocation map shows in the disk past `end`. Unless `force`, any of
/// it that does not read as zeros is refused.
fn data_past(disk: &dyn VirtualDisk, end: u64, force: bool) -> Result<u64> {
    let extents = disk.allocation(end, disk.size() - end)?;
    let mut buf = vec![0u8; CHUNK];
    let mut data = 0;
    for extent in extents.iter().filter(|e| e.state == Allocation::Data) {
        data += extent.len;
        let mut at = extent.offset;
        while !force && at < extent.offset + extent.len {
            let n = (extent.offset + extent.len - at).min(CHUNK as u64) as usize;
            disk.read_at(&mut buf[..n], at)?;
            if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                return Err(Error::invalid_input(format!(
                    "the disk holds data at offset {} past the new end ({end} bytes); pass \
                     --force to discard it",
                    at + i as u64
                )));
            }
            at += n as u64;
        }
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{CreateOptions, ImageType, create};
    use crate::disk::Format;
    use crate::layer::{Layer, MetadataBudget};
    use crate::open::open_layer;
    use crate::storage::{Crashing, MemStorage, Storage};
    use crate::vhdx::region_table::{
        BAT_REGION, METADATA_REGION, REGION_TABLE_LEN, REGION_TABLE_OFFSETS, RegionTable,
    };
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use std::hash::{DefaultHasher, Hasher};
    use std::path::PathBuf;
    use std::sync::Arc;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// An image kind resized here.
    struct Kind {
        what: &'static str,
        format: Format,
        fixed: bool,
        size: u64,
        block: u32,
        sector: u32,
    }

    const fn kind(what: &'static str, format: Format, fixed: bool, block: u32) -> Kind {
        Kind {
            what,
            format,
            fixed,
            // Not a whole number of blocks: the last one is cut by the disk's end.
            size: 6 * MIB + 4096,
            block,
            sector: 512,
        }
    }

    const KINDS: [Kind; 5] = [
        kind("dynamic vhd", Format::Vhd, false, 64 << 10),
        kind("fixed vhd", Format::Vhd, true, 64 << 10),
        kind("dynamic vhdx", Format::Vhdx, false, MIB as u32),
        Kind {
            what: "dynamic vhdx of 4096-byte sectors",
            sector: 4096,
            ..kind("", Format::Vhdx, false, MIB as u32)
        },
        kind("fixed vhdx", Format::Vhdx, true, MIB as u32),
    ];

    fn create_in(dir: &Path, name: &str, kind: &Kind, parent: Option<PathBuf>) -> PathBuf {
        let path = dir.join(name);
        let options = CreateOptions {
            format: Some(kind.format),
            image_type: Some(match kind.fixed {
                true => ImageType::Fixed,
                false => ImageType::Dynamic,
            }),
            size: parent.is_none().then_some(kind.size),
            block_size: Some(kind.block),
            logical_sector_size: (parent.is_none() && kind.format == Format::Vhdx)
                .then_some(kind.sector),
            parent,
            ..CreateOptions::default()
        };
        create(&path, &options).unwrap();
        path
    }

    /// A size between a quarter and the whole of `kind`'s, inside a block.
    fn smaller(kind: &Kind) -> u64 {
        kind.size / 2 / 4096 * 4096 + 4096
    }

    /// A larger size: for dynamic disks one whose BAT needs more room (for VHD blocks of
    /// 64 KiB, 640 entries where 97 fit before the first block).
    fn larger(kind: &Kind) -> u64 {
        match kind.fixed {
            true => 2 * kind.size,
            false => 40 * MIB,
        }
    }

    /// A new image of `kind` holding random data in its first block, in its middle and
    /// up to its end.
    fn populated(kind: &Kind) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let image = std::fs::read(create_in(dir.path(), "image", kind, None)).unwrap();
        let storage = Arc::new(MemStorage::from_vec(image));
        let disk = open(Box::new(storage.clone()), false).unwrap();
        let mut rng = StdRng::seed_from_u64(kind.size);
        for at in [0, kind.size / 2, kind.size - 3 * 4096] {
            let mut data = vec![0u8; 3 * 4096];
            rng.fill(&mut data[..]);
            disk.write_at(&data, at).unwrap();
        }
        disk.close().unwrap();
        storage.contents()
    }

    fn open(storage: Box<dyn Storage>, read_only: bool) -> Result<Box<dyn Layer>> {
        let options = OpenOptions {
            read_only,
            ..OpenOptions::default()
        };
        open_layer(storage, &options, &MetadataBudget::default())
    }

    /// What a disk reads, whatever its size or layout: its size, and a hash of every
    /// 4 KiB piece of it (by offset) that holds anything but zeros.
    fn state(disk: &dyn VirtualDisk) -> (u64, u64) {
        let mut hasher = DefaultHasher::new();
        let mut buf = vec![0u8; MIB as usize];
        let zeros = [0u8; 4096];
        // Everything before this is hashed.
        let mut done = 0;
        let extents = disk.allocation(0, disk.size()).unwrap();
        for extent in extents.iter().filter(|e| e.state == Allocation::Data) {
            let mut at = (extent.offset / 4096 * 4096).max(done);
            let end = (extent.offset + extent.len)
                .next_multiple_of(4096)
                .min(disk.size());
            while at < end {
                let n = (end - at).min(MIB) as usize;
                disk.read_at(&mut buf[..n], at).unwrap();
                for (i, piece) in buf[..n].chunks(4096).enumerate() {
                    if piece != &zeros[..piece.len()] {
                        hasher.write_u64(at + i as u64 * 4096);
                        hasher.write(piece);
                    }
                }
                at += n as u64;
            }
            done = done.max(end);
        }
        (disk.size(), hasher.finish())
    }

    fn state_of(image: Vec<u8>) -> (u64, u64) {
        state(
            open(Box::new(MemStorage::from_vec(image)), true)
                .unwrap()
                .as_ref(),
        )
    }

    /// Resizes the image in `storage` (which nothing else uses) to `size`; returns the
    /// units moved.
    fn resize_mem(storage: Box<dyn Storage>, size: u64) -> Result<u64> {
        let disk = open(storage, false)?;
        let resizing = disk.resizing().unwrap();
        let size = resizing.fit_size(size)?;
        resizing.resize(size)
    }

    /// The image after a resize to `size`, checked against `before`: the same data up
    /// to the smaller size, zeros past it.
    fn resized(image: &[u8], size: u64, what: &str) -> Vec<u8> {
        let storage = Arc::new(MemStorage::from_vec(image.to_vec()));
        resize_mem(Box::new(storage.clone()), size).unwrap();
        let before = open(Box::new(MemStorage::from_vec(image.to_vec())), true).unwrap();
        let after = open(Box::new(storage.clone()), true).unwrap();
        assert_eq!(after.size(), size, "{what}");
        let common = before.size().min(size);
        let mut old = vec![0u8; common as usize];
        let mut new = vec![0u8; common as usize];
        before.read_at(&mut old, 0).unwrap();
        after.read_at(&mut new, 0).unwrap();
        assert!(old == new, "{what}: the data changed");
        if size > common {
            let mut tail = vec![0u8; (size - common).min(64 * MIB) as usize];
            after.read_at(&mut tail, common).unwrap();
            assert!(
                tail == vec![0; tail.len()],
                "{what}: the new range holds data"
            );
        }
        storage.contents()
    }

    /// Writes past the old end (and at the new end) of a grown image, and reads it back
    /// after reopening.
    fn write_past(image: Vec<u8>, old_size: u64, what: &str) {
        let storage = Arc::new(MemStorage::from_vec(image));
        let disk = open(Box::new(storage.clone()), false).unwrap();
        let size = disk.size();
        let mut places = vec![old_size];
        for at in [(old_size + size) / 2 / 4096 * 4096, size - 4096] {
            if at >= places.last().unwrap() + 4096 {
                places.push(at);
            }
        }
        for (i, &at) in places.iter().enumerate() {
            disk.write_at(&[0xA0 + i as u8; 4096], at).unwrap();
        }
        disk.close().unwrap();
        let disk = open(Box::new(storage), true).unwrap();
        for (i, &at) in places.iter().enumerate() {
            let mut buf = [0u8; 4096];
            disk.read_at(&mut buf, at).unwrap();
            assert!(buf == [0xA0 + i as u8; 4096], "{what}: write at {at} lost");
        }
    }

    #[test]
    fn a_grown_disk_keeps_its_data_and_takes_writes_past_the_old_end() {
        for kind in &KINDS {
            let image = populated(kind);
            // A few sectors more, within the last block; then far more.
            for size in [kind.size + 8192, larger(kind)] {
                let what = format!("{} grown to {size}", kind.what);
                let grown = resized(&image, size, &what);
                write_past(grown, kind.size, &what);
            }
        }
    }

    #[test]
    fn the_bat_of_a_dynamic_vhd_grows_in_place_by_moving_the_first_blocks() {
        let image = populated(&KINDS[0]);
        let storage = Arc::new(MemStorage::from_vec(image.clone()));
        let size = larger(&KINDS[0]);
        let moved = resize_mem(Box::new(storage.clone()), size).unwrap();
        assert!(moved > 0, "no block moved");
        assert_eq!(state_of(storage.contents()), (size, state_of(image).1));
    }

    #[test]
    fn a_shrunk_disk_keeps_what_lies_before_its_end_and_gives_back_the_rest() {
        for kind in &KINDS {
            let image = populated(kind);
            let size = smaller(kind);
            let what = format!("{} shrunk to {size}", kind.what);
            let shrunk = resized(&image, size, &what);
            assert!(
                shrunk.len() < image.len(),
                "{what}: the file did not shrink"
            );
        }
    }

    #[test]
    fn data_cut_off_by_a_forced_shrink_does_not_come_back_when_the_disk_grows() {
        for kind in &KINDS {
            let image = populated(kind);
            // Both ends inside blocks that hold data.
            let small = smaller(kind);
            let what = format!("{} shrunk to {small} and grown back", kind.what);
            let shrunk = resized(&image, small, &what);
            resized(&shrunk, kind.size, &what);
        }
    }

    /// Checks every state a power loss could leave while `image` is resized to `size`:
    /// each opens as the disk before or after.
    fn crash_check(image: Vec<u8>, size: u64, what: &str) -> usize {
        let before = state_of(image.clone());
        let after = state_of(resized(&image, size, what));
        let what = what.to_string();
        let check_what = what.clone();
        let storage = Arc::new(Crashing::new(
            MemStorage::from_vec(image),
            move |crashed, crash| {
                let disk = open(Box::new(crashed), true)
                    .unwrap_or_else(|e| panic!("{check_what}: {crash}: {e}"));
                let found = state(disk.as_ref());
                assert!(
                    found == before || found == after,
                    "{check_what}: {crash}: the disk reads neither as before nor as after \
                     (size {})",
                    found.0
                );
            },
        ));
        resize_mem(Box::new(storage.clone()), size).unwrap();
        storage.check_crashes();
        storage.checked()
    }

    #[test]
    fn a_crash_at_any_instant_of_a_resize_leaves_the_disk_before_or_after() {
        for kind in &KINDS {
            let image = populated(kind);
            for size in [larger(kind), smaller(kind)] {
                let what = format!("{} resized to {size}", kind.what);
                let checked = crash_check(image.clone(), size, &what);
                assert!(checked > 10, "{what}: only {checked} crash states");
            }
        }
    }

    /// A dynamic VHDX laid out as Hyper-V lays them out: the metadata region before the
    /// BAT, blocks right after it.
    fn bat_last(image: &[u8]) -> Vec<u8> {
        let mut image = image.to_vec();
        let regions = RegionTable::parse(
            &image[REGION_TABLE_OFFSETS[0] as usize..][..REGION_TABLE_LEN],
            "region table 1",
        )
        .unwrap();
        let (bat, metadata) = (regions.find(BAT_REGION), regions.find(METADATA_REGION));
        let (bat_at, meta_at) = (bat.file_offset as usize, metadata.file_offset as usize);
        assert_eq!((bat.length, metadata.length), (MIB as u32, MIB as u32));
        let bat_bytes = image[bat_at..bat_at + MIB as usize].to_vec();
        image.copy_within(meta_at..meta_at + MIB as usize, bat_at);
        image[meta_at..meta_at + MIB as usize].copy_from_slice(&bat_bytes);
        let mut swapped = regions.clone();
        for region in &mut swapped.entries {
            region.file_offset = match region.guid {
                BAT_REGION => meta_at as u64,
                _ => bat_at as u64,
            };
        }
        for offset in REGION_TABLE_OFFSETS {
            image[offset as usize..][..REGION_TABLE_LEN].copy_from_slice(&swapped.to_bytes());
        }
        image
    }

    fn bat_region(image: &[u8]) -> (u64, u32) {
        let regions = RegionTable::parse(
            &image[REGION_TABLE_OFFSETS[0] as usize..][..REGION_TABLE_LEN],
            "region table 1",
        )
        .unwrap();
        let bat = regions.find(BAT_REGION);
        (bat.file_offset, bat.length)
    }

    #[test]
    fn the_bat_region_of_a_vhdx_grows_in_place_or_moves() {
        // 1 MiB holds the entries of a little less than 128 GiB in blocks of 1 MiB.
        let size = 128 * GIB;
        let kind = &KINDS[2];
        let ours = populated(kind);
        let hyper_v = {
            let dir = tempfile::tempdir().unwrap();
            let fresh = std::fs::read(create_in(dir.path(), "image", kind, None)).unwrap();
            let storage = Arc::new(MemStorage::from_vec(bat_last(&fresh)));
            let disk = open(Box::new(storage.clone()), false).unwrap();
            // Blocks right after the BAT, which must move for it to grow in place.
            disk.write_at(&[0x5A; 8192], 0).unwrap();
            disk.write_at(&[0xA5; 8192], kind.size - 8192).unwrap();
            disk.close().unwrap();
            storage.contents()
        };
        for (what, image, moves) in [("our layout", ours, false), ("BAT last", hyper_v, true)] {
            let (old_at, old_len) = bat_region(&image);
            let storage = Arc::new(MemStorage::from_vec(image.clone()));
            let moved = resize_mem(Box::new(storage.clone()), size).unwrap();
            let grown = storage.contents();
            let (at, len) = bat_region(&grown);
            assert_eq!(len, 2 * MIB as u32, "{what}");
            assert_eq!(
                (at == old_at, moved > 0),
                (moves, moves),
                "{what}: {old_len}"
            );
            assert_eq!(state_of(grown.clone()), (size, state_of(image.clone()).1));
            write_past(grown, kind.size, what);
            let checked = crash_check(image, size, what);
            assert!(checked > 10, "{what}: only {checked} crash states");
        }
    }

    #[test]
    fn an_old_location_in_the_way_of_a_growing_bat_is_forgotten() {
        let kind = &KINDS[2];
        let dir = tempfile::tempdir().unwrap();
        let fresh = std::fs::read(create_in(dir.path(), "image", kind, None)).unwrap();
        let storage = Arc::new(MemStorage::from_vec(bat_last(&fresh)));
        let disk = open(Box::new(storage.clone()), false).unwrap();
        // Block 0 goes right after the BAT, then leaves its place.
        disk.write_at(&[0x5A; 8192], 0).unwrap();
        disk.write_at(&[0xA5; 8192], kind.size - 8192).unwrap();
        disk.discard(0, MIB).unwrap();
        disk.close().unwrap();
        let mut image = storage.contents();
        let (bat_at, _) = bat_region(&image);
        let old_place = bat_at + MIB;
        // As Windows leaves them: UNMAPPED, naming where the block was.
        image[bat_at as usize..][..8].copy_from_slice(&(old_place | 3).to_le_bytes());
        let before = state_of(image.clone());
        let storage = Arc::new(MemStorage::from_vec(image));
        resize_mem(Box::new(storage.clone()), 128 * GIB).unwrap();
        let grown = storage.contents();
        assert_eq!(bat_region(&grown), (bat_at, 2 * MIB as u32));
        assert_eq!(grown[bat_at as usize..][..8], 3u64.to_le_bytes());
        assert_eq!(state_of(grown), (128 * GIB, before.1));
    }

    #[test]
    fn only_data_past_the_new_end_stops_a_shrink_without_force() {
        let kind = &KINDS[2];
        let storage = MemStorage::from_vec(populated(kind));
        let disk = open(Box::new(storage), false).unwrap();
        // Data in the last three pages; the block before holds zeros up to them.
        let data_at = kind.size - 3 * 4096;
        let end = data_at - MIB / 2;
        let err = data_past(disk.as_ref(), end, false).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("data at offset {data_at} ")),
            "{err}"
        );
        // Forced, it says how much of the disk held data there: its blocks.
        assert_eq!(
            data_past(disk.as_ref(), end, true).unwrap(),
            kind.size - end
        );
        // Blocks of zeros are no data.
        disk.write_at(&[0; 3 * 4096], data_at).unwrap();
        assert_eq!(
            data_past(disk.as_ref(), end, false).unwrap(),
            kind.size - end
        );
    }

    #[test]
    fn resizing_refuses_what_would_lose_data_or_break_a_chain() {
        for kind in [&KINDS[0], &KINDS[2]] {
            let dir = tempfile::tempdir().unwrap();
            let parent = create_in(dir.path(), "parent", kind, None);
            let child = create_in(dir.path(), "child", kind, Some(parent.clone()));
            let message = |path: &Path, size: u64, options: &ResizeOptions| {
                resize(path, size, options).unwrap_err().to_string()
            };
            let forced = ResizeOptions {
                shrink: true,
                force: true,
            };
            let refused = message(&parent, 2 * kind.size, &ResizeOptions::default());
            assert!(
                refused.contains("child") && refused.contains("--force"),
                "{refused}"
            );
            let refused = message(&child, kind.size / 2, &ResizeOptions::default());
            assert!(refused.contains("--shrink"), "{refused}");
            let refused = message(&child, kind.size - 512 * 8, &forced);
            assert!(refused.contains("smaller than its parent"), "{refused}");

            // A child grows past its parent, and reads zeros there.
            let chain = crate::open(&child, &OpenOptions::default()).unwrap();
            chain.write_at(&[7; 4096], 0).unwrap();
            chain.close().unwrap();
            drop(chain);
            let report = resize(&child, 3 * kind.size, &ResizeOptions::default()).unwrap();
            assert_eq!(report.size_after, 3 * kind.size);
            let chain = crate::open(&child, &OpenOptions::default()).unwrap();
            let mut past = vec![1u8; kind.size as usize];
            chain.read_at(&mut past, kind.size).unwrap();
            assert!(past.iter().all(|&b| b == 0), "{}", kind.what);
            let mut first = [0u8; 4096];
            chain.read_at(&mut first, 0).unwrap();
            assert_eq!(first, [7; 4096]);
            drop(chain);
            let report = resize(&child, kind.size, &forced).unwrap();
            assert_eq!(report.data_discarded, 0, "{report}");
        }
    }
}

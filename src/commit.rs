//! `vdisk commit`: merges a differencing image into its parent, as Hyper-V's Merge-VHD
//! does. Every range the child holds (its own data, and zeros it shows over the parent's
//! data) is written into the parent, then the child is removed, or with `--keep-child`
//! emptied so that it reads everything from its parent again.
//!
//! The steps, each durable before the next, so that a crash at any instant leaves the
//! child opening and reading as before (until it is removed) and each sector of the
//! parent as before or after:
//!
//! 1. The child's ranges go into the parent through the parent driver's own write path
//!    (zeros as discards), its identity kept (`OpenOptions::keep_identity`): the child
//!    names a VHDX parent by DataWriteGuid, which writes would renew, and what the child
//!    reads does not change while its parent takes in what the child already shows.
//! 2. With `--keep-child`, the child's blocks go back to the parent
//!    ([`Layer::clear_to_parent`]): it reads the same, now from the parent.
//! 3. The parent takes the identity its changed data calls for, named in the child first
//!    ([`Layer::relink_merged_parent`]); other children of the old data then refuse it.
//! 4. Without `--keep-child`, the child is removed.
//!
//! Running it again after a crash finishes the job: merging again writes the same data.
//! Both images are locked as a read-write mount locks its image for the whole run.

use crate::chain::{self, ImageContext};
use crate::compact::human;
use crate::disk::{Allocation, OpenOptions};
use crate::error::{Error, IoContext, Result};
use crate::layer::{ChainRun, Layer, Parent, Source, chain_map};
use crate::lock;
use crate::storage::FileStorage;
use serde::Serialize;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

/// Most of the disk mapped at once: a window's runs are held in memory together.
const WINDOW: u64 = 64 << 20;
/// Bytes copied from the child to the parent at a time.
const COPY_CHUNK: usize = 4 << 20;
/// Zeros in the child's data are found in pieces of this size: the parent is given them
/// as discards, which need not allocate.
const ZERO_PIECE: usize = 64 << 10;

#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// Keep the child, emptied, instead of removing it.
    pub keep_child: bool,
    /// Merge even when other differencing images beside the parent name it as theirs, or
    /// images beside the child name the child (which removing it would orphan).
    pub force: bool,
}

/// How far a merge has come: bytes of the child's ranges written into the parent, of
/// `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// What a merge did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CommitReport {
    pub child: String,
    pub parent: String,
    pub format: String,
    #[serde(flatten)]
    pub work: Merge,
    /// Whether the child is still there (emptied).
    pub child_kept: bool,
}

/// What merging an open child into its parent wrote.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Merge {
    /// Bytes of the child's data written into the parent.
    pub bytes_written: u64,
    /// Bytes the child reads as zeros that the parent held data in, made zeros there.
    pub bytes_zeroed: u64,
}

impl fmt::Display for CommitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} merged into {}: {} written, {} zeroed; child {}",
            self.child,
            self.parent,
            human(self.work.bytes_written),
            human(self.work.bytes_zeroed),
            match self.child_kept {
                true => "kept, empty",
                false => "removed",
            }
        )
    }
}

/// Merges the differencing image at `child` into its parent, calling `progress` as it
/// goes.
pub fn commit(
    child: &Path,
    options: &CommitOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<CommitReport> {
    commit_file(child, options, progress).map_err(|e| e.with_file(child))
}

fn commit_file(
    path: &Path,
    options: &CommitOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<CommitReport> {
    // The chain locks the parent the same way.
    let file = lock::open_locked(path, false)?;
    let meta = file
        .metadata()
        .context(|| "cannot read file attributes".to_string())?;
    if !meta.is_file() {
        return Err(Error::invalid_input("not a regular file"));
    }
    let open = OpenOptions {
        writable_parent: true,
        ..OpenOptions::default()
    };
    let context = ImageContext::top(path, &meta, None)?;
    let child = chain::open_chain(Box::new(FileStorage::new(file)), &open, &context)?;
    let parent = merged_parent(child.as_ref())?.path.clone();
    if !options.force {
        refuse_other_users(path, &parent, options.keep_child)?;
    }
    let report = CommitReport {
        child: path.display().to_string(),
        parent: parent.display().to_string(),
        format: child.format().to_string(),
        work: commit_layer(child.as_ref(), options.keep_child, progress)?,
        child_kept: options.keep_child,
    };
    if !options.keep_child {
        remove(path)?;
    }
    Ok(report)
}

/// The parent a merge writes into.
fn merged_parent(child: &dyn Layer) -> Result<&Parent> {
    child.parent_layer().ok_or_else(|| {
        Error::invalid_input("not a differencing image: it has no parent to merge into")
    })
}

/// Refuses a merge that would change the parent under other children found beside it,
/// or (unless the child is kept) orphan children of the child.
fn refuse_other_users(child: &Path, parent: &Path, keep_child: bool) -> Result<()> {
    let itself = child
        .canonicalize()
        .context(|| "cannot resolve the image path".to_string())?;
    let siblings: Vec<PathBuf> = chain::children_beside(parent)?
        .into_iter()
        .filter(|c| c.canonicalize().ok().as_ref() != Some(&itself))
        .collect();
    if !siblings.is_empty() {
        return Err(Error::invalid_input(format!(
            "{} is also the parent of the differencing image {}, whose disk would change \
             under it (a VHDX child then refuses its parent, a VHD child reads other data); \
             pass --force if it may",
            parent.display(),
            chain::name_children(&siblings)
        )));
    }
    let children = chain::children_beside(child)?;
    if !keep_child && !children.is_empty() {
        return Err(Error::invalid_input(format!(
            "{} is the parent of the differencing image {}, which removing it would leave \
             without its parent; pass --keep-child to keep it (emptied), or --force",
            child.display(),
            chain::name_children(&children)
        )));
    }
    Ok(())
}

/// Removes the merged child, durably.
fn remove(path: &Path) -> Result<()> {
    fs::remove_file(path).context(|| "cannot remove the merged image".to_string())?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .context(|| format!("flushing directory {}", dir.display()))
}

/// Merges `child`, opened writable with its parent attached writable (see
/// [`OpenOptions::writable_parent`]) and used by nothing else, into the parent; empties
/// the child if it is kept, and closes both. [`commit`] does this for an image file, with
/// the locks and checks a user needs, and removes the child unless kept.
pub fn commit_layer(
    child: &dyn Layer,
    keep_child: bool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Merge> {
    let parent = merged_parent(child)?;
    let in_parent = |e: Error| e.with_file(&parent.path);
    let target = parent.layer.as_ref();
    let total = merged_bytes(child, target.size())?;
    let mut merge = Merge::default();
    let mut done = 0;
    let mut buf = vec![0u8; COPY_CHUNK];
    own_runs(child, child.size().min(target.size()), |run, data_at| {
        match data_at {
            Some(file_offset) => read_chunks(child, run, file_offset, 0, &mut buf, |at, data| {
                let mut piece_at = 0;
                for (len, zeros) in zero_pieces(data) {
                    let at = at + piece_at as u64;
                    if zeros {
                        merge.bytes_zeroed += zero(target, at, len as u64).map_err(in_parent)?;
                    } else {
                        target
                            .write_at(&data[piece_at..piece_at + len], at)
                            .map_err(in_parent)?;
                        merge.bytes_written += len as u64;
                    }
                    piece_at += len;
                }
                Ok(())
            }),
            None => zero(target, run.offset, run.len)
                .map(|n| merge.bytes_zeroed += n)
                .map_err(in_parent),
        }?;
        done += run.len;
        progress(&Progress { done, total });
        Ok(())
    })?;
    target.flush().map_err(in_parent)?;
    if keep_child {
        child.clear_to_parent()?;
    }
    child.relink_merged_parent()?;
    child.close()?;
    target.close().map_err(in_parent).map(|()| merge)
}

/// Hands `f` each run of `[0, len)` that `child` holds itself: data, with where it is in
/// the child's file, or zeros (`None`). The rest is the parent's, or past its end.
fn own_runs(
    child: &dyn Layer,
    len: u64,
    mut f: impl FnMut(&ChainRun, Option<u64>) -> Result<()>,
) -> Result<()> {
    let windows = (0..len.div_ceil(WINDOW)).map(|i| (i * WINDOW, (len - i * WINDOW).min(WINDOW)));
    for (at, n) in windows {
        for run in chain_map(child, at, n)? {
            match run.source {
                Source::File {
                    level: 0,
                    file_offset,
                } => f(&run, Some(file_offset))?,
                Source::Zero { level: 0 } => f(&run, None)?,
                _ => {}
            }
        }
    }
    Ok(())
}

/// Reads the data of `run` (at `file_offset` in the child's file) from `from` bytes into
/// it, a chunk of `buf` at a time, handing `f` each chunk and where it lies on the disk.
fn read_chunks(
    child: &dyn Layer,
    run: &ChainRun,
    file_offset: u64,
    from: u64,
    buf: &mut [u8],
    mut f: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let mut done = from;
    while done < run.len {
        let n = (run.len - done).min(buf.len() as u64) as usize;
        child.read_mapped(&mut buf[..n], file_offset + done)?;
        f(run.offset + done, &buf[..n])?;
        done += n as u64;
    }
    Ok(())
}

/// `data` split where it turns from zeros to data or back, in pieces of `ZERO_PIECE`
/// bytes: (length, whether all zeros).
fn zero_pieces(data: &[u8]) -> Vec<(usize, bool)> {
    let mut pieces: Vec<(usize, bool)> = Vec::new();
    for piece in data.chunks(ZERO_PIECE) {
        let zeros = piece.iter().all(|&b| b == 0);
        match pieces.last_mut() {
            Some((len, last)) if *last == zeros => *len += piece.len(),
            _ => pieces.push((piece.len(), zeros)),
        }
    }
    pieces
}

/// Bytes of the ranges `child` holds inside a parent of `parent_size` bytes. Data past
/// the parent's end (a child made larger) cannot be merged: refused before anything is
/// written, unless it is all zeros, which the parent's end reads anyway.
fn merged_bytes(child: &dyn Layer, parent_size: u64) -> Result<u64> {
    let mut total = 0;
    let mut buf = vec![0u8; COPY_CHUNK];
    own_runs(child, child.size(), |run, data_at| {
        let inside = parent_size.saturating_sub(run.offset).min(run.len);
        total += inside;
        let Some(file_offset) = data_at else {
            return Ok(());
        };
        read_chunks(
            child,
            run,
            file_offset,
            inside,
            &mut buf,
            |at, data| match data.iter().position(|&b| b != 0) {
                Some(i) => Err(Error::unsupported(format!(
                    "holds data at offset {} past the end of its {parent_size}-byte parent; \
                     merging it would lose that data (grow the parent first)",
                    at + i as u64
                ))),
                None => Ok(()),
            },
        )
    })?;
    Ok(total)
}

/// Makes `[at, at + len)` of `parent` read as zeros, unless it does already; returns the
/// bytes that had to change.
fn zero(parent: &dyn Layer, at: u64, len: u64) -> Result<u64> {
    let holds_data = parent
        .allocation(at, len)?
        .iter()
        .any(|e| e.state == Allocation::Data);
    if !holds_data {
        return Ok(0);
    }
    parent.discard(at, len)?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{CreateOptions, ImageType, create};
    use crate::disk::{Format, VirtualDisk};
    use crate::layer::MetadataBudget;
    use crate::open::open_layer;
    use crate::storage::{MemStorage, Storage};
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    const MIB: u64 = 1 << 20;

    /// An image kind to merge into: (format, type, disk size, block size, logical sector).
    type Kind = (Format, ImageType, u64, u32, u32);

    const KINDS: [Kind; 5] = [
        (Format::Vhd, ImageType::Dynamic, 3 * MIB, 64 << 10, 512),
        (Format::Vhd, ImageType::Fixed, 3 * MIB, 64 << 10, 512),
        (Format::Vhdx, ImageType::Dynamic, 6 * MIB, MIB as u32, 512),
        (Format::Vhdx, ImageType::Dynamic, 6 * MIB, MIB as u32, 4096),
        (Format::Vhdx, ImageType::Fixed, 6 * MIB, MIB as u32, 512),
    ];

    /// Data in every parent, discarded in every child: a whole block of the children, which
    /// a VHDX child then reads as zeros without holding data.
    const WHOLE_BLOCK: std::ops::Range<u64> = MIB..2 * MIB;

    fn extension(format: Format) -> &'static str {
        match format {
            Format::Vhd => "vhd",
            _ => "vhdx",
        }
    }

    /// Random writes of every shape (inside a sector, across sectors and blocks), some of
    /// them zeros, and discards, through the library.
    fn scribble(path: &Path, seed: u64, count: usize) {
        let disk = crate::open(path, &OpenOptions::default()).unwrap();
        let size = disk.size();
        let mut rng = StdRng::seed_from_u64(seed);
        for i in 0..count {
            let len = match i % 3 {
                0 => rng.random_range(1..1024),
                1 => rng.random_range(512..200 << 10),
                _ => rng.random_range(1..(3 * MIB / 2) as usize),
            }
            .min(size as usize) as u64;
            let at = rng.random_range(0..=size - len);
            match i % 5 {
                3 => disk.discard(at, len).unwrap(),
                4 => disk.write_at(&vec![0; len as usize], at).unwrap(),
                _ => {
                    let mut data = vec![0u8; len as usize];
                    rng.fill(&mut data[..]);
                    disk.write_at(&data, at).unwrap();
                }
            }
        }
        disk.close().unwrap();
    }

    /// Images in a directory, to be merged in memory under the same names in `/vm`.
    struct Images {
        dir: tempfile::TempDir,
        format: Format,
    }

    impl Images {
        /// A parent of `kind` written at random, and over it a child given `writes` random
        /// writes and discards.
        fn new((format, image_type, size, block, sector): Kind, writes: usize) -> Images {
            let images = Images {
                dir: tempfile::tempdir().unwrap(),
                format,
            };
            let base = images.path("base");
            let options = CreateOptions {
                format: Some(format),
                image_type: Some(image_type),
                size: Some(size),
                block_size: Some(block),
                logical_sector_size: Some(sector),
                ..CreateOptions::default()
            };
            create(&base, &options).unwrap();
            scribble(&base, size, 8);
            let disk = crate::open(&base, &OpenOptions::default()).unwrap();
            disk.write_at(&[0x5A; MIB as usize], WHOLE_BLOCK.start)
                .unwrap();
            disk.close().unwrap();
            images.add_child("child", "base", writes);
            images
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir
                .path()
                .join(format!("{name}.{}", extension(self.format)))
        }

        /// A child of `parent` named `name`, given `writes` random writes and discards.
        fn add_child(&self, name: &str, parent: &str, writes: usize) {
            let block = match self.format {
                Format::Vhd => 128 << 10,
                _ => MIB as u32,
            };
            let options = CreateOptions {
                block_size: Some(block),
                parent: Some(self.path(parent)),
                ..CreateOptions::default()
            };
            create(&self.path(name), &options).unwrap();
            scribble(&self.path(name), writes as u64 + name.len() as u64, writes);
            let disk = crate::open(&self.path(name), &OpenOptions::default()).unwrap();
            disk.discard(WHOLE_BLOCK.start, WHOLE_BLOCK.end - WHOLE_BLOCK.start)
                .unwrap();
            disk.close().unwrap();
        }

        /// The files in memory, by their names in `/vm`.
        fn in_memory(&self, names: &[&str]) -> Vec<Arc<MemStorage>> {
            names
                .iter()
                .map(|name| Arc::new(MemStorage::from_vec(fs::read(self.path(name)).unwrap())))
                .collect()
        }
    }

    fn vm_path(format: Format, name: &str) -> PathBuf {
        PathBuf::from(format!("/vm/{name}.{}", extension(format)))
    }

    /// Opens `/vm/{names[0]}` with its chain from `files` (named as `names`), the first
    /// parent writable if `merging`.
    fn open_chain_in_memory(
        format: Format,
        names: &[&str],
        files: &[Arc<dyn Storage>],
        merging: bool,
    ) -> Result<Box<dyn Layer>> {
        let map: BTreeMap<PathBuf, Arc<dyn Storage>> = names
            .iter()
            .zip(files)
            .skip(1)
            .map(|(name, file)| (vm_path(format, name), file.clone()))
            .collect();
        let context = ImageContext::in_memory(&vm_path(format, names[0]), map);
        let options = OpenOptions {
            read_only: !merging,
            writable_parent: merging,
            ..OpenOptions::default()
        };
        chain::open_chain(Box::new(files[0].clone()), &options, &context)
    }

    fn read_all(disk: &dyn VirtualDisk) -> Vec<u8> {
        let mut all = vec![0u8; disk.size() as usize];
        disk.read_at(&mut all, 0).unwrap();
        all
    }

    /// What the image in `storage` alone (a base image) reads.
    fn read_alone(storage: &Arc<MemStorage>) -> Result<Vec<u8>> {
        let options = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        let disk = open_layer(
            Box::new(storage.clone()),
            &options,
            &MetadataBudget::default(),
        )?;
        Ok(read_all(disk.as_ref()))
    }

    fn dyn_files(files: &[Arc<MemStorage>]) -> Vec<Arc<dyn Storage>> {
        files
            .iter()
            .map(|f| f.clone() as Arc<dyn Storage>)
            .collect()
    }

    #[test]
    fn the_parent_reads_as_the_child_did_and_a_kept_child_reads_it() {
        for kind in KINDS {
            let images = Images::new(kind, 12);
            for keep_child in [false, true] {
                let what = format!("{kind:?}, keep_child {keep_child}");
                let files = images.in_memory(&["child", "base"]);
                let names = ["child", "base"];
                let child = open_chain_in_memory(kind.0, &names, &dyn_files(&files), true)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let before = read_all(child.as_ref());
                let base = child.parent_layer().unwrap().layer.identity();
                let merge = commit_layer(child.as_ref(), keep_child, &mut |_| {})
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(merge.bytes_written > 0 && merge.bytes_zeroed > 0, "{what}");
                drop(child);
                assert!(read_alone(&files[1]).unwrap() == before, "{what}: parent");
                let renamed = open_layer(
                    Box::new(files[1].clone()),
                    &OpenOptions::default(),
                    &MetadataBudget::default(),
                )
                .unwrap()
                .identity();
                // A VHD keeps its Unique Id; a VHDX's changed data has a new DataWriteGuid.
                assert_eq!(renamed == base, kind.0 == Format::Vhd, "{what}");
                if keep_child {
                    let child =
                        open_chain_in_memory(kind.0, &names, &dyn_files(&files), false).unwrap();
                    assert!(read_all(child.as_ref()) == before, "{what}: kept child");
                    assert_eq!(child.facts().allocated_blocks, Some(0), "{what}");
                    if let Some(locator) = child.facts().parent_locator {
                        let linkages: Vec<&str> = locator
                            .iter()
                            .filter(|(k, _)| k.starts_with("parent_linkage"))
                            .map(|(_, v)| v.as_str())
                            .collect();
                        let expected = format!(
                            "{{{}}}",
                            uuid::Uuid::from_bytes(renamed.unwrap()).hyphenated()
                        );
                        assert_eq!(linkages, [expected], "{what}");
                    }
                }
            }
        }
    }

    /// The two files of a merge in memory. Before every request that changes either, each
    /// state a crash could leave both in is opened: the child must read as before, and
    /// each sector of the parent as before or after.
    struct Crashes {
        format: Format,
        files: [Arc<MemStorage>; 2],
        child_before: Vec<u8>,
        parent_before: Vec<u8>,
        sector: usize,
        checked: std::sync::atomic::AtomicUsize,
    }

    impl Crashes {
        fn check(&self) {
            for (child_kept, child) in self.files[0].crash_states() {
                let child = Arc::new(child);
                for (parent_kept, parent) in self.files[1].crash_states() {
                    let what = format!("child keeping {child_kept}, parent keeping {parent_kept}");
                    let crashed = [child.clone(), Arc::new(parent)];
                    let disk = open_chain_in_memory(
                        self.format,
                        &["child", "base"],
                        &dyn_files(&crashed),
                        false,
                    )
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(
                        read_all(disk.as_ref()) == self.child_before,
                        "{what}: child"
                    );
                    let parent = read_alone(&crashed[1]).unwrap_or_else(|e| panic!("{what}: {e}"));
                    let sectors = parent
                        .chunks(self.sector)
                        .zip(self.parent_before.chunks(self.sector))
                        .zip(self.child_before.chunks(self.sector));
                    for (i, ((found, before), after)) in sectors.enumerate() {
                        assert!(
                            found == before || found == after,
                            "{what}: parent sector {i} reads neither as before nor as after"
                        );
                    }
                    self.checked
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    /// One file of a merge, checking [`Crashes`] before each change.
    struct Watched {
        crashes: Arc<Crashes>,
        index: usize,
    }

    impl Storage for Watched {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.crashes.files[self.index].read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.crashes.check();
            self.crashes.files[self.index].write_at(buf, offset)
        }
        fn flush(&self) -> std::io::Result<()> {
            self.crashes.check();
            self.crashes.files[self.index].flush()
        }
        fn len(&self) -> std::io::Result<u64> {
            self.crashes.files[self.index].len()
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.crashes.check();
            self.crashes.files[self.index].set_len(len)
        }
    }

    #[test]
    fn a_crash_at_any_instant_leaves_the_child_as_before_and_the_parent_before_or_after() {
        // Small images, and a child kept: every step of a merge, few requests to check.
        const SMALL: [Kind; 2] = [
            (Format::Vhd, ImageType::Dynamic, 2 * MIB, 512 << 10, 512),
            (Format::Vhdx, ImageType::Dynamic, 2 * MIB, MIB as u32, 4096),
        ];
        for kind in SMALL {
            let images = Images::new(kind, 4);
            let [child, parent] = images
                .in_memory(&["child", "base"])
                .try_into()
                .ok()
                .unwrap();
            let child_before = read_all(
                open_chain_in_memory(
                    kind.0,
                    &["child", "base"],
                    &dyn_files(&[child.clone(), parent.clone()]),
                    false,
                )
                .unwrap()
                .as_ref(),
            );
            let crashes = Arc::new(Crashes {
                format: kind.0,
                parent_before: read_alone(&parent).unwrap(),
                files: [child, parent],
                child_before,
                sector: kind.4 as usize,
                checked: Default::default(),
            });
            let watched: Vec<Arc<dyn Storage>> = (0..2)
                .map(|index| {
                    Arc::new(Watched {
                        crashes: crashes.clone(),
                        index,
                    }) as Arc<dyn Storage>
                })
                .collect();
            let disk = open_chain_in_memory(kind.0, &["child", "base"], &watched, true).unwrap();
            commit_layer(disk.as_ref(), true, &mut |_| {}).unwrap();
            drop(disk);
            crashes.check();
            let checked = crashes.checked.load(std::sync::atomic::Ordering::Relaxed);
            assert!(checked > 50, "{kind:?}: only {checked} crash states");
            assert!(read_alone(&crashes.files[1]).unwrap() == crashes.child_before);
        }
    }

    #[test]
    fn a_child_merges_into_the_middle_of_a_chain_only() {
        for kind in [KINDS[0], KINDS[2]] {
            let images = Images::new(kind, 12);
            images.add_child("top", "child", 12);
            let names = ["top", "child", "base"];
            let files = images.in_memory(&names);
            let base = files[2].contents();
            let top = open_chain_in_memory(kind.0, &names, &dyn_files(&files), true).unwrap();
            let before = read_all(top.as_ref());
            commit_layer(top.as_ref(), false, &mut |_| {}).unwrap();
            drop(top);
            let middle =
                open_chain_in_memory(kind.0, &names[1..], &dyn_files(&files[1..]), false).unwrap();
            assert!(read_all(middle.as_ref()) == before, "{kind:?}");
            assert!(files[2].contents() == base, "{kind:?}: the base changed");
        }
    }

    #[test]
    fn data_past_the_end_of_a_smaller_parent_is_refused_before_anything_changes() {
        for kind in [KINDS[0], KINDS[2]] {
            let images = Images::new(kind, 12);
            let size = kind.2;
            let big = images.path("big");
            let options = CreateOptions {
                size: Some(size + 2 * MIB),
                parent: Some(images.path("base")),
                ..CreateOptions::default()
            };
            create(&big, &options).unwrap();
            let disk = crate::open(&big, &OpenOptions::default()).unwrap();
            disk.write_at(&[0; 4096], size + MIB).unwrap();
            disk.close().unwrap();
            let names = ["big", "base"];
            let files = images.in_memory(&names);
            let child = open_chain_in_memory(kind.0, &names, &dyn_files(&files), true).unwrap();
            let before = read_all(child.as_ref());
            // Zeros past the end: the parent's end reads them too.
            commit_layer(child.as_ref(), true, &mut |_| {}).unwrap();
            drop(child);
            let disk = crate::open(&big, &OpenOptions::default()).unwrap();
            disk.write_at(&[7; 4096], size + MIB).unwrap();
            disk.close().unwrap();
            let files = images.in_memory(&names);
            let contents: Vec<Vec<u8>> = files.iter().map(|f| f.contents()).collect();
            let child = open_chain_in_memory(kind.0, &names, &dyn_files(&files), true).unwrap();
            let err = commit_layer(child.as_ref(), false, &mut |_| {}).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "holds data at offset {} past the end of its {size}-byte parent; merging \
                     it would lose that data (grow the parent first)",
                    size + MIB
                )
            );
            drop(child);
            for (file, before) in files.iter().zip(&contents) {
                assert!(file.contents() == *before, "{kind:?}: changed");
            }
            assert_eq!(before.len() as u64, size + 2 * MIB);
        }
    }

    fn read_file(path: &Path) -> Vec<u8> {
        read_all(crate::open(path, &OpenOptions::default()).unwrap().as_ref())
    }

    #[test]
    fn commit_refuses_what_it_would_harm_and_removes_the_merged_child() {
        for kind in [KINDS[0], KINDS[2]] {
            let images = Images::new(kind, 4);
            let (base, child) = (images.path("base"), images.path("child"));
            let options = |keep_child, force| CommitOptions { keep_child, force };
            let refused = |path: &Path, options: CommitOptions| {
                let files: Vec<Vec<u8>> = ["base", "child"]
                    .iter()
                    .map(|name| fs::read(images.path(name)).unwrap())
                    .collect();
                let err = commit(path, &options, &mut |_| {}).unwrap_err().to_string();
                for (name, before) in ["base", "child"].iter().zip(files) {
                    assert!(fs::read(images.path(name)).unwrap() == before, "{err}");
                }
                err
            };
            let err = refused(&base, options(false, false));
            assert!(err.ends_with("not a differencing image: it has no parent to merge into"));

            images.add_child("sibling", "base", 1);
            let err = refused(&child, options(true, false));
            assert!(err.contains("sibling.") && err.contains("--force"), "{err}");
            fs::remove_file(images.path("sibling")).unwrap();

            images.add_child("grandchild", "child", 1);
            let grandchild = read_file(&images.path("grandchild"));
            let err = refused(&child, options(false, false));
            assert!(
                err.contains("grandchild.") && err.contains("--keep-child"),
                "{err}"
            );
            let before = read_file(&child);
            let report = commit(&child, &options(true, false), &mut |_| {}).unwrap();
            assert!(report.child_kept && report.work.bytes_written > 0);
            assert!(read_file(&images.path("grandchild")) == grandchild);
            assert!(read_file(&child) == before);
            fs::remove_file(images.path("grandchild")).unwrap();

            let mut seen = Vec::new();
            let report = commit(&child, &options(false, false), &mut |p| seen.push(*p)).unwrap();
            assert_eq!(
                report.work,
                Merge::default(),
                "an empty child has nothing to merge"
            );
            assert!(!child.exists());
            assert!(read_file(&base) == before);
            assert!(seen.iter().all(|p| p.done <= p.total));
        }
    }
}

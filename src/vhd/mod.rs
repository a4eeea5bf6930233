//! VHD images (FORMATS.md §8): fixed disks (raw data followed by a footer) and dynamic
//! disks (footer copy, dynamic header, BAT, blocks, footer).
//!
//! The footer, dynamic header and BAT are read once at open; the BAT then lives in memory
//! under a lock that is held only to look entries up or change them. Data I/O to allocated
//! blocks runs outside every lock, one positional request per block touched.
//!
//! A new block takes file space that no block or structure uses, placed so that its data
//! starts on a page boundary of the file: a 4 KiB write then covers whole pages, where
//! unaligned data makes the page cache read two pages for every page written. When no
//! such space fits a block, the trailing footer moves forward past room for several
//! blocks, so that one footer write and flush serve several allocations. That room is free
//! space like the gaps found at open and the blocks discards give back; room a crash
//! leaves unused is a gap the next open finds, and a clean close cuts it off. Allocation
//! keeps the file openable at every instant and never lets the BAT point at data that may
//! not be on the medium:
//!
//! 1. to make room: write the footer at its new place and flush, so the file always ends
//!    in a valid footer; then zero the old one, which a tool scanning for footers would
//!    take for the end of an image;
//! 2. clear the block's space, write its bitmap (all ones) and the caller's data, flush;
//! 3. write the BAT entry. This is the commit point; a crash before it only leaks the
//!    space, and the entry becomes durable with the next flush like any other write.
//!
//! Only step 1 holds a lock (the allocator) across I/O. Meanwhile the block is claimed in
//! memory (`claims`): a second writer to it waits, then writes into the allocated
//! block; a writer whose step 2 fails gives its space back and its claim up, leaving
//! nothing that later writers could trust. Steps 2 and 3 end in a group commit
//! (`commit_queue`): a writer whose data is written queues its entry, and one flush followed
//! by the entries of every writer queued serves them all; a flush of the disk joins the
//! same queue. Data I/O to allocated blocks pins the space gate (see `free_space`), so
//! released space is reused only once no read or write that found the old block can
//! still reach it.
//!
//! Locks, in the order they are taken (a thread holding one takes only later ones):
//!
//! 1. a block's claim, held by its writer across allocating the block or copying sectors
//!    into it, and waited for holding no lock and no space pin;
//! 2. the allocator (free space, where the trailing footer is): held to take or give back
//!    space, and across moving the footer;
//! 3. the BAT, then a differencing disk's bitmaps, then its set of unsaved bitmaps: held
//!    only to look entries up or change them in memory.
//!
//! A commit queue is joined holding neither 2 nor 3, and its leader takes 3. A
//! differencing disk's bitmap saving (its own queue) leads commits of the disk's queue,
//! never the reverse. A space pin is held only across a lookup (taking 3) and the data I/O
//! it leads to.
//!
//! Differencing disks (`differencing.rs`) describe their parent and are handed it, opened
//! read-only, by the chain module; per-sector bitmaps kept in memory send a sector to
//! this file (bit set) or to the parent (clear). Their new blocks start with a clear bitmap,
//! and bits reach the file only once the data they cover is durable.

#![forbid(unsafe_code)]

mod bat;
mod bitmap;
mod check;
mod checksum;
pub mod create;
mod differencing;
mod dynamic_header;
mod footer;
mod format;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod geometry;
mod parent_locator;
mod relocate;
mod resize;

pub use create::{VhdCreateOptions, VhdKind, create_vhd};
use dynamic_header::MAX_DISK_SIZE;
pub use footer::DiskType;
pub use geometry::Geometry;

use crate::claims::Claims;
use crate::commit_queue::CommitQueue;
use crate::disk::{DiscardMode, Extent, Format, OpenOptions, VhdSizeRule, VirtualDisk};
use crate::error::{CorruptionKind, Error, ErrorKind, IoContext, Result};
use crate::finding::{Finding, Fix, Problems};
use crate::free_space::{FreeSpace, SpaceGate, aligned_place};
use crate::layer::{
    self, Layer, LayerFacts, MappedRun, Mapping, MetadataBudget, Parent, ParentLink, block_pieces,
    push_run,
};
use crate::relocation::{Relocation, Resize};
use crate::storage::{self, Storage};
use bat::{Bat, BlockLayout, Reserved, UNALLOCATED};
use dynamic_header::{DynamicHeader, HEADER_SIZE};
use footer::{FOOTER_SIZE, Footer, LEGACY_FOOTER_SIZE};
use geometry::{SizeSource, size_source};
use parking_lot::{Mutex, RwLock};
use std::ops::Range;

const SECTOR: u64 = 512;
/// Most BAT entries kept in memory (16 MiB, with as much again for checking them at
/// open). Enough for the largest VHD (2040 GiB) in 512 KiB blocks, the smallest any known
/// creator uses; the bound stops a crafted sparse file from exhausting memory.
const MAX_BAT_ENTRIES: u64 = 1 << 22;
/// New blocks place their data at a multiple of this in the file (or of the block size,
/// if smaller).
const DATA_ALIGNMENT: u64 = 4096;
/// Blocks that one move of the trailing footer makes room for, so one footer write and
/// flush serve the allocations of several writers (or of one writing sequentially)...
const ROOM_BLOCKS: u64 = 8;
/// ...within this many bytes, or one block where that is larger.
const ROOM_BYTES: u64 = 64 << 20;

/// An open VHD image.
pub struct VhdDisk {
    storage: Box<dyn Storage>,
    footer: Footer,
    /// The footer's bytes as found, rewritten unchanged at each new end of file; only a
    /// resize changes them.
    footer_bytes: Mutex<[u8; FOOTER_SIZE]>,
    size: u64,
    /// Which footer field gave `size`.
    size_rule: VhdSizeRule,
    read_only: bool,
    discard: DiscardMode,
    /// Present for dynamic disks.
    dynamic: Option<Dynamic>,
}

struct Dynamic {
    table_offset: u64,
    layout: BlockLayout,
    bat: RwLock<Bat>,
    /// Held to hand out space or take it back, and across moving the trailing footer:
    /// never across a block's data I/O.
    allocator: Mutex<Allocator>,
    /// Blocks being allocated, or (in a differencing disk) having sectors copied into them
    /// from the parent, by one writer each.
    claims: Claims,
    /// New blocks' BAT entries (block, sector), each waiting for the flush that makes its
    /// block's data durable.
    commits: CommitQueue<(u64, u32)>,
    /// Pinned by data I/O to allocated blocks, so released space is reused only once no
    /// I/O can still reach it.
    space: SpaceGate,
    /// Where the structures before the blocks (footer copy, header, BAT, the data spaces
    /// of parent locators) end.
    metadata_end: u64,
    /// The file ranges of those structures but the BAT, which the BAT may not grow into.
    structures: Vec<Range<u64>>,
    /// A new block's bitmap: every sector marked as present.
    full_bitmap: Vec<u8>,
    /// Present for differencing disks.
    differencing: Option<differencing::Differencing>,
}

impl Dynamic {
    /// Where the last block or structure ends: the file needs nothing past it.
    fn structures_end(&self) -> u64 {
        let blocks_end = self
            .bat
            .read()
            .allocated_blocks()
            .map(|(_, at)| at + self.layout.span())
            .max()
            .unwrap_or(0);
        blocks_end.max(self.metadata_end)
    }
}

struct Allocator {
    /// Where the next block goes when no free space fits it: the trailing footer's
    /// offset, sector-aligned.
    next_block: u64,
    /// Space before `next_block` that no structure or block uses: gaps found at open,
    /// blocks released since, and room made at the end that no block took yet.
    free: FreeSpace,
    /// Where the trailing footer was before this session first made room: a clean close
    /// cuts off the room no block took, down to here at most.
    grown_from: Option<u64>,
}

/// The footer chosen at open and where the data area it closes ends.
struct FoundFooter {
    footer: Footer,
    bytes: [u8; FOOTER_SIZE],
    /// Start of the trailing footer, or the file length when only the copy at 0 is valid.
    data_end: u64,
}

impl VhdDisk {
    /// Opens the VHD image held by `storage`, a differencing one without its parent.
    pub fn open(storage: Box<dyn Storage>, options: &OpenOptions) -> Result<VhdDisk> {
        VhdDisk::open_charged(storage, options, &MetadataBudget::default())
    }

    /// Opens the VHD image held by `storage`, charging the metadata it keeps in memory to
    /// `budget` (its chain's).
    pub fn open_charged(
        storage: Box<dyn Storage>,
        options: &OpenOptions,
        budget: &MetadataBudget,
    ) -> Result<VhdDisk> {
        VhdDisk::open_reporting(storage, options, budget, &mut Problems::Refuse)
    }

    /// Opens the VHD image held by `storage` as [`VhdDisk::open_charged`] does, sending
    /// damage it can work around to `problems`: a check records every bad BAT entry and
    /// opens the image with those entries taken as unallocated.
    pub fn open_reporting(
        storage: Box<dyn Storage>,
        options: &OpenOptions,
        budget: &MetadataBudget,
        problems: &mut Problems,
    ) -> Result<VhdDisk> {
        let file_len = storage
            .len()
            .context(|| "cannot read file size".to_string())?;
        let found = locate_footer(storage.as_ref(), file_len, problems)?;
        let footer = found.footer.clone();
        let size = virtual_size(&footer, options.vhd_size_rule)?;
        let dynamic = match footer.disk_type {
            DiskType::Fixed => {
                if size > found.data_end {
                    return Err(Error::corrupt(
                        CorruptionKind::Truncated,
                        "VHD fixed disk data",
                        format!(
                            "the file holds {} bytes before the footer, the disk needs {size}",
                            found.data_end
                        ),
                    ));
                }
                None
            }
            DiskType::Dynamic | DiskType::Differencing => Some(open_dynamic(
                storage.as_ref(),
                &found,
                size,
                budget,
                problems,
            )?),
        };
        Ok(VhdDisk {
            storage,
            footer,
            footer_bytes: Mutex::new(found.bytes),
            size,
            size_rule: options.vhd_size_rule,
            read_only: options.read_only,
            discard: options.discard.unwrap_or(match dynamic {
                Some(_) => DiscardMode::Unmap,
                None => DiscardMode::Zero,
            }),
            dynamic,
        })
    }

    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type
    }

    /// The Creator Application field, e.g. `win `, `qemu`, `vpc `.
    pub fn creator_app(&self) -> [u8; 4] {
        self.footer.creator_app
    }

    pub fn unique_id(&self) -> uuid::Uuid {
        uuid::Uuid::from_bytes(self.footer.unique_id)
    }

    /// The footer's geometry, whether or not it gives the disk size.
    pub fn geometry(&self) -> Geometry {
        self.footer.geometry
    }

    /// Data bytes per block; `None` for fixed disks.
    pub fn block_size(&self) -> Option<u64> {
        self.dynamic.as_ref().map(|d| d.layout.block_size)
    }

    /// Blocks with space in the file; `None` for fixed disks.
    pub fn allocated_blocks(&self) -> Option<u64> {
        self.dynamic.as_ref().map(|d| d.bat.read().allocated())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::new(ErrorKind::ReadOnly));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::new(ErrorKind::OutOfRange {
                offset,
                len,
                size: self.size,
            })),
        }
    }

    /// Writes into a block that may not be allocated yet.
    fn write_block(&self, d: &Dynamic, block: u64, in_block: u64, data: &[u8]) -> Result<()> {
        if self.write_allocated(d, block, in_block, data)? {
            return Ok(());
        }
        let _claim = d.claims.claim_when_free(block..block + 1);
        // Another writer may have allocated the block while this one waited.
        if self.write_allocated(d, block, in_block, data)? {
            return Ok(());
        }
        let storage = self.storage.as_ref();
        self.allocate(d, block, |block_at, context| {
            storage
                .write_at(&d.full_bitmap, block_at)
                .context(|| context("writing the sector bitmap"))?;
            storage
                .write_at(data, block_at + d.layout.bitmap_bytes + in_block)
                .context(|| context("writing data"))
        })?;
        Ok(())
    }

    /// Writes `data` at `in_block` into `block` if it is allocated; false if it is not.
    fn write_allocated(&self, d: &Dynamic, block: u64, in_block: u64, data: &[u8]) -> Result<bool> {
        let _pin = d.space.pin();
        let allocated = d.bat.read().block_offset(block);
        match allocated {
            Some(block_at) => self
                .write_data(d, block, block_at, in_block, data)
                .map(|()| true),
            None => Ok(false),
        }
    }

    fn write_data(
        &self,
        d: &Dynamic,
        block: u64,
        block_at: u64,
        in_block: u64,
        data: &[u8],
    ) -> Result<()> {
        self.storage
            .write_at(data, block_at + d.layout.bitmap_bytes + in_block)
            .context(|| format!("writing {} bytes to block {block}", data.len()))
    }

    /// Gives `block`, claimed by the caller, file space in the crash-safe order described
    /// at the top of this module: the space cleared, then `fill(block offset, message
    /// context)` writes the bitmap and data, then the commit flushes them and writes the
    /// BAT entry. Returns where the block went.
    fn allocate(
        &self,
        d: &Dynamic,
        block: u64,
        fill: impl FnOnce(u64, &dyn Fn(&str) -> String) -> Result<()>,
    ) -> Result<u64> {
        let storage = self.storage.as_ref();
        let context = |step: &str| format!("allocating block {block}: {step}");
        let block_at = self.take_space(d, &context)?;
        let span = block_at..block_at + d.layout.span();
        let filled = block_sector(block, block_at).and_then(|sector| {
            storage::zero_range(storage, span.start, span.end - span.start, true)
                .context(|| context("clearing its space"))?;
            fill(block_at, &context)?;
            Ok(sector)
        });
        let sector = match filled {
            Ok(sector) => sector,
            Err(e) => {
                // Nothing points at the space: it is free again, and cleared before use.
                d.allocator.lock().free.insert(span);
                return Err(e);
            }
        };
        // A failed commit may still have put the entry in the file: the space is never
        // handed out again (the next open finds it free if the entry did not stay).
        self.commit(d, Some((block, sector)))?;
        Ok(block_at)
    }

    /// Takes space for a new block: free space where some fits it, else room made past
    /// the end of the file for it and the next few.
    fn take_space(&self, d: &Dynamic, context: &dyn Fn(&str) -> String) -> Result<u64> {
        let (span, head) = (d.layout.span(), d.layout.bitmap_bytes);
        let alignment = d.layout.block_size.min(DATA_ALIGNMENT);
        let place = |range: Range<u64>| aligned_place(range, span, head, alignment, SECTOR);
        let mut allocator = d.allocator.lock();
        if let Some(at) = allocator.free.take(span, &d.space, place) {
            return Ok(at);
        }
        let unallocated = self
            .size
            .div_ceil(d.layout.block_size)
            .saturating_sub(d.bat.read().allocated());
        let blocks = ROOM_BLOCKS.min(ROOM_BYTES / span).min(unallocated).max(1);
        let too_far = || {
            Error::new(ErrorKind::Io {
                what: context("making room"),
                source: std::io::Error::from_raw_os_error(libc::EFBIG),
            })
        };
        // A place found in a range ending at u64::MAX leaves room for the span after it.
        let start = allocator.next_block;
        let at = place(start..u64::MAX).ok_or_else(too_far)?;
        let mut end = at + span;
        for _ in 1..blocks {
            end = place(end..u64::MAX).ok_or_else(too_far)? + span;
        }
        self.move_footer(&allocator, end, context)?;
        allocator.grown_from.get_or_insert(start);
        allocator.next_block = end;
        allocator.free.insert(start..at);
        allocator.free.insert(at + span..end);
        Ok(at)
    }

    /// Moves the trailing footer from `allocator.next_block` forward to `footer_at`,
    /// leaving the space between reading as zeros; the caller sets `next_block` once it
    /// uses that space. The file always ends in a valid footer: the new one is durable
    /// before the old one is zeroed.
    fn move_footer(
        &self,
        allocator: &Allocator,
        footer_at: u64,
        context: &dyn Fn(&str) -> String,
    ) -> Result<()> {
        let storage = self.storage.as_ref();
        let old_footer_at = allocator.next_block;
        // Whatever follows the old footer (a legacy short footer, or a block left behind
        // by a failed allocation) is cut off so the space up to the new one reads zeros.
        let file_len = storage.len().context(|| context("reading file size"))?;
        if file_len != old_footer_at + FOOTER_SIZE as u64 {
            storage
                .set_len(old_footer_at)
                .context(|| context("trimming the file end"))?;
        }
        storage
            .write_at(&*self.footer_bytes.lock(), footer_at)
            .context(|| context("writing the footer at the new end"))?;
        storage
            .flush()
            .context(|| context("flushing the new footer"))?;
        // A stale footer left in the data area would look like the end of an image to a
        // tool that scans for one.
        storage::write_zeros(storage, old_footer_at, FOOTER_SIZE as u64)
            .context(|| context("clearing the old footer"))
    }

    /// Writes BAT entries (block, sector) and flushes them, then changes them in memory;
    /// `doing` names the operation in errors.
    fn write_bat_entries(&self, d: &Dynamic, entries: &[(u64, u32)], doing: &str) -> Result<()> {
        for &(block, sector) in entries {
            self.storage
                .write_at(
                    &Bat::entry_bytes(sector),
                    d.table_offset + block * bat::ENTRY_SIZE,
                )
                .context(|| format!("{doing} block {block}: writing its BAT entry"))?;
        }
        self.storage
            .flush()
            .context(|| format!("{doing} blocks: flushing the BAT"))?;
        let mut bat = d.bat.write();
        for &(block, sector) in entries {
            bat.set(block, sector);
        }
        Ok(())
    }

    /// Unallocates `blocks` (block, offset in the file), with the allocator held: their
    /// entries durable first, then their space a hole and free. A differencing disk's
    /// blocks then read from its parent.
    fn unallocate(
        &self,
        d: &Dynamic,
        allocator: &mut Allocator,
        blocks: &[(u64, u64)],
    ) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        let entries: Vec<(u64, u32)> = blocks.iter().map(|&(b, _)| (b, UNALLOCATED)).collect();
        self.write_bat_entries(d, &entries, "releasing")?;
        if let Some(diff) = &d.differencing {
            diff.forget(blocks.iter().map(|&(b, _)| b));
        }
        for &(block, block_at) in blocks {
            self.storage
                .punch_hole(block_at, d.layout.span())
                .context(|| format!("releasing the space of block {block}"))?;
            allocator.free.release(block_at..block_at + d.layout.span());
        }
        Ok(())
    }

    /// Makes every write completed so far durable, then writes `entry` (block, sector) with
    /// the entries other writers queued meanwhile: one flush for all of them (see
    /// `commit_queue`). The entries become durable with the next flush.
    fn commit(&self, d: &Dynamic, entry: Option<(u64, u32)>) -> Result<()> {
        d.commits.commit(entry, |entries| {
            let storage = self.storage.as_ref();
            storage.flush().context(|| match entries.as_slice() {
                [] => "flushing the image".to_string(),
                [(block, _)] => format!("allocating block {block}: flushing its data"),
                more => {
                    let blocks: Vec<String> = more.iter().map(|(b, _)| b.to_string()).collect();
                    format!(
                        "allocating blocks {}: flushing their data",
                        blocks.join(", ")
                    )
                }
            })?;
            for &(block, sector) in &entries {
                storage
                    .write_at(
                        &Bat::entry_bytes(sector),
                        d.table_offset + block * bat::ENTRY_SIZE,
                    )
                    .context(|| format!("allocating block {block}: writing the BAT entry"))?;
                d.bat.write().set(block, sector);
            }
            Ok(())
        })
    }

    /// Cuts off the room made at the end of the file that no block took, the footer
    /// written at the new end first.
    fn give_back_room(&self, d: &Dynamic) -> Result<()> {
        let mut allocator = d.allocator.lock();
        let Some(grown_from) = allocator.grown_from else {
            return Ok(());
        };
        let Some(last) = allocator.free.ranges().last() else {
            return Ok(());
        };
        let end = last.start.max(grown_from).next_multiple_of(SECTOR);
        if last.end != allocator.next_block || end >= last.end {
            return Ok(());
        }
        end_with_footer(self.storage.as_ref(), &self.footer_bytes.lock(), end)?;
        allocator.next_block = end;
        allocator.free.remove(end..u64::MAX);
        Ok(())
    }
}

/// Writes `footer` at `at`, flushed, then cuts the file after it if it went on, flushed:
/// the file ends in a valid footer at every instant.
fn end_with_footer(storage: &dyn Storage, footer: &[u8; FOOTER_SIZE], at: u64) -> Result<()> {
    storage
        .write_at(footer, at)
        .context(|| format!("writing the footer at {at:#x}"))?;
    storage
        .flush()
        .context(|| "flushing the footer".to_string())?;
    let end = at + FOOTER_SIZE as u64;
    let file_len = storage
        .len()
        .context(|| "reading the file size".to_string())?;
    if file_len > end {
        storage
            .set_len(end)
            .context(|| "cutting the file after the footer".to_string())?;
        storage
            .flush()
            .context(|| "flushing the shorter file".to_string())?;
    }
    Ok(())
}

impl std::fmt::Debug for VhdDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdDisk")
            .field("disk_type", &self.footer.disk_type)
            .field("size", &self.size)
            .field(
                "creator_app",
                &String::from_utf8_lossy(&self.footer.creator_app),
            )
            .field("block_size", &self.block_size())
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// Finds the footer: the trailing one (512 bytes, or 511 from old Virtual PC), else, for
/// dynamic and differencing disks, the copy at offset 0; a trailing footer passed over
/// goes to `problems`.
fn locate_footer(
    storage: &dyn Storage,
    file_len: u64,
    problems: &mut Problems,
) -> Result<FoundFooter> {
    let mut trailing_error = None;
    for footer_len in [FOOTER_SIZE, LEGACY_FOOTER_SIZE] {
        let Some(at) = file_len.checked_sub(footer_len as u64) else {
            continue;
        };
        let mut bytes = [0u8; FOOTER_SIZE];
        storage
            .read_at(&mut bytes[..footer_len], at)
            .context(|| "reading the VHD footer".to_string())?;
        match Footer::parse(&bytes, "VHD footer") {
            Ok(footer) => {
                return Ok(FoundFooter {
                    footer,
                    bytes,
                    data_end: at,
                });
            }
            // A cookie at 512 bytes from the end rules out the legacy position.
            Err(e) if e.corruption_kind() != Some(CorruptionKind::BadSignature) => {
                trailing_error = Some(e);
                break;
            }
            Err(e) => {
                trailing_error.get_or_insert(e);
            }
        }
    }
    let trailing_error = trailing_error.unwrap_or_else(|| {
        Error::corrupt(
            CorruptionKind::Truncated,
            "VHD footer",
            format!("the file is only {file_len} bytes long"),
        )
    });
    if file_len < FOOTER_SIZE as u64 {
        return Err(trailing_error);
    }
    let mut bytes = [0u8; FOOTER_SIZE];
    storage
        .read_at(&mut bytes, 0)
        .context(|| "reading the VHD footer copy at offset 0".to_string())?;
    match Footer::parse(&bytes, "VHD footer copy at offset 0") {
        // A fixed disk has no copy: these bytes are disk data that only look like one.
        Ok(footer) if footer.disk_type != DiskType::Fixed => {
            let at = file_len.saturating_sub(FOOTER_SIZE as u64);
            problems.tolerate(
                Finding::from_error(&trailing_error, Some(at), Fix::RewriteCopy)
                    .adding("; the copy at offset 0 is used"),
            );
            Ok(FoundFooter {
                footer,
                bytes,
                data_end: file_len,
            })
        }
        _ => Err(trailing_error),
    }
}

/// The disk size by the footer field the creator (or `rule`) calls for, in whole sectors.
fn virtual_size(footer: &Footer, rule: crate::disk::VhdSizeRule) -> Result<u64> {
    let (size, source) = match size_source(&footer.creator_app, footer.geometry, rule) {
        SizeSource::Geometry => {
            let g = footer.geometry;
            (
                g.bytes(),
                format!(
                    "geometry {}/{}/{}",
                    g.cylinders, g.heads, g.sectors_per_track
                ),
            )
        }
        SizeSource::CurrentSize => (
            footer.current_size / SECTOR * SECTOR,
            "Current Size".to_string(),
        ),
    };
    if size > MAX_DISK_SIZE {
        return Err(Error::corrupt(
            CorruptionKind::InvalidField,
            "VHD footer",
            format!(
                "disk size {size} from {source} exceeds the VHD limit of {MAX_DISK_SIZE} bytes"
            ),
        ));
    }
    Ok(size)
}

/// The BAT entry of a block placed at `block_at`.
fn block_sector(block: u64, block_at: u64) -> Result<u32> {
    u32::try_from(block_at / SECTOR)
        .ok()
        .filter(|&sector| sector != UNALLOCATED)
        .ok_or_else(|| {
            Error::new(ErrorKind::Io {
                what: format!("allocating block {block}"),
                source: std::io::Error::from_raw_os_error(libc::EFBIG),
            })
        })
}

fn out_of_bounds(structure: &str, problem: String) -> Error {
    Error::corrupt(CorruptionKind::OutOfBounds, structure, problem)
}

/// Reads and checks the dynamic header and BAT of a disk of `size` bytes. Bad BAT entries
/// go to `problems`; if it lets the open go on, they are taken as unallocated, and the
/// space they name inside the file as nobody's to take.
fn open_dynamic(
    storage: &dyn Storage,
    found: &FoundFooter,
    size: u64,
    budget: &MetadataBudget,
    problems: &mut Problems,
) -> Result<Dynamic> {
    let data_end = found.data_end;
    let header_at = found.footer.data_offset;
    let header_end = header_at.checked_add(HEADER_SIZE as u64);
    if header_at < FOOTER_SIZE as u64
        || !header_at.is_multiple_of(SECTOR)
        || header_end.is_none_or(|end| end > data_end)
    {
        return Err(out_of_bounds(
            "VHD footer",
            format!(
                "Data Offset {header_at:#x} does not point at a whole sector between the footer \
                 copy and the end of the file ({data_end:#x})"
            ),
        ));
    }
    let mut header_bytes = [0u8; HEADER_SIZE];
    storage
        .read_at(&mut header_bytes, header_at)
        .context(|| "reading the VHD dynamic header".to_string())?;
    let header = DynamicHeader::parse(&header_bytes)?;
    let is_differencing = found.footer.disk_type == DiskType::Differencing;

    let layout = BlockLayout::new(header.block_size);
    let blocks = size.div_ceil(layout.block_size);
    if u64::from(header.max_table_entries) < blocks {
        return Err(Error::corrupt(
            CorruptionKind::InvalidField,
            "VHD dynamic header",
            format!(
                "Max Table Entries {} is too small: a {size}-byte disk of {}-byte blocks needs {blocks}",
                header.max_table_entries, layout.block_size
            ),
        ));
    }
    if blocks > MAX_BAT_ENTRIES {
        return Err(Error::unsupported(format!(
            "VHD dynamic header: {blocks} blocks of {} bytes are more than the {MAX_BAT_ENTRIES} \
             this reader keeps in memory",
            layout.block_size
        )));
    }
    let table_at = header.table_offset;
    let table_len = bat::table_bytes(header.max_table_entries);
    let table_end = table_at.checked_add(table_len);
    let header_region = header_at..header_at + HEADER_SIZE as u64;
    if table_at < FOOTER_SIZE as u64
        || table_end.is_none_or(|end| end > data_end)
        || table_end.is_some_and(|end| table_at < header_region.end && header_region.start < end)
    {
        return Err(out_of_bounds(
            "VHD dynamic header",
            format!(
                "Table Offset {table_at:#x} with {} entries ({table_len} bytes) does not fit \
                 between the footer copy, the header at {header_at:#x} and the end of the file \
                 ({data_end:#x})",
                header.max_table_entries
            ),
        ));
    }

    // The table fits in the file, so its size is bounded by the file's.
    budget.charge(blocks * bat::ENTRY_SIZE, "the VHD BAT")?;
    let mut bat = Bat::parse(&[]);
    let mut chunk = vec![0u8; (blocks * bat::ENTRY_SIZE).min(1 << 20) as usize];
    let mut read = 0;
    while read < blocks * bat::ENTRY_SIZE {
        let n = chunk.len().min((blocks * bat::ENTRY_SIZE - read) as usize);
        storage
            .read_at(&mut chunk[..n], table_at + read)
            .context(|| "reading the VHD BAT".to_string())?;
        bat.extend_from(&chunk[..n]);
        read += n as u64;
    }

    let locators = if is_differencing {
        differencing::read_parent_paths(storage, &header, data_end)?
    } else {
        differencing::ParentPaths::default()
    };
    let mut reserved = vec![
        Reserved {
            start: 0,
            len: FOOTER_SIZE as u64,
            name: "footer copy",
        },
        Reserved {
            start: header_at,
            len: HEADER_SIZE as u64,
            name: "dynamic header",
        },
        Reserved {
            start: table_at,
            len: table_len,
            name: "BAT",
        },
    ];
    reserved.extend(locators.areas.iter().map(|area| Reserved {
        start: area.start,
        len: area.end - area.start,
        name: "parent locator data",
    }));
    // A check hears of locator data over another structure; an open reads the paths from
    // it all the same, and keeps blocks out of it.
    for (i, area) in reserved.iter().enumerate().skip(3) {
        if let Some(other) = reserved[..i]
            .iter()
            .find(|r| area.start < r.start + r.len && r.start < area.start + area.len)
        {
            problems.note(Finding::corruption(
                CorruptionKind::OutOfBounds,
                "VHD parent locator data",
                Some(area.start),
                format!("{} bytes overlap the {}", area.len, other.name),
                Fix::None,
            ));
        }
    }
    let validated = bat.validate(layout, &reserved, data_end);
    for bad in &validated.bad {
        let start = bad.index * layout.block_size;
        let fix = Fix::GiveUp {
            entry: bad.index,
            disk_start: start,
            disk_end: (start + layout.block_size).min(size),
        };
        let at = table_at + bad.index * bat::ENTRY_SIZE;
        problems.refuse(Finding::from_error(&bad.error(), Some(at), fix))?;
        bat.set(bad.index, UNALLOCATED);
    }
    let metadata_end = reserved
        .iter()
        .map(|r| r.start + r.len)
        .chain(locators.spaces.iter().map(|space| space.end))
        .max()
        .unwrap_or(0);
    let structures_end = metadata_end.max(validated.blocks_end);
    let next_block = if data_end.is_multiple_of(SECTOR) && data_end >= structures_end {
        data_end
    } else {
        structures_end.next_multiple_of(SECTOR)
    };
    let used = reserved
        .iter()
        .map(|r| r.start..r.start + r.len)
        .chain(bat.allocated_blocks().map(|(_, at)| at..at + layout.span()))
        .chain(validated.bad.iter().map(|bad| bad.space.clone()))
        .chain(locators.spaces.iter().cloned());
    let free = FreeSpace::gaps(0..next_block, used);
    let differencing = if is_differencing {
        Some(differencing::Differencing::open(
            storage,
            &header,
            &locators.paths,
            &bat,
            layout,
            budget,
        )?)
    } else {
        None
    };
    Ok(Dynamic {
        table_offset: table_at,
        layout,
        bat: RwLock::new(bat),
        metadata_end,
        structures: reserved
            .iter()
            .filter(|r| r.start != table_at)
            .map(|r| r.start..r.start + r.len)
            .chain(locators.spaces.iter().cloned())
            .collect(),
        allocator: Mutex::new(Allocator {
            next_block,
            free,
            grown_from: None,
        }),
        claims: Claims::default(),
        commits: CommitQueue::default(),
        space: SpaceGate::default(),
        full_bitmap: vec![0xFF; layout.bitmap_bytes as usize],
        differencing,
    })
}

impl VirtualDisk for VhdDisk {
    fn format(&self) -> Format {
        Format::Vhd
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn logical_sector_size(&self) -> u32 {
        SECTOR as u32
    }

    fn physical_sector_size(&self) -> u32 {
        SECTOR as u32
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn identity(&self) -> Option<[u8; 16]> {
        Some(self.footer.unique_id)
    }

    fn parent(&self) -> Option<(&std::path::Path, &dyn VirtualDisk)> {
        self.parent_layer().map(Parent::as_disk)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        layer::read(self, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        let Some(d) = &self.dynamic else {
            return self
                .storage
                .write_at(buf, offset)
                .context(|| format!("writing {} bytes at offset {offset}", buf.len()));
        };
        if let Some(diff) = &d.differencing {
            return self.write_differencing(d, diff, buf, offset);
        }
        for piece in block_pieces(offset, buf.len() as u64, d.layout.block_size) {
            self.write_block(d, piece.block, piece.in_block, &buf[piece.range()])?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        match &self.dynamic {
            Some(d) => match &d.differencing {
                Some(diff) => self.flush_differencing(d, diff),
                None => self.commit(d, None),
            },
            None => self
                .storage
                .flush()
                .context(|| "flushing the image".to_string()),
        }
    }

    /// Flushes, and cuts off the room at the end of the file that no block took. The
    /// room is only a hole of zeros before the footer, so an image that keeps it (the
    /// footer write failed, on a full filesystem say) is closed cleanly all the same.
    fn close(&self) -> Result<()> {
        self.flush()?;
        if let Some(d) = &self.dynamic
            && !self.read_only
            && let Err(e) = self.give_back_room(d)
        {
            ::log::warn!("VHD: the room no block took stays at the end of the file: {e}");
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        layer::allocation(self, offset, len)
    }

    /// Whole blocks of a dynamic disk are unallocated and their space becomes a hole; the
    /// rest of the data the range has in this file is unmapped or zeroed (as the discard
    /// mode says). In a differencing disk what the parent held is written over with zeros.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        layer::discard(self, offset, len)
    }
}

impl Layer for VhdDisk {
    fn map(&self, offset: u64, len: u64, runs: &mut Vec<MappedRun>) -> Result<()> {
        let Some(d) = &self.dynamic else {
            push_run(runs, len, Mapping::File(offset));
            return Ok(());
        };
        let data_at = |block_at: u64, in_block: u64| block_at + d.layout.bitmap_bytes + in_block;
        let pieces = block_pieces(offset, len, d.layout.block_size);
        match &d.differencing {
            None => {
                let bat = d.bat.read();
                for piece in pieces {
                    let mapping = match bat.block_offset(piece.block) {
                        Some(block_at) => Mapping::File(data_at(block_at, piece.in_block)),
                        None => Mapping::Zero,
                    };
                    push_run(runs, piece.len as u64, mapping);
                }
            }
            Some(diff) => diff.map(pieces, data_at, runs),
        }
        Ok(())
    }

    fn read_mapped(&self, buf: &mut [u8], file_offset: u64) -> Result<()> {
        self.storage
            .read_at(buf, file_offset)
            .context(|| format!("reading {} bytes at {file_offset:#x}", buf.len()))
    }

    fn zero_mapped(&self, file_offset: u64, len: u64) -> Result<()> {
        let unmap = self.discard == DiscardMode::Unmap;
        storage::zero_range(self.storage.as_ref(), file_offset, len, unmap)
            .context(|| format!("zeroing {len} bytes at {file_offset:#x}"))
    }

    fn discard_mode(&self) -> DiscardMode {
        self.discard
    }

    /// Whole blocks of a dynamic disk become unallocated: the entry is durable before the
    /// block's space becomes a hole, so a crash leaves either the block with its data or
    /// no block. A differencing disk keeps its blocks (an unallocated block would read its
    /// parent), and their data becomes holes instead.
    fn release_blocks(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let Some(d) = self.dynamic.as_ref().filter(|d| d.differencing.is_none()) else {
            return Ok(vec![(offset, len)]);
        };
        let block_size = d.layout.block_size;
        let mut allocator = d.allocator.lock();
        let mut rest: Vec<(u64, u64)> = Vec::new();
        let mut released = Vec::new();
        for piece in block_pieces(offset, len, block_size) {
            let block_len = block_size.min(self.size - piece.block * block_size);
            let whole = piece.in_block == 0 && piece.len as u64 == block_len;
            match d.bat.read().block_offset(piece.block) {
                Some(block_at) if whole => released.push((piece.block, block_at)),
                None if whole => {}
                _ => {
                    let at = offset + piece.at as u64;
                    match rest.last_mut() {
                        Some((start, n)) if *start + *n == at => *n += piece.len as u64,
                        _ => rest.push((at, piece.len as u64)),
                    }
                }
            }
        }
        self.unallocate(d, &mut allocator, &released)?;
        Ok(rest)
    }

    fn parent_link(&self) -> Option<&ParentLink> {
        Some(&self.dynamic.as_ref()?.differencing.as_ref()?.link)
    }

    fn clear_to_parent(&self) -> Result<()> {
        self.check_writable()?;
        let Some(d) = self.dynamic.as_ref().filter(|d| d.differencing.is_some()) else {
            return Err(Error::invalid_input("not a VHD differencing disk"));
        };
        let mut allocator = d.allocator.lock();
        let blocks: Vec<(u64, u64)> = d.bat.read().allocated_blocks().collect();
        self.unallocate(d, &mut allocator, &blocks)
    }

    fn space_gate(&self) -> Option<&SpaceGate> {
        Some(&self.dynamic.as_ref()?.space)
    }

    fn relocation(&self) -> Option<&dyn Relocation> {
        self.dynamic.as_ref()?;
        Some(self)
    }

    fn resizing(&self) -> Option<&dyn Resize> {
        Some(self)
    }

    fn attach_parent(&mut self, parent: Parent) {
        if let Some(diff) = self.dynamic.as_mut().and_then(|d| d.differencing.as_mut()) {
            diff.parent = Some(parent);
        }
    }

    fn parent_layer(&self) -> Option<&Parent> {
        self.dynamic
            .as_ref()?
            .differencing
            .as_ref()?
            .parent
            .as_ref()
    }

    fn facts(&self) -> LayerFacts {
        LayerFacts {
            subtype: match self.footer.disk_type {
                DiskType::Fixed => "fixed",
                DiskType::Dynamic => "dynamic",
                DiskType::Differencing => "differencing",
            },
            creator: String::from_utf8_lossy(&self.footer.creator_app).into_owned(),
            block_size: self.block_size(),
            allocated_blocks: self.allocated_blocks(),
            total_blocks: self.block_size().map(|b| self.size.div_ceil(b)),
            unique_id: Some(self.unique_id()),
            time_stamp: Some(self.footer.timestamp),
            ..LayerFacts::default()
        }
    }
}

#[cfg(test)]
mod tests;

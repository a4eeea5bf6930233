//! Opening a VHDX: headers, log replay, region table, metadata, BAT and sector bitmaps,
//! every structure checked against the file and the format's limits before use.

use super::replay::{read_structure, replay_log, replay_to_file};
use super::*;

impl VhdxDisk {
    /// Opens the VHDX image held by `storage`, a differencing one without its parent.
    pub fn open(storage: Box<dyn Storage>, options: &OpenOptions) -> Result<Self> {
        Self::open_charged(storage, options, &MetadataBudget::default())
    }

    /// Opens the VHDX image held by `storage`, charging the metadata it keeps in memory to
    /// `budget` (its chain's).
    pub fn open_charged(
        storage: Box<dyn Storage>,
        options: &OpenOptions,
        budget: &MetadataBudget,
    ) -> Result<Self> {
        Self::open_reporting(storage, options, budget, &mut Problems::Refuse)
    }

    /// Opens the VHDX image held by `storage` as [`VhdxDisk::open_charged`] does, sending
    /// damage it can work around to `problems`: a check records every bad BAT entry and
    /// opens the image with those entries taken as ZERO (bitmap entries as absent).
    pub fn open_reporting(
        storage: Box<dyn Storage>,
        options: &OpenOptions,
        budget: &MetadataBudget,
        problems: &mut Problems,
    ) -> Result<Self> {
        let file_len = storage
            .len()
            .context(|| "cannot read file size".to_string())?;
        if file_len < MIB {
            return Err(Error::corrupt(
                CorruptionKind::Truncated,
                "file",
                format!("is {file_len} bytes, shorter than the 1 MiB header area"),
            ));
        }
        let mut ident = [0u8; FILE_IDENTIFIER_LEN];
        storage
            .read_at(&mut ident, 0)
            .context(|| "reading file identifier".to_string())?;
        let creator = FileIdentifier::parse(&ident)?.creator;

        let mut slots = [[0u8; HEADER_LEN]; 2];
        for (slot, offset) in slots.iter_mut().zip(HEADER_OFFSETS) {
            storage
                .read_at(slot, offset)
                .context(|| format!("reading header at {offset:#x}"))?;
        }
        let (header, current_slot) = header::select_current([&slots[0], &slots[1]], problems)?;
        header.check(file_len)?;

        let mut journal = Journal {
            header,
            current_slot,
            file_write_guid_changed: false,
            data_write_guid_changed: false,
            writer: None,
        };
        let log_was_dirty = journal.header.log_is_dirty();
        let overlay = replay_log(storage.as_ref(), &journal, file_len)?;
        if log_was_dirty {
            let log = |problem: String| {
                Finding::info(
                    "log",
                    Some(journal.header.log_offset),
                    problem,
                    Fix::ReplayLog,
                )
            };
            match &overlay {
                Some(replay) => problems.note(log(format!(
                    "holds {} updates to replay (readers replay them in memory)",
                    replay.updates.len()
                ))),
                None => problems.tolerate(log(format!(
                    "LogGuid {} is set but the log holds no valid entry: nothing to replay",
                    journal.header.log_guid
                ))),
            }
        }
        let file_len = match &overlay {
            Some(o) => o.logical_len,
            None => storage
                .len()
                .context(|| "cannot read file size".to_string())?,
        };

        let mut copies = [vec![0u8; REGION_TABLE_LEN], vec![0u8; REGION_TABLE_LEN]];
        for (copy, offset) in copies.iter_mut().zip(REGION_TABLE_OFFSETS) {
            read_structure(
                storage.as_ref(),
                overlay.as_ref(),
                copy,
                offset,
                "region table",
            )?;
        }
        let regions = RegionTable::parse_either([&copies[0], &copies[1]], problems)?;
        let reserved = reserved_ranges(&journal.header, &regions, file_len)?;

        let meta_region = regions.find(METADATA_REGION);
        let mut table = vec![0u8; METADATA_TABLE_LEN];
        read_structure(
            storage.as_ref(),
            overlay.as_ref(),
            &mut table,
            meta_region.file_offset,
            "metadata table",
        )?;
        let table = MetadataTable::parse(&table, u64::from(meta_region.length))?;
        let params = DiskParameters::read(&table, |offset, item| {
            read_structure(
                storage.as_ref(),
                overlay.as_ref(),
                item,
                meta_region.file_offset + u64::from(offset),
                "metadata item",
            )
        })?;
        let locator = if params.has_parent {
            let item = table.find(PARENT_LOCATOR).ok_or_else(|| {
                Error::corrupt(
                    CorruptionKind::InvalidField,
                    "metadata table",
                    "a differencing image has no parent locator item",
                )
            })?;
            let mut bytes = vec![0u8; item.length as usize];
            read_structure(
                storage.as_ref(),
                overlay.as_ref(),
                &mut bytes,
                meta_region.file_offset + u64::from(item.offset),
                "parent locator",
            )?;
            Some(ParentLocator::parse(&bytes)?)
        } else {
            None
        };

        let layout = BatLayout::new(
            params.virtual_size,
            params.block_size,
            params.logical_sector_size,
            params.has_parent,
        );
        let bat_region = regions.find(BAT_REGION);
        let loaded = Bat::loaded_len(&layout, u64::from(bat_region.length))?;
        budget.charge(loaded, "the VHDX BAT")?;
        let mut bat = Bat::load(layout, loaded, |buf, offset| {
            read_structure(
                storage.as_ref(),
                overlay.as_ref(),
                buf,
                bat_region.file_offset + offset,
                "BAT",
            )
        })?;
        let validated = bat.validate(params.virtual_size, file_len, &reserved);
        for bad in &validated.bad {
            give_up(
                &mut bat,
                bad.index,
                &bad.error(),
                &params,
                bat_region.file_offset,
                problems,
            )?;
        }
        let bitmaps = match &locator {
            Some(_) => {
                let bitmaps = load_sector_bitmaps(
                    storage.as_ref(),
                    overlay.as_ref(),
                    &mut bat,
                    &params,
                    bat_region.file_offset,
                    problems,
                )?;
                budget.charge(
                    (bitmaps.page_count() * BAT_PAGE_LEN) as u64,
                    "the sector bitmaps of this VHDX differencing disk",
                )?;
                Some(bitmaps)
            }
            None => None,
        };

        let differencing = match (locator, bitmaps) {
            (Some(locator), Some(bitmaps)) => Some(Differencing {
                link: ParentLink {
                    paths: locator.paths(),
                    identities: locator
                        .linkages()?
                        .iter()
                        .map(|id| *id.as_bytes())
                        .collect(),
                    format: Format::Vhdx,
                    child_kind: "VHDX differencing disk",
                },
                locator: RwLock::new(locator),
                metadata_region: meta_region.file_offset..meta_region.end(),
                parent: None,
                bitmaps: RwLock::new(bitmaps),
            }),
            _ => None,
        };

        // A read/write open writes the replayed log into the file only now, once all it
        // holds was checked: an image refused above is left as it was. Reads then find
        // everything in the file; a read-only open keeps the replayed view, and its payload
        // path consults it only if the log wrote outside the metadata structures or the
        // file is shorter than the view.
        let payload_overlay = match overlay {
            Some(replay) if !options.read_only => {
                replay_to_file(storage.as_ref(), &mut journal, &replay)?;
                None
            }
            overlay => overlay.and_then(|mut o| {
                let metadata_area = |u: &LogUpdate| {
                    let (s, e) = (u.file_offset(), u.file_offset() + u.covered_len());
                    (s >= REGION_TABLE_OFFSETS[0]
                        && e <= REGION_TABLE_OFFSETS[1] + REGION_TABLE_LEN as u64)
                        || reserved[1..].iter().any(|r| s >= r.start && e <= r.end)
                };
                o.updates.retain(|u| !metadata_area(u));
                (!o.updates.is_empty() || o.logical_len > o.physical_len).then_some(o)
            }),
        };

        Ok(VhdxDisk {
            storage,
            read_only: options.read_only,
            discard: options.discard.unwrap_or(
                match params.leave_blocks_allocated && differencing.is_none() {
                    true => DiscardMode::Zero,
                    false => DiscardMode::Unmap,
                },
            ),
            creator,
            bat_offset: bat_region.file_offset,
            log_was_dirty,
            layout: bat.layout,
            bat: RwLock::new(bat),
            metadata_end: reserved.iter().map(|r| r.end).fold(MIB, u64::max),
            journal: Mutex::new(journal),
            // The length found is durable, or was made so by the replay above.
            allocator: Mutex::new(Allocator {
                file_end: file_len,
                flushed_end: file_len,
                free: validated.free,
            }),
            claims: Claims::default(),
            commits: CommitQueue::default(),
            space: SpaceGate::default(),
            data_write_started: AtomicBool::new(false),
            keep_identity: options.keep_identity,
            poisoned: AtomicBool::new(false),
            payload_overlay,
            params,
            differencing,
        })
    }
}

/// Sends the bad BAT entry `index` to `problems` and, if they let the open go on, takes
/// it as naming nothing: ZERO for a payload block, absent for a sector bitmap block.
fn give_up(
    bat: &mut Bat,
    index: u64,
    problem: &Error,
    params: &DiskParameters,
    bat_offset: u64,
    problems: &mut Problems,
) -> Result<()> {
    let layout = bat.layout;
    let is_bitmap = layout.is_sector_bitmap_index(index);
    let blocks = if is_bitmap {
        let first = layout.block_of_index(index - layout.chunk_ratio);
        first..first + layout.chunk_ratio
    } else {
        let block = layout.block_of_index(index);
        block..block + 1
    };
    let disk_end = |block: u64| (block * layout.block_size).min(params.virtual_size);
    let fix = Fix::GiveUp {
        entry: index,
        disk_start: disk_end(blocks.start),
        disk_end: disk_end(blocks.end),
    };
    let at = bat_offset + index * BAT_ENTRY_LEN;
    problems.refuse(Finding::from_error(problem, Some(at), fix))?;
    bat.set(index, layout.naming_nothing(index));
    Ok(())
}

/// Loads the sector bitmap block of every chunk whose BAT entry has one, and checks that
/// each PARTIALLY_PRESENT block has one.
fn load_sector_bitmaps(
    storage: &dyn Storage,
    overlay: Option<&Overlay>,
    bat: &mut Bat,
    params: &DiskParameters,
    bat_offset: u64,
    problems: &mut Problems,
) -> Result<SectorBitmaps> {
    let layout = bat.layout;
    let mut bitmaps = SectorBitmaps::default();
    let mut block = vec![0u8; SECTOR_BITMAP_LEN];
    for chunk in 0..layout.payload_blocks.div_ceil(layout.chunk_ratio) {
        let first = chunk * layout.chunk_ratio;
        let entry = bat.sector_bitmap(first);
        if entry.payload_state() == Some(PayloadState::FullyPresent) {
            read_structure(
                storage,
                overlay,
                &mut block,
                entry.file_offset(),
                "sector bitmap",
            )?;
            bitmaps.insert(chunk, &block);
            if bitmaps.page_count() > MAX_LOADED_PAGES {
                return Err(Error::unsupported(format!(
                    "sector bitmaps with more than {} MiB of set bits; this reader keeps \
                     at most that much in memory",
                    (MAX_LOADED_PAGES * BAT_PAGE_LEN) >> 20
                )));
            }
            continue;
        }
        let last = (first + layout.chunk_ratio).min(layout.payload_blocks);
        for block in first..last {
            if bat.payload(block).payload_state() == Some(PayloadState::PartiallyPresent) {
                let index = layout.payload_index(block);
                let problem = Error::corrupt(
                    CorruptionKind::InvalidField,
                    format!("BAT entry {index}"),
                    "block is PARTIALLY_PRESENT but its chunk has no sector bitmap",
                );
                give_up(bat, index, &problem, params, bat_offset, problems)?;
            }
        }
    }
    Ok(bitmaps)
}

/// Checks every region against the file and the log, and returns the ranges no block may
/// overlap: the log first, then each region.
fn reserved_ranges(
    header: &Header,
    regions: &RegionTable,
    file_len: u64,
) -> Result<Vec<ReservedRange>> {
    let log = ReservedRange {
        start: header.log_offset,
        end: header.log_offset + u64::from(header.log_length),
        name: "log",
    };
    let mut reserved = vec![log];
    for region in &regions.entries {
        let name = match region.guid {
            BAT_REGION => "BAT region",
            METADATA_REGION => "metadata region",
            _ => "region",
        };
        let bad = |problem: String| {
            Err(Error::corrupt(
                CorruptionKind::OutOfBounds,
                format!("region table: {name} {}", region.guid),
                problem,
            ))
        };
        if region.end() > file_len {
            return bad(format!(
                "at {:#x} extends past end of file ({file_len:#x})",
                region.file_offset
            ));
        }
        if region.file_offset < reserved[0].end && reserved[0].start < region.end() {
            return bad(format!("at {:#x} overlaps the log", region.file_offset));
        }
        reserved.push(ReservedRange {
            start: region.file_offset,
            end: region.end(),
            name,
        });
    }
    Ok(reserved)
}

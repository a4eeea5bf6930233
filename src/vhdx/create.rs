//! Creating VHDX images: fixed, dynamic and differencing.
//!
//! Layout, as Hyper-V and qemu lay files out: file identifier, two headers (sequence
//! numbers 1 and 2, log empty), two identical region tables, a 1 MiB log at 1 MiB, the BAT
//! at 2 MiB, the 1 MiB metadata region after it, then payload. The BAT is sized for a
//! differencing file (every chunk's sector-bitmap entry) whatever the type, rounded up to
//! 1 MiB. A fixed image has every payload block FULLY_PRESENT in disk order and
//! LeaveBlockAllocated set; its data area reads as zeros and is allocated on the host
//! unless asked to stay sparse (a hole), since Hyper-V refuses a VHDX that reaches it as a
//! sparse file. Dynamic and differencing images start with every block NOT_PRESENT; a
//! differencing one also has an empty sector bitmap block for every chunk (holes).
//!
//! A differencing child copies the parent's virtual-disk items (size unless a larger one
//! is asked for, disk id, sector sizes) and records in its parent locator:
//! * `parent_linkage`: the parent's DataWriteGuid, braced and lowercase, as [MS-VHDX]
//!   says (Windows itself writes upper case, which libvhdi refuses to read);
//! * `relative_path`: from the child's directory, with backslashes (`.\base.vhdx`), which
//!   is what Hyper-V and this library try first and what survives moving both files;
//! * `volume_path` and `absolute_win32_path`, only when the user gave the parent's volume
//!   GUID path or Windows path: [MS-VHDX] allows nothing but `\\?\` followed by a drive
//!   or a share in the latter, and no such path follows from a host path.

use super::bat::{BAT_ENTRY_LEN, BatEntry, BatLayout, PayloadState};
use super::fields::MIB;
use super::file_identifier::FileIdentifier;
use super::format::RawFileParameters;
use super::header::{HEADER_OFFSETS, Header};
use super::metadata::{
    FILE_PARAMETERS, LOGICAL_SECTOR_SIZE, METADATA_TABLE_LEN, MetadataItem, MetadataTable,
    PARENT_LOCATOR, PHYSICAL_SECTOR_SIZE, VIRTUAL_DISK_ID, VIRTUAL_DISK_SIZE,
};
use super::parent_locator::{PARENT_LINKAGE, ParentLocator};
use super::region_table::{
    BAT_REGION, METADATA_REGION, REGION_TABLE_OFFSETS, RegionEntry, RegionTable,
};
use crate::disk::Format;
use crate::error::{Error, IoContext, Result};
use crate::layer::ParentImage;
use crate::storage;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use uuid::Uuid;
use zerocopy::IntoBytes;

/// Hyper-V's block size for new dynamic VHDX files.
pub const DEFAULT_BLOCK_SIZE: u32 = 32 << 20;
/// The creator name written into the file identifier.
pub const CREATOR: &str = concat!("vdisk-mount ", env!("CARGO_PKG_VERSION"));
const LOG_OFFSET: u64 = MIB;
const LOG_LENGTH: u32 = MIB as u32;
const BAT_OFFSET: u64 = 2 * MIB;
const METADATA_LENGTH: u32 = MIB as u32;
/// The largest virtual disk the format allows (64 TiB).
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
// File Parameters flags.
const LEAVE_BLOCKS_ALLOCATED: u32 = 1;
const HAS_PARENT: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VhdxKind {
    /// Every block allocated up front, in disk order.
    Fixed,
    /// Blocks allocated on first write.
    Dynamic,
    /// Blocks allocated on first write; everything else reads from the VHDX `parent`
    /// (see [`crate::chain::parent_image`]).
    Differencing { parent: ParentImage },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdxCreateOptions {
    /// Disk size in bytes, a multiple of the logical sector size. For differencing disks
    /// 0 means the parent's size; a larger size reads zeros past the parent's end.
    pub size: u64,
    pub kind: VhdxKind,
    /// A power of two from 1 to 256 MiB.
    pub block_size: u32,
    /// 512 or 4096; a child takes its parent's.
    pub logical_sector_size: u32,
    /// 512 or 4096; a child takes its parent's.
    pub physical_sector_size: u32,
    /// Leave a fixed image's data area as a hole in the host file instead of allocating it.
    pub sparse: bool,
}

impl VhdxCreateOptions {
    /// Hyper-V's defaults: 32 MiB blocks, 512-byte logical and 4096-byte physical sectors.
    pub fn new(size: u64, kind: VhdxKind) -> VhdxCreateOptions {
        VhdxCreateOptions {
            size,
            kind,
            block_size: DEFAULT_BLOCK_SIZE,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            sparse: false,
        }
    }
}

/// Creates the VHDX image `path`, which must not exist yet. Nothing is left behind on error.
pub fn create_vhdx(path: &Path, options: &VhdxCreateOptions) -> Result<()> {
    // The parent is examined before the child exists, so a failure leaves nothing.
    let plan = plan(options)?;
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .context(|| "cannot create image".to_string())
        .map_err(|e| e.with_file(path))?;
    let written = write_image(&file, &plan).and_then(|()| {
        file.sync_all()
            .context(|| "flushing the new image".to_string())
    });
    if written.is_err() {
        drop(file);
        let _ = fs::remove_file(path);
    }
    written.map_err(|e| e.with_file(path))
}

/// Everything the new file holds, decided before it is written.
struct Plan {
    size: u64,
    block_size: u32,
    logical_sector_size: u32,
    physical_sector_size: u32,
    disk_id: Uuid,
    fixed: bool,
    /// Whether the whole file is allocated on the host.
    allocate: bool,
    locator: Option<ParentLocator>,
}

fn invalid(problem: String) -> Error {
    Error::invalid_input(problem)
}

fn plan(options: &VhdxCreateOptions) -> Result<Plan> {
    let mut plan = Plan {
        size: options.size,
        block_size: options.block_size,
        logical_sector_size: options.logical_sector_size,
        physical_sector_size: options.physical_sector_size,
        disk_id: Uuid::new_v4(),
        fixed: options.kind == VhdxKind::Fixed,
        allocate: options.kind == VhdxKind::Fixed && !options.sparse,
        locator: None,
    };
    if let VhdxKind::Differencing { parent } = &options.kind {
        let disk_id = match (parent.format, parent.disk_id) {
            (Format::Vhdx, Some(disk_id)) => disk_id,
            _ => {
                return Err(invalid(format!(
                    "is a {} image; a VHDX differencing disk needs a VHDX parent",
                    parent.format
                ))
                .with_file(&parent.paths.canonical));
            }
        };
        if plan.size == 0 {
            plan.size = parent.size;
        } else if plan.size < parent.size {
            return Err(invalid(format!(
                "a differencing disk of {} bytes would cut off the end of its {}-byte parent",
                plan.size, parent.size
            )));
        }
        plan.logical_sector_size = parent.logical_sector_size;
        plan.physical_sector_size = parent.physical_sector_size;
        plan.disk_id = disk_id;
        let linkage = ParentLocator {
            entries: vec![(
                PARENT_LINKAGE.to_string(),
                Uuid::from_bytes(parent.identity).braced().to_string(),
            )],
        };
        plan.locator = Some(linkage.with_paths(&parent.paths));
    }
    let bs = u64::from(plan.block_size);
    if !plan.block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&bs) {
        return Err(invalid(format!(
            "block size {} is not a power of two from 1 MiB to 256 MiB",
            plan.block_size
        )));
    }
    for (what, size) in [
        ("logical", plan.logical_sector_size),
        ("physical", plan.physical_sector_size),
    ] {
        if size != 512 && size != 4096 {
            return Err(invalid(format!(
                "{what} sector size {size} is neither 512 nor 4096"
            )));
        }
    }
    check_size(plan.size, plan.logical_sector_size)?;
    Ok(plan)
}

/// Checks that a disk of `size` bytes with sectors of `logical_sector_size` bytes is one
/// the format can hold.
pub(super) fn check_size(size: u64, logical_sector_size: u32) -> Result<()> {
    if size == 0 || size > MAX_VIRTUAL_SIZE || !size.is_multiple_of(u64::from(logical_sector_size))
    {
        return Err(invalid(format!(
            "disk size {size} is not a whole number of {logical_sector_size}-byte sectors up \
             to 64 TiB"
        )));
    }
    Ok(())
}

/// The metadata region: table, then the items one after another.
fn metadata_region(plan: &Plan) -> Result<Vec<u8>> {
    let flags = if plan.locator.is_some() {
        HAS_PARENT
    } else if plan.fixed {
        LEAVE_BLOCKS_ALLOCATED
    } else {
        0
    };
    let file_parameters = RawFileParameters {
        block_size: plan.block_size.into(),
        flags: flags.into(),
    };
    let mut items: Vec<(Uuid, bool, Vec<u8>)> = vec![
        (FILE_PARAMETERS, false, file_parameters.as_bytes().to_vec()),
        (VIRTUAL_DISK_SIZE, true, plan.size.to_le_bytes().to_vec()),
        (VIRTUAL_DISK_ID, true, plan.disk_id.to_bytes_le().to_vec()),
        (
            LOGICAL_SECTOR_SIZE,
            true,
            plan.logical_sector_size.to_le_bytes().to_vec(),
        ),
        (
            PHYSICAL_SECTOR_SIZE,
            true,
            plan.physical_sector_size.to_le_bytes().to_vec(),
        ),
    ];
    if let Some(locator) = &plan.locator {
        items.push((PARENT_LOCATOR, false, locator.to_bytes()));
    }
    let mut region = vec![0u8; METADATA_LENGTH as usize];
    let mut table = MetadataTable { items: Vec::new() };
    let mut offset = METADATA_TABLE_LEN;
    for (id, is_virtual_disk, data) in items {
        let end = offset + data.len();
        if end > region.len() {
            return Err(invalid(
                "the parent's paths are too long for the metadata region".to_string(),
            ));
        }
        region[offset..end].copy_from_slice(&data);
        table.items.push(MetadataItem {
            id,
            offset: offset as u32,
            length: data.len() as u32,
            is_user: false,
            is_virtual_disk,
            is_required: true,
        });
        offset = end;
    }
    region[..METADATA_TABLE_LEN].copy_from_slice(&table.to_bytes());
    Ok(region)
}

fn write_image(file: &File, plan: &Plan) -> Result<()> {
    let write = |bytes: &[u8], at: u64, what: &str| {
        file.write_all_at(bytes, at)
            .context(|| format!("writing the {what}"))
    };
    // Laid out as a differencing file, so the BAT holds every sector-bitmap entry.
    let layout = BatLayout::new(plan.size, plan.block_size, plan.logical_sector_size, true);
    let bat_length = (layout.total_entries * BAT_ENTRY_LEN).next_multiple_of(MIB);
    let bat_length_u32 = u32::try_from(bat_length)
        .map_err(|_| invalid("the BAT would exceed the 4 GiB a region may hold".to_string()))?;
    let metadata_offset = BAT_OFFSET + bat_length;
    let payload_offset = metadata_offset + u64::from(METADATA_LENGTH);

    write(
        &FileIdentifier {
            creator: CREATOR.to_string(),
        }
        .to_bytes(),
        0,
        "file identifier",
    )?;
    let mut header = Header {
        sequence_number: 1,
        file_write_guid: Uuid::new_v4(),
        data_write_guid: Uuid::new_v4(),
        log_guid: Uuid::nil(),
        log_version: 0,
        version: 1,
        log_length: LOG_LENGTH,
        log_offset: LOG_OFFSET,
    };
    for at in HEADER_OFFSETS {
        write(&header.to_bytes(), at, "header")?;
        header.sequence_number += 1;
    }
    let regions = RegionTable {
        entries: vec![
            RegionEntry {
                guid: BAT_REGION,
                file_offset: BAT_OFFSET,
                length: bat_length_u32,
                required: true,
            },
            RegionEntry {
                guid: METADATA_REGION,
                file_offset: metadata_offset,
                length: METADATA_LENGTH,
                required: true,
            },
        ],
    }
    .to_bytes();
    for at in REGION_TABLE_OFFSETS {
        write(&regions, at, "region table")?;
    }
    write(&metadata_region(plan)?, metadata_offset, "metadata region")?;

    let mut end = payload_offset;
    let mut bat = vec![0u8; bat_length as usize];
    let mut set_entry = |index: u64, len: u64| {
        let entry = BatEntry::new(PayloadState::FullyPresent, end);
        let at = (index * BAT_ENTRY_LEN) as usize;
        bat[at..at + 8].copy_from_slice(&entry.0.to_le_bytes());
        end += len;
    };
    if plan.fixed {
        for block in 0..layout.payload_blocks {
            set_entry(layout.payload_index(block), layout.block_size);
        }
    } else if plan.locator.is_some() {
        // Every chunk gets its (empty) sector bitmap block: libvhdi reads the bitmap of a
        // chunk without one from file offset 0, and so serves a fresh child wrongly.
        for chunk in 0..layout.payload_blocks.div_ceil(layout.chunk_ratio) {
            set_entry(layout.sector_bitmap_index(chunk * layout.chunk_ratio), MIB);
        }
    }
    write(&bat, BAT_OFFSET, "BAT")?;
    // Log, NOT_PRESENT BAT entries, empty sector bitmaps and a fixed image's data all
    // read as zeros.
    if plan.allocate {
        storage::allocate(file, end).context(|| "allocating the image on the host".to_string())
    } else {
        file.set_len(end).context(|| "sizing the image".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{OpenOptions, VirtualDisk};
    use crate::storage::FileStorage;
    use crate::vhdx::VhdxDisk;

    fn open(path: &Path) -> VhdxDisk {
        VhdxDisk::open(
            Box::new(FileStorage::new(File::open(path).unwrap())),
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn created_images_open_with_what_was_asked() {
        let dir = tempfile::tempdir().unwrap();
        for (name, kind, size, lss) in [
            ("fixed.vhdx", VhdxKind::Fixed, 5 << 20, 512),
            ("dynamic.vhdx", VhdxKind::Dynamic, (70 << 20) + 512, 512),
            ("dynamic4k.vhdx", VhdxKind::Dynamic, 9 << 20, 4096),
        ] {
            let path = dir.path().join(name);
            let options = VhdxCreateOptions {
                logical_sector_size: lss,
                block_size: 2 << 20,
                ..VhdxCreateOptions::new(size, kind.clone())
            };
            create_vhdx(&path, &options).unwrap();
            let disk = open(&path);
            let info = disk.info();
            assert_eq!(disk.format(), Format::Vhdx);
            assert_eq!(disk.size(), size, "{name}");
            assert_eq!(disk.logical_sector_size(), lss);
            assert_eq!(disk.physical_sector_size(), 4096);
            assert_eq!(info.creator, CREATOR);
            assert_eq!(info.header_sequence_number, 2);
            assert!(info.log_guid.is_nil());
            assert_eq!(info.fixed, kind == VhdxKind::Fixed);
            let blocks = size.div_ceil(2 << 20);
            assert_eq!(info.total_blocks, blocks);
            assert_eq!(
                info.allocated_blocks,
                if kind == VhdxKind::Fixed { blocks } else { 0 }
            );
        }
    }

    #[test]
    fn bad_options_are_refused_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.vhdx");
        let with = |f: fn(&mut VhdxCreateOptions)| {
            let mut o = VhdxCreateOptions::new(8 << 20, VhdxKind::Dynamic);
            f(&mut o);
            o
        };
        for (options, problem) in [
            (
                with(|o| o.size = 1000),
                "not a whole number of 512-byte sectors",
            ),
            (with(|o| o.size = 0), "not a whole number"),
            (with(|o| o.size = (64 << 40) + 512), "up to 64 TiB"),
            (
                with(|o| {
                    o.logical_sector_size = 4096;
                    o.size = 4096 * 3 + 512
                }),
                "4096-byte sectors",
            ),
            (with(|o| o.block_size = 3 << 20), "block size 3145728"),
            (with(|o| o.block_size = 512 << 20), "block size"),
            (
                with(|o| o.physical_sector_size = 1024),
                "physical sector size 1024",
            ),
        ] {
            let err = create_vhdx(&path, &options).unwrap_err();
            assert!(err.to_string().contains(problem), "{err} lacks {problem}");
            assert!(!path.exists(), "{err}");
        }
        fs::write(&path, b"keep me").unwrap();
        let err = create_vhdx(&path, &with(|_| {})).unwrap_err();
        assert!(err.to_string().contains("cannot create image"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"keep me");
    }
}

//! Creating VHD images: fixed, dynamic and differencing (FORMATS.md §8.16, §8.10).
//!
//! Created footers name this library as their creator (`vdm `, see [`CREATOR_APP`]) and
//! store the requested size in Original and Current Size, with the geometry the
//! specification derives from it. Readers that size `vpc ` and `qemu` images by geometry
//! and every other creator by Current Size (this one, qemu since 2024, Hyper-V) therefore
//! see exactly the size asked for, which Azure needs (a whole number of MiB) and which
//! geometry can rarely express.
//!
//! Layout of dynamic and differencing images, as Hyper-V and qemu write them: footer copy
//! at 0, dynamic header at 512, BAT at 1536 (all entries unallocated), then for
//! differencing disks one 512-byte-aligned data area per parent locator, then the footer.
//! A fixed image's data area is allocated on the host unless asked to stay sparse:
//! Hyper-V refuses a VHD that reaches it as a sparse file.
//!
//! A differencing child records the parent's footer Time Stamp as its Parent Time Stamp
//! (not the parent file's modification time, which copying changes), and
//! names the parent relatively (W2ru) and absolutely (W2ku: the Windows path the user
//! gave, else the host path in Windows form).

use super::bat::table_bytes;
use super::dynamic_header::{DynamicHeader, HEADER_SIZE, MAX_DISK_SIZE, PARENT_LOCATORS_LEN};
use super::footer::{DiskType, FOOTER_SIZE, Footer, NO_DATA_OFFSET};
use super::format::PARENT_NAME_LEN;
use super::geometry::Geometry;
use super::{MAX_BAT_ENTRIES, SECTOR};
use crate::disk::Format;
use crate::error::{Error, IoContext, Result};
use crate::layer::ParentImage;
use crate::storage;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Creator Application of images made here ("vdm " for vdisk-mount). Deliberately not
/// `vpc ` or `qemu`, which tell readers to size the disk by its geometry.
pub const CREATOR_APP: [u8; 4] = *b"vdm ";
/// Creator Version: 1.0.
pub const CREATOR_VERSION: u32 = 0x0001_0000;
/// Creator Host OS: the specification knows only Windows and Macintosh, and Windows is
/// what the readers that look at it expect.
const CREATOR_HOST_OS: [u8; 4] = *b"Wi2k";
/// The block size Virtual PC, Hyper-V and qemu use for dynamic VHDs.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// VHD timestamps count seconds from 2000-01-01 00:00:00 UTC.
const VHD_EPOCH: Duration = Duration::from_secs(946_684_800);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VhdKind {
    /// Every byte of the disk allocated up front, in the order of the disk.
    Fixed,
    /// Blocks allocated on first write.
    Dynamic,
    /// Blocks allocated on first write; everything else reads from the VHD `parent`
    /// (see [`crate::chain::parent_image`]).
    Differencing { parent: ParentImage },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdCreateOptions {
    /// Disk size in bytes, a multiple of 512. For differencing disks 0 means the parent's
    /// size; a larger size reads zeros past the parent's end.
    pub size: u64,
    pub kind: VhdKind,
    /// Data bytes per block of dynamic and differencing disks: a power of two of at least
    /// 512 ([`DEFAULT_BLOCK_SIZE`] unless there is a reason).
    pub block_size: u32,
    /// Leave a fixed disk's data area as a hole in the host file instead of allocating it.
    pub sparse: bool,
}

impl VhdCreateOptions {
    pub fn new(size: u64, kind: VhdKind) -> VhdCreateOptions {
        VhdCreateOptions {
            size,
            kind,
            block_size: DEFAULT_BLOCK_SIZE,
            sparse: false,
        }
    }
}

/// Creates the VHD image `path`, which must not exist yet. Nothing is left behind on error.
pub fn create_vhd(path: &Path, options: &VhdCreateOptions) -> Result<()> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .context(|| "cannot create image".to_string())
        .map_err(|e| e.with_file(path))?;
    let written = write_image(&file, options).and_then(|()| {
        file.sync_all()
            .context(|| "flushing the new image".to_string())
    });
    if written.is_err() {
        drop(file);
        let _ = fs::remove_file(path);
    }
    written.map_err(|e| e.with_file(path))
}

/// What a differencing child records about its parent.
struct ParentRecord {
    unique_id: [u8; 16],
    timestamp: u32,
    size: u64,
    name: String,
    relative: String,
    absolute: String,
}

fn vhd_timestamp(time: SystemTime) -> u32 {
    let since = time
        .duration_since(UNIX_EPOCH + VHD_EPOCH)
        .unwrap_or_default();
    u32::try_from(since.as_secs()).unwrap_or(u32::MAX)
}

fn record_parent(parent: &ParentImage) -> Result<ParentRecord> {
    if parent.format != Format::Vhd {
        return Err(Error::invalid_input(format!(
            "is a {} image; a VHD differencing disk needs a VHD parent",
            parent.format
        ))
        .with_file(&parent.paths.canonical));
    }
    if parent.paths.volume.is_some() {
        return Err(invalid(
            "a VHD records no volume path of its parent; give its Windows path".to_string(),
        ));
    }
    let name = parent
        .paths
        .canonical
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(ParentRecord {
        unique_id: parent.identity,
        timestamp: parent.time_stamp.unwrap_or_default(),
        size: parent.size,
        name,
        relative: parent.paths.relative.clone(),
        absolute: parent.paths.vhd_absolute(),
    })
}

fn invalid(problem: String) -> Error {
    Error::invalid_input(problem)
}

/// Checks that a disk of `size` bytes is one the format can hold.
pub(super) fn check_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(SECTOR) || size > MAX_DISK_SIZE {
        return Err(invalid(format!(
            "disk size {size} is not a whole number of 512-byte sectors between 512 and \
             {MAX_DISK_SIZE} bytes"
        )));
    }
    Ok(())
}

/// The blocks of `block_size` bytes a disk of `size` bytes needs, if a VHD opened here
/// may have that many.
pub(super) fn block_count(size: u64, block_size: u32) -> Result<u64> {
    let blocks = size.div_ceil(u64::from(block_size));
    if blocks > MAX_BAT_ENTRIES {
        return Err(invalid(format!(
            "{blocks} blocks of {block_size} bytes are more than the {MAX_BAT_ENTRIES} a \
             VHD opened here may have; choose larger blocks"
        )));
    }
    Ok(blocks)
}

fn write_image(file: &File, options: &VhdCreateOptions) -> Result<()> {
    let parent = match &options.kind {
        VhdKind::Differencing { parent } => Some(record_parent(parent)?),
        _ => None,
    };
    let size = match &parent {
        Some(link) if options.size == 0 => link.size,
        Some(link) if options.size < link.size => {
            return Err(invalid(format!(
                "a differencing disk of {} bytes would cut off the end of its {}-byte parent",
                options.size, link.size
            )));
        }
        _ => options.size,
    };
    check_size(size)?;
    let disk_type = match options.kind {
        VhdKind::Fixed => DiskType::Fixed,
        VhdKind::Dynamic => DiskType::Dynamic,
        VhdKind::Differencing { .. } => DiskType::Differencing,
    };
    let footer = Footer {
        features: 2,
        version: 0x0001_0000,
        data_offset: if disk_type == DiskType::Fixed {
            NO_DATA_OFFSET
        } else {
            FOOTER_SIZE as u64
        },
        timestamp: vhd_timestamp(SystemTime::now()),
        creator_app: CREATOR_APP,
        creator_version: CREATOR_VERSION,
        creator_host_os: CREATOR_HOST_OS,
        original_size: size,
        current_size: size,
        geometry: Geometry::for_size(size),
        disk_type,
        unique_id: *uuid::Uuid::new_v4().as_bytes(),
        saved_state: 0,
    }
    .serialize();
    let write = |bytes: &[u8], at: u64, what: &str| {
        file.write_all_at(bytes, at)
            .context(|| format!("writing the {what}"))
    };
    if disk_type == DiskType::Fixed {
        if options.sparse {
            // The data area stays a hole: it reads as zeros without taking space.
            file.set_len(size)
                .context(|| "sizing the data area".to_string())?;
        } else {
            storage::allocate(file, size + FOOTER_SIZE as u64)
                .context(|| "allocating the image on the host".to_string())?;
        }
        return write(&footer, size, "footer");
    }

    let block_size = options.block_size;
    if !block_size.is_power_of_two() || block_size < SECTOR as u32 {
        return Err(invalid(format!(
            "block size {block_size} is not a power of two of at least 512"
        )));
    }
    let entries = block_count(size, block_size)?;
    let table_at = (FOOTER_SIZE + HEADER_SIZE) as u64;
    // `entries` is at most MAX_BAT_ENTRIES, far below u32::MAX.
    let max_table_entries = entries as u32;
    let mut end = table_at + table_bytes(max_table_entries);
    let mut header = DynamicHeader {
        data_offset: u64::MAX,
        table_offset: table_at,
        version: 0x0001_0000,
        max_table_entries,
        block_size,
        parent_unique_id: [0; 16],
        parent_timestamp: 0,
        parent_name: [0; PARENT_NAME_LEN],
        parent_locators: [0; PARENT_LOCATORS_LEN],
    };
    let mut locator_data = Vec::new();
    if let Some(link) = &parent {
        header.parent_unique_id = link.unique_id;
        header.parent_timestamp = link.timestamp;
        (locator_data, end) =
            header.name_parent(&link.name, &link.relative, &link.absolute, end)?;
    }

    write(&footer, 0, "footer copy")?;
    write(&header.serialize(), FOOTER_SIZE as u64, "dynamic header")?;
    write(
        &vec![0xFF; table_bytes(max_table_entries) as usize],
        table_at,
        "BAT",
    )?;
    for (at, data) in &locator_data {
        write(data, *at, "parent locator data")?;
    }
    write(&footer, end, "footer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{OpenOptions, VirtualDisk};
    use crate::vhd::VhdDisk;

    #[test]
    fn timestamps_count_from_2000() {
        assert_eq!(vhd_timestamp(UNIX_EPOCH + VHD_EPOCH), 0);
        // The Azure sample footer's time: 2024-11-13 17:17:10 UTC.
        assert_eq!(
            vhd_timestamp(UNIX_EPOCH + Duration::from_secs(1_731_518_230)),
            0x2EC7_9B96
        );
        assert_eq!(vhd_timestamp(UNIX_EPOCH), 0);
    }

    /// A child records its parent's footer Time Stamp, not when the parent file last
    /// changed; one whose Parent Time Stamp matches neither (children made by older
    /// versions stored the file's modification time) still opens with its parent.
    #[test]
    fn a_child_records_the_parents_time_stamp_and_opens_without_a_match() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhd");
        create_vhd(&base, &VhdCreateOptions::new(4 << 20, VhdKind::Dynamic)).unwrap();
        let footer_bytes: [u8; FOOTER_SIZE] =
            fs::read(&base).unwrap()[..FOOTER_SIZE].try_into().unwrap();
        let parent_time = Footer::parse(&footer_bytes, "footer").unwrap().timestamp;
        // Copying or touching a parent changes its modification time, not its footer.
        File::options()
            .write(true)
            .open(&base)
            .unwrap()
            .set_modified(UNIX_EPOCH + VHD_EPOCH + Duration::from_secs(12345))
            .unwrap();
        let child = dir.path().join("child.vhd");
        let parent = crate::chain::parent_image(&child, &base).unwrap();
        create_vhd(
            &child,
            &VhdCreateOptions::new(0, VhdKind::Differencing { parent }),
        )
        .unwrap();
        let header_at = FOOTER_SIZE..FOOTER_SIZE + HEADER_SIZE;
        let mut image = fs::read(&child).unwrap();
        let mut header =
            DynamicHeader::parse(&image[header_at.clone()].try_into().unwrap()).unwrap();
        assert_eq!(header.parent_timestamp, parent_time);
        assert_ne!(parent_time, 12345);

        header.parent_timestamp = 12345;
        image[header_at].copy_from_slice(&header.serialize());
        fs::write(&child, image).unwrap();
        let options = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let disk = crate::chain::open_layered(&child, &options).unwrap();
        assert_eq!(disk.parent().unwrap().0, fs::canonicalize(&base).unwrap());
    }

    #[test]
    fn created_images_open_with_the_requested_size() {
        let dir = tempfile::tempdir().unwrap();
        for (name, kind, size) in [
            ("fixed.vhd", VhdKind::Fixed, 3 << 20),
            ("dynamic.vhd", VhdKind::Dynamic, (5 << 20) + 512),
        ] {
            let path = dir.path().join(name);
            create_vhd(&path, &VhdCreateOptions::new(size, kind.clone())).unwrap();
            let disk = VhdDisk::open(
                Box::new(crate::storage::FileStorage::new(File::open(&path).unwrap())),
                &OpenOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(disk.size(), size, "{name}");
            assert_eq!(disk.creator_app(), CREATOR_APP);
            assert_eq!(disk.geometry(), Geometry::for_size(size));
            assert_eq!(disk.allocated_blocks().is_some(), kind == VhdKind::Dynamic);
        }
    }

    #[test]
    fn bad_options_are_refused_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.vhd");
        for (options, problem) in [
            (
                VhdCreateOptions::new(1000, VhdKind::Dynamic),
                "not a whole number of 512-byte sectors",
            ),
            (
                VhdCreateOptions::new(0, VhdKind::Fixed),
                "not a whole number",
            ),
            (
                VhdCreateOptions::new(MAX_DISK_SIZE + 512, VhdKind::Fixed),
                "not a whole number",
            ),
            (
                VhdCreateOptions {
                    block_size: 3 << 20,
                    ..VhdCreateOptions::new(1 << 20, VhdKind::Dynamic)
                },
                "block size 3145728 is not a power of two",
            ),
            (
                VhdCreateOptions {
                    block_size: 512,
                    ..VhdCreateOptions::new(MAX_DISK_SIZE, VhdKind::Dynamic)
                },
                "choose larger blocks",
            ),
            (
                VhdCreateOptions::new(
                    0,
                    VhdKind::Differencing {
                        parent: ParentImage {
                            format: Format::Vhdx,
                            identity: [1; 16],
                            disk_id: None,
                            size: 1 << 20,
                            logical_sector_size: 512,
                            physical_sector_size: 512,
                            time_stamp: None,
                            paths: crate::layer::StoredParentPaths {
                                canonical: dir.path().join("base.vhdx"),
                                relative: ".\\base.vhdx".into(),
                                absolute: "\\base.vhdx".into(),
                                windows: None,
                                volume: None,
                            },
                        },
                    },
                ),
                "base.vhdx: is a vhdx image; a VHD differencing disk needs a VHD parent",
            ),
        ] {
            let err = create_vhd(&path, &options).unwrap_err();
            assert!(err.to_string().contains(problem), "{err}");
            assert!(!path.exists(), "{err}");
        }
        fs::write(&path, b"keep me").unwrap();
        let err = create_vhd(&path, &VhdCreateOptions::new(1 << 20, VhdKind::Dynamic)).unwrap_err();
        assert!(err.to_string().contains("cannot create image"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"keep me");
    }
}

//! Creating images of either format from one set of options, as `vdisk create` offers it:
//! the format follows the parent, else the option, else the file name; each format's
//! driver writes the image.

use crate::chain::parent_image;
use crate::compact::human;
use crate::disk::Format;
use crate::error::{Error, IoContext, Result};
use crate::vhd::{VhdCreateOptions, VhdKind, create_vhd};
use crate::vhdx::create::{VhdxCreateOptions, VhdxKind, create_vhdx};
use crate::windows_path::{WindowsPath, volume_path};
use serde::Serialize;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageType {
    /// Space allocated as data is written.
    Dynamic,
    /// All space allocated up front.
    Fixed,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// `None`: the parent's format, else from the file name (`.vhd`, `.vhdx`), else VHDX.
    pub format: Option<Format>,
    /// `None`: dynamic.
    pub image_type: Option<ImageType>,
    /// Bytes; required without a parent, which otherwise gives it.
    pub size: Option<u64>,
    /// `None`: the format's usual size (VHD 2 MiB, VHDX 32 MiB).
    pub block_size: Option<u32>,
    /// `None`: 512. Not with a parent, whose sector size a child takes.
    pub logical_sector_size: Option<u32>,
    /// Makes a differencing child of this VHD or VHDX.
    pub parent: Option<PathBuf>,
    /// Leave a fixed image's data area unallocated on the host (holes), as it reads zeros
    /// anyway; by default it is allocated, as Hyper-V wants.
    pub sparse: bool,
    /// Round the disk size up to a whole MiB, as Azure requires of fixed VHDs.
    pub azure: bool,
    /// Where Windows finds the parent: `D:\vms\base.vhdx` or `\\server\share\base.vhdx`.
    pub parent_win_path: Option<String>,
    /// The parent's volume GUID path, `\\?\Volume{GUID}\vms\base.vhdx` (VHDX only).
    pub parent_volume_path: Option<String>,
}

/// What was made: the disk, and what the file takes on the host.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CreateReport {
    pub image: String,
    pub format: String,
    /// fixed, dynamic or differencing.
    pub subtype: String,
    pub disk_size: u64,
    #[serde(flatten)]
    pub host: HostAllocation,
    /// What other programs may refuse in the new image.
    pub warnings: Vec<String>,
}

impl fmt::Display for CreateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} {}, {} disk, {}",
            self.image,
            self.subtype,
            self.format,
            human(self.disk_size),
            self.host
        )
    }
}

/// How much of an image file the host's filesystem has given space to.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct HostAllocation {
    pub file_length: u64,
    /// Bytes the filesystem holds for the file (`st_blocks`): short of `file_length` by
    /// its holes, and a little over it where it reserves whole blocks.
    pub allocated_bytes: u64,
}

impl HostAllocation {
    pub fn of(path: &Path) -> Result<HostAllocation> {
        let meta = std::fs::metadata(path)
            .context(|| "cannot read file attributes".to_string())
            .map_err(|e| e.with_file(path))?;
        Ok(HostAllocation {
            file_length: meta.len(),
            allocated_bytes: meta.blocks() * 512,
        })
    }
}

impl fmt::Display for HostAllocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of the {} file allocated on the host",
            human(self.allocated_bytes.min(self.file_length)),
            human(self.file_length)
        )
    }
}

/// `size` rounded up to a whole MiB, as Azure requires of a fixed VHD's virtual size.
pub fn azure_size(size: u64) -> Result<u64> {
    size.checked_next_multiple_of(MIB).ok_or_else(|| {
        Error::invalid_input(format!(
            "disk size {size} cannot be rounded up to a whole MiB"
        ))
    })
}

/// Why Azure would refuse a new image, if it would.
fn azure_warning(format: Format, fixed: bool, size: u64) -> Option<String> {
    (format == Format::Vhd && fixed && !size.is_multiple_of(MIB)).then(|| {
        format!(
            "a disk size of {size} bytes is not a whole number of MiB, which Azure requires \
             of a fixed VHD (--azure rounds it up)"
        )
    })
}

/// The format `path`'s extension names, if any.
fn format_from_name(path: &Path) -> Option<Format> {
    match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "vhd" => Some(Format::Vhd),
        "vhdx" => Some(Format::Vhdx),
        _ => None,
    }
}

/// Creates the image `path`, which must not exist.
pub fn create(path: &Path, options: &CreateOptions) -> Result<CreateReport> {
    let invalid = |problem: String| Err(Error::invalid_input(problem));
    let parent = match &options.parent {
        Some(parent_path) => {
            let mut parent = parent_image(path, parent_path)?;
            parent.paths.windows = options
                .parent_win_path
                .as_deref()
                .map(WindowsPath::parse)
                .transpose()?;
            parent.paths.volume = options
                .parent_volume_path
                .as_deref()
                .map(volume_path)
                .transpose()?;
            Some(parent)
        }
        None if options.parent_win_path.is_some() || options.parent_volume_path.is_some() => {
            return invalid(
                "a parent's Windows or volume path is only for a differencing image".to_string(),
            );
        }
        None => None,
    };
    let format = match &parent {
        Some(parent) => {
            let found = parent.format;
            if let Some(asked) = options.format.filter(|&f| f != found) {
                return invalid(format!(
                    "the parent is a {found} image; a {asked} image cannot be its child"
                ));
            }
            if options.image_type == Some(ImageType::Fixed) {
                return invalid("a differencing image cannot be fixed".to_string());
            }
            if options.logical_sector_size.is_some() {
                return invalid(
                    "a differencing image takes its parent's sector size; leave it out".to_string(),
                );
            }
            found
        }
        None => options
            .format
            .or_else(|| format_from_name(path))
            .unwrap_or(Format::Vhdx),
    };
    let size = match (options.size, &parent) {
        (Some(size), _) if options.azure => azure_size(size)?,
        (Some(size), _) => size,
        (None, Some(_)) => 0,
        (None, None) => return invalid("the disk size is required without a parent".to_string()),
    };
    let fixed = options.image_type == Some(ImageType::Fixed);
    let disk_size = match &parent {
        Some(parent) if size == 0 => parent.size,
        _ => size,
    };
    let subtype = match (&parent, fixed) {
        (Some(_), _) => "differencing",
        (None, true) => "fixed",
        (None, false) => "dynamic",
    };
    match format {
        Format::Vhd => {
            if options.logical_sector_size.is_some_and(|s| s != 512) {
                return invalid("VHD images have 512-byte sectors only".to_string());
            }
            let kind = match parent {
                Some(parent) => VhdKind::Differencing { parent },
                None if fixed => VhdKind::Fixed,
                None => VhdKind::Dynamic,
            };
            let mut vhd = VhdCreateOptions::new(size, kind);
            if let Some(block_size) = options.block_size {
                vhd.block_size = block_size;
            }
            vhd.sparse = options.sparse;
            create_vhd(path, &vhd)?;
        }
        Format::Vhdx => {
            let kind = match parent {
                Some(parent) => VhdxKind::Differencing { parent },
                None if fixed => VhdxKind::Fixed,
                None => VhdxKind::Dynamic,
            };
            let mut vhdx = VhdxCreateOptions::new(size, kind);
            if let Some(block_size) = options.block_size {
                vhdx.block_size = block_size;
            }
            if let Some(sector) = options.logical_sector_size {
                vhdx.logical_sector_size = sector;
            }
            vhdx.sparse = options.sparse;
            create_vhdx(path, &vhdx)?;
        }
        Format::Raw => return invalid("raw images are made with truncate, not here".to_string()),
    }
    Ok(CreateReport {
        image: path.display().to_string(),
        format: format.to_string(),
        subtype: subtype.to_string(),
        disk_size,
        host: HostAllocation::of(path)?,
        warnings: azure_warning(format, fixed, disk_size)
            .into_iter()
            .collect(),
    })
}

/// Parses a size: a number of bytes with an optional binary suffix K, M, G or T (also
/// KiB, MiB, ...; any case).
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = || Error::invalid_input(format!("'{text}' is not a size (e.g. 512, 64M, 2G)"));
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(bad()),
    };
    number.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::OpenOptions;
    use crate::open::probe;
    use crate::storage::FileStorage;
    use crate::vhdx::create::{VhdxCreateOptions, VhdxKind, create_vhdx};
    use crate::vhdx::parent_locator::{
        ABSOLUTE_WIN32_PATH, PARENT_LINKAGE, ParentLocator, RELATIVE_PATH, VOLUME_PATH,
    };
    use std::fs;
    use std::fs::File;

    #[test]
    fn a_child_takes_its_parents_disk_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhdx");
        let options = VhdxCreateOptions {
            logical_sector_size: 4096,
            ..VhdxCreateOptions::new(8 << 20, VhdxKind::Dynamic)
        };
        create_vhdx(&base, &options).unwrap();
        let child = dir.path().join("child.vhdx");
        let kind = VhdxKind::Differencing {
            parent: crate::chain::parent_image(&child, &base).unwrap(),
        };
        create_vhdx(&child, &VhdxCreateOptions::new(0, kind.clone())).unwrap();
        let open = |path: &Path| {
            let options = OpenOptions {
                read_only: true,
                ..Default::default()
            };
            crate::chain::open_layered(path, &options).unwrap()
        };
        let (base_disk, child_disk) = (open(&base), open(&child));
        assert_eq!(child_disk.size(), 8 << 20);
        assert_eq!(child_disk.logical_sector_size(), 4096);
        let (base_info, child_info) = (base_disk.facts(), child_disk.facts());
        assert_eq!(child_info.disk_id, base_info.disk_id);
        let locator = ParentLocator {
            entries: child_info.parent_locator.unwrap(),
        };
        let base_data_write_guid = base_info.data_write_guid.unwrap();
        assert_eq!(locator.linkages().unwrap(), [base_data_write_guid]);
        assert_eq!(
            locator.get(PARENT_LINKAGE).unwrap(),
            format!("{{{base_data_write_guid}}}"),
            "braced, lower case"
        );
        assert_eq!(locator.get(RELATIVE_PATH), Some(".\\base.vhdx"));
        // No Windows path follows from a host path, so none is recorded.
        assert_eq!(locator.get(ABSOLUTE_WIN32_PATH), None);
        assert_eq!(locator.get(VOLUME_PATH), None);
        let canonical = fs::canonicalize(&base).unwrap();
        let (found, parent) = child_disk.parent().unwrap();
        assert_eq!(found, canonical);
        assert_eq!(parent.identity(), Some(*base_data_write_guid.as_bytes()));

        let smaller = dir.path().join("smaller.vhdx");
        let err = create_vhdx(&smaller, &VhdxCreateOptions::new(4 << 20, kind)).unwrap_err();
        assert!(err.to_string().contains("would cut off"), "{err}");
        assert!(!smaller.exists());
    }

    fn open_read_only(path: &Path) -> Box<dyn crate::layer::Layer> {
        let options = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        crate::chain::open_layered(path, &options).unwrap()
    }

    fn child_options(parent: &Path) -> CreateOptions {
        CreateOptions {
            parent: Some(parent.to_path_buf()),
            ..Default::default()
        }
    }

    #[test]
    fn windows_paths_given_for_the_parent_are_recorded_in_each_formats_form() {
        let dir = tempfile::tempdir().unwrap();
        let sized = CreateOptions {
            size: Some(4 << 20),
            ..Default::default()
        };
        let (base_vhdx, base_vhd) = (dir.path().join("base.vhdx"), dir.path().join("base.vhd"));
        create(&base_vhdx, &sized).unwrap();
        create(&base_vhd, &sized).unwrap();

        let child = dir.path().join("child.vhdx");
        create(
            &child,
            &CreateOptions {
                parent_win_path: Some("\\\\nas\\vms\\base.vhdx".into()),
                parent_volume_path: Some(
                    "\\\\?\\Volume{26A21BDA-A627-11D7-9931-806E6F6E6963}\\vms\\base.vhdx".into(),
                ),
                ..child_options(&base_vhdx)
            },
        )
        .unwrap();
        let locator = ParentLocator {
            entries: open_read_only(&child).facts().parent_locator.unwrap(),
        };
        assert_eq!(
            locator.get(ABSOLUTE_WIN32_PATH),
            Some("\\\\?\\UNC\\nas\\vms\\base.vhdx")
        );
        assert_eq!(
            locator.get(VOLUME_PATH),
            Some("\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\vms\\base.vhdx")
        );
        assert_eq!(locator.get(RELATIVE_PATH), Some(".\\base.vhdx"));

        // A VHD keeps the plain form in its absolute (W2ku) locator, and has no place for
        // a volume path.
        let child = dir.path().join("child.vhd");
        create(
            &child,
            &CreateOptions {
                parent_win_path: Some("d:/vms/base.vhd".into()),
                ..child_options(&base_vhd)
            },
        )
        .unwrap();
        assert!(
            open_read_only(&child)
                .parent_link()
                .unwrap()
                .paths
                .contains(&crate::layer::ParentPath::Absolute(
                    "d:\\vms\\base.vhd".into()
                ))
        );
        for (options, problem) in [
            (
                CreateOptions {
                    parent_volume_path: Some(
                        "\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\b.vhd".into(),
                    ),
                    ..child_options(&base_vhd)
                },
                "no volume path",
            ),
            (
                CreateOptions {
                    parent_win_path: Some("/srv/base.vhd".into()),
                    ..child_options(&base_vhd)
                },
                "parent Windows path '/srv/base.vhd'",
            ),
            (
                CreateOptions {
                    parent_win_path: Some("D:\\base.vhd".into()),
                    ..sized.clone()
                },
                "only for a differencing image",
            ),
        ] {
            let refused = dir.path().join("refused.vhd");
            let err = create(&refused, &options).unwrap_err();
            assert!(err.to_string().contains(problem), "{err}");
            assert!(!refused.exists());
        }
    }

    #[test]
    fn fixed_images_are_allocated_on_the_host_unless_sparse() {
        let dir = tempfile::tempdir().unwrap();
        for (name, sparse) in [
            ("fixed.vhd", false),
            ("fixed.vhdx", false),
            ("sparse.vhd", true),
            ("sparse.vhdx", true),
            ("dynamic.vhdx", false),
        ] {
            let path = dir.path().join(name);
            let report = create(
                &path,
                &CreateOptions {
                    size: Some(16 << 20),
                    block_size: name.ends_with(".vhdx").then_some(1 << 20),
                    image_type: (!name.starts_with("dynamic")).then_some(ImageType::Fixed),
                    sparse,
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(report.host, HostAllocation::of(&path).unwrap(), "{name}");
            let HostAllocation {
                file_length,
                allocated_bytes,
            } = report.host;
            assert_eq!(file_length, fs::metadata(&path).unwrap().len(), "{name}");
            if name.starts_with("fixed") {
                assert!(file_length > 16 << 20, "{name}: {file_length}");
                assert!(allocated_bytes >= file_length, "{name}: {report:?}");
            } else {
                assert!(allocated_bytes < 4 << 20, "{name}: {report:?}");
            }
            assert_eq!(report.disk_size, 16 << 20);
            assert_eq!(open_read_only(&path).size(), 16 << 20, "{name}");
        }
    }

    #[test]
    fn sizes_azure_refuses_are_warned_of_or_rounded_up() {
        let dir = tempfile::tempdir().unwrap();
        let odd = 5 * (1 << 20) + 512;
        let fixed = |format, azure| CreateOptions {
            format: Some(format),
            image_type: Some(ImageType::Fixed),
            size: Some(odd),
            azure,
            ..Default::default()
        };
        let report = create(&dir.path().join("a.vhd"), &fixed(Format::Vhd, false)).unwrap();
        assert_eq!(report.disk_size, odd);
        assert_eq!(report.warnings.len(), 1, "{report:?}");
        assert!(report.warnings[0].contains("whole number of MiB"));
        let report = create(&dir.path().join("b.vhd"), &fixed(Format::Vhd, true)).unwrap();
        assert_eq!(report.disk_size, 6 << 20);
        assert_eq!(open_read_only(&dir.path().join("b.vhd")).size(), 6 << 20);
        assert!(report.warnings.is_empty());
        // Azure takes only fixed VHDs, so only those are warned of.
        let report = create(&dir.path().join("c.vhdx"), &fixed(Format::Vhdx, false)).unwrap();
        assert!(report.warnings.is_empty());
        let dynamic = CreateOptions {
            image_type: None,
            ..fixed(Format::Vhd, false)
        };
        let report = create(&dir.path().join("d.vhd"), &dynamic).unwrap();
        assert!(report.warnings.is_empty());
        assert!(azure_size(u64::MAX).is_err());
    }

    #[test]
    fn a_parent_that_cannot_be_opened_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = create(
            &dir.path().join("child.vhdx"),
            &CreateOptions {
                parent: Some("/nonexistent/base.vhdx".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("base.vhdx: cannot open image"),
            "{err}"
        );
        assert!(!dir.path().join("child.vhdx").exists());
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("3m").unwrap(), 3 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        for bad in [
            "",
            "M",
            "1.5G",
            "12Q",
            "-1",
            "99999999999999999999",
            "20000000T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_format_follows_the_name_unless_told() {
        let dir = tempfile::tempdir().unwrap();
        let sized = |size| CreateOptions {
            size: Some(size),
            ..Default::default()
        };
        for (name, options, format) in [
            ("a.vhd", sized(1 << 20), Format::Vhd),
            ("b.VHDX", sized(1 << 20), Format::Vhdx),
            ("c.img", sized(1 << 20), Format::Vhdx),
            (
                "d.img",
                CreateOptions {
                    format: Some(Format::Vhd),
                    ..sized(1 << 20)
                },
                Format::Vhd,
            ),
        ] {
            let path = dir.path().join(name);
            create(&path, &options).unwrap();
            let file = File::open(&path).unwrap();
            assert_eq!(probe(&FileStorage::new(file)).unwrap(), format, "{name}");
        }
        let child = dir.path().join("child.vhdx");
        let err = create(
            &child,
            &CreateOptions {
                parent: Some(dir.path().join("a.vhd")),
                format: Some(Format::Vhdx),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("the parent is a vhd image"),
            "{err}"
        );
        let err = create(&child, &CreateOptions::default()).unwrap_err();
        assert!(err.to_string().contains("size is required"), "{err}");
        assert!(!child.exists());
    }
}

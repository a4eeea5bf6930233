//! Creating images of either format from one set of options, as `vdisk create` offers it:
//! the format follows the parent, else the option, else the file name; each format's
//! driver writes the image.

use crate::chain::parent_image;
use crate::disk::Format;
use crate::error::{Error, Result};
use crate::vhd::{VhdCreateOptions, VhdKind, create_vhd};
use crate::vhdx::create::{VhdxCreateOptions, VhdxKind, create_vhdx};
use std::path::{Path, PathBuf};

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
pub fn create(path: &Path, options: &CreateOptions) -> Result<()> {
    let invalid = |problem: String| Err(Error::invalid_input(problem));
    let parent = match &options.parent {
        Some(parent) => Some(parent_image(path, parent)?),
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
    let size = match (options.size, &options.parent) {
        (Some(size), _) => size,
        (None, Some(_)) => 0,
        (None, None) => return invalid("the disk size is required without a parent".to_string()),
    };
    let fixed = options.image_type == Some(ImageType::Fixed);
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
            create_vhd(path, &vhd)
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
            create_vhdx(path, &vhdx)
        }
        Format::Raw => invalid("raw images are made with truncate, not here".to_string()),
    }
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
    use crate::vhdx::parent_locator::{ABSOLUTE_WIN32_PATH, ParentLocator, RELATIVE_PATH};
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
        assert_eq!(locator.get(RELATIVE_PATH), Some(".\\base.vhdx"));
        let canonical = fs::canonicalize(&base).unwrap();
        assert_eq!(
            locator.get(ABSOLUTE_WIN32_PATH).unwrap(),
            format!(
                "\\\\?\\{}",
                canonical.display().to_string().replace('/', "\\")
            )
        );
        let (found, parent) = child_disk.parent().unwrap();
        assert_eq!(found, canonical);
        assert_eq!(parent.identity(), Some(*base_data_write_guid.as_bytes()));

        let smaller = dir.path().join("smaller.vhdx");
        let err = create_vhdx(&smaller, &VhdxCreateOptions::new(4 << 20, kind)).unwrap_err();
        assert!(err.to_string().contains("would cut off"), "{err}");
        assert!(!smaller.exists());
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

//! What `vdisk info` reports about an image and its chain of parents. The image is opened
//! read-only, so nothing is written (a dirty VHDX log is replayed in memory).

use crate::chain::{ImageContext, open_chain, open_layered};
use crate::disk::{OpenOptions, VirtualDisk};
use crate::error::Result;
use crate::layer::Layer;
use crate::storage::Storage;
use serde::Serialize;
use std::fmt;
use std::path::Path;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ImageInfo {
    pub path: String,
    pub format: String,
    /// `fixed`, `dynamic` or `differencing`.
    pub subtype: String,
    pub virtual_size: u64,
    /// Payload bytes per block; absent for fixed VHDs.
    pub block_size: Option<u64>,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// VHDX: the file identifier's creator; VHD: the Creator Application.
    pub creator: String,
    pub identifiers: Identifiers,
    /// VHDX only: `clean`, or `dirty` when the log had to be replayed (in memory).
    pub log: Option<String>,
    /// Blocks holding data in this file; absent for fixed VHDs.
    pub allocated_blocks: Option<u64>,
    pub total_blocks: Option<u64>,
    /// A differencing VHDX's parent locator entries, as stored.
    pub parent_locator: Option<Vec<LocatorEntry>>,
    /// The parents, nearest first.
    pub chain: Vec<ChainMember>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct Identifiers {
    /// VHD footer's Unique Id.
    pub unique_id: Option<String>,
    /// VHDX Virtual Disk ID.
    pub disk_id: Option<String>,
    pub data_write_guid: Option<String>,
    pub file_write_guid: Option<String>,
    pub log_guid: Option<String>,
    pub header_sequence_number: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LocatorEntry {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChainMember {
    /// Where the parent was found, symlinks resolved.
    pub path: String,
    pub format: String,
    pub virtual_size: u64,
    /// The identifier the child records for it (VHD Unique Id, VHDX DataWriteGuid).
    pub identity: Option<String>,
    /// Whether it carries the identifier its child recorded. Always true for a listed
    /// member: a parent that does not match stops the open with an error naming both.
    pub matched: bool,
}

fn guid(id: Uuid) -> String {
    id.hyphenated().to_string()
}

/// Describes the image at `path` (opened read-only whatever `options` say).
pub fn image_info(path: &Path, options: &OpenOptions) -> Result<ImageInfo> {
    describe(path, options).map_err(|e| e.with_file(path))
}

fn describe(path: &Path, options: &OpenOptions) -> Result<ImageInfo> {
    let options = OpenOptions {
        read_only: true,
        ..options.clone()
    };
    Ok(describe_layer(path, open_layered(path, &options)?.as_ref()))
}

/// Describes the image held by `storage`, known as `path`, opened read-only whatever
/// `options` say; `context` says where it sits for finding its parents.
pub fn describe_storage(
    path: &Path,
    storage: Box<dyn Storage>,
    options: &OpenOptions,
    context: &ImageContext,
) -> Result<ImageInfo> {
    let options = OpenOptions {
        read_only: true,
        ..options.clone()
    };
    let disk = open_chain(storage, &options, context)?;
    Ok(describe_layer(path, disk.as_ref()))
}

/// What `disk`'s own file and its chain hold.
fn describe_layer(path: &Path, disk: &dyn Layer) -> ImageInfo {
    let facts = disk.facts();
    let mut info = common(path, disk, facts.subtype);
    info.block_size = facts.block_size;
    info.creator = facts.creator;
    info.identifiers = Identifiers {
        disk_id: facts.disk_id.map(guid),
        data_write_guid: facts.data_write_guid.map(guid),
        file_write_guid: facts.file_write_guid.map(guid),
        log_guid: facts.log_guid.map(guid),
        header_sequence_number: facts.header_sequence_number,
        unique_id: facts.unique_id.map(guid),
    };
    info.log = facts
        .log_was_dirty
        .map(|dirty| if dirty { "dirty" } else { "clean" }.to_string());
    info.allocated_blocks = facts.allocated_blocks;
    info.total_blocks = facts.total_blocks;
    info.parent_locator = facts.parent_locator.map(|entries| {
        entries
            .into_iter()
            .map(|(key, value)| LocatorEntry { key, value })
            .collect()
    });
    info.chain = chain(disk);
    info
}

/// The facts every format has.
fn common(path: &Path, disk: &dyn VirtualDisk, subtype: &str) -> ImageInfo {
    ImageInfo {
        path: path.display().to_string(),
        format: disk.format().to_string(),
        subtype: subtype.to_string(),
        virtual_size: disk.size(),
        block_size: None,
        logical_sector_size: disk.logical_sector_size(),
        physical_sector_size: disk.physical_sector_size(),
        creator: String::new(),
        identifiers: Identifiers::default(),
        log: None,
        allocated_blocks: None,
        total_blocks: None,
        parent_locator: None,
        chain: Vec::new(),
    }
}

fn chain(disk: &dyn VirtualDisk) -> Vec<ChainMember> {
    let mut members = Vec::new();
    let mut child = disk;
    while let Some((path, parent)) = child.parent() {
        members.push(ChainMember {
            path: path.display().to_string(),
            format: parent.format().to_string(),
            virtual_size: parent.size(),
            identity: parent.identity().map(|id| guid(Uuid::from_bytes(id))),
            matched: true,
        });
        child = parent;
    }
    members
}

impl fmt::Display for ImageInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = |f: &mut fmt::Formatter<'_>, name: &str, value: &dyn fmt::Display| {
            writeln!(f, "{name:<22}{value}")
        };
        line(f, "image:", &self.path)?;
        line(
            f,
            "format:",
            &format_args!("{} ({})", self.format, self.subtype),
        )?;
        line(
            f,
            "virtual size:",
            &format_args!("{} bytes", self.virtual_size),
        )?;
        if let Some(block_size) = self.block_size {
            line(f, "block size:", &block_size)?;
        }
        line(
            f,
            "sector size:",
            &format_args!(
                "{} logical, {} physical",
                self.logical_sector_size, self.physical_sector_size
            ),
        )?;
        line(f, "creator:", &self.creator)?;
        let ids = &self.identifiers;
        for (name, value) in [
            ("unique id:", &ids.unique_id),
            ("disk id:", &ids.disk_id),
            ("data write guid:", &ids.data_write_guid),
            ("file write guid:", &ids.file_write_guid),
            ("log guid:", &ids.log_guid),
        ] {
            if let Some(value) = value {
                line(f, name, value)?;
            }
        }
        if let Some(log) = &self.log {
            line(f, "log:", log)?;
        }
        if let (Some(allocated), Some(total)) = (self.allocated_blocks, self.total_blocks) {
            line(
                f,
                "allocated blocks:",
                &format_args!("{allocated} of {total}"),
            )?;
        }
        for entry in self.parent_locator.iter().flatten() {
            line(
                f,
                "parent locator:",
                &format_args!("{} = {}", entry.key, entry.value),
            )?;
        }
        for (depth, member) in self.chain.iter().enumerate() {
            line(
                f,
                &format!("parent {}:", depth + 1),
                &format_args!(
                    "{} ({}, {} bytes, id {}, {})",
                    member.path,
                    member.format,
                    member.virtual_size,
                    member.identity.as_deref().unwrap_or("none"),
                    if member.matched {
                        "matches"
                    } else {
                        "does not match"
                    }
                ),
            )?;
        }
        Ok(())
    }
}

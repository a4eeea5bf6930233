//! `vdisk`'s command line: the subcommands and their arguments.

use crate::create::parse_size;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "vdisk",
    version = super::VERSION,
    about = "Create and inspect VHD and VHDX disk images"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create an image (never overwrites an existing file).
    Create {
        /// Image format; default: the parent's, else from IMAGE's extension, else vhdx.
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// Allocation type (default dynamic).
        #[arg(long = "type", value_enum)]
        image_type: Option<TypeArg>,
        /// Disk size in bytes, or with a binary suffix K, M, G, T (default with --parent:
        /// the parent's size).
        #[arg(long, value_parser = size_arg)]
        size: Option<u64>,
        /// Block size (default: VHD 2M, VHDX 32M).
        #[arg(long, value_parser = size_arg)]
        block_size: Option<u64>,
        /// Logical sector size of a VHDX: 512 (default) or 4096.
        #[arg(long = "logical-sector")]
        logical_sector: Option<u32>,
        /// Make a differencing child of this VHD or VHDX.
        #[arg(long)]
        parent: Option<PathBuf>,
        /// Where Windows will find the parent (D:\vms\base.vhdx or
        /// \\server\share\base.vhdx), recorded for Windows beside the relative path.
        #[arg(long, requires = "parent")]
        parent_win_path: Option<String>,
        /// The parent's volume GUID path on Windows (\\?\Volume{GUID}\vms\base.vhdx;
        /// VHDX only).
        #[arg(long, requires = "parent")]
        parent_volume_path: Option<String>,
        /// Leave a fixed image unallocated on the host (holes) instead of allocating it all.
        #[arg(long)]
        sparse: bool,
        /// Round the disk size up to a whole MiB, as Azure requires of fixed VHDs.
        #[arg(long)]
        azure: bool,
        /// Print a JSON summary instead of text.
        #[arg(long)]
        json: bool,
        image: PathBuf,
    },
    /// Describe an image and its chain of parents (read-only; never modifies the image).
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        image: PathBuf,
    },
    /// Rewrite a VHD or VHDX in place so no file space is left unused: blocks move down
    /// into holes and the file is cut after the last one. Safe to interrupt at any point;
    /// refuses an image in use.
    Compact {
        /// Also give back blocks whose data is all zeros (after `sdelete -z`, or a guest
        /// that wrote zeros instead of trimming).
        #[arg(long)]
        zero_blocks: bool,
        /// Compact even when differencing images beside it name it as their parent.
        #[arg(long)]
        force: bool,
        /// Print a JSON summary instead of text.
        #[arg(long)]
        json: bool,
        image: PathBuf,
    },
    /// Merge a differencing image into its parent (what Merge-VHD does), then remove it.
    /// Safe to interrupt at any point; refuses images in use.
    Commit {
        /// Keep the child, emptied: it reads the merged parent.
        #[arg(long)]
        keep_child: bool,
        /// Merge even when other differencing images beside the parent name it, or images
        /// beside the child name the child.
        #[arg(long)]
        force: bool,
        /// Print a JSON summary instead of text.
        #[arg(long)]
        json: bool,
        child: PathBuf,
    },
    /// Copy an image (with its parents, flattened) into a new image of any format,
    /// skipping what reads as zeros. Never replaces an existing file; the source is
    /// never changed (a dirty VHDX is read through its log).
    Convert {
        /// Output format; default: from DST's extension (.vhd, .vhdx, .img or .raw), else
        /// vhdx.
        #[arg(long, value_enum)]
        format: Option<ConvertFormatArg>,
        /// Allocation type of a VHD or VHDX output (default dynamic).
        #[arg(long = "type", value_enum)]
        image_type: Option<TypeArg>,
        /// Block size of a VHD or VHDX output (default: VHD 2M, VHDX 32M).
        #[arg(long, value_parser = size_arg)]
        block_size: Option<u64>,
        /// Round the disk size up to a whole MiB, as Azure requires of fixed VHDs.
        #[arg(long)]
        azure: bool,
        /// Leave a fixed output unallocated on the host where no data was written.
        #[arg(long, conflicts_with = "preallocate")]
        sparse: bool,
        /// Allocate the whole output file on the host, whatever its type.
        #[arg(long)]
        preallocate: bool,
        /// Print a JSON summary instead of text.
        #[arg(long)]
        json: bool,
        src: PathBuf,
        dst: PathBuf,
    },
    /// Change the disk's size in place: a larger disk reads zeros in its new range. Safe
    /// to interrupt at any point; refuses an image in use.
    Resize {
        /// Allow a smaller size, when the range cut off holds no data.
        #[arg(long)]
        shrink: bool,
        /// Cut off data past a smaller size, and resize a parent of differencing images
        /// beside it.
        #[arg(long)]
        force: bool,
        /// Print a JSON summary instead of text.
        #[arg(long)]
        json: bool,
        image: PathBuf,
        /// The new disk size in bytes, or with a binary suffix K, M, G, T.
        #[arg(value_parser = size_arg)]
        size: u64,
    },
    /// Check every structure of an image and the link to its parent; exit status 0
    /// clean, 2 corruption, 3 leaked space only, 1 could not check. Read-only unless
    /// --repair.
    Check {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Repair what can be without guessing user data; `--repair=all` also makes
        /// unreadable blocks read as zeros, listing what was given up.
        #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "safe")]
        repair: Option<RepairArg>,
        image: PathBuf,
    },
    /// List the virtual disk's extents: data (in which image of the chain, at which file
    /// offset) or zeros (read-only; never modifies the image).
    Map {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        image: PathBuf,
    },
    /// Write the man pages and shell completions of vdisk and vdisk-mount under DIR:
    /// DIR/man/man1, DIR/man/man8 and DIR/completions/{bash,zsh,fish}.
    Docs {
        /// Where to write them; created if missing.
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    Vhd,
    Vhdx,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ConvertFormatArg {
    Vhd,
    Vhdx,
    Raw,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RepairArg {
    Safe,
    All,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TypeArg {
    Dynamic,
    Fixed,
}

fn size_arg(text: &str) -> std::result::Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

//! `vdisk`: create VHD and VHDX images, describe, map and check them. A thin layer over
//! the library.

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use std::fmt::Display;
use std::io::IsTerminal;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use vdisk_mount::check::{CheckOptions, check};
use vdisk_mount::commit::{CommitOptions, commit};
use vdisk_mount::compact::{CompactOptions, Stage, compact, human};
use vdisk_mount::convert::{ConvertOptions, convert};
use vdisk_mount::create::{CreateOptions, ImageType, create, parse_size};
use vdisk_mount::finding::RepairLevel;
use vdisk_mount::info::image_info;
use vdisk_mount::map::image_map;
use vdisk_mount::resize::{ResizeOptions, resize};
use vdisk_mount::{Format, OpenOptions, Result};

#[derive(Parser, Debug)]
#[command(
    name = "vdisk",
    version,
    about = "Create and inspect VHD and VHDX disk images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
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
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    Vhd,
    Vhdx,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ConvertFormatArg {
    Vhd,
    Vhdx,
    Raw,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RepairArg {
    Safe,
    All,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TypeArg {
    Dynamic,
    Fixed,
}

fn size_arg(text: &str) -> std::result::Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

fn block_size_arg(bytes: u64) -> Result<u32> {
    u32::try_from(bytes)
        .map_err(|_| vdisk_mount::Error::invalid_input(format!("block size {bytes} is too large")))
}

impl TypeArg {
    fn image_type(self) -> ImageType {
        match self {
            TypeArg::Dynamic => ImageType::Dynamic,
            TypeArg::Fixed => ImageType::Fixed,
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Create {
            format,
            image_type,
            size,
            block_size,
            logical_sector,
            parent,
            parent_win_path,
            parent_volume_path,
            sparse,
            azure,
            json,
            image,
        } => {
            let block_size = block_size.map(block_size_arg).transpose()?;
            let options = CreateOptions {
                format: format.map(|f| match f {
                    FormatArg::Vhd => Format::Vhd,
                    FormatArg::Vhdx => Format::Vhdx,
                }),
                image_type: image_type.map(TypeArg::image_type),
                size,
                block_size,
                logical_sector_size: logical_sector,
                parent,
                sparse,
                azure,
                parent_win_path,
                parent_volume_path,
            };
            let report = create(&image, &options)?;
            warn(&report.image, &report.warnings);
            print(&report, json)
        }
        Command::Info { json, image } => print(&image_info(&image, &OpenOptions::default())?, json),
        Command::Convert {
            format,
            image_type,
            block_size,
            azure,
            sparse,
            preallocate,
            json,
            src,
            dst,
        } => {
            let options = ConvertOptions {
                format: format.map(|f| match f {
                    ConvertFormatArg::Vhd => Format::Vhd,
                    ConvertFormatArg::Vhdx => Format::Vhdx,
                    ConvertFormatArg::Raw => Format::Raw,
                }),
                image_type: image_type.map(TypeArg::image_type),
                block_size: block_size.map(block_size_arg).transpose()?,
                azure,
                sparse,
                preallocate,
            };
            let mut display = ProgressLine::new();
            let report = convert(&src, &dst, &options, &mut |p| {
                display.show(
                    "converting",
                    p.done,
                    p.total,
                    &format!("{}%", p.done * 100 / p.total.max(1)),
                )
            });
            display.finish();
            let report = report?;
            warn(&report.destination, &report.warnings);
            print(&report, json)
        }
        Command::Compact {
            zero_blocks,
            force,
            json,
            image,
        } => {
            let options = CompactOptions { zero_blocks, force };
            let mut display = ProgressLine::new();
            let report = compact(&image, &options, &mut |p| {
                let what = match p.stage {
                    Stage::FindingZeroBlocks => "looking for blocks of zeros",
                    Stage::Moving => "moving blocks",
                };
                display.show(
                    what,
                    p.done,
                    p.total,
                    &format!("{} moved", human(p.moved_bytes)),
                )
            });
            display.finish();
            print(&report?, json)
        }
        Command::Resize {
            shrink,
            force,
            json,
            image,
            size,
        } => print(
            &resize(&image, size, &ResizeOptions { shrink, force })?,
            json,
        ),
        Command::Commit {
            keep_child,
            force,
            json,
            child,
        } => {
            let options = CommitOptions { keep_child, force };
            let mut display = ProgressLine::new();
            let report = commit(&child, &options, &mut |p| {
                display.show(
                    "merging",
                    p.done,
                    p.total,
                    &format!("{}%", p.done * 100 / p.total.max(1)),
                )
            });
            display.finish();
            print(&report?, json)
        }
        Command::Map { json, image } => print(&image_map(&image, &OpenOptions::default())?, json),
        Command::Check { .. } => unreachable!("main runs vdisk check for its exit status"),
    }
}

/// `vdisk check`, whose exit status tells what it found, as `qemu-img check`'s does.
fn check_image(image: &std::path::Path, repair: Option<RepairArg>, json: bool) -> ExitCode {
    let options = CheckOptions {
        repair: repair.map(|level| match level {
            RepairArg::Safe => RepairLevel::Safe,
            RepairArg::All => RepairLevel::All,
        }),
    };
    match check(image, &options).and_then(|report| print(&report, json).map(|()| report)) {
        Ok(report) => ExitCode::from(report.status().exit_code()),
        Err(e) => fail(&e),
    }
}

/// A progress line on standard error, when it is a terminal, redrawn at most ten times a
/// second.
struct ProgressLine {
    shown: Option<Instant>,
    enabled: bool,
}

impl ProgressLine {
    fn new() -> ProgressLine {
        ProgressLine {
            shown: None,
            enabled: std::io::stderr().is_terminal(),
        }
    }

    fn show(&mut self, what: &str, done: u64, total: u64, detail: &str) {
        let due = self
            .shown
            .is_none_or(|at| at.elapsed() >= Duration::from_millis(100));
        if !self.enabled || !(due || done == total) {
            return;
        }
        eprint!("\r{what}: {done}/{total} ({detail})\x1b[K");
        self.shown = Some(Instant::now());
    }

    fn finish(&self) {
        if self.enabled && self.shown.is_some() {
            eprint!("\r\x1b[K");
        }
    }
}

/// Tells on standard error what other programs may refuse in the image just made.
fn warn(image: &str, warnings: &[String]) {
    for warning in warnings {
        eprintln!("vdisk: warning: {image}: {warning}");
    }
}

/// Prints a report as text, or as JSON for tools. A reader that stops early (`| head`)
/// is not an error.
fn print(report: &(impl Serialize + Display), json: bool) -> Result<()> {
    let text = if json {
        let mut text = serde_json::to_string_pretty(report)
            .map_err(|e| vdisk_mount::Error::invalid_input(e.to_string()))?;
        text.push('\n');
        text
    } else {
        report.to_string()
    };
    match std::io::stdout().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(vdisk_mount::Error::io("writing to standard output", e))
        }
        _ => Ok(()),
    }
}

fn fail(e: &vdisk_mount::Error) -> ExitCode {
    eprintln!("vdisk: {e}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match Cli::parse().command {
        Command::Check {
            json,
            repair,
            image,
        } => check_image(&image, repair, json),
        command => run(command).map_or_else(|e| fail(&e), |()| ExitCode::SUCCESS),
    }
}

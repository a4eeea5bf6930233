//! `vdisk`: create VHD and VHDX images, describe and map them. A thin layer over the
//! library.

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use std::fmt::Display;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use vdisk_mount::create::{CreateOptions, ImageType, create, parse_size};
use vdisk_mount::info::image_info;
use vdisk_mount::map::image_map;
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
        image: PathBuf,
    },
    /// Describe an image and its chain of parents (read-only; never modifies the image).
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
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
enum TypeArg {
    Dynamic,
    Fixed,
}

fn size_arg(text: &str) -> std::result::Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
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
            image,
        } => {
            let block_size = block_size
                .map(|b| {
                    u32::try_from(b).map_err(|_| {
                        vdisk_mount::Error::invalid_input(format!("block size {b} is too large"))
                    })
                })
                .transpose()?;
            let options = CreateOptions {
                format: format.map(|f| match f {
                    FormatArg::Vhd => Format::Vhd,
                    FormatArg::Vhdx => Format::Vhdx,
                }),
                image_type: image_type.map(|t| match t {
                    TypeArg::Dynamic => ImageType::Dynamic,
                    TypeArg::Fixed => ImageType::Fixed,
                }),
                size,
                block_size,
                logical_sector_size: logical_sector,
                parent,
            };
            create(&image, &options)
        }
        Command::Info { json, image } => print(&image_info(&image, &OpenOptions::default())?, json),
        Command::Map { json, image } => print(&image_map(&image, &OpenOptions::default())?, json),
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vdisk: {e}");
            ExitCode::FAILURE
        }
    }
}

//! `vdisk`: create VHD and VHDX images, describe, map and check them. A thin layer over
//! the library.

use clap::Parser;
use serde::Serialize;
use std::fmt::Display;
use std::io::IsTerminal;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use vdisk_mount::check::{CheckOptions, check};
use vdisk_mount::cli::vdisk::{Cli, Command, ConvertFormatArg, FormatArg, RepairArg, TypeArg};
use vdisk_mount::commit::{CommitOptions, commit};
use vdisk_mount::compact::{CompactOptions, Stage, compact, human};
use vdisk_mount::convert::{ConvertOptions, convert};
use vdisk_mount::create::{CreateOptions, ImageType, create};
use vdisk_mount::finding::RepairLevel;
use vdisk_mount::info::image_info;
use vdisk_mount::map::image_map;
use vdisk_mount::resize::{ResizeOptions, resize};
use vdisk_mount::{Format, OpenOptions, Result};

fn block_size_arg(bytes: u64) -> Result<u32> {
    u32::try_from(bytes)
        .map_err(|_| vdisk_mount::Error::invalid_input(format!("block size {bytes} is too large")))
}

fn to_image_type(arg: TypeArg) -> ImageType {
    match arg {
        TypeArg::Dynamic => ImageType::Dynamic,
        TypeArg::Fixed => ImageType::Fixed,
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
                image_type: image_type.map(to_image_type),
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
                image_type: image_type.map(to_image_type),
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
        Command::Docs { dir } => write_out(&vdisk_mount::cli::docs::generate(&dir)?.to_string()),
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

/// Prints a report as text, or as JSON for tools.
fn print(report: &(impl Serialize + Display), json: bool) -> Result<()> {
    let text = if json {
        let mut text = serde_json::to_string_pretty(report)
            .map_err(|e| vdisk_mount::Error::invalid_input(e.to_string()))?;
        text.push('\n');
        text
    } else {
        report.to_string()
    };
    write_out(&text)
}

/// A reader that stops early (`| head`) is not an error.
fn write_out(text: &str) -> Result<()> {
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

//! `vdisk-mount IMAGE MOUNTPOINT`: serves a VHD, VHDX or raw image as `MOUNTPOINT/disk.img`.
//!
//! Without `-f` the command returns only once the mount is live (exit 0) or has failed (one
//! line on stderr, non-zero exit, nothing left mounted); the daemon keeps serving in the
//! background until the mountpoint is unmounted, then closes the image cleanly and exits.
//! It follows the conventions of system services: mount(8) and fstab run it through
//! `mount.fuse3`, systemd learns readiness through `$NOTIFY_SOCKET`, and the image is
//! locked the way qemu locks images. Run as `mount.vdisk` (a link), it is the helper
//! mount(8) runs for `mount -t vdisk` and takes that helper's arguments.

mod daemon;
mod kernel_mount;
mod mountpoint;
mod notify;
mod options;
mod service;
mod syslog;
mod watch;

use clap::Parser;
use options::MountConfig;
use std::path::Path;
use std::process::ExitCode;
use vdisk_mount::cli::mount::{Cli, HelperRun, helper_args, is_helper};

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    let cli = match args.first() {
        Some(program) if is_helper(program) => match helper_args(args) {
            Ok(HelperRun::Mount(args)) => Cli::parse_from(args),
            Ok(HelperRun::Fake) => return ExitCode::SUCCESS,
            Err(message) => {
                report_failure(&message);
                return ExitCode::FAILURE;
            }
        },
        _ => Cli::parse_from(args),
    };
    let config = match MountConfig::parse(&cli.options) {
        Ok(config) => config,
        Err(message) => {
            report_failure(&message);
            return ExitCode::FAILURE;
        }
    };
    let foreground = cli.foreground || config.foreground;
    init_logging(config.log_level, foreground);
    if !foreground {
        return daemon::mount_in_background(&cli, &config);
    }
    match service::mount(&cli, &config) {
        Ok(mounted) => service::serve(mounted),
        Err(message) => {
            report_failure(&message);
            ExitCode::FAILURE
        }
    }
}

/// Errors only by default (fuser logs its own failures, which reach the user once, as
/// our one-line message); `RUST_LOG` or `-o log_level=` ask for more. In the foreground
/// the log goes to stderr (the journal, under systemd), in the background to the system
/// log; failures to mount reach the user either way, on stderr.
fn init_logging(level: Option<log::LevelFilter>, foreground: bool) {
    let mut builder = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("error,fuser=off"),
    );
    if !foreground && Path::new(syslog::SOCKET).exists() {
        builder
            .target(env_logger::Target::Pipe(Box::new(
                syslog::SyslogWriter::new(syslog::SOCKET),
            )))
            .format(syslog::format);
    }
    if let Some(level) = level {
        builder.filter_level(level);
        if level < log::LevelFilter::Debug {
            builder.filter_module("fuser", log::LevelFilter::Off);
        }
    }
    builder.init();
}

/// Prints a failure as the one line scripts and users expect, whatever it contains.
pub fn report_failure(message: &str) {
    eprintln!(
        "vdisk-mount: {}",
        message.trim_end().replace(['\n', '\r'], " ")
    );
}

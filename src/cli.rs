//! The command line: what it takes, and how a failure reaches the user.

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Mount a VHD or VHDX disk image as one flat raw file, MOUNTPOINT/disk.img",
    after_help = "Mount options (-o, comma-separated, repeatable; later ones win):\n  \
        ro | rw              read-only, or read-write (default)\n  \
        format=vhd|vhdx|raw  skip probing; raw serves any file byte for byte\n  \
        size_calc=auto|chs|current_size\n                       \
        which VHD footer field gives the disk size (default auto)\n  \
        parent=PATH          where a differencing image's parent is\n  \
        uid=N, gid=N         owner of the mounted file (default: the mounting user)\n  \
        umask=OCTAL          permission bits taken away (default 022: rw-r--r--)\n  \
        filename=NAME        name of the file in MOUNTPOINT (default disk.img)\n  \
        allow_other          let other users access the mount\n  \
        allow_root           let root access the mount\n  \
        nodev, nosuid, noexec\n  \
        threads=N            worker threads (default: number of CPUs, at most 16)\n  \
        debug, log_level=LEVEL\n                       \
        log more (off, error, warn, info, debug, trace)\n  \
        foreground           same as -f\n\n\
        The generic fstab options (defaults, nofail, noauto, _netdev, x-systemd.*, ...) are\n\
        accepted and ignored, so the command works as mount.fuse3 runs it from fstab.\n\n\
        Unmount with `umount MOUNTPOINT` or `fusermount3 -u MOUNTPOINT`; the daemon then\n\
        flushes and closes the image and exits. SIGTERM, SIGINT and SIGHUP do the same."
)]
pub struct Cli {
    /// Mount options, see below
    #[arg(short = 'o', value_name = "OPTION[,OPTION...]")]
    pub options: Vec<String>,
    /// Stay in the foreground and log to stderr
    #[arg(short, long)]
    pub foreground: bool,
    /// The disk image (VHD, VHDX, or any file with format=raw)
    pub image: PathBuf,
    /// An existing directory; disk.img appears inside it
    pub mountpoint: PathBuf,
}

/// Prints a failure as the one line scripts and users expect, whatever it contains.
pub fn report_failure(message: &str) {
    eprintln!(
        "vdisk-mount: {}",
        message.trim_end().replace(['\n', '\r'], " ")
    );
}

//! `vdisk-mount`'s command line: its arguments, the `-o` mount options it knows (one table,
//! which gives `--help`, the man page and the message for an unknown option), and the
//! arguments mount(8) passes when it runs the program as its helper `mount.vdisk`.

use clap::Parser;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "vdisk-mount",
    version = super::VERSION,
    about = "Mount a VHD or VHDX disk image as one flat raw file, MOUNTPOINT/disk.img",
    long_about = DESCRIPTION,
    override_usage = "vdisk-mount [-f] [-o OPTION[,OPTION...]]... IMAGE MOUNTPOINT\n       \
        mount.vdisk IMAGE MOUNTPOINT [-sfnv] [-o OPTION[,OPTION...]]",
    after_help = options_help()
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

const DESCRIPTION: &str = "Mount a VHD or VHDX disk image as one flat raw file, \
    MOUNTPOINT/disk.img: loop-mount it, partition it, fsck it or dd into it; every change \
    lands in the image, which stays a valid VHD or VHDX. Differencing images are served \
    with their chain of parents.\n\n\
    The command returns once the mount is live, or fails with one line naming the file and \
    the problem, leaving nothing mounted; a daemon keeps serving in the background. With -f \
    it stays in the foreground and logs to stderr (RUST_LOG=info for more than errors).";

/// One option `-o` takes.
pub struct MountOption {
    pub name: &'static str,
    /// What follows `name=`, for options that take a value: the choices (`vhd|vhdx|raw`)
    /// or a placeholder (`N`).
    pub value: Option<&'static str>,
    pub meaning: &'static str,
}

impl MountOption {
    /// As a user writes it: `ro`, `format=vhd|vhdx|raw`.
    pub fn form(&self) -> String {
        match self.value {
            Some(value) => format!("{}={value}", self.name),
            None => self.name.to_string(),
        }
    }
}

/// Every option `-o` knows besides the generic ones (src/options.rs parses them).
pub const MOUNT_OPTIONS: &[MountOption] = &[
    MountOption {
        name: "rw",
        value: None,
        meaning: "read-write (default)",
    },
    MountOption {
        name: "ro",
        value: None,
        meaning: "read-only: the image file is opened read-only and never modified",
    },
    MountOption {
        name: "format",
        value: Some("vhd|vhdx|raw"),
        meaning: "skip probing by signature; raw serves any file byte for byte",
    },
    MountOption {
        name: "size_calc",
        value: Some("auto|chs|current_size"),
        meaning: "which VHD footer field gives the disk size (default auto: as qemu decides \
                  by creator)",
    },
    MountOption {
        name: "threads",
        value: Some("N"),
        meaning: "worker threads taking requests from the kernel, 1 to 256 (default: number \
                  of CPUs, at most 16)",
    },
    MountOption {
        name: "io_uring",
        value: Some("auto|on|off"),
        meaning: "take requests through FUSE-over-io_uring queues, one per CPU, instead of \
                  /dev/fuse: auto (default) where the kernel offers it \
                  (/sys/module/fuse/parameters/enable_uring), on fails the mount if it does \
                  not, off never",
    },
    MountOption {
        name: "allow_other",
        value: None,
        meaning: "let other users open the mount (needs user_allow_other in /etc/fuse.conf \
                  for non-root)",
    },
    MountOption {
        name: "allow_root",
        value: None,
        meaning: "let root (besides the mounting user) open the mount",
    },
    MountOption {
        name: "uid",
        value: Some("N"),
        meaning: "owner of the mounted file and directory (default: the mounting user)",
    },
    MountOption {
        name: "gid",
        value: Some("N"),
        meaning: "group of the mounted file and directory (default: the mounting user's)",
    },
    MountOption {
        name: "umask",
        value: Some("OCTAL"),
        meaning: "permission bits taken away from the mounted file and directory (default \
                  022: rw-r--r--)",
    },
    MountOption {
        name: "filename",
        value: Some("NAME"),
        meaning: "the file's name in the mountpoint instead of disk.img",
    },
    MountOption {
        name: "parent",
        value: Some("PATH"),
        meaning: "where a differencing image's parent is, for images moved apart",
    },
    MountOption {
        name: "discard",
        value: Some("unmap|zero|ignore"),
        meaning: "what a discard (fstrim, blkdiscard, fallocate --punch-hole) does: unmap \
                  gives the space back to the host, zero writes zeros and keeps it, ignore \
                  refuses discards (default: unmap for dynamic and differencing images, zero \
                  for fixed and raw ones)",
    },
    MountOption {
        name: "partitions",
        value: Some("auto|off|only"),
        meaning: "one file per partition beside disk.img (part1.img, ...): auto (default), \
                  off, or only (the partition files without disk.img)",
    },
    MountOption {
        name: "nodev",
        value: None,
        meaning: "the usual mount restriction: device files on the mount do not work",
    },
    MountOption {
        name: "nosuid",
        value: None,
        meaning: "the usual mount restriction: set-user-ID and set-group-ID bits do not work",
    },
    MountOption {
        name: "noexec",
        value: None,
        meaning: "the usual mount restriction: nothing on the mount may be executed",
    },
    MountOption {
        name: "debug",
        value: None,
        meaning: "log at debug level",
    },
    MountOption {
        name: "log_level",
        value: Some("LEVEL"),
        meaning: "how much to log: off, error (default), warn, info, debug, trace",
    },
    MountOption {
        name: "foreground",
        value: None,
        meaning: "same as -f",
    },
];

/// Options that fstab lines carry for mount(8) and systemd, which say nothing to the
/// filesystem: accepted and ignored.
pub const GENERIC_FLAGS: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "nofail",
    "user",
    "nouser",
    "users",
    "_netdev",
    "dev",
    "suid",
    "exec",
    "default_permissions",
    // Access times: disk.img reports its modification time for all of them.
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nodiratime",
];

/// Generic too: any option starting with this, with a value or without (`x-systemd.*`,
/// `x-mount.*`).
pub const GENERIC_PREFIX: &str = "x-";

/// Generic too, with a value.
pub const GENERIC_KEYED: &str = "comment";

/// The generic options as the help lists them.
fn generic_list() -> String {
    let mut names: Vec<String> = GENERIC_FLAGS.iter().map(|f| f.to_string()).collect();
    names.push(format!("{GENERIC_PREFIX}*"));
    names.push(format!("{GENERIC_KEYED}="));
    names.join(", ")
}

/// The known options, for the message that refuses an unknown one.
pub fn known_options() -> String {
    let own: Vec<String> = MOUNT_OPTIONS
        .iter()
        .map(|o| match o.value {
            Some(_) => format!("{}=", o.name),
            None => o.name.to_string(),
        })
        .collect();
    format!("{}, and the generic {}", own.join(", "), generic_list())
}

/// What the generic options come to, a paragraph of the help and the man page.
pub fn generic_help() -> String {
    format!(
        "Generic options that fstab lines carry for mount(8) and systemd ({}) are accepted \
         and ignored, so the command works as mount(8) runs it from fstab; any other unknown \
         option is refused by name.",
        generic_list()
    )
}

/// How a mount ends, the last paragraph of the help.
pub const UNMOUNT_HELP: &str = "Unmount with umount MOUNTPOINT or fusermount3 -u \
    MOUNTPOINT; the daemon then flushes and closes the image and exits. SIGTERM, SIGINT \
    and SIGHUP do the same.";

/// The name mount(8) runs the program by for `mount -t vdisk` and fstab type `vdisk`
/// (it looks for `/sbin/mount.TYPE`).
pub const HELPER_NAME: &str = "mount.vdisk";

/// How the program serves as mount(8)'s helper, paragraphs of the man page.
pub const HELPER_HELP: &[&str] = &[
    "Installed as /sbin/mount.vdisk, a link to vdisk-mount, the program is the helper \
     mount(8) runs for the filesystem type vdisk: mount -t vdisk IMAGE DIR works, and so \
     do fstab lines of type vdisk, as well as lines of type fuse.vdisk-mount, which \
     mount.fuse3 turns into vdisk-mount IMAGE DIR -o OPTIONS.",
    "Run by that name it takes mount(8)'s helper arguments, mount.vdisk IMAGE DIR [-sfnv] \
     [-N NS] [-o OPTIONS]: -s (sloppy) and -n (no mtab) are accepted and change nothing, \
     -v logs at info level, -f (fake) does nothing and exits 0, and -N (mount in another \
     namespace) is refused. The options and everything else are taken as vdisk-mount takes \
     them, except that -f keeps mount(8)'s meaning: -o foreground stays in the foreground.",
];

/// The text after `--help`'s list of arguments: the mount options and how to unmount.
pub fn options_help() -> String {
    const COLUMN: usize = 26;
    const WIDTH: usize = 80;
    let mut text =
        String::from("Mount options (-o, comma-separated, repeatable; later ones win):\n");
    for option in MOUNT_OPTIONS {
        let form = option.form();
        let meaning = wrap(option.meaning, WIDTH - COLUMN);
        let mut lines = meaning.iter();
        if form.len() + 2 < COLUMN {
            let first = lines.next().map_or("", String::as_str);
            text.push_str(&format!("  {form:<width$}{first}\n", width = COLUMN - 2));
        } else {
            text.push_str(&format!("  {form}\n"));
        }
        for line in lines {
            text.push_str(&format!("{:COLUMN$}{line}\n", ""));
        }
    }
    for paragraph in [generic_help().as_str(), UNMOUNT_HELP] {
        text.push('\n');
        text.push_str(&wrap(paragraph, WIDTH).join("\n"));
        text.push('\n');
    }
    text.trim_end().to_string()
}

/// `text` in lines of at most `width` characters (longer words alone on a line).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// Whether the program was started by the helper's name, through its link.
pub fn is_helper(program: &OsStr) -> bool {
    Path::new(program).file_name() == Some(OsStr::new(HELPER_NAME))
}

/// What a run as mount(8)'s helper comes to.
#[derive(Debug, PartialEq, Eq)]
pub enum HelperRun {
    /// Mount: the arguments as vdisk-mount takes them, the program's name first.
    Mount(Vec<OsString>),
    /// `-f`, mount(8)'s fake run: everything but the mount call, which for a helper is
    /// everything.
    Fake,
}

/// Turns the arguments mount(8) gives its helper (`mount.vdisk SOURCE DIR [-sfnv] [-N NS]
/// [-o OPTIONS]`, the program's name first) into vdisk-mount's. Short flags may come
/// bundled (`-sv`), `-o` with its value attached or apart; long options, the positionals
/// and everything after `--` pass through unchanged.
pub fn helper_args(args: impl IntoIterator<Item = OsString>) -> Result<HelperRun, String> {
    let mut args = args.into_iter();
    let program = args.next().unwrap_or_else(|| HELPER_NAME.into());
    let mut passed = Vec::new();
    let mut verbose = false;
    let mut fake = false;
    while let Some(arg) = args.next() {
        let flags = match arg.to_str() {
            Some("--") => {
                passed.push(arg);
                passed.extend(args.by_ref());
                break;
            }
            Some(text) if text.len() > 1 && text.starts_with('-') && !text.starts_with("--") => {
                &text[1..]
            }
            _ => {
                passed.push(arg);
                continue;
            }
        };
        for (at, flag) in flags.char_indices() {
            match flag {
                's' | 'n' => {}
                'v' => verbose = true,
                'f' => fake = true,
                'N' => {
                    return Err("-N: mounting in another namespace is not supported".to_string());
                }
                'o' => {
                    passed.push("-o".into());
                    let attached = &flags[at + 1..];
                    if !attached.is_empty() {
                        passed.push(attached.into());
                    } else if let Some(value) = args.next() {
                        passed.push(value);
                    }
                    break;
                }
                other => passed.push(format!("-{other}").into()),
            }
        }
    }
    if fake {
        return Ok(HelperRun::Fake);
    }
    let mut translated = vec![program];
    // First, so a log level among the options still has the last word.
    if verbose {
        translated.extend(["-o".into(), "log_level=info".into()]);
    }
    translated.extend(passed);
    Ok(HelperRun::Mount(translated))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn helper(args: &[&str]) -> Result<HelperRun, String> {
        helper_args(args.iter().map(OsString::from))
    }

    fn mount(args: &[&str]) -> HelperRun {
        HelperRun::Mount(args.iter().map(OsString::from).collect())
    }

    #[test]
    fn the_helper_name_is_told_by_the_link_name() {
        assert!(is_helper(OsStr::new("/sbin/mount.vdisk")));
        assert!(is_helper(OsStr::new("mount.vdisk")));
        assert!(!is_helper(OsStr::new("/usr/bin/vdisk-mount")));
        assert!(!is_helper(OsStr::new("/sbin/mount.vdisk.old")));
    }

    #[test]
    fn mount_passes_source_dir_and_options_through() {
        let p = "/sbin/mount.vdisk";
        assert_eq!(
            helper(&[p, "/i/a.vhdx", "/mnt/a", "-o", "rw,allow_other"]),
            Ok(mount(&[p, "/i/a.vhdx", "/mnt/a", "-o", "rw,allow_other"]))
        );
        assert_eq!(
            helper(&[p, "/i/a.vhdx", "/mnt/a", "-oro"]),
            Ok(mount(&[p, "/i/a.vhdx", "/mnt/a", "-o", "ro"]))
        );
        assert_eq!(
            helper(&[p, "/i/a.vhdx", "/mnt/a"]),
            Ok(mount(&[p, "/i/a.vhdx", "/mnt/a"]))
        );
        // What vdisk-mount answers on its own.
        assert_eq!(helper(&[p, "--version"]), Ok(mount(&[p, "--version"])));
        assert_eq!(helper(&[p, "-h"]), Ok(mount(&[p, "-h"])));
    }

    #[test]
    fn sloppy_and_no_mtab_change_nothing_and_verbose_logs_at_info() {
        let p = "mount.vdisk";
        assert_eq!(
            helper(&[p, "a.vhd", "/mnt", "-s", "-n", "-o", "ro"]),
            Ok(mount(&[p, "a.vhd", "/mnt", "-o", "ro"]))
        );
        // The user's own log level comes later, so it wins.
        assert_eq!(
            helper(&[p, "a.vhd", "/mnt", "-snv", "-o", "log_level=debug"]),
            Ok(mount(&[
                p,
                "-o",
                "log_level=info",
                "a.vhd",
                "/mnt",
                "-o",
                "log_level=debug"
            ]))
        );
        assert_eq!(
            helper(&[p, "a.vhd", "/mnt", "-vo", "ro"]),
            Ok(mount(&[
                p,
                "-o",
                "log_level=info",
                "a.vhd",
                "/mnt",
                "-o",
                "ro"
            ]))
        );
    }

    #[test]
    fn fake_does_nothing_and_namespaces_are_refused() {
        let p = "mount.vdisk";
        assert_eq!(helper(&[p, "a.vhd", "/mnt", "-f"]), Ok(HelperRun::Fake));
        assert_eq!(
            helper(&[p, "a.vhd", "/mnt", "-nfv", "-o", "ro"]),
            Ok(HelperRun::Fake)
        );
        let err = helper(&[p, "a.vhd", "/mnt", "-N", "/proc/1/ns/mnt"]).unwrap_err();
        assert!(err.contains("-N") && !err.contains('\n'), "{err}");
    }

    #[test]
    fn the_rest_is_left_to_vdisk_mount() {
        let p = "mount.vdisk";
        // Unknown flags reach the parser, which refuses them by name.
        assert_eq!(
            helper(&[p, "a.vhd", "/mnt", "-x"]),
            Ok(mount(&[p, "a.vhd", "/mnt", "-x"]))
        );
        // After `--` even what looks like a flag is an argument.
        assert_eq!(
            helper(&[p, "--", "-f.vhd", "/mnt"]),
            Ok(mount(&[p, "--", "-f.vhd", "/mnt"]))
        );
        // A lone `-o` is the parser's to report.
        assert_eq!(
            helper(&[p, "a.vhd", "/mnt", "-o"]),
            Ok(mount(&[p, "a.vhd", "/mnt", "-o"]))
        );
        let cli = Cli::try_parse_from(match helper(&[p, "a.vhd", "/mnt", "-v"]).unwrap() {
            HelperRun::Mount(args) => args,
            HelperRun::Fake => unreachable!(),
        })
        .unwrap();
        assert_eq!(cli.options, ["log_level=info"]);
        assert!(!cli.foreground);
    }

    #[test]
    fn help_lists_every_option_and_the_generic_ones() {
        let help = options_help();
        for option in MOUNT_OPTIONS {
            assert!(help.contains(&option.form()), "{}", option.form());
        }
        for flag in GENERIC_FLAGS {
            assert!(help.contains(flag), "{flag}");
        }
        assert!(help.lines().all(|l| l.len() <= 80), "{help}");
        let known = known_options();
        assert!(known.contains("discard=") && known.contains("x-*") && !known.contains('\n'));
    }
}

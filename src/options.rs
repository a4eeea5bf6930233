//! Mount options, as `-o` takes them on the command line and as mount(8) and fstab pass
//! them through `mount.fuse3`.
//!
//! The generic options every fstab line may carry (`defaults`, `nofail`, `x-systemd.*`,
//! ...) are for mount(8) and systemd, not for the filesystem, so they are accepted and
//! ignored; the restricting `nodev`, `nosuid` and `noexec` are applied. Anything else
//! unknown is refused by name, so a typo never goes unnoticed.

use std::path::PathBuf;
use vdisk_mount::cli::mount::{GENERIC_FLAGS, GENERIC_KEYED, GENERIC_PREFIX, known_options};
use vdisk_mount::disk::DiscardMode;
use vdisk_mount::fuse::{DISK_FILE_NAME, PartitionFiles};
use vdisk_mount::{Format, OpenOptions, VhdSizeRule};

/// Who besides the mounting user may use the mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Owner,
    /// `allow_root`: the owner and root.
    OwnerAndRoot,
    /// `allow_other`: everyone (as the file's owner, group and mode permit).
    Everyone,
}

/// How requests reach the daemon: FUSE over io_uring, or `/dev/fuse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoUring {
    /// Where the kernel offers it.
    Auto,
    /// The mount fails where the kernel does not offer it.
    On,
    Off,
}

#[derive(Debug)]
pub struct MountConfig {
    pub open: OpenOptions,
    pub threads: usize,
    pub io_uring: IoUring,
    pub access: Access,
    /// Owner of the mounted file and directory; `None`: the mounting user's.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Permission bits taken away from 0666 (the file) and 0777 (the directory).
    pub umask: u32,
    pub file_name: String,
    pub partitions: PartitionFiles,
    pub log_level: Option<log::LevelFilter>,
    pub foreground: bool,
    pub no_dev: bool,
    pub no_suid: bool,
    pub no_exec: bool,
}

/// More workers than this rarely help one image on one file, whatever the CPU count.
const DEFAULT_MAX_THREADS: usize = 16;

/// What a file created by a typical user gets: rw-r--r--.
const DEFAULT_UMASK: u32 = 0o022;

/// Options for mount(8), fstab and systemd that say nothing to the filesystem.
fn is_generic(key: &str, value: Option<&str>) -> bool {
    match value {
        None => GENERIC_FLAGS.contains(&key) || key.starts_with(GENERIC_PREFIX),
        Some(_) => key == GENERIC_KEYED || key.starts_with(GENERIC_PREFIX),
    }
}

impl MountConfig {
    /// Parses `-o` lists in order; a later option overrides an earlier one.
    pub fn parse(lists: &[String]) -> Result<MountConfig, String> {
        let mut config = MountConfig {
            open: OpenOptions::default(),
            threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get().min(DEFAULT_MAX_THREADS)),
            io_uring: IoUring::Auto,
            access: Access::Owner,
            uid: None,
            gid: None,
            umask: DEFAULT_UMASK,
            file_name: DISK_FILE_NAME.to_string(),
            partitions: PartitionFiles::Auto,
            log_level: None,
            foreground: false,
            no_dev: false,
            no_suid: false,
            no_exec: false,
        };
        for option in lists.iter().flat_map(|list| list.split(',')) {
            config.apply(option)?;
        }
        if config.partitions != PartitionFiles::Off && is_partition_file_name(&config.file_name) {
            return Err(format!(
                "-o filename={}: partition files have names of that form; \
                 choose another name or add partitions=off",
                config.file_name
            ));
        }
        Ok(config)
    }

    fn apply(&mut self, option: &str) -> Result<(), String> {
        let (key, value) = match option.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (option, None),
        };
        let bad = |what: &str| format!("-o {option}: {what}");
        match (key, value) {
            ("", None) => {}
            ("ro", None) => self.open.read_only = true,
            ("rw", None) => self.open.read_only = false,
            ("allow_other", None) => self.access = Access::Everyone,
            ("allow_root", None) => self.access = Access::OwnerAndRoot,
            ("nodev", None) => self.no_dev = true,
            ("nosuid", None) => self.no_suid = true,
            ("noexec", None) => self.no_exec = true,
            ("foreground", None) => self.foreground = true,
            ("debug", None) => self.log_level = Some(log::LevelFilter::Debug),
            ("log_level", Some(v)) => {
                self.log_level = Some(
                    v.parse()
                        .map_err(|_| bad("expected off, error, warn, info, debug or trace"))?,
                )
            }
            ("uid", Some(v)) => {
                self.uid = Some(parse_id(v).ok_or_else(|| bad("expected a numeric user id"))?)
            }
            ("gid", Some(v)) => {
                self.gid = Some(parse_id(v).ok_or_else(|| bad("expected a numeric group id"))?)
            }
            ("umask", Some(v)) => {
                self.umask = u32::from_str_radix(v, 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| bad("expected an octal mask from 0 to 777"))?
            }
            ("filename", Some(v)) => self.file_name = check_file_name(v).map_err(&bad)?.to_string(),
            ("partitions", Some(v)) => {
                self.partitions = match v {
                    "auto" => PartitionFiles::Auto,
                    "off" => PartitionFiles::Off,
                    "only" => PartitionFiles::Only,
                    _ => return Err(bad("expected auto, off or only")),
                }
            }
            ("format", Some(v)) => {
                self.open.format = Some(v.parse::<Format>().map_err(|e| bad(&e.to_string()))?)
            }
            ("size_calc", Some(v)) => {
                self.open.vhd_size_rule =
                    v.parse::<VhdSizeRule>().map_err(|e| bad(&e.to_string()))?
            }
            ("parent", Some(v)) if !v.is_empty() => self.open.parent = Some(PathBuf::from(v)),
            ("discard", Some(v)) => {
                self.open.discard = Some(v.parse::<DiscardMode>().map_err(|e| bad(&e.to_string()))?)
            }
            ("threads", Some(v)) => {
                self.threads = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=256).contains(n))
                    .ok_or_else(|| bad("expected a thread count from 1 to 256"))?
            }
            ("io_uring", Some(v)) => {
                self.io_uring = match v {
                    "auto" => IoUring::Auto,
                    "on" => IoUring::On,
                    "off" => IoUring::Off,
                    _ => return Err(bad("expected auto, on or off")),
                }
            }
            _ if is_generic(key, value) => {}
            _ => {
                return Err(format!(
                    "unknown mount option '{option}' (known: {})",
                    known_options()
                ));
            }
        }
        Ok(())
    }

    /// Mode bits of the mounted file (the mount drops the write bits when read-only).
    pub fn file_mode(&self) -> u16 {
        (0o666 & !self.umask) as u16
    }

    pub fn dir_mode(&self) -> u16 {
        (0o777 & !self.umask) as u16
    }
}

fn parse_id(v: &str) -> Option<u32> {
    // (uid_t)-1 means "unchanged" to chown and cannot own anything.
    v.parse::<u32>().ok().filter(|&id| id != u32::MAX)
}

/// `partN.img`, as the mount names partition files.
fn is_partition_file_name(name: &str) -> bool {
    name.strip_prefix("part")
        .and_then(|rest| rest.strip_suffix(".img"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// One path component the kernel accepts as a directory entry.
fn check_file_name(name: &str) -> Result<&str, &'static str> {
    if name.is_empty() || name == "." || name == ".." {
        Err("expected a file name")
    } else if name.contains('/') || name.contains('\0') {
        Err("a file name cannot contain '/'")
    } else if name.len() > 255 {
        Err("a file name has at most 255 bytes")
    } else {
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(lists: &[&str]) -> Result<MountConfig, String> {
        MountConfig::parse(&lists.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_combine_across_lists_and_later_ones_win() {
        let c = parse(&["ro,format=vhd", "size_calc=chs,threads=3", "allow_other"]).unwrap();
        assert!(c.open.read_only);
        assert_eq!(c.open.format, Some(Format::Vhd));
        assert_eq!(c.open.vhd_size_rule, VhdSizeRule::Chs);
        assert_eq!((c.threads, c.access), (3, Access::Everyone));
        let c = parse(&["ro", "rw,format=raw,size_calc=current_size,allow_root"]).unwrap();
        assert!(!c.open.read_only);
        assert_eq!(c.open.format, Some(Format::Raw));
        assert_eq!(c.open.vhd_size_rule, VhdSizeRule::CurrentSize);
        assert_eq!(c.access, Access::OwnerAndRoot);
        let c = parse(&[]).unwrap();
        assert!(!c.open.read_only && c.open.format.is_none() && c.threads >= 1);
        assert_eq!((c.access, c.uid, c.gid), (Access::Owner, None, None));
        assert_eq!((c.file_mode(), c.dir_mode()), (0o644, 0o755));
        assert_eq!(c.file_name, "disk.img");
        assert!(!c.foreground && c.log_level.is_none() && c.open.parent.is_none());
        assert_eq!(c.io_uring, IoUring::Auto);
        for (value, want) in [("on", IoUring::On), ("off", IoUring::Off)] {
            let c = parse(&[&format!("io_uring={value}")]).unwrap();
            assert_eq!(c.io_uring, want);
        }
    }

    #[test]
    fn discard_modes() {
        assert_eq!(
            parse(&["discard=zero"]).unwrap().open.discard,
            Some(DiscardMode::Zero)
        );
        assert_eq!(
            parse(&["discard=unmap"]).unwrap().open.discard,
            Some(DiscardMode::Unmap)
        );
        assert_eq!(
            parse(&["discard=ignore"]).unwrap().open.discard,
            Some(DiscardMode::Ignore)
        );
        assert_eq!(parse(&[]).unwrap().open.discard, None);
        let err = parse(&["discard=trim"]).unwrap_err();
        assert!(err.contains("expected ignore, zero or unmap"), "{err}");
    }

    #[test]
    fn ownership_mode_name_and_parent() {
        let c = parse(&["uid=1000,gid=100,umask=007,filename=sda.raw,parent=/i/base.vhd"]).unwrap();
        assert_eq!((c.uid, c.gid), (Some(1000), Some(100)));
        assert_eq!((c.file_mode(), c.dir_mode()), (0o660, 0o770));
        assert_eq!(c.file_name, "sda.raw");
        assert_eq!(
            c.open.parent.as_deref(),
            Some(std::path::Path::new("/i/base.vhd"))
        );
        let c = parse(&["umask=0"]).unwrap();
        assert_eq!((c.file_mode(), c.dir_mode()), (0o666, 0o777));
    }

    #[test]
    fn logging_and_foreground() {
        let c = parse(&["debug,foreground"]).unwrap();
        assert_eq!(c.log_level, Some(log::LevelFilter::Debug));
        assert!(c.foreground);
        let c = parse(&["debug,log_level=warn"]).unwrap();
        assert_eq!(c.log_level, Some(log::LevelFilter::Warn));
    }

    #[test]
    fn generic_options_are_accepted_and_only_restrictions_applied() {
        let generic = "defaults,auto,noauto,nofail,user,nouser,users,_netdev,dev,suid,exec,\
                       x-systemd.automount,x-systemd.device-timeout=10s,x-mount.mkdir,\
                       comment=systemd.automount,default_permissions,noatime,relatime";
        let c = parse(&[generic]).unwrap();
        assert!(!c.no_dev && !c.no_suid && !c.no_exec && !c.open.read_only);
        let c = parse(&["nodev,nosuid,noexec"]).unwrap();
        assert!(c.no_dev && c.no_suid && c.no_exec);
    }

    #[test]
    fn unknown_or_malformed_options_are_rejected_by_name() {
        for (lists, needle) in [
            (&["ro,bogus"][..], "'bogus'"),
            (&["ro=1"], "'ro=1'"),
            (&["format"], "'format'"),
            (&["defaults=1"], "'defaults=1'"),
            (&["format=qcow2"], "qcow2"),
            (&["size_calc=lba"], "lba"),
            (&["threads=0"], "threads=0"),
            (&["threads=x"], "threads=x"),
            (&["uid=root"], "uid=root"),
            (&["gid=-1"], "gid=-1"),
            (&["uid=4294967295"], "uid=4294967295"),
            (&["umask=999"], "umask=999"),
            (&["umask=1777"], "umask=1777"),
            (&["filename=a/b"], "filename=a/b"),
            (&["filename=.."], "filename=.."),
            (&["filename="], "filename="),
            (&["parent="], "'parent='"),
            (&["log_level=loud"], "log_level=loud"),
            (&["io_uring=yes"], "io_uring=yes"),
            (&["sync"], "'sync'"),
        ] {
            let err = parse(lists).unwrap_err();
            assert!(err.contains(needle), "{lists:?}: {err}");
            assert!(!err.contains('\n'));
        }
        let long = format!("filename={}", "x".repeat(256));
        assert!(parse(&[&long]).unwrap_err().contains("255"));
    }

    #[test]
    fn partition_files_are_chosen_and_keep_their_names_to_themselves() {
        assert_eq!(parse(&[]).unwrap().partitions, PartitionFiles::Auto);
        for (value, want) in [
            ("auto", PartitionFiles::Auto),
            ("off", PartitionFiles::Off),
            ("only", PartitionFiles::Only),
        ] {
            let c = parse(&[&format!("partitions={value}")]).unwrap();
            assert_eq!(c.partitions, want);
        }
        let err = parse(&["partitions=some"]).unwrap_err();
        assert!(
            err.contains("partitions=some") && err.contains("auto, off or only"),
            "{err}"
        );
        let err = parse(&["filename=part2.img"]).unwrap_err();
        assert!(err.contains("partitions=off"), "{err}");
        let c = parse(&["filename=part2.img,partitions=off"]).unwrap();
        assert_eq!(c.file_name, "part2.img");
        for name in ["part.img", "parts.img", "part2.raw", "part2a.img"] {
            assert_eq!(
                parse(&[&format!("filename={name}")]).unwrap().file_name,
                name
            );
        }
    }

    #[test]
    fn every_option_the_help_lists_parses() {
        for option in vdisk_mount::cli::mount::MOUNT_OPTIONS {
            let values: Vec<&str> = match option.value {
                None => vec![],
                Some("N") => vec!["7"],
                Some("OCTAL") => vec!["027"],
                Some("NAME") => vec!["sda.raw"],
                Some("PATH") => vec!["/images/base.vhdx"],
                Some("LEVEL") => vec!["info"],
                Some(choices) => choices.split('|').collect(),
            };
            let forms: Vec<String> = if values.is_empty() {
                vec![option.name.to_string()]
            } else {
                values
                    .iter()
                    .map(|v| format!("{}={v}", option.name))
                    .collect()
            };
            for form in forms {
                assert!(
                    parse(&[&form]).is_ok(),
                    "{form}: {:?}",
                    parse(&[&form]).err()
                );
            }
        }
    }
}

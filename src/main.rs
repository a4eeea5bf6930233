//! `vdisk-mount IMAGE MOUNTPOINT`: serves a VHD, VHDX or raw image as `MOUNTPOINT/disk.img`.
//!
//! Without `-f` the command returns only once the mount is live (exit 0) or has failed (one
//! line on stderr, non-zero exit, nothing left mounted); the daemon keeps serving in the
//! background until the mountpoint is unmounted, then closes the image cleanly and exits.

use clap::Parser;
use fuser::{Config, MountOption, Session, SessionACL};
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::SystemTime;
use vdisk_mount::fuse::{DiskFs, Owner};
use vdisk_mount::{Format, OpenOptions, VhdSizeRule, VirtualDisk};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Mount a VHD or VHDX disk image as one flat raw file, MOUNTPOINT/disk.img",
    after_help = "Mount options (-o, comma-separated, repeatable; later ones win):\n  \
        ro | rw              read-only, or read-write (default)\n  \
        format=vhd|vhdx|raw  skip probing; raw serves any file byte for byte\n  \
        size_calc=auto|chs|current_size\n                       \
        which VHD footer field gives the disk size (default auto)\n  \
        threads=N            worker threads (default: number of CPUs, at most 16)\n  \
        allow_other          let other users access the mount\n\n\
        Unmount with `umount MOUNTPOINT` or `fusermount3 -u MOUNTPOINT`; the daemon then\n\
        flushes and closes the image and exits."
)]
struct Cli {
    /// Mount options, see below
    #[arg(short = 'o', value_name = "OPTION[,OPTION...]")]
    options: Vec<String>,
    /// Stay in the foreground and log to stderr (RUST_LOG=info for more)
    #[arg(short, long)]
    foreground: bool,
    /// The disk image (VHD, VHDX, or any file with format=raw)
    image: PathBuf,
    /// An existing directory; disk.img appears inside it
    mountpoint: PathBuf,
}

#[derive(Debug)]
struct Settings {
    open: OpenOptions,
    threads: usize,
    allow_other: bool,
}

/// More workers than this rarely help one image on one file, whatever the CPU count.
const DEFAULT_MAX_THREADS: usize = 16;

fn parse_options(lists: &[String]) -> Result<Settings, String> {
    let mut settings = Settings {
        open: OpenOptions::default(),
        threads: std::thread::available_parallelism()
            .map_or(1, |n| n.get().min(DEFAULT_MAX_THREADS)),
        allow_other: false,
    };
    for option in lists.iter().flat_map(|list| list.split(',')) {
        let (key, value) = match option.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (option, None),
        };
        let bad = |e: vdisk_mount::Error| format!("-o {option}: {e}");
        match (key, value) {
            ("", None) => {}
            ("ro", None) => settings.open.read_only = true,
            ("rw", None) => settings.open.read_only = false,
            ("allow_other", None) => settings.allow_other = true,
            ("format", Some(v)) => settings.open.format = Some(v.parse::<Format>().map_err(bad)?),
            ("size_calc", Some(v)) => {
                settings.open.vhd_size_rule = v.parse::<VhdSizeRule>().map_err(bad)?
            }
            ("threads", Some(v)) => {
                settings.threads = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=256).contains(n))
                    .ok_or_else(|| format!("-o {option}: expected a thread count from 1 to 256"))?
            }
            _ => {
                return Err(format!(
                    "unknown mount option '{option}' (known: ro, rw, format=, size_calc=, \
                     threads=, allow_other)"
                ));
            }
        }
    }
    Ok(settings)
}

/// The mountpoint as an absolute path (the daemon leaves its working directory), after
/// checking that it is a directory nothing is mounted on.
fn check_mountpoint(path: &Path) -> Result<PathBuf, String> {
    let name = path.display();
    let meta = fs::metadata(path).map_err(|e| format!("{name}: cannot use as mountpoint: {e}"))?;
    if !meta.is_dir() {
        return Err(format!("{name}: mountpoint is not a directory"));
    }
    let absolute = path
        .canonicalize()
        .map_err(|e| format!("{name}: cannot use as mountpoint: {e}"))?;
    if is_mount_point(&absolute) {
        return Err(format!(
            "{name}: mountpoint is busy: something is already mounted there"
        ));
    }
    Ok(absolute)
}

fn is_mount_point(path: &Path) -> bool {
    // Paths in the table need not be UTF-8, so it is searched as bytes.
    let Ok(table) = fs::read("/proc/self/mountinfo") else {
        return false;
    };
    table
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .any(|field| unescape_mountinfo(field) == path.as_os_str().as_bytes())
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let escape = field.get(i + 1..i + 4).filter(|_| field[i] == b'\\');
        match escape.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok()) {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// A live mount and the disk behind it.
struct Mounted {
    session: Session<DiskFs>,
    disk: Arc<dyn VirtualDisk>,
    mountpoint: PathBuf,
    /// Holds the image's lock for as long as the daemon serves it.
    _lock: File,
}

/// Two daemons writing one image would corrupt it, so a read-write mount takes an
/// exclusive lock on the image file and a read-only one a shared lock.
fn lock_image(image: &Path, read_only: bool) -> Result<File, String> {
    let name = image.display();
    let file = File::open(image).map_err(|e| format!("{name}: cannot open image: {e}"))?;
    let mode = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            format!("{name}: image is in use by another vdisk-mount")
        } else {
            format!("{name}: cannot lock image: {err}")
        });
    }
    Ok(file)
}

fn mount(cli: &Cli, settings: &Settings) -> Result<Mounted, String> {
    // Checked before the image is opened: opening read-write may already touch the image.
    let mountpoint = check_mountpoint(&cli.mountpoint)?;
    let lock = lock_image(&cli.image, settings.open.read_only)?;
    let disk: Arc<dyn VirtualDisk> = vdisk_mount::open(&cli.image, &settings.open)
        .map_err(|e| e.to_string())?
        .into();
    let mtime = fs::metadata(&cli.image)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| SystemTime::now());
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let fs = DiskFs::new(disk.clone(), Owner { uid, gid }, mtime);

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(fs_name(&cli.image)),
        MountOption::Subtype("vdisk-mount".to_string()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        if settings.open.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    if settings.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(settings.threads);
    config.clone_fd = true;
    match Session::new(fs, &mountpoint, &config) {
        Ok(session) => Ok(Mounted {
            session,
            disk,
            mountpoint,
            _lock: lock,
        }),
        Err(e) => {
            if let Err(close_error) = disk.close() {
                log::error!("closing the image after a failed mount: {close_error}");
            }
            Err(format!("{}: cannot mount: {e}", cli.mountpoint.display()))
        }
    }
}

/// The source column of the mount table. The mount helper splits options at commas, so
/// a path with one (or with blanks) is named generically rather than garbled.
fn fs_name(image: &Path) -> String {
    let absolute = image.canonicalize().unwrap_or_else(|_| image.to_path_buf());
    match absolute.to_str() {
        Some(s) if !s.contains([',', ' ', '\t', '\n', '\\']) => s.to_string(),
        _ => "vdisk-mount".to_string(),
    }
}

/// Serves requests until the mountpoint is unmounted, then closes the image. SIGINT,
/// SIGTERM and SIGHUP unmount, so stopping the daemon never leaves a dead mount behind.
fn serve(mounted: Mounted) -> ExitCode {
    let Mounted {
        session,
        disk,
        mountpoint,
        _lock,
    } = mounted;
    unmount_on_signals(mountpoint);
    let served = session.run();
    if let Err(e) = &served {
        log::error!("serving the mount failed: {e}");
    }
    match disk.close() {
        Ok(()) if served.is_ok() => ExitCode::SUCCESS,
        Ok(()) => ExitCode::FAILURE,
        Err(e) => {
            log::error!("closing the image failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn unmount_on_signals(mountpoint: PathBuf) {
    // SAFETY: the set is initialised by sigemptyset before use, and blocking signals in
    // this thread (inherited by the worker threads started later) only defers them to the
    // sigwait below.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        loop {
            let mut signal = 0;
            // SAFETY: `set` is a valid, initialised signal set; `signal` is a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                return;
            }
            log::info!("signal {signal}: unmounting {}", mountpoint.display());
            if let Err(e) = unmount(&mountpoint) {
                log::error!("cannot unmount {}: {e}", mountpoint.display());
            }
        }
    });
}

fn unmount(mountpoint: &Path) -> std::io::Result<()> {
    let path = CString::new(mountpoint.as_os_str().as_bytes())?;
    // SAFETY: `path` is a valid NUL-terminated string.
    if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    // Unprivileged mounts are undone by the setuid helper.
    let status = Command::new("fusermount3")
        .args(["-u", "--"])
        .arg(mountpoint)
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("fusermount3 -u: {status}")))
    }
}

/// What the daemon tells the waiting parent: this byte alone means mounted, anything else
/// is the one-line error to print.
const READY: u8 = 0;

/// Forks before any thread exists; the child mounts and reports through a pipe, the parent
/// waits for that report and exits with it.
fn mount_in_background(cli: &Cli, settings: &Settings) -> ExitCode {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!(
            "vdisk-mount: cannot create a pipe: {}",
            std::io::Error::last_os_error()
        );
        return ExitCode::FAILURE;
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded here, so the child may keep running Rust code.
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!(
                "vdisk-mount: cannot start the daemon: {}",
                std::io::Error::last_os_error()
            );
            ExitCode::FAILURE
        }
        0 => {
            drop(read_end);
            run_daemon(cli, settings, File::from(write_end))
        }
        child => {
            drop(write_end);
            wait_for_daemon(File::from(read_end), child, &cli.image)
        }
    }
}

fn run_daemon(cli: &Cli, settings: &Settings, mut report: File) -> ExitCode {
    // SAFETY: setsid has no memory effects; it fails only for a group leader, which a
    // freshly forked child is not.
    unsafe { libc::setsid() };
    match mount(cli, settings) {
        Err(message) => {
            let _ = report.write_all(message.as_bytes());
            ExitCode::FAILURE
        }
        Ok(mounted) => {
            detach_from_terminal();
            let _ = report.write_all(&[READY]);
            drop(report);
            serve(mounted)
        }
    }
}

/// Leaves the caller's working directory and standard streams, so the daemon holds no
/// directory busy and whoever captures the command's output sees it end.
fn detach_from_terminal() {
    let _ = std::env::set_current_dir("/");
    if let Ok(null) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors; `null` stays open meanwhile.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

fn wait_for_daemon(mut report: File, child: libc::pid_t, image: &Path) -> ExitCode {
    let mut message = Vec::new();
    let _ = report.read_to_end(&mut message);
    if message == [READY] {
        return ExitCode::SUCCESS;
    }
    let mut status = 0;
    // SAFETY: `child` is our own child process; `status` is a valid out pointer.
    unsafe { libc::waitpid(child, &mut status, 0) };
    if message.is_empty() {
        report_failure(&format!(
            "{}: the daemon exited before the mount was ready (wait status {status})",
            image.display()
        ));
    } else {
        report_failure(&String::from_utf8_lossy(&message));
    }
    ExitCode::FAILURE
}

/// Prints a failure as the one line scripts and users expect, whatever it contains.
fn report_failure(message: &str) {
    eprintln!(
        "vdisk-mount: {}",
        message.trim_end().replace(['\n', '\r'], " ")
    );
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // fuser logs its own failures, which reach the user once, as our one-line message.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error,fuser=off"))
        .init();
    let settings = match parse_options(&cli.options) {
        Ok(settings) => settings,
        Err(message) => {
            report_failure(&message);
            return ExitCode::FAILURE;
        }
    };
    if !cli.foreground {
        return mount_in_background(&cli, &settings);
    }
    match mount(&cli, &settings) {
        Ok(mounted) => serve(mounted),
        Err(message) => {
            report_failure(&message);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(lists: &[&str]) -> Result<Settings, String> {
        parse_options(&lists.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_combine_across_lists_and_later_ones_win() {
        let s = parse(&["ro,format=vhd", "size_calc=chs,threads=3", "allow_other"]).unwrap();
        assert!(s.open.read_only);
        assert_eq!(s.open.format, Some(Format::Vhd));
        assert_eq!(s.open.vhd_size_rule, VhdSizeRule::Chs);
        assert_eq!((s.threads, s.allow_other), (3, true));
        let s = parse(&["ro", "rw,format=raw,size_calc=current_size"]).unwrap();
        assert!(!s.open.read_only);
        assert_eq!(s.open.format, Some(Format::Raw));
        assert_eq!(s.open.vhd_size_rule, VhdSizeRule::CurrentSize);
        let s = parse(&[]).unwrap();
        assert!(!s.open.read_only && s.open.format.is_none() && s.threads >= 1);
    }

    #[test]
    fn unknown_or_malformed_options_are_rejected_by_name() {
        for (lists, needle) in [
            (&["ro,bogus"][..], "'bogus'"),
            (&["ro=1"], "'ro=1'"),
            (&["format"], "'format'"),
            (&["format=qcow2"], "qcow2"),
            (&["size_calc=lba"], "lba"),
            (&["threads=0"], "threads=0"),
            (&["threads=x"], "threads=x"),
        ] {
            let err = parse(lists).unwrap_err();
            assert!(err.contains(needle), "{lists:?}: {err}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(br"/mnt/a\040b\134c"), b"/mnt/a b\\c");
        assert_eq!(unescape_mountinfo(br"/x\0"), b"/x\\0");
        assert!(is_mount_point(Path::new("/proc")));
        assert!(!is_mount_point(Path::new("/proc/self")));
    }

    #[test]
    fn mountpoint_must_be_an_unmounted_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_mountpoint(dir.path()).is_ok());
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        let err = check_mountpoint(&file).unwrap_err();
        assert!(
            err.contains("not a directory") && err.contains("/f"),
            "{err}"
        );
        let err = check_mountpoint(&dir.path().join("missing")).unwrap_err();
        assert!(
            err.contains("missing") && err.contains("No such file"),
            "{err}"
        );
        assert!(
            check_mountpoint(Path::new("/proc"))
                .unwrap_err()
                .contains("busy")
        );
    }
}

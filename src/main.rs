//! `vdisk-mount IMAGE MOUNTPOINT`: serves a VHD, VHDX or raw image as `MOUNTPOINT/disk.img`.
//!
//! Without `-f` the command returns only once the mount is live (exit 0) or has failed (one
//! line on stderr, non-zero exit, nothing left mounted); the daemon keeps serving in the
//! background until the mountpoint is unmounted, then closes the image cleanly and exits.
//! It follows the conventions of system services: mount(8) and fstab run it through
//! `mount.fuse3`, systemd learns readiness through `$NOTIFY_SOCKET`, and the image is
//! locked the way qemu locks images.

mod cli;
mod kernel_mount;
mod mountpoint;
mod notify;
mod options;
mod syslog;
mod watch;

use clap::Parser;
use cli::{Cli, report_failure};
use fuser::{Config, MountOption, Session, SessionACL};
use mountpoint::{check_mountpoint, unmount};
use options::{Access, MountConfig};
use parking_lot::Mutex;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;
use vdisk_mount::VirtualDisk;
use vdisk_mount::fuse::{DiskFs, RequestGate, View};
use vdisk_mount::lock::ImageLock;
use watch::ImageIdentity;

/// A live mount and the disk behind it.
struct Mounted {
    session: Session<DiskFs>,
    service: Arc<Service>,
    image: Arc<ImageIdentity>,
    mountpoint: PathBuf,
    /// Holds the image's lock for as long as the daemon runs.
    _lock: ImageLock,
}

fn mount(cli: &Cli, config: &MountConfig) -> Result<Mounted, String> {
    // Checked before the image is opened: opening read-write may already touch the image.
    let mountpoint = check_mountpoint(&cli.mountpoint)?;
    let image_path = cli
        .image
        .canonicalize()
        .map_err(|e| format!("{}: cannot open image: {e}", cli.image.display()))?;
    // Parents are locked (shared) where the chain opens them, for as long as they are open.
    let lock = ImageLock::acquire(&image_path, config.open.read_only)?;
    let image = ImageIdentity::of(lock.file(), &image_path)
        .map_err(|e| format!("{}: cannot open image: {e}", cli.image.display()))?;
    let image = Arc::new(image);
    let disk: Arc<dyn VirtualDisk> = vdisk_mount::open(&image_path, &config.open)
        .map_err(|e| e.to_string())?
        .into();
    let mtime = fs::metadata(&image_path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| SystemTime::now());
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let view = View {
        uid: config.uid.unwrap_or(uid),
        gid: config.gid.unwrap_or(gid),
        file_mode: config.file_mode(),
        dir_mode: config.dir_mode(),
        file_name: config.file_name.clone(),
    };
    let mut fs = DiskFs::new(disk.clone(), view, mtime);
    let checked = image.clone();
    fs.set_image_check(Box::new(move || checked.check()));
    let service = Arc::new(Service::new(disk, fs.gate()));

    let source = fs_name(&image_path);
    // For unprivileged mounts through fusermount3; root mounts directly (kernel_mount).
    let mut fuse_config = Config::default();
    fuse_config.mount_options = vec![
        MountOption::FSName(source.clone()),
        MountOption::Subtype("vdisk-mount".to_string()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        if config.open.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    for (wanted, option) in [
        (config.no_dev, MountOption::NoDev),
        (config.no_suid, MountOption::NoSuid),
        (config.no_exec, MountOption::NoExec),
    ] {
        if wanted {
            fuse_config.mount_options.push(option);
        }
    }
    fuse_config.acl = match config.access {
        Access::Owner => SessionACL::Owner,
        Access::OwnerAndRoot => SessionACL::RootAndOwner,
        Access::Everyone => SessionACL::All,
    };
    fuse_config.n_threads = Some(config.threads);
    fuse_config.clone_fd = true;
    let spec = kernel_mount::MountSpec {
        source: &source,
        read_only: config.open.read_only,
        no_exec: config.no_exec,
        others_allowed: config.access != Access::Owner,
    };
    let session = match kernel_mount::mount(&mountpoint, &spec) {
        Ok(Some(device)) => {
            let acl = fuse_config.acl;
            Session::from_fd(fs, device, acl, fuse_config).inspect_err(|_| {
                // The kernel answers a mount whose daemon failed with errors only.
                let _ = unmount(&mountpoint);
            })
        }
        Ok(None) => Session::new(fs, &mountpoint, &fuse_config),
        Err(e) => Err(e),
    };
    match session {
        Ok(session) => Ok(Mounted {
            session,
            service,
            image,
            mountpoint,
            _lock: lock,
        }),
        Err(e) => {
            service.close();
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

/// Serves requests until the mountpoint is unmounted or a signal stops the daemon, then
/// closes the image and exits.
fn serve(mounted: Mounted) -> ExitCode {
    let Mounted {
        session,
        service,
        image,
        mountpoint,
        _lock,
    } = mounted;
    stop_on_signals(service.clone(), mountpoint.clone());
    watch::watch(image, service.gate());
    notify::notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS=Serving {}",
        std::process::id(),
        mountpoint.display()
    ));
    let served = session.run();
    notify::notify("STOPPING=1");
    if let Err(e) = &served {
        log::error!("serving the mount failed: {e}");
        // A session that broke down leaves its mount behind, answering only errors.
        if let Err(e) = unmount(&mountpoint) {
            log::error!("cannot unmount {}: {e}", mountpoint.display());
        }
    }
    if service.close() && served.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The disk behind a mount, closed exactly once by whoever ends the service first: the
/// session when the mountpoint is unmounted, or a signal.
struct Service {
    disk: Arc<dyn VirtualDisk>,
    gate: Arc<RequestGate>,
    /// Whether closing succeeded, once it has happened.
    closed: Mutex<Option<bool>>,
}

impl Service {
    fn new(disk: Arc<dyn VirtualDisk>, gate: Arc<RequestGate>) -> Service {
        Service {
            disk,
            gate,
            closed: Mutex::new(None),
        }
    }

    fn gate(&self) -> Arc<RequestGate> {
        self.gate.clone()
    }

    /// Lets the requests in progress finish, refuses later ones, then flushes data and
    /// metadata and leaves the image in its final clean state. Returns whether that
    /// succeeded; later calls return the first call's answer.
    fn close(&self) -> bool {
        let mut closed = self.closed.lock();
        if let Some(ok) = *closed {
            return ok;
        }
        // Whatever was written since is lost with the file: the service failed.
        let lost = self.gate.is_image_lost();
        self.gate.stop();
        let ok = match self.disk.close() {
            Ok(()) => !lost,
            Err(e) => {
                log::error!("closing the image failed: {e}");
                false
            }
        };
        *closed = Some(ok);
        ok
    }
}

/// SIGTERM, SIGINT and SIGHUP end the service cleanly: requests in progress finish, the
/// image is closed, the mount goes away, and the daemon exits 0. Files still open on the
/// mount then fail with `ENOTCONN`, as on any FUSE mount whose daemon has gone.
fn stop_on_signals(service: Arc<Service>, mountpoint: PathBuf) {
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
        let mut signal = 0;
        // SAFETY: `set` is a valid, initialised signal set; `signal` is a valid out pointer.
        if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
            return;
        }
        log::info!(
            "signal {signal}: closing the image and unmounting {}",
            mountpoint.display()
        );
        notify::notify("STOPPING=1");
        let closed = service.close();
        if let Err(e) = unmount(&mountpoint) {
            log::error!("cannot unmount {}: {e}", mountpoint.display());
        }
        // Further signals stay blocked and pending; the process ends here.
        std::process::exit(if closed { 0 } else { 1 });
    });
}

/// What the daemon tells the waiting parent: this byte alone means mounted, anything else
/// is the one-line error to print.
const READY: u8 = 0;

/// Forks before any thread exists; the child mounts and reports through a pipe, the parent
/// waits for that report and exits with it.
fn mount_in_background(cli: &Cli, config: &MountConfig) -> ExitCode {
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
            run_daemon(cli, config, File::from(write_end))
        }
        child => {
            drop(write_end);
            wait_for_daemon(File::from(read_end), child, &cli.image)
        }
    }
}

fn run_daemon(cli: &Cli, config: &MountConfig, mut report: File) -> ExitCode {
    // SAFETY: setsid has no memory effects; it fails only for a group leader, which a
    // freshly forked child is not.
    unsafe { libc::setsid() };
    match mount(cli, config) {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        return mount_in_background(&cli, &config);
    }
    match mount(&cli, &config) {
        Ok(mounted) => serve(mounted),
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

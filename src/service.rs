//! The service: mounting the image, serving requests until the mount or a signal ends it,
//! and closing the image exactly once.

use crate::kernel_mount;
use crate::mountpoint::{check_mountpoint, unmount};
use crate::notify;
use crate::options::{Access, IoUring, MountConfig};
use crate::watch::{self, ImageIdentity};
use fuser::{Config, MountOption, Session, SessionACL};
use parking_lot::Mutex;
use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::SystemTime;
use vdisk_mount::VirtualDisk;
use vdisk_mount::cli::mount::Cli;
use vdisk_mount::fuse::uring::Queues;
use vdisk_mount::fuse::{DiskFs, Invalidation, ROOT_INO, RequestGate, View};
use vdisk_mount::lock::ImageLock;
use vdisk_mount::serve::{ServedImage, open_image};

/// A live mount and the disk behind it.
pub struct Mounted {
    session: Session<DiskFs>,
    service: Arc<Service>,
    image: Arc<ImageIdentity>,
    mountpoint: PathBuf,
    /// What the kernel must forget, as the requests changing the disk report it.
    invalidations: Receiver<Invalidation>,
    /// Holds the image's lock for as long as the daemon runs.
    _lock: ImageLock,
}

pub fn mount(cli: &Cli, config: &MountConfig) -> Result<Mounted, String> {
    // Checked before the image is opened: opening read-write may already touch the image.
    let mountpoint = check_mountpoint(&cli.mountpoint)?;
    let queues = prepare_queues(config.io_uring)
        .map_err(|e| format!("{}: cannot mount: {e}", cli.mountpoint.display()))?;
    let ServedImage {
        path: image_path,
        disk,
        lock,
    } = open_image(&cli.image, &config.open)?;
    let disk: Arc<dyn VirtualDisk> = disk;
    let image = ImageIdentity::of(lock.file(), &image_path)
        .map_err(|e| format!("{}: cannot open image: {e}", cli.image.display()))?;
    let image = Arc::new(image);
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
        partitions: config.partitions,
    };
    let mut fs = DiskFs::new(disk.clone(), view, mtime);
    let queues = queues.map(|queues| (queues, fs.ask_for_io_uring()));
    let checked = image.clone();
    fs.set_image_check(Box::new(move || checked.check()));
    let (invalidate, invalidations) = channel();
    fs.set_invalidator(Box::new(move |what| {
        // Fails only once the session has ended, when nothing is cached any more.
        let _ = invalidate.send(what);
    }));
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
    let served = session.map_err(|e| e.to_string()).and_then(|session| {
        start_queues(&session, queues, config.io_uring).inspect_err(|_| {
            // Requests wait for queues that will not serve them, or io_uring=on is
            // refused: the mount must go.
            let _ = unmount(&mountpoint);
        })?;
        Ok(session)
    });
    match served {
        Ok(session) => Ok(Mounted {
            session,
            service,
            image,
            mountpoint,
            invalidations,
            _lock: lock,
        }),
        Err(e) => {
            service.close();
            Err(format!("{}: cannot mount: {e}", cli.mountpoint.display()))
        }
    }
}

/// Where root switches FUSE over io_uring on.
const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// The FUSE-over-io_uring rings, unless `-o io_uring=off`. Set up before INIT, which asks
/// for io_uring only if they are: once the kernel agreed, it holds every request back
/// until the queues serve them.
fn prepare_queues(mode: IoUring) -> Result<Option<Queues>, String> {
    if mode == IoUring::Off {
        return Ok(None);
    }
    match Queues::prepare() {
        Ok(queues) => Ok(Some(queues)),
        Err(e) if mode == IoUring::On => Err(format!(
            "cannot set up FUSE over io_uring (io_uring=on): {e}"
        )),
        Err(e) => {
            log::info!("cannot set up FUSE over io_uring: {e}");
            Ok(None)
        }
    }
}

/// Serves requests through the io_uring queues if INIT agreed on them, and logs which way
/// requests come.
fn start_queues(
    session: &Session<DiskFs>,
    queues: Option<(Queues, Arc<AtomicBool>)>,
    mode: IoUring,
) -> Result<(), String> {
    let Some((queues, agreed)) = queues else {
        log::info!("serving requests through /dev/fuse");
        return Ok(());
    };
    if !agreed.load(Ordering::Relaxed) {
        if mode == IoUring::On {
            return Err(format!(
                "the kernel does not offer FUSE over io_uring (io_uring=on); root switches \
                 it on with: echo Y > {ENABLE_URING}"
            ));
        }
        log::info!(
            "serving requests through /dev/fuse: the kernel does not offer FUSE over io_uring \
             ({ENABLE_URING})"
        );
        return Ok(());
    }
    // The queue threads must leave the stop signals to the thread that waits for them.
    block_stop_signals();
    let count = queues
        .start(session.as_fd(), session.dispatcher())
        .map_err(|e| format!("cannot serve FUSE over io_uring: {e}"))?;
    log::info!("serving requests through FUSE over io_uring, {count} queues");
    Ok(())
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
pub fn serve(mounted: Mounted) -> ExitCode {
    let Mounted {
        session,
        service,
        image,
        mountpoint,
        invalidations,
        _lock,
    } = mounted;
    stop_on_signals(service.clone(), mountpoint.clone());
    pass_invalidations(invalidations, session.notifier());
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

/// Tells the kernel what to forget on a thread of its own: the kernel may wait for the
/// very request that reported it (its pages stay locked until that request is answered).
/// Started after the signal mask is set, like every thread of the daemon.
fn pass_invalidations(invalidations: Receiver<Invalidation>, notifier: fuser::Notifier) {
    std::thread::spawn(move || {
        for what in invalidations {
            // The kernel answers ENOENT for what it has not cached, which is fine.
            let _ = match &what {
                Invalidation::Entry { name } => {
                    notifier.inval_entry(fuser::INodeNo(ROOT_INO), name.as_ref())
                }
                Invalidation::Pages { ino, offset, len } => notifier.inval_inode(
                    fuser::INodeNo(*ino),
                    i64::try_from(*offset).unwrap_or(i64::MAX),
                    i64::try_from(*len).unwrap_or(i64::MAX),
                ),
            };
        }
    });
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread and in the threads it starts from now
/// on, which only defers them to the sigwait of [`stop_on_signals`]. Returns their set.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: the set is initialised by sigemptyset before use, and blocking signals only
    // defers them.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// SIGTERM, SIGINT and SIGHUP end the service cleanly: requests in progress finish, the
/// image is closed, the mount goes away, and the daemon exits 0. Files still open on the
/// mount then fail with `ENOTCONN`, as on any FUSE mount whose daemon has gone.
fn stop_on_signals(service: Arc<Service>, mountpoint: PathBuf) {
    let set = block_stop_signals();
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

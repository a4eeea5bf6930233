//! nbdkit plugin `vdisk`: serves a VHD, VHDX or raw image, with its chain of parents, over
//! NBD through the same library and drivers as the FUSE mount.
//!
//! ```text
//! nbdkit -U SOCKET vdisk image=disk.vhdx [readonly=1] [parent=PATH] [format=vhd|vhdx|raw]
//!                         [size_calc=auto|chs|current_size] [discard=unmap|zero|ignore]
//! ```
//!
//! The image is opened once, before nbdkit starts serving, exactly as a mount opens it
//! (`vdisk_mount::serve::open_image`: locked against qemu and mounts, parents found and
//! locked the same way), and every connection shares that one disk: the drivers are
//! thread-safe and a flush makes every completed write durable, whichever connection made
//! it, so clients may open several connections (multi-conn) and send requests in
//! parallel. When nbdkit shuts down, after its last connection, the disk is closed as an
//! unmount closes it, leaving a VHDX with an empty log.

use nbdkit::{ExtentHandle, ExtentType, Flags, FuaFlags, Server, ThreadModel, plugin};
use parking_lot::Mutex;
use std::ffi::{CString, c_char};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use vdisk_mount::disk::DiscardMode;
use vdisk_mount::layer::Layer;
use vdisk_mount::serve::{ServedImage, open_image};
use vdisk_mount::storage::zero_chunks;
use vdisk_mount::{Allocation, OpenOptions};

/// What the command line asked for.
#[derive(Default)]
struct Settings {
    image: Option<PathBuf>,
    options: OpenOptions,
}

static SETTINGS: LazyLock<Mutex<Settings>> = LazyLock::new(Mutex::default);

/// The image served, from `get_ready` until the plugin is unloaded.
static SERVED: Mutex<Option<ServedImage>> = Mutex::new(None);

/// One client connection; every one serves the same disk.
struct Export {
    disk: Arc<dyn Layer>,
}

fn failed(e: vdisk_mount::Error) -> nbdkit::Error {
    nbdkit::Error::new(e.errno(), e.to_string())
}

fn invalid(message: String) -> nbdkit::Error {
    nbdkit::Error::new(libc::EINVAL, message)
}

impl Export {
    /// Makes the request durable before it is answered, when the client asked for that.
    fn finish(&self, flags: Flags) -> nbdkit::Result<()> {
        if flags.contains(Flags::FUA) {
            self.disk.flush().map_err(failed)?;
        }
        Ok(())
    }

    /// Whether zeroing by discard is quicker than writing zeros: only where discards
    /// unmap, and nothing below shows through (over a parent's data a discard writes
    /// zeros).
    fn zeroes_fast(&self) -> bool {
        self.disk.discard_mode() == DiscardMode::Unmap && self.disk.parent().is_none()
    }
}

impl Server for Export {
    fn name() -> &'static str {
        "vdisk"
    }

    fn longname() -> Option<&'static str> {
        Some("vdisk: VHD and VHDX disk images")
    }

    fn version() -> Option<&'static str> {
        Some(env!("CARGO_PKG_VERSION"))
    }

    fn description() -> Option<&'static str> {
        Some(
            "Serves a VHD, VHDX or raw disk image, with the chain of parents of a \
             differencing image, as vdisk-mount mounts it.",
        )
    }

    fn config_help() -> Option<&'static str> {
        Some(
            "image=PATH              The image to serve (required; the key may be left out).\n\
             readonly=BOOL           Open the image read-only (locked shared, never changed).\n\
             parent=PATH             Where a differencing image's parent is.\n\
             format=vhd|vhdx|raw     Skip probing; raw serves any file byte for byte.\n\
             size_calc=auto|chs|current_size\n\
             \x20                       Which VHD footer field gives the disk size.\n\
             discard=unmap|zero|ignore\n\
             \x20                       What trims do.",
        )
    }

    fn magic_config_key() -> Option<&'static str> {
        Some("image")
    }

    fn config(key: &str, value: &str) -> nbdkit::Result<()> {
        let mut settings = SETTINGS.lock();
        let bad = |e: vdisk_mount::Error| invalid(format!("{key}={value}: {e}"));
        match key {
            "image" => settings.image = Some(PathBuf::from(value)),
            "readonly" => settings.options.read_only = nbdkit::parse_bool(value)?,
            "parent" if !value.is_empty() => settings.options.parent = Some(PathBuf::from(value)),
            "format" => settings.options.format = Some(value.parse().map_err(bad)?),
            "size_calc" => settings.options.vhd_size_rule = value.parse().map_err(bad)?,
            "discard" => settings.options.discard = Some(value.parse().map_err(bad)?),
            _ => {
                return Err(invalid(format!(
                    "unknown parameter '{key}={value}' (known: image, readonly, parent, \
                     format, size_calc, discard)"
                )));
            }
        }
        Ok(())
    }

    /// Opens the image before nbdkit forks into the background, so the user sees why it
    /// cannot be served. Opening starts no threads, which would not survive the fork.
    fn get_ready() -> nbdkit::Result<()> {
        // Set at most once per process; a second call means a logger was there already.
        let _ = log::set_logger(&NbdkitLog).map(|()| log::set_max_level(log::LevelFilter::Info));
        let settings = SETTINGS.lock();
        let Some(image) = &settings.image else {
            return Err(invalid("image=PATH is required".to_string()));
        };
        let served = open_image(image, &settings.options).map_err(invalid)?;
        *SERVED.lock() = Some(served);
        Ok(())
    }

    fn thread_model() -> nbdkit::Result<ThreadModel> {
        Ok(ThreadModel::Parallel)
    }

    fn open(_readonly: bool) -> nbdkit::Result<Box<dyn Server>> {
        match SERVED.lock().as_ref() {
            Some(served) => Ok(Box::new(Export {
                disk: served.disk.clone(),
            })),
            None => Err(invalid("the image is not open".to_string())),
        }
    }

    /// Closes the image as an unmount does; nbdkit has closed every connection by now.
    fn unload() {
        if let Some(served) = SERVED.lock().take()
            && let Err(e) = served.disk.close()
        {
            log::error!("closing the image failed: {e}");
        }
    }

    fn get_size(&self) -> nbdkit::Result<i64> {
        i64::try_from(self.disk.size())
            .map_err(|_| invalid("the disk is larger than NBD can serve".to_string()))
    }

    fn can_write(&self) -> nbdkit::Result<bool> {
        Ok(!self.disk.is_read_only())
    }

    fn can_flush(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn can_fua(&self) -> nbdkit::Result<FuaFlags> {
        Ok(FuaFlags::Native)
    }

    /// One disk behind every connection, and a flush covers every write it completed.
    fn can_multi_conn(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn can_trim(&self) -> nbdkit::Result<bool> {
        Ok(self.disk.discard_mode() != DiscardMode::Ignore)
    }

    fn can_zero(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn can_fast_zero(&self) -> nbdkit::Result<bool> {
        Ok(self.zeroes_fast())
    }

    fn can_extents(&self) -> nbdkit::Result<bool> {
        Ok(true)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> nbdkit::Result<()> {
        self.disk.read_at(buf, offset).map_err(failed)
    }

    fn write_at(&self, buf: &[u8], offset: u64, flags: Flags) -> nbdkit::Result<()> {
        self.disk.write_at(buf, offset).map_err(failed)?;
        self.finish(flags)
    }

    fn flush(&self) -> nbdkit::Result<()> {
        self.disk.flush().map_err(failed)
    }

    fn trim(&self, count: u32, offset: u64, flags: Flags) -> nbdkit::Result<()> {
        self.disk
            .discard(offset, u64::from(count))
            .map_err(failed)?;
        self.finish(flags)
    }

    /// A discard where the client allows holes (it reads zeros afterwards, whatever the
    /// discard mode), else zeros written, which leaves the range allocated.
    fn zero(&self, count: u32, offset: u64, flags: Flags) -> nbdkit::Result<()> {
        let len = u64::from(count);
        let may_discard =
            flags.contains(Flags::MAY_TRIM) && self.disk.discard_mode() != DiscardMode::Ignore;
        if flags.contains(Flags::FAST_ZERO) && !(may_discard && self.zeroes_fast()) {
            return Err(nbdkit::Error::new(
                libc::ENOTSUP,
                "zeroing this range means writing zeros",
            ));
        }
        if may_discard {
            self.disk.discard(offset, len)
        } else {
            zero_chunks(offset, len, |zeros, at| self.disk.write_at(zeros, at))
        }
        .map_err(failed)?;
        self.finish(flags)
    }

    /// The allocation map, as `vdisk map` shows it: data wherever some image of the
    /// chain holds it (a child's parent included), a hole reading as zeros elsewhere.
    fn extents(
        &self,
        count: u32,
        offset: u64,
        _flags: Flags,
        extents: &mut ExtentHandle,
    ) -> nbdkit::Result<()> {
        let map = self
            .disk
            .allocation(offset, u64::from(count))
            .map_err(failed)?;
        for extent in map {
            let kind = match extent.state {
                Allocation::Data => ExtentType::Allocated,
                Allocation::Zero => ExtentType::HoleZero,
            };
            extents.add(extent.offset, extent.len, kind)?;
        }
        Ok(())
    }
}

plugin!(Export {
    thread_model,
    config,
    get_ready,
    unload,
    can_write,
    can_flush,
    can_fua,
    can_multi_conn,
    can_trim,
    can_zero,
    can_fast_zero,
    can_extents,
    write_at,
    flush,
    trim,
    zero,
    extents
});

unsafe extern "C" {
    fn nbdkit_error(fmt: *const c_char, ...);
    fn nbdkit_debug(fmt: *const c_char, ...);
}

/// The library's log, in nbdkit's: errors and warnings as nbdkit errors (on stderr, or
/// the system log once nbdkit runs in the background), the rest as debug messages, which
/// `nbdkit -v` shows.
struct NbdkitLog;

impl log::Log for NbdkitLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let text = match record.level() {
            log::Level::Error => record.args().to_string(),
            level => format!("{}: {}", level.as_str().to_lowercase(), record.args()),
        };
        let Ok(text) = CString::new(text.replace('\0', " ")) else {
            return;
        };
        // SAFETY: both functions take a printf format; "%s" with one valid C string.
        unsafe {
            if record.level() <= log::Level::Warn {
                nbdkit_error(c"%s".as_ptr(), text.as_ptr());
            } else {
                nbdkit_debug(c"%s".as_ptr(), text.as_ptr());
            }
        }
    }

    fn flush(&self) {}
}

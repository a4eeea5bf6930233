//! Mounting with mount(2) directly when privileged, so that the mount table names the
//! filesystem type `fuse.vdisk-mount` (what fstab lines, `mount -t` and `findmnt -t` use)
//! instead of a bare `fuse`. Unprivileged mounts go through `fusermount3`, which records
//! the subtype itself.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

pub const FS_TYPE: &str = "fuse.vdisk-mount";

/// What the mount looks like to the kernel.
#[derive(Debug)]
pub struct MountSpec<'a> {
    /// The source column of the mount table.
    pub source: &'a str,
    pub read_only: bool,
    pub no_exec: bool,
    /// Anyone but the mounting user gets in (`allow_other` or `allow_root`; the daemon
    /// refuses whom it must).
    pub others_allowed: bool,
}

/// Mounts an empty FUSE filesystem on `mountpoint` and returns the `/dev/fuse`
/// descriptor to serve it through; `None` when not privileged to mount.
pub fn mount(mountpoint: &Path, spec: &MountSpec) -> io::Result<Option<OwnedFd>> {
    let device = match File::options().read(true).write(true).open("/dev/fuse") {
        Ok(device) => device,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Ok(None),
        Err(e) => return Err(e),
    };
    let root_mode = std::fs::metadata(mountpoint)?.permissions().mode();
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode={root_mode:o},user_id={uid},group_id={gid},default_permissions",
        device.as_raw_fd()
    );
    if spec.others_allowed {
        data.push_str(",allow_other");
    }
    // Device files and set-id programs inside a disk image are never honoured here.
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    if spec.read_only {
        flags |= libc::MS_RDONLY;
    }
    if spec.no_exec {
        flags |= libc::MS_NOEXEC;
    }
    let c = |s: &[u8]| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let source = c(spec.source.as_bytes())?;
    let target = c(mountpoint.as_os_str().as_bytes())?;
    let fs_type = c(FS_TYPE.as_bytes())?;
    let data = c(data.as_bytes())?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fs_type.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        return Ok(Some(device.into()));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EPERM) => Ok(None),
        _ => Err(err),
    }
}

//! Notices when the image file the daemon serves can no longer keep what is written.
//!
//! Linux keeps an open file working after its last name is removed (or replaced by a
//! rename over it), and after its filesystem is lazily unmounted (`umount -l`): reads and
//! writes still succeed, but what they write vanishes with the last descriptor or lands
//! where nobody can reach it. Acknowledging such writes would be a lie, so once either has
//! happened every request fails with `EIO` (see `fuse::RequestGate`). A file merely
//! renamed, or with another name left, is still reachable and goes on being served.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use vdisk_mount::fuse::RequestGate;

/// How often the image is looked at between flushes (each flush also looks).
const INTERVAL: Duration = Duration::from_secs(1);

/// The open image file, and the mount it was reached through.
#[derive(Debug)]
pub struct ImageIdentity {
    path: PathBuf,
    file: File,
    mount_id: u64,
}

impl ImageIdentity {
    /// `file` is the image opened through `path` (named in messages).
    pub fn of(file: &File, path: &Path) -> std::io::Result<ImageIdentity> {
        let file = file.try_clone()?;
        let mount_id = mount_id(&file)?;
        Ok(ImageIdentity {
            path: path.to_path_buf(),
            file,
            mount_id,
        })
    }

    /// Whether the image still has a name on a mounted filesystem.
    pub fn check(&self) -> Result<(), String> {
        let name = self.path.display();
        match self.file.metadata() {
            Ok(meta) if meta.nlink() == 0 => {
                return Err(format!("{name}: the image file was removed"));
            }
            Ok(_) => {}
            Err(e) => return Err(format!("{name}: cannot check the image file: {e}")),
        }
        match std::fs::read_to_string("/proc/self/mountinfo") {
            Ok(table) if is_mounted(&table, self.mount_id) => Ok(()),
            Ok(_) => Err(format!(
                "{name}: the filesystem holding the image file was unmounted"
            )),
            Err(e) => Err(format!("{name}: cannot read the mount table: {e}")),
        }
    }
}

/// The id of the mount `file` was opened through, as `/proc/self/fdinfo` tells it.
fn mount_id(file: &File) -> std::io::Result<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd()))?;
    info.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|id| id.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("fdinfo names no mount"))
}

/// Whether a mount with `id` (the first field of each line) is in the mount table.
fn is_mounted(mountinfo: &str, id: u64) -> bool {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').next()?.parse::<u64>().ok())
        .any(|m| m == id)
}

/// Checks the image every [`INTERVAL`] until it is gone, then closes `gate` to requests.
pub fn watch(identity: Arc<ImageIdentity>, gate: Arc<RequestGate>) {
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(INTERVAL);
            if gate.is_image_lost() {
                return;
            }
            if let Err(why) = identity.check() {
                log::error!("{why}; every request now fails with EIO");
                gate.image_lost();
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_is_noticed_and_renaming_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.vhd");
        std::fs::write(&path, b"one").unwrap();
        let file = File::open(&path).unwrap();
        let identity = ImageIdentity::of(&file, &path).unwrap();
        identity.check().unwrap();

        let renamed = dir.path().join("renamed.vhd");
        std::fs::rename(&path, &renamed).unwrap();
        identity.check().unwrap();

        // Replaced by a rename over it: the file served has no name left.
        let other = dir.path().join("other.vhd");
        std::fs::write(&other, b"two").unwrap();
        std::fs::rename(&other, &renamed).unwrap();
        let err = identity.check().unwrap_err();
        assert!(
            err.contains("removed") && err.contains("image.vhd"),
            "{err}"
        );
    }

    #[test]
    fn the_mount_is_found_by_its_id() {
        let file = File::open("/proc/self/mountinfo").unwrap();
        let id = mount_id(&file).unwrap();
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(is_mounted(&table, id));
        assert!(!is_mounted(&table, u64::MAX));
        assert!(!is_mounted("", id));
    }
}

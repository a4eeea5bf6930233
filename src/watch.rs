//! Notices when the image file the daemon serves is no longer the one at its path.
//!
//! Linux keeps an open file working after it is removed, replaced by a rename, or after
//! its filesystem is lazily unmounted (`umount -l`): reads and writes still succeed, but
//! what they write vanishes with the last descriptor or lands where nobody can reach it.
//! Acknowledging such writes would be a lie, so once the path no longer leads to the
//! file the daemon holds, every request fails with `EIO` (see `fuse::RequestGate`).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use vdisk_mount::fuse::RequestGate;

/// How often the path is looked at between flushes (each flush also looks).
const INTERVAL: Duration = Duration::from_secs(1);

/// The image file as it was when the daemon opened it.
#[derive(Debug, Clone)]
pub struct ImageIdentity {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl ImageIdentity {
    /// `file` is the image opened through `path`; `path` must be absolute, since the
    /// daemon leaves its working directory.
    pub fn of(file: &File, path: &Path) -> std::io::Result<ImageIdentity> {
        let meta = file.metadata()?;
        Ok(ImageIdentity {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Whether `path` still leads to the same file, which still has a name.
    pub fn check(&self) -> Result<(), String> {
        let name = self.path.display();
        match std::fs::metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino && meta.nlink() > 0 => {
                Ok(())
            }
            Ok(_) => Err(format!(
                "{name}: the image file was replaced, or the filesystem holding it unmounted"
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
                "{name}: the image file was removed, or the filesystem holding it unmounted"
            )),
            Err(e) => Err(format!("{name}: cannot check the image file: {e}")),
        }
    }
}

/// Checks the image every [`INTERVAL`] until it is gone, then closes `gate` to requests.
pub fn watch(identity: ImageIdentity, gate: Arc<RequestGate>) {
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
    fn removal_and_replacement_are_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.vhd");
        std::fs::write(&path, b"one").unwrap();
        let file = File::open(&path).unwrap();
        let identity = ImageIdentity::of(&file, &path).unwrap();
        identity.check().unwrap();

        let other = dir.path().join("other.vhd");
        std::fs::write(&other, b"two").unwrap();
        std::fs::rename(&other, &path).unwrap();
        let err = identity.check().unwrap_err();
        assert!(
            err.contains("replaced") && err.contains("image.vhd"),
            "{err}"
        );

        std::fs::remove_file(&path).unwrap();
        let err = identity.check().unwrap_err();
        assert!(err.contains("removed"), "{err}");
    }
}

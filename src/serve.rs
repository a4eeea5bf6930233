//! Opening an image to serve it for as long as a service runs: a mount, an NBD export.
//!
//! Every service opens an image the same way, so each excludes the others as it excludes
//! qemu: the image is locked first (exclusive when read-write, shared when read-only,
//! through [`ImageLock`]), then opened with its chain of parents, which the chain locks
//! shared as it opens them. Closing is [`crate::VirtualDisk::close`], which leaves the image
//! clean (a VHDX log empty), and then dropping the lock.

use crate::disk::OpenOptions;
use crate::layer::Layer;
use crate::lock::ImageLock;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An image opened for a service, with the lock that keeps other writers out.
pub struct ServedImage {
    /// The image file, symlinks resolved.
    pub path: PathBuf,
    pub disk: Arc<dyn Layer>,
    /// Held until the service has closed the disk.
    pub lock: ImageLock,
}

/// Locks the image at `image` as `options` say (read-only: shared, else exclusive) and
/// opens it with its chain. Errors are one line naming the image.
pub fn open_image(image: &Path, options: &OpenOptions) -> Result<ServedImage, String> {
    let path = image
        .canonicalize()
        .map_err(|e| format!("{}: cannot open image: {e}", image.display()))?;
    // Locked before it is opened: opening read-write may already write (a log replay).
    let lock = ImageLock::acquire(&path, options.read_only)?;
    let disk = crate::chain::open_layered(&path, options).map_err(|e| e.to_string())?;
    Ok(ServedImage {
        path,
        disk: disk.into(),
        lock,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{CreateOptions, create};

    #[test]
    fn a_served_image_is_locked_as_a_mount_locks_it() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.vhdx");
        let options = CreateOptions {
            size: Some(8 << 20),
            ..Default::default()
        };
        create(&image, &options).unwrap();
        let read_only = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let writer = open_image(&image, &OpenOptions::default()).unwrap();
        assert_eq!(writer.path, image.canonicalize().unwrap());
        for options in [&OpenOptions::default(), &read_only] {
            let refused = open_image(&image, options).err().unwrap();
            assert!(refused.contains("image is in use"), "{refused}");
            assert!(refused.contains(image.to_str().unwrap()), "{refused}");
        }
        writer.disk.close().unwrap();
        drop(writer);
        let first = open_image(&image, &read_only).unwrap();
        let second = open_image(&image, &read_only).unwrap();
        assert!(first.disk.is_read_only() && second.disk.is_read_only());
        assert!(open_image(&image, &OpenOptions::default()).is_err());
    }

    #[test]
    fn a_missing_image_is_named() {
        let missing = Path::new("/nonexistent/a.vhdx");
        let refused = open_image(missing, &OpenOptions::default()).err().unwrap();
        assert!(
            refused.starts_with("/nonexistent/a.vhdx: cannot open image"),
            "{refused}"
        );
    }
}

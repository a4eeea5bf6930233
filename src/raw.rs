//! A plain file served as the disk, byte for byte. Never probed: only used when asked
//! (`format=raw`), as a baseline to measure the format drivers against.

use crate::disk::{DiscardMode, Extent, Format, OpenOptions, VirtualDisk, check_range};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::layer::{self, Layer, LayerFacts, MappedRun, Mapping, push_run};
use crate::storage::{self, Storage};

pub struct RawDisk {
    storage: Box<dyn Storage>,
    size: u64,
    logical_sector_size: u32,
    read_only: bool,
    discard: DiscardMode,
}

impl RawDisk {
    pub fn open(storage: Box<dyn Storage>, options: &OpenOptions) -> Result<Self> {
        let size = storage
            .len()
            .context(|| "cannot read file size".to_string())?;
        Ok(RawDisk {
            storage,
            size,
            logical_sector_size: 512,
            read_only: options.read_only,
            // A raw file is all data, like a fixed image.
            discard: options.discard.unwrap_or(DiscardMode::Zero),
        })
    }

    /// Serves the file as a disk of 4096-byte sectors (a copy of a 4Kn drive), for tests
    /// and fuzzing of what depends on the sector size, such as partition tables.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn with_4k_sectors(mut self) -> Self {
        self.logical_sector_size = 4096;
        self
    }
}

impl VirtualDisk for RawDisk {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn logical_sector_size(&self) -> u32 {
        self.logical_sector_size
    }

    fn physical_sector_size(&self) -> u32 {
        self.logical_sector_size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        layer::read(self, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::new(ErrorKind::ReadOnly));
        }
        check_range(self.size, offset, buf.len())?;
        self.storage
            .write_at(buf, offset)
            .context(|| format!("writing {} bytes at offset {offset}", buf.len()))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.storage
            .flush()
            .context(|| "flushing image".to_string())
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        layer::allocation(self, offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        layer::discard(self, offset, len)
    }
}

impl Layer for RawDisk {
    fn map(&self, offset: u64, len: u64, runs: &mut Vec<MappedRun>) -> Result<()> {
        push_run(runs, len, Mapping::File(offset));
        Ok(())
    }

    fn read_mapped(&self, buf: &mut [u8], file_offset: u64) -> Result<()> {
        self.storage
            .read_at(buf, file_offset)
            .context(|| format!("reading {} bytes at offset {file_offset}", buf.len()))
    }

    fn zero_mapped(&self, file_offset: u64, len: u64) -> Result<()> {
        let unmap = self.discard == DiscardMode::Unmap;
        storage::zero_range(self.storage.as_ref(), file_offset, len, unmap)
            .context(|| format!("zeroing {len} bytes at offset {file_offset}"))
    }

    fn discard_mode(&self) -> DiscardMode {
        self.discard
    }

    fn facts(&self) -> LayerFacts {
        LayerFacts {
            subtype: "raw",
            ..LayerFacts::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn serves_the_file_byte_for_byte() {
        let disk = RawDisk::open(
            Box::new(MemStorage::from_vec(vec![0u8; 4096])),
            &OpenOptions::default(),
        )
        .unwrap();
        disk.write_at(b"abc", 4093).unwrap();
        let mut buf = [0u8; 4];
        disk.read_at(&mut buf, 4092).unwrap();
        assert_eq!(&buf, b"\0abc");
        assert!(disk.write_at(b"x", 4096).is_err());
        disk.discard(4094, 2).unwrap();
        disk.read_at(&mut buf, 4092).unwrap();
        assert_eq!(&buf, b"\0a\0\0");
    }

    #[test]
    fn read_only_refuses_writes() {
        let options = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let disk = RawDisk::open(Box::new(MemStorage::from_vec(vec![0u8; 512])), &options).unwrap();
        assert_eq!(disk.write_at(b"x", 0).unwrap_err().errno(), libc::EROFS);
    }
}

//! A plain file served as the disk, byte for byte. Never probed: only used when asked
//! (`format=raw`), as a baseline to measure the format drivers against.

use crate::disk::{Allocation, Extent, Format, OpenOptions, VirtualDisk, check_range};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::storage::{self, Storage};

pub struct RawDisk {
    storage: Box<dyn Storage>,
    size: u64,
    read_only: bool,
}

impl RawDisk {
    pub fn open(storage: Box<dyn Storage>, options: &OpenOptions) -> Result<Self> {
        let size = storage
            .len()
            .context(|| "cannot read file size".to_string())?;
        Ok(RawDisk {
            storage,
            size,
            read_only: options.read_only,
        })
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
        512
    }

    fn physical_sector_size(&self) -> u32 {
        512
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len())?;
        self.storage
            .read_at(buf, offset)
            .context(|| format!("reading {} bytes at offset {offset}", buf.len()))
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
        check_range(self.size, offset, len as usize)?;
        Ok(vec![Extent {
            offset,
            len,
            state: Allocation::Data,
        }])
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.size, offset, len as usize)?;
        storage::zero_chunks(offset, len, |zeros, at| self.write_at(zeros, at))
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

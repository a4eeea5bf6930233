//! Probe and dispatch: which driver serves a file, told by its signature, never by its
//! name. Used for every file the program opens: the image asked for, each parent the
//! chain module finds, and the images `vdisk` describes or creates children of.

use crate::disk::{Format, OpenOptions};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::layer::{Layer, MetadataBudget};
use crate::storage::Storage;

const VHDX_SIGNATURE: &[u8; 8] = b"vhdxfile";
const VHD_COOKIE: &[u8; 8] = b"conectix";

/// Tells the format from signatures: `vhdxfile` at 0 is VHDX; a `conectix` footer at the
/// end (512 or legacy 511 bytes) or its copy at 0 is VHD.
pub fn probe(storage: &dyn Storage) -> Result<Format> {
    let len = storage
        .len()
        .context(|| "cannot read file size".to_string())?;
    let mut head = [0u8; 8];
    if len >= 8 {
        storage
            .read_at(&mut head, 0)
            .context(|| "reading file signature".to_string())?;
        if &head == VHDX_SIGNATURE {
            return Ok(Format::Vhdx);
        }
        if &head == VHD_COOKIE {
            return Ok(Format::Vhd);
        }
    }
    for footer_len in [512u64, 511] {
        if len >= footer_len {
            let mut cookie = [0u8; 8];
            storage
                .read_at(&mut cookie, len - footer_len)
                .context(|| "reading VHD footer".to_string())?;
            if &cookie == VHD_COOKIE {
                return Ok(Format::Vhd);
            }
        }
    }
    Err(Error::new(ErrorKind::NotADiskImage))
}

/// Opens the one image file held by `storage` with the driver `options.format` names, else
/// the one its signature calls for. A differencing image comes back without its parent,
/// which it describes ([`Layer::parent_link`]); its metadata is charged to `budget`.
pub fn open_layer(
    storage: Box<dyn Storage>,
    options: &OpenOptions,
    budget: &MetadataBudget,
) -> Result<Box<dyn Layer>> {
    let format = match options.format {
        Some(format) => format,
        None => probe(storage.as_ref())?,
    };
    Ok(match format {
        Format::Vhd => Box::new(crate::vhd::VhdDisk::open_charged(storage, options, budget)?),
        Format::Vhdx => Box::new(crate::vhdx::VhdxDisk::open_charged(
            storage, options, budget,
        )?),
        Format::Raw => Box::new(crate::raw::RawDisk::open(storage, options)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn probe_reads_signatures_not_names() {
        let mut vhdx = vec![0u8; 4096];
        vhdx[..8].copy_from_slice(b"vhdxfile");
        assert_eq!(probe(&MemStorage::from_vec(vhdx)).unwrap(), Format::Vhdx);

        let mut fixed_vhd = vec![0u8; 4096];
        fixed_vhd[4096 - 512..4096 - 504].copy_from_slice(b"conectix");
        assert_eq!(
            probe(&MemStorage::from_vec(fixed_vhd)).unwrap(),
            Format::Vhd
        );

        let mut legacy = vec![0u8; 4096];
        legacy[4096 - 511..4096 - 503].copy_from_slice(b"conectix");
        assert_eq!(probe(&MemStorage::from_vec(legacy)).unwrap(), Format::Vhd);

        for junk in [
            vec![],
            vec![0u8; 3],
            b"hello world\n".to_vec(),
            vec![0u8; 8192],
        ] {
            let err = probe(&MemStorage::from_vec(junk)).unwrap_err();
            assert!(matches!(err.kind(), ErrorKind::NotADiskImage));
        }
    }
}

//! VHDX images. Not implemented yet.

use crate::disk::{OpenOptions, VirtualDisk};
use crate::error::{Error, Result};
use crate::storage::Storage;

pub fn open(_storage: Box<dyn Storage>, _options: &OpenOptions) -> Result<Box<dyn VirtualDisk>> {
    Err(Error::unsupported("VHDX is not supported yet"))
}

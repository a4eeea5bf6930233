//! What the fuzz targets share: an image file built from fuzzer bytes and held sparse in
//! memory, the encoding of those bytes, and the operations a target runs on a disk.
//!
//! An image is encoded as
//!
//! ```text
//! byte 0      flags: bit 0 seals every checksum after building, bit 1 opens read-only
//! bytes 1..5  u32 LE: file length in 512-byte units (at least what the chunks need)
//! bytes 5..7  u16 LE: number of chunks
//! chunks      u32 LE position in 512-byte units, from the start of the file or, with
//!             bit 31 set, back from its end (VHD footers); u16 LE length; the bytes
//! ```
//!
//! so that a few hundred bytes describe a file of any size (a VHDX needs at least 1 MiB,
//! and huge sparse files are part of what is tried), and mutations that break a
//! checksum do not stop the fuzzer at it.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::io;
use vdisk_mount::storage::Storage;

const PAGE: usize = 4096;
const UNIT: u64 = 512;
const FROM_END: u32 = 1 << 31;
/// Larger files than this are refused by the storage (EFBIG), as a filesystem would.
const MAX_FILE_LEN: u64 = 1 << 44;

/// A file whose pages exist only once something other than zeros was written to them.
#[derive(Default)]
pub struct SparseStorage {
    state: Mutex<Sparse>,
}

#[derive(Default)]
struct Sparse {
    pages: BTreeMap<u64, Box<[u8; PAGE]>>,
    len: u64,
}

impl SparseStorage {
    /// A copy of the file as it is now, for a second open.
    pub fn snapshot(&self) -> SparseStorage {
        let state = self.state.lock();
        SparseStorage {
            state: Mutex::new(Sparse {
                pages: state.pages.clone(),
                len: state.len,
            }),
        }
    }
}

fn end_of(offset: u64, len: usize) -> io::Result<u64> {
    offset
        .checked_add(len as u64)
        .filter(|&end| end <= MAX_FILE_LEN)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))
}

impl Storage for SparseStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let state = self.state.lock();
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= state.len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let mut at = offset;
        while at < end {
            let page = at / PAGE as u64;
            let in_page = (at % PAGE as u64) as usize;
            let n = (PAGE - in_page).min((end - at) as usize);
            let dst = &mut buf[(at - offset) as usize..][..n];
            match state.pages.get(&page) {
                Some(p) => dst.copy_from_slice(&p[in_page..in_page + n]),
                None => dst.fill(0),
            }
            at += n as u64;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = end_of(offset, buf.len())?;
        let mut state = self.state.lock();
        let mut at = offset;
        while at < end {
            let page = at / PAGE as u64;
            let in_page = (at % PAGE as u64) as usize;
            let n = (PAGE - in_page).min((end - at) as usize);
            let src = &buf[(at - offset) as usize..][..n];
            if let Some(p) = state.pages.get_mut(&page) {
                p[in_page..in_page + n].copy_from_slice(src);
            } else if src.iter().any(|&b| b != 0) {
                let mut p = Box::new([0u8; PAGE]);
                p[in_page..in_page + n].copy_from_slice(src);
                state.pages.insert(page, p);
            }
            at += n as u64;
        }
        state.len = state.len.max(end);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        end_of(len, 0)?;
        let mut state = self.state.lock();
        let first_gone = len.div_ceil(PAGE as u64);
        state.pages.split_off(&first_gone);
        if !len.is_multiple_of(PAGE as u64)
            && let Some(p) = state.pages.get_mut(&(len / PAGE as u64))
        {
            p[(len % PAGE as u64) as usize..].fill(0);
        }
        state.len = len;
        Ok(())
    }

    /// Whole pages are dropped, partial ones zeroed: as cheap as a real hole, so a huge
    /// range costs no more than the pages it held.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len).min(self.len()?);
        let mut state = self.state.lock();
        let first_whole = offset.div_ceil(PAGE as u64);
        let last_whole = end / PAGE as u64;
        let whole: Vec<u64> = state
            .pages
            .range(first_whole..last_whole.max(first_whole))
            .map(|(&page, _)| page)
            .collect();
        for page in whole {
            state.pages.remove(&page);
        }
        for (at, stop) in [
            (offset, (first_whole * PAGE as u64).min(end)),
            ((last_whole * PAGE as u64).max(offset), end),
        ] {
            if at < stop
                && let Some(p) = state.pages.get_mut(&(at / PAGE as u64))
            {
                let from = (at % PAGE as u64) as usize;
                p[from..from + (stop - at) as usize].fill(0);
            }
        }
        Ok(())
    }

    /// The pages it holds, as a filesystem reports what is not a hole: a huge file costs
    /// no more than the pages it held.
    fn data_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<std::ops::Range<u64>>> {
        let end = offset.saturating_add(len);
        let state = self.state.lock();
        let mut ranges: Vec<std::ops::Range<u64>> = Vec::new();
        let pages = state
            .pages
            .range(offset / PAGE as u64..end.div_ceil(PAGE as u64));
        for (&page, _) in pages {
            let at = (page * PAGE as u64).max(offset);
            let stop = ((page + 1) * PAGE as u64).min(end);
            match ranges.last_mut() {
                Some(last) if last.end == at => last.end = stop,
                _ => ranges.push(at..stop),
            }
        }
        Ok(ranges)
    }
}

/// Reads little-endian numbers off the front of fuzzer bytes; past the end, zeros.
pub struct Bytes<'a>(pub &'a [u8]);

impl<'a> Bytes<'a> {
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    pub fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let t = self.take(2);
        b[..t.len()].copy_from_slice(t);
        u16::from_le_bytes(b)
    }

    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let t = self.take(4);
        b[..t.len()].copy_from_slice(t);
        u32::from_le_bytes(b)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

pub struct Image {
    pub storage: SparseStorage,
    pub read_only: bool,
}

/// Builds the image encoded at the front of `bytes` (see the module documentation);
/// `bytes` keeps what follows it.
pub fn decode_image(bytes: &mut Bytes) -> Image {
    let flags = bytes.u8();
    let declared = u64::from(bytes.u32()) * UNIT;
    let count = bytes.u16();
    let mut chunks = Vec::new();
    for _ in 0..count {
        if bytes.is_empty() {
            break;
        }
        let position = bytes.u32();
        let len = usize::from(bytes.u16());
        chunks.push((position, bytes.take(len)));
    }
    let len = chunks
        .iter()
        .filter(|(position, _)| position & FROM_END == 0)
        .map(|(position, data)| u64::from(*position) * UNIT + data.len() as u64)
        .fold(declared, u64::max);
    let storage = SparseStorage::default();
    let _ = storage.set_len(len);
    for (position, data) in chunks {
        let at = if position & FROM_END == 0 {
            Some(u64::from(position) * UNIT)
        } else {
            len.checked_sub(u64::from(position & !FROM_END) * UNIT)
        };
        if let Some(at) = at {
            let _ = storage.write_at(data, at);
        }
    }
    if flags & 1 != 0 {
        vdisk_mount::seal_checksums_for_fuzzing(&storage);
    }
    Image {
        storage,
        read_only: flags & 2 != 0,
    }
}

/// Encodes `file` as an image (flags: seal checksums): its sectors that are not all zeros,
/// in file order until `budget` bytes are taken, and its last sector counted from the end.
pub fn encode_image(file: &[u8], budget: usize) -> Vec<u8> {
    let sector = UNIT as usize;
    let mut chunks: Vec<(u32, &[u8])> = Vec::new();
    let mut taken = 0;
    let mut i = 0;
    let body_end = file.len().saturating_sub(sector);
    while i < body_end && taken < budget {
        if file[i..(i + sector).min(body_end)].iter().all(|&b| b == 0) {
            i += sector;
            continue;
        }
        let start = i;
        while i < body_end
            && i - start < 32 * 1024
            && taken + (i - start) < budget
            && file[i..(i + sector).min(body_end)].iter().any(|&b| b != 0)
        {
            i += sector;
        }
        let end = i.min(body_end);
        chunks.push(((start / sector) as u32, &file[start..end]));
        taken += end - start;
    }
    if file.len() >= sector {
        chunks.push((FROM_END | 1, &file[file.len() - sector..]));
    }
    let mut out = vec![1u8];
    out.extend_from_slice(&((file.len() / sector) as u32).to_le_bytes());
    out.extend_from_slice(&(chunks.len() as u16).to_le_bytes());
    for (position, data) in chunks {
        out.extend_from_slice(&position.to_le_bytes());
        out.extend_from_slice(&(data.len() as u16).to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

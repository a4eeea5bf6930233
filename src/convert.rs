//! `vdisk convert`: any readable image (VHD, VHDX, raw, a differencing chain flattened, a
//! dirty VHDX read through its log without changing it) copied into a new image of any
//! format. Ranges that read as zeros are not written, so a sparse source gives a sparse
//! result; a fixed output is allocated on the host all the same (unless asked to stay
//! sparse), and any output can be. The new image is built under a hidden name beside the
//! destination and takes its name only once it is complete and durable, never replacing
//! an existing file.

use crate::create::{CreateOptions, HostAllocation, ImageType, azure_size, create};
use crate::disk::{Allocation, Format, OpenOptions, VirtualDisk};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::lock;
use serde::Serialize;
use std::ffi::CString;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// Bytes read and written at a time.
const CHUNK: u64 = 4 << 20;
/// Most of the disk whose allocation is asked at once.
const WINDOW: u64 = 1 << 36;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertOptions {
    /// `None`: from the destination's name (`.vhd`, `.vhdx`, `.img`/`.raw`), else VHDX.
    pub format: Option<Format>,
    /// `None`: dynamic.
    pub image_type: Option<ImageType>,
    /// `None`: the format's usual block size.
    pub block_size: Option<u32>,
    /// Round the disk size up to a whole MiB, as Azure requires of fixed VHDs.
    pub azure: bool,
    /// Leave a fixed output's unwritten data area unallocated on the host (holes).
    pub sparse: bool,
    /// Allocate the whole output file on the host, whatever its type, so no copy of it
    /// can arrive sparse.
    pub preallocate: bool,
}

/// How far a conversion has come: bytes of the disk looked at, of all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConvertReport {
    pub source: String,
    pub source_format: String,
    pub destination: String,
    pub format: String,
    pub disk_size: u64,
    /// Bytes of data written into the new image (ranges of zeros are skipped).
    pub bytes_written: u64,
    #[serde(flatten)]
    pub host: HostAllocation,
    /// What other programs may refuse in the new image.
    pub warnings: Vec<String>,
}

impl fmt::Display for ConvertReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} ({}) -> {} ({}, {} disk, {} of data written; {})",
            self.source,
            self.source_format,
            self.destination,
            self.format,
            crate::compact::human(self.disk_size),
            crate::compact::human(self.bytes_written),
            self.host
        )
    }
}

/// The format a destination's name asks for.
fn format_from_name(path: &Path) -> Option<Format> {
    match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "vhd" => Some(Format::Vhd),
        "vhdx" => Some(Format::Vhdx),
        "img" | "raw" => Some(Format::Raw),
        _ => None,
    }
}

/// Converts the image at `src` (with its parents) into a new image at `dst`.
pub fn convert(
    src: &Path,
    dst: &Path,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ConvertReport> {
    // Shared, as a read-only mount takes it: no writer changes the source meanwhile.
    let _locked = lock::open_locked(src, true).map_err(|e| e.with_file(src))?;
    let read_only = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    // A file with no image signature is a raw disk, as for qemu-img: only read here, so
    // nothing is risked by the guess.
    let source = match crate::open(src, &read_only) {
        Err(e) if matches!(e.kind(), ErrorKind::NotADiskImage) => crate::open(
            src,
            &OpenOptions {
                format: Some(Format::Raw),
                ..read_only
            },
        )?,
        opened => opened?,
    };
    if std::fs::symlink_metadata(dst).is_ok() {
        return Err(Error::invalid_input(format!(
            "{}: already exists; convert never replaces a file",
            dst.display()
        )));
    }
    let format = options
        .format
        .or_else(|| format_from_name(dst))
        .unwrap_or(Format::Vhdx);
    let size = match options.azure {
        true => azure_size(source.size())?,
        false => source.size(),
    };
    let partial = partial_name(dst)?;
    let built = build(source.as_ref(), &partial, format, size, options, progress);
    let (bytes_written, warnings) = match built {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e.with_file(dst));
        }
    };
    if let Err(e) = rename_no_replace(&partial, dst) {
        let _ = std::fs::remove_file(&partial);
        return Err(Error::io("giving the new image its name", e).with_file(dst));
    }
    Ok(ConvertReport {
        source: src.display().to_string(),
        source_format: source.format().to_string(),
        destination: dst.display().to_string(),
        format: format.to_string(),
        disk_size: size,
        bytes_written,
        host: HostAllocation::of(dst)?,
        warnings,
    })
}

/// A hidden name beside `dst` for the image while it is built.
fn partial_name(dst: &Path) -> Result<PathBuf> {
    let name = dst
        .file_name()
        .ok_or_else(|| Error::invalid_input(format!("{}: not a file name", dst.display())))?;
    Ok(dst.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Makes the new image at `path` and copies every range of `source` that holds anything
/// but zeros; returns the bytes written and the warnings the new image earned. The image
/// is flushed and closed.
fn build(
    source: &dyn VirtualDisk,
    path: &Path,
    format: Format,
    size: u64,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(u64, Vec<String>)> {
    let warnings = match format {
        Format::Raw => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .context(|| "cannot create image".to_string())?;
            file.set_len(size)
                .context(|| "sizing the new image".to_string())?;
            Vec::new()
        }
        _ => {
            create(
                path,
                &CreateOptions {
                    format: Some(format),
                    image_type: options.image_type,
                    size: Some(size),
                    block_size: options.block_size,
                    logical_sector_size: (format == Format::Vhdx)
                        .then_some(source.logical_sector_size()),
                    sparse: options.sparse,
                    ..CreateOptions::default()
                },
            )?
            .warnings
        }
    };
    let target = crate::open(
        path,
        &OpenOptions {
            format: Some(format),
            ..OpenOptions::default()
        },
    )?;
    let written = copy_data(source, target.as_ref(), progress)?;
    target.close()?;
    drop(target);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .context(|| "reopening the new image".to_string())?;
    if options.preallocate {
        let len = file
            .metadata()
            .context(|| "cannot read file attributes".to_string())?
            .len();
        crate::storage::allocate(&file, len)
            .context(|| "allocating the image on the host".to_string())?;
    }
    file.sync_all()
        .context(|| "flushing the new image".to_string())?;
    Ok((written, warnings))
}

/// Copies what `source` holds into `target`, skipping ranges the source maps as zeros
/// and pages that read as zeros (the new image reads zeros there already, and a dynamic
/// one allocates no block for them). A reader thread keeps up to `BUFFERS` chunks read
/// ahead, so reading the source and writing the target overlap instead of taking turns.
fn copy_data(
    source: &dyn VirtualDisk,
    target: &dyn VirtualDisk,
    progress: &mut dyn FnMut(&Progress),
) -> Result<u64> {
    const BUFFERS: usize = 4;
    let size = source.size();
    let (full_tx, full_rx) = mpsc::sync_channel::<Result<(u64, Vec<u8>)>>(BUFFERS);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        empty_tx
            .send(vec![0u8; CHUNK as usize])
            .expect("receiver alive");
    }
    std::thread::scope(|scope| {
        // Owned here so a writer that stops early drops it, ending a reader that waits
        // for a buffer.
        let empty_tx = empty_tx;
        scope.spawn(move || {
            // Ends when every chunk is sent, on the first error (sent on), or when the
            // writer has stopped (its receivers are gone).
            let read_all = || -> Result<()> {
                let mut window = 0;
                while window < size {
                    let window_len = (size - window).min(WINDOW);
                    for extent in source.allocation(window, window_len)? {
                        if extent.state != Allocation::Data {
                            continue;
                        }
                        let mut at = extent.offset;
                        while at < extent.offset + extent.len {
                            let n = (extent.offset + extent.len - at).min(CHUNK) as usize;
                            let Ok(mut buf) = empty_rx.recv() else {
                                return Ok(());
                            };
                            buf.resize(n, 0);
                            source.read_at(&mut buf, at)?;
                            if full_tx.send(Ok((at, buf))).is_err() {
                                return Ok(());
                            }
                            at += n as u64;
                        }
                    }
                    window += window_len;
                }
                Ok(())
            };
            if let Err(e) = read_all() {
                let _ = full_tx.send(Err(e));
            }
        });
        let mut written = 0;
        for chunk in full_rx {
            let (at, buf) = chunk?;
            for (start, end) in data_runs(&buf) {
                target.write_at(&buf[start..end], at + start as u64)?;
                written += (end - start) as u64;
            }
            progress(&Progress {
                done: at + buf.len() as u64,
                total: size,
            });
            // The reader may have finished and dropped its receiver.
            let _ = empty_tx.send(buf);
        }
        progress(&Progress {
            done: size,
            total: size,
        });
        Ok(written)
    })
}

/// The runs of whole 4 KiB pieces of `buf` that hold anything but zeros.
fn data_runs(buf: &[u8]) -> Vec<(usize, usize)> {
    const PIECE: usize = 4096;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, piece) in buf.chunks(PIECE).enumerate() {
        if piece.iter().all(|&b| b == 0) {
            continue;
        }
        let (start, end) = (i * PIECE, i * PIECE + piece.len());
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// Renames `from` to `to` unless `to` exists, in one step.
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both are NUL-terminated strings that outlive the call.
    let done = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    match done {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;
    use std::sync::Arc;

    #[test]
    fn data_runs_skip_pages_of_zeros_and_merge_neighbours() {
        let mut buf = vec![0u8; 5 * 4096 + 100];
        buf[10] = 1;
        buf[4096 + 7] = 1;
        buf[3 * 4096] = 1;
        buf[5 * 4096 + 99] = 1;
        assert_eq!(
            data_runs(&buf),
            vec![
                (0, 2 * 4096),
                (3 * 4096, 4 * 4096),
                (5 * 4096, 5 * 4096 + 100)
            ]
        );
        assert!(data_runs(&[0u8; 8192]).is_empty());
    }

    fn raw_disk(storage: &Arc<MemStorage>) -> Box<dyn VirtualDisk> {
        let options = OpenOptions {
            format: Some(Format::Raw),
            ..OpenOptions::default()
        };
        crate::open_storage(Box::new(storage.clone()), &options).unwrap()
    }

    #[test]
    fn copy_data_copies_every_chunk_and_skips_zero_pages() {
        let size = 11 * CHUNK as usize + 4096 * 3;
        let mut data = vec![0u8; size];
        for (i, byte) in data.iter_mut().enumerate() {
            // Pages of zeros between pages of data, in every chunk.
            if (i / 4096) % 3 != 1 {
                *byte = (i % 251) as u8 + 1;
            }
        }
        let source = Arc::new(MemStorage::from_vec(data.clone()));
        let target = Arc::new(MemStorage::from_vec(vec![0u8; size]));
        let written = copy_data(&*raw_disk(&source), &*raw_disk(&target), &mut |_| {}).unwrap();
        assert_eq!(target.contents(), data);
        assert_eq!(
            written,
            data.chunks(4096).filter(|p| p[0] != 0).count() as u64 * 4096
        );
    }

    #[test]
    fn copy_data_stops_on_the_first_read_or_write_error() {
        let size = 16 * CHUNK as usize;
        let source = Arc::new(MemStorage::from_vec(vec![7u8; size]));
        let target = Arc::new(MemStorage::from_vec(vec![0u8; size]));
        target.fail_writes_after(2, libc::EIO);
        let error = copy_data(&*raw_disk(&source), &*raw_disk(&target), &mut |_| {});
        assert!(error.is_err(), "a failed write ends the copy");

        target.clear_faults();
        source.fail_reads(libc::EIO);
        let error = copy_data(&*raw_disk(&source), &*raw_disk(&target), &mut |_| {});
        assert!(error.is_err(), "a failed read ends the copy");
    }
}

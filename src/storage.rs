//! The only way drivers reach an image file.
//!
//! Drivers see a [`Storage`]: positional reads and writes, flush, length. In production it
//! is a [`FileStorage`] (pread/pwrite/fdatasync on one file descriptor, no shared seek
//! offset); in tests it is a `MemStorage`, which can fail requests on demand and simulate
//! a power loss that keeps only what was flushed (plus any chosen part of what was not).
//!
//! A daemon killed in the middle of a write (SIGKILL, the OOM killer) must leave every
//! sector of the image holding its old or its new content, as a disk would. Linux copies a
//! write into the page cache with page faults disabled; at the first source page that is
//! not mapped yet it stops, commits what it copied, and checks for a pending kill before
//! faulting the page in. A kill there cuts the write wherever that page begins in the
//! source, which for a buffer at an arbitrary address is not a sector boundary of the file.
//! Two things keep the cut on sector boundaries: [`FileStorage`] maps every source page
//! before it writes, and zeros come from [`zero_chunks`], whose pages begin where file
//! pages do.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

/// Positional access to one image file. All methods take `&self`: implementations must be
/// safe to call from many threads at once.
// An image file is never "empty" in a useful sense; `len` is its size, not a count.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync {
    /// Fills `buf` from `offset`; reading past the end of the file is an error
    /// (`UnexpectedEof`), never a short read.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file (with zeros in any gap).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeros, giving its space back to the host's
    /// filesystem where it can (a hole); the file keeps its length. Durable like a write.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(self, offset, len)
    }
    /// Says `[offset, offset + len)` will be read soon, so the host can start reading it
    /// in the background. Only a hint.
    fn will_need(&self, _offset: u64, _len: u64) {}
    /// Copies `len` bytes at `from` to `to` (ranges apart); what reads as zeros in the
    /// source may become a hole in the target. Durable like a write.
    fn copy_within(&self, from: u64, to: u64, len: u64) -> io::Result<()> {
        copy_through_memory(self, from, to, len)
    }
    /// The parts of `[offset, offset + len)` that take space on the host, in order: all
    /// but its holes. A storage that cannot tell counts the pages holding anything but
    /// zeros.
    fn data_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        nonzero_pages(self, offset, len)
    }
}

/// Lets tests keep a handle on a storage (to inject faults or simulate power loss) while a
/// driver owns it.
impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }

    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }

    fn will_need(&self, offset: u64, len: u64) {
        (**self).will_need(offset, len)
    }

    fn copy_within(&self, from: u64, to: u64, len: u64) -> io::Result<()> {
        (**self).copy_within(from, to, len)
    }

    fn data_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        (**self).data_ranges(offset, len)
    }
}

thread_local! {
    /// Set while this thread runs inside [`cached_reads_only`].
    static CACHED_READS_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every [`FileStorage`] read on this thread limited to what the page cache
/// holds: a read that would have to wait for the disk fails at once with
/// [`io::ErrorKind::WouldBlock`] (`EAGAIN`) instead. A caller with few threads can so serve
/// cached data itself and pass only reads that must wait to threads that may block.
/// Where the filesystem cannot tell (no `RWF_NOWAIT`: FUSE, some network filesystems)
/// every read counts as one that would wait, as it well may.
pub fn cached_reads_only<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            CACHED_READS_ONLY.set(self.0);
        }
    }
    let _reset = Reset(CACHED_READS_ONLY.replace(true));
    f()
}

/// A real file.
pub struct FileStorage {
    file: File,
    /// The file's filesystem refused `RWF_NOWAIT`.
    nowait_unsupported: AtomicBool,
}

impl FileStorage {
    pub fn new(file: File) -> Self {
        FileStorage {
            file,
            nowait_unsupported: AtomicBool::new(false),
        }
    }

    /// Reads from the page cache alone, as [`cached_reads_only`] describes.
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let would_block = || Err(io::Error::from_raw_os_error(libc::EAGAIN));
        if self.nowait_unsupported.load(Ordering::Relaxed) {
            return would_block();
        }
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            };
            let at = libc::off_t::try_from(offset + done as u64)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: `iov` describes `rest`, which stays borrowed for the call.
            let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
            match n {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n if n > 0 => done += n as usize,
                _ => {
                    let err = io::Error::last_os_error();
                    match err.raw_os_error() {
                        Some(libc::EINTR) => {}
                        Some(libc::EAGAIN) => return would_block(),
                        Some(libc::EOPNOTSUPP) => {
                            self.nowait_unsupported.store(true, Ordering::Relaxed);
                            return would_block();
                        }
                        _ => return Err(err),
                    }
                }
            }
        }
        Ok(())
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Where the next data (`SEEK_DATA`) or hole (`SEEK_HOLE`) at or after `offset` starts;
    /// `None` when there is no more data. Only a query: every read and write names its own
    /// offset, so the descriptor's position is never used.
    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let at =
            libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: a plain syscall on a descriptor this storage keeps open.
        match unsafe { libc::lseek(self.file.as_raw_fd(), at, whence) } {
            -1 => match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                e => Err(e),
            },
            found => Ok(Some(found as u64)),
        }
    }

    /// Copies `len` bytes from `from` to `to` of this file inside the kernel.
    fn copy_range(&self, from: u64, to: u64, len: u64) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let (mut from, mut to) = (
            libc::loff_t::try_from(from).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?,
            libc::loff_t::try_from(to).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?,
        );
        let mut left = len;
        while left > 0 {
            let n = usize::try_from(left.min(1 << 30)).unwrap_or(1 << 30);
            // SAFETY: both offsets are valid pointers to locals; the descriptor is open.
            let copied = unsafe { libc::copy_file_range(fd, &mut from, fd, &mut to, n, 0) };
            match copied {
                -1 => return Err(io::Error::last_os_error()),
                0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                n => left -= n as u64,
            }
        }
        Ok(())
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if CACHED_READS_ONLY.get() {
            return self.read_cached(buf, offset);
        }
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        map_pages(buf);
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    /// A hole where the filesystem has them; zeros written where it has not.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(at), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        };
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: a plain syscall on a descriptor this storage keeps open.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, at, n) } == 0 {
            return Ok(());
        }
        match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::EOPNOTSUPP) => write_zeros(self, offset, len),
            e => Err(e),
        }
    }

    /// The data runs of the source (holes found with `SEEK_DATA`/`SEEK_HOLE`) copied by
    /// the kernel (`copy_file_range`: no trip through this process, and a shared extent on
    /// filesystems that can); the target's other pages become holes. Falls back to a copy
    /// through memory where the filesystem offers neither.
    fn copy_within(&self, from: u64, to: u64, len: u64) -> io::Result<()> {
        zero_range(self, to, len, true)?;
        let end = from + len;
        for data in self.data_ranges(from, len)? {
            if let Err(e) =
                self.copy_range(data.start, to + (data.start - from), data.end - data.start)
            {
                return match e.raw_os_error() {
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                        let at = data.start;
                        copy_through_memory(self, at, to + (at - from), end - at)
                    }
                    _ => Err(e),
                };
            }
        }
        Ok(())
    }

    /// Found with `SEEK_DATA` and `SEEK_HOLE`; a filesystem without holes has data
    /// everywhere.
    fn data_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        let end = offset.saturating_add(len);
        let mut ranges = Vec::new();
        let mut at = offset;
        while at < end {
            let Some(data) = self.seek(at, libc::SEEK_DATA)?.filter(|&d| d < end) else {
                break;
            };
            let hole = self.seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            ranges.push(data..hole);
            at = hole;
        }
        Ok(ranges)
    }

    fn will_need(&self, offset: u64, len: u64) {
        if let (Ok(at), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
            // SAFETY: a plain syscall on a descriptor this storage keeps open. A failed
            // hint changes nothing.
            unsafe { libc::posix_fadvise(self.file.as_raw_fd(), at, n, libc::POSIX_FADV_WILLNEED) };
        }
    }
}

/// Bytes one thread copies at a time in [`copy_sparse`].
const COPY_PIECE: u64 = 4 << 20;

/// Copies each `(from, to, len)` range to its new place in the same file, the ranges all
/// apart, as [`Storage::copy_within`] does. Pieces are copied by several threads at once:
/// a copy costs processor time, which one thread cannot keep up with.
pub fn copy_sparse(storage: &dyn Storage, copies: &[(u64, u64, u64)]) -> io::Result<()> {
    let pieces: Vec<(u64, u64, u64)> = copies
        .iter()
        .flat_map(|&(from, to, len)| {
            (0..len.div_ceil(COPY_PIECE)).map(move |i| {
                let at = i * COPY_PIECE;
                (from + at, to + at, (len - at).min(COPY_PIECE))
            })
        })
        .collect();
    for &(from, _, len) in &pieces {
        storage.will_need(from, len);
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(pieces.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(from, to, len)) = pieces.get(i) else {
                            return Ok(());
                        };
                        storage.copy_within(from, to, len)?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|worker| worker.join().expect("copy threads do not panic"))
    })
}

/// [`Storage::copy_within`] by reading into memory: whole target pages that would get
/// only zeros become holes instead.
fn copy_through_memory<S: Storage + ?Sized>(
    storage: &S,
    from: u64,
    to: u64,
    len: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; len.min(COPY_PIECE) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(COPY_PIECE) as usize;
        let (from, to, buf) = (from + done, to + done, &mut buf[..n]);
        zero_range(storage, to, n as u64, true)?;
        storage.read_at(buf, from)?;
        let mut at = 0usize;
        while at < n {
            let target = to + at as u64;
            let end = (at + (PAGE - (target % PAGE as u64) as usize)).min(n);
            if buf[at..end].iter().all(|&b| b == 0) {
                at = end;
                continue;
            }
            // Runs of pages with data go down in one request.
            let mut run_end = end;
            while run_end < n {
                let next = (run_end + PAGE).min(n);
                if buf[run_end..next].iter().all(|&b| b == 0) {
                    break;
                }
                run_end = next;
            }
            storage.write_at(&buf[at..run_end], target)?;
            at = run_end;
        }
        done += n as u64;
    }
    Ok(())
}

/// The pages of `[offset, offset + len)` (cut to it) holding anything but zeros, merged
/// where they touch: [`Storage::data_ranges`] of a storage that knows no holes.
fn nonzero_pages<S: Storage + ?Sized>(
    storage: &S,
    offset: u64,
    len: u64,
) -> io::Result<Vec<Range<u64>>> {
    let end = offset.saturating_add(len);
    let mut ranges: Vec<Range<u64>> = Vec::new();
    let mut buf = vec![0u8; COPY_PIECE as usize];
    let mut at = offset;
    while at < end {
        let n = (end - at).min(COPY_PIECE) as usize;
        storage.read_at(&mut buf[..n], at)?;
        let mut page_at = at;
        while page_at < at + n as u64 {
            let page_end = (page_at / PAGE as u64 + 1) * PAGE as u64;
            let page = page_at..page_end.min(at + n as u64);
            let bytes = &buf[(page.start - at) as usize..(page.end - at) as usize];
            if bytes.iter().any(|&b| b != 0) {
                match ranges.last_mut() {
                    Some(last) if last.end == page.start => last.end = page.end,
                    _ => ranges.push(page.clone()),
                }
            }
            page_at = page.end;
        }
        at += n as u64;
    }
    Ok(ranges)
}

/// Smallest page size Linux uses; touching one byte per 4 KiB maps every page of any
/// larger size too.
const PAGE: usize = 4096;

/// Touches one byte of every page `buf` spans, so the kernel finds them all mapped when it
/// copies from them (see the module documentation). A fresh allocation, whose pages the
/// allocator has not touched, is the usual case.
fn map_pages(buf: &[u8]) {
    let skew = buf.as_ptr() as usize % PAGE;
    let first_page_end = PAGE - skew;
    for i in std::iter::once(0).chain((first_page_end..buf.len()).step_by(PAGE)) {
        if let Some(byte) = buf.get(i) {
            // SAFETY: `byte` is a valid reference; the volatile read only keeps the
            // compiler from dropping a load whose value is unused.
            unsafe { std::ptr::read_volatile(byte) };
        }
    }
}

/// Largest piece of zeros [`zero_chunks`] hands out.
pub const ZERO_CHUNK: usize = 1 << 20;

#[repr(C, align(4096))]
struct PageAlignedZeros([u8; ZERO_CHUNK + PAGE]);

static ZEROS: PageAlignedZeros = PageAlignedZeros([0; ZERO_CHUNK + PAGE]);

/// Calls `write(zeros, at)` for consecutive pieces covering `len` bytes from `offset`, with
/// no allocation. Each piece of zeros starts at the same offset within a page as `at` does,
/// so a write of it that a kill cuts short ends on a sector boundary of the file even when
/// the pages were never touched. That holds for an `at` that is a virtual disk offset too,
/// since every format places blocks at sector-aligned file offsets.
pub fn zero_chunks<E>(
    offset: u64,
    len: u64,
    mut write: impl FnMut(&'static [u8], u64) -> Result<(), E>,
) -> Result<(), E> {
    let end = offset.saturating_add(len);
    let mut at = offset;
    while at < end {
        let skew = (at % PAGE as u64) as usize;
        let n = (end - at).min(ZERO_CHUNK as u64) as usize;
        write(&ZEROS.0[skew..skew + n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Writes `len` zero bytes at `offset` of `storage`.
pub fn write_zeros<S: Storage + ?Sized>(storage: &S, offset: u64, len: u64) -> io::Result<()> {
    zero_chunks(offset, len, |zeros, at| storage.write_at(zeros, at))
}

/// Makes `[offset, offset + len)` of `storage` read as zeros: with `unmap`, the whole pages
/// inside it become a hole and only the partial pages at its edges are written; without,
/// every byte is written (the host keeps the space allocated).
pub fn zero_range<S: Storage + ?Sized>(
    storage: &S,
    offset: u64,
    len: u64,
    unmap: bool,
) -> io::Result<()> {
    let end = offset.saturating_add(len);
    let (first, last) = (
        offset.next_multiple_of(PAGE as u64),
        end / PAGE as u64 * PAGE as u64,
    );
    if !unmap || first >= last {
        return write_zeros(storage, offset, len);
    }
    write_zeros(storage, offset, first - offset)?;
    storage.punch_hole(first, last - first)?;
    write_zeros(storage, last, end - last)
}

/// Gives every byte of `file` up to `len` space on the host, extending the file to `len`
/// if it is shorter and keeping what it holds: `posix_fallocate`, which on filesystems
/// without `fallocate` writes a zero byte into each block that reads as zero. Space
/// reserved this way reads as zeros and counts in the file's allocated size (`st_blocks`),
/// though ext4 and xfs report it as holes to `SEEK_HOLE` until it is written.
pub fn allocate(file: &File, len: u64) -> io::Result<()> {
    let Ok(n) = libc::off_t::try_from(len) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    if n == 0 {
        return Ok(());
    }
    // SAFETY: a plain call on a descriptor the caller keeps open.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, n) } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

#[cfg(test)]
mod crashing;
#[cfg(test)]
mod memory;
#[cfg(test)]
pub use crashing::Crashing;
#[cfg(test)]
pub use memory::{MemStorage, PendingOp, Survives};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_end_fail_instead_of_returning_short() {
        let s = MemStorage::from_vec(vec![1; 10]);
        let mut buf = [0u8; 4];
        assert_eq!(
            s.read_at(&mut buf, 8).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        s.read_at(&mut buf, 6).unwrap();
        assert_eq!(buf, [1; 4]);
    }

    #[test]
    fn writes_past_end_extend_with_zeros() {
        let s = MemStorage::new();
        s.write_at(&[7, 7], 4).unwrap();
        assert_eq!(s.contents(), vec![0, 0, 0, 0, 7, 7]);
    }

    #[test]
    fn power_loss_keeps_only_flushed_data() {
        let s = MemStorage::new();
        s.write_at(&[1; 4], 0).unwrap();
        s.flush().unwrap();
        s.write_at(&[2; 4], 2).unwrap();
        assert_eq!(s.power_loss_dropping_unflushed().contents(), vec![1; 4]);
        let torn = s.power_loss(|_, _| Survives::Prefix(1));
        assert_eq!(torn.contents(), vec![1, 1, 2, 1]);
        let all = s.power_loss(|_, _| Survives::Everything);
        assert_eq!(all.contents(), vec![1, 1, 2, 2, 2, 2]);
    }

    #[test]
    fn injected_faults_fail_requests_and_change_nothing() {
        let s = MemStorage::from_vec(vec![0; 8]);
        s.fail_writes_after(1, libc::ENOSPC);
        s.write_at(&[1], 0).unwrap();
        let err = s.write_at(&[2], 1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(s.contents()[..2], [1, 0]);
        s.fail_flushes(libc::EIO);
        assert!(s.flush().is_err());
        s.clear_faults();
        s.write_at(&[2], 1).unwrap();
        s.flush().unwrap();
        assert_eq!(s.flush_count(), 1);
    }

    #[test]
    fn file_storage_round_trips() {
        let file = tempfile::tempfile().unwrap();
        let s = FileStorage::new(file);
        s.write_at(b"hello", 3).unwrap();
        assert_eq!(s.len().unwrap(), 8);
        let mut buf = [0u8; 5];
        s.read_at(&mut buf, 3).unwrap();
        assert_eq!(&buf, b"hello");
        s.set_len(4).unwrap();
        assert!(s.read_at(&mut buf, 0).is_err());
        s.flush().unwrap();
    }

    #[test]
    fn allocation_fills_holes_and_keeps_what_the_file_holds() {
        use std::os::unix::fs::MetadataExt;
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(b"kept", 5 << 20).unwrap();
        file.set_len(8 << 20).unwrap();
        assert!(file.metadata().unwrap().blocks() * 512 < 1 << 20);
        allocate(&file, 12 << 20).unwrap();
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), 12 << 20, "extended to the length asked");
        assert!(
            meta.blocks() * 512 >= 12 << 20,
            "{} bytes",
            meta.blocks() * 512
        );
        let mut buf = [1u8; 8];
        file.read_exact_at(&mut buf, (5 << 20) - 4).unwrap();
        assert_eq!(&buf, b"\0\0\0\0kept");
        allocate(&file, 0).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 12 << 20);
    }

    #[test]
    fn zero_chunks_cover_the_range_with_pages_congruent_to_the_file() {
        for (offset, len) in [
            (0, 1),
            (511, 2 * ZERO_CHUNK as u64 + 3),
            (4096 * 7 + 100, 9000),
        ] {
            let mut next = offset;
            zero_chunks::<()>(offset, len, |zeros, at| {
                assert_eq!(at, next);
                assert!(zeros.iter().all(|&b| b == 0));
                assert!(zeros.len() <= ZERO_CHUNK);
                assert_eq!(zeros.as_ptr() as u64 % PAGE as u64, at % PAGE as u64);
                next += zeros.len() as u64;
                Ok(())
            })
            .unwrap();
            assert_eq!(next, offset + len);
        }
        let s = MemStorage::from_vec(vec![7; 6000]);
        write_zeros(&s, 1000, 4000).unwrap();
        let mut buf = vec![0u8; 6000];
        s.read_at(&mut buf, 0).unwrap();
        assert!(buf[..1000].iter().chain(&buf[5000..]).all(|&b| b == 7));
        assert!(buf[1000..5000].iter().all(|&b| b == 0));
    }

    #[test]
    fn copies_keep_the_source_holes_and_match_through_memory_too() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        let mib = 1usize << 20;
        // Source: 3 MiB of data with a 1 MiB hole in the middle; target: 8 MiB of junk.
        let mut contents: Vec<u8> = (0..12 * mib).map(|i| (i % 251) as u8 | 1).collect();
        contents[mib..2 * mib].fill(0);
        std::fs::write(&path, &contents).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let storage = FileStorage::new(file);
        storage.punch_hole(mib as u64, mib as u64).unwrap();
        let blocks = || std::fs::metadata(&path).unwrap().blocks() * 512;
        let before = blocks();
        let (target, memory_target) = (4 * mib as u64, 8 * mib as u64);
        copy_sparse(&storage, &[(0, target, 3 * mib as u64)]).unwrap();
        copy_through_memory(&storage, 0, memory_target, 3 * mib as u64).unwrap();
        let mut found = vec![0u8; 12 * mib];
        storage.read_at(&mut found, 0).unwrap();
        for at in [target as usize, memory_target as usize] {
            assert!(
                found[at..at + 3 * mib] == contents[..3 * mib],
                "copy at {at}"
            );
        }
        // Each target's middle MiB, junk before, is a hole now, as in the source.
        assert!(
            before - blocks() >= 2 * mib as u64 - 64 * 1024,
            "{before} -> {}",
            blocks()
        );
    }

    #[test]
    fn data_ranges_are_what_is_not_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        let page = PAGE as u64;
        std::fs::write(&path, vec![0xAB; 64 * PAGE]).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let storage = FileStorage::new(file);
        storage.punch_hole(16 * page, 32 * page).unwrap();
        let all = storage.data_ranges(0, 64 * page).unwrap();
        let inside = storage.data_ranges(8 * page + 5, 16 * page).unwrap();
        // Filesystems allocate in blocks of their own size: compare at 64 KiB.
        let coarse = |ranges: &[Range<u64>]| -> Vec<(u64, u64)> {
            ranges
                .iter()
                .map(|r| (r.start / 16 / page, r.end.div_ceil(16 * page)))
                .collect()
        };
        assert_eq!(coarse(&all), [(0, 1), (3, 4)]);
        assert_eq!(inside.len(), 1);
        assert_eq!(inside[0], 8 * page + 5..16 * page);
        // Without holes: pages holding anything but zeros.
        let mut bytes = vec![0u8; 10 * PAGE];
        bytes[PAGE + 7] = 1;
        bytes[3 * PAGE..5 * PAGE].fill(2);
        let memory = MemStorage::from_vec(bytes);
        assert_eq!(
            memory.data_ranges(100, 10 * page - 200).unwrap(),
            [page..2 * page, 3 * page..5 * page]
        );
    }

    #[test]
    fn zero_range_unmaps_whole_pages_and_writes_the_edges() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        std::fs::write(&path, vec![0xAB; 1 << 20]).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let storage = FileStorage::new(file);
        let blocks = || std::fs::metadata(&path).unwrap().blocks();
        let before = blocks();
        zero_range(&storage, 100, 512 << 10, true).unwrap();
        let mut data = vec![0u8; 1 << 20];
        storage.read_at(&mut data, 0).unwrap();
        assert!(data[..100].iter().all(|&b| b == 0xAB));
        assert!(data[100..100 + (512 << 10)].iter().all(|&b| b == 0));
        assert!(data[100 + (512 << 10)..].iter().all(|&b| b == 0xAB));
        assert_eq!(storage.len().unwrap(), 1 << 20);
        // Every whole page inside went back to the filesystem (512-byte units).
        assert!(
            before - blocks() >= (508 << 10) / 512,
            "{before} -> {}",
            blocks()
        );
        // Without unmap, zeros are written and the space stays.
        let kept = blocks();
        zero_range(&storage, 600 << 10, 256 << 10, false).unwrap();
        assert_eq!(blocks(), kept);
        storage.read_at(&mut data, 0).unwrap();
        assert!(data[600 << 10..856 << 10].iter().all(|&b| b == 0));
    }

    #[test]
    fn cached_reads_only_fail_fast_where_the_page_cache_lacks_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        file.sync_all().unwrap();
        let fd = file.as_raw_fd();
        // SAFETY: a plain syscall on an open descriptor into a zeroed struct it fills.
        let on_tmpfs = unsafe {
            let mut fs: libc::statfs = std::mem::zeroed();
            assert_eq!(libc::fstatfs(fd, &mut fs), 0);
            fs.f_type == libc::TMPFS_MAGIC
        };
        let storage = FileStorage::new(file);
        let mut buf = vec![0u8; 8192];
        if !on_tmpfs {
            // Clean pages dropped: the data is on the disk only. The kernel may keep a page
            // it is still writing back or reading ahead, so the drop is retried; some
            // attempt must see the read refused.
            let refused = (0..50).any(|_| {
                // SAFETY: a plain syscall on an open descriptor.
                let dropped = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
                assert_eq!(dropped, 0);
                match cached_reads_only(|| storage.read_at(&mut buf, 65536)) {
                    Err(e) => {
                        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                        true
                    }
                    Ok(()) => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        false
                    }
                }
            });
            assert!(refused, "every read was served from the page cache");
        }
        storage.read_at(&mut buf, 65536).unwrap();
        assert_eq!(buf, data[65536..65536 + 8192]);
        buf.fill(0);
        cached_reads_only(|| storage.read_at(&mut buf, 65536)).unwrap();
        assert_eq!(buf, data[65536..65536 + 8192]);
        // Past the end is an error of its own, not a read that would wait.
        let tail = data.len() as u64 - 10;
        storage.read_at(&mut [0u8; 10], tail).unwrap();
        let err =
            cached_reads_only(|| storage.read_at(&mut buf, data.len() as u64 - 10)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // The mode ends with the call.
        assert!(!CACHED_READS_ONLY.get());
    }
}

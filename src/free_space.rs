//! File space that no structure of an image uses, handed out again to new blocks, and the
//! gate that keeps space from being handed out while I/O that found it mapped is still
//! running.
//!
//! Drivers look a block's file offset up under their BAT lock and then do the data I/O
//! outside every lock. A block released meanwhile (a discard) must not have its space
//! reused before that I/O is over: a read would return another block's data, and a write
//! would land in it. So data I/O to mapped space runs with the image's [`SpaceGate`]
//! pinned (shared, never held while waiting for a metadata lock), released space waits as
//! *pending*, and the allocator turns pending space free only after taking the gate
//! exclusively once, which waits for every pin taken before the release.

use parking_lot::{RwLock, RwLockReadGuard};
use std::collections::BTreeMap;
use std::ops::Range;

/// Shared by data I/O to mapped space, taken exclusively to retire pending space.
#[derive(Debug, Default)]
pub struct SpaceGate(RwLock<()>);

/// Held across a mapping lookup and the I/O to what it found.
pub type SpacePin<'a> = RwLockReadGuard<'a, ()>;

impl SpaceGate {
    pub fn pin(&self) -> SpacePin<'_> {
        self.0.read()
    }

    /// Waits until every pin taken before this call is released. The caller must hold no
    /// pin.
    fn drain(&self) {
        drop(self.0.write());
    }
}

/// Free ranges of an image file, kept merged and ordered.
#[derive(Debug, Default, Clone)]
pub struct FreeSpace {
    /// Start to end of each free range; ranges neither overlap nor touch.
    free: BTreeMap<u64, u64>,
    /// Released ranges that in-flight I/O may still reach.
    pending: Vec<Range<u64>>,
}

impl FreeSpace {
    /// All of `area` free.
    pub fn new(area: Range<u64>) -> FreeSpace {
        let mut space = FreeSpace::default();
        space.insert(area);
        space
    }

    /// The parts of `area` that no range of `used` covers.
    pub fn gaps(area: Range<u64>, used: impl IntoIterator<Item = Range<u64>>) -> FreeSpace {
        let mut space = FreeSpace::new(area);
        for range in used {
            space.remove(range);
        }
        space
    }

    /// Marks `range` as used.
    pub fn remove(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        let first = self
            .free
            .range(..=range.start)
            .next_back()
            .map_or(range.start, |(&s, _)| s);
        let hit: Vec<(u64, u64)> = self
            .free
            .range(first..range.end)
            .map(|(&s, &e)| (s, e))
            .filter(|&(_, e)| e > range.start)
            .collect();
        for (s, e) in hit {
            self.free.remove(&s);
            if s < range.start {
                self.free.insert(s, range.start);
            }
            if e > range.end {
                self.free.insert(range.end, e);
            }
        }
    }

    /// Space that nothing can reach any more, free at once (offline use, or space that was
    /// never mapped).
    pub fn insert(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        if let Some((&s, &e)) = self.free.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
            self.free.remove(&s);
        }
        while let Some((&s, &e)) = self.free.range(start..=end).next() {
            end = end.max(e);
            self.free.remove(&s);
        }
        self.free.insert(start, end);
    }

    /// Space that a block gave back while I/O that mapped it may still be running.
    pub fn release(&mut self, range: Range<u64>) {
        if range.start < range.end {
            self.pending.push(range);
        }
    }

    /// Takes `len` bytes from the lowest free range that fits them where `place` (given a
    /// free range, returning where in it `len` bytes would start) puts them. Pending space
    /// joins the free ranges first, once `gate` shows no I/O can reach it; the caller holds
    /// no pin of `gate`.
    pub fn take(
        &mut self,
        len: u64,
        gate: &SpaceGate,
        place: impl Fn(Range<u64>) -> Option<u64>,
    ) -> Option<u64> {
        if let Some(start) = self.take_free(len, &place) {
            return Some(start);
        }
        if self.pending.is_empty() {
            return None;
        }
        gate.drain();
        for range in std::mem::take(&mut self.pending) {
            self.insert(range);
        }
        self.take_free(len, &place)
    }

    fn take_free(&mut self, len: u64, place: &impl Fn(Range<u64>) -> Option<u64>) -> Option<u64> {
        let (range, start) = self.free.iter().find_map(|(&s, &e)| {
            place(s..e)
                .filter(|&at| at >= s && at.checked_add(len).is_some_and(|end| end <= e))
                .map(|at| (s..e, at))
        })?;
        self.free.remove(&range.start);
        self.insert(range.start..start);
        self.insert(start + len..range.end);
        Some(start)
    }

    /// The free ranges with pending ones counted free: for offline use, where no I/O
    /// can reach released space.
    pub fn settled(&self) -> FreeSpace {
        let mut space = self.clone();
        for range in std::mem::take(&mut space.pending) {
            space.insert(range);
        }
        space
    }

    /// Whether all of `range` is free.
    pub fn covers(&self, range: Range<u64>) -> bool {
        range.is_empty()
            || self
                .free
                .range(..=range.start)
                .next_back()
                .is_some_and(|(_, &end)| end >= range.end)
    }

    /// Free and pending bytes.
    pub fn bytes(&self) -> u64 {
        let free: u64 = self.free.iter().map(|(s, e)| e - s).sum();
        free + self.pending.iter().map(|r| r.end - r.start).sum::<u64>()
    }

    /// Free ranges in file order (pending ones not included).
    pub fn ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.free.iter().map(|(&s, &e)| s..e)
    }
}

/// Where `len` bytes go in `range`: the first offset at which `at + head` is a multiple of
/// `align`, else (when `fallback` is smaller) of `fallback`.
pub fn aligned_place(
    range: Range<u64>,
    len: u64,
    head: u64,
    align: u64,
    fallback: u64,
) -> Option<u64> {
    [align, fallback].into_iter().find_map(|a| {
        let at = range.start.checked_add(head)?.next_multiple_of(a) - head;
        (at >= range.start && at.checked_add(len)? <= range.end).then_some(at)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(space: &FreeSpace) -> Vec<Range<u64>> {
        space.ranges().collect()
    }

    #[test]
    fn gaps_are_what_no_used_range_covers() {
        let mut space = FreeSpace::gaps(10..100, vec![50..60, 0..12, 55..70, 90..120]);
        assert_eq!(ranges(&space), vec![12..50, 70..90]);
        assert_eq!(space.bytes(), 58);
        space.remove(20..30);
        space.remove(45..75);
        assert_eq!(ranges(&space), vec![12..20, 30..45, 75..90]);
        assert_eq!(ranges(&FreeSpace::gaps(0..10, vec![])), vec![0..10]);
    }

    #[test]
    fn inserted_ranges_merge_with_their_neighbours() {
        let mut space = FreeSpace::default();
        space.insert(10..20);
        space.insert(30..40);
        space.insert(20..30);
        assert_eq!(ranges(&space), vec![10..40]);
        space.insert(5..12);
        space.insert(38..50);
        space.insert(60..70);
        assert_eq!(ranges(&space), vec![5..50, 60..70]);
    }

    #[test]
    fn take_uses_the_lowest_range_that_fits_and_splits_it() {
        let gate = SpaceGate::default();
        let mut space = FreeSpace::gaps(0..100, vec![10..20, 35..60]);
        let any = |r: Range<u64>| Some(r.start);
        assert_eq!(space.take(15, &gate, any), Some(20));
        assert_eq!(ranges(&space), vec![0..10, 60..100]);
        // Aligned to 16: 64..80 in 60..100.
        assert_eq!(
            space.take(16, &gate, |r| aligned_place(r, 16, 0, 16, 16)),
            Some(64)
        );
        assert_eq!(ranges(&space), vec![0..10, 60..64, 80..100]);
        assert_eq!(space.take(30, &gate, any), None);
    }

    #[test]
    fn released_space_is_reused_only_after_the_pins_before_it_are_gone() {
        let gate = std::sync::Arc::new(SpaceGate::default());
        let mut space = FreeSpace::default();
        let pin = gate.pin();
        space.release(0..10);
        assert_eq!(space.bytes(), 10);
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let taken = space.take(10, &gate, |r| Some(r.start));
                tx.send(taken).unwrap();
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(rx.try_recv().is_err(), "space handed out under a pin");
        drop(pin);
        assert_eq!(rx.recv().unwrap(), Some(0));
        worker.join().unwrap();
    }

    #[test]
    fn aligned_place_prefers_the_alignment_and_falls_back() {
        // Data after a 512-byte head aligned to 4096: the block starts at 3584.
        assert_eq!(aligned_place(512..10_000, 4608, 512, 4096, 512), Some(3584));
        // No room for the aligned place: the fallback.
        assert_eq!(aligned_place(512..5120, 4608, 512, 4096, 512), Some(512));
        assert_eq!(aligned_place(512..5000, 4608, 512, 4096, 512), None);
    }
}

/// Workloads that any driver reusing released space must survive, run by each driver's
/// tests.
#[cfg(test)]
pub(crate) mod workloads {
    use crate::disk::VirtualDisk;
    use crate::storage::{MemStorage, Storage};
    use parking_lot::Mutex;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use std::sync::Arc;
    use std::sync::mpsc::{Receiver, Sender, channel};
    use std::time::Duration;

    type ArmedStall = Arc<Mutex<Option<(usize, Sender<()>, Receiver<()>)>>>;

    /// An in-memory file whose next read of at least `len` bytes, once armed, waits to be
    /// let go before it reads.
    pub(crate) struct StallingStorage {
        pub(crate) inner: Arc<MemStorage>,
        armed: ArmedStall,
    }

    impl Storage for StallingStorage {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let stall = {
                let mut armed = self.armed.lock();
                match &*armed {
                    Some((len, _, _)) if buf.len() >= *len => armed.take(),
                    _ => None,
                }
            };
            if let Some((_, entered, release)) = stall {
                entered.send(()).unwrap();
                release.recv().unwrap();
            }
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn flush(&self) -> std::io::Result<()> {
            self.inner.flush()
        }
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.inner.set_len(len)
        }
        fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.inner.punch_hole(offset, len)
        }
    }

    /// A read of block 0 stalls after finding where the block is; meanwhile block 0 is
    /// discarded and block 1 written, which may reuse block 0's space. The read must
    /// return block 0's data or zeros, never block 1's.
    pub(crate) fn a_stalled_read_keeps_its_block_from_reuse(
        image: Vec<u8>,
        block: u64,
        open: impl FnOnce(Box<dyn Storage>) -> Box<dyn VirtualDisk>,
    ) {
        let armed = Arc::new(Mutex::new(None));
        let disk = open(Box::new(StallingStorage {
            inner: Arc::new(MemStorage::from_vec(image)),
            armed: armed.clone(),
        }));
        let disk = &*disk;
        disk.write_at(&vec![0xAA; block as usize], 0).unwrap();
        disk.flush().unwrap();
        let (entered_tx, entered) = channel();
        let (release, release_rx) = channel();
        *armed.lock() = Some((block as usize, entered_tx, release_rx));
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut buf = vec![0u8; block as usize];
                disk.read_at(&mut buf, 0).unwrap();
                buf
            });
            entered.recv().unwrap();
            disk.discard(0, block).unwrap();
            let (done_tx, done) = channel();
            let writer = scope.spawn(move || {
                disk.write_at(&vec![0xBB; block as usize], block).unwrap();
                done_tx.send(()).unwrap();
            });
            // Give a writer that does not wait for the read the time to reuse the space.
            let _ = done.recv_timeout(Duration::from_millis(200));
            release.send(()).unwrap();
            let read = reader.join().unwrap();
            writer.join().unwrap();
            assert!(
                read.iter().all(|&b| b == 0xAA) || read.iter().all(|&b| b == 0),
                "a read of block 0 returned other data (first byte {:#x})",
                read[0]
            );
        });
        let mut both = vec![0u8; 2 * block as usize];
        disk.read_at(&mut both, 0).unwrap();
        assert!(both[..block as usize].iter().all(|&b| b == 0));
        assert!(both[block as usize..].iter().all(|&b| b == 0xBB));
    }

    /// Threads own disjoint regions of `region` bytes and write, discard and read them
    /// back at random, so blocks are released and allocated again all the time: a block
    /// handed out while another thread's I/O still reached its old owner shows up as data
    /// from the wrong region.
    pub(crate) fn disjoint_writers_and_discarders(
        disk: &dyn VirtualDisk,
        threads: u64,
        steps: u64,
    ) {
        let region = disk.size() / threads;
        std::thread::scope(|scope| {
            for t in 0..threads {
                scope.spawn(move || {
                    let base = t * region;
                    let mut model = vec![0u8; region as usize];
                    let mut rng = StdRng::seed_from_u64(t);
                    for step in 0..steps {
                        let len = rng.random_range(1..region / 2);
                        let at = rng.random_range(0..region - len);
                        let range = at as usize..(at + len) as usize;
                        if step % 3 == 2 {
                            disk.discard(base + at, len).unwrap();
                            model[range].fill(0);
                        } else {
                            let fill = ((t as u8 + 1) << 4) | ((step % 15) as u8 + 1);
                            model[range.clone()].fill(fill);
                            disk.write_at(&model[range], base + at).unwrap();
                        }
                        let mut found = vec![0u8; region as usize];
                        disk.read_at(&mut found, base).unwrap();
                        if let Some(i) = (0..found.len()).find(|&i| found[i] != model[i]) {
                            panic!(
                                "thread {t} step {step}: byte {i} of its region reads {:#x}, \
                                 wrote {:#x}",
                                found[i], model[i]
                            );
                        }
                    }
                });
            }
        });
    }

    /// Rounds of "fill a different part of the disk, then discard it": after the first
    /// round, released blocks take every new write, so the file stops growing. Returns the
    /// file length after each round, read by `file_len`.
    pub(crate) fn write_and_trim_rounds(
        disk: &dyn VirtualDisk,
        rounds: u64,
        file_len: impl Fn() -> u64,
    ) -> Vec<u64> {
        let quarter = disk.size() / 4;
        (0..rounds)
            .map(|round| {
                let at = (round % 4) * quarter;
                disk.write_at(&vec![round as u8 + 1; quarter as usize], at)
                    .unwrap();
                disk.flush().unwrap();
                disk.discard(at, quarter).unwrap();
                disk.flush().unwrap();
                file_len()
            })
            .collect()
    }
}

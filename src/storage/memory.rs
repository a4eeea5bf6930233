//! An in-memory image file for tests: counts requests, injects errors, tears writes and
//! simulates power loss by dropping what was not flushed. Only test builds have it.

use super::Storage;
use parking_lot::Mutex;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

/// One change made since the last flush, kept so a power loss can drop or tear it.
#[derive(Debug, Clone)]
pub enum PendingOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

/// What part of one unflushed change survives a simulated power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Survives {
    Nothing,
    Everything,
    /// Only the first `n` bytes of a write reach the medium (a torn write). For a
    /// `SetLen`, any `n > 0` keeps it.
    Prefix(usize),
}

#[derive(Default)]
struct MemState {
    /// What reads see now.
    current: Vec<u8>,
    /// What was on the medium at the last flush.
    durable: Vec<u8>,
    /// Changes since the last flush, oldest first.
    pending: Vec<PendingOp>,
}

/// An in-memory file for tests: counts requests, injects errors, simulates power loss.
#[derive(Default)]
pub struct MemStorage {
    state: Mutex<MemState>,
    writes: AtomicU64,
    flushes: AtomicU64,
    /// Writes left before writes start failing; `u64::MAX` = never.
    writes_before_failure: AtomicU64,
    /// errno for injected write and flush failures; 0 = no failure armed.
    write_errno: AtomicI32,
    flush_errno: AtomicI32,
    read_errno: AtomicI32,
}

impl MemStorage {
    pub fn new() -> Self {
        Self::from_vec(Vec::new())
    }

    /// A file whose contents are already durable.
    pub fn from_vec(data: Vec<u8>) -> Self {
        MemStorage {
            state: Mutex::new(MemState {
                current: data.clone(),
                durable: data,
                pending: Vec::new(),
            }),
            writes_before_failure: AtomicU64::new(u64::MAX),
            ..Default::default()
        }
    }

    /// What reads see now.
    pub fn contents(&self) -> Vec<u8> {
        self.state.lock().current.clone()
    }

    /// Changes made since the last flush, oldest first.
    pub fn pending(&self) -> Vec<PendingOp> {
        self.state.lock().pending.clone()
    }

    pub fn write_count(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// After `n` more successful writes, every write fails with `errno` (and changes
    /// nothing) until [`MemStorage::clear_faults`].
    pub fn fail_writes_after(&self, n: u64, errno: i32) {
        self.write_errno.store(errno, Ordering::SeqCst);
        self.writes_before_failure.store(n, Ordering::SeqCst);
    }

    pub fn fail_flushes(&self, errno: i32) {
        self.flush_errno.store(errno, Ordering::SeqCst);
    }

    pub fn fail_reads(&self, errno: i32) {
        self.read_errno.store(errno, Ordering::SeqCst);
    }

    pub fn clear_faults(&self) {
        self.writes_before_failure.store(u64::MAX, Ordering::SeqCst);
        self.write_errno.store(0, Ordering::SeqCst);
        self.flush_errno.store(0, Ordering::SeqCst);
        self.read_errno.store(0, Ordering::SeqCst);
    }

    /// The file as it would be found after a power loss now: everything flushed, plus, for
    /// each unflushed change in order, what `survives` says of it.
    pub fn power_loss(&self, mut survives: impl FnMut(usize, &PendingOp) -> Survives) -> Self {
        let state = self.state.lock();
        let mut data = state.durable.clone();
        for (i, op) in state.pending.iter().enumerate() {
            match (survives(i, op), op) {
                (Survives::Nothing, _) => {}
                (Survives::Prefix(0), _) => {}
                (Survives::Everything, PendingOp::Write { offset, data: d }) => {
                    apply_write(&mut data, *offset, d)
                }
                (Survives::Prefix(n), PendingOp::Write { offset, data: d }) => {
                    apply_write(&mut data, *offset, &d[..n.min(d.len())])
                }
                (_, PendingOp::SetLen(len)) => data.resize(*len as usize, 0),
            }
        }
        Self::from_vec(data)
    }

    /// Power loss that keeps only what was flushed.
    pub fn power_loss_dropping_unflushed(&self) -> Self {
        self.power_loss(|_, _| Survives::Nothing)
    }

    fn injected(errno: &AtomicI32) -> io::Result<()> {
        match errno.load(Ordering::SeqCst) {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }
}

fn apply_write(data: &mut Vec<u8>, offset: u64, buf: &[u8]) {
    let start = offset as usize;
    let end = start + buf.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[start..end].copy_from_slice(buf);
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Self::injected(&self.read_errno)?;
        let state = self.state.lock();
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= state.current.len() as u64)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(&state.current[offset as usize..end as usize]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let left = self.writes_before_failure.load(Ordering::SeqCst);
        if left == 0 {
            Self::injected(&self.write_errno)?;
        } else if left != u64::MAX {
            self.writes_before_failure.store(left - 1, Ordering::SeqCst);
        }
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > isize::MAX as u64)
        {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let mut state = self.state.lock();
        apply_write(&mut state.current, offset, buf);
        state.pending.push(PendingOp::Write {
            offset,
            data: buf.to_vec(),
        });
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Self::injected(&self.flush_errno)?;
        let mut state = self.state.lock();
        state.durable = state.current.clone();
        state.pending.clear();
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        state.current.resize(len as usize, 0);
        state.pending.push(PendingOp::SetLen(len));
        Ok(())
    }
}

/// What a test does with each state a power loss could leave ([`CrashingStorage`]): `what`
/// says which requests survived.
pub type CrashCheck = dyn Fn(&str, MemStorage) + Send + Sync;

/// An in-memory file that, before every request changing it, hands each state a power
/// loss could leave at that instant to a check: a driver's crash safety, tried at every
/// step of whatever it does.
pub struct CrashingStorage {
    pub inner: Arc<MemStorage>,
    check: Box<CrashCheck>,
    checked: AtomicUsize,
}

impl CrashingStorage {
    pub fn new(
        inner: Arc<MemStorage>,
        check: impl Fn(&str, MemStorage) + Send + Sync + 'static,
    ) -> CrashingStorage {
        CrashingStorage {
            inner,
            check: Box::new(check),
            checked: AtomicUsize::new(0),
        }
    }

    /// How many crash states were checked.
    pub fn checked(&self) -> usize {
        self.checked.load(Ordering::Relaxed)
    }

    /// Checks the states a power loss now could leave. Requests since the last flush
    /// reach the medium in any order: crashes keep the first `n` of them, or all but one.
    /// Of a long list (a batch of copies), eight spread over it.
    pub fn check_crashes(&self) {
        let pending = self.inner.pending();
        let step = pending.len().div_ceil(8).max(1);
        let samples: Vec<usize> = (0..pending.len()).step_by(step).collect();
        let prefixes = samples.iter().copied().chain([pending.len()]).map(|n| {
            let keep: Box<dyn Fn(usize) -> bool> = Box::new(move |i| i < n);
            (
                format!("the first {n} of {} unflushed requests", pending.len()),
                keep,
            )
        });
        let all_but_one = samples.iter().map(|&n| {
            let keep: Box<dyn Fn(usize) -> bool> = Box::new(move |i| i != n);
            (format!("all but request {n} of {}", pending.len()), keep)
        });
        for (what, keep) in prefixes.chain(all_but_one) {
            let crashed = self.inner.power_loss(|i, _| match keep(i) {
                true => Survives::Everything,
                false => Survives::Nothing,
            });
            (self.check)(&what, crashed);
            self.checked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Storage for CrashingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_crashes();
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.check_crashes();
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_crashes();
        self.inner.set_len(len)
    }
}

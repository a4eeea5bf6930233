//! A storage for crash tests: before every request that changes the file, it captures
//! each state a power loss could leave there and hands it to a check. Requests from many
//! threads go one at a time, so nothing changes the file while a check runs, and every
//! flush that a thread saw complete is in each state the check sees. Only test builds
//! have it.

use super::{MemStorage, Storage};
use parking_lot::Mutex;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Crashing<F> {
    inner: MemStorage,
    one_at_a_time: Mutex<()>,
    /// Called with each crashed file and a description of the crash.
    check: F,
    checked: AtomicUsize,
}

impl<F: Fn(MemStorage, &str) + Send + Sync> Crashing<F> {
    pub fn new(inner: MemStorage, check: F) -> Self {
        Crashing {
            inner,
            one_at_a_time: Mutex::new(()),
            check,
            checked: AtomicUsize::new(0),
        }
    }

    /// Checks the states a power loss now would leave.
    pub fn check_crashes(&self) {
        for (what, crashed) in self.inner.crash_states() {
            (self.check)(crashed, &format!("crash keeping {what}"));
            self.checked.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many crashed states were checked.
    pub fn checked(&self) -> usize {
        self.checked.load(Ordering::Relaxed)
    }
}

impl<F: Fn(MemStorage, &str) + Send + Sync> Storage for Crashing<F> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let _alone = self.one_at_a_time.lock();
        self.check_crashes();
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        let _alone = self.one_at_a_time.lock();
        self.check_crashes();
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let _alone = self.one_at_a_time.lock();
        self.check_crashes();
        self.inner.set_len(len)
    }
}

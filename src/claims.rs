//! Table entries that one writer at a time may change, with no lock held while it does.
//!
//! A writer that allocates a block claims the block's table entry, then reserves space,
//! writes the data and waits for its change to be committed, all without a lock that other
//! writers need; a second writer wanting the same entry waits for the claim to go and
//! then looks again (the block is allocated by then, or, if the first writer failed,
//! still free to allocate). A discard claims the entries it releases the same way.

use parking_lot::{Condvar, Mutex};
use std::ops::Range;

/// Ranges of table indices claimed, each by one holder.
#[derive(Default)]
pub struct Claims {
    held: Mutex<Vec<Range<u64>>>,
    released: Condvar,
    /// Claimers waiting for a release.
    #[cfg(test)]
    waiting: std::sync::atomic::AtomicUsize,
}

/// Held while its ranges are being changed; dropping it lets waiting claimers look again.
pub struct Claim<'a> {
    claims: &'a Claims,
    ranges: Vec<Range<u64>>,
}

impl Claims {
    /// Claims every range of `ranges` at once. When another claim holds any part of them,
    /// waits until some claim is released and returns `None`: what the caller saw before
    /// claiming may have changed, so it looks again. Never waits while holding a claim,
    /// so claimers cannot wait for each other in a circle.
    pub fn claim(&self, ranges: impl IntoIterator<Item = Range<u64>>) -> Option<Claim<'_>> {
        let ranges: Vec<Range<u64>> = ranges.into_iter().collect();
        let mut held = self.held.lock();
        let taken = |r: &Range<u64>| held.iter().any(|h| h.start < r.end && r.start < h.end);
        if ranges.iter().any(taken) {
            #[cfg(test)]
            self.waiting
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.released.wait(&mut held);
            #[cfg(test)]
            self.waiting
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            return None;
        }
        held.extend(ranges.iter().cloned());
        Some(Claim {
            claims: self,
            ranges,
        })
    }
}

impl Claims {
    /// Claims `range`, waiting for as long as another claim holds any part of it, for a
    /// caller that looks at what it claimed only once it holds the claim.
    pub fn claim_when_free(&self, range: Range<u64>) -> Claim<'_> {
        loop {
            if let Some(claim) = self.claim([range.clone()]) {
                return claim;
            }
        }
    }
}

#[cfg(test)]
impl Claims {
    pub fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Claim<'_> {
    pub fn covers(&self, index: u64) -> bool {
        self.ranges.iter().any(|r| r.contains(&index))
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut held = self.claims.held.lock();
        for range in &self.ranges {
            if let Some(at) = held.iter().position(|h| h == range) {
                held.swap_remove(at);
            }
        }
        self.claims.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_claims_wait_and_disjoint_ones_do_not() {
        let claims = Claims::default();
        let first = claims.claim(std::iter::once(10..20)).unwrap();
        assert!(first.covers(10) && first.covers(19) && !first.covers(20));
        let other = claims.claim([20..30, 0..10]).unwrap();
        let claims = &claims;
        std::thread::scope(|s| {
            let waiter = s.spawn(move || {
                // Overlaps `first`: waits for a release, then looks again.
                loop {
                    if let Some(claim) = claims.claim(std::iter::once(15..16)) {
                        return claim.covers(15);
                    }
                }
            });
            while claims.waiting() == 0 {
                std::thread::yield_now();
            }
            drop(first);
            assert!(waiter.join().unwrap());
        });
        drop(other);
        assert!(claims.held.lock().is_empty());
    }
}

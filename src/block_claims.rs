//! Blocks that one writer is changing in a way no other writer may join halfway: giving
//! a block file space (its data written, flushed and its table entry committed without
//! any lock held) or copying sectors into it from a parent. The claim marks the block
//! pending in memory; a second writer to it waits for the claim, then looks at the block
//! again and finds it allocated (or, if the first writer failed, allocates it itself).

use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, HashSet};

#[derive(Default)]
pub struct BlockClaims {
    held: Mutex<Held>,
    released: Condvar,
}

#[derive(Default)]
struct Held {
    claimed: HashSet<u64>,
    /// How many writers wait for each claimed block that has any.
    waiting: HashMap<u64, usize>,
}

/// The claim of one block, given up when dropped (also when its writer fails).
pub struct BlockClaim<'a> {
    claims: &'a BlockClaims,
    block: u64,
}

impl BlockClaims {
    /// Claims `block`, waiting until no other writer holds it. The caller must hold no
    /// lock and no space pin: the holder may need them to finish.
    pub fn claim(&self, block: u64) -> BlockClaim<'_> {
        let mut held = self.held.lock();
        if held.claimed.contains(&block) {
            *held.waiting.entry(block).or_default() += 1;
            while held.claimed.contains(&block) {
                self.released.wait(&mut held);
            }
            if let Some(waiting) = held.waiting.get_mut(&block) {
                *waiting -= 1;
                if *waiting == 0 {
                    held.waiting.remove(&block);
                }
            }
        }
        held.claimed.insert(block);
        BlockClaim {
            claims: self,
            block,
        }
    }

    /// How many writers wait for `block`'s claim.
    #[cfg(test)]
    pub fn waiting(&self, block: u64) -> usize {
        self.held.lock().waiting.get(&block).copied().unwrap_or(0)
    }
}

impl Drop for BlockClaim<'_> {
    fn drop(&mut self) {
        let mut held = self.claims.held.lock();
        held.claimed.remove(&self.block);
        if held.waiting.contains_key(&self.block) {
            self.claims.released.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_of_a_block_waits_for_the_first_and_others_do_not() {
        let claims = BlockClaims::default();
        let first = claims.claim(7);
        let other = claims.claim(8);
        let order = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            let second = scope.spawn(|| {
                let _claim = claims.claim(7);
                order.lock().push("second");
            });
            while claims.waiting(7) == 0 {
                std::thread::yield_now();
            }
            order.lock().push("first");
            drop(first);
            second.join().unwrap();
        });
        assert_eq!(*order.lock(), ["first", "second"]);
        assert_eq!(claims.waiting(7), 0);
        drop(other);
        let held = claims.held.lock();
        assert!(held.claimed.is_empty() && held.waiting.is_empty());
    }
}

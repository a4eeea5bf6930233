//! Group commit: one flush for the metadata changes of many writers.
//!
//! A writer whose data is written queues its change (or, to only make what it wrote
//! durable, nothing) and waits. The first waiter when no commit is running leads the next
//! one: it takes every change queued so far, does the work it was given for all of them
//! at once (a driver's: flush, then write the metadata that points at the flushed data)
//! and hands the result to every writer whose change it took. Writers that arrive while a
//! commit runs queue for the next one, which one of them leads once this one is done.
//!
//! A commit starts after every change it carries was queued, so a flush at its start
//! covers every write its writers made before queueing, and a failure reaches every
//! writer of the group. The work must be the same whoever leads: each caller passes its
//! own, and the leader's is the one that runs.

use crate::error::{Error, Result};
use parking_lot::{Condvar, Mutex};
use std::sync::{Arc, OnceLock};

pub struct CommitQueue<T> {
    state: Mutex<State<T>>,
    finished: Condvar,
}

/// The result of one commit, shared by everyone whose change it carried.
type Outcome = Arc<OnceLock<Result<()>>>;

struct State<T> {
    /// Changes queued for the next commit.
    queued: Vec<T>,
    /// The next commit's result, once it has run.
    next: Outcome,
    /// A commit is running.
    running: bool,
}

impl<T> Default for CommitQueue<T> {
    fn default() -> Self {
        CommitQueue {
            state: Mutex::new(State {
                queued: Vec::new(),
                next: Outcome::default(),
                running: false,
            }),
            finished: Condvar::new(),
        }
    }
}

impl<T> CommitQueue<T> {
    /// Queues `change` for the next commit that starts, and returns that commit's result:
    /// `work(every change it carries)` run by this caller, or by the one that leads it.
    pub fn commit(&self, change: Option<T>, work: impl FnOnce(Vec<T>) -> Result<()>) -> Result<()> {
        let mut state = self.state.lock();
        state.queued.extend(change);
        let outcome = state.next.clone();
        while state.running {
            self.finished.wait(&mut state);
            if let Some(result) = outcome.get() {
                return result.clone();
            }
        }
        // No commit took this change before the last one finished, so it is still
        // queued, for the commit this caller now leads.
        state.running = true;
        let changes = std::mem::take(&mut state.queued);
        state.next = Outcome::default();
        drop(state);
        let leading = Leading {
            queue: self,
            outcome,
        };
        let result = work(changes);
        let _ = leading.outcome.set(result.clone());
        result
    }

    /// How many changes wait for the next commit.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.state.lock().queued.len()
    }
}

/// Ends a commit when its leader is done with it, or gave up by panicking: the followers
/// then learn so rather than wait forever.
struct Leading<'a, T> {
    queue: &'a CommitQueue<T>,
    outcome: Outcome,
}

impl<T> Drop for Leading<'_, T> {
    fn drop(&mut self) {
        let mut state = self.queue.state.lock();
        let _ = self.outcome.set(Err(Error::io(
            "committing metadata",
            std::io::Error::other("the writer leading the commit panicked"),
        )));
        state.running = false;
        self.queue.finished.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn writers_queued_during_a_commit_share_the_next_one() {
        let queue = CommitQueue::<u32>::default();
        let (entered_tx, entered) = channel();
        let (release_tx, release) = channel::<()>();
        let release = Mutex::new(release);
        let commits = Mutex::new(Vec::new());
        // The commit carrying change 1 waits to be let go.
        let work = |changes: Vec<u32>| {
            if changes.contains(&1) {
                entered_tx.send(()).unwrap();
                release.lock().recv().unwrap();
            }
            commits.lock().push(changes);
            Ok(())
        };
        let queue = &queue;
        std::thread::scope(|scope| {
            let first = scope.spawn(|| queue.commit(Some(1), work));
            entered.recv().unwrap();
            let others: Vec<_> = (2..5)
                .map(|change| scope.spawn(move || queue.commit(Some(change), work)))
                .collect();
            while queue.queued() < 3 {
                std::thread::yield_now();
            }
            release_tx.send(()).unwrap();
            first.join().unwrap().unwrap();
            for other in others {
                other.join().unwrap().unwrap();
            }
        });
        let mut commits = commits.into_inner();
        assert_eq!(commits.len(), 2, "{commits:?}");
        commits[1].sort();
        assert_eq!(commits, [vec![1], vec![2, 3, 4]]);
    }

    #[test]
    fn a_failed_commit_fails_every_writer_in_it_and_not_the_next() {
        let queue = CommitQueue::<u32>::default();
        let (entered_tx, entered) = channel();
        let (release_tx, release) = channel::<()>();
        let release = Mutex::new(release);
        let fail = |changes: Vec<u32>| {
            entered_tx.send(()).unwrap();
            release.lock().recv().unwrap();
            Err(Error::io(
                format!("committing {changes:?}"),
                std::io::Error::from_raw_os_error(libc::EIO),
            ))
        };
        std::thread::scope(|scope| {
            let first = scope.spawn(|| queue.commit(Some(1), fail));
            entered.recv().unwrap();
            let second = scope.spawn(|| queue.commit(Some(2), fail));
            let third = scope.spawn(|| queue.commit(Some(3), fail));
            while queue.queued() < 2 {
                std::thread::yield_now();
            }
            release_tx.send(()).unwrap();
            let err = first.join().unwrap().unwrap_err();
            assert_eq!(
                err.to_string(),
                "committing [1]: Input/output error (os error 5)"
            );
            // The second commit carries both queued changes, and both writers hear of
            // its failure.
            entered.recv().unwrap();
            release_tx.send(()).unwrap();
            for writer in [second, third] {
                let err = writer.join().unwrap().unwrap_err();
                assert_eq!(err.errno(), libc::EIO);
                assert!(
                    err.to_string() == "committing [2, 3]: Input/output error (os error 5)"
                        || err.to_string() == "committing [3, 2]: Input/output error (os error 5)",
                    "{err}"
                );
            }
        });
        queue
            .commit(Some(4), |changes| {
                assert_eq!(changes, [4]);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn a_panicking_leader_fails_its_followers_instead_of_stranding_them() {
        let queue = CommitQueue::<u32>::default();
        let (entered_tx, entered) = channel();
        let (release_tx, release) = channel::<()>();
        let release = Mutex::new(release);
        std::thread::scope(|scope| {
            let leader = scope.spawn(|| {
                queue.commit(Some(1), |_| {
                    entered_tx.send(()).unwrap();
                    release.lock().recv().unwrap();
                    panic!("injected")
                })
            });
            entered.recv().unwrap();
            let follower = scope.spawn(|| queue.commit(Some(2), |_| Ok(())));
            while queue.queued() == 0 {
                std::thread::yield_now();
            }
            release_tx.send(()).unwrap();
            assert!(leader.join().is_err());
            // The follower's change was not in the failed commit: it leads its own.
            follower.join().unwrap().unwrap();
        });
    }
}

//! Requests that one piece of work can serve together: many writers' metadata changes in
//! one log entry (group commit).
//!
//! While a batch runs, new requests queue up; when it ends, the first of their submitters
//! to notice runs everything queued as the next batch, on its own thread, and every
//! submitter gets the result of the batch that held its request. Nobody waits behind more
//! than the batch that is running and its own, and a request always rides on work that
//! starts after it was made (so a flush the batch begins with covers what each submitter
//! wrote before submitting).

use crate::error::{Error, Result};
use parking_lot::{Condvar, Mutex};
use std::sync::{Arc, OnceLock};

/// Where the result of one batch goes, shared by everyone with a request in it.
type Outcome = OnceLock<Result<()>>;

pub struct Batcher<T> {
    state: Mutex<State<T>>,
    finished: Condvar,
}

struct State<T> {
    queued: T,
    /// Requests in `queued`.
    #[cfg(test)]
    count: usize,
    outcome: Arc<Outcome>,
    running: bool,
}

impl<T: Default> Default for Batcher<T> {
    fn default() -> Self {
        Batcher {
            state: Mutex::new(State {
                queued: T::default(),
                #[cfg(test)]
                count: 0,
                outcome: Arc::default(),
                running: false,
            }),
            finished: Condvar::new(),
        }
    }
}

impl<T: Default> Batcher<T> {
    /// Puts a request into the queued batch (`add`) and returns the result of the batch
    /// that holds it, running that batch with `run` if no other submitter does first. The
    /// caller holds no lock that `run` takes.
    pub fn submit(
        &self,
        add: impl FnOnce(&mut T),
        run: impl FnOnce(T) -> Result<()>,
    ) -> Result<()> {
        let mut state = self.state.lock();
        add(&mut state.queued);
        #[cfg(test)]
        {
            state.count += 1;
        }
        let outcome = state.outcome.clone();
        loop {
            if let Some(result) = outcome.get() {
                return share(result);
            }
            if !state.running {
                // Without a result and with nothing running, ours is still the queued batch.
                let batch = std::mem::take(&mut state.queued);
                #[cfg(test)]
                {
                    state.count = 0;
                }
                state.outcome = Arc::default();
                state.running = true;
                drop(state);
                let _finish = Finish {
                    batcher: self,
                    outcome: &outcome,
                };
                let result = run(batch);
                // Cannot be set yet: only `Finish` sets it otherwise, after this.
                let _ = outcome.set(share(&result));
                return result;
            }
            self.finished.wait(&mut state);
        }
    }

    /// Requests waiting for the next batch.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.state.lock().count
    }
}

/// Ends a batch even when running it panicked, so its submitters get an error rather than
/// wait forever, and the next batch can start.
struct Finish<'a, T> {
    batcher: &'a Batcher<T>,
    outcome: &'a Outcome,
}

impl<T> Drop for Finish<'_, T> {
    fn drop(&mut self) {
        let _ = self.outcome.set(Err(Error::io(
            "a batch of requests",
            std::io::Error::other("failed while it ran"),
        )));
        self.batcher.state.lock().running = false;
        self.batcher.finished.notify_all();
    }
}

fn share(result: &Result<()>) -> Result<()> {
    result.as_ref().map(|_| ()).map_err(Error::duplicate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn requests_made_while_a_batch_runs_share_the_next_one() {
        let batcher = Batcher::<Vec<u32>>::default();
        let batches = Mutex::new(Vec::new());
        let (entered_tx, entered) = channel();
        let (release, release_rx) = channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let run = |batch: Vec<u32>| {
            if batch == [0] {
                entered_tx.send(()).unwrap();
                release_rx.lock().recv().unwrap();
            }
            batches.lock().push(batch);
            Ok(())
        };
        std::thread::scope(|s| {
            s.spawn(|| batcher.submit(|q| q.push(0), run).unwrap());
            entered.recv().unwrap();
            for n in 1..=3 {
                let (batcher, run) = (&batcher, &run);
                s.spawn(move || batcher.submit(|q| q.push(n), run).unwrap());
            }
            while batcher.queued() < 3 {
                std::thread::yield_now();
            }
            release.send(()).unwrap();
        });
        let mut batches = batches.into_inner();
        batches[1].sort();
        assert_eq!(batches, vec![vec![0], vec![1, 2, 3]]);
    }

    #[test]
    fn every_request_of_a_failed_batch_gets_the_error() {
        let batcher = Batcher::<Vec<u32>>::default();
        let (entered_tx, entered) = channel();
        let (release, release_rx) = channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let run = |batch: Vec<u32>| {
            if batch == [0] {
                entered_tx.send(()).unwrap();
                release_rx.lock().recv().unwrap();
                return Ok(());
            }
            Err(Error::io(
                "flushing",
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ))
        };
        let errors: Vec<i32> = std::thread::scope(|s| {
            s.spawn(|| batcher.submit(|q| q.push(0), run).unwrap());
            entered.recv().unwrap();
            let waiters: Vec<_> = (1..=3)
                .map(|n| {
                    let (batcher, run) = (&batcher, &run);
                    s.spawn(move || batcher.submit(|q| q.push(n), run).unwrap_err())
                })
                .collect();
            while batcher.queued() < 3 {
                std::thread::yield_now();
            }
            release.send(()).unwrap();
            waiters
                .into_iter()
                .map(|w| w.join().unwrap().errno())
                .collect()
        });
        assert_eq!(errors, vec![libc::ENOSPC; 3]);
        // The next request runs a batch of its own.
        batcher.submit(|q| q.push(4), |_| Ok(())).unwrap();
    }

    #[test]
    fn a_batch_that_panics_fails_its_requests_and_lets_the_next_run() {
        let batcher = Batcher::<Vec<u32>>::default();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            batcher.submit(|q| q.push(0), |_| panic!("test"))
        }));
        assert!(panicked.is_err());
        batcher.submit(|q| q.push(1), |_| Ok(())).unwrap();
    }
}

//! Threads for work that waits on the disk, so the few threads that take requests from the
//! kernel never do.
//!
//! The mount serves requests on one thread per CPU: enough for everything the page cache
//! can answer, where more threads only add context switches. A read of data that is not
//! cached blocks its thread for the disk's latency, though, and with two threads a queue of
//! sixteen such reads would reach the disk two at a time. Those reads come here, where up
//! to [`BlockingPool::THREADS`] of them wait at once.

use parking_lot::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

/// Started on first use: a mount whose reads all hit the page cache never starts a thread.
#[derive(Default)]
pub struct BlockingPool {
    jobs: OnceLock<Mutex<Sender<Job>>>,
}

impl BlockingPool {
    /// As many disk reads as this may wait at once: the queue depth a disk needs to reach
    /// its throughput, and what fio and a loop device keep in flight.
    pub const THREADS: usize = 16;

    /// Runs `job` on a pool thread. Jobs start in the order they were submitted.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let jobs = self.jobs.get_or_init(|| Mutex::new(Self::start()));
        if let Err(refused) = jobs.lock().send(Box::new(job)) {
            // Every thread is gone (none could be started): run it here rather than drop
            // the request it answers.
            (refused.0)();
        }
    }

    fn start() -> Sender<Job> {
        let (sender, receiver) = channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..Self::THREADS {
            let receiver = receiver.clone();
            let started = std::thread::Builder::new()
                .name(format!("disk-wait-{i}"))
                .spawn(move || serve(&receiver));
            if let Err(e) = started {
                log::warn!("could not start disk-wait thread {i}: {e}");
                break;
            }
        }
        sender
    }
}

/// Runs jobs until the pool is dropped.
fn serve(jobs: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for the next job, never while running one.
        let job = jobs.lock().recv();
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    #[test]
    fn jobs_wait_side_by_side() {
        let pool = BlockingPool::default();
        // Each job waits (at most ten seconds, so a broken pool fails rather than hangs)
        // until all of them run at once, which needs THREADS threads.
        let running = Arc::new(AtomicUsize::new(0));
        let (done, finished) = std::sync::mpsc::channel();
        for _ in 0..BlockingPool::THREADS {
            let (running, done) = (running.clone(), done.clone());
            pool.submit(move || {
                running.fetch_add(1, Ordering::SeqCst);
                let deadline = Instant::now() + Duration::from_secs(10);
                while running.load(Ordering::SeqCst) < BlockingPool::THREADS
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                done.send(running.load(Ordering::SeqCst)).unwrap();
            });
        }
        for _ in 0..BlockingPool::THREADS {
            let seen = finished.recv_timeout(Duration::from_secs(20)).unwrap();
            assert_eq!(seen, BlockingPool::THREADS);
        }
    }
}

//! The gate every request that reaches the disk passes, and what stopping the service or
//! losing the image does to the requests at it.

use super::FsResult;
use parking_lot::{RwLock, RwLockReadGuard};
use std::sync::atomic::{AtomicU8, Ordering};

const SERVING: u8 = 0;
const STOPPED: u8 = 1;
const IMAGE_LOST: u8 = 2;

/// Admits requests to the disk while the service runs; see the [module
/// documentation](super).
#[derive(Default)]
pub struct RequestGate {
    /// Held shared by each request for as long as it uses the disk.
    in_flight: RwLock<()>,
    state: AtomicU8,
}

impl RequestGate {
    pub(super) fn enter(&self) -> FsResult<RwLockReadGuard<'_, ()>> {
        let guard = self.in_flight.read();
        match self.state.load(Ordering::SeqCst) {
            SERVING => Ok(guard),
            STOPPED => Err(libc::ENOTCONN),
            _ => Err(libc::EIO),
        }
    }

    /// Refuses new requests and returns once those already admitted have finished.
    pub fn stop(&self) {
        self.state.store(STOPPED, Ordering::SeqCst);
        // A request admitted before the store holds the lock until it finishes; one
        // admitted after it sees the new state and leaves at once.
        drop(self.in_flight.write());
    }

    /// Fails every later request with `EIO`: the image they would reach is gone.
    pub fn image_lost(&self) {
        let _ =
            self.state
                .compare_exchange(SERVING, IMAGE_LOST, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn is_image_lost(&self) -> bool {
        self.state.load(Ordering::SeqCst) == IMAGE_LOST
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::DISK_INO;
    use crate::fuse::tests::fs_over;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_stopped_gate_waits_for_requests_inside_and_refuses_later_ones() {
        let fs = Arc::new(fs_over(vec![0; 4096], false));
        let gate = fs.gate();
        let admitted = gate.enter().unwrap();
        let stopper = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.stop())
        };
        // Until stop has refused new requests its thread may not even have run, and a
        // check would prove nothing.
        while gate.state.load(Ordering::SeqCst) != STOPPED {
            assert!(!stopper.is_finished(), "stop returned without stopping");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Time for a stop that does not wait to return; a stop that waits never does.
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !stopper.is_finished(),
            "stop did not wait for the request inside"
        );
        drop(admitted);
        stopper.join().unwrap();
        assert_eq!(fs.write(DISK_INO, 0, b"x").unwrap_err(), libc::ENOTCONN);
        assert_eq!(fs.read(DISK_INO, 0, 1).unwrap_err(), libc::ENOTCONN);
        assert_eq!(fs.flush(DISK_INO).unwrap_err(), libc::ENOTCONN);
        // Stopping is final: a lost image afterwards changes nothing.
        gate.image_lost();
        assert_eq!(fs.read(DISK_INO, 0, 1).unwrap_err(), libc::ENOTCONN);
        // What needs no disk still answers.
        assert_eq!(fs.getattr(DISK_INO).unwrap().size, 4096);
    }
}

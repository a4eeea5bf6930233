//! System-tier tests that need the machine to themselves, built with the `system-tests`
//! feature like the rest of that tier:
//!
//! - `fuzz_targets`: building the fuzz targets takes both cores for minutes, and each
//!   target then runs with a limit of 10 s per input, which a loaded machine could break.
//! - `bench_script`: drops the page cache and keeps the disk busy with fio for minutes.
//! - `storage_kill`: aims kills inside writes timed on the machine as loaded at the moment.
//! - `package`: installs the Debian package, whose /usr/bin/vdisk-mount the service tests
//!   in `tests/system/` would take for another installed vdisk-mount (and skip).
//!
//! Each takes [`alone`] first, so they run one at a time; cargo runs test binaries one
//! after another, so nothing else runs beside them. Each of them ran in a binary of its own
//! before, with nothing beside it.

#[path = "../common/mod.rs"]
mod common;

mod bench_script;
mod fuzz_targets;
mod package;
mod storage_kill;

use std::sync::{Mutex, MutexGuard, PoisonError};

/// The machine, for as long as a test here holds it.
fn alone() -> MutexGuard<'static, ()> {
    static MACHINE: Mutex<()> = Mutex::new(());
    // A test that failed while holding it leaves nothing behind for the next one.
    MACHINE.lock().unwrap_or_else(PoisonError::into_inner)
}

//! SIGTERM, SIGINT and SIGHUP stop the daemon cleanly in the middle of a write workload:
//! the mount goes away, the daemon exits 0, the image is clean for qemu (a VHDX with an
//! empty log), and every write the mount acknowledged before the signal is in it.

use crate::common;
use crate::common::mount::{self, Mount};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// One write of the workload: where, and its bytes.
fn workload_write(i: u64, size: u64) -> Option<(u64, Vec<u8>)> {
    // Non-overlapping, unaligned writes spread over many blocks, so that blocks keep
    // being allocated (the metadata updates a signal may interrupt).
    let stride = 320 * 1024 + 512;
    let offset = i * stride + (i * 4099) % 65536;
    let len = 64 * 1024 + (i as usize * 77) % 4096;
    (offset + len as u64 <= size).then(|| (offset, mount::pattern(i, len)))
}

/// Writes until the mount fails a request, fsyncing every few writes; returns how many
/// writes were acknowledged.
fn write_until_stopped(disk: &Path, size: u64, started: &AtomicUsize) -> u64 {
    let file = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    let mut i = 0;
    while let Some((offset, data)) = workload_write(i, size) {
        if file.write_all_at(&data, offset).is_err() {
            break;
        }
        i += 1;
        started.store(i as usize, Ordering::SeqCst);
        if i % 4 == 0 && file.sync_data().is_err() {
            break;
        }
    }
    i
}

fn stops_cleanly_on(signal: libc::c_int, qemu_format: &str, options: &str) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(format!("signal.{qemu_format}"));
    common::qemu_img(&[
        "create",
        "-f",
        qemu_format,
        "-o",
        options,
        image.to_str().unwrap(),
        &(256 * MIB).to_string(),
    ]);
    let mount = Mount::new(&image, &[]);
    let disk = mount.disk();
    let size = std::fs::metadata(&disk).unwrap().len();
    let progress = Arc::new(AtomicUsize::new(0));
    let writer = {
        let progress = progress.clone();
        std::thread::spawn(move || write_until_stopped(&disk, size, &progress))
    };
    // Signal while the workload is well under way.
    let start = Instant::now();
    while progress.load(Ordering::SeqCst) < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the workload stalled"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mountpoint = mount.mountpoint().to_path_buf();
    assert_eq!(mount.signal(signal), Some(0), "daemon did not exit 0");
    let acknowledged = writer.join().unwrap();
    assert!(
        workload_write(acknowledged, size).is_some(),
        "the workload ended before the signal"
    );
    assert!(!mount::is_mounted(&mountpoint), "mount left behind");

    common::qemu_check_clean(qemu_format, &image);
    // A VHDX whose log still needed replaying would not open read-only.
    let raw = dir.path().join("after.raw");
    common::run(
        std::process::Command::new("qemu-img")
            .args(["convert", "-f", qemu_format, "-O", "raw"])
            .arg(&image)
            .arg(&raw),
    );
    let raw = std::fs::File::open(&raw).unwrap();
    for i in 0..acknowledged {
        let (offset, data) = workload_write(i, size).unwrap();
        let mut back = vec![0u8; data.len()];
        raw.read_exact_at(&mut back, offset).unwrap();
        assert!(
            back == data,
            "acknowledged write {i} at {offset} is missing"
        );
    }
}

#[test]
fn sigterm_during_writes_to_a_vhdx() {
    if mount::fuse_available() {
        stops_cleanly_on(libc::SIGTERM, "vhdx", "block_size=1M");
    }
}

#[test]
fn sigint_during_writes_to_a_vhdx() {
    if mount::fuse_available() {
        stops_cleanly_on(libc::SIGINT, "vhdx", "block_size=1M");
    }
}

#[test]
fn sighup_during_writes_to_a_vhdx() {
    if mount::fuse_available() {
        stops_cleanly_on(libc::SIGHUP, "vhdx", "block_size=1M");
    }
}

#[test]
fn sigterm_during_writes_to_a_dynamic_vhd() {
    if mount::fuse_available() {
        stops_cleanly_on(libc::SIGTERM, "vpc", "subformat=dynamic");
    }
}

//! FUSE over io_uring follows the kernel's switch: with
//! `/sys/module/fuse/parameters/enable_uring` on, `-o io_uring=on` mounts and the requests
//! come through the daemon's rings (their completion counters, as the kernel reports them,
//! grow with the I/O); with it off, `-o io_uring=on` fails naming the switch and the
//! default serves through `/dev/fuse`. The tests never change the switch (it holds for
//! every mount on the machine): CI runs them once with it off and once with it on
//! (scripts/test-io-uring.sh), and each run checks the half that applies.

use crate::common::mount::{self, Mount};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

const MIB: u64 = 1 << 20;
const SWITCH: &str = "/sys/module/fuse/parameters/enable_uring";

fn switched_on() -> bool {
    std::fs::read_to_string(SWITCH).is_ok_and(|v| v.trim() == "Y")
}

/// How many completions the daemon's io_uring instances have posted, per their fdinfo.
fn completions(daemon: libc::pid_t) -> Option<u64> {
    let mut total = None;
    for fd in std::fs::read_dir(format!("/proc/{daemon}/fd")).unwrap() {
        let fd = fd.unwrap();
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        if target.to_str() != Some("anon_inode:[io_uring]") {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{daemon}/fdinfo/{}",
            fd.file_name().to_str().unwrap()
        ))
        .unwrap();
        let tail = info
            .lines()
            .find_map(|l| l.strip_prefix("CqTail:"))
            .expect("io_uring fdinfo without CqTail");
        *total.get_or_insert(0) += tail.trim().parse::<u64>().unwrap();
    }
    total
}

fn pattern(len: u64) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn io_uring_on_follows_the_kernel_switch() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, pattern(8 * MIB)).unwrap();
    if switched_on() {
        serves_through_the_rings(&image);
    } else {
        names_the_switch(&image);
    }
}

fn serves_through_the_rings(image: &Path) {
    let mut expected = std::fs::read(image).unwrap();
    let mount = Mount::new(image, &["format=raw", "io_uring=on"]);
    let before = completions(mount.daemon_pid()).expect("the daemon has no io_uring instance");
    // Direct I/O, so that every block is a request of its own.
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(mount.disk())
        .unwrap();
    const BLOCK: usize = 64 << 10;
    let block = vec![0x5a; BLOCK];
    let mut back = vec![0; BLOCK];
    for i in 0..32 {
        let at = i * 3 * BLOCK;
        disk.write_all_at(&block, at as u64).unwrap();
        expected[at..at + BLOCK].copy_from_slice(&block);
    }
    for i in 0..96 {
        let at = i * BLOCK;
        disk.read_exact_at(&mut back, at as u64).unwrap();
        assert!(
            back == expected[at..at + BLOCK],
            "block {i} read back wrong"
        );
    }
    drop(disk);
    let after = completions(mount.daemon_pid()).unwrap();
    assert!(after >= before + 128, "{before} → {after} ring completions");
    mount.unmount();
    assert!(
        std::fs::read(image).unwrap() == expected,
        "the image holds other bytes"
    );
}

fn names_the_switch(image: &Path) {
    let mountpoint = tempfile::tempdir().unwrap();
    let out = Mount::start(image, &["format=raw", "io_uring=on"], mountpoint.path());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(SWITCH), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!mount::is_mounted(mountpoint.path()));
    // The default serves through /dev/fuse, without a ring.
    let mount = Mount::new(image, &["format=raw", "io_uring=auto"]);
    assert_eq!(completions(mount.daemon_pid()), None);
    let mut start = [0; 4];
    File::open(mount.disk())
        .unwrap()
        .read_exact_at(&mut start, 0)
        .unwrap();
    assert_eq!(start, [0, 7, 14, 21]);
    mount.unmount();
}

//! Partitioned disks for tests: tables written with sfdisk, filesystems identified by
//! blkid, and the names a directory holds.

use super::mount::LoopDevice;
use super::run;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs `sfdisk ARGS DISK PARTITIONS` with `script` on its standard input. sfdisk takes
/// a file's sectors for 512 bytes, so a disk of other sectors is written through a loop
/// device that has them.
pub fn sfdisk(disk: &Path, sector_size: u32, args: &[&str], partitions: &[&str], script: &str) {
    let device = (sector_size != 512).then(|| {
        let size = sector_size.to_string();
        LoopDevice::attach_with(&["-f", "--show", "--sector-size", &size], disk)
    });
    let target = device.as_ref().map_or(disk, |d| d.path());
    let mut child = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .args(args)
        .arg(target)
        .args(partitions)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk {}: {}",
        disk.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The filesystem type `blkid` finds on `device` by probing its content.
pub fn blkid_type(device: &Path) -> String {
    let out = run(Command::new("blkid")
        .args(["-p", "-s", "TYPE", "-o", "value"])
        .arg(device));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The names in `dir`, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

//! A differencing child and its parent, both made of fuzzer bytes, opened through the
//! chain code: the child names its parent by path and identity, the parent is found,
//! checked and opened read-only beside it. Files live in a directory in memory (tmpfs
//! where the machine has one).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;
use vdisk_mount::{OpenOptions, open};
use vdisk_mount_fuzz::{Bytes, decode_image};

/// Names a seed's child gives its parent.
const PARENT_NAMES: [&str; 2] = ["parent.vhd", "parent.vhdx"];
const SAMPLES: u64 = 32;
const PIECE: u64 = 16 * 1024;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = ["/dev/shm", "/tmp"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("vdisk-fuzz-chain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    let child = decode_image(&mut bytes);
    let parent = decode_image(&mut bytes);
    let dir = dir();
    let child_path = dir.join("child");
    if child.storage.save(&child_path).is_err() {
        return;
    }
    for name in PARENT_NAMES {
        let _ = std::fs::remove_file(dir.join(name));
    }
    if parent.storage.save(&dir.join(PARENT_NAMES[0])).is_err()
        || std::fs::hard_link(dir.join(PARENT_NAMES[0]), dir.join(PARENT_NAMES[1])).is_err()
    {
        return;
    }
    let options = OpenOptions {
        read_only: child.read_only,
        ..Default::default()
    };
    let _ = vdisk_mount::info::image_info(&child_path, &options);
    let Ok(disk) = open(&child_path, &options) else {
        return;
    };
    let size = disk.size();
    let _ = disk.allocation(0, size);
    for i in 0..SAMPLES {
        let offset = size / SAMPLES * i;
        let mut buf = vec![0u8; (size - offset).min(PIECE) as usize];
        let _ = disk.read_at(&mut buf, offset);
        if !disk.is_read_only() && i % 8 == 0 {
            let written = vec![0x5A; buf.len()];
            if disk.write_at(&written, offset).is_ok() {
                disk.read_at(&mut buf, offset).unwrap();
                assert_eq!(buf, written, "a write at {offset:#x} does not read back");
            }
        }
    }
    let _ = disk.close();
});

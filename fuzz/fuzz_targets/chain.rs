//! A differencing child and its parent, both made of fuzzer bytes, opened through the
//! chain code with the parent in memory: the child names its parent by path and identity,
//! and the parent is found, checked and opened read-only by the same rules as on the host.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vdisk_mount::chain::ImageContext;
use vdisk_mount::storage::Storage;
use vdisk_mount::{OpenOptions, open_storage_in};
use vdisk_mount_fuzz::{Bytes, decode_image};

/// Where the child sits, and the names a seed's child gives its parent beside it.
const CHILD: &str = "/fuzz/child";
const PARENT_NAMES: [&str; 2] = ["/fuzz/parent.vhd", "/fuzz/parent.vhdx"];
const SAMPLES: u64 = 32;
const PIECE: u64 = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    let child = decode_image(&mut bytes);
    let parent: Arc<dyn Storage> = Arc::new(decode_image(&mut bytes).storage);
    let context = || {
        let files = PARENT_NAMES
            .iter()
            .map(|name| (PathBuf::from(name), parent.clone()))
            .collect::<BTreeMap<_, _>>();
        ImageContext::in_memory(Path::new(CHILD), files)
    };
    let options = OpenOptions {
        read_only: child.read_only,
        ..Default::default()
    };
    let _ = vdisk_mount::info::describe_storage(
        Path::new(CHILD),
        Box::new(child.storage.snapshot()),
        &options,
        &context(),
    );
    let Ok(disk) = open_storage_in(Box::new(child.storage), &options, &context()) else {
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

//! Opens an image made of fuzzer bytes (probing its format; VHDX logs are replayed, in
//! memory for read-only opens), describes it as `vdisk info` does, maps its allocation
//! and reads across the whole disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use vdisk_mount::chain::ImageContext;
use vdisk_mount::{OpenOptions, open_storage};
use vdisk_mount_fuzz::{Bytes, decode_image};

/// Reads this many pieces spread over the disk, and the start of as many data extents.
const SAMPLES: u64 = 16;
const PIECE: u64 = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    let image = decode_image(&mut Bytes(data));
    let options = OpenOptions {
        read_only: image.read_only,
        ..Default::default()
    };
    let _ = vdisk_mount::info::describe_storage(
        Path::new("fuzz.img"),
        Box::new(image.storage.snapshot()),
        &options,
        &ImageContext::detached(),
    );
    let Ok(disk) = open_storage(Box::new(image.storage), &options) else {
        return;
    };
    let size = disk.size();
    if let Ok(extents) = disk.allocation(0, size) {
        let mut next = 0;
        for e in &extents {
            assert_eq!(e.offset, next, "extents leave a gap or overlap");
            next = e.offset + e.len;
        }
        assert_eq!(next, size, "extents do not cover the disk");
        for e in extents
            .iter()
            .filter(|e| e.state == vdisk_mount::Allocation::Data)
            .take(SAMPLES as usize)
        {
            let mut buf = vec![0u8; e.len.min(PIECE) as usize];
            let _ = disk.read_at(&mut buf, e.offset);
        }
    }
    for i in 0..SAMPLES {
        let offset = size / SAMPLES * i;
        let mut buf = vec![0u8; (size - offset).min(PIECE) as usize];
        let _ = disk.read_at(&mut buf, offset);
    }
    let _ = disk.close();
});

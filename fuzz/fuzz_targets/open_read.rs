//! Opens an image made of fuzzer bytes (probing its format; VHDX logs are replayed, in
//! memory for read-only opens), describes it as `vdisk info` does, checks it as `vdisk
//! check` does and repairs a copy as `--repair=all` does (which must leave no corruption
//! it says it repairs), maps its allocation and reads across the whole disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::Arc;
use vdisk_mount::chain::ImageContext;
use vdisk_mount::check::{CheckOptions, check_storage};
use vdisk_mount::finding::{Fix, RepairLevel, Severity};
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
    let fuzz_img = Path::new("fuzz.img");
    let checked = check_storage(
        fuzz_img,
        Arc::new(image.storage.snapshot()),
        &ImageContext::detached(),
        &CheckOptions::default(),
    );
    if let Ok(report) = checked
        && report.subtype.is_some()
    {
        let repair = CheckOptions {
            repair: Some(RepairLevel::All),
        };
        let storage = Arc::new(image.storage.snapshot());
        if let Ok(repaired) = check_storage(fuzz_img, storage, &ImageContext::detached(), &repair) {
            let left = repaired
                .findings
                .iter()
                .filter(|f| f.severity == Severity::Corruption);
            for finding in left {
                assert_eq!(finding.fix, Fix::None, "{repaired}");
            }
        }
    }
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

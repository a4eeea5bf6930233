//! A raw disk made of fuzzer bytes, of 512- or 4096-byte sectors as the first byte says,
//! its GPT checksums resealed when that byte asks, and its partition table read as the
//! mount reads it: the partitions served must lie inside the disk, apart from each
//! other, numbered below Linux's limit, and the ranges the table came from in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdisk_mount::partition::{read_partition_table, seal_checksums};
use vdisk_mount::raw::RawDisk;
use vdisk_mount::{OpenOptions, VirtualDisk};
use vdisk_mount_fuzz::{Bytes, decode_image};

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    let flags = bytes.u8();
    let image = decode_image(&mut bytes);
    let Ok(disk) = RawDisk::open(Box::new(image.storage), &OpenOptions::default()) else {
        return;
    };
    let disk = match flags & 1 {
        0 => disk,
        _ => disk.with_4k_sectors(),
    };
    if flags & 2 != 0 {
        seal_checksums(&disk);
    }
    let table = read_partition_table(&disk).expect("an in-memory disk reads without error");
    let mut previous = 0;
    for p in &table.partitions {
        assert!(p.number > previous && p.number < 256, "{table:?}");
        previous = p.number;
        assert!(p.len > 0 && p.offset + p.len <= disk.size(), "{table:?}");
    }
    let mut spans: Vec<_> = table.partitions.iter().map(|p| (p.offset, p.len)).collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[0].0 + pair[0].1 <= pair[1].0, "overlap in {table:?}");
    }
    for pair in table.table_ranges.windows(2) {
        assert!(pair[0].end < pair[1].start, "{:?}", table.table_ranges);
    }
});

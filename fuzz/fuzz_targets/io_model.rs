//! Opens an image made of fuzzer bytes read/write, runs a fuzzer-chosen sequence of reads,
//! writes, discards, flushes and allocation queries, closes it, and opens it again; then
//! compacts it and opens it once more. Every image that opened once must open again, and
//! read back what was written and discarded, before the close, after it, and after the
//! compaction (whether or not the compaction succeeded).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use vdisk_mount::chain::{ImageContext, open_chain};
use vdisk_mount::compact::{CompactOptions, compact_layer};
use vdisk_mount::storage::Storage;
use vdisk_mount::{OpenOptions, VirtualDisk, open_storage};
use vdisk_mount_fuzz::{Bytes, decode_image};

const MAX_OPS: usize = 64;
const PAGE: u64 = 4096;
/// Largest image file the target compacts.
const MAX_COMPACTED_FILE: u64 = 64 << 20;

/// One page of the model: its bytes, and which of them are known.
type ModelPage = (Box<[u8; PAGE as usize]>, Box<[bool; PAGE as usize]>);

/// What this session knows the disk holds: bytes written or discarded, page by page.
#[derive(Default)]
struct Model {
    pages: HashMap<u64, ModelPage>,
}

impl Model {
    /// Records that `[offset, offset + len)` holds `data`, or is unknown (`None`: the
    /// request failed, so either content may be there).
    fn set(&mut self, offset: u64, data: Option<&[u8]>, len: u64) {
        let mut at = offset;
        while at < offset + len {
            let in_page = (at % PAGE) as usize;
            let n = (PAGE as usize - in_page).min((offset + len - at) as usize);
            let page = self.pages.entry(at / PAGE).or_insert_with(|| {
                (
                    Box::new([0; PAGE as usize]),
                    Box::new([false; PAGE as usize]),
                )
            });
            let from = (at - offset) as usize;
            match data {
                Some(data) => {
                    page.0[in_page..in_page + n].copy_from_slice(&data[from..from + n]);
                    page.1[in_page..in_page + n].fill(true);
                }
                None => page.1[in_page..in_page + n].fill(false),
            }
            at += n as u64;
        }
    }

    /// Fails where `disk` disagrees with a byte this model knows. Only known bytes are
    /// read: the rest of a page may lie in a block whose reads fail by design (a
    /// PARTIALLY_PRESENT block of an image without a parent).
    fn check(&self, disk: &dyn VirtualDisk, when: &str) {
        for (&page, (data, known)) in &self.pages {
            let mut i = 0;
            while i < PAGE as usize {
                if !known[i] {
                    i += 1;
                    continue;
                }
                let run = known[i..].iter().take_while(|&&k| k).count();
                let offset = page * PAGE + i as u64;
                let mut buf = vec![0u8; run];
                disk.read_at(&mut buf, offset)
                    .unwrap_or_else(|e| panic!("{when}: reading known data at {offset:#x}: {e}"));
                if let Some(at) = (0..run).find(|&j| buf[j] != data[i + j]) {
                    panic!(
                        "{when}: byte {:#x} reads {:#04x}, expected {:#04x}",
                        offset + at as u64,
                        buf[at],
                        data[i + at]
                    );
                }
                i += run;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    let image = decode_image(&mut bytes);
    let options = OpenOptions::default();
    let storage = std::sync::Arc::new(image.storage);
    let Ok(disk) = open_storage(Box::new(storage.clone()), &options) else {
        return;
    };
    let size = disk.size();
    if size == 0 {
        return;
    }
    let mut model = Model::default();
    for _ in 0..MAX_OPS {
        if bytes.is_empty() {
            break;
        }
        let kind = bytes.u8();
        let raw = u64::from(bytes.u32()) * 512 % size;
        let offset = if kind & 0x80 != 0 {
            size - 1 - raw
        } else {
            raw
        };
        let len = u64::from(bytes.u16()).min(size - offset);
        let fill = bytes.u8();
        match kind % 5 {
            0 => {
                let mut buf = vec![0u8; len as usize];
                let _ = disk.read_at(&mut buf, offset);
            }
            1 => {
                let buf: Vec<u8> = (0..len).map(|i| fill ^ (i as u8)).collect();
                let result = disk.write_at(&buf, offset);
                model.set(offset, result.is_ok().then_some(&buf[..]), len);
            }
            2 => {
                let result = disk.discard(offset, len);
                let zeros = vec![0u8; len as usize];
                model.set(offset, result.is_ok().then_some(&zeros[..]), len);
            }
            3 => {
                let _ = disk.flush();
            }
            _ => {
                let _ = disk.allocation(offset, len);
            }
        }
    }
    if disk.is_read_only() {
        return;
    }
    model.check(disk.as_ref(), "before close");
    let closed = disk.close();
    drop(disk);
    let reopened = open_storage(Box::new(storage.snapshot()), &options).unwrap_or_else(|e| {
        panic!("image opened, was used (close: {closed:?}), then failed to open: {e}")
    });
    assert_eq!(reopened.size(), size);
    if closed.is_err() {
        return;
    }
    model.check(reopened.as_ref(), "after reopen");
    drop(reopened);

    let storage = std::sync::Arc::new(storage.snapshot());
    // Compaction reads and copies every block: keep it to files a run gets through fast.
    if storage.len().is_ok_and(|len| len > MAX_COMPACTED_FILE) {
        return;
    }
    let layer = open_chain(Box::new(storage.clone()), &options, &ImageContext::detached())
        .unwrap_or_else(|e| panic!("image reopened once, then failed to open: {e}"));
    let compact_options = CompactOptions {
        zero_blocks: bytes.is_empty() || bytes.u8() & 1 == 1,
        force: false,
    };
    let compacted = compact_layer(layer.as_ref(), &compact_options, &mut |_| {});
    drop(layer);
    let compacted_disk = open_storage(Box::new(storage.snapshot()), &options)
        .unwrap_or_else(|e| panic!("image failed to open after compaction ({compacted:?}): {e}"));
    assert_eq!(compacted_disk.size(), size);
    model.check(compacted_disk.as_ref(), "after compaction");
});

use super::*;
use crate::disk::{Allocation, DiscardMode, VhdSizeRule};
use crate::storage::{MemStorage, PendingOp, Survives};
use footer::NO_DATA_OFFSET;
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use std::sync::Arc;

/// Small blocks keep images tiny while exercising every path.
pub(crate) const BLOCK: u32 = 4096;
pub(crate) const SPAN: u64 = 4096 + 512;

/// Where the data of the `i`th block allocated after the footer at `footer_at` goes:
/// on the first page boundary that leaves room for the bitmap before it. Blocks of
/// 4 KiB then take two pages each: the bitmap at the end of one, the data in the next.
pub(crate) fn new_block_data_at(footer_at: u64, i: u64) -> u64 {
    (footer_at + 512).next_multiple_of(4096) + i * 2 * 4096
}

pub(crate) fn footer_for(size: u64, disk_type: DiskType) -> Footer {
    Footer {
        features: 2,
        version: 0x0001_0000,
        data_offset: if disk_type == DiskType::Fixed {
            NO_DATA_OFFSET
        } else {
            512
        },
        timestamp: 0,
        creator_app: *b"test",
        creator_version: 0x0001_0000,
        creator_host_os: *b"Wi2k",
        original_size: size,
        current_size: size,
        geometry: Geometry::for_size(size),
        disk_type,
        unique_id: [9; 16],
        saved_state: 0,
    }
}

pub(crate) fn header_for(entries: u32, block_size: u32) -> DynamicHeader {
    DynamicHeader {
        data_offset: u64::MAX,
        table_offset: 1536,
        version: 0x0001_0000,
        max_table_entries: entries,
        block_size,
        parent_unique_id: [0; 16],
        parent_timestamp: 0,
        parent_name: [0; 512],
        parent_locators: [0; dynamic_header::PARENT_LOCATORS_LEN],
    }
}

/// An empty dynamic image laid out as qemu-img and Hyper-V do: footer copy, header at
/// 512, BAT at 1536, footer.
pub(crate) fn assemble(footer: &Footer, header: &DynamicHeader) -> Vec<u8> {
    let mut image = footer.serialize().to_vec();
    image.extend_from_slice(&header.serialize());
    image.resize(header.table_offset as usize, 0);
    image.extend(std::iter::repeat_n(
        0xFF,
        bat::table_bytes(header.max_table_entries) as usize,
    ));
    image.extend_from_slice(&footer.serialize());
    image
}

pub(crate) fn dynamic_image(size: u64) -> Vec<u8> {
    let entries = size.div_ceil(u64::from(BLOCK)) as u32;
    assemble(
        &footer_for(size, DiskType::Dynamic),
        &header_for(entries, BLOCK),
    )
}

fn fixed_image(data: &[u8]) -> Vec<u8> {
    let mut image = data.to_vec();
    image.extend_from_slice(&footer_for(data.len() as u64, DiskType::Fixed).serialize());
    image
}

pub(crate) type BeforeOp = dyn Fn(&MemStorage) + Send + Sync;

/// A storage the test keeps a handle on, optionally calling a hook ahead of every
/// request that changes the file. With a hook, those requests run one at a time, each
/// right after its hook: the file stands still while a hook looks at it, however many
/// writers run.
pub(crate) struct Shared {
    pub(crate) inner: Arc<MemStorage>,
    before_op: Option<Box<BeforeOp>>,
    one_at_a_time: parking_lot::Mutex<()>,
}

impl Shared {
    pub(crate) fn new(inner: Arc<MemStorage>) -> Box<Shared> {
        Box::new(Shared {
            inner,
            before_op: None,
            one_at_a_time: parking_lot::Mutex::new(()),
        })
    }

    pub(crate) fn with_hook(
        inner: Arc<MemStorage>,
        hook: impl Fn(&MemStorage) + Send + Sync + 'static,
    ) -> Box<Shared> {
        Box::new(Shared {
            inner,
            before_op: Some(Box::new(hook)),
            one_at_a_time: parking_lot::Mutex::new(()),
        })
    }

    /// Runs the hook; the request goes ahead while the returned guard lives.
    fn hook(&self) -> Option<parking_lot::MutexGuard<'_, ()>> {
        let hook = self.before_op.as_ref()?;
        let turn = self.one_at_a_time.lock();
        hook(&self.inner);
        Some(turn)
    }
}

impl Storage for Shared {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let _turn = self.hook();
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        let _turn = self.hook();
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let _turn = self.hook();
        self.inner.set_len(len)
    }
}

pub(crate) fn open_vec(image: Vec<u8>) -> Result<VhdDisk> {
    VhdDisk::open(
        Box::new(MemStorage::from_vec(image)),
        &OpenOptions::default(),
    )
}

/// Like `assert_eq!` on byte slices, but names the first difference instead of
/// printing whole disks.
pub(crate) fn assert_same(found: &[u8], expected: &[u8]) {
    assert_eq!(found.len(), expected.len(), "lengths differ");
    if let Some(at) = found.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "first difference at byte {at}: found {:#x}, expected {:#x}",
            found[at], expected[at]
        );
    }
}

pub(crate) fn read_all(disk: &VhdDisk) -> Vec<u8> {
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

fn random_writes(disk: &VhdDisk, model: &mut [u8], rng: &mut StdRng, count: usize) {
    for _ in 0..count {
        let len = rng.random_range(1..3 * BLOCK as usize);
        let offset = rng.random_range(0..model.len() - len + 1);
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        disk.write_at(&data, offset as u64).unwrap();
        model[offset..offset + len].copy_from_slice(&data);
    }
}

#[test]
fn random_writes_match_a_flat_model() {
    let size = 37 * u64::from(BLOCK) + 3 * 512;
    let mut rng = StdRng::seed_from_u64(7);
    for image in [dynamic_image(size), fixed_image(&vec![0; size as usize])] {
        let storage = Arc::new(MemStorage::from_vec(image));
        let disk = VhdDisk::open(Shared::new(storage.clone()), &OpenOptions::default()).unwrap();
        assert_eq!(disk.size(), size);
        let mut model = vec![0u8; size as usize];
        random_writes(&disk, &mut model, &mut rng, 60);
        // The last byte and the last sector.
        disk.write_at(b"Z", size - 1).unwrap();
        model[size as usize - 1] = b'Z';
        for _ in 0..200 {
            let len = rng.random_range(0..2 * BLOCK as usize);
            let offset = rng.random_range(0..model.len() - len + 1);
            let mut buf = vec![0u8; len];
            disk.read_at(&mut buf, offset as u64).unwrap();
            assert_same(&buf, &model[offset..offset + len]);
        }
        disk.close().unwrap();
        let reopened = open_vec(storage.contents()).unwrap();
        assert_same(&read_all(&reopened), &model);
    }
}

#[test]
fn blocks_over_2_mib_carry_longer_bitmaps() {
    // 4 MiB blocks: 8192 sectors need a 1024-byte bitmap.
    let block = 4u64 << 20;
    let size = 2 * block + 4096;
    let footer = footer_for(size, DiskType::Dynamic);
    let image = assemble(&footer, &header_for(3, block as u32));
    let base = image.len() as u64 - 512;
    let storage = Arc::new(MemStorage::from_vec(image));
    let disk = VhdDisk::open(Shared::new(storage.clone()), &OpenOptions::default()).unwrap();
    disk.write_at(&[6; 3000], block - 1000).unwrap();
    disk.write_at(&[7; 100], size - 100).unwrap();
    disk.close().unwrap();
    let image = storage.contents();
    // Each block's data starts on a page boundary, its 1024-byte bitmap right before.
    let data_at = |i: u64| (base + 1024).next_multiple_of(4096) + i * (block + 4096);
    assert_eq!(image.len() as u64, data_at(2) + block + 512);
    let bitmap = data_at(0) as usize - 1024..data_at(0) as usize;
    assert!(image[bitmap].iter().all(|&b| b == 0xFF));
    assert_eq!(image[(data_at(0) + block - 1000) as usize], 6);
    let mut expected = vec![0u8; size as usize];
    expected[block as usize - 1000..block as usize + 2000].fill(6);
    expected[size as usize - 100..].fill(7);
    assert_same(&read_all(&open_vec(image).unwrap()), &expected);
}

#[test]
fn new_blocks_put_their_data_on_page_boundaries() {
    // 2 MiB blocks, as Windows and qemu make them: 512-byte bitmap, so a block placed
    // right at the footer would start its data 512 bytes past a page boundary.
    let block = 2u64 << 20;
    let size = 4 * block;
    let image = assemble(
        &footer_for(size, DiskType::Dynamic),
        &header_for(4, block as u32),
    );
    let storage = Arc::new(MemStorage::from_vec(image));
    let disk = VhdDisk::open(Shared::new(storage.clone()), &OpenOptions::default()).unwrap();
    for (i, b) in [2u64, 0, 3].into_iter().enumerate() {
        disk.write_at(&[i as u8 + 1; 4096], b * block + 4096)
            .unwrap();
    }
    disk.close().unwrap();
    let image = storage.contents();
    let d = disk.dynamic.as_ref().unwrap();
    let bat = d.bat.read();
    let mut previous_end = 2048;
    for b in [2u64, 0, 3] {
        let bitmap_at = bat.block_offset(b).unwrap() as usize;
        let data_at = bitmap_at + 512;
        assert_eq!(data_at % 4096, 0, "block {b} data at {data_at:#x}");
        // Less than a page is given up, and it holds zeros, not the old footer.
        assert!(bitmap_at - previous_end < 4096);
        assert!(image[previous_end..bitmap_at].iter().all(|&x| x == 0));
        previous_end = data_at + block as usize;
    }
    assert_eq!(image.len(), previous_end + 512);
    let mut expected = vec![0u8; size as usize];
    for (i, b) in [2usize, 0, 3].into_iter().enumerate() {
        let at = b * block as usize + 4096;
        expected[at..at + 4096].fill(i as u8 + 1);
    }
    assert_same(&read_all(&open_vec(image).unwrap()), &expected);

    // Blocks smaller than a page are not padded: each takes exactly its span.
    let image = assemble(&footer_for(8 * 512, DiskType::Dynamic), &header_for(8, 512));
    let old_len = image.len();
    let disk = open_vec(image).unwrap();
    disk.write_at(&[1; 3 * 512], 512).unwrap();
    disk.close().unwrap();
    assert_eq!(disk.storage.len().unwrap() as usize, old_len + 3 * 1024);
}

#[test]
fn unwritten_blocks_read_as_zeros_and_stay_unallocated() {
    let size = 8 * u64::from(BLOCK);
    let storage = Arc::new(MemStorage::from_vec(dynamic_image(size)));
    let disk = VhdDisk::open(Shared::new(storage.clone()), &OpenOptions::default()).unwrap();
    let mut buf = vec![0xAAu8; 3 * BLOCK as usize];
    disk.read_at(&mut buf, 100).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(storage.write_count(), 0);
    disk.write_at(&[1; 10], u64::from(BLOCK) * 2 + 5).unwrap();
    assert_eq!(disk.allocated_blocks(), Some(1));
    assert_eq!(
        disk.allocation(0, size).unwrap(),
        vec![
            Extent {
                offset: 0,
                len: 2 * u64::from(BLOCK),
                state: Allocation::Zero
            },
            Extent {
                offset: 2 * u64::from(BLOCK),
                len: u64::from(BLOCK),
                state: Allocation::Data
            },
            Extent {
                offset: 3 * u64::from(BLOCK),
                len: 5 * u64::from(BLOCK),
                state: Allocation::Zero
            },
        ]
    );
    // The block sits where the footer was, moved up so its data starts on a page
    // boundary; the old footer is cleared, the bitmap all ones, and the footer moved (past
    // the block once closed, which cuts off the room made for more).
    disk.close().unwrap();
    let image = storage.contents();
    let old_end = dynamic_image(size).len() - 512;
    let data_at = new_block_data_at(old_end as u64, 0) as usize;
    assert_eq!(image.len(), data_at + BLOCK as usize + 512);
    assert!(image[old_end..data_at - 512].iter().all(|&b| b == 0));
    assert!(image[data_at - 512..data_at].iter().all(|&b| b == 0xFF));
    assert_eq!(&image[image.len() - 512..], &image[..512]);
}

/// Records every read after open.
struct ReadLog {
    inner: MemStorage,
    reads: Arc<parking_lot::Mutex<Vec<(u64, usize)>>>,
}

impl Storage for ReadLog {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.reads.lock().push((offset, buf.len()));
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

#[test]
fn reads_touch_only_block_data_once_per_block() {
    let size = 6 * u64::from(BLOCK);
    let image = {
        let disk = open_vec(dynamic_image(size)).unwrap();
        disk.write_at(&[1; 10], u64::from(BLOCK)).unwrap();
        disk.write_at(&[2; 10], 3 * u64::from(BLOCK)).unwrap();
        disk.storage.flush().unwrap();
        let mut image = vec![0u8; disk.storage.len().unwrap() as usize];
        disk.storage.read_at(&mut image, 0).unwrap();
        image
    };
    let reads = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let disk = VhdDisk::open(
        Box::new(ReadLog {
            inner: MemStorage::from_vec(image),
            reads: reads.clone(),
        }),
        &OpenOptions::default(),
    )
    .unwrap();
    reads.lock().clear();
    // Blocks 0 to 4: two allocated, three not.
    let mut buf = vec![0u8; 5 * BLOCK as usize - 20];
    disk.read_at(&mut buf, 10).unwrap();
    assert_eq!(buf[BLOCK as usize - 10], 1);
    assert_eq!(buf[3 * BLOCK as usize - 10], 2);
    assert_eq!(
        *reads.lock(),
        vec![
            (new_block_data_at(2048, 0), BLOCK as usize),
            (new_block_data_at(2048, 1), BLOCK as usize)
        ]
    );
}

#[test]
fn allocation_writes_data_before_the_bat_entry() {
    let storage = Arc::new(MemStorage::from_vec(dynamic_image(4 * u64::from(BLOCK))));
    let disk = VhdDisk::open(Shared::new(storage.clone()), &OpenOptions::default()).unwrap();
    let flushes = storage.flush_count();
    disk.write_at(&[5; 512], 512).unwrap();
    // Footer flushed, then bitmap and data flushed; the BAT entry waits for the next
    // flush like any other write.
    assert_eq!(storage.flush_count(), flushes + 2);
    match storage.pending().as_slice() {
        // The bitmap sector before the first page-aligned data after the footer at 2048.
        [PendingOp::Write { offset: 1536, data }] => assert_eq!(data, &[0, 0, 0, 7]),
        other => panic!("unexpected pending writes {other:?}"),
    }
}

#[test]
fn fixed_disks_are_all_data_and_discard_zeroes() {
    let data: Vec<u8> = (0..16 * 512).map(|i| (i % 251) as u8).collect();
    let disk = open_vec(fixed_image(&data)).unwrap();
    assert_eq!(disk.disk_type(), DiskType::Fixed);
    assert_eq!(disk.block_size(), None);
    assert_eq!(
        disk.allocation(0, disk.size()).unwrap(),
        vec![Extent {
            offset: 0,
            len: disk.size(),
            state: Allocation::Data
        }]
    );
    assert_same(&read_all(&disk), &data);
    disk.discard(1000, 3000).unwrap();
    let mut expected = data.clone();
    expected[1000..4000].fill(0);
    assert_same(&read_all(&disk), &expected);
}

#[test]
fn discard_zeroes_allocated_parts_without_allocating() {
    let size = 6 * u64::from(BLOCK);
    let disk = open_vec(dynamic_image(size)).unwrap();
    disk.write_at(&vec![7; BLOCK as usize], u64::from(BLOCK))
        .unwrap();
    disk.discard(100, 2 * u64::from(BLOCK) - 200).unwrap();
    assert_eq!(disk.allocated_blocks(), Some(1));
    let mut expected = vec![0u8; size as usize];
    expected[2 * BLOCK as usize - 100..2 * BLOCK as usize].fill(7);
    assert_same(&read_all(&disk), &expected);
}

#[test]
fn requests_outside_the_disk_are_refused() {
    let disk = open_vec(dynamic_image(4 * u64::from(BLOCK))).unwrap();
    let size = disk.size();
    let mut buf = [0u8; 2];
    for offset in [size - 1, size, u64::MAX] {
        assert!(matches!(
            disk.read_at(&mut buf, offset).unwrap_err().kind(),
            ErrorKind::OutOfRange { .. }
        ));
        assert!(disk.write_at(&buf, offset).is_err());
    }
    assert!(disk.allocation(size, 1).is_err());
    assert!(disk.discard(1, u64::MAX).is_err());
    assert_eq!(disk.allocated_blocks(), Some(0));
}

#[test]
fn read_only_opens_never_write() {
    let storage = Arc::new(MemStorage::from_vec(dynamic_image(4 * u64::from(BLOCK))));
    let options = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let disk = VhdDisk::open(Shared::new(storage.clone()), &options).unwrap();
    assert!(disk.is_read_only());
    assert_eq!(disk.write_at(&[1], 0).unwrap_err().errno(), libc::EROFS);
    assert_eq!(disk.discard(0, 512).unwrap_err().errno(), libc::EROFS);
    read_all(&disk);
    disk.flush().unwrap();
    disk.close().unwrap();
    assert_eq!(storage.write_count(), 0);
    assert_eq!(storage.flush_count(), 0);
}

#[test]
fn accessors_describe_the_image() {
    let disk = open_vec(dynamic_image(20 << 20)).unwrap();
    assert_eq!(disk.disk_type(), DiskType::Dynamic);
    assert_eq!(&disk.creator_app(), b"test");
    assert_eq!(disk.unique_id().as_bytes(), &[9; 16]);
    assert_eq!(disk.block_size(), Some(u64::from(BLOCK)));
    assert_eq!(disk.allocated_blocks(), Some(0));
    assert_eq!(disk.geometry(), Geometry::for_size(20 << 20));
    assert_eq!(disk.format(), Format::Vhd);
    assert_eq!(disk.logical_sector_size(), 512);
}

#[test]
fn size_follows_the_creator_and_the_option() {
    let size = 20u64 << 20;
    let chs = Geometry::for_size(size).bytes();
    assert!(chs < size);
    for (app, rule, expected) in [
        (*b"test", VhdSizeRule::Auto, size),
        (*b"vpc ", VhdSizeRule::Auto, chs),
        (*b"qemu", VhdSizeRule::Auto, chs),
        (*b"qemu", VhdSizeRule::CurrentSize, size),
        (*b"win ", VhdSizeRule::Chs, chs),
    ] {
        let mut footer = footer_for(size, DiskType::Dynamic);
        footer.creator_app = app;
        let image = assemble(&footer, &header_for(5120, BLOCK));
        let options = OpenOptions {
            vhd_size_rule: rule,
            ..Default::default()
        };
        let disk = VhdDisk::open(Box::new(MemStorage::from_vec(image)), &options).unwrap();
        assert_eq!(disk.size(), expected, "{app:?} {rule:?}");
    }
}

#[test]
fn a_damaged_trailing_footer_falls_back_to_the_copy() {
    let size = 4 * u64::from(BLOCK);
    let mut image = dynamic_image(size);
    let end = image.len();
    image[end - 100] ^= 1;
    let disk = open_vec(image.clone()).unwrap();
    // The next block must not land inside the damaged footer's leftovers.
    disk.write_at(&[3; 512], 0).unwrap();
    disk.flush().unwrap();
    let mut buf = [0u8; 512];
    disk.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [3; 512]);

    // A missing footer (file cut short) is the same case.
    image.truncate(end - 512);
    assert_eq!(open_vec(image.clone()).unwrap().size(), size);
    // Both copies bad: the trailing footer's problem is reported.
    image[20] ^= 1;
    let mut with_bad_footer = image.clone();
    with_bad_footer.extend_from_slice(&dynamic_image(size)[end - 512..]);
    with_bad_footer[end - 1] ^= 1;
    let err = open_vec(with_bad_footer).unwrap_err();
    assert_eq!(err.corruption_kind(), Some(CorruptionKind::BadChecksum));
    assert!(
        err.to_string().starts_with("VHD footer: Checksum field"),
        "{err}"
    );
}

#[test]
fn leftovers_after_the_last_block_never_show_in_a_new_block() {
    // A crash can leave a written block that the BAT never took, and no footer after
    // it; the copy at offset 0 still opens the image.
    let size = 4 * u64::from(BLOCK);
    let mut image = dynamic_image(size);
    image.truncate(image.len() - 512);
    image.extend(std::iter::repeat_n(0xAB, SPAN as usize + 100));
    let storage = Arc::new(MemStorage::from_vec(image));
    let disk = VhdDisk::open(Shared::new(storage.clone()), &OpenOptions::default()).unwrap();
    disk.write_at(&[1], u64::from(BLOCK) + 7).unwrap();
    disk.flush().unwrap();
    let mut expected = vec![0u8; size as usize];
    expected[BLOCK as usize + 7] = 1;
    assert_same(&read_all(&disk), &expected);
    disk.close().unwrap();
    let image = storage.contents();
    assert_eq!(image.len() as u64, new_block_data_at(2048, 0) + 4096 + 512);
    assert_eq!(&image[image.len() - 512..], &image[..512]);
    assert_same(&read_all(&open_vec(image).unwrap()), &expected);
}

#[test]
fn legacy_short_footers_are_read_and_replaced() {
    let size = 4 * u64::from(BLOCK);
    let mut image = dynamic_image(size);
    image.pop();
    let storage = Arc::new(MemStorage::from_vec(image));
    let disk = VhdDisk::open(Shared::new(storage.clone()), &OpenOptions::default()).unwrap();
    assert_eq!(disk.size(), size);
    disk.write_at(&[8; 100], 3 * u64::from(BLOCK)).unwrap();
    disk.close().unwrap();
    let image = storage.contents();
    assert_eq!(image.len() as u64, new_block_data_at(2048, 0) + 4096 + 512);
    assert_eq!(read_all(&open_vec(image).unwrap())[3 * BLOCK as usize], 8);

    let mut fixed = fixed_image(&[4; 1024]);
    fixed.pop();
    assert_same(&read_all(&open_vec(fixed).unwrap()), &vec![4; 1024]);
}

#[test]
fn a_fixed_disk_is_never_read_from_a_copy_at_offset_0() {
    // Disk data that starts with a valid-looking fixed footer, and a damaged trailer.
    let mut image = fixed_image(&[0; 2048]);
    let footer = image[2048..].to_vec();
    image[..512].copy_from_slice(&footer);
    let end = image.len();
    image[end - 1] ^= 1;
    let err = open_vec(image).unwrap_err();
    assert_eq!(err.corruption_kind(), Some(CorruptionKind::BadChecksum));
}

fn open_error(image: Vec<u8>) -> (Option<CorruptionKind>, String) {
    let err = open_vec(image).unwrap_err();
    (err.corruption_kind(), err.to_string())
}

/// A dynamic image with one allocated block whose BAT entry 1 is `sector`.
fn image_with_entry(sector: u32) -> Vec<u8> {
    let mut image = dynamic_image(4 * u64::from(BLOCK));
    image[1536 + 4..1536 + 8].copy_from_slice(&sector.to_be_bytes());
    image
}

#[test]
fn bat_entries_outside_the_block_area_are_refused() {
    for (sector, problem) in [
        (0u32, "overlaps the footer copy"),
        (1, "overlaps the dynamic header"),
        (2, "overlaps the dynamic header"),
        (3, "overlaps the BAT"),
        (4, "runs past the footer"),
        (0xFFFF_FFFE, "runs past the footer"),
    ] {
        let (kind, msg) = open_error(image_with_entry(sector));
        assert_eq!(kind, Some(CorruptionKind::OutOfBounds), "{msg}");
        assert!(msg.starts_with("BAT entry 1: "), "{msg}");
        assert!(msg.contains(problem), "{msg}");
    }
}

#[test]
fn entries_past_the_disk_end_are_ignored() {
    let size = 4 * u64::from(BLOCK);
    let footer = footer_for(size, DiskType::Dynamic);
    let mut image = assemble(&footer, &header_for(6, BLOCK));
    image[1536 + 5 * 4..1536 + 6 * 4].copy_from_slice(&7u32.to_be_bytes());
    let disk = open_vec(image).unwrap();
    assert_eq!(disk.allocated_blocks(), Some(0));
    assert_same(&read_all(&disk), &vec![0; size as usize]);
}

#[test]
fn bad_tables_and_offsets_are_refused() {
    let size = 4 * u64::from(BLOCK);
    let footer = footer_for(size, DiskType::Dynamic);

    let (kind, msg) = open_error(assemble(&footer, &header_for(3, BLOCK)));
    assert_eq!(kind, Some(CorruptionKind::InvalidField));
    assert!(msg.contains("Max Table Entries 3 is too small"), "{msg}");

    let mut header = header_for(4, BLOCK);
    header.table_offset = 512 + 100;
    let (kind, msg) = open_error(assemble(&footer, &header_for(4, BLOCK)).tap_table(&header));
    assert_eq!(kind, Some(CorruptionKind::OutOfBounds));
    assert!(msg.starts_with("VHD dynamic header: Table Offset"), "{msg}");

    header.table_offset = 1 << 40;
    let (kind, msg) = open_error(assemble(&footer, &header_for(4, BLOCK)).tap_table(&header));
    assert_eq!(kind, Some(CorruptionKind::OutOfBounds));
    assert!(msg.contains("Table Offset"), "{msg}");

    for data_offset in [0u64, 100, 1 << 40, u64::MAX - 10] {
        let mut footer = footer.clone();
        footer.data_offset = data_offset;
        let (kind, msg) = open_error(assemble(&footer, &header_for(4, BLOCK)));
        assert_eq!(kind, Some(CorruptionKind::OutOfBounds));
        assert!(msg.starts_with("VHD footer: Data Offset"), "{msg}");
    }

    let mut huge = footer.clone();
    huge.current_size = MAX_DISK_SIZE + 512;
    let (kind, msg) = open_error(assemble(&huge, &header_for(4, BLOCK)));
    assert_eq!(kind, Some(CorruptionKind::InvalidField));
    assert!(msg.contains("exceeds the VHD limit"), "{msg}");

    let mut bad_header = assemble(&footer, &header_for(4, BLOCK));
    bad_header[600] ^= 1;
    let (kind, msg) = open_error(bad_header);
    assert_eq!(kind, Some(CorruptionKind::BadChecksum));
    assert!(msg.starts_with("VHD dynamic header: Checksum"), "{msg}");
}

/// Rewrites the header of an assembled image.
trait TapTable {
    fn tap_table(self, header: &DynamicHeader) -> Vec<u8>;
}

impl TapTable for Vec<u8> {
    fn tap_table(mut self, header: &DynamicHeader) -> Vec<u8> {
        self[512..1536].copy_from_slice(&header.serialize());
        self
    }
}

#[test]
fn tables_too_large_to_keep_in_memory_are_refused() {
    let blocks = MAX_BAT_ENTRIES + 1;
    let footer = footer_for(blocks * 512, DiskType::Dynamic);
    let image = assemble(&footer, &header_for(4, 512)).tap_table(&header_for(blocks as u32, 512));
    let err = open_vec(image).unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("more than the 4194304"), "{err}");
}

#[test]
fn fixed_disks_shorter_than_their_size_are_refused() {
    let mut image = fixed_image(&[0; 4096]);
    image.drain(..512);
    let (kind, msg) = open_error(image);
    assert_eq!(kind, Some(CorruptionKind::Truncated));
    assert!(msg.starts_with("VHD fixed disk data"), "{msg}");
}

#[test]
fn differencing_disks_describe_their_parent_and_cannot_read_without_it() {
    let size = 4 * u64::from(BLOCK);
    let mut header = header_for(4, BLOCK);
    header.parent_unique_id = [7; 16];
    for (i, unit) in "base.vhd".encode_utf16().enumerate() {
        header.parent_name[2 * i..2 * i + 2].copy_from_slice(&unit.to_be_bytes());
    }
    let image = assemble(&footer_for(size, DiskType::Differencing), &header);
    let disk = open_vec(image).unwrap();
    assert_eq!(
        disk.parent_link(),
        Some(&ParentLink {
            paths: vec![crate::layer::ParentPath::FileName("base.vhd".into())],
            identities: vec![[7; 16]],
            format: Format::Vhd,
            child_kind: "VHD differencing disk",
        })
    );
    let err = disk.read_at(&mut [0; 512], 0).unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::InvalidInput(_)));
    assert!(
        err.to_string()
            .starts_with("differencing image opened without its parent"),
        "{err}"
    );
}

#[test]
fn garbage_never_panics() {
    let mut rng = StdRng::seed_from_u64(3);
    let base = image_with_entry(13);
    for _ in 0..2000 {
        let mut image = base.clone();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..image.len());
            image[at] = rng.random();
        }
        if let Ok(disk) = open_vec(image) {
            read_all(&disk);
        }
    }
}

/// What the disk must hold after a crash: bytes written since the last completed
/// flush may read old or new, every other byte must read as acknowledged.
#[derive(Clone)]
pub(crate) struct Model {
    pub(crate) acked: Vec<u8>,
    pub(crate) current: Vec<u8>,
    pub(crate) in_flight: Vec<bool>,
}

impl Model {
    pub(crate) fn new(size: usize) -> Model {
        Model {
            acked: vec![0; size],
            current: vec![0; size],
            in_flight: vec![false; size],
        }
    }

    pub(crate) fn write(&mut self, offset: usize, data: &[u8]) {
        self.current[offset..offset + data.len()].copy_from_slice(data);
        self.in_flight[offset..offset + data.len()].fill(true);
    }

    pub(crate) fn flushed(&mut self) {
        self.acked = self.current.clone();
        self.in_flight.fill(false);
    }

    /// A flush acknowledged the writes to `range`, all its writer's.
    pub(crate) fn acknowledge(&mut self, range: std::ops::Range<usize>) {
        self.acked[range.clone()].copy_from_slice(&self.current[range.clone()]);
        self.in_flight[range].fill(false);
    }

    pub(crate) fn check(&self, found: &[u8], what: &str) {
        for (i, &b) in found.iter().enumerate() {
            let ok = b == self.acked[i] || (self.in_flight[i] && b == self.current[i]);
            assert!(
                ok,
                "{what}: byte {i} reads {b:#x}, acknowledged {:#x}, written {:#x}",
                self.acked[i], self.current[i]
            );
        }
    }
}

/// The crashes to try on the file as it is now: every prefix of the unflushed
/// requests, every prefix followed by a torn multi-sector write, and random subsets.
/// Requests of at most one sector are atomic, as on real disks.
pub(crate) fn crash_images(storage: &MemStorage, rng: &mut StdRng) -> Vec<(String, MemStorage)> {
    let pending = storage.pending();
    let mut images = Vec::new();
    for keep in 0..=pending.len() {
        images.push((
            format!("first {keep} of {} requests", pending.len()),
            storage.power_loss(|i, _| {
                if i < keep {
                    Survives::Everything
                } else {
                    Survives::Nothing
                }
            }),
        ));
        if let Some(PendingOp::Write { data, .. }) = pending.get(keep)
            && data.len() > 512
        {
            for torn in [1, 512, data.len() / 2 + 1, data.len() - 1] {
                images.push((
                    format!("first {keep} requests then {torn} bytes of the next"),
                    storage.power_loss(|i, _| match i.cmp(&keep) {
                        std::cmp::Ordering::Less => Survives::Everything,
                        std::cmp::Ordering::Equal => Survives::Prefix(torn),
                        std::cmp::Ordering::Greater => Survives::Nothing,
                    }),
                ));
            }
        }
    }
    for round in 0..6 {
        let kept: Vec<bool> = (0..pending.len()).map(|_| rng.random()).collect();
        images.push((
            format!("random subset {round} {kept:?}"),
            storage.power_loss(|i, _| {
                if kept[i] {
                    Survives::Everything
                } else {
                    Survives::Nothing
                }
            }),
        ));
    }
    images
}

/// A dynamic disk of `size` whose every request is followed by a check that the image, as
/// a crash at that instant would leave it, holds what `model` says (rng seeded by `seed`).
struct CrashChecked {
    storage: Arc<MemStorage>,
    model: Arc<parking_lot::Mutex<Model>>,
    /// Crash images checked so far.
    checks: Arc<std::sync::atomic::AtomicUsize>,
    disk: VhdDisk,
}

fn crash_checked_disk(size: u64, seed: u64) -> CrashChecked {
    let storage = Arc::new(MemStorage::from_vec(dynamic_image(size)));
    let model = Arc::new(parking_lot::Mutex::new(Model::new(size as usize)));
    let checks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hook = {
        let (model, checks) = (model.clone(), checks.clone());
        let rng = parking_lot::Mutex::new(StdRng::seed_from_u64(seed));
        move |storage: &MemStorage| {
            let model = model.lock().clone();
            check_crash_images(storage, &model, &mut rng.lock());
            checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    };
    let disk = VhdDisk::open(
        Shared::with_hook(storage.clone(), hook),
        &OpenOptions::default(),
    )
    .unwrap();
    CrashChecked {
        storage,
        model,
        checks,
        disk,
    }
}

fn check_crash_images(storage: &MemStorage, model: &Model, rng: &mut StdRng) {
    for (what, crashed) in crash_images(storage, rng) {
        let disk = VhdDisk::open(Box::new(crashed), &OpenOptions::default())
            .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
        model.check(&read_all(&disk), &what);
        // The image must stay writable without harming what it holds: a write to
        // the last block (allocating it if needed) changes only that block.
        let last = disk.size() - 512;
        disk.write_at(&[0xEE; 512], last).unwrap();
        let mut after = model.clone();
        let found = read_all(&disk);
        assert_eq!(&found[last as usize..], &[0xEE; 512], "{what}");
        after.acked[last as usize..].fill(0xEE);
        after.current[last as usize..].fill(0xEE);
        after.check(&found, &format!("{what}, then a write"));
    }
}

#[test]
fn a_crash_at_any_request_keeps_acknowledged_writes() {
    let blocks = 10u64;
    let size = blocks * u64::from(BLOCK);
    let CrashChecked {
        storage,
        model,
        checks,
        disk,
    } = crash_checked_disk(size, 11);
    let mut rng = StdRng::seed_from_u64(5);
    for _epoch in 0..6 {
        for _ in 0..3 {
            // Writes within one epoch never overlap, so each byte has one new value.
            let (offset, len) = loop {
                let len = rng.random_range(1..2 * BLOCK as usize);
                let offset = rng.random_range(0..size as usize - len - 512);
                if !model.lock().in_flight[offset..offset + len].contains(&true) {
                    break (offset, len);
                }
            };
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            data[0] |= 1;
            model.lock().write(offset, &data);
            disk.write_at(&data, offset as u64).unwrap();
        }
        // A discard that gives back whole blocks and zeros the parts around them: until
        // a flush, each byte reads as before or as zero.
        let (offset, len) = loop {
            let len = rng.random_range(1..3 * BLOCK as usize);
            let offset = rng.random_range(0..size as usize - len);
            if !model.lock().in_flight[offset..offset + len].contains(&true) {
                break (offset, len);
            }
        };
        model.lock().write(offset, &vec![0; len]);
        disk.discard(offset as u64, len as u64).unwrap();
        disk.flush().unwrap();
        model.lock().flushed();
    }
    assert!(disk.allocated_blocks().unwrap() >= 3);
    assert!(checks.load(std::sync::atomic::Ordering::Relaxed) > 50);
    // And at the very end, after the last flush.
    check_crash_images(&storage, &model.lock(), &mut rng);
}

#[test]
fn failed_requests_report_the_errno_and_leave_a_consistent_image() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Allocation makes room (writes the footer further on, flushes, clears the old one),
    // clears the block's space (two requests for these small blocks), writes bitmap and
    // data, flushes, writes the BAT entry; in room made before, it starts at the
    // clearing. Fail each of these requests in turn.
    let size = 6 * u64::from(BLOCK);
    for (room_made, requests, flushes) in [(false, 9, [1, 7].as_slice()), (true, 6, &[4])] {
        for fail_at in 0..requests {
            let storage = Arc::new(MemStorage::from_vec(dynamic_image(size)));
            // Counts requests once armed and injects the fault just before request
            // `fail_at`, whichever kind it is.
            let seen = Arc::new(AtomicUsize::new(usize::MAX));
            let hook = {
                let seen = seen.clone();
                move |storage: &MemStorage| {
                    if seen.load(Ordering::SeqCst) == usize::MAX {
                        return;
                    }
                    if seen.fetch_add(1, Ordering::SeqCst) == fail_at {
                        storage.fail_writes_after(0, libc::ENOSPC);
                        storage.fail_flushes(libc::EIO);
                    }
                }
            };
            let disk = VhdDisk::open(
                Shared::with_hook(storage.clone(), hook),
                &OpenOptions::default(),
            )
            .unwrap();
            let mut model = Model::new(size as usize);
            if room_made {
                model.write(0, &[1; 700]);
                disk.write_at(&[1; 700], 0).unwrap();
                disk.flush().unwrap();
                model.flushed();
            }

            seen.store(0, Ordering::SeqCst);
            let result = disk.write_at(&[2; 900], 2 * u64::from(BLOCK) + 3);
            seen.store(usize::MAX, Ordering::SeqCst);
            let what = format!("room made {room_made}, failing request {fail_at}");
            let errno = match flushes.contains(&fail_at) {
                true => libc::EIO,
                false => libc::ENOSPC,
            };
            model.write(2 * BLOCK as usize + 3, &[2; 900]);
            let err = result.expect_err(&what);
            assert!(
                err.to_string().starts_with("allocating block 2: "),
                "{what}: {err}"
            );
            assert_eq!(err.errno(), errno, "{what}: {err}");
            storage.clear_faults();

            // The file as it stands opens and holds what was flushed.
            let reopened = open_vec(storage.contents()).unwrap();
            model.check(&read_all(&reopened), &what);
            let reopened = reopen_after_power_loss(&storage);
            model.check(&read_all(&reopened), &format!("{what}, then a crash"));

            // The same disk carries on once the fault is gone.
            disk.write_at(&[2; 900], 2 * u64::from(BLOCK) + 3).unwrap();
            disk.write_at(&[3; 600], 4 * u64::from(BLOCK) - 100)
                .unwrap();
            model.write(4 * BLOCK as usize - 100, &[3; 600]);
            disk.flush().unwrap();
            model.flushed();
            assert_same(&read_all(&disk), &model.acked);
            let reopened = reopen_after_power_loss(&storage);
            assert_same(&read_all(&reopened), &model.acked);
        }
    }
}

#[test]
fn concurrent_writers_allocate_each_block_once() {
    let blocks = 4u64;
    let size = blocks * u64::from(BLOCK);
    let image = dynamic_image(size);
    let initial_len = image.len() as u64;
    let storage = Arc::new(MemStorage::from_vec(image));
    let disk = VhdDisk::open(Shared::new(storage.clone()), &OpenOptions::default()).unwrap();
    let sectors = size / 512;
    let barrier = std::sync::Barrier::new(8);
    std::thread::scope(|scope| {
        for thread in 0..8u64 {
            let (disk, barrier) = (&disk, &barrier);
            scope.spawn(move || {
                barrier.wait();
                // Each thread writes one sector of every block, all at once.
                for block in 0..blocks {
                    let sector = block * u64::from(BLOCK) / 512 + thread;
                    disk.write_at(&[thread as u8 + 1; 512], sector * 512)
                        .unwrap();
                }
            });
        }
    });
    assert_eq!(disk.allocated_blocks(), Some(blocks));
    let last_data_at = new_block_data_at(initial_len - 512, blocks - 1);
    assert_eq!(
        storage.len().unwrap(),
        last_data_at + u64::from(BLOCK) + 512
    );
    disk.flush().unwrap();
    let found = read_all(&open_vec(storage.contents()).unwrap());
    for sector in 0..sectors {
        let expected = (sector % 8) as u8 + 1;
        let at = sector as usize * 512;
        assert_eq!(found[at..at + 512], [expected; 512], "sector {sector}");
    }
}

#[test]
fn discarding_whole_blocks_unallocates_them_and_zeros_the_rest() {
    let block = u64::from(BLOCK);
    let size = 6 * block;
    let storage = Arc::new(MemStorage::from_vec(dynamic_image(size)));
    let disk = VhdDisk::open(Shared::new(storage.clone()), &OpenOptions::default()).unwrap();
    disk.write_at(&vec![7; 4 * block as usize], 0).unwrap();
    disk.flush().unwrap();
    assert_eq!(disk.allocated_blocks(), Some(4));
    // Half of block 0, all of block 1, a quarter of block 2.
    disk.discard(block / 2, block / 2 + block + block / 4)
        .unwrap();
    disk.flush().unwrap();
    let mut expected = vec![7u8; 4 * block as usize];
    expected.resize(size as usize, 0);
    expected[(block / 2) as usize..(2 * block + block / 4) as usize].fill(0);
    assert_same(&read_all(&disk), &expected);
    assert_eq!(disk.allocated_blocks(), Some(3));
    assert_eq!(
        disk.allocation(block, block).unwrap(),
        vec![Extent {
            offset: block,
            len: block,
            state: Allocation::Zero
        }]
    );
    drop(disk);
    let reopened = open_vec(storage.contents()).unwrap();
    assert_eq!(reopened.allocated_blocks(), Some(3));
    assert_same(&read_all(&reopened), &expected);
    // The freed block's place, found free at open, takes the next new block.
    let freed_at = reopened.allocator_free_ranges();
    assert!(
        freed_at.iter().any(|r| r.end - r.start >= SPAN),
        "{freed_at:?}"
    );
    let len_before = reopened.storage.len().unwrap();
    reopened.write_at(&[9; 512], 5 * block).unwrap();
    expected[5 * block as usize..5 * block as usize + 512].fill(9);
    assert_same(&read_all(&reopened), &expected);
    assert_eq!(reopened.storage.len().unwrap(), len_before);
    let d = reopened.dynamic.as_ref().unwrap();
    let at = d.bat.read().block_offset(5).unwrap();
    assert!(
        freed_at.iter().any(|r| r.contains(&at)),
        "{at:#x} {freed_at:?}"
    );
    drop(reopened);
}

impl VhdDisk {
    fn allocator_free_ranges(&self) -> Vec<std::ops::Range<u64>> {
        let d = self.dynamic.as_ref().unwrap();
        d.allocator.lock().free.ranges().collect()
    }
}

#[test]
fn released_blocks_are_reused_and_the_file_stops_growing() {
    let size = 64 * u64::from(BLOCK);
    let storage = Arc::new(MemStorage::from_vec(dynamic_image(size)));
    let disk = VhdDisk::open(Shared::new(storage.clone()), &OpenOptions::default()).unwrap();
    let lengths =
        crate::free_space::workloads::write_and_trim_rounds(&disk, 8, || storage.len().unwrap());
    assert!(lengths.iter().all(|&l| l == lengths[0]), "{lengths:?}");
    drop(disk);
    let reopened = open_vec(storage.contents()).unwrap();
    assert_same(&read_all(&reopened), &vec![0; size as usize]);
}

#[test]
fn a_read_in_flight_keeps_its_block_from_reuse() {
    crate::free_space::workloads::a_stalled_read_keeps_its_block_from_reuse(
        dynamic_image(8 * u64::from(BLOCK)),
        u64::from(BLOCK),
        |storage| Box::new(VhdDisk::open(storage, &OpenOptions::default()).unwrap()),
    );
}

#[test]
fn concurrent_writes_and_discards_never_reach_a_reused_block() {
    let size = 256 * u64::from(BLOCK);
    let storage = Arc::new(MemStorage::from_vec(dynamic_image(size)));
    let disk = VhdDisk::open(Shared::new(storage.clone()), &OpenOptions::default()).unwrap();
    crate::free_space::workloads::disjoint_writers_and_discarders(&disk, 4, 150);
}

#[test]
fn discard_modes_follow_the_image_type_and_the_option() {
    let fixed = VhdDisk::open(
        Box::new(MemStorage::from_vec(fixed_image(&[5; 4096]))),
        &OpenOptions::default(),
    )
    .unwrap();
    assert_eq!(fixed.discard_mode(), DiscardMode::Zero);
    let dynamic = open_vec(dynamic_image(4 * u64::from(BLOCK))).unwrap();
    assert_eq!(dynamic.discard_mode(), DiscardMode::Unmap);
    let ignoring = VhdDisk::open(
        Box::new(MemStorage::from_vec(dynamic_image(4 * u64::from(BLOCK)))),
        &OpenOptions {
            discard: Some(DiscardMode::Ignore),
            ..Default::default()
        },
    )
    .unwrap();
    ignoring.write_at(&[3; 512], 0).unwrap();
    let err = ignoring.discard(0, 512).unwrap_err();
    assert_eq!(err.errno(), libc::EOPNOTSUPP);
    let mut buf = [0u8; 512];
    ignoring.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [3; 512]);
    // A fixed image zeros in place, keeping every byte allocated.
    fixed.discard(100, 1000).unwrap();
    let mut data = [0u8; 4096];
    fixed.read_at(&mut data, 0).unwrap();
    assert!(data[100..1100].iter().all(|&b| b == 0) && data[1100..].iter().all(|&b| b == 5));
}
/// Spins until `ready` holds. The limit only turns a deadlock into a failure: what the
/// test waits for happens at once.
fn wait_for(what: &str, ready: impl Fn() -> bool) {
    let since = std::time::Instant::now();
    while !ready() {
        assert!(since.elapsed().as_secs() < 300, "{what} never happened");
        std::thread::yield_now();
    }
}

/// The image as a power loss would leave it now (what was not flushed dropped), opened.
fn reopen_after_power_loss(storage: &MemStorage) -> VhdDisk {
    VhdDisk::open(
        Box::new(storage.power_loss_dropping_unflushed()),
        &OpenOptions::default(),
    )
    .unwrap()
}

/// An in-memory file whose flushes wait while the test holds them, and which tells the
/// test of each flush waiting and of each write it sees.
pub(crate) struct FlushGate {
    pub(crate) inner: MemStorage,
    state: parking_lot::Mutex<GateState>,
    changed: parking_lot::Condvar,
}

#[derive(Default)]
pub(crate) struct GateState {
    holding: bool,
    /// Flushes waiting to be let go.
    pub(crate) held: usize,
    /// The first byte of every write.
    pub(crate) writes: Vec<u8>,
}

impl FlushGate {
    pub(crate) fn new(image: Vec<u8>) -> Arc<FlushGate> {
        Arc::new(FlushGate {
            inner: MemStorage::from_vec(image),
            state: parking_lot::Mutex::default(),
            changed: parking_lot::Condvar::new(),
        })
    }

    pub(crate) fn hold(&self, holding: bool) {
        self.state.lock().holding = holding;
        self.changed.notify_all();
    }

    /// Waits until `done` holds of the state. The limit only turns a deadlock into a
    /// failure: what the test waits for takes no time at all.
    pub(crate) fn wait_until(&self, what: &str, done: impl Fn(&GateState) -> bool) {
        let mut state = self.state.lock();
        while !done(&state) {
            let waited = self
                .changed
                .wait_for(&mut state, std::time::Duration::from_secs(300));
            assert!(!waited.timed_out(), "{what} never happened");
        }
    }
}

impl Storage for FlushGate {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.state
            .lock()
            .writes
            .push(buf.first().copied().unwrap_or(0));
        self.changed.notify_all();
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        let mut state = self.state.lock();
        if state.holding {
            state.held += 1;
            self.changed.notify_all();
            while state.holding {
                self.changed.wait(&mut state);
            }
            state.held -= 1;
        }
        drop(state);
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

/// A disk on a `FlushGate` whose first block is written and flushed: the room that
/// allocation made takes every later block, so those only take space.
fn gated_disk(blocks: u64) -> (Arc<FlushGate>, VhdDisk) {
    let gate = FlushGate::new(dynamic_image(blocks * u64::from(BLOCK)));
    let disk = VhdDisk::open(Box::new(gate.clone()), &OpenOptions::default()).unwrap();
    disk.write_at(&[1; 512], 0).unwrap();
    disk.flush().unwrap();
    (gate, disk)
}

#[test]
fn an_allocation_waiting_for_its_flush_holds_up_no_other() {
    let (gate, disk) = gated_disk(8);
    let len = gate.inner.len().unwrap();
    gate.hold(true);
    std::thread::scope(|scope| {
        let a = scope.spawn(|| disk.write_at(&[0xA1; 1024], u64::from(BLOCK)));
        gate.wait_until("writer A's data flush", |s| s.held == 1);
        let b = scope.spawn(|| disk.write_at(&[0xB2; 1024], 2 * u64::from(BLOCK)));
        gate.wait_until("writer B's data write", |s| s.writes.contains(&0xB2));
        gate.hold(false);
        a.join().unwrap().unwrap();
        b.join().unwrap().unwrap();
    });
    assert_eq!(disk.allocated_blocks(), Some(3));
    assert_eq!(gate.inner.len().unwrap(), len);
    let mut expected = vec![0u8; disk.size() as usize];
    expected[..512].fill(1);
    expected[BLOCK as usize..][..1024].fill(0xA1);
    expected[2 * BLOCK as usize..][..1024].fill(0xB2);
    assert_same(&read_all(&disk), &expected);
    disk.flush().unwrap();
    let reopened = reopen_after_power_loss(&gate.inner);
    assert_same(&read_all(&reopened), &expected);
}

#[test]
fn allocations_queued_behind_a_commit_share_the_next_flush() {
    let (gate, disk) = gated_disk(8);
    let disk = &disk;
    let commits = &disk.dynamic.as_ref().unwrap().commits;
    let flushes = gate.inner.flush_count();
    gate.hold(true);
    std::thread::scope(|scope| {
        let a = scope.spawn(|| disk.write_at(&[0xA1; 512], u64::from(BLOCK)));
        gate.wait_until("writer A's data flush", |s| s.held == 1);
        let others: Vec<_> = (2..5u64)
            .map(|block| scope.spawn(move || disk.write_at(&[0xB0; 512], block * u64::from(BLOCK))))
            .collect();
        wait_for("the writers queueing", || commits.queued() >= 3);
        gate.hold(false);
        a.join().unwrap().unwrap();
        for other in others {
            other.join().unwrap().unwrap();
        }
    });
    // Four new blocks, two flushes: A's, and one for the three queued behind it.
    assert_eq!(gate.inner.flush_count(), flushes + 2);
    assert_eq!(disk.allocated_blocks(), Some(5));
    let mut expected = vec![0u8; disk.size() as usize];
    expected[..512].fill(1);
    expected[BLOCK as usize..][..512].fill(0xA1);
    for block in 2..5 {
        expected[block * BLOCK as usize..][..512].fill(0xB0);
    }
    disk.flush().unwrap();
    let reopened = reopen_after_power_loss(&gate.inner);
    assert_same(&read_all(&reopened), &expected);
}

#[test]
fn a_second_writer_to_a_block_being_allocated_waits_and_writes_into_it() {
    let (gate, disk) = gated_disk(8);
    let free_bytes = |disk: &VhdDisk| -> u64 {
        let free = disk.allocator_free_ranges();
        free.iter().map(|r| r.end - r.start).sum()
    };
    let free_before = free_bytes(&disk);
    let claims = &disk.dynamic.as_ref().unwrap().claims;
    gate.hold(true);
    std::thread::scope(|scope| {
        let a = scope.spawn(|| disk.write_at(&[0xA1; 512], u64::from(BLOCK)));
        gate.wait_until("writer A's data flush", |s| s.held == 1);
        let b = scope.spawn(|| disk.write_at(&[0xB2; 512], u64::from(BLOCK) + 1024));
        wait_for("writer B waiting", || claims.waiting() > 0);
        gate.hold(false);
        a.join().unwrap().unwrap();
        b.join().unwrap().unwrap();
    });
    // One block's space taken, and both writes in it.
    assert_eq!(disk.allocated_blocks(), Some(2));
    assert_eq!(free_before - free_bytes(&disk), SPAN);
    let mut expected = vec![0u8; disk.size() as usize];
    expected[..512].fill(1);
    expected[BLOCK as usize..][..512].fill(0xA1);
    expected[BLOCK as usize + 1024..][..512].fill(0xB2);
    assert_same(&read_all(&disk), &expected);
    disk.flush().unwrap();
    let reopened = reopen_after_power_loss(&gate.inner);
    assert_same(&read_all(&reopened), &expected);
}

#[test]
fn a_failed_data_write_leaves_the_block_to_the_next_writer() {
    let storage = Arc::new(MemStorage::from_vec(dynamic_image(8 * u64::from(BLOCK))));
    let disk = VhdDisk::open(Shared::new(storage.clone()), &OpenOptions::default()).unwrap();
    disk.write_at(&[1; 512], 0).unwrap();
    // Clearing the space (two requests) goes through, the bitmap write fails.
    storage.fail_writes_after(2, libc::ENOSPC);
    let err = disk.write_at(&[2; 512], u64::from(BLOCK)).unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    storage.clear_faults();
    assert_eq!(disk.allocated_blocks(), Some(1));
    let len = storage.len().unwrap();
    disk.write_at(&[3; 512], u64::from(BLOCK) + 512).unwrap();
    disk.flush().unwrap();
    // The space the failed writer had is the one the block gets, cleared.
    let at = disk.dynamic.as_ref().unwrap().bat.read().block_offset(1);
    assert_eq!(at, Some(new_block_data_at(2048, 1) - 512));
    assert_eq!(storage.len().unwrap(), len);
    let mut expected = vec![0u8; disk.size() as usize];
    expected[..512].fill(1);
    expected[BLOCK as usize + 512..][..512].fill(3);
    let reopened = reopen_after_power_loss(&storage);
    assert_same(&read_all(&reopened), &expected);
}

#[test]
fn a_crash_during_concurrent_allocations_keeps_what_each_flush_acknowledged() {
    const THREADS: u64 = 3;
    const BLOCKS_EACH: u64 = 3;
    let size = THREADS * BLOCKS_EACH * u64::from(BLOCK);
    let CrashChecked {
        storage,
        model,
        checks,
        disk,
    } = crash_checked_disk(size, 31);
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (disk, model) = (&disk, &model);
            scope.spawn(move || {
                // Each thread owns every THREADS-th block: blocks are allocated side by
                // side, and each byte has one writer.
                let mut rng = StdRng::seed_from_u64(40 + thread);
                let mut unflushed = Vec::new();
                for round in 0..6 {
                    let (offset, len) = loop {
                        let block = thread + THREADS * rng.random_range(0..BLOCKS_EACH);
                        let len = rng.random_range(1..BLOCK as usize);
                        let offset = block as usize * BLOCK as usize
                            + rng.random_range(0..BLOCK as usize - len + 1);
                        if !model.lock().in_flight[offset..offset + len].contains(&true) {
                            break (offset, len);
                        }
                    };
                    let data: Vec<u8> = (0..len).map(|_| rng.random::<u8>() | 1).collect();
                    model.lock().write(offset, &data);
                    disk.write_at(&data, offset as u64).unwrap();
                    unflushed.push(offset..offset + len);
                    if round % 2 == 1 {
                        disk.flush().unwrap();
                        let mut model = model.lock();
                        for range in unflushed.drain(..) {
                            model.acknowledge(range);
                        }
                    }
                }
            });
        }
    });
    assert!(disk.allocated_blocks().unwrap() >= THREADS);
    assert!(checks.load(std::sync::atomic::Ordering::Relaxed) > 50);
    check_crash_images(&storage, &model.lock(), &mut StdRng::seed_from_u64(32));
}

#[test]
fn room_a_crash_left_is_reused_and_a_clean_close_cuts_off_the_rest() {
    let size = 16 * u64::from(BLOCK);
    let storage = Arc::new(MemStorage::from_vec(dynamic_image(size)));
    let disk = VhdDisk::open(Shared::new(storage.clone()), &OpenOptions::default()).unwrap();
    disk.write_at(&[1; 512], 0).unwrap();
    disk.flush().unwrap();
    // Room for ROOM_BLOCKS blocks, the first of them taken.
    let block_end = |i: u64| new_block_data_at(2048, i) + u64::from(BLOCK);
    let grown = block_end(ROOM_BLOCKS - 1) + 512;
    assert_eq!(storage.len().unwrap(), grown);
    drop(disk);

    let crashed = Arc::new(storage.power_loss_dropping_unflushed());
    let disk = VhdDisk::open(Shared::new(crashed.clone()), &OpenOptions::default()).unwrap();
    let mut expected = vec![0u8; size as usize];
    expected[..512].fill(1);
    for block in 1..ROOM_BLOCKS {
        disk.write_at(&[block as u8 + 1; 512], block * u64::from(BLOCK))
            .unwrap();
        expected[(block * u64::from(BLOCK)) as usize..][..512].fill(block as u8 + 1);
    }
    // Every block so far went into the room the last session made.
    assert_eq!(crashed.len().unwrap(), grown);
    disk.write_at(&[0xEE; 512], ROOM_BLOCKS * u64::from(BLOCK))
        .unwrap();
    expected[(ROOM_BLOCKS * u64::from(BLOCK)) as usize..][..512].fill(0xEE);
    assert!(crashed.len().unwrap() > grown);
    disk.close().unwrap();
    assert_eq!(crashed.len().unwrap(), block_end(ROOM_BLOCKS) + 512);
    let image = crashed.contents();
    assert_eq!(&image[image.len() - 512..], &image[..512]);
    assert_same(&read_all(&open_vec(image).unwrap()), &expected);
}

#[test]
fn a_close_that_cannot_cut_off_the_room_still_succeeds() {
    let storage = Arc::new(MemStorage::from_vec(dynamic_image(16 * u64::from(BLOCK))));
    let disk = VhdDisk::open(Shared::new(storage.clone()), &OpenOptions::default()).unwrap();
    disk.write_at(&[1; 512], 0).unwrap();
    disk.flush().unwrap();
    let len = storage.len().unwrap();
    // A full filesystem: the footer at the new end cannot be written.
    storage.fail_writes_after(0, libc::ENOSPC);
    disk.close().unwrap();
    storage.clear_faults();
    assert_eq!(storage.len().unwrap(), len);
    let mut expected = vec![0u8; disk.size() as usize];
    expected[..512].fill(1);
    assert_same(&read_all(&open_vec(storage.contents()).unwrap()), &expected);
}

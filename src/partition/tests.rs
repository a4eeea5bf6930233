//! Tables built by hand on in-memory raw disks of 512- and 4096-byte sectors: the
//! numbering Linux gives, the backup GPT, and damaged, looping and hostile tables.

use super::gpt::{ENTRY_UNIT, PRIMARY_LBA, RawEntry, RawHeader, SIGNATURE};
use super::mbr::{RECORD_LEN, RawRecord, RawSlot};
use super::*;
use crate::OpenOptions;
use crate::raw::RawDisk;
use crate::storage::MemStorage;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

const MBR_LINE: u8 = 0x83;
const EXTENDED: u8 = 0x05;

/// A raw disk over `image`, of 4096-byte sectors when `sector` says so.
fn disk(image: Vec<u8>, sector: u64) -> RawDisk {
    let disk = RawDisk::open(
        Box::new(MemStorage::from_vec(image)),
        &OpenOptions::default(),
    )
    .unwrap();
    match sector {
        512 => disk,
        4096 => disk.with_4k_sectors(),
        _ => unreachable!("sector size {sector}"),
    }
}

fn read(image: Vec<u8>, sector: u64) -> PartitionTable {
    read_partition_table(&disk(image, sector)).unwrap()
}

fn slot(kind: u8, start: u32, sectors: u32) -> RawSlot {
    RawSlot {
        kind,
        start: start.into(),
        sectors: sectors.into(),
        ..RawSlot::default()
    }
}

/// Writes a boot record holding `slots` (the rest empty) into sector `lba`.
fn put_record(image: &mut [u8], sector: u64, lba: u64, slots: &[RawSlot]) {
    let mut record = RawRecord::new_zeroed();
    record.slots[..slots.len()].copy_from_slice(slots);
    record.signature = [0x55, 0xAA];
    put(image, lba * sector, record.as_bytes());
}

fn put(image: &mut [u8], at: u64, bytes: &[u8]) {
    image[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
}

/// What a table says in bytes, for comparing with the partitions read.
fn part(number: u32, first: u64, sectors: u64, sector: u64) -> Partition {
    Partition {
        number,
        offset: first * sector,
        len: sectors * sector,
    }
}

/// A GPT as fdisk writes one: protective MBR, primary header at LBA 1 with its
/// `count` entries of `entry_size` bytes from LBA 2, and the backup header at the last
/// LBA with its copy of the entries just before it. `used` gives (index, first, last).
struct Gpt {
    sector: u64,
    sectors: u64,
    count: u32,
    entry_size: u32,
    used: Vec<(usize, u64, u64)>,
}

impl Gpt {
    fn new(sector: u64, sectors: u64, used: &[(usize, u64, u64)]) -> Gpt {
        Gpt {
            sector,
            sectors,
            count: 128,
            entry_size: ENTRY_UNIT,
            used: used.to_vec(),
        }
    }

    fn entries_len(&self) -> u64 {
        u64::from(self.count) * u64::from(self.entry_size)
    }

    fn backup_entries_lba(&self) -> u64 {
        self.sectors - 1 - self.entries_len().div_ceil(self.sector)
    }

    fn image(&self) -> Vec<u8> {
        let mut image = vec![0u8; (self.sectors * self.sector) as usize];
        put_record(
            &mut image,
            self.sector,
            0,
            &[slot(
                0xEE,
                1,
                (self.sectors - 1).min(u32::MAX.into()) as u32,
            )],
        );
        let mut entries = vec![0u8; self.entries_len() as usize];
        for &(index, first, last) in &self.used {
            let mut entry = RawEntry::new_zeroed();
            entry.type_guid = [0xAB; 16];
            entry.unique_guid = [index as u8; 16];
            entry.first_lba = first.into();
            entry.last_lba = last.into();
            let at = index * self.entry_size as usize;
            entries[at..at + size_of::<RawEntry>()].copy_from_slice(entry.as_bytes());
        }
        let last = self.sectors - 1;
        let backup_entries = self.backup_entries_lba();
        for (my, alternate, entries_lba) in [(PRIMARY_LBA, last, 2), (last, 1, backup_entries)] {
            let mut header = RawHeader::new_zeroed();
            header.signature = SIGNATURE;
            header.revision = 0x10000.into();
            header.header_size = (size_of::<RawHeader>() as u32).into();
            header.my_lba = my.into();
            header.alternate_lba = alternate.into();
            header.first_usable = (2 + self.entries_len().div_ceil(self.sector)).into();
            header.last_usable = (backup_entries - 1).into();
            header.entries_lba = entries_lba.into();
            header.entry_count = self.count.into();
            header.entry_size = self.entry_size.into();
            header.entries_crc = crc32fast::hash(&entries).into();
            header.header_crc = crc32fast::hash(header.as_bytes()).into();
            put(&mut image, my * self.sector, header.as_bytes());
            put(&mut image, entries_lba * self.sector, &entries);
        }
        image
    }
}

/// Primary 1, an empty slot 2, an extended partition in slot 3 holding three logical
/// partitions (5, 6, 7), and primary 4 after it.
fn mbr_with_logicals(sector: u64) -> (Vec<u8>, Vec<Partition>) {
    let mut image = vec![0u8; (16384 * sector) as usize];
    put_record(
        &mut image,
        sector,
        0,
        &[
            slot(MBR_LINE, 2048, 2048),
            RawSlot::default(),
            slot(EXTENDED, 4096, 8192),
            slot(MBR_LINE, 12288, 4096),
        ],
    );
    // Each EBR: its logical partition 1 sector after it, and a link relative to the
    // extended partition's start.
    let ebrs = [
        (4096, 1000, Some(2048)),
        (6144, 2000, Some(5120)),
        (9216, 100, None),
    ];
    for (at, len, next) in ebrs {
        let mut slots = vec![slot(MBR_LINE, 1, len)];
        if let Some(next) = next {
            slots.push(slot(EXTENDED, next, 1024));
        }
        put_record(&mut image, sector, at, &slots);
    }
    let expected = vec![
        part(1, 2048, 2048, sector),
        part(4, 12288, 4096, sector),
        part(5, 4097, 1000, sector),
        part(6, 6145, 2000, sector),
        part(7, 9217, 100, sector),
    ];
    (image, expected)
}

#[test]
fn mbr_primaries_keep_their_slots_and_logical_partitions_number_from_5() {
    for sector in [512, 4096] {
        let (image, expected) = mbr_with_logicals(sector);
        let table = read(image, sector);
        assert_eq!(table.scheme, Scheme::Mbr);
        assert_eq!(table.partitions, expected, "{sector}-byte sectors");
        assert!(
            table.refused.is_empty() && table.notes.is_empty(),
            "{table:?}"
        );
        // Sector 0 and the three EBRs, of which only the records themselves were read.
        let record = RECORD_LEN as u64;
        let ebrs = [4096, 6144, 9216].map(|lba| lba * sector..lba * sector + record);
        let ranges: Vec<_> = std::iter::once(0..sector).chain(ebrs).collect();
        assert_eq!(table.table_ranges, ranges);
    }
}

#[test]
fn a_looping_chain_of_ebrs_ends_at_the_ebr_it_revisits() {
    let sector = 512;
    let mut image = vec![0u8; 8192 * 512];
    put_record(&mut image, sector, 0, &[slot(EXTENDED, 2048, 4096)]);
    put_record(
        &mut image,
        sector,
        2048,
        &[slot(MBR_LINE, 1, 100), slot(EXTENDED, 1024, 1024)],
    );
    // The second EBR links back to the first.
    put_record(
        &mut image,
        sector,
        3072,
        &[slot(MBR_LINE, 1, 100), slot(EXTENDED, 0, 1024)],
    );
    let table = read(image, sector);
    assert_eq!(
        table.partitions,
        vec![part(5, 2049, 100, sector), part(6, 3073, 100, sector)]
    );
    assert_eq!(
        table.notes,
        vec!["the chain of EBRs loops back to sector 2048, so the rest of the chain is not read"]
    );
}

#[test]
fn an_ebr_outside_its_extended_partition_is_followed_as_linux_does() {
    // Linux checks neither where a link points nor where the first two entries of an
    // EBR put their partition; only the third and fourth entries must lie inside the
    // extended partition, or they are taken for garbage and not numbered.
    let sector = 512;
    let mut image = vec![0u8; 16384 * 512];
    put_record(&mut image, sector, 0, &[slot(EXTENDED, 2048, 2048)]);
    put_record(
        &mut image,
        sector,
        2048,
        &[
            slot(MBR_LINE, 1, 100),
            slot(EXTENDED, 8192, 2048),
            slot(MBR_LINE, 200, 100),
            slot(MBR_LINE, 5000, 100),
        ],
    );
    put_record(&mut image, sector, 10240, &[slot(MBR_LINE, 1, 100)]);
    let table = read(image, sector);
    assert_eq!(
        table.partitions,
        vec![
            part(5, 2049, 100, sector),
            part(6, 2248, 100, sector),
            part(7, 10241, 100, sector),
        ]
    );
    assert!(table.notes.is_empty(), "{:?}", table.notes);
}

#[test]
fn a_chain_ending_at_an_unsigned_or_missing_ebr_keeps_what_came_before() {
    let sector = 512;
    let mut image = vec![0u8; 8192 * 512];
    put_record(&mut image, sector, 0, &[slot(EXTENDED, 2048, 4096)]);
    put_record(
        &mut image,
        sector,
        2048,
        &[slot(MBR_LINE, 1, 100), slot(EXTENDED, u32::MAX, 1024)],
    );
    let table = read(image, sector);
    assert_eq!(table.partitions, vec![part(5, 2049, 100, sector)]);
    assert_eq!(
        table.notes,
        vec![format!(
            "the EBR at sector {} lies past the end of the disk or lacks its signature, so \
             the rest of the chain is not read",
            2048 + u64::from(u32::MAX)
        )]
    );
}

#[test]
fn links_without_logical_partitions_are_followed_100_times() {
    let sector = 512;
    let mut image = vec![0u8; 8192 * 512];
    put_record(&mut image, sector, 0, &[slot(EXTENDED, 1000, 4000)]);
    for i in 0..150 {
        put_record(
            &mut image,
            sector,
            1000 + i,
            &[slot(EXTENDED, i as u32 + 1, 1)],
        );
    }
    put_record(
        &mut image,
        sector,
        1100,
        &[slot(MBR_LINE, 1000, 10), slot(EXTENDED, 101, 1)],
    );
    let table = read(image, sector);
    // The EBR at 1100 is the 101st: Linux reads 100, the one with data resets the count.
    assert_eq!(table.partitions, vec![]);
    assert_eq!(
        table.notes,
        vec!["100 EBRs in a row hold no logical partition, so the rest of the chain is not read"]
    );
    assert_eq!(table.table_ranges.len(), 2, "{:?}", table.table_ranges);
}

#[test]
fn a_gpt_numbers_entries_by_index_and_reads_both_copies() {
    for sector in [512, 4096] {
        let sectors = 8192;
        let gpt = Gpt::new(
            sector,
            sectors,
            &[(0, 256, 1279), (1, 1280, 4095), (127, 5000, 5099)],
        );
        let table = read(gpt.image(), sector);
        assert_eq!(table.scheme, Scheme::Gpt);
        assert_eq!(
            table.partitions,
            vec![
                part(1, 256, 1024, sector),
                part(2, 1280, 2816, sector),
                part(128, 5000, 100, sector),
            ],
            "{sector}-byte sectors"
        );
        assert!(
            table.refused.is_empty() && table.notes.is_empty(),
            "{table:?}"
        );
        let array_sectors = (128 * 128u64).div_ceil(sector);
        assert_eq!(
            table.table_ranges,
            vec![
                // MBR, primary header and its entries.
                0..(2 * sector + 128 * 128),
                // The backup's entries and header.
                gpt.backup_entries_lba() * sector..sectors * sector,
            ]
        );
        assert_eq!(gpt.backup_entries_lba(), sectors - 1 - array_sectors);
    }
}

#[test]
fn longer_gpt_entries_are_read_at_their_own_stride() {
    let mut gpt = Gpt::new(512, 4096, &[(0, 100, 199), (3, 300, 399)]);
    gpt.entry_size = 256;
    let table = read(gpt.image(), 512);
    assert_eq!(
        table.partitions,
        vec![part(1, 100, 100, 512), part(4, 300, 100, 512)]
    );
}

#[test]
fn a_damaged_primary_gpt_gives_way_to_the_backup_with_a_note() {
    for sector in [512, 4096] {
        let gpt = Gpt::new(sector, 2048, &[(0, 100, 199), (4, 300, 399)]);
        let expected = vec![part(1, 100, 100, sector), part(5, 300, 100, sector)];
        let damages: [(u64, &str); 3] = [
            (sector + 30, "header CRC mismatch"),
            (sector, "no GPT signature"),
            (2 * sector + 40, "entry array CRC mismatch"),
        ];
        for (at, why) in damages {
            let mut image = gpt.image();
            image[at as usize] ^= 0x40;
            let table = read(image, sector);
            assert_eq!(table.scheme, Scheme::Gpt);
            assert_eq!(table.partitions, expected, "{why}");
            assert_eq!(
                table.notes,
                vec![format!(
                    "primary GPT header is damaged ({why}); using the backup at LBA 2047"
                )]
            );
            // Writing the primary whole again would change the table.
            assert!(table.table_ranges[0].end > sector, "{why}");
        }
    }
}

#[test]
fn a_damaged_backup_gpt_is_noted_and_the_primary_used() {
    let gpt = Gpt::new(512, 2048, &[(0, 100, 199)]);
    let mut image = gpt.image();
    image[2047 * 512 + 30] ^= 1;
    let table = read(image, 512);
    assert_eq!(table.partitions, vec![part(1, 100, 100, 512)]);
    assert_eq!(
        table.notes,
        vec!["backup GPT header at LBA 2047 is damaged (header CRC mismatch); using the primary"]
    );
}

#[test]
fn with_both_gpt_headers_damaged_no_partition_is_read() {
    let gpt = Gpt::new(512, 2048, &[(0, 100, 199)]);
    let mut image = gpt.image();
    image[512 + 30] ^= 1;
    image[2047 * 512] = b'X';
    let table = read(image, 512);
    assert_eq!(table.scheme, Scheme::None);
    assert!(table.partitions.is_empty() && table.refused.is_empty());
    assert_eq!(
        table.notes,
        vec![
            "primary GPT header is damaged (header CRC mismatch), and so is the backup at LBA \
             2047 (no GPT signature); no partition is read"
        ]
    );
    assert_eq!(table.table_ranges, vec![0..1024, 2047 * 512..2048 * 512]);
}

/// A GPT whose primary header, resealed, says what `change` makes it say.
fn resealed_primary(gpt: &Gpt, change: impl FnOnce(&mut RawHeader)) -> Vec<u8> {
    let mut image = gpt.image();
    let at = (PRIMARY_LBA * gpt.sector) as usize;
    let (header, _) = RawHeader::mut_from_prefix(&mut image[at..]).unwrap();
    change(header);
    header.header_crc = 0.into();
    header.header_crc = crc32fast::hash(header.as_bytes()).into();
    image
}

/// A change to a header, and the reason the reader gives for refusing it.
type HeaderDamage = (fn(&mut RawHeader), &'static str);

#[test]
fn each_header_check_linux_makes_sends_the_reader_to_the_backup() {
    let gpt = Gpt::new(512, 2048, &[(0, 100, 199)]);
    let cases: [HeaderDamage; 8] = [
        (
            |h| h.header_size = 91.into(),
            "header size 91 is outside 92-512",
        ),
        (
            |h| h.header_size = 513.into(),
            "header size 513 is outside 92-512",
        ),
        (|h| h.my_lba = 2.into(), "it says it lies at LBA 2"),
        (
            |h| h.last_usable = 2048.into(),
            "its usable sectors 34-2048 end past the end of the disk (last sector 2047)",
        ),
        (
            |h| h.first_usable = 2020.into(),
            "its usable sectors 2020-2014 end before they start",
        ),
        (
            |h| h.entry_size = 129.into(),
            "entry size 129 is not a multiple of 128",
        ),
        (|h| h.entry_count = 0.into(), "it has no entries"),
        (
            |h| h.entries_lba = 2047.into(),
            "its entry array at LBA 2047 ends past the end of the disk",
        ),
    ];
    for (change, why) in cases {
        let table = read(resealed_primary(&gpt, change), 512);
        assert_eq!(table.partitions, vec![part(1, 100, 100, 512)], "{why}");
        assert_eq!(
            table.notes,
            vec![format!(
                "primary GPT header is damaged ({why}); using the backup at LBA 2047"
            )]
        );
    }
}

#[test]
fn a_header_claiming_a_huge_entry_array_is_refused_before_reading_it() {
    let gpt = Gpt::new(512, 2048, &[(0, 100, 199)]);
    let image = resealed_primary(&gpt, |h| {
        h.entry_count = u32::MAX.into();
        h.entry_size = (1u32 << 16).into();
    });
    let table = read(image, 512);
    assert_eq!(table.partitions, vec![part(1, 100, 100, 512)]);
    assert_eq!(
        table.notes,
        vec![format!(
            "primary GPT header is damaged (its 4294967295 entries of 65536 bytes are more \
             than the {MAX_ENTRY_ARRAY} bytes read); using the backup at LBA 2047"
        )]
    );
    // Nothing past the primary header itself was read from the front of the disk.
    assert_eq!(table.table_ranges[0], 0..1024);
}

#[test]
fn gpt_entries_past_the_disk_overlapping_or_reversed_are_refused() {
    let gpt = Gpt::new(
        512,
        4096,
        &[
            (0, 100, 199),
            (1, 150, 249),
            (2, 300, 399),
            (3, 4000, 4096),
            (4, 500, 499),
            (5, 600, 699),
            (6, 650, 650),
            (7, 690, 700),
        ],
    );
    let table = read(gpt.image(), 512);
    assert_eq!(table.partitions, vec![part(3, 300, 100, 512)]);
    assert_eq!(
        table.refused,
        vec![
            "partition 1 (sectors 100-199) overlaps partition 2",
            "partition 2 (sectors 150-249) overlaps partition 1",
            "partition 4 (sectors 4000-4096) ends past the end of the disk (4096 sectors)",
            "partition 5 (sectors 500-499) ends before it starts",
            "partition 6 (sectors 600-699) overlaps partitions 7, 8",
            "partition 7 (sectors 650-650) overlaps partition 6",
            "partition 8 (sectors 690-700) overlaps partition 6",
        ]
    );
}

#[test]
fn gpt_entries_past_linux_s_limit_of_255_are_refused() {
    let mut gpt = Gpt::new(512, 8192, &[(254, 100, 199), (255, 200, 299)]);
    gpt.count = 256;
    let table = read(gpt.image(), 512);
    assert_eq!(table.partitions, vec![part(255, 100, 100, 512)]);
    assert_eq!(
        table.refused,
        vec!["partition 256 (sectors 200-299) is past Linux's limit of 255 partitions"]
    );
}

#[test]
fn mbr_entries_past_the_disk_or_overlapping_are_refused_and_keep_their_numbers() {
    let sector = 512;
    let mut image = vec![0u8; 4096 * 512];
    put_record(
        &mut image,
        sector,
        0,
        &[
            slot(MBR_LINE, 100, 100),
            slot(MBR_LINE, 2048, 4096),
            slot(EXTENDED, 1000, 1000),
            slot(MBR_LINE, 3000, 10),
        ],
    );
    put_record(&mut image, sector, 1000, &[slot(MBR_LINE, 1, 10)]);
    let table = read(image, sector);
    // Partition 4 lies inside the refused partition 2, which overlaps nothing served. The
    // extended partition 3 is only where the chain starts.
    assert_eq!(
        table.partitions,
        vec![
            part(1, 100, 100, sector),
            part(4, 3000, 10, sector),
            part(5, 1001, 10, sector),
        ]
    );
    assert_eq!(
        table.refused,
        vec!["partition 2 (sectors 2048-6143) ends past the end of the disk (4096 sectors)"]
    );
}

#[test]
fn a_protective_mbr_means_gpt_even_when_hybrid() {
    let gpt = Gpt::new(512, 2048, &[(0, 100, 199)]);
    let mut image = gpt.image();
    put_record(
        &mut image,
        512,
        0,
        &[
            slot(0xEE, 1, 99),
            slot(0x0C, 100, 100),
            slot(MBR_LINE, 300, 10),
        ],
    );
    let table = read(image, 512);
    assert_eq!(table.scheme, Scheme::Gpt);
    assert_eq!(table.partitions, vec![part(1, 100, 100, 512)]);
    assert_eq!(
        table.notes,
        vec!["sector 0 is a hybrid MBR; its entries other than the GPT's are ignored"]
    );
}

#[test]
fn without_a_signature_or_with_a_bad_boot_flag_or_a_stray_gpt_entry_there_is_no_table() {
    let sector = 512;
    let mut blank = vec![0u8; 2048 * 512];
    let table = read(blank.clone(), sector);
    assert_eq!(table.scheme, Scheme::None);
    assert!(table.partitions.is_empty() && table.notes.is_empty());
    // Sector 0 and LBA 1, where a new MBR or GPT would go.
    assert_eq!(table.table_ranges, vec![0..1024]);

    let mut boot_sector = slot(MBR_LINE, 100, 100);
    boot_sector.boot = 0x12;
    put_record(&mut blank, sector, 0, &[boot_sector]);
    let table = read(blank.clone(), sector);
    assert_eq!(table.scheme, Scheme::None);
    assert!(table.partitions.is_empty());
    assert_eq!(table.notes.len(), 1, "{:?}", table.notes);
    assert!(
        table.notes[0].contains("boot flag 0x12"),
        "{:?}",
        table.notes
    );

    put_record(
        &mut blank,
        sector,
        0,
        &[slot(MBR_LINE, 100, 100), slot(0xEE, 2, 100)],
    );
    let table = read(blank, sector);
    assert_eq!(table.scheme, Scheme::None);
    assert!(table.partitions.is_empty());
    assert_eq!(table.notes.len(), 1, "{:?}", table.notes);
}

#[test]
fn an_empty_mbr_is_a_table_without_partitions() {
    let mut image = vec![0u8; 2048 * 512];
    put_record(&mut image, 512, 0, &[]);
    let table = read(image, 512);
    assert_eq!(table.scheme, Scheme::Mbr);
    assert!(table.partitions.is_empty());
    assert_eq!(table.table_ranges, vec![0..512]);
}

#[test]
fn disks_too_small_for_a_sector_have_no_table() {
    for (len, sector) in [(0, 512), (511, 512), (4095, 4096)] {
        let table = read(vec![0u8; len], sector);
        assert_eq!(table.scheme, Scheme::None);
        assert_eq!(table.table_ranges, vec![0..2 * sector]);
    }
}

#[test]
fn read_errors_are_errors() {
    let storage = MemStorage::from_vec(vec![0u8; 4096]);
    storage.fail_reads(libc::EIO);
    let disk = RawDisk::open(Box::new(storage), &OpenOptions::default()).unwrap();
    let err = read_partition_table(&disk).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
}

#[test]
fn random_damage_to_tables_never_panics_and_keeps_partitions_apart() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mbr, _) = mbr_with_logicals(512);
    // The bytes each table lives in: MBR entries and EBRs; GPT headers and used entries.
    let mbr_hot: Vec<(u64, u64)> = [0, 4096, 6144, 9216]
        .map(|lba| (lba * 512 + 0x1BE, 66))
        .to_vec();
    let gpt = Gpt::new(4096, 1024, &[(0, 10, 99), (1, 100, 199)]).image();
    let gpt_hot = vec![(0x1BE, 66), (4096, 92), (8192, 256), (1023 * 4096, 92)];
    for (image, sector, hot) in [(mbr, 512u64, mbr_hot), (gpt, 4096, gpt_hot)] {
        let len = image.len() as u64;
        for round in 0..200 {
            let mut damaged = image.clone();
            for _ in 0..1 + next() % 8 {
                let (at, span) = hot[(next() % hot.len() as u64) as usize];
                damaged[(at + next() % span) as usize] = next() as u8;
            }
            let disk = disk(damaged, sector);
            if round % 2 == 0 {
                seal_checksums(&disk);
            }
            let table = read_partition_table(&disk).unwrap();
            let mut spans: Vec<_> = table
                .partitions
                .iter()
                .map(|p| (p.offset, p.offset + p.len))
                .collect();
            spans.sort();
            for pair in spans.windows(2) {
                assert!(pair[0].1 <= pair[1].0, "{table:?}");
            }
            assert!(spans.iter().all(|&(start, end)| start < end && end <= len));
        }
    }
}

#[test]
fn a_chain_stops_after_1024_ebrs_even_while_it_finds_partitions() {
    let sector = 512;
    let mut image = vec![0u8; 4096 * 512];
    put_record(&mut image, sector, 0, &[slot(EXTENDED, 100, 3000)]);
    // EBR i at 100 + i links to the next; every 50th holds a partition of one sector
    // beyond the chain, which keeps Linux's count of empty links from ending it.
    for i in 0..1100u32 {
        let mut slots = vec![slot(EXTENDED, i + 1, 1)];
        if i % 50 == 49 {
            slots.insert(0, slot(MBR_LINE, 2000 - i + i / 50, 1));
        }
        put_record(&mut image, sector, 100 + u64::from(i), &slots);
    }
    let table = read(image, sector);
    assert_eq!(table.partitions.len(), 20, "{:?}", table.refused);
    assert_eq!(table.partitions[0], part(5, 2100, 1, sector));
    assert_eq!(
        table.notes,
        vec![format!(
            "the disk has more than {MAX_EBRS} EBRs, so the rest of the chain is not read"
        )]
    );
}

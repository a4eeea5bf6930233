//! Partition tables written by sfdisk (util-linux), read through the library from a raw
//! file and from a VHDX holding the same disk, against what sfdisk reads of them.

use crate::common::mount::{self, LoopDevice};
use crate::common::partitions::sfdisk;
use crate::common::{qemu_img, run};
use std::fs;
use std::path::Path;
use std::process::Command;
use vdisk_mount::create::{CreateOptions, create};
use vdisk_mount::partition::{Partition, PartitionTable, Scheme, read_partition_table};
use vdisk_mount::{Format, OpenOptions, open};

const SIZE: u64 = 64 << 20;

/// Primary 1, an extended partition 2 holding logical partitions 5, 6 and 7, primary 3
/// after it and slot 4 empty.
const MBR_SCRIPT: &str = "label: dos
unit: sectors
start=2048, size=8192, type=83
start=10240, size=40960, type=5
start=12288, size=4096, type=83
start=18432, size=8192, type=82
start=28672, size=2048, type=83
start=51200, size=20480, type=83
";

/// Entries 1, 3 and 128 of 128 in use, so numbering follows the entry index.
fn gpt_script(device: &str) -> String {
    format!(
        "label: gpt
unit: sectors
{device}1 : start=2048, size=4096
{device}3 : start=8192, size=8192, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F
{device}128 : start=20480, size=2048
"
    )
}

/// Sectors of 4096 bytes: the start and sizes count 4 KiB units.
const GPT_4K_SCRIPT: &str = "label: gpt
unit: sectors
start=256, size=1024
start=2048, size=4096
";

/// The partitions sfdisk reads from `device`, in bytes and by number, extended
/// partitions left out (they get no file), and the numbers of those left out.
fn sfdisk_read(device: &Path) -> (Vec<Partition>, Vec<u32>) {
    let out = run(Command::new("sfdisk").arg("--json").arg(device));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let table = &json["partitiontable"];
    let sector = table["sectorsize"].as_u64().unwrap();
    let name = table["device"].as_str().unwrap();
    let (mut partitions, mut extended) = (Vec::new(), Vec::new());
    for entry in table["partitions"].as_array().unwrap() {
        let node = entry["node"].as_str().unwrap();
        let number: u32 = node
            .strip_prefix(name)
            .map(|n| n.trim_start_matches('p'))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("sfdisk names a partition {node} of {name}"));
        if table["label"] == "dos" && ["5", "f", "85"].contains(&entry["type"].as_str().unwrap()) {
            extended.push(number);
            continue;
        }
        partitions.push(Partition {
            number,
            offset: entry["start"].as_u64().unwrap() * sector,
            len: entry["size"].as_u64().unwrap() * sector,
        });
    }
    partitions.sort_by_key(|p| p.number);
    (partitions, extended)
}

fn read_image(path: &Path, format: Option<Format>) -> PartitionTable {
    let options = OpenOptions {
        read_only: true,
        format,
        ..OpenOptions::default()
    };
    let disk = open(path, &options).unwrap();
    read_partition_table(disk.as_ref()).unwrap()
}

fn sparse_file(path: &Path) {
    fs::File::create(path).unwrap().set_len(SIZE).unwrap();
}

/// The table of `raw` (512-byte sectors) as the library reads it from the raw file and
/// from a VHDX qemu-img made of it, which must agree with each other.
fn read_raw_and_vhdx(raw: &Path) -> PartitionTable {
    let vhdx = raw.with_extension("vhdx");
    let (raw_str, vhdx_str) = (raw.to_str().unwrap(), vhdx.to_str().unwrap());
    qemu_img(&["convert", "-f", "raw", "-O", "vhdx", raw_str, vhdx_str]);
    let from_raw = read_image(raw, Some(Format::Raw));
    assert_eq!(
        read_image(&vhdx, None),
        from_raw,
        "VHDX and raw file differ"
    );
    from_raw
}

#[test]
fn an_mbr_with_logical_partitions_reads_as_sfdisk_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("mbr.img");
    sparse_file(&raw);
    sfdisk(&raw, 512, &[], &[], MBR_SCRIPT);
    let (expected, extended) = sfdisk_read(&raw);
    assert_eq!(
        expected.iter().map(|p| p.number).collect::<Vec<_>>(),
        [1, 3, 5, 6, 7]
    );
    assert_eq!(extended, [2]);
    let table = read_raw_and_vhdx(&raw);
    assert_eq!(table.scheme, Scheme::Mbr);
    assert_eq!(table.partitions, expected);
    assert!(
        table.refused.is_empty() && table.notes.is_empty(),
        "{table:?}"
    );
}

#[test]
fn a_gpt_reads_as_sfdisk_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("gpt.img");
    sparse_file(&raw);
    sfdisk(&raw, 512, &[], &[], &gpt_script(raw.to_str().unwrap()));
    let (expected, _) = sfdisk_read(&raw);
    assert_eq!(
        expected.iter().map(|p| p.number).collect::<Vec<_>>(),
        [1, 3, 128]
    );
    let table = read_raw_and_vhdx(&raw);
    assert_eq!(table.scheme, Scheme::Gpt);
    assert_eq!(table.partitions, expected);
    assert!(
        table.refused.is_empty() && table.notes.is_empty(),
        "{table:?}"
    );
}

#[test]
fn a_gpt_with_a_damaged_primary_header_reads_from_the_backup_as_sfdisk_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("damaged.img");
    sparse_file(&raw);
    sfdisk(&raw, 512, &[], &[], &gpt_script(raw.to_str().unwrap()));
    let (intact, _) = sfdisk_read(&raw);
    let file = fs::OpenOptions::new().write(true).open(&raw).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"NOT PART", 512).unwrap();
    drop(file);
    let (expected, _) = sfdisk_read(&raw);
    assert_eq!(expected, intact, "sfdisk took the backup");
    let table = read_raw_and_vhdx(&raw);
    assert_eq!(table.scheme, Scheme::Gpt);
    assert_eq!(table.partitions, expected);
    let last = SIZE / 512 - 1;
    assert_eq!(
        table.notes,
        [format!(
            "primary GPT header is damaged (no GPT signature); using the backup at LBA {last}"
        )]
    );
}

#[test]
fn a_gpt_of_4096_byte_sectors_counts_them_in_4_kib() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("4k.img");
    sparse_file(&raw);
    sfdisk(&raw, 4096, &[], &[], GPT_4K_SCRIPT);
    // sfdisk takes the sector size from the device it reads.
    let device = LoopDevice::attach_with_sector_size(&raw, 4096);
    let (expected, _) = sfdisk_read(device.path());
    drop(device);
    assert_eq!(
        expected,
        [
            Partition {
                number: 1,
                offset: 256 * 4096,
                len: 1024 * 4096
            },
            Partition {
                number: 2,
                offset: 2048 * 4096,
                len: 4096 * 4096
            },
        ]
    );

    // A VHDX of 4096-byte logical sectors holding the same disk.
    let vhdx = dir.path().join("4k.vhdx");
    let options = CreateOptions {
        format: Some(Format::Vhdx),
        size: Some(SIZE),
        logical_sector_size: Some(4096),
        ..CreateOptions::default()
    };
    create(&vhdx, &options).unwrap();
    copy_into(&raw, &vhdx);
    let table = read_image(&vhdx, None);
    assert_eq!(table.scheme, Scheme::Gpt);
    assert_eq!(table.partitions, expected);
    assert!(
        table.refused.is_empty() && table.notes.is_empty(),
        "{table:?}"
    );

    // Read with 512-byte sectors, the same bytes hold a protective MBR but no GPT: Linux
    // reads no partition from them.
    let table = read_image(&raw, Some(Format::Raw));
    assert_eq!(table.scheme, Scheme::None);
    assert!(table.partitions.is_empty());
    assert_eq!(table.notes.len(), 1, "{:?}", table.notes);
}

/// Writes what of `raw` is not zeros into the disk of the image `image`.
fn copy_into(raw: &Path, image: &Path) {
    let disk = open(image, &OpenOptions::default()).unwrap();
    let data = fs::read(raw).unwrap();
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            disk.write_at(chunk, (i as u64) << 20).unwrap();
        }
    }
    disk.close().unwrap();
}

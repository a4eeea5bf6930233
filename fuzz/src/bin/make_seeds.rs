//! Writes seed inputs for every fuzz target: `make_seeds OUT_DIR [IMAGE...]`.
//!
//! Images of both formats are made here (fixed, dynamic, differencing; 512- and
//! 4096-byte sectors; with data written through the library), and any IMAGE given (real
//! images, e.g. the sample corpus decompressed) joins them. Each is cut to its metadata
//! and first data (see `encode_image`); logs are built entry by entry; partition tables
//! are written by sfdisk, when it is installed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use uuid::Uuid;
use vdisk_mount::create::{CreateOptions, ImageType, create};
use vdisk_mount::vhdx::log::{EntryBuilder, LogUpdate};
use vdisk_mount::{Format, OpenOptions, open};
use vdisk_mount_fuzz::encode_image;

/// Bytes of each image a seed keeps.
const BUDGET: usize = 96 * 1024;

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let Some((out, given)) = args.split_first() else {
        eprintln!("usage: make_seeds OUT_DIR [IMAGE...]");
        std::process::exit(2);
    };
    let work = std::env::temp_dir().join(format!("vdisk-seeds-{}", std::process::id()));
    fs::create_dir_all(&work).unwrap();
    let mut seeds = Seeds::new(out);

    let mut images = made_images(&work);
    images.extend(given.iter().cloned());
    for image in &images {
        let bytes = fs::read(image).unwrap();
        let encoded = encode_image(&bytes, BUDGET);
        seeds.add("open_read", &encoded);
        let mut read_only = encoded.clone();
        read_only[0] |= 2;
        seeds.add("open_read", &read_only);
        let mut with_ops = encoded.clone();
        with_ops.extend_from_slice(&operations());
        seeds.add("io_model", &with_ops);
        seeds.add("structures", &bytes[..bytes.len().min(64 * 1024)]);
        seeds.add("structures", &bytes[bytes.len().saturating_sub(512)..]);
        if bytes.len() > 320 * 1024 {
            seeds.add("structures", &bytes[64 * 1024..320 * 1024]);
        }
    }
    for (child, parent) in chains(&work) {
        let mut pair = encode_image(&fs::read(&child).unwrap(), BUDGET);
        pair.extend(encode_image(&fs::read(&parent).unwrap(), BUDGET));
        seeds.add("chain", &pair);
    }
    for ring in log_rings() {
        seeds.add("vhdx_log", &ring);
    }
    for disk in partitioned_disks(&work) {
        let encoded = encode_image(&fs::read(&disk).unwrap(), BUDGET);
        // Read with 512- and 4096-byte sectors, checksums kept and resealed.
        for flags in 0..4u8 {
            let mut seed = vec![flags];
            seed.extend_from_slice(&encoded);
            seeds.add("partitions", &seed);
        }
    }
    fs::remove_dir_all(&work).unwrap();
    println!("{} seeds in {}", seeds.count, out.display());
}

struct Seeds<'a> {
    out: &'a Path,
    count: usize,
}

impl<'a> Seeds<'a> {
    fn new(out: &'a Path) -> Self {
        Seeds { out, count: 0 }
    }

    fn add(&mut self, target: &str, bytes: &[u8]) {
        let dir = self.out.join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(format!("seed-{:04}", self.count)), bytes).unwrap();
        self.count += 1;
    }
}

fn options(
    format: Format,
    image_type: ImageType,
    size: u64,
    block: u32,
    sector: u32,
) -> CreateOptions {
    CreateOptions {
        format: Some(format),
        image_type: Some(image_type),
        size: Some(size),
        block_size: Some(block),
        logical_sector_size: (format == Format::Vhdx).then_some(sector),
        ..CreateOptions::default()
    }
}

/// Writes a few recognisable pieces through the library, allocating blocks.
fn fill(path: &Path) {
    let disk = open(path, &OpenOptions::default()).unwrap();
    let size = disk.size();
    for (i, at) in [0, size / 3, size - 4096].into_iter().enumerate() {
        disk.write_at(&vec![0x11 * (i as u8 + 1); 4096], at)
            .unwrap();
    }
    disk.close().unwrap();
}

fn made_images(work: &Path) -> Vec<PathBuf> {
    let mut images = Vec::new();
    let kinds = [
        (Format::Vhd, ImageType::Dynamic, 8 << 20, 512 << 10, 512),
        (Format::Vhd, ImageType::Fixed, 1 << 20, 0, 512),
        (Format::Vhdx, ImageType::Dynamic, 64 << 20, 1 << 20, 512),
        (Format::Vhdx, ImageType::Dynamic, 64 << 20, 1 << 20, 4096),
        (Format::Vhdx, ImageType::Fixed, 4 << 20, 1 << 20, 512),
    ];
    for (i, (format, image_type, size, block, sector)) in kinds.into_iter().enumerate() {
        let path = work.join(format!("made-{i}.{format}"));
        let block = if block == 0 { 2 << 20 } else { block };
        create(&path, &options(format, image_type, size, block, sector)).unwrap();
        fill(&path);
        images.push(path);
    }
    images
}

/// Children named `child` over parents named `parent.vhd` / `parent.vhdx`, as the chain
/// target lays them out.
fn chains(work: &Path) -> Vec<(PathBuf, PathBuf)> {
    let mut pairs = Vec::new();
    for format in [Format::Vhd, Format::Vhdx] {
        let dir = work.join(format!("chain-{format}"));
        fs::create_dir_all(&dir).unwrap();
        let parent = dir.join(format!("parent.{format}"));
        create(
            &parent,
            &options(format, ImageType::Dynamic, 16 << 20, 1 << 20, 512),
        )
        .unwrap();
        fill(&parent);
        let child = dir.join("child");
        create(
            &child,
            &CreateOptions {
                parent: Some(parent.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        fill(&child);
        pairs.push((child, parent));
    }
    pairs
}

/// Raw disks partitioned by sfdisk: an MBR with logical partitions, a GPT with gaps in
/// its numbering, and one whose primary GPT header is damaged. None without sfdisk.
fn partitioned_disks(work: &Path) -> Vec<PathBuf> {
    let scripts = [
        "label: dos\n2048,2048,83\n6144,10240,5\n8192,2048,83\n12288,2048,82\n4096,1024,7\n",
        "label: gpt\nstart=2048,size=2048\nstart=6144,size=4096\n",
        "label: gpt\nfirst-lba: 64\nstart=64,size=64\nstart=1024,size=1024\n",
    ];
    let mut disks = Vec::new();
    for (i, script) in scripts.into_iter().enumerate() {
        let path = work.join(format!("partitioned-{i}.img"));
        fs::File::create(&path).unwrap().set_len(8 << 20).unwrap();
        let written = Command::new("sfdisk")
            .arg("-q")
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .and_then(|mut sfdisk| {
                sfdisk.stdin.take().unwrap().write_all(script.as_bytes())?;
                sfdisk.wait()
            });
        if !written.is_ok_and(|status| status.success()) {
            println!("make_seeds: sfdisk is missing or failed; no partition table seeds");
            return Vec::new();
        }
        disks.push(path);
    }
    let damaged = work.join("partitioned-damaged.img");
    fs::copy(&disks[1], &damaged).unwrap();
    let file = fs::OpenOptions::new().write(true).open(&damaged).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"NOT PART", 512).unwrap();
    disks.push(damaged);
    disks
}

/// Operations for the I/O target: kind, offset in sectors, length, fill byte.
fn operations() -> Vec<u8> {
    let mut ops = Vec::new();
    for (kind, sector, len, fill) in [
        (1u8, 0u32, 4096u16, 0xA5u8),
        (1, 2049, 700, 0x3C),
        (0, 0, 8192, 0),
        (2, 8, 4096, 0),
        (3, 0, 0, 0),
        (1 | 0x80, 0, 512, 0x77),
        (4, 0, 65535, 0),
        (2, 4096, 65535, 0),
    ] {
        ops.push(kind);
        ops.extend_from_slice(&sector.to_le_bytes());
        ops.extend_from_slice(&len.to_le_bytes());
        ops.push(fill);
    }
    ops
}

/// Log rings: a LogGuid, then the ring with a few sequences (stale, live, wrapping).
fn log_rings() -> Vec<Vec<u8>> {
    let guid = Uuid::from_u128(0x5EED_0000_0000_0000_0000_0000_0000_0001);
    let page = |fill: u8, file_offset: u64| LogUpdate::Page {
        file_offset,
        data: Box::new([fill; 4096]),
    };
    let entry = |sequence: u64, tail: u64, updates: &[LogUpdate]| {
        EntryBuilder {
            sequence,
            tail,
            log_guid: guid,
            flushed_file_offset: 4 << 20,
            last_file_offset: 4 << 20,
            updates,
        }
        .build()
    };
    let zero = LogUpdate::Zero {
        file_offset: 3 << 20,
        length: 1 << 20,
    };
    let mut rings = Vec::new();
    for layout in [
        vec![(0usize, entry(1, 0, &[page(1, 0x30_0000)]))],
        vec![
            (0, entry(4, 0, &[page(4, 0x30_0000)])),
            (8192, entry(5, 0, &[page(5, 0x30_1000), zero.clone()])),
            (16384, entry(6, 8192, std::slice::from_ref(&zero))),
        ],
        vec![(
            24576,
            entry(9, 24576, &[page(9, 0x30_0000), page(8, 0x30_1000)]),
        )],
    ] {
        let mut ring = vec![0u8; 32 * 1024];
        for (at, bytes) in layout {
            for (i, b) in bytes.iter().enumerate() {
                let len = ring.len();
                ring[(at + i) % len] = *b;
            }
        }
        let mut seed = guid.to_bytes_le().to_vec();
        seed.extend(ring);
        rings.push(seed);
    }
    rings
}

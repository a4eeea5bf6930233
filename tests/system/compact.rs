//! `vdisk compact`, run as a user would: after a filesystem inside gave space back, on
//! differencing children, on the corpus, killed at random instants, and refusing images
//! in use.

use crate::common;
use crate::common::mount::{self, FsMount, LoopDevice, Mount};
use crate::common::vdisk::{kill_at_random_instants, vdisk_fails, vdisk_ok};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

fn compact_json(image: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["compact", "--json"];
    args.extend(extra);
    args.push(image.to_str().unwrap());
    serde_json::from_str(&vdisk_ok(&args)).unwrap()
}

/// The sha256 of the disk of `image` (and its parents), read through the library.
fn disk_sha(image: &Path) -> String {
    common::sha256_disk(common::chain::open(image, true).as_ref())
}

fn qemu_format(image: &Path) -> &'static str {
    match image.extension().and_then(|e| e.to_str()) {
        Some("vhdx") => "vhdx",
        _ => "vpc",
    }
}

/// ext4 inside a 1 GiB image keeps 100 MiB of files and gives 300 MiB back by fstrim;
/// compact then cuts the file to the blocks still used (within two blocks and the
/// metadata), and qemu and libvhdi read what the disk held before.
fn compact_after_trim(image: &Path, block: u64) {
    let format = qemu_format(image);
    let kept = mount::pattern(5, 100 * MIB as usize);
    {
        let vdisk = Mount::new(image, &[]);
        let device = LoopDevice::attach(&vdisk.disk());
        common::run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(device.path()),
        );
        let fs = FsMount::new(device.path());
        for i in 0..3 {
            let data = mount::pattern(10 + i, 100 * MIB as usize);
            std::fs::write(fs.path().join(format!("gone-{i}.bin")), data).unwrap();
        }
        std::fs::write(fs.path().join("kept.bin"), &kept).unwrap();
        common::run(&mut Command::new("sync"));
        for i in 0..3 {
            std::fs::remove_file(fs.path().join(format!("gone-{i}.bin"))).unwrap();
        }
        common::run(&mut Command::new("sync"));
        common::run(Command::new("fstrim").arg(fs.path()));
        fs.unmount();
        drop(device);
        vdisk.unmount();
    }
    let dir = image.parent().unwrap();
    let reference = dir.join("before.raw");
    common::qemu_convert_to_raw(format, image, &reference);
    let before = std::fs::metadata(image).unwrap().len();
    let report = compact_json(image, &[]);
    let after = std::fs::metadata(image).unwrap().len();
    assert_eq!(report["length_before"].as_u64(), Some(before));
    assert_eq!(report["length_after"].as_u64(), Some(after));
    let info = common::vdisk::info_json(image);
    let blocks = info["allocated_blocks"]
        .as_u64()
        .unwrap_or_else(|| panic!("no allocated_blocks in {info}"));
    let live = blocks * block;
    assert!(
        after <= live + 2 * block + 8 * MIB,
        "{format}: {after} bytes after compaction for {live} bytes of blocks (was {before})"
    );
    assert!(after < before, "{format}: {before} -> {after}");
    common::qemu_check_clean(format, image);
    let compared = Command::new("qemu-img")
        .args(["compare", "-f", format, "-F", "raw"])
        .arg(image)
        .arg(&reference)
        .output()
        .unwrap();
    assert!(
        compared.status.success(),
        "{format}: qemu reads other contents after compaction: {}",
        String::from_utf8_lossy(&compared.stdout)
    );
    let raw = std::fs::read(&reference).unwrap();
    assert!(
        common::vhdimount_read(image) == raw,
        "{format}: vhdimount reads other contents after compaction"
    );
    std::fs::remove_file(&reference).unwrap();
    // The filesystem inside is intact.
    let vdisk = Mount::new(image, &["ro"]);
    let device = LoopDevice::attach_read_only(&vdisk.disk());
    common::run(Command::new("fsck.ext4").arg("-fn").arg(device.path()));
    let fs = FsMount::new_read_only(device.path());
    assert!(std::fs::read(fs.path().join("kept.bin")).unwrap() == kept);
    fs.unmount();
    drop(device);
    vdisk.unmount();
}

#[test]
fn compact_after_fstrim_shrinks_a_vhdx_to_its_live_blocks() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("c.vhdx");
    vdisk_ok(&[
        "create",
        "--size",
        "1G",
        "--block-size",
        "8M",
        image.to_str().unwrap(),
    ]);
    compact_after_trim(&image, 8 * MIB);
}

#[test]
fn compact_after_fstrim_shrinks_a_vhd_to_its_live_blocks() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("c.vhd");
    vdisk_ok(&["create", "--size", "1G", image.to_str().unwrap()]);
    compact_after_trim(&image, 2 * MIB);
}

/// Writes every block of `image` in a shuffled order with random data and discards a
/// third of them, through the library: holes all over the file.
fn fragment(image: &Path, seed: u64, block: u64) {
    let disk = common::chain::open(image, false);
    let blocks = disk.size() / block;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<u64> = (0..blocks).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let mut data = vec![0u8; block as usize];
    for &b in &order {
        rng.fill(&mut data[..]);
        disk.write_at(&data, b * block).unwrap();
    }
    for &b in order.iter().step_by(3) {
        disk.discard(b * block, block).unwrap();
    }
    disk.close().unwrap();
}

fn copy_sparse(from: &Path, to: &Path) {
    common::run(Command::new("cp").arg("--sparse=always").arg(from).arg(to));
}

/// `vdisk compact` killed at random instants: every image left behind opens with the
/// same contents, and a second compaction finishes it to an image qemu checks clean and
/// reads the same.
fn kill_torture(image: &Path, block: u64) {
    let format = qemu_format(image);
    let dir = image.parent().unwrap();
    fragment(image, 3, block);
    let expected = disk_sha(image);
    let reference = dir.join("reference.raw");
    common::qemu_convert_to_raw(format, image, &reference);
    let work = dir.join(format!(
        "work.{}",
        image.extension().unwrap().to_str().unwrap()
    ));
    let fresh_copy = |work: &Path| {
        let _ = std::fs::remove_file(work);
        copy_sparse(image, work);
    };
    kill_at_random_instants(
        &["compact"],
        &work,
        30,
        17,
        fresh_copy,
        |work, attempt, what| {
            let what = format!("{format}: {what}");
            assert_eq!(disk_sha(work), expected, "{what}: contents changed");
            // Every third one is finished and checked by qemu too.
            if attempt % 3 == 0 {
                vdisk_ok(&["compact", work.to_str().unwrap()]);
                common::qemu_check_clean(format, work);
                let compared = Command::new("qemu-img")
                    .args(["compare", "-q", "-f", format, "-F", "raw"])
                    .arg(work)
                    .arg(&reference)
                    .status()
                    .unwrap();
                assert!(compared.success(), "{what}: qemu reads other contents");
            }
        },
    );
}

#[test]
fn compact_killed_at_random_instants_leaves_a_vhdx_that_reads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("k.vhdx");
    vdisk_ok(&[
        "create",
        "--size",
        "192M",
        "--block-size",
        "1M",
        image.to_str().unwrap(),
    ]);
    kill_torture(&image, MIB);
}

#[test]
fn compact_killed_at_random_instants_leaves_a_vhd_that_reads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("k.vhd");
    vdisk_ok(&[
        "create",
        "--size",
        "192M",
        "--block-size",
        "512K",
        image.to_str().unwrap(),
    ]);
    kill_torture(&image, 512 << 10);
}

/// A differencing child compacts on its own: the chain reads the same, the parent is
/// untouched, and a parent named by a child beside it is refused unless forced.
fn children_and_parents(format: &str) {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join(format!("base.{format}"));
    let child = dir.path().join(format!("child.{format}"));
    vdisk_ok(&[
        "create",
        "--size",
        "64M",
        "--block-size",
        "1M",
        parent.to_str().unwrap(),
    ]);
    fragment(&parent, 1, MIB);
    vdisk_ok(&[
        "create",
        "--block-size",
        "1M",
        "--parent",
        parent.to_str().unwrap(),
        child.to_str().unwrap(),
    ]);
    fragment(&child, 2, MIB);
    let chain_before = disk_sha(&child);
    let parent_file = common::sha256_file(&parent);

    let report = compact_json(&child, &["--zero-blocks"]);
    // A VHD child keeps its discarded blocks (unallocated, they would read the parent),
    // so it has no holes to fill; a VHDX child's become ZERO and free.
    if format == "vhdx" {
        assert!(report["blocks_moved"].as_u64().unwrap() > 0, "{report}");
    }
    assert_eq!(
        disk_sha(&child),
        chain_before,
        "{format}: the chain reads otherwise"
    );
    assert_eq!(common::sha256_file(&parent), parent_file);

    let refused = vdisk_fails(&["compact", parent.to_str().unwrap()]);
    assert!(
        refused.contains("child.") && refused.contains("--force"),
        "{refused}"
    );
    assert_eq!(common::sha256_file(&parent), parent_file);
    compact_json(&parent, &["--force"]);
    assert_eq!(
        disk_sha(&child),
        chain_before,
        "{format}: after the parent's compaction"
    );
}

#[test]
fn differencing_vhdx_children_compact_and_their_parents_need_force() {
    children_and_parents("vhdx");
}

#[test]
fn differencing_vhd_children_compact_and_their_parents_need_force() {
    children_and_parents("vhd");
}

#[test]
fn a_mounted_image_is_not_compacted() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("m.vhdx");
    vdisk_ok(&["create", "--size", "64M", image.to_str().unwrap()]);
    fragment(&image, 4, 32 * MIB);
    let before = common::sha256_file(&image);
    let vdisk = Mount::new(&image, &["ro"]);
    let refused = vdisk_fails(&["compact", image.to_str().unwrap()]);
    assert!(
        refused.contains("in use") && refused.contains(&vdisk.daemon_pid().to_string()),
        "{refused}"
    );
    vdisk.unmount();
    assert_eq!(common::sha256_file(&image), before);
}

/// A digest of what the disk holds, whichever way its zeros are stored: every 4 KiB piece
/// of data that is not all zeros, with its offset.
fn content_digest(image: &Path) -> String {
    use sha2::{Digest, Sha256};
    let disk = common::chain::open(image, true);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let extents = disk.allocation(0, disk.size()).unwrap();
    for extent in extents
        .iter()
        .filter(|e| e.state == vdisk_mount::Allocation::Data)
    {
        let mut at = extent.offset;
        while at < extent.offset + extent.len {
            let n = (extent.offset + extent.len - at).min(buf.len() as u64) as usize;
            disk.read_at(&mut buf[..n], at).unwrap();
            for (i, piece) in buf[..n].chunks(4096).enumerate() {
                if piece.iter().any(|&b| b != 0) {
                    hasher.update((at + i as u64 * 4096).to_le_bytes());
                    hasher.update(piece);
                }
            }
            at += n as u64;
        }
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Disks up to this size are read whole and compared with the corpus's expected digest;
/// larger ones (up to 127 GiB, nearly all zeros) by what their data holds.
const FULL_READ_LIMIT: u64 = 1 << 30;

/// Every corpus image the library opens read-write compacts, with `--zero-blocks`, and
/// still reads to its expected contents.
#[test]
fn corpus_images_compact_and_read_the_same() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let mut compacted = 0;
    for suffix in [".vhd", ".vhdx"] {
        for name in common::corpus_images(&corpus, suffix) {
            let dir = tempfile::tempdir().unwrap();
            let path: PathBuf = common::decompress_corpus_image(&corpus, &name, dir.path());
            if vdisk_mount::open(&path, &vdisk_mount::OpenOptions::default()).is_err() {
                // Damaged on purpose, or a parent missing: the readers' tests cover them.
                continue;
            }
            let expected = common::expected_sha256(&corpus, &format!("{name}.raw"));
            let digest = content_digest(&path);
            let before = std::fs::metadata(&path).unwrap().len();
            let report = compact_json(&path, &["--zero-blocks", "--force"]);
            let after = std::fs::metadata(&path).unwrap().len();
            assert!(after <= before, "{name}: {before} -> {after}");
            assert_eq!(content_digest(&path), digest, "{name}: {report}");
            let size = common::chain::open(&path, true).size();
            if size <= FULL_READ_LIMIT {
                assert_eq!(disk_sha(&path), expected, "{name}: {report}");
            }
            common::qemu_check_clean(qemu_format(&path), &path);
            compacted += 1;
        }
    }
    assert!(compacted >= 10, "only {compacted} corpus images compacted");
}

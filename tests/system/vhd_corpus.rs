//! Real VHD images made by Hyper-V, Virtual PC, Disk2vhd and qemu-img read to the digests
//! two independent readers agree on, with the disk size qemu picks for each creator; the
//! damaged samples and a differencing one without its parent are refused with errors that
//! say why; given a stand-in parent, that differencing sample reads as libvhdi reads it.

use crate::common;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use vdisk_mount::{Allocation, ErrorKind, OpenOptions, VhdSizeRule, VirtualDisk};

/// Samples that must not open, with the start of the error each must give.
const REFUSED: &[(&str, &str)] = &[
    // Hand-edited: footer (and header) checksums no longer match.
    ("dfvfs-image-chain/image.vhd", "VHD footer: Checksum field"),
    (
        "dfvfs-image-chain/image-differential.vhd",
        "VHD footer: Checksum field",
    ),
    // Its parent was not kept: the error lists where it was looked for.
    (
        "dfvfs-fat-chain/fat-differential.vhd",
        "parent not found; tried ",
    ),
];

/// Reading a whole disk is a real check only up to a size the test run can afford;
/// bigger disks in the corpus are sparse and hashed by
/// `huge_sparse_images_hash_to_their_expected_digests`.
const FULL_READ_LIMIT: u64 = 4 << 30;

fn open(path: &Path, rule: VhdSizeRule) -> Box<dyn VirtualDisk> {
    let options = OpenOptions {
        read_only: true,
        vhd_size_rule: rule,
        ..Default::default()
    };
    vdisk_mount::open(path, &options).unwrap_or_else(|e| panic!("{e}"))
}

fn qemu_size(path: &Path, rule: VhdSizeRule) -> u64 {
    let force = match rule {
        VhdSizeRule::Auto => String::new(),
        VhdSizeRule::Chs => "force_size_calc=chs,".to_string(),
        VhdSizeRule::CurrentSize => "force_size_calc=current_size,".to_string(),
    };
    common::qemu_virtual_size(&format!(
        "driver=vpc,{force}file.filename={}",
        path.display()
    ))
}

/// sha256 of the disk as our reader returns it, every byte read through `read_at`.
/// Digesting runs in `sha256sum`: the test build's own sha256 is unoptimised and would
/// take far longer than the reading.
fn sha256_by_reading(disk: &dyn VirtualDisk) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cannot run sha256sum");
    let mut stdin = child.stdin.take().unwrap();
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0;
    while pos < disk.size() {
        let n = (disk.size() - pos).min(buf.len() as u64) as usize;
        disk.read_at(&mut buf[..n], pos).unwrap();
        stdin.write_all(&buf[..n]).unwrap();
        pos += n as u64;
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// Both disks return the same bytes.
fn assert_same_content(a: &dyn VirtualDisk, b: &dyn VirtualDisk, what: &str) {
    assert_eq!(a.size(), b.size(), "{what}");
    let (mut x, mut y) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut pos = 0;
    while pos < a.size() {
        let n = (a.size() - pos).min(x.len() as u64) as usize;
        a.read_at(&mut x[..n], pos).unwrap();
        b.read_at(&mut y[..n], pos).unwrap();
        assert!(
            x[..n] == y[..n],
            "{what}: differs in [{pos}, {})",
            pos + n as u64
        );
        pos += n as u64;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A disk our reader says holds no data: the allocation map has no Data extent, and
/// reads at its start, block edges and end return zeros.
fn assert_reads_as_zeros(disk: &dyn VirtualDisk, name: &str) {
    let size = disk.size();
    let extents = disk.allocation(0, size).unwrap();
    assert!(
        extents.iter().all(|e| e.state == Allocation::Zero),
        "{name}: {extents:?}"
    );
    assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), size, "{name}");
    let mut buf = vec![0xA5u8; 3 << 20];
    for at in [0, (2 << 20) - 1000, size / 2, size - buf.len() as u64] {
        disk.read_at(&mut buf, at).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "{name}: data at {at}");
        buf.fill(0xA5);
    }
}

#[test]
fn vhd_images_read_to_their_expected_digests() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for name in common::corpus_images(&corpus, ".vhd") {
        if REFUSED.iter().any(|(refused, _)| *refused == name) {
            continue;
        }
        let path = common::decompress_corpus_image(&corpus, &name, dir.path());
        let disk = open(&path, VhdSizeRule::Auto);
        assert_eq!(
            disk.size(),
            qemu_size(&path, VhdSizeRule::Auto),
            "{name}: size"
        );
        let expected = common::expected_sha256(&corpus, &format!("{name}.raw"));
        if disk.size() <= FULL_READ_LIMIT {
            assert_eq!(sha256_by_reading(disk.as_ref()), expected, "{name}");
        } else {
            assert_reads_as_zeros(disk.as_ref(), &name);
        }
        checked += 1;
        std::fs::remove_file(&path).unwrap();
    }
    assert!(
        checked >= 4,
        "only {checked} readable VHD images in the corpus"
    );
}

#[test]
fn forced_size_rules_give_qemus_sizes() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (name, rule, key) in [
        (
            "qemu-iotests__hyperv2012r2-dynamic__hyperv-win6.3.vhd",
            VhdSizeRule::Chs,
            "chs",
        ),
        (
            "qemu-iotests__virtualpc-dynamic__virtualpc.vhd",
            VhdSizeRule::CurrentSize,
            "current_size",
        ),
        // Maximal geometry: Current Size wins even when geometry is forced.
        (
            "qemu-iotests__d2v-zerofilled__disk2vhd.vhd",
            VhdSizeRule::Chs,
            "chs",
        ),
    ] {
        let path = common::decompress_corpus_image(&corpus, name, dir.path());
        let disk = open(&path, rule);
        assert_eq!(disk.size(), qemu_size(&path, rule), "{name} {key}");
        let auto = open(&path, VhdSizeRule::Auto);
        if disk.size() <= FULL_READ_LIMIT {
            assert_same_content(disk.as_ref(), auto.as_ref(), &format!("{name} {key}"));
        } else {
            // The digest itself is checked by the full-hash test below.
            common::expected_sha256(&corpus, &format!("{name}.force_size_calc={key}.raw"));
            assert_reads_as_zeros(disk.as_ref(), name);
        }
    }
}

#[test]
fn damaged_and_differencing_images_are_refused() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (name, message) in REFUSED {
        let path = common::decompress_corpus_image(&corpus, name, dir.path());
        for read_only in [true, false] {
            let options = OpenOptions {
                read_only,
                ..Default::default()
            };
            let err = match vdisk_mount::open(&path, &options) {
                Ok(_) => panic!("{name} opened"),
                Err(err) => err,
            };
            let text = err.to_string();
            let expected_start = format!("{}: {message}", path.display());
            assert!(text.starts_with(&expected_start), "{name}: {text}");
            assert!(!text.contains('\n'), "{text}");
            match err.kind() {
                ErrorKind::Io { .. } => {
                    // The locators' Windows paths map to the name beside the child.
                    let tried = path.with_file_name("fat-parent.vhd");
                    assert_eq!(
                        text,
                        format!(
                            "{}: parent not found; tried {}: No such file or directory \
                             (os error 2)",
                            path.display(),
                            tried.display()
                        )
                    );
                    assert_eq!(err.errno(), libc::ENOENT);
                }
                _ => assert_eq!(
                    err.corruption_kind(),
                    Some(vdisk_mount::CorruptionKind::BadChecksum),
                    "{text}"
                ),
            }
        }
    }
}

/// Hashes the two 127 GiB all-zero samples under every size rule. Their data is all
/// zeros by the allocation map (checked here and in the fast tests), so the digest of
/// each size is computed once by feeding zeros, in one pass that finishes the smaller
/// size on the way to the larger. That still hashes 127 GiB: about two minutes in a
/// release build, which is how the test suite runs.
#[test]
fn huge_sparse_images_hash_to_their_expected_digests() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    const HYPER_V: &str = "qemu-iotests__hyperv2012r2-dynamic__hyperv-win6.3.vhd";
    const VIRTUAL_PC: &str = "qemu-iotests__virtualpc-dynamic__virtualpc.vhd";
    let mut wanted: Vec<(u64, String, String)> = Vec::new();
    for (name, rule, view) in [
        (HYPER_V, VhdSizeRule::Auto, ""),
        (HYPER_V, VhdSizeRule::Chs, ".force_size_calc=chs"),
        (VIRTUAL_PC, VhdSizeRule::Auto, ""),
        (
            VIRTUAL_PC,
            VhdSizeRule::CurrentSize,
            ".force_size_calc=current_size",
        ),
    ] {
        let path = dir.path().join(name);
        if !path.exists() {
            common::decompress_corpus_image(&corpus, name, dir.path());
        }
        let key = format!("{name}{view}.raw");
        let disk = open(&path, rule);
        assert_reads_as_zeros(disk.as_ref(), &key);
        wanted.push((
            disk.size(),
            key.clone(),
            common::expected_sha256(&corpus, &key),
        ));
    }
    wanted.sort();
    let zeros = vec![0u8; 8 << 20];
    let mut hasher = Sha256::new();
    let mut hashed = 0u64;
    for (size, key, expected) in &wanted {
        while hashed < *size {
            let n = (*size - hashed).min(zeros.len() as u64) as usize;
            hasher.update(&zeros[..n]);
            hashed += n as u64;
        }
        assert_eq!(&hex(&hasher.clone().finalize()), expected, "{key}");
    }
}

/// The Windows-made differencing sample over a stand-in for its lost parent: an empty VHD
/// of its size carrying the identity the child expects. What the child holds then reads
/// the same here as in libvhdi, sector bitmaps set bit by bit as Windows writes them.
#[test]
fn windows_differencing_sample_reads_over_a_stand_in_parent() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let child = common::decompress_corpus_image(
        &corpus,
        "dfvfs-fat-chain/fat-differential.vhd",
        dir.path(),
    );
    let image = std::fs::read(&child).unwrap();
    let parent_id = &image[512 + 40..512 + 56];
    let parent = child.with_file_name("fat-parent.vhd");
    vdisk_mount::vhd::create_vhd(
        &parent,
        &vdisk_mount::vhd::VhdCreateOptions::new(4 << 20, vdisk_mount::vhd::VhdKind::Dynamic),
    )
    .unwrap();
    let mut stand_in = std::fs::read(&parent).unwrap();
    let footer_copies = [0, stand_in.len() - 512];
    for at in footer_copies {
        let footer = &mut stand_in[at..at + 512];
        footer[68..84].copy_from_slice(parent_id);
        footer[64..68].fill(0);
        let sum = footer
            .iter()
            .fold(0u32, |s, &b| s.wrapping_add(u32::from(b)));
        footer[64..68].copy_from_slice(&(!sum).to_be_bytes());
    }
    std::fs::write(&parent, stand_in).unwrap();

    let disk = open(&child, VhdSizeRule::Auto);
    assert_eq!(disk.size(), 4 << 20);
    let mut ours = vec![0u8; disk.size() as usize];
    disk.read_at(&mut ours, 0).unwrap();
    let theirs = common::vhdimount_read(&child);
    assert!(ours == theirs, "the sample reads differently in libvhdi");
    // The child holds a FAT (media byte 0xF8 at sector 134) and directory entries.
    assert_eq!(&ours[134 * 512..134 * 512 + 4], &[0xF8, 0xFF, 0xFF, 0xFF]);
    assert!(ours.iter().filter(|&&b| b != 0).count() > 100);
    let allocated: u64 = disk
        .allocation(0, disk.size())
        .unwrap()
        .iter()
        .filter(|e| e.state == Allocation::Data)
        .map(|e| e.len)
        .sum();
    // Bitmap bytes 0x02, 0x01, 0xFF, 0xCB, 0xA8: 18 sectors in the child.
    assert_eq!(allocated, 18 * 512);
}

//! `vdisk convert`, checked by qemu and libvhdi: every source kind into every output
//! kind, sparse stays sparse, a dirty VHDX is read without being changed, and a killed
//! conversion never leaves a half-made image under the destination's name.

use crate::common;
use crate::common::vdisk::{VDISK, vdisk_fails, vdisk_ok};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 48 * MIB;

/// Data in a few places of the disk: the first block, across a block boundary, the
/// middle, the last bytes; the rest zeros.
fn fill(image: &Path) {
    let disk = common::chain::open(image, false);
    let size = disk.size();
    for (i, at) in [0, 2 * MIB - 4096, size / 2 + 512, size - 8192]
        .into_iter()
        .enumerate()
    {
        disk.write_at(&common::mount::pattern(i as u64 + 1, 8192), at)
            .unwrap();
    }
    disk.close().unwrap();
}

/// A source of each kind, named `<kind>.<ext>`, filled; the last two are a 4 KiB-sector
/// VHDX and a three-image VHDX chain, which qemu cannot read.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let size = SIZE.to_string();
    let mut made = Vec::new();
    for (name, args) in [
        ("vhd-dynamic.vhd", vec!["--size", &size]),
        ("vhd-fixed.vhd", vec!["--size", &size, "--type", "fixed"]),
        (
            "vhdx-dynamic.vhdx",
            vec!["--size", &size, "--block-size", "1M"],
        ),
        ("vhdx-fixed.vhdx", vec!["--size", &size, "--type", "fixed"]),
        (
            "vhdx-4k.vhdx",
            vec!["--size", &size, "--logical-sector", "4096"],
        ),
    ] {
        let path = dir.join(name);
        let mut all = vec!["create"];
        all.extend(args);
        all.push(path.to_str().unwrap());
        vdisk_ok(&all);
        fill(&path);
        made.push(path);
    }
    let raw = dir.join("raw.img");
    std::fs::File::create(&raw).unwrap().set_len(SIZE).unwrap();
    let disk = vdisk_mount::open(
        &raw,
        &vdisk_mount::OpenOptions {
            format: Some(vdisk_mount::Format::Raw),
            ..Default::default()
        },
    )
    .unwrap();
    disk.write_at(&common::mount::pattern(9, 4096), MIB)
        .unwrap();
    drop(disk);
    made.push(raw);
    // base <- middle <- top, each writing over part of the one below.
    let mut below = dir.join("chain-base.vhdx");
    vdisk_ok(&["create", "--size", &size, below.to_str().unwrap()]);
    fill(&below);
    for (i, name) in ["chain-middle.vhdx", "chain-top.vhdx"]
        .into_iter()
        .enumerate()
    {
        let child = dir.join(name);
        vdisk_ok(&[
            "create",
            "--parent",
            below.to_str().unwrap(),
            child.to_str().unwrap(),
        ]);
        let disk = common::chain::open(&child, false);
        disk.write_at(
            &common::mount::pattern(20 + i as u64, 4096),
            4096 * (i as u64 + 1),
        )
        .unwrap();
        disk.discard(SIZE / 2, MIB).unwrap();
        disk.close().unwrap();
        below = child;
    }
    made.push(below);
    made
}

/// sha256 of what qemu reads from `image` (as `format`).
fn qemu_sha(format: &str, image: &Path, dir: &Path) -> String {
    let raw = dir.join("qemu-view.raw");
    common::qemu_convert_to_raw(format, image, &raw);
    let sha = common::sha256_file(&raw);
    std::fs::remove_file(raw).unwrap();
    sha
}

fn disk_sha(image: &Path) -> String {
    common::sha256_disk(common::chain::open(image, true).as_ref())
}

#[test]
fn every_source_kind_converts_to_every_output_kind() {
    let dir = tempfile::tempdir().unwrap();
    let sources = sources(dir.path());
    let outputs: [(&str, &[&str], &str); 5] = [
        ("vhd", &[], "vpc"),
        ("vhd", &["--type", "fixed"], "vpc"),
        ("vhdx", &[], "vhdx"),
        ("vhdx", &["--type", "fixed", "--block-size", "1M"], "vhdx"),
        ("img", &[], "raw"),
    ];
    for source in &sources {
        let expected = match source.extension().and_then(|e| e.to_str()) {
            Some("img") => common::sha256_file(source),
            _ => disk_sha(source),
        };
        let source_file = common::sha256_file(source);
        for (i, (ext, args, qemu_format)) in outputs.iter().enumerate() {
            let out = dir.path().join(format!("out-{i}.{ext}"));
            let mut all = vec!["convert"];
            all.extend(*args);
            all.extend([source.to_str().unwrap(), out.to_str().unwrap()]);
            vdisk_ok(&all);
            let what = format!("{} -> {}", source.display(), out.display());
            // qemu refuses VHDX with 4 KiB logical sectors (which the output of a
            // 4 KiB-sector source keeps); libvhdi reads them.
            let four_k = *ext == "vhdx"
                && common::vdisk::info_json(&out)["logical_sector_size"].as_u64() == Some(4096);
            if four_k {
                let raw = common::vhdimount_read(&out);
                assert_eq!(common::sha256_bytes(&raw), expected, "{what}: vhdimount");
            } else {
                assert_eq!(
                    qemu_sha(qemu_format, &out, dir.path()),
                    expected,
                    "{what}: qemu"
                );
                common::qemu_check_clean(qemu_format, &out);
            }
            let ours = match *ext {
                "img" => common::sha256_file(&out),
                _ => disk_sha(&out),
            };
            assert_eq!(ours, expected, "{what}: vdisk");
            if *ext == "vhd" {
                let raw = common::vhdimount_read(&out);
                assert_eq!(common::sha256_bytes(&raw), expected, "{what}: vhdimount");
            }
            std::fs::remove_file(&out).unwrap();
        }
        assert_eq!(
            common::sha256_file(source),
            source_file,
            "{}: changed",
            source.display()
        );
    }
}

#[test]
fn a_sparse_source_gives_a_sparse_dynamic_image() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("big.vhdx");
    vdisk_ok(&[
        "create",
        "--size",
        "4G",
        "--block-size",
        "1M",
        source.to_str().unwrap(),
    ]);
    fill(&source);
    for (ext, block) in [("vhdx", "1M"), ("vhd", "512K")] {
        let out = dir.path().join(format!("small.{ext}"));
        let report: serde_json::Value = serde_json::from_str(&vdisk_ok(&[
            "convert",
            "--json",
            "--block-size",
            block,
            source.to_str().unwrap(),
            out.to_str().unwrap(),
        ]))
        .unwrap();
        // The four 8 KiB pieces touch nine 4 KiB pages (one starts 512 bytes in).
        assert_eq!(report["bytes_written"].as_u64(), Some(9 * 4096), "{report}");
        let held = std::fs::metadata(&out).unwrap().blocks() * 512;
        assert!(
            held < 16 * MIB,
            "{ext}: {held} bytes on disk for 32 KiB of data"
        );
        assert_eq!(disk_sha(&out), disk_sha(&source), "{ext}");
    }
}

#[test]
fn a_dirty_vhdx_is_converted_through_its_log_and_left_as_it_was() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for name in common::corpus_images(&corpus, "dirtylog.vhdx") {
        let path = common::decompress_corpus_image(&corpus, &name, dir.path());
        let before = common::sha256_file(&path);
        let out = dir.path().join("flat.vhdx");
        vdisk_ok(&["convert", path.to_str().unwrap(), out.to_str().unwrap()]);
        assert_eq!(
            common::sha256_file(&path),
            before,
            "{name}: the source changed"
        );
        let expected = common::expected_sha256(&corpus, &format!("{name}.raw"));
        assert_eq!(disk_sha(&out), expected, "{name}");
        common::qemu_check_clean("vhdx", &out);
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn convert_never_replaces_a_file_and_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("s.vhdx");
    vdisk_ok(&["create", "--size", "8M", source.to_str().unwrap()]);
    let taken = dir.path().join("taken.vhd");
    std::fs::write(&taken, b"keep me").unwrap();
    let refused = vdisk_fails(&["convert", source.to_str().unwrap(), taken.to_str().unwrap()]);
    assert!(refused.contains("already exists"), "{refused}");
    assert_eq!(std::fs::read(&taken).unwrap(), b"keep me");
    let missing = vdisk_fails(&["convert", "/nonexistent.vhdx", taken.to_str().unwrap()]);
    assert!(missing.contains("/nonexistent.vhdx"), "{missing}");
}

/// Killed at random instants, a conversion leaves either no destination or a complete
/// one, never part of an image under its name.
#[test]
fn a_killed_conversion_leaves_no_half_made_image() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("s.vhdx");
    vdisk_ok(&[
        "create",
        "--size",
        "256M",
        "--block-size",
        "1M",
        source.to_str().unwrap(),
    ]);
    {
        let disk = common::chain::open(&source, false);
        let data = common::mount::pattern(5, 4 * MIB as usize);
        for at in (0..256 * MIB).step_by(8 * MIB as usize) {
            disk.write_at(&data, at).unwrap();
        }
        disk.close().unwrap();
    }
    let expected = disk_sha(&source);
    let out = dir.path().join("out.vhd");
    let started = Instant::now();
    vdisk_ok(&["convert", source.to_str().unwrap(), out.to_str().unwrap()]);
    let whole = started.elapsed();
    let mut rng = StdRng::seed_from_u64(23);
    let (mut killed, mut attempts) = (0, 0);
    while killed < 20 {
        attempts += 1;
        assert!(
            attempts <= 200,
            "only {killed} of {attempts} runs were killed in time"
        );
        let _ = std::fs::remove_file(&out);
        let mut child = Command::new(VDISK)
            .arg("convert")
            .arg(&source)
            .arg(&out)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(whole.mul_f64(rng.random_range(0.0..1.0)));
        let _ = child.kill();
        if child.wait().unwrap().code().is_none() {
            killed += 1;
        }
        if out.exists() {
            assert_eq!(
                disk_sha(&out),
                expected,
                "kill {attempts}: a complete image"
            );
        }
    }
}

//! `vdisk resize`, run as a user would: grown images take writes past their old end
//! through a mount, qemu and libvhdi read what they should, shrinking refuses to cut off
//! data unless forced, the corpus grows, and a resize killed at random instants leaves
//! the disk as it was before or after.

use crate::common;
use crate::common::mount::{self, Mount};
use crate::common::vdisk::{kill_at_random, vdisk_fails, vdisk_ok};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

fn qemu_format(image: &Path) -> &'static str {
    match image.extension().and_then(|e| e.to_str()) {
        Some("vhdx") => "vhdx",
        _ => "vpc",
    }
}

fn resize_json(image: &Path, size: &str, extra: &[&str]) -> Value {
    let mut args = vec!["resize", "--json"];
    args.extend(extra);
    args.extend([image.to_str().unwrap(), size]);
    serde_json::from_str(&vdisk_ok(&args)).unwrap()
}

fn create(image: &Path, size: &str, block: &str) {
    vdisk_ok(&[
        "create",
        "--size",
        size,
        "--block-size",
        block,
        image.to_str().unwrap(),
    ]);
}

/// Whether qemu reads `image` as the raw file `expected`.
fn qemu_reads(image: &Path, expected: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", qemu_format(image), "-F", "raw"])
        .arg(image)
        .arg(expected)
        .status()
        .unwrap()
        .success()
}

/// Writes `data` at `offset` of the file `path` (a raw reference or a mounted disk).
fn write_at(path: &Path, data: &[u8], offset: u64) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(data, offset).unwrap();
    file.sync_all().unwrap();
}

/// A 64 MiB image with data at its start and end grows to 192 MiB; data written through
/// a mount past the old end and at the new end lands where qemu and libvhdi read it.
fn grow_and_write_through_a_mount(image: &Path, block: &str) {
    if !mount::fuse_available() {
        return;
    }
    let format = qemu_format(image);
    let dir = image.parent().unwrap();
    create(image, "64M", block);
    common::qemu_io(
        format,
        image,
        &["write -P 0x5a 0 1M", "write -P 0x33 63M 1M"],
    );
    let expected = dir.join("expected.raw");
    common::qemu_convert_to_raw(format, image, &expected);

    let report = resize_json(image, "192M", &[]);
    assert_eq!(report["size_before"].as_u64(), Some(64 * MIB), "{report}");
    assert_eq!(report["size_after"].as_u64(), Some(192 * MIB), "{report}");
    common::qemu_check_clean(format, image);
    assert_eq!(
        common::qemu_virtual_size(&format!(
            "driver={format},file.filename={}",
            image.display()
        )),
        192 * MIB
    );

    std::fs::File::options()
        .write(true)
        .open(&expected)
        .unwrap()
        .set_len(192 * MIB)
        .unwrap();
    let past = mount::pattern(1, MIB as usize);
    let end = mount::pattern(2, MIB as usize);
    let vdisk = Mount::new(image, &[]);
    for path in [vdisk.disk(), expected.clone()] {
        write_at(&path, &past, 64 * MIB);
        write_at(&path, &end, 191 * MIB);
    }
    vdisk.unmount();

    common::qemu_check_clean(format, image);
    assert!(
        qemu_reads(image, &expected),
        "{format}: qemu reads otherwise"
    );
    let raw = std::fs::read(&expected).unwrap();
    let libvhdi = common::vhdimount_read(image);
    assert!(libvhdi == raw, "{format}: vhdimount reads otherwise");
}

#[test]
fn a_grown_vhdx_takes_writes_past_its_old_end_through_a_mount() {
    let dir = tempfile::tempdir().unwrap();
    grow_and_write_through_a_mount(&dir.path().join("g.vhdx"), "1M");
}

#[test]
fn a_grown_vhd_takes_writes_past_its_old_end_through_a_mount() {
    let dir = tempfile::tempdir().unwrap();
    // 128 entries fill the BAT's sector; 384 move the first blocks out of its way.
    grow_and_write_through_a_mount(&dir.path().join("g.vhd"), "512K");
}

/// A VHDX whose BAT region must grow (more than 1 MiB of entries) keeps it readable by
/// qemu and libvhdi at both ends.
#[test]
fn a_vhdx_grown_past_its_bat_region_reads_the_same_in_qemu_and_libvhdi() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.vhdx");
    create(&image, "64M", "1M");
    common::qemu_io("vhdx", &image, &["write -P 0x5a 0 1M"]);
    resize_json(&image, "130G", &[]);
    common::qemu_check_clean("vhdx", &image);
    let end = 130 * 1024 * MIB - MIB;
    common::qemu_io(
        "vhdx",
        &image,
        &[
            "read -P 0x5a 0 1M",
            "read -P 0 64M 1M",
            &format!("write -P 0x77 {end} 1M"),
        ],
    );
    common::qemu_check_clean("vhdx", &image);
    let pieces = common::vhdimount_with(&image, |disk| {
        let file = std::fs::File::open(disk)?;
        let mut pieces = vec![vec![0u8; MIB as usize]; 3];
        for (piece, at) in pieces.iter_mut().zip([0, 64 * MIB, end]) {
            file.read_exact_at(piece, at)?;
        }
        Ok((file.metadata()?.len(), pieces))
    })
    .unwrap();
    assert_eq!(pieces.0, end + MIB);
    for (piece, byte) in pieces.1.iter().zip([0x5a, 0, 0x77]) {
        assert!(
            piece.iter().all(|&b| b == byte),
            "vhdimount reads otherwise"
        );
    }
}

#[test]
fn shrinking_needs_asking_and_cuts_off_data_only_when_forced() {
    for name in ["s.vhdx", "s.vhd"] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join(name);
        let format = qemu_format(&image);
        create(&image, "64M", "1M");
        common::qemu_io(
            format,
            &image,
            &["write -P 0x5a 0 1M", "write -P 0x33 40M 1M"],
        );
        let before = common::sha256_file(&image);
        let path = image.to_str().unwrap();
        let refused = vdisk_fails(&["resize", path, "32M"]);
        assert!(refused.contains("--shrink"), "{refused}");
        let refused = vdisk_fails(&["resize", "--shrink", path, "32M"]);
        assert!(
            refused.contains(&format!("data at offset {}", 40 * MIB))
                && refused.contains("--force"),
            "{refused}"
        );
        assert_eq!(
            common::sha256_file(&image),
            before,
            "{format}: a refusal wrote"
        );

        // Past the data: nothing to lose.
        let report = resize_json(&image, "48M", &["--shrink"]);
        assert_eq!(report["data_discarded"].as_u64(), Some(0), "{report}");
        common::qemu_io(format, &image, &["read -P 0x33 40M 1M", "read -P 0 41M 7M"]);
        let report = resize_json(&image, "32M", &["--shrink", "--force"]);
        assert!(
            report["data_discarded"].as_u64().unwrap() >= MIB,
            "{report}"
        );
        assert!(
            report["length_after"].as_u64() < report["length_before"].as_u64(),
            "{report}"
        );
        common::qemu_check_clean(format, &image);
        common::qemu_io(format, &image, &["read -P 0x5a 0 1M", "read -P 0 1M 31M"]);
        // What was cut off does not come back.
        resize_json(&image, "64M", &[]);
        common::qemu_io(format, &image, &["read -P 0 32M 32M"]);
    }
}

#[test]
fn a_mounted_image_is_not_resized() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("m.vhdx");
    create(&image, "64M", "1M");
    let before = common::sha256_file(&image);
    let vdisk = Mount::new(&image, &["ro"]);
    let refused = vdisk_fails(&["resize", image.to_str().unwrap(), "128M"]);
    assert!(
        refused.contains("in use") && refused.contains(&vdisk.daemon_pid().to_string()),
        "{refused}"
    );
    vdisk.unmount();
    assert_eq!(common::sha256_file(&image), before);
}

/// The sha256 of the disk of `image` (and its parents), read through the library, with
/// its size.
fn disk_state(image: &Path) -> (u64, String) {
    let disk = common::chain::open(image, true);
    (disk.size(), common::sha256_disk(disk.as_ref()))
}

/// Writes random data into a third of the blocks of `image`, the first ones included
/// (so a growing VHD BAT must move them), through the library.
fn scatter(image: &Path, block: u64) {
    let disk = common::chain::open(image, false);
    let mut rng = StdRng::seed_from_u64(block);
    let mut data = vec![0u8; block as usize];
    for b in (0..disk.size() / block).step_by(3) {
        rng.fill(&mut data[..]);
        disk.write_at(&data, b * block).unwrap();
    }
    disk.close().unwrap();
}

/// `vdisk resize IMAGE SIZE EXTRA..` killed at random instants: every image left behind
/// opens as the disk before or after, and a second resize finishes it to an image qemu
/// checks clean and reads as the finished one.
fn kill_torture(image: &Path, block: u64, size: &str, extra: &[&str]) {
    let format = qemu_format(image);
    let dir = image.parent().unwrap();
    scatter(image, block);
    let before = disk_state(image);
    let work = dir.join(format!(
        "work.{}",
        image.extension().unwrap().to_str().unwrap()
    ));
    let finished = dir.join(format!(
        "done.{}",
        image.extension().unwrap().to_str().unwrap()
    ));
    common::copy_sparse(image, &finished);
    let args_for = |target: &Path| -> Vec<String> {
        let mut args = vec!["resize".to_string()];
        args.extend(extra.iter().map(|a| a.to_string()));
        args.extend([target.to_str().unwrap().to_string(), size.to_string()]);
        args
    };
    let finish = args_for(&finished);
    vdisk_ok(&finish.iter().map(String::as_str).collect::<Vec<_>>());
    let after = disk_state(&finished);
    assert_ne!(before.0, after.0);
    let reference = dir.join("after.raw");
    common::qemu_convert_to_raw(format, &finished, &reference);

    let args = args_for(&work);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut prepare = || {
        let _ = std::fs::remove_file(&work);
        common::copy_sparse(image, &work);
    };
    let mut check = |attempt: usize, _killed: bool| {
        let what = format!("{format}: kill {attempt}");
        let found = disk_state(&work);
        assert!(
            found == before || found == after,
            "{what}: the disk reads neither as before nor as after (size {})",
            found.0
        );
        // Every third one is finished and checked by qemu too.
        if attempt.is_multiple_of(3) {
            vdisk_ok(&args);
            common::qemu_check_clean(format, &work);
            assert!(
                qemu_reads(&work, &reference),
                "{what}: qemu reads otherwise"
            );
        }
    };
    kill_at_random(format, &args, 24, 17, &mut prepare, &mut check);
}

fn torture_image(name: &str, block: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(name);
    create(&image, "192M", block);
    (dir, image)
}

#[test]
fn a_vhd_growing_killed_at_random_instants_reads_as_before_or_after() {
    let (_dir, image) = torture_image("k.vhd", "512K");
    kill_torture(&image, 512 << 10, "320M", &[]);
}

#[test]
fn a_vhd_shrinking_killed_at_random_instants_reads_as_before_or_after() {
    let (_dir, image) = torture_image("k.vhd", "512K");
    kill_torture(&image, 512 << 10, "100M", &["--shrink", "--force"]);
}

#[test]
fn a_vhdx_growing_killed_at_random_instants_reads_as_before_or_after() {
    let (_dir, image) = torture_image("k.vhdx", "1M");
    kill_torture(&image, MIB, "320M", &[]);
}

#[test]
fn a_vhdx_shrinking_killed_at_random_instants_reads_as_before_or_after() {
    let (_dir, image) = torture_image("k.vhdx", "1M");
    kill_torture(&image, MIB, "100M", &["--shrink", "--force"]);
}

/// Every corpus image the library opens read-write grows (a VHDX made by Windows past
/// what its BAT region holds, so blocks move out of its way): qemu checks it clean and
/// reads the old disk followed by zeros, and the data reads as before.
#[test]
fn corpus_images_grow_and_read_the_same() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let mut grown = 0;
    for suffix in [".vhd", ".vhdx"] {
        for name in common::corpus_images(&corpus, suffix) {
            let dir = tempfile::tempdir().unwrap();
            let path = common::decompress_corpus_image(&corpus, &name, dir.path());
            if vdisk_mount::open(&path, &vdisk_mount::OpenOptions::default()).is_err() {
                // Damaged on purpose, or a parent missing: the readers' tests cover them.
                continue;
            }
            let original = dir.path().join(format!("original{suffix}"));
            common::copy_sparse(&path, &original);
            let size = common::chain::open(&path, true).size();
            let block_size = common::vdisk::info_json(&path)["block_size"]
                .as_u64()
                .unwrap_or(MIB);
            // Windows' 32 MiB blocks: 5 TiB needs more than the 1 MiB of BAT they have.
            let target = match suffix {
                ".vhdx" if block_size >= 32 * MIB => 5u64 << 40,
                _ => size * 2 + 3 * 512,
            };
            let report = resize_json(&path, &target.to_string(), &["--force"]);
            let after = report["size_after"].as_u64().unwrap();
            assert!(after >= target, "{name}: {report}");
            let format = qemu_format(&path);
            common::qemu_check_clean(format, &path);
            if target > 1 << 40 {
                // qemu's VHDX driver reports no allocation status, so a comparison would
                // read the whole 5 TiB: qemu reads zeros just past the old end and at the
                // new one, then the disk shrinks back to be compared whole.
                let probes = [size, after - MIB];
                for at in probes {
                    let read = Command::new("qemu-io")
                        .args(["-f", format, "-r", "-c"])
                        .arg(format!("read -P 0 {at} 512"))
                        .arg(&path)
                        .output()
                        .unwrap();
                    let said = String::from_utf8_lossy(&read.stdout);
                    assert!(
                        read.status.success() && !said.contains("Pattern verification failed"),
                        "{name}: qemu reads other than zeros at {at}: {said}"
                    );
                }
                resize_json(&path, &size.to_string(), &["--shrink"]);
                common::qemu_check_clean(format, &path);
            }
            // Different sizes: qemu compares the common part and wants zeros past it.
            let compared = Command::new("qemu-img")
                .args(["compare", "-q", "-f", format, "-F", format])
                .arg(&path)
                .arg(&original)
                .status()
                .unwrap();
            assert!(compared.success(), "{name}: qemu reads otherwise: {report}");
            grown += 1;
        }
    }
    assert!(grown >= 10, "only {grown} corpus images grown");
}

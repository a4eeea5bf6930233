//! `vdisk check`, run as a user would: the corpus checks clean, damage is named with the
//! right exit status, qemu-img check agrees on VHDX, every repair leaves an image that
//! checks clean and reads (in qemu) what it read before the damage, and an image in use
//! is refused.

use crate::common;
use crate::common::mount::{self, Mount};
use crate::common::vdisk::{check, kill_at_random, vdisk_fails, vdisk_ok};
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

/// Corpus images whose maker left space no structure uses: qemu's dirty-log test image
/// was made by killing qemu while it wrote, and blocks it wrote never reached the BAT.
const LEAKY: &[&str] = &["qemu-iotests__iotest-dirtylog-10G-4M__qemu1.6-dirtylog.vhdx"];

fn qemu_format(image: &Path) -> &'static str {
    match image.extension().and_then(|e| e.to_str()) {
        Some("vhdx") => "vhdx",
        _ => "vpc",
    }
}

/// The findings of a report, as `severity: structure: problem` lines.
fn findings(report: &Value) -> Vec<String> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{}: {}: {}",
                f["severity"].as_str().unwrap(),
                f["structure"].as_str().unwrap(),
                f["problem"].as_str().unwrap()
            )
        })
        .collect()
}

fn with_severity(report: &Value, severity: &str) -> usize {
    findings(report)
        .iter()
        .filter(|f| f.starts_with(&format!("{severity}:")))
        .count()
}

#[test]
fn every_corpus_image_checks_clean_and_damaged_ones_are_named() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let mut checked = 0;
    for suffix in [".vhd", ".vhdx"] {
        for name in common::corpus_images(&corpus, suffix) {
            let dir = tempfile::tempdir().unwrap();
            let path = common::decompress_corpus_image(&corpus, &name, dir.path());
            let before = common::sha256_file(&path);
            let options = vdisk_mount::OpenOptions {
                read_only: true,
                ..Default::default()
            };
            let opens = vdisk_mount::open(&path, &options).is_ok();
            let (code, report) = check(&path, &[]);
            assert_eq!(common::sha256_file(&path), before, "{name}: check wrote");
            let found = findings(&report);
            if !opens {
                // Damaged on purpose (checksums), or with its parent missing.
                assert_eq!(code, 2, "{name}: {found:?}");
                assert!(
                    found.iter().any(|f| f.starts_with("corruption: VHD footer")
                        || f.starts_with("corruption: parent link: parent not found")),
                    "{name}: {found:?}"
                );
            } else if LEAKY.contains(&name.as_str()) {
                assert_eq!(code, 3, "{name}: {found:?}");
                assert_eq!(with_severity(&report, "corruption"), 0, "{name}: {found:?}");
                let (code, report) = check(&path, &["--repair"]);
                assert_eq!(code, 0, "{name}: {:?}", findings(&report));
                let raw = dir.path().join("repaired.raw");
                common::qemu_convert_to_raw(qemu_format(&path), &path, &raw);
                assert_eq!(
                    common::sha256_file(&raw),
                    common::expected_sha256(&corpus, &format!("{name}.raw")),
                    "{name}: repaired contents"
                );
            } else {
                assert_eq!(code, 0, "{name}: {found:?}");
                // A dirty log is said, and nothing else.
                assert!(
                    found.iter().all(|f| f.starts_with("info: log: holds ")),
                    "{name}: {found:?}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} corpus images checked");
}

/// `vdisk create`d images of both formats holding qemu-io patterns, and their contents
/// as qemu reads them, saved raw beside each.
fn patterned(dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    [("p.vhd", "512K"), ("p.vhdx", "1M")]
        .into_iter()
        .map(|(name, block)| {
            let image = dir.join(name);
            vdisk_ok(&[
                "create",
                "--size",
                "48M",
                "--block-size",
                block,
                image.to_str().unwrap(),
            ]);
            common::qemu_io(
                qemu_format(&image),
                &image,
                &[
                    "write -P 0x11 0 64k",
                    "write -P 0x22 1000k 100k",
                    "write -P 0x33 20m 1m",
                    "write -P 0x44 47m 1m",
                ],
            );
            let raw = image.with_extension("raw");
            common::qemu_convert_to_raw(qemu_format(&image), &image, &raw);
            (image, raw)
        })
        .collect()
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, at).unwrap();
}

fn read(path: &Path, at: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, at)
        .unwrap();
    buf
}

fn len_of(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Repairs `image` at `level` and checks the result: the repair ends clean, a second
/// check finds nothing, qemu-img check agrees and qemu reads `raw`.
fn repaired_reads(image: &Path, raw: &Path, level: &str, what: &str) {
    let (code, report) = check(image, &[level]);
    assert_eq!(code, 0, "{what}: {report}");
    assert!(!report["repaired"].as_array().unwrap().is_empty(), "{what}");
    let (code, again) = check(image, &[]);
    assert_eq!((code, findings(&again)), (0, vec![]), "{what}");
    qemu_reads(image, raw, what);
}

/// qemu-img check finds `image` clean and qemu reads `raw` from it.
fn qemu_reads(image: &Path, raw: &Path, what: &str) {
    let format = qemu_format(image);
    common::qemu_check_clean(format, image);
    let compared = Command::new("qemu-img")
        .args(["compare", "-f", format, "-F", "raw"])
        .arg(image)
        .arg(raw)
        .output()
        .unwrap();
    assert!(
        compared.status.success(),
        "{what}: qemu reads other contents: {}",
        String::from_utf8_lossy(&compared.stdout)
    );
}

/// One damage a repair undoes: the format it applies to (`vpc`, `vhdx`, or both when
/// `None`), how it is made, the exit status a check gives it and the structure it names
/// first.
struct Damage {
    what: &'static str,
    format: Option<&'static str>,
    make: fn(&Path),
    status: i32,
    structure: &'static str,
}

/// Appends `len` bytes of data no structure uses at the end of `image` (before a VHD's
/// footer).
fn junk_at_end(image: &Path, len: u64) {
    let end = len_of(image);
    if qemu_format(image) == "vpc" {
        let footer = read(image, end - 512, 512);
        patch(image, end - 512, &vec![0xAB; len as usize]);
        patch(image, end - 512 + len, &footer);
    } else {
        patch(image, end, &vec![0xAB; len as usize]);
    }
}

/// Where the VHDX `image`'s BAT region starts.
fn vhdx_bat(image: &Path) -> u64 {
    let table = read(image, 0x30000, 0x10000);
    let bat_guid = vdisk_mount::vhdx::region_table::BAT_REGION.to_bytes_le();
    (0..table[8] as usize)
        .map(|i| 16 + 32 * i)
        .find(|&at| table[at..at + 16] == bat_guid)
        .map(|at| u64::from_le_bytes(table[at + 16..at + 24].try_into().unwrap()))
        .unwrap()
}

const DAMAGES: [Damage; 7] = [
    Damage {
        what: "footer copy",
        format: Some("vpc"),
        make: |p| patch(p, 100, b"x"),
        status: 2,
        structure: "VHD footer copy",
    },
    Damage {
        what: "trailing footer",
        format: Some("vpc"),
        make: |p| patch(p, len_of(p) - 512 + 64, b"x"),
        status: 2,
        structure: "VHD footer",
    },
    Damage {
        what: "trailing footer cut off",
        format: Some("vpc"),
        make: |p| {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(len_of(p) - 512)
                .unwrap()
        },
        status: 2,
        structure: "VHD footer",
    },
    Damage {
        what: "header",
        format: Some("vhdx"),
        make: |p| patch(p, 0x10000 + 300, b"x"),
        status: 2,
        structure: "header 1",
    },
    Damage {
        what: "region table",
        format: Some("vhdx"),
        make: |p| patch(p, 0x40000 + 300, b"x"),
        status: 2,
        structure: "region table 2",
    },
    Damage {
        what: "data after the last block",
        format: None,
        make: |p| junk_at_end(p, 3 * MIB),
        status: 3,
        structure: "unused space",
    },
    Damage {
        what: "a block moved to the end, its old place left with its data",
        format: Some("vhdx"),
        make: |p| {
            let bat = vhdx_bat(p);
            let entry = u64::from_le_bytes(read(p, bat, 8).try_into().unwrap());
            let (at, to) = (entry & !(MIB - 1), len_of(p).next_multiple_of(MIB));
            patch(p, to, &read(p, at, MIB as usize));
            patch(p, bat, &(to | (entry & 7)).to_le_bytes());
        },
        status: 3,
        structure: "unused space",
    },
];

#[test]
fn each_repairable_damage_is_repaired_to_the_contents_before_it() {
    for damage in &DAMAGES {
        let dir = tempfile::tempdir().unwrap();
        for (image, raw) in patterned(dir.path()) {
            if damage.format.is_some_and(|f| f != qemu_format(&image)) {
                continue;
            }
            (damage.make)(&image);
            let what = format!("{} of {}", damage.what, image.display());
            let (status, report) = check(&image, &[]);
            assert_eq!(status, damage.status, "{what}: {report}");
            assert_eq!(
                report["findings"][0]["structure"], damage.structure,
                "{what}"
            );
            repaired_reads(&image, &raw, "--repair", &what);
        }
    }
}

#[test]
fn a_dirty_log_is_replayed_to_the_contents_readers_agree_on() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    for name in common::corpus_images(&corpus, "dirtylog.vhdx") {
        let dir = tempfile::tempdir().unwrap();
        let image = common::decompress_corpus_image(&corpus, &name, dir.path());
        let (status, report) = check(&image, &[]);
        assert!(
            findings(&report)
                .iter()
                .any(|f| f.starts_with("info: log: holds ")),
            "{name}: {report}"
        );
        assert_ne!(status, 2, "{name}: a log to replay is no corruption");
        let (status, report) = check(&image, &["--repair"]);
        assert_eq!((status, findings(&report)), (0, vec![]), "{name}");
        assert!(
            report["repaired"]
                .as_array()
                .unwrap()
                .contains(&Value::from("log replayed")),
            "{name}: {report}"
        );
        // qemu opens it read-only only now that the log is empty.
        common::qemu_check_clean("vhdx", &image);
        let raw = dir.path().join("replayed.raw");
        common::qemu_convert_to_raw("vhdx", &image, &raw);
        assert_eq!(
            common::sha256_file(&raw),
            common::expected_sha256(&corpus, &format!("{name}.raw")),
            "{name}"
        );
    }
}

/// Points BAT entry `index` of `image` at `target` (a file offset), keeping a VHDX entry's
/// state, and returns the entry's old value's block offset.
fn point_entry(image: &Path, index: u64, target: u64) -> u64 {
    if qemu_format(image) == "vpc" {
        let bat = u64::from_be_bytes(read(image, 512 + 16, 8).try_into().unwrap());
        let old = u32::from_be_bytes(read(image, bat + 4 * index, 4).try_into().unwrap());
        patch(
            image,
            bat + 4 * index,
            &((target / 512) as u32).to_be_bytes(),
        );
        u64::from(old) * 512
    } else {
        let at = vhdx_bat(image) + 8 * index;
        let old = u64::from_le_bytes(read(image, at, 8).try_into().unwrap());
        patch(image, at, &(target | 6).to_le_bytes());
        old & !(MIB - 1)
    }
}

/// Blocks that cannot be read are made to read as zeros only with `--repair=all`, which
/// lists them; everything else reads as before.
#[test]
fn unreadable_blocks_are_given_up_only_with_repair_all() {
    let dir = tempfile::tempdir().unwrap();
    for (image, raw) in patterned(dir.path()) {
        let block = if qemu_format(&image) == "vpc" {
            512 << 10
        } else {
            MIB
        };
        // The block holding 20 MiB points past the end; the last one shares the first's.
        let at_20m = 20 * MIB / block;
        point_entry(&image, at_20m, 1 << 40);
        let first = point_entry(&image, 0, 0);
        point_entry(&image, 0, first);
        let last = 48 * MIB / block - 1;
        point_entry(&image, last, first);
        let (status, report) = check(&image, &[]);
        let bad: Vec<String> = [at_20m, last, 0]
            .iter()
            .map(|i| format!("BAT entry {i}"))
            .collect();
        let named: Vec<&str> = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["severity"] == "corruption")
            .map(|f| f["structure"].as_str().unwrap())
            .collect();
        assert_eq!(
            (status, named),
            (2, bad.iter().map(String::as_str).collect())
        );
        let before = std::fs::read(&image).unwrap();
        let (status, _) = check(&image, &["--repair"]);
        assert_eq!(status, 2);
        assert!(
            std::fs::read(&image).unwrap() == before,
            "a safe repair gave data up"
        );

        let (status, report) = check(&image, &["--repair=all"]);
        assert_eq!(status, 0, "{report}");
        let reference = OpenOptions::new().write(true).open(&raw).unwrap();
        let mut given_up: Vec<u64> = Vec::new();
        for g in report["given_up"].as_array().unwrap() {
            let (start, end) = (
                g["disk_start"].as_u64().unwrap(),
                g["disk_end"].as_u64().unwrap(),
            );
            reference
                .write_all_at(&vec![0; (end - start) as usize], start)
                .unwrap();
            given_up.push(g["entry"].as_u64().unwrap());
        }
        given_up.sort_unstable();
        assert_eq!(given_up, [0, at_20m, last]);
        let (status, again) = check(&image, &[]);
        assert_eq!((status, findings(&again)), (0, vec![]));
        qemu_reads(&image, &raw, "after --repair=all");
    }
}

/// qemu-img check looks at fewer things (neither header copies, nor region table 2, nor
/// blocks sharing space), but where it looks, it and `vdisk check` agree: both clean or
/// both not.
#[test]
fn qemu_img_check_agrees_on_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    let mut images: Vec<PathBuf> = Vec::new();
    if let Some(corpus) = common::corpus_dir() {
        for name in common::corpus_images(&corpus, ".vhdx") {
            // qemu opens an image whose log must be replayed only to repair it.
            if !name.ends_with("dirtylog.vhdx") {
                images.push(common::decompress_corpus_image(&corpus, &name, dir.path()));
            }
        }
    }
    let (patterned, _) = patterned(dir.path()).pop().unwrap();
    images.push(patterned.clone());
    type Target = fn(&Path) -> u64;
    let damages: [(&str, Target); 4] = [
        ("past the end", |p| {
            len_of(p).next_multiple_of(MIB) + 64 * MIB
        }),
        ("over the log", |_| MIB),
        ("over the BAT", vhdx_bat),
        ("over the metadata", |p| vhdx_bat(p) + MIB),
    ];
    for (what, target) in damages {
        let damaged = dir.path().join(format!("{}.vhdx", what.replace(' ', "-")));
        std::fs::copy(&patterned, &damaged).unwrap();
        point_entry(&damaged, 30, target(&damaged));
        images.push(damaged);
    }
    for image in &images {
        let (status, report) = check(image, &[]);
        let qemu = Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(image)
            .output()
            .unwrap();
        assert_eq!(
            status == 2,
            !qemu.status.success(),
            "{}: vdisk check {status} ({:?}), qemu-img check {}: {}{}",
            image.display(),
            findings(&report),
            qemu.status,
            String::from_utf8_lossy(&qemu.stdout),
            String::from_utf8_lossy(&qemu.stderr)
        );
    }
    assert!(images.len() >= 5);
}

#[test]
fn a_mounted_image_is_refused_naming_the_daemon() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = patterned(dir.path()).pop().unwrap();
    let before = common::sha256_file(&image);
    let vdisk = Mount::new(&image, &[]);
    for repair in [&[][..], &["--repair"][..]] {
        let mut args = vec!["check"];
        args.extend(repair);
        args.push(image.to_str().unwrap());
        let refused = vdisk_fails(&args);
        assert!(
            refused.contains("in use") && refused.contains(&vdisk.daemon_pid().to_string()),
            "{refused}"
        );
        let status = crate::common::vdisk::vdisk(&args).status.code();
        assert_eq!(status, Some(1), "could not check");
    }
    vdisk.unmount();
    assert_eq!(common::sha256_file(&image), before);
    // A read-only mount leaves the image to readers: a check goes on, a repair does not.
    let reader = Mount::new(&image, &["ro"]);
    assert_eq!(check(&image, &[]).0, 0);
    assert!(vdisk_fails(&["check", "--repair", image.to_str().unwrap()]).contains("in use"));
    reader.unmount();
}

/// A chain moved to another directory finds its parent by the relative path, but its
/// absolute path is stale: a repair writes the paths of where the parent is now, and
/// libvhdi reads the chain as before.
#[test]
fn stale_parent_paths_are_rewritten_where_the_parent_was_found() {
    for format in ["vhd", "vhdx"] {
        let root = tempfile::tempdir().unwrap();
        let made = root.path().join("made");
        let child = made_chain(&made, format, "8M", None);
        let disk = common::chain::open(&child, false);
        disk.write_at(&mount::pattern(7, 300_000), 3 * MIB + 5)
            .unwrap();
        disk.close().unwrap();
        drop(disk);
        // libvhdi finds a VHDX parent only beside its child.
        let before = (format == "vhd").then(|| common::vhdimount_read(&child));

        let moved = move_chain(root.path(), &made, format);
        let child = moved.join(format!("child.{format}"));
        let before = before.unwrap_or_else(|| common::vhdimount_read(&child));
        let (status, report) = check(&child, &[]);
        let found = findings(&report);
        assert_eq!(status, 0, "{format}: {found:?}");
        assert!(
            found.len() == 1
                && found[0].starts_with("info: parent locator: the parent was found at ")
                && match format {
                    "vhd" => found[0].contains("absolute path") && found[0].contains("made"),
                    _ => found[0].contains("relative path") && found[0].contains("images"),
                },
            "{format}: {found:?}"
        );
        let (status, report) = check(&child, &["--repair"]);
        assert_eq!(
            (status, findings(&report)),
            (0, vec![]),
            "{format}: {report}"
        );
        let (status, again) = check(&child, &[]);
        assert_eq!((status, findings(&again)), (0, vec![]), "{format}");
        let info = crate::common::vdisk::info_json(&child);
        let moved = moved.canonicalize().unwrap();
        assert_eq!(
            info["chain"][0]["path"],
            format!("{}/base.{format}", moved.display())
        );
        if format == "vhdx" {
            let absolute = info["parent_locator"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["key"] == "absolute_win32_path")
                .map(|e| e["value"].as_str().unwrap().to_string());
            // The Windows path the user gave stays: this host cannot judge it.
            assert_eq!(absolute.as_deref(), Some("\\\\?\\C:\\images\\base.vhdx"));
        }
        assert!(
            common::vhdimount_read(&child) == before,
            "{format}: libvhdi reads otherwise"
        );
    }
}

/// A child of `format` over a qemu-made parent, in a directory moved after they were made
/// (stale absolute paths), every block written, then every other block dropped from its
/// BAT (leaked space) and copies damaged (VHD: the footer copy; VHDX: header 1 and
/// region table 2). Returns the child; its parent is beside it.
fn damaged_moved_chain(root: &Path, format: &str) -> PathBuf {
    let made = root.join("made");
    let block = if format == "vhd" { "512K" } else { "1M" };
    let child = made_chain(&made, format, "48M", Some(block));
    let disk = common::chain::open(&child, false);
    for (i, at) in (0..disk.size()).step_by(MIB as usize).enumerate() {
        let len = MIB.min(disk.size() - at) as usize;
        disk.write_at(&mount::pattern(i as u64, len), at).unwrap();
    }
    disk.close().unwrap();
    drop(disk);
    if format == "vhd" {
        let bat = u64::from_be_bytes(read(&child, 512 + 16, 8).try_into().unwrap());
        for block in (1..96).step_by(2) {
            patch(&child, bat + 4 * block, &[0xFF; 4]);
        }
        patch(&child, 200, b"x");
    } else {
        let bat = vhdx_bat(&child);
        for block in (1..48).step_by(2) {
            patch(&child, bat + 8 * block, &[0; 8]);
        }
        patch(&child, 0x10000 + 300, b"x");
        patch(&child, 0x40000 + 300, b"x");
    }
    move_chain(root, &made, format).join(format!("child.{format}"))
}

/// A differencing image of `format` at `made/child.FORMAT` over a qemu-made parent of
/// `size` holding 0x11: a VHD parent beside it, a VHDX one in `made/images` (the child
/// stores the relative path and, as libvhdi needs, a Windows path); returns the child.
fn made_chain(made: &Path, format: &str, size: &str, block: Option<&str>) -> PathBuf {
    let parent_dir = match format {
        "vhdx" => made.join("images"),
        _ => made.to_path_buf(),
    };
    std::fs::create_dir_all(&parent_dir).unwrap();
    let qemu = if format == "vhd" { "vpc" } else { "vhdx" };
    let (parent, child) = (
        parent_dir.join(format!("base.{format}")),
        made.join(format!("child.{format}")),
    );
    common::qemu_img(&["create", "-q", "-f", qemu, parent.to_str().unwrap(), size]);
    common::qemu_io(qemu, &parent, &[&format!("write -P 0x11 0 {size}")]);
    let mut options = vec![];
    if let Some(block) = block {
        options.extend(["--block-size", block]);
    }
    common::chain::child_of_with(&parent, &child, &options);
    child
}

/// Moves `made` (from `made_chain`) to `root/moved`, a VHDX parent out of `images` to
/// beside its child: every host path the child stores leads elsewhere, and the parent is
/// found beside it by its file name. Returns the new directory.
fn move_chain(root: &Path, made: &Path, format: &str) -> PathBuf {
    let moved = root.join("moved");
    std::fs::rename(made, &moved).unwrap();
    if format == "vhdx" {
        std::fs::rename(moved.join("images/base.vhdx"), moved.join("base.vhdx")).unwrap();
    }
    moved
}

/// `vdisk check --repair` killed at random instants: every image left behind opens and
/// reads as it did before (no repair here changes the contents), and a repair run to its
/// end leaves it clean, read alike by libvhdi.
#[test]
fn check_repair_killed_at_random_instants_leaves_images_that_read_the_same() {
    for format in ["vhd", "vhdx"] {
        let root = tempfile::tempdir().unwrap();
        let child = damaged_moved_chain(root.path(), format);
        let (status, report) = check(&child, &[]);
        assert_eq!(status, 2, "{format}: {report}");
        let read_sha =
            |image: &Path| common::sha256_disk(common::chain::open(image, true).as_ref());
        let expected = read_sha(&child);
        let work = child.with_file_name(format!("work.{format}"));
        let mut prepare = || {
            let _ = std::fs::remove_file(&work);
            common::copy_sparse(&child, &work);
        };
        let mut judge = |attempt: usize, _killed: bool| {
            let what = format!("{format}: kill {attempt}");
            assert_eq!(read_sha(&work), expected, "{what}: contents changed");
            if attempt.is_multiple_of(3) {
                let (status, report) = check(&work, &["--repair"]);
                assert_eq!((status, findings(&report)), (0, vec![]), "{what}");
                let (status, again) = check(&work, &[]);
                assert_eq!((status, findings(&again)), (0, vec![]), "{what}");
                let libvhdi = common::sha256_bytes(&common::vhdimount_read(&work));
                assert_eq!(libvhdi, expected, "{what}: libvhdi reads otherwise");
            }
        };
        kill_at_random(
            format,
            &["check", "--repair", work.to_str().unwrap()],
            20,
            format.len() as u64,
            &mut prepare,
            &mut judge,
        );
    }
}

/// Giving up a parent's blocks would change what its children read: `--repair=all`
/// refuses a parent that a differencing image beside it names, and changes nothing.
#[test]
fn repair_all_refuses_the_parent_of_children_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, _) = patterned(dir.path()).pop().unwrap();
    let child = dir.path().join("child.vhdx");
    vdisk_ok(&[
        "create",
        "--parent",
        parent.to_str().unwrap(),
        child.to_str().unwrap(),
    ]);
    point_entry(&parent, 20, 1 << 40);
    let before = common::sha256_file(&parent);
    let refused = vdisk_fails(&["check", "--repair=all", parent.to_str().unwrap()]);
    assert!(
        refused.contains("child.vhdx") && refused.contains("parent"),
        "{refused}"
    );
    assert_eq!(common::sha256_file(&parent), before);
    // What keeps the contents is repaired all the same.
    assert_eq!(check(&parent, &["--repair"]).0, 2);
}

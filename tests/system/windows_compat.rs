//! What Windows, Hyper-V and Azure expect of the images `vdisk` writes, checked with qemu
//! and libvhdi: fixed images from create and convert occupy their whole size on the host
//! unless `--sparse`, and `convert --preallocate` makes any output do so; children record
//! a parent's Windows path in the forms each format wants, and a VHD child its parent's
//! footer time stamp; children naming their parent in upper case, as Windows writes it,
//! still mount; sizes Azure refuses are warned of, or rounded up with `--azure`.

use crate::common;
use crate::common::chain::{MIB, open, read_all};
use crate::common::mount::{self, Mount};
use crate::common::vdisk::{vdisk, vdisk_fails, vdisk_ok};
use serde_json::Value;
use std::fs;
use std::path::Path;
use std::process::Command;

/// What qemu says the file takes on the host (`actual-size`).
fn qemu_actual_size(format: &str, image: &Path) -> u64 {
    let out = common::qemu_img(&[
        "info",
        "--output=json",
        "-f",
        format,
        image.to_str().unwrap(),
    ]);
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    info["actual-size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no actual-size in {info}"))
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

/// Checks that `image` (of qemu's `format`) takes its whole length on the host, or, when
/// `sparse`, that it has holes; `report` is what vdisk said of it.
fn assert_allocation(image: &Path, format: &str, report: &Value, sparse: bool) {
    let length = fs::metadata(image).unwrap().len();
    let held = qemu_actual_size(format, image);
    let what = format!("{}: {held} of {length} bytes on the host", image.display());
    assert_eq!(
        report["file_length"].as_u64(),
        Some(length),
        "{what}: {report}"
    );
    assert_eq!(
        report["allocated_bytes"].as_u64(),
        Some(held),
        "{what}: {report}"
    );
    match sparse {
        false => assert!(held >= length, "{what}"),
        true => assert!(held < length, "{what}"),
    }
}

#[test]
fn fixed_images_from_create_occupy_their_size_on_the_host_unless_sparse() {
    let dir = tempfile::tempdir().unwrap();
    for (name, format) in [("fixed.vhd", "vpc"), ("fixed.vhdx", "vhdx")] {
        for sparse in [false, true] {
            let path = dir.path().join(format!("{sparse}-{name}"));
            let mut args = vec!["create", "--json", "--type", "fixed", "--size", "24M"];
            if sparse {
                args.push("--sparse");
            }
            args.push(path.to_str().unwrap());
            let report = json(&vdisk_ok(&args));
            assert_eq!(report["subtype"], "fixed");
            assert_eq!(report["disk_size"].as_u64(), Some(24 * MIB));
            assert_allocation(&path, format, &report, sparse);
            assert_eq!(
                common::qemu_virtual_size(&format!(
                    "driver={format},file.filename={}",
                    path.display()
                )),
                24 * MIB
            );
            common::qemu_check_clean(format, &path);
            assert!(read_all(open(&path, true).as_ref()).iter().all(|&b| b == 0));
        }
    }
    // The text report says the same.
    let text = vdisk_ok(&[
        "create",
        "--type",
        "fixed",
        "--size",
        "8M",
        dir.path().join("t.vhd").to_str().unwrap(),
    ]);
    assert!(
        text.ends_with(
            "t.vhd: fixed vhd, 8.0 MiB disk, 8.0 MiB of the 8.0 MiB file allocated on the host\n"
        ),
        "{text}"
    );
}

#[test]
fn converted_fixed_images_are_allocated_unless_sparse_and_any_output_can_be() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.vhdx");
    vdisk_ok(&[
        "create",
        "--size",
        "32M",
        "--block-size",
        "1M",
        source.to_str().unwrap(),
    ]);
    {
        let disk = open(&source, false);
        disk.write_at(&common::mount::pattern(3, 64 << 10), 5 * MIB + 4096)
            .unwrap();
        disk.close().unwrap();
    }
    let reference = dir.path().join("reference.raw");
    common::qemu_convert_to_raw("vhdx", &source, &reference);
    for (name, format, args, sparse) in [
        ("fixed.vhd", "vpc", &["--type", "fixed"][..], false),
        (
            "fixed.vhdx",
            "vhdx",
            &["--type", "fixed", "--block-size", "2M"][..],
            false,
        ),
        (
            "sparse.vhd",
            "vpc",
            &["--type", "fixed", "--sparse"][..],
            true,
        ),
        (
            "sparse.vhdx",
            "vhdx",
            &["--type", "fixed", "--sparse"][..],
            true,
        ),
        ("dynamic.vhdx", "vhdx", &["--block-size", "1M"][..], true),
        (
            "preallocated.vhdx",
            "vhdx",
            &["--block-size", "1M", "--preallocate"][..],
            false,
        ),
        ("preallocated.vhd", "vpc", &["--preallocate"][..], false),
        ("plain.img", "raw", &[][..], true),
        ("preallocated.img", "raw", &["--preallocate"][..], false),
    ] {
        let out = dir.path().join(name);
        let mut all = vec!["convert", "--json"];
        all.extend_from_slice(args);
        all.extend([source.to_str().unwrap(), out.to_str().unwrap()]);
        let report = json(&vdisk_ok(&all));
        assert_allocation(&out, format, &report, sparse);
        common::run(
            Command::new("qemu-img")
                .args(["compare", "-q", "-f", format, "-F", "raw"])
                .arg(&out)
                .arg(&reference),
        );
        if format != "raw" {
            common::qemu_check_clean(format, &out);
        }
    }
    let both = dir.path().join("both.vhd");
    let refused = vdisk(&[
        "convert",
        "--sparse",
        "--preallocate",
        source.to_str().unwrap(),
        both.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    assert!(!both.exists());
}

/// Every place in `image` where `text` stands in UTF-16LE, as locators store it.
fn utf16_occurrences(image: &[u8], text: &str) -> usize {
    let needle: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
    image.windows(needle.len()).filter(|w| *w == needle).count()
}

/// What libvhdi's vhdiinfo shows as the parent's file name, if anything.
fn vhdiinfo_parent_filename(image: &Path) -> Option<String> {
    let out = common::run(Command::new("vhdiinfo").arg(image));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| line.trim().strip_prefix("Parent filename"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
}

#[test]
fn a_vhdx_child_records_the_windows_paths_given_in_the_specifications_form() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    vdisk_ok(&["create", "--size", "16M", base.to_str().unwrap()]);
    {
        let disk = open(&base, false);
        disk.write_at(&common::mount::pattern(1, 3 * MIB as usize), MIB)
            .unwrap();
        disk.close().unwrap();
    }
    let parent_id = common::vdisk::info_json(&base)["identifiers"]["data_write_guid"]
        .as_str()
        .unwrap()
        .to_string();
    let volume = r"\\?\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\vms\base.vhdx";
    for (name, win_path, recorded) in [
        ("drive.vhdx", r"D:\vms\base.vhdx", r"\\?\D:\vms\base.vhdx"),
        (
            "share.vhdx",
            r"\\nas\vms\base.vhdx",
            r"\\?\UNC\nas\vms\base.vhdx",
        ),
    ] {
        let child = dir.path().join(name);
        vdisk_ok(&[
            "create",
            "--parent",
            base.to_str().unwrap(),
            "--parent-win-path",
            win_path,
            "--parent-volume-path",
            volume,
            child.to_str().unwrap(),
        ]);
        assert_eq!(
            vhdiinfo_parent_filename(&child).as_deref(),
            Some(recorded),
            "{name}"
        );
        let bytes = fs::read(&child).unwrap();
        assert_eq!(utf16_occurrences(&bytes, volume), 1, "{name}");
        assert_eq!(
            utf16_occurrences(&bytes, &format!("{{{parent_id}}}")),
            1,
            "{name}: parent_linkage braced and lower case"
        );
        {
            let disk = open(&child, false);
            disk.write_at(&common::mount::pattern(2, 5000), 3 * MIB - 700)
                .unwrap();
            disk.close().unwrap();
        }
        let ours = read_all(open(&child, true).as_ref());
        common::chain::assert_same(
            &common::vhdimount_read(&child),
            &ours,
            &format!("{name} in vhdimount"),
        );
    }

    // Without a Windows path none is made up, and the child still finds its parent.
    let child = dir.path().join("plain.vhdx");
    vdisk_ok(&[
        "create",
        "--parent",
        base.to_str().unwrap(),
        child.to_str().unwrap(),
    ]);
    assert_eq!(vhdiinfo_parent_filename(&child), None);
    let bytes = fs::read(&child).unwrap();
    assert_eq!(utf16_occurrences(&bytes, "absolute_win32_path"), 0);
    assert_eq!(utf16_occurrences(&bytes, "relative_path"), 1);
    assert_eq!(
        read_all(open(&child, true).as_ref()),
        read_all(open(&base, true).as_ref())
    );

    for (option, given) in [
        ("--parent-win-path", "/srv/vms/base.vhdx"),
        ("--parent-win-path", r"D:\vms\..\base.vhdx"),
        ("--parent-volume-path", r"D:\vms\base.vhdx"),
    ] {
        let refused = dir.path().join("refused.vhdx");
        let err = vdisk_fails(&[
            "create",
            "--parent",
            base.to_str().unwrap(),
            option,
            given,
            refused.to_str().unwrap(),
        ]);
        assert!(err.contains(given), "{err}");
        assert!(!refused.exists(), "{err}");
    }
}

/// A big-endian u32 at `at`.
fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap())
}

#[test]
fn a_vhd_child_records_its_parents_time_stamp_and_windows_path() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    vdisk_ok(&["create", "--size", "8M", base.to_str().unwrap()]);
    {
        let disk = open(&base, false);
        disk.write_at(&common::mount::pattern(4, MIB as usize), 2 * MIB)
            .unwrap();
        disk.close().unwrap();
    }
    // A copied parent has a new modification time but the same footer.
    common::run(Command::new("touch").args(["-d", "2011-01-01"]).arg(&base));
    let child = dir.path().join("child.vhd");
    vdisk_ok(&[
        "create",
        "--parent",
        base.to_str().unwrap(),
        "--parent-win-path",
        r"D:\vms\base.vhd",
        child.to_str().unwrap(),
    ]);
    let parent = fs::read(&base).unwrap();
    let footer = &parent[parent.len() - 512..];
    let image = fs::read(&child).unwrap();
    let header = &image[512..1536];
    assert_eq!(&header[..8], b"cxsparse");
    assert_eq!(
        be32(header, 56),
        be32(footer, 24),
        "Parent Time Stamp = the parent footer's Time Stamp"
    );
    let locators: Vec<(String, String)> = (0..8)
        .map(|i| &header[576 + 24 * i..600 + 24 * i])
        .filter(|entry| entry[..4] != [0; 4])
        .map(|entry| {
            let (len, at) = (
                be32(entry, 8) as usize,
                u64::from_be_bytes(entry[16..24].try_into().unwrap()) as usize,
            );
            let units: Vec<u16> = image[at..at + len]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            (
                String::from_utf8_lossy(&entry[..4]).into_owned(),
                String::from_utf16(&units).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        locators,
        [
            ("W2ru".to_string(), r".\base.vhd".to_string()),
            ("W2ku".to_string(), r"D:\vms\base.vhd".to_string()),
        ]
    );
    {
        let disk = open(&child, false);
        disk.write_at(&common::mount::pattern(5, 9000), 2 * MIB + 100)
            .unwrap();
        disk.close().unwrap();
    }
    let ours = read_all(open(&child, true).as_ref());
    common::chain::assert_same(&common::vhdimount_read(&child), &ours, "vhdimount");
    assert_eq!(
        common::qemu_virtual_size(&format!("driver=vpc,file.filename={}", child.display())),
        8 * MIB
    );
}

/// Rewrites the child's `parent_linkage` value in place in upper case, as Windows writes
/// it (the metadata region has no checksum).
fn upper_case_linkage(child: &Path, parent_id: &str) {
    let mut image = fs::read(child).unwrap();
    let encode = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
    let lower = encode(&format!("{{{parent_id}}}"));
    let upper = encode(&format!("{{{}}}", parent_id.to_uppercase()));
    let at = image
        .windows(lower.len())
        .position(|w| w == lower)
        .expect("the linkage is in the file");
    image[at..at + upper.len()].copy_from_slice(&upper);
    fs::write(child, image).unwrap();
}

#[test]
fn children_naming_their_parent_in_either_case_mount() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    vdisk_ok(&["create", "--size", "12M", base.to_str().unwrap()]);
    {
        let disk = open(&base, false);
        disk.write_at(&common::mount::pattern(6, 2 * MIB as usize), 0)
            .unwrap();
        disk.close().unwrap();
    }
    let parent_id = common::vdisk::info_json(&base)["identifiers"]["data_write_guid"]
        .as_str()
        .unwrap()
        .to_string();
    for upper in [false, true] {
        let child = dir.path().join(format!("child-{upper}.vhdx"));
        common::chain::child_of(&base, &child);
        {
            let disk = open(&child, false);
            disk.write_at(&common::mount::pattern(7, 4096), MIB + 512)
                .unwrap();
            disk.close().unwrap();
        }
        let expected = read_all(open(&child, true).as_ref());
        if upper {
            upper_case_linkage(&child, &parent_id);
        }
        let info = common::vdisk::info_json(&child);
        assert_eq!(info["chain"][0]["matched"], true, "{info}");
        let mounted = Mount::new(&child, &["ro"]);
        let shown = fs::read(mounted.disk()).unwrap();
        mounted.unmount();
        common::chain::assert_same(&shown, &expected, &format!("upper case: {upper}"));
    }
}

#[test]
fn sizes_azure_refuses_are_warned_of_and_rounded_up_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let odd = (5 * MIB + 512).to_string();
    let at = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let warned = |args: &[&str]| {
        let out = vdisk(args);
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    let stderr = warned(&["create", "--type", "fixed", "--size", &odd, &at("odd.vhd")]);
    assert!(
        stderr.starts_with("vdisk: warning: ")
            && stderr.contains("odd.vhd")
            && stderr.contains("whole number of MiB")
            && stderr.lines().count() == 1,
        "{stderr}"
    );
    let stderr = warned(&[
        "create",
        "--type",
        "fixed",
        "--azure",
        "--size",
        &odd,
        &at("round.vhd"),
    ]);
    assert_eq!(stderr, "");
    let size =
        |name: &str| common::qemu_virtual_size(&format!("driver=vpc,file.filename={}", at(name)));
    assert_eq!(size("odd.vhd"), 5 * MIB + 512);
    assert_eq!(size("round.vhd"), 6 * MIB);
    // Dynamic images and VHDX files are not what Azure takes, so they are not warned of.
    let stderr = warned(&["create", "--size", &odd, &at("dynamic.vhd")]);
    assert_eq!(stderr, "");

    let stderr = warned(&[
        "convert",
        "--type",
        "fixed",
        &at("odd.vhd"),
        &at("copy.vhd"),
    ]);
    assert!(
        stderr.contains("copy.vhd") && stderr.contains("whole number of MiB"),
        "{stderr}"
    );
    let report = json(&vdisk_ok(&[
        "convert",
        "--json",
        "--type",
        "fixed",
        "--azure",
        &at("odd.vhd"),
        &at("azure.vhd"),
    ]));
    assert_eq!(report["warnings"], Value::Array(Vec::new()));
    assert_eq!(size("azure.vhd"), 6 * MIB);
}

//! The `vdisk` command on its own: `create` picks the format (children follow their
//! parent) and refuses what it cannot do with one line, leaving no file behind; `commit`
//! says what it merged; `check` tells what it found by its exit status. What qemu
//! and libvhdi make of created images, and `info` on the corpus, are in the system tier's
//! `vdisk_cli` module.

use crate::common::chain::MIB;
use crate::common::vdisk::{info_json, vdisk, vdisk_fails, vdisk_ok};
use std::fs;
use std::path::Path;

#[test]
fn create_picks_the_format_and_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    vdisk_ok(&["create", "--size", "8M", &at("a.vhd")]);
    vdisk_ok(&["create", "--size", "8M", &at("b.img")]);
    vdisk_ok(&["create", "--size", "8M", "--format", "vhd", &at("c.img")]);
    assert_eq!(info_json(Path::new(&at("a.vhd")))["format"], "vhd");
    assert_eq!(info_json(Path::new(&at("b.img")))["format"], "vhdx");
    assert_eq!(info_json(Path::new(&at("c.img")))["format"], "vhd");
    // Children follow their parent's format and size.
    vdisk_ok(&["create", "--parent", &at("a.vhd"), &at("a-child.vhd")]);
    vdisk_ok(&["create", "--parent", &at("b.img"), &at("b-child.vhdx")]);
    for (child, format, parent) in [
        ("a-child.vhd", "vhd", "a.vhd"),
        ("b-child.vhdx", "vhdx", "b.img"),
    ] {
        let info = info_json(Path::new(&at(child)));
        assert_eq!(info["format"], format);
        assert_eq!(info["subtype"], "differencing");
        assert_eq!(info["virtual_size"], 8 * MIB);
        let chain = info["chain"].as_array().unwrap();
        assert_eq!(chain.len(), 1);
        let parent_path = fs::canonicalize(at(parent)).unwrap();
        assert_eq!(chain[0]["path"], parent_path.to_str().unwrap());
        assert_eq!(chain[0]["matched"], true);
        let parent_info = info_json(&parent_path);
        let parent_id = if format == "vhd" {
            &parent_info["identifiers"]["unique_id"]
        } else {
            &parent_info["identifiers"]["data_write_guid"]
        };
        assert_eq!(&chain[0]["identity"], parent_id);
    }

    let before = fs::read(at("a.vhd")).unwrap();
    let err = vdisk_fails(&["create", "--size", "8M", &at("a.vhd")]);
    assert!(err.contains("cannot create image"), "{err}");
    assert_eq!(
        fs::read(at("a.vhd")).unwrap(),
        before,
        "an existing file is kept"
    );
    for (args, problem) in [
        (vec!["create", &at("nosize.vhdx")], "size is required"),
        (
            vec!["create", "--size", "12Q", &at("q.vhdx")],
            "is not a size",
        ),
        (
            vec!["create", "--size", "1000", &at("odd.vhd")],
            "512-byte sectors",
        ),
        (
            vec![
                "create",
                "--size",
                "8M",
                "--logical-sector",
                "4096",
                &at("x.vhd"),
            ],
            "512-byte sectors only",
        ),
        (
            vec![
                "create",
                "--parent",
                &at("a.vhd"),
                "--format",
                "vhdx",
                &at("y.vhdx"),
            ],
            "the parent is a vhd image",
        ),
        (
            vec![
                "create",
                "--parent",
                &at("a.vhd"),
                "--type",
                "fixed",
                &at("z.vhd"),
            ],
            "cannot be fixed",
        ),
        (
            vec!["create", "--parent", &at("missing.vhdx"), &at("w.vhdx")],
            "missing.vhdx: cannot open image",
        ),
    ] {
        let out = vdisk(&args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(problem), "{args:?}: {stderr}");
    }
    for name in [
        "nosize.vhdx",
        "q.vhdx",
        "odd.vhd",
        "x.vhd",
        "y.vhdx",
        "z.vhd",
        "w.vhdx",
    ] {
        assert!(!dir.path().join(name).exists(), "{name} left behind");
    }
}

#[test]
fn commit_says_what_it_merged_and_refuses_an_image_without_a_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = (dir.path().join("base.vhdx"), dir.path().join("child.vhdx"));
    vdisk_ok(&["create", "--size", "8M", base.to_str().unwrap()]);
    vdisk_ok(&[
        "create",
        "--parent",
        base.to_str().unwrap(),
        child.to_str().unwrap(),
    ]);
    let disk = vdisk_mount::open(&child, &Default::default()).unwrap();
    disk.write_at(&[0x3C; 3 << 20], MIB).unwrap();
    disk.close().unwrap();
    drop(disk);
    let err = vdisk_fails(&["commit", base.to_str().unwrap()]);
    assert!(err.contains("not a differencing image"), "{err}");
    let said = vdisk_ok(&["commit", child.to_str().unwrap()]);
    assert_eq!(
        said,
        format!(
            "{} merged into {}: 3.0 MiB written, 0 bytes zeroed; child removed\n",
            child.display(),
            fs::canonicalize(&base).unwrap().display()
        )
    );
    assert!(!child.exists());
    let disk = vdisk_mount::open(&base, &Default::default()).unwrap();
    let mut buf = vec![0u8; 3 << 20];
    disk.read_at(&mut buf, MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x3C));
}

/// `vdisk check`'s exit status is `qemu-img check`'s, whatever the output: 0 clean, 2
/// corrupt, 1 could not check, with one line naming the file.
#[test]
fn check_tells_its_findings_by_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.vhdx");
    let path = image.to_str().unwrap();
    vdisk_ok(&["create", "--size", "8M", path]);
    for args in [
        &["check", path][..],
        &["check", "--json", path],
        &["check", "--repair", path],
    ] {
        assert_eq!(vdisk(args).status.code(), Some(0), "{args:?}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&vdisk_ok(&["check", "--json", path])).unwrap();
    assert_eq!(report["format"], "vhdx");
    assert_eq!(report["findings"], serde_json::json!([]));
    // Header 1 damaged: corrupt, and a repair makes it clean again.
    let mut bytes = fs::read(&image).unwrap();
    bytes[0x10000 + 100] ^= 1;
    fs::write(&image, bytes).unwrap();
    let out = vdisk(&["check", path]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("corruption: header 1 at 0x10000: checksum mismatch"),
        "{text}"
    );
    assert_eq!(
        vdisk(&["check", "--repair=all", path]).status.code(),
        Some(0)
    );
    assert_eq!(vdisk(&["check", path]).status.code(), Some(0));
    // Not an image at all: could not check.
    let text_file = dir.path().join("notes.txt");
    fs::write(&text_file, "not a disk").unwrap();
    let err = vdisk_fails(&["check", text_file.to_str().unwrap()]);
    assert!(
        err.contains("notes.txt: not a VHD or VHDX disk image"),
        "{err}"
    );
    assert_eq!(
        vdisk(&["check", text_file.to_str().unwrap()]).status.code(),
        Some(1)
    );
}

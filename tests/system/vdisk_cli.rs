//! The `vdisk` command as others see its work: `create` makes images that qemu-img and
//! libvhdi's vhdimount accept and read as we do, with the size asked for; `info --json`
//! reports what the corpus's independent header analysis found, without changing the
//! image. How `create` picks formats and refuses bad requests is in the quick tier.

use crate::common;
use crate::common::chain::{MIB, assert_same, open, random_writes, read_all, write_directly};
use crate::common::vdisk::{info_json, vdisk, vdisk_ok};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::Value;
use std::fs;

#[test]
fn created_images_pass_qemu_and_read_alike_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    for (name, args, size, lss) in [
        (
            "fixed-azure.vhd",
            &["--type", "fixed", "--size", "30M"][..],
            30 * MIB,
            512,
        ),
        ("dynamic.vhd", &["--size", "21M"][..], 21 * MIB, 512),
        (
            "fixed.vhdx",
            &["--type", "fixed", "--size", "40M", "--block-size", "8M"][..],
            40 * MIB,
            512,
        ),
        ("dynamic.vhdx", &["--size", "100M"][..], 100 * MIB, 512),
        (
            "odd.vhdx",
            &["--size", "5767680", "--block-size", "1M"][..],
            5767680,
            512,
        ),
        (
            "dynamic4k.vhdx",
            &["--size", "64M", "--logical-sector", "4096"][..],
            64 * MIB,
            4096,
        ),
        (
            "fixed4k.vhdx",
            &[
                "--type",
                "fixed",
                "--size",
                "24M",
                "--logical-sector",
                "4096",
                "--block-size",
                "4M",
            ][..],
            24 * MIB,
            4096,
        ),
    ] {
        let path = dir.path().join(name);
        let mut all = vec!["create"];
        all.extend_from_slice(args);
        all.push(path.to_str().unwrap());
        vdisk_ok(&all);
        let info = info_json(&path);
        let vhdx = name.ends_with(".vhdx");
        assert_eq!(info["format"], if vhdx { "vhdx" } else { "vhd" }, "{name}");
        let fixed = args.contains(&"fixed");
        assert_eq!(
            info["subtype"],
            if fixed { "fixed" } else { "dynamic" },
            "{name}"
        );
        assert_eq!(info["virtual_size"], size, "{name}");
        assert_eq!(info["logical_sector_size"], lss, "{name}");
        if vhdx {
            assert_eq!(info["physical_sector_size"], 4096, "{name}");
            assert_eq!(info["log"], "clean");
            assert!(
                info["creator"]
                    .as_str()
                    .unwrap()
                    .starts_with("vdisk-mount ")
            );
            if !args.contains(&"--block-size") {
                assert_eq!(info["block_size"], 32 * MIB, "{name}: Hyper-V's default");
            }
        }
        let qemu_format = if vhdx { "vhdx" } else { "vpc" };
        let mut model = vec![0u8; size as usize];
        if lss == 512 {
            let opts = format!("driver={qemu_format},file.filename={}", path.display());
            assert_eq!(common::qemu_virtual_size(&opts), size, "{name}");
            common::qemu_check_clean(qemu_format, &path);
        }
        assert_same(&common::vhdimount_read(&path), &model, name);
        let writes = random_writes(&mut model, &mut rng, 10);
        write_directly(&path, &writes);
        assert_same(&read_all(open(&path, true).as_ref()), &model, name);
        assert_same(
            &common::vhdimount_read(&path),
            &model,
            &format!("{name} in vhdimount"),
        );
        if lss == 512 {
            // qemu cannot open VHDX files with 4096-byte sectors.
            let raw = dir.path().join(format!("{name}.raw"));
            fs::write(&raw, &model).unwrap();
            common::qemu_img(&[
                "compare",
                "-q",
                "-f",
                qemu_format,
                "-F",
                "raw",
                path.to_str().unwrap(),
                raw.to_str().unwrap(),
            ]);
            common::qemu_check_clean(qemu_format, &path);
        }
    }
}

/// The current header of a VHDX as the corpus analysis recorded it.
fn active_header(analysis: &Value) -> &Value {
    let active = &analysis["active_header_offset"];
    analysis["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| &h["offset"] == active)
        .unwrap()
}

#[test]
fn info_reports_what_the_corpus_analysis_found_and_changes_nothing() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let entries: Vec<Value> =
        serde_json::from_str(&fs::read_to_string(corpus.join("corpus.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for entry in &entries {
        let name = entry["file"].as_str().unwrap();
        let path = common::decompress_corpus_image(&corpus, name, dir.path());
        if name.starts_with("dfvfs-image-chain/") {
            // Its child needs the parent beside it.
            common::decompress_corpus_image(&corpus, "dfvfs-image-chain/image.vhd", dir.path());
        }
        let before = common::sha256_file(&path);
        let a = &entry["header_analysis"];
        let out = vdisk(&["info", "--json", path.to_str().unwrap()]);
        assert_eq!(
            common::sha256_file(&path),
            before,
            "{name}: info changed the image"
        );
        if !out.status.success() {
            // Only the images the corpus says a strict reader refuses.
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
            assert!(stderr.contains(name), "{name}: {stderr}");
            let expected = if name.starts_with("dfvfs-image-chain/") {
                "checksum"
            } else {
                "parent not found"
            };
            assert!(stderr.to_lowercase().contains(expected), "{name}: {stderr}");
            continue;
        }
        let info: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids = &info["identifiers"];
        match a["format"].as_str().unwrap() {
            "VHDX" => {
                assert_eq!(info["format"], "vhdx", "{name}");
                for field in [
                    "virtual_size",
                    "block_size",
                    "logical_sector_size",
                    "physical_sector_size",
                ] {
                    assert_eq!(info[field], a[field], "{name}: {field}");
                }
                assert_eq!(info["creator"], a["creator"], "{name}");
                assert_eq!(info["log"] == "dirty", a["log_dirty"], "{name}");
                assert_eq!(info["subtype"], a["disk_type"], "{name}");
                let header = active_header(a);
                assert_eq!(ids["data_write_guid"], header["data_write_guid"], "{name}");
                assert_eq!(ids["file_write_guid"], header["file_write_guid"], "{name}");
                assert_eq!(ids["log_guid"], header["log_guid"], "{name}");
                assert_eq!(ids["header_sequence_number"], header["seq"], "{name}");
                assert_eq!(info["total_blocks"], a["payload_blocks"], "{name}");
                let present = a["payload_bat_states"]["FULLY_PRESENT"]
                    .as_u64()
                    .unwrap_or(0);
                if !a["log_dirty"].as_bool().unwrap() {
                    assert_eq!(info["allocated_blocks"], present, "{name}");
                }
            }
            _ => {
                assert_eq!(info["format"], "vhd", "{name}");
                assert_eq!(info["subtype"], a["disk_type"], "{name}");
                assert_eq!(info["block_size"], a["block_size"], "{name}");
                assert_eq!(info["logical_sector_size"], 512);
                assert_eq!(ids["unique_id"], a["unique_id"], "{name}");
                assert_eq!(info["creator"], a["creator_app"], "{name}");
                assert_eq!(info["allocated_blocks"], a["bat_allocated"], "{name}");
                if !entry["qemu_img_info_virtual_size"].is_null() {
                    assert_eq!(
                        info["virtual_size"], entry["qemu_img_info_virtual_size"],
                        "{name}"
                    );
                }
            }
        }
        // The text form says the same in lines.
        let text = vdisk_ok(&["info", path.to_str().unwrap()]);
        assert!(
            text.contains(&format!("{} bytes", info["virtual_size"])),
            "{name}: {text}"
        );
    }
}

#[test]
fn map_agrees_with_qemu_img_map_on_a_qemu_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("map.vhd");
    let path = image.to_str().unwrap();
    common::qemu_img(&["create", "-q", "-f", "vpc", path, "64M"]);
    common::qemu_io(
        "vpc",
        &image,
        &["write 1M 3M", "write 40M 4k", "write 63M 1M"],
    );
    let ours: Value = serde_json::from_str(&vdisk_ok(&["map", "--json", path])).unwrap();
    let qemu: Value = serde_json::from_slice(
        &common::qemu_img(&["map", "--output=json", "-f", "vpc", path]).stdout,
    )
    .unwrap();
    let theirs: Vec<(u64, u64, &str, Option<u64>)> = qemu
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let data = e["data"].as_bool().unwrap();
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                if data { "data" } else { "zero" },
                e["offset"].as_u64().filter(|_| data),
            )
        })
        .collect();
    let mine: Vec<(u64, u64, &str, Option<u64>)> = ours["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["layer"], 0);
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["state"].as_str().unwrap(),
                e["offset"].as_u64(),
            )
        })
        .collect();
    assert_eq!(mine, theirs);
    assert_eq!(ours["layers"][0], path);
}

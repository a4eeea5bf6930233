//! `vdisk commit`, run as a user would: the parent afterwards reads as the child did
//! (to vhdimount and qemu as well), the middle of a chain of three, parents made by
//! Windows and Disk2vhd, refusals, and kills at random instants.

use crate::common;
use crate::common::chain::{
    MIB, assert_same, check_chain, open, random_writes, read_all, write_directly,
};
use crate::common::mount::{self, Mount};
use crate::common::vdisk::{info_json, kill_at_random, vdisk_fails, vdisk_ok};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn commit_json(child: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["commit", "--json"];
    args.extend(extra);
    args.push(child.to_str().unwrap());
    serde_json::from_str(&vdisk_ok(&args)).unwrap()
}

/// Whether `image` is a VHDX child with blocks that read as zeros over its parent (ZERO
/// or UNMAPPED): libvhdi reads those from the parent, where the specification has them
/// hide it, so vhdimount cannot judge such a child.
fn hides_parent_in_zero_blocks(image: &Path) -> bool {
    let info = info_json(image);
    if info["format"] != "vhdx" || info["subtype"] != "differencing" {
        return false;
    }
    let map: Value =
        serde_json::from_str(&vdisk_ok(&["map", "--json", image.to_str().unwrap()])).unwrap();
    map["extents"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["state"] == "zero" && e["layer"] == 0)
}

/// `image` (with its parents) must read as `expected` through the library, and through
/// vhdimount where libvhdi can read it.
fn assert_reads(image: &Path, expected: &[u8], what: &str) {
    assert_same(&read_all(open(image, true).as_ref()), expected, what);
    if !hides_parent_in_zero_blocks(image) {
        assert_same(
            &common::vhdimount_read(image),
            expected,
            &format!("{what}: vhdimount"),
        );
    }
}

/// `parent`, a merge's target, must read as `expected` through the library, vhdimount
/// and qemu, and qemu must find it clean.
fn assert_parent_reads(parent: &Path, expected: &[u8], what: &str) {
    assert_reads(parent, expected, what);
    let format = common::qemu_format(parent);
    let reference = parent.with_extension("expected.raw");
    std::fs::write(&reference, expected).unwrap();
    let compared = Command::new("qemu-img")
        .args(["compare", "-q", "-f", format, "-F", "raw"])
        .arg(parent)
        .arg(&reference)
        .status()
        .unwrap();
    std::fs::remove_file(&reference).unwrap();
    assert!(compared.success(), "{what}: qemu reads other contents");
    common::qemu_check_clean(format, parent);
}

/// A differencing child of `parent` at `child`: random writes of every shape, a
/// discard over whole blocks the parent holds data in, and zeros written over more.
/// Returns what it must read: vhdimount's reading of the parent, with those changes.
fn scribbled_child(parent: &Path, child: &Path, seed: u64) -> Vec<u8> {
    common::chain::child_of_with(parent, child, &["--block-size", "1M"]);
    let mut model = common::vhdimount_read(parent);
    let writes = random_writes(&mut model, &mut StdRng::seed_from_u64(seed), 30);
    write_directly(child, &writes);
    let discarded = 4 * MIB..7 * MIB;
    let zeroed = 9 * MIB + 512..11 * MIB + 512;
    let disk = open(child, false);
    disk.discard(discarded.start, discarded.end - discarded.start)
        .unwrap();
    disk.write_at(&vec![0; (zeroed.end - zeroed.start) as usize], zeroed.start)
        .unwrap();
    disk.close().unwrap();
    for range in [discarded, zeroed] {
        model[range.start as usize..range.end as usize].fill(0);
    }
    assert_reads(child, &model, &child.display().to_string());
    model
}

/// A parent made by `vdisk create ARGS` and filled with random data, beside it a
/// scribbled child; returns both paths and what the child reads.
fn parent_and_child(dir: &Path, extension: &str, args: &[&str]) -> (PathBuf, PathBuf, Vec<u8>) {
    let (parent, child) = (
        dir.join(format!("base.{extension}")),
        dir.join(format!("child.{extension}")),
    );
    let mut create = vec!["create"];
    create.extend(args);
    create.push(parent.to_str().unwrap());
    vdisk_ok(&create);
    let mut model = read_all(open(&parent, true).as_ref());
    let writes = random_writes(&mut model, &mut StdRng::seed_from_u64(7), 40);
    write_directly(&parent, &writes);
    let view = scribbled_child(&parent, &child, 8);
    (parent, child, view)
}

/// Merges a scribbled child into a parent made with `args`, removed or kept: the parent
/// reads as the child did, and a kept child, emptied, still does.
fn merge(extension: &str, args: &[&str]) {
    for keep_child in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (parent, child, before) = parent_and_child(dir.path(), extension, args);
        let what = format!("{extension} {args:?}, keep_child {keep_child}");
        let extra: &[&str] = if keep_child { &["--keep-child"] } else { &[] };
        let report = commit_json(&child, extra);
        assert!(report["bytes_written"].as_u64().unwrap() > 0, "{report}");
        assert!(report["bytes_zeroed"].as_u64().unwrap() > 0, "{report}");
        assert_eq!(report["child_kept"], keep_child, "{report}");
        assert_parent_reads(&parent, &before, &what);
        assert_eq!(child.exists(), keep_child, "{what}");
        if keep_child {
            assert_reads(&child, &before, &format!("{what}: kept child"));
            let info = info_json(&child);
            assert_eq!(info["allocated_blocks"], 0, "{info}");
        }
    }
}

#[test]
fn commit_merges_a_vhdx_child_into_a_dynamic_parent() {
    merge("vhdx", &["--size", "48M", "--block-size", "1M"]);
}

#[test]
fn commit_merges_a_vhdx_child_into_a_fixed_parent() {
    merge("vhdx", &["--size", "48M", "--type", "fixed"]);
}

#[test]
fn commit_merges_a_vhd_child_into_a_dynamic_parent() {
    merge("vhd", &["--size", "48M", "--block-size", "512K"]);
}

#[test]
fn commit_merges_a_vhd_child_into_a_fixed_parent() {
    merge("vhd", &["--size", "48M", "--type", "fixed"]);
}

/// base <- mid <- top: committing top changes mid only, which then reads as top did.
fn chain_of_three(extension: &str) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join(format!("base.{extension}"));
    vdisk_ok(&[
        "create",
        "--size",
        "24M",
        "--block-size",
        "1M",
        base.to_str().unwrap(),
    ]);
    let levels = check_chain(dir.path(), &base, 2, 3, &write_directly);
    let base_file = common::sha256_file(&base);
    let (middle, top) = (&levels[1].0, &levels[2].0);
    let report = commit_json(top, &[]);
    assert_eq!(
        report["parent"].as_str().unwrap(),
        middle.canonicalize().unwrap().to_str().unwrap()
    );
    assert!(!top.exists());
    assert_reads(middle, &levels[2].1, "the middle after the merge");
    assert_eq!(common::sha256_file(&base), base_file, "the base changed");
}

#[test]
fn commit_of_the_top_of_a_vhdx_chain_merges_into_the_middle_only() {
    chain_of_three("vhdx");
}

#[test]
fn commit_of_the_top_of_a_vhd_chain_merges_into_the_middle_only() {
    chain_of_three("vhd");
}

/// Parents made by Windows 10 (VHDX) and by Disk2vhd (a VHD with every block allocated)
/// take in a child's data.
#[test]
fn corpus_images_take_in_their_childs_data() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    for name in [
        "discutils__btrfs__win10-15063.vhdx",
        "qemu-iotests__d2v-zerofilled__disk2vhd.vhd",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let parent = common::decompress_corpus_image(&corpus, name, dir.path());
        let child = dir.path().join(format!(
            "child.{}",
            parent.extension().unwrap().to_str().unwrap()
        ));
        let before = scribbled_child(&parent, &child, 9);
        commit_json(&child, &[]);
        assert_parent_reads(&parent, &before, name);
    }
}

/// What stands in a merge's way is refused, naming it, with both files left as they
/// were: a mounted child or parent (with the holder's pid), another child beside the
/// parent (unless --force), a child of the child (unless --keep-child).
fn refusals(extension: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (parent, child, view) = parent_and_child(dir.path(), extension, &["--size", "16M"]);
    let files = [&parent, &child].map(|p| common::sha256_file(p));
    let unchanged = |what: &str| {
        assert_eq!(
            [&parent, &child].map(|p| common::sha256_file(p)),
            files,
            "{what}"
        );
    };
    let commit = |extra: &[&str]| {
        let mut args = vec!["commit"];
        args.extend(extra);
        args.push(child.to_str().unwrap());
        vdisk_fails(&args)
    };
    if mount::fuse_available() {
        for mounted in [&child, &parent] {
            let vdisk = Mount::new(mounted, &["ro"]);
            let refused = commit(&[]);
            assert!(
                refused.contains("in use") && refused.contains(&vdisk.daemon_pid().to_string()),
                "{refused}"
            );
            vdisk.unmount();
            unchanged("mounted");
        }
    }
    let sibling = dir.path().join(format!("sibling.{extension}"));
    common::chain::child_of(&parent, &sibling);
    let refused = commit(&["--keep-child"]);
    assert!(
        refused.contains("sibling.") && refused.contains("--force"),
        "{refused}"
    );
    unchanged("a sibling");
    std::fs::remove_file(&sibling).unwrap();

    let grandchild = dir.path().join(format!("grandchild.{extension}"));
    common::chain::child_of(&child, &grandchild);
    let refused = commit(&[]);
    assert!(
        refused.contains("grandchild.") && refused.contains("--keep-child"),
        "{refused}"
    );
    unchanged("a grandchild");
    commit_json(&child, &["--keep-child"]);
    assert_reads(&grandchild, &view, "the grandchild after the merge");
}

#[test]
fn commit_refuses_what_would_harm_other_users_of_a_vhdx_chain() {
    refusals("vhdx");
}

#[test]
fn commit_refuses_what_would_harm_other_users_of_a_vhd_chain() {
    refusals("vhd");
}

/// `vdisk commit` killed at random instants: the child, while it is there, reads as
/// before; every sector of the parent reads as before or after; and running it again
/// finishes the merge, to a parent vhdimount and qemu read as the child did.
fn kill_torture(extension: &str, keep_child: bool) {
    let dir = tempfile::tempdir().unwrap();
    // Made where they are merged, so the child's stored paths lead nowhere else; each
    // run starts from copies under other names.
    let (work, pristine) = (dir.path().join("work"), dir.path().join("pristine"));
    std::fs::create_dir(&work).unwrap();
    std::fs::create_dir(&pristine).unwrap();
    let (work_parent, work_child, after) =
        parent_and_child(&work, extension, &["--size", "64M", "--block-size", "1M"]);
    let before = read_all(open(&work_parent, true).as_ref());
    let (parent, child) = (pristine.join("parent"), pristine.join("child"));
    common::copy_sparse(&work_parent, &parent);
    common::copy_sparse(&work_child, &child);
    let mut args = vec!["commit"];
    if keep_child {
        args.push("--keep-child");
    }
    args.push(work_child.to_str().unwrap());
    let mut prepare = || {
        for (from, to) in [(&parent, &work_parent), (&child, &work_child)] {
            let _ = std::fs::remove_file(to);
            common::copy_sparse(from, to);
        }
    };
    let mut check = |attempt: usize, _killed: bool| {
        let what = format!("{extension}: kill {attempt}");
        if work_child.exists() {
            let child_now = read_all(open(&work_child, true).as_ref());
            assert_same(&child_now, &after, &format!("{what}: the child"));
        }
        let parent_now = read_all(open(&work_parent, true).as_ref());
        let sectors = parent_now
            .chunks(512)
            .zip(before.chunks(512))
            .zip(after.chunks(512));
        for (i, ((now, before), after)) in sectors.enumerate() {
            assert!(
                now == before || now == after,
                "{what}: parent sector {i} reads neither as before nor as after"
            );
        }
        if attempt.is_multiple_of(4) {
            if work_child.exists() {
                vdisk_ok(&args);
            }
            assert_parent_reads(&work_parent, &after, &what);
            assert_eq!(work_child.exists(), keep_child, "{what}");
        }
    };
    kill_at_random(extension, &args, 20, 23, &mut prepare, &mut check);
}

#[test]
fn commit_killed_at_random_instants_leaves_vhdx_images_before_or_after() {
    kill_torture("vhdx", true);
}

#[test]
fn commit_killed_at_random_instants_leaves_vhd_images_before_or_after() {
    kill_torture("vhd", false);
}

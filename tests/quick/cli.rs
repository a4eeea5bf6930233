//! The `vdisk-mount` command line without mounting: help and version. The ways a mount
//! is refused are in the system tier's `cli` module.

use crate::common::vdisk::VDISK;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_vdisk-mount");

fn vdisk_mount(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

#[test]
fn help_and_version() {
    let out = vdisk_mount(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "IMAGE",
        "MOUNTPOINT",
        "--foreground",
        "format=",
        "size_calc=",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
    let out = vdisk_mount(&[]);
    assert!(!out.status.success(), "missing arguments accepted");
}

/// `git rev-parse --short HEAD` of the checkout the tests were built from, if it is one
/// and git is there.
fn head_commit() -> Option<String> {
    let checkout = env!("CARGO_MANIFEST_DIR");
    if !Path::new(checkout).join(".git").exists() {
        return None;
    }
    let out = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(checkout)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8(out.stdout).unwrap().trim().to_string())
}

#[test]
fn version_names_the_commit() {
    for (program, name) in [(BIN, "vdisk-mount"), (VDISK, "vdisk")] {
        let out = Command::new(program).arg("--version").output().unwrap();
        assert!(out.status.success());
        let line = String::from_utf8(out.stdout).unwrap();
        let commit = line
            .trim_end()
            .strip_prefix(&format!("{name} {} (commit ", env!("CARGO_PKG_VERSION")))
            .and_then(|rest| rest.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{name} --version: {line:?}"));
        // Whether the work tree had changes when it was built; the tree may have changed
        // since in files the build does not watch.
        let commit = commit.strip_suffix("-dirty").unwrap_or(commit);
        match head_commit() {
            Some(head) => assert_eq!(commit, head, "{name} --version: {line:?}"),
            None => assert_eq!(commit, "unknown", "{name} --version: {line:?}"),
        }
    }
}

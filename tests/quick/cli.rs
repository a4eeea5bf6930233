//! The `vdisk-mount` command line without mounting: help and version. The ways a mount
//! is refused are in the system tier's `cli` module.

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
    let out = vdisk_mount(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("vdisk-mount {}", env!("CARGO_PKG_VERSION"))
    );
    let out = vdisk_mount(&[]);
    assert!(!out.status.success(), "missing arguments accepted");
}

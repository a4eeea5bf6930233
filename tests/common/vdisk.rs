//! The `vdisk` command, run as a user would.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

pub const VDISK: &str = env!("CARGO_BIN_EXE_vdisk");

pub fn vdisk(args: &[&str]) -> Output {
    Command::new(VDISK).args(args).output().unwrap()
}

pub fn vdisk_ok(args: &[&str]) -> String {
    let out = vdisk(args);
    assert!(
        out.status.success(),
        "vdisk {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a `vdisk` command that must fail, and returns its one-line message.
pub fn vdisk_fails(args: &[&str]) -> String {
    let out = vdisk(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "vdisk {args:?} succeeded");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

pub fn info_json(path: &Path) -> Value {
    serde_json::from_str(&vdisk_ok(&["info", "--json", path.to_str().unwrap()])).unwrap()
}

/// `vdisk check --json` with `extra` arguments (`--repair`): its exit status and report.
pub fn check(path: &Path, extra: &[&str]) -> (i32, Value) {
    let out = Command::new(VDISK)
        .arg("check")
        .arg("--json")
        .args(extra)
        .arg(path)
        .output()
        .unwrap();
    let code = out.status.code().expect("vdisk check was not killed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        assert_eq!(
            code,
            1,
            "vdisk check {}: no report: {stderr}",
            path.display()
        );
        Value::Null
    });
    (code, report)
}

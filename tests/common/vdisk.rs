//! The `vdisk` command, run as a user would.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

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

/// `vdisk ARGS` killed at random instants. Times one whole run (after `prepare`), then
/// until `kills` runs were killed: `prepare`, start it, kill it after a random part of
/// that time, and hand `check` the attempt's number and whether the run was killed
/// before it finished. `what` names the case in the failure for too few kills.
pub fn kill_at_random(
    what: &str,
    args: &[&str],
    kills: usize,
    seed: u64,
    prepare: &mut dyn FnMut(),
    check: &mut dyn FnMut(usize, bool),
) {
    prepare();
    let started = Instant::now();
    vdisk_ok(args);
    let whole = started.elapsed();
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut killed, mut attempts) = (0, 0);
    while killed < kills {
        attempts += 1;
        assert!(
            attempts <= 200,
            "{what}: only {killed} of {attempts} runs were killed before they finished \
             (a whole run takes {whole:?})"
        );
        prepare();
        let mut child = Command::new(VDISK)
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(whole.mul_f64(rng.random_range(0.0..1.0)));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let was_killed = status.code().is_none();
        if was_killed {
            killed += 1;
        }
        check(attempts, was_killed);
    }
}

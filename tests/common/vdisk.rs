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

/// Copies `from` to `to` keeping its holes.
pub fn copy_sparse(from: &Path, to: &Path) {
    super::run(Command::new("cp").arg("--sparse=always").arg(from).arg(to));
}

/// Runs `vdisk ARGS` on fresh copies of `image` at `work`, killed at random instants,
/// until `kills` runs were killed before they finished; after each run `check(what,
/// attempt)` looks at the copy left behind. A first run, not killed, times a whole one.
pub fn kill_at_random_instants(
    image: &Path,
    work: &Path,
    args: &[&str],
    kills: u32,
    mut check: impl FnMut(&str, u32),
) {
    copy_sparse(image, work);
    let started = Instant::now();
    vdisk_ok(args);
    let whole = started.elapsed();
    let mut rng = StdRng::seed_from_u64(17);
    let (mut killed, mut attempts) = (0, 0);
    while killed < kills {
        attempts += 1;
        assert!(
            attempts <= 200,
            "vdisk {args:?}: only {killed} of {attempts} runs were killed before they \
             finished (a whole run takes {whole:?})"
        );
        std::fs::remove_file(work).unwrap();
        copy_sparse(image, work);
        let mut child = Command::new(VDISK)
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(whole.mul_f64(rng.random_range(0.0..1.0)));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if status.code().is_none() {
            killed += 1;
        }
        check(&format!("kill {attempts} ({status})"), attempts);
    }
}

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

/// Runs `vdisk ARGS... WORK` and kills it at random instants, until `kills` runs were
/// killed before they finished. Before every run `prepare(WORK)` lays out a fresh image
/// there; after every run, killed or not, `judge(WORK, attempt, what)` checks what it
/// left (`attempt` counts runs from 1, `what` names the run in messages). The instants are
/// spread over how long one whole run takes, measured first; fails if 200 runs were too
/// few.
pub fn kill_at_random_instants(
    args: &[&str],
    work: &Path,
    kills: usize,
    seed: u64,
    mut prepare: impl FnMut(&Path),
    mut judge: impl FnMut(&Path, usize, &str),
) {
    use rand::{RngExt, SeedableRng};
    let mut command = Command::new(VDISK);
    command
        .args(args)
        .arg(work)
        .stdout(std::process::Stdio::null());
    prepare(work);
    let started = std::time::Instant::now();
    let whole = command.status().unwrap();
    let whole_run = started.elapsed();
    assert!(
        whole.code().is_some_and(|code| code != 1),
        "vdisk {args:?}: {whole}"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut killed, mut attempts) = (0, 0);
    while killed < kills {
        attempts += 1;
        assert!(
            attempts <= 200,
            "vdisk {args:?}: only {killed} of {attempts} runs were killed before they \
             finished (a whole run takes {whole_run:?})"
        );
        prepare(work);
        let mut child = command.spawn().unwrap();
        std::thread::sleep(whole_run.mul_f64(rng.random_range(0.0..1.0)));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if status.code().is_none() {
            killed += 1;
        }
        judge(work, attempts, &format!("kill {attempts} ({status})"));
    }
}

//! Every fuzz target builds and runs for a short while without a finding, so a change that
//! breaks a target or its harness is caught here rather than when someone next fuzzes for
//! hours. `scripts/fuzz.sh` does the work; FUZZING.md has the long runs.

use std::process::Command;

/// Seconds each target runs here.
const SECONDS: &str = "10";

#[test]
fn every_fuzz_target_runs_without_a_finding() {
    let _alone = crate::alone();
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !nightly {
        assert!(
            std::env::var_os("CI").is_none(),
            "the nightly toolchain cargo-fuzz needs is missing; CI must run the fuzz targets"
        );
        eprintln!("SKIPPED: no nightly Rust toolchain, which cargo-fuzz needs");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fuzz.sh");
    let output = Command::new(script).arg(SECONDS).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "fuzz.sh failed\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("6 targets ran 10 s each without a finding"),
        "{stdout}"
    );
    // libFuzzer's own count proves each target executed inputs.
    assert_eq!(
        stdout.matches("stat::number_of_executed_units:").count(),
        6,
        "{stdout}"
    );
}

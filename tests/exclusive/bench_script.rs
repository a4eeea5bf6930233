//! `bench/run.sh --quick` runs end to end against every target and fills every row of its
//! report with numbers. The figures themselves are not judged here: they depend on the
//! machine (BENCHMARKS.md discusses them).

use crate::common;
use crate::common::mount;
use std::path::Path;
use std::process::{Command, Stdio};

const JOBS: [&str; 8] = [
    "seq-read-1M-qd1",
    "seq-read-1M-qd16",
    "seq-write-1M-qd1",
    "seq-write-1M-qd16",
    "rand-read-4K-qd1",
    "rand-read-4K-qd16",
    "rand-write-4K-qd1",
    "rand-write-4K-qd16",
];

/// Whether the tools the script drives are installed. Outside CI a missing one skips the
/// test (saying which); under `CI` it fails it.
fn tools_available() -> bool {
    let missing: Vec<&str> = [
        "fio",
        "qemu-storage-daemon",
        "vhdimount",
        "qemu-io",
        "mkfs.ext4",
        "fstrim",
    ]
    .into_iter()
    .filter(|tool| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the benchmark needs {missing:?}; CI must run it"
    );
    eprintln!("SKIPPED: the benchmark needs {missing:?}");
    false
}

/// The cells of every table row whose first cell is `first`, in order of appearance.
fn rows<'a>(report: &'a str, first: &str) -> Vec<Vec<&'a str>> {
    report
        .lines()
        .filter_map(|line| line.strip_prefix('|')?.strip_suffix('|'))
        .map(|line| line.split('|').map(str::trim).collect::<Vec<_>>())
        .filter(|cells| cells[0] == first)
        .collect()
}

fn is_number(cell: &str) -> bool {
    cell.parse::<f64>().is_ok_and(|v| v.is_finite() && v >= 0.0)
}

/// A ratio cell: a number, or a number marked as missing its goal ("**0.85** (goal 0.90)").
fn is_ratio(cell: &str) -> bool {
    match cell
        .strip_prefix("**")
        .and_then(|c| c.split_once("** (goal "))
    {
        Some((ratio, goal)) => is_number(ratio) && goal.strip_suffix(')').is_some_and(is_number),
        None => is_number(cell),
    }
}

/// The spread of repeated runs: "least–greatest".
fn is_range(cell: &str) -> bool {
    cell.split_once('–').is_some_and(|(lo, hi)| {
        is_number(lo) && is_number(hi) && lo.parse::<f64>().unwrap() <= hi.parse::<f64>().unwrap()
    })
}

fn assert_numbers(row: &[&str], check: fn(&str) -> bool, what: &str) {
    assert!(
        row.iter().all(|c| check(c)),
        "{what} row {row:?} has a cell that is not a number"
    );
}

#[test]
fn quick_benchmark_fills_every_row() {
    let _alone = crate::alone();
    if !mount::loop_available() || !tools_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("BENCHMARKS.md");
    // Text outside the markers survives a run.
    std::fs::write(
        &output,
        "# Notes kept\n<!-- bench:begin (written by bench/run.sh; edit outside these markers) -->\nold\n<!-- bench:end -->\nafter\n",
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/run.sh");
    common::run(
        Command::new("bash")
            .arg(&script)
            .arg("--quick")
            .arg("--output")
            .arg(&output)
            .arg("--workdir")
            .arg(dir.path().join("work"))
            .env("VDISK_MOUNT", mount::BIN),
    );
    let report = std::fs::read_to_string(&output).unwrap();
    assert!(
        report.starts_with("# Notes kept\n") && report.ends_with("<!-- bench:end -->\nafter\n")
    );
    assert!(
        !report.contains("\nold\n"),
        "the previous results were kept"
    );

    for job in JOBS {
        let found = rows(&report, job);
        // Two tables of figures (on the file, through a loop device), each followed by
        // its ratios for the three images.
        assert_eq!(found.len(), 2 * (1 + 3), "rows for {job}:\n{report}");
        for (table, row) in found.iter().enumerate() {
            if table % 4 == 0 {
                let unit = if job.starts_with("seq") {
                    "MiB/s"
                } else {
                    "IOPS"
                };
                assert_eq!(row[1], unit, "{job}");
                let figures = &row[2..];
                // Reads also run on vhdimount (direct table only); writes show "-" there.
                let expected = if table == 0 { 9 } else { 8 };
                assert_eq!(figures.len(), expected, "{job}: {row:?}");
                let measured = if table == 0 && job.contains("write") {
                    assert_eq!(figures[8], "-");
                    &figures[..8]
                } else {
                    figures
                };
                assert_numbers(measured, is_number, job);
            } else {
                assert_eq!(row.len(), 5, "{job}: {row:?}");
                assert_numbers(&row[2..], is_ratio, job);
            }
        }
    }
    for image in ["VHDX", "VHD"] {
        let found = rows(&report, image);
        assert_eq!(found.len(), 1, "allocating-write rows for {image}");
        assert_numbers(&found[0][1..4], is_number, image);
        assert_numbers(&found[0][4..], is_ratio, image);
    }
    // fstrim through the mount and on a raw sparse file: median seconds, min–max, the ratio
    // to the raw file (none on its own row), host space given back.
    for target in ["vdisk-mount VHDX", "vdisk-mount VHD", "raw sparse file"] {
        let found = rows(&report, target);
        assert_eq!(found.len(), 1, "fstrim row for {target}");
        let row = &found[0];
        assert_eq!(row.len(), 5, "{target}: {row:?}");
        assert!(
            is_number(row[1]) && is_range(row[2]) && is_number(row[4]),
            "{target}: {row:?}"
        );
        if target.starts_with("raw") {
            assert_eq!(row[3], "-", "{target}: {row:?}");
        } else {
            assert!(is_ratio(row[3]), "{target}: {row:?}");
        }
    }
    // vdisk compact against qemu-img convert: median seconds and min–max of each, their
    // ratio, compact's MiB/s moved and its min–max, MiB moved, file sizes after.
    for image in ["VHDX 32 MiB blocks", "VHD 2 MiB blocks"] {
        let found = rows(&report, image);
        assert_eq!(found.len(), 1, "compact row for {image}");
        let row = &found[0];
        assert_eq!(row.len(), 11, "{image}: {row:?}");
        for (i, cell) in row.iter().enumerate().skip(1) {
            let ok = match i {
                2 | 4 | 7 => is_range(cell),
                5 => is_ratio(cell),
                _ => is_number(cell),
            };
            assert!(ok, "{image}: cell {i} of {row:?}");
        }
    }
    for daemon in [
        "FUSE raw",
        "VHDX dynamic",
        "VHDX fixed",
        "VHD dynamic",
        "10 TiB VHDX",
        "qsd VHDX dynamic",
        "qsd VHDX fixed",
        "qsd VHD dynamic",
        "qsd 10 TiB VHDX",
        "vhdimount VHDX dynamic",
    ] {
        let found = rows(&report, daemon);
        assert_eq!(found.len(), 1, "memory row for {daemon}");
        assert_numbers(&found[0][1..3], is_number, daemon);
    }
    let startup = report
        .lines()
        .find(|l| l.starts_with("Time from starting the daemon"))
        .expect("start-up line");
    let (_, figures) = startup.split_once("): ").expect("start-up figures");
    let seconds: Vec<&str> = figures
        .split(' ')
        .filter(|w| is_number(w.trim_end_matches(',')))
        .collect();
    assert_eq!(seconds.len(), 2, "start-up times in {startup:?}");
}

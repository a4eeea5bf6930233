//! `bench/run.sh --quick` runs end to end against every target and fills every row of its
//! report with figures: medians with their spread, ratios with the range the spreads allow,
//! and in the io_uring columns either figures or, everywhere alike, why there are none.
//! The figures themselves are not judged here: they depend on the machine (BENCHMARKS.md
//! discusses them).

use crate::common;
use crate::common::mount;
use std::path::Path;
use std::process::Command;

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

/// The images of the fio tables, in the order of their rows for each job.
const IMAGES: [&str; 4] = ["raw", "VHDX dynamic", "VHDX fixed", "VHD dynamic"];

/// Whether the tools the script drives are installed (see [`common::tools_installed`]).
fn tools_available() -> bool {
    common::tools_installed(
        "the benchmark tests",
        &[
            "fio",
            "qemu-storage-daemon",
            "vhdimount",
            "qemu-io",
            "mkfs.ext4",
            "fstrim",
            "nbdkit",
            "qemu-nbd",
        ],
    )
}

/// The cells of a table row, if `line` is one.
fn cells(line: &str) -> Option<Vec<&str>> {
    let inner = line.strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(str::trim).collect())
}

/// The cells of every table row whose first cell is `first`, in order of appearance.
fn rows<'a>(report: &'a str, first: &str) -> Vec<Vec<&'a str>> {
    report
        .lines()
        .filter_map(cells)
        .filter(|cells| cells[0] == first)
        .collect()
}

/// The tables of the section whose heading starts with `heading`, each as its rows below
/// the header and its separator.
fn tables<'a>(report: &'a str, heading: &str) -> Vec<Vec<Vec<&'a str>>> {
    let mut lines = report
        .lines()
        .skip_while(|l| {
            !l.strip_prefix("### ")
                .is_some_and(|h| h.starts_with(heading))
        })
        .skip(1)
        .take_while(|l| !l.starts_with("### "));
    let mut found = Vec::new();
    loop {
        let table: Vec<Vec<&str>> = lines
            .by_ref()
            .skip_while(|l| !l.starts_with('|'))
            .map_while(cells)
            .collect();
        if table.is_empty() {
            break;
        }
        found.push(table[2..].to_vec());
    }
    assert!(!found.is_empty(), "no table under {heading:?}");
    found
}

fn number(cell: &str) -> Option<f64> {
    cell.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
}

fn is_number(cell: &str) -> bool {
    number(cell).is_some()
}

/// The spread of repeated runs: "least–greatest".
fn range(cell: &str) -> Option<(f64, f64)> {
    let (lo, hi) = cell.split_once('–')?;
    let (lo, hi) = (number(lo)?, number(hi)?);
    (lo <= hi).then_some((lo, hi))
}

fn is_range(cell: &str) -> bool {
    range(cell).is_some()
}

/// Repeated figures: "median (least–greatest)", the median inside the range.
fn is_figure(cell: &str) -> bool {
    cell.strip_suffix(')')
        .and_then(|c| c.split_once(" ("))
        .is_some_and(|(median, spread)| {
            number(median)
                .zip(range(spread))
                .is_some_and(|(m, (lo, hi))| lo <= m && m <= hi)
        })
}

/// A ratio of repeated figures: "0.85 (0.80–0.90)", or marked as missing its goal, which
/// the whole range misses: "**0.70** (0.60–0.80; goal ≥ 0.90)".
fn is_ratio(cell: &str) -> bool {
    if let Some(marked) = cell.strip_prefix("**") {
        let Some((ratio, rest)) = marked.split_once("** (") else {
            return false;
        };
        let Some((spread, goal)) = rest.strip_suffix(')').and_then(|r| r.split_once("; goal "))
        else {
            return false;
        };
        let goal_ok = match (goal.split_once(' '), range(spread)) {
            (Some(("≥", g)), Some((_, hi))) => number(g).is_some_and(|g| hi < g + 0.005),
            (Some(("≤", g)), Some((lo, _))) => number(g).is_some_and(|g| lo > g - 0.005),
            _ => false,
        };
        return goal_ok && is_figure(&format!("{ratio} ({spread})"));
    }
    is_figure(cell)
}

fn assert_cells(row: &[&str], check: fn(&str) -> bool, what: &str) {
    assert!(
        row.iter().all(|c| check(c)),
        "{what} row {row:?} has a cell of the wrong form"
    );
}

/// The io_uring cells of a report: all figures (or ratios), or all the same "n/a (why)".
struct Uring<'a> {
    not_measured: Option<&'a str>,
}

impl Uring<'_> {
    fn check(&self, cell: &str, measured: fn(&str) -> bool, what: &str) {
        match self.not_measured {
            Some(why) => assert_eq!(cell, why, "{what}"),
            None => assert!(measured(cell), "{what}: {cell:?}"),
        }
    }
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
            .env("VDISK_MOUNT", mount::BIN)
            .env("VDISK_NBDKIT_PLUGIN", common::nbd::plugin()),
    );
    let report = std::fs::read_to_string(&output).unwrap();
    assert!(
        report.starts_with("# Notes kept\n") && report.ends_with("<!-- bench:end -->\nafter\n")
    );
    assert!(
        !report.contains("\nold\n"),
        "the previous results were kept"
    );
    let run = report
        .lines()
        .find(|l| l.starts_with("Run: "))
        .expect("run line");
    assert!(run.contains("median of 3 runs taken by turns"), "{run}");
    let fio_runs = run
        .split_once(" fio job runs")
        .and_then(|(before, _)| before.rsplit(' ').next())
        .and_then(number);
    assert!(fio_runs.is_some_and(|n| n > 0.0), "{run}");
    assert!(
        report.lines().any(|l| l.starts_with("Time spent: images ")),
        "no time budget in\n{report}"
    );

    // The first io_uring cell says whether that transport was measured; all others agree.
    let direct = tables(&report, "fio on the disk file");
    let first = direct[0][0][5];
    let uring = Uring {
        not_measured: first.starts_with("n/a (").then_some(first),
    };
    assert_eq!(
        run.contains("FUSE transports: /dev/fuse and io_uring."),
        uring.not_measured.is_none(),
        "{run}"
    );

    for (heading, path) in [
        ("fio on the disk file", "direct"),
        ("fio on a loop device", "loop"),
    ] {
        let found = tables(&report, heading);
        assert_eq!(found.len(), 2, "figures and ratios under {heading:?}");
        let (figures, ratios) = (&found[0], &found[1]);
        assert_eq!(figures.len(), JOBS.len() * IMAGES.len(), "{path} figures");
        assert_eq!(ratios.len(), JOBS.len() * IMAGES.len(), "{path} ratios");
        for (i, (row, ratio_row)) in figures.iter().zip(ratios).enumerate() {
            let (job, image) = (JOBS[i / IMAGES.len()], IMAGES[i % IMAGES.len()]);
            let what = format!("{path} {job} {image}");
            assert_eq!(row.len(), 8, "{what}: {row:?}");
            assert_eq!(
                &row[..3],
                &[
                    job,
                    if job.starts_with("seq") {
                        "MiB/s"
                    } else {
                        "IOPS"
                    },
                    image
                ]
            );
            uring.check(row[5], is_figure, &what);
            let (file, qsd) = if image == "raw" {
                (is_figure(row[3]), row[6] == "-")
            } else {
                (row[3] == "-", is_figure(row[6]))
            };
            assert!(file && qsd && is_figure(row[4]), "{what}: {row:?}");
            // vhdimount reads, and only the file itself.
            if image == "VHDX dynamic" && path == "direct" && job.contains("read") {
                assert!(is_figure(row[7]), "{what}: {row:?}");
            } else {
                assert_eq!(row[7], "-", "{what}: {row:?}");
            }

            assert_eq!(ratio_row.len(), 8, "{what}: {ratio_row:?}");
            assert_eq!(&ratio_row[..2], &[job, image]);
            if image == "raw" {
                assert_eq!(&ratio_row[2..4], &["-", "-"], "{what}");
                assert_eq!(ratio_row[6], "-", "{what}");
                assert!(is_ratio(ratio_row[4]), "{what}: {ratio_row:?}");
                uring.check(ratio_row[5], is_ratio, &what);
                uring.check(ratio_row[7], is_ratio, &what);
            } else {
                assert_cells(&ratio_row[2..5], is_ratio, &what);
                for cell in &ratio_row[5..] {
                    uring.check(cell, is_ratio, &what);
                }
            }
        }
    }

    let alloc = &tables(&report, "Allocating sequential write")[0];
    assert_eq!(alloc.len(), 2, "allocating-write rows");
    for (row, image) in alloc.iter().zip(["VHDX", "VHD"]) {
        assert_eq!(row.len(), 7, "{image}: {row:?}");
        assert_eq!(row[0], image);
        assert!(
            is_figure(row[1]) && is_figure(row[3]) && is_figure(row[4]) && is_ratio(row[5]),
            "{image}: {row:?}"
        );
        uring.check(row[2], is_figure, image);
        uring.check(row[6], is_ratio, image);
    }

    // Per image: the four writers alone, beside the fsync writer, the fsync writer, then
    // the ratio of the writers beside it to alone.
    let mixed = &tables(&report, "Mixed workload")[0];
    assert_eq!(mixed.len(), 2 * 4, "mixed-workload rows");
    for (i, row) in mixed.iter().enumerate() {
        let image = if i < 4 { "VHDX" } else { "VHD" };
        let what = format!("mixed workload {image}: {row:?}");
        assert_eq!(row.len(), 7, "{what}");
        assert_eq!(row[1], image, "{what}");
        if i % 4 == 3 {
            assert_eq!(row[0], "4 writers beside ÷ alone");
            assert!(is_ratio(row[2]) && is_ratio(row[4]), "{what}");
            uring.check(row[3], is_ratio, &what);
            assert_eq!(&row[5..], &["-", "-"], "{what}");
        } else {
            assert!(
                is_figure(row[2]) && is_figure(row[4]) && is_ratio(row[5]),
                "{what}"
            );
            uring.check(row[3], is_figure, &what);
            uring.check(row[6], is_ratio, &what);
        }
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
    // vdisk convert against qemu-img convert: median seconds and min–max of each, the ratio.
    for pair in ["VHDX → VHD", "VHD → VHDX", "VHDX → RAW"] {
        let found = rows(&report, pair);
        assert_eq!(found.len(), 1, "convert row for {pair}");
        let row = &found[0];
        assert_eq!(row.len(), 6, "{pair}: {row:?}");
        assert!(
            is_number(row[1])
                && is_range(row[2])
                && is_number(row[3])
                && is_range(row[4])
                && is_ratio(row[5]),
            "{pair}: {row:?}"
        );
    }
    for daemon in [
        "FUSE raw",
        "FUSE raw io_uring",
        "VHDX dynamic",
        "VHDX dynamic io_uring",
        "VHDX fixed",
        "VHDX fixed io_uring",
        "VHD dynamic",
        "VHD dynamic io_uring",
        "10 TiB VHDX",
        "qsd VHDX dynamic",
        "qsd VHDX fixed",
        "qsd VHD dynamic",
        "qsd 10 TiB VHDX",
        "vhdimount VHDX dynamic",
    ] {
        let found = rows(&report, daemon);
        assert_eq!(found.len(), 1, "memory row for {daemon}");
        let row = &found[0];
        assert!(is_number(row[2]), "{daemon}: {row:?}");
        if daemon.ends_with("io_uring") {
            uring.check(row[1], is_number, daemon);
        } else {
            assert!(is_number(row[1]), "{daemon}: {row:?}");
        }
    }
    // The plugin and qemu-nbd side by side: each job on each image, and their ratio.
    let nbd = &tables(&report, "fio over NBD")[0];
    assert_eq!(nbd.len(), JOBS.len() * 2, "NBD rows");
    for (i, row) in nbd.iter().enumerate() {
        let (job, image) = (JOBS[i / 2], ["VHDX dynamic", "VHD dynamic"][i % 2]);
        assert_eq!(row.len(), 6, "NBD {job} {image}: {row:?}");
        assert_eq!((row[0], row[2]), (job, image), "NBD {row:?}");
        assert!(
            is_figure(row[3]) && is_figure(row[4]) && is_ratio(row[5]),
            "NBD {job} {image}: {row:?}"
        );
    }
    let startup = report
        .lines()
        .find(|l| l.starts_with("Time from starting the daemon"))
        .expect("start-up line");
    let (_, figures) = startup.split_once("): ").expect("start-up figures");
    // "vdisk-mount 0.050 (0.045–0.060) s, qemu-storage-daemon 0.054 (0.050–0.061) s."
    let seconds = figures
        .split(" s")
        .filter_map(|part| part.trim_start_matches(", ").split_once(' '))
        .filter(|(_, figure)| is_figure(figure))
        .count();
    assert_eq!(seconds, 2, "start-up times in {startup:?}");
}

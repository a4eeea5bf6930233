//! A process killed while it writes to the image must leave each sector of the file with its
//! old or its new content, never a mix: the daemon's crash safety rests on that. Linux cuts a
//! killed write where a source page was not mapped yet, which for a fresh buffer is any byte
//! (see the `storage` module). This test kills a child in the middle of large writes from
//! never-touched buffers, at random instants within the time such a write takes on this
//! machine as loaded at the moment, and checks where each write stopped.
//!
//! The child is this test binary run again with `TEAR_CHILD` set.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::io::{BufRead, BufReader, Lines, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;
use vdisk_mount::storage::{FileStorage, Storage, write_zeros};

const WRITE_LEN: usize = 8 << 20;
/// Not a page boundary, so sector boundaries of the file and page boundaries of an
/// arbitrary buffer differ.
const FILE_OFFSET: u64 = 512 * 3;
const OLD: u8 = 0xAA;
const NEW: u8 = 0x00;
/// Uncut writes timed per source; the median resists a run slowed by other work.
const TIMED_WRITES: usize = 5;
/// Cut writes wanted per source: each one is a check at a different place.
const WANTED_CUTS: usize = 50;
/// Kills per source at most, so a machine where kills cannot land inside writes fails
/// instead of running forever.
const MAX_KILLS: usize = 600;
/// Kills between timings, so a timing taken while other work briefly slowed or sped up
/// the machine aims only a few of them.
const KILLS_PER_TIMING: usize = 100;

/// The two ways drivers write: zeros from the shared zero pages, and data from a buffer of
/// their own, here a fresh allocation that starts 16 bytes into a page.
#[derive(Clone, Copy, Debug)]
enum Source {
    Zeros,
    FreshBuffer,
}

/// Now on the clock both processes share, in nanoseconds.
fn monotonic() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) },
        0
    );
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Writes once told to go, then says when the write began and ended. The signal comes
/// from the parent, whose clock so starts while it runs: had the parent started timing on
/// reading "ready", a pipe wakeup may queue it behind the writing child and the kill would
/// land long after the time it meant.
fn child(path: &Path, source: Source) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let storage = FileStorage::new(file);
    let fresh = vec![NEW; WRITE_LEN + 16];
    let buffer = &fresh[16..];
    println!("ready");
    std::io::stdout().flush().unwrap();
    std::io::stdin().read_line(&mut String::new()).unwrap();
    let began = monotonic();
    match source {
        Source::Zeros => write_zeros(&storage, FILE_OFFSET, WRITE_LEN as u64).unwrap(),
        Source::FreshBuffer => storage.write_at(buffer, FILE_OFFSET).unwrap(),
    }
    let ended = monotonic();
    println!("wrote {began} {ended}");
}

/// The test's name as the test harness knows it, which the child is run with: its path in
/// the test binary, as `module_path!` gives it after the binary's own name.
fn test_name() -> String {
    let module = module_path!()
        .split_once("::")
        .map(|(_, m)| format!("{m}::"));
    format!(
        "{}killed_writes_stop_on_sector_boundaries",
        module.unwrap_or_default()
    )
}

/// A child about to write over a file of old content.
struct Writer {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Writer {
    fn start(path: &Path, source: Source) -> Writer {
        std::fs::write(path, old_file()).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &test_name(), "--nocapture"])
            .args(["--test-threads", "1"])
            .env("TEAR_CHILD", format!("{source:?}"))
            .env("TEAR_PATH", path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // The test harness may print its own words ahead of the child's on the same line.
        while !lines
            .next()
            .expect("the child exited before writing")
            .unwrap()
            .ends_with("ready")
        {}
        Writer { child, lines }
    }

    /// Tells the child to write; returns when, on the [`monotonic`] clock.
    fn go(&mut self) -> u64 {
        let at = monotonic();
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
        at
    }

    /// When the write began and ended, in nanoseconds after the signal to go.
    fn uncut(mut self) -> (u64, u64) {
        let go = self.go();
        let line = self
            .lines
            .next()
            .expect("the child exited before it wrote")
            .unwrap();
        let times: Vec<u64> = line
            .strip_prefix("wrote ")
            .unwrap_or_else(|| panic!("the child said {line:?}"))
            .split(' ')
            .map(|t| t.parse::<u64>().unwrap() - go)
            .collect();
        assert!(self.child.wait().unwrap().success());
        (times[0], times[1])
    }

    fn kill_after(mut self, delay: u64) {
        let go = self.go();
        let elapsed = monotonic() - go;
        std::thread::sleep(Duration::from_nanos(delay.saturating_sub(elapsed)));
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

fn old_file() -> Vec<u8> {
    vec![OLD; WRITE_LEN + 2 * FILE_OFFSET as usize]
}

/// How many bytes of the write reached the file, after checking that it stopped at one
/// place and on a sector boundary.
fn written(path: &Path, source: Source, attempt: &str) -> usize {
    let mut now = old_file();
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut now, 0)
        .unwrap();
    let region = &now[FILE_OFFSET as usize..FILE_OFFSET as usize + WRITE_LEN];
    let written = region.iter().take_while(|&&b| b == NEW).count();
    assert!(
        region[written..].iter().all(|&b| b == OLD),
        "{source:?} {attempt}: the write did not stop at one place"
    );
    assert_eq!(
        written % 512,
        0,
        "{source:?} {attempt}: the write stopped {written} bytes in, inside a sector"
    );
    written
}

/// When writes from `source` begin and end on this machine as loaded now, in nanoseconds
/// after the signal to go: the medians over a few uncut writes.
fn write_window(path: &Path, source: Source) -> (u64, u64) {
    let (mut began, mut ended): (Vec<u64>, Vec<u64>) = (0..TIMED_WRITES)
        .map(|run| {
            let times = Writer::start(path, source).uncut();
            assert_eq!(
                written(path, source, &format!("uncut run {run}")),
                WRITE_LEN
            );
            times
        })
        .unzip();
    began.sort();
    ended.sort();
    (began[TIMED_WRITES / 2], ended[TIMED_WRITES / 2])
}

/// Kills children writing from `source` until enough writes were cut short or the kills
/// run out; returns how many writes were cut short.
fn cut_writes(dir: &Path, source: Source, rng: &mut StdRng) -> usize {
    let path = dir.join(format!("{source:?}.img"));
    let (mut before, mut cut, mut after) = (0, 0, 0);
    let mut kills = 0;
    let mut windows = Vec::new();
    while cut < WANTED_CUTS && kills < MAX_KILLS {
        let (began, ended) = write_window(&path, source);
        windows.push(Duration::from_nanos(began)..Duration::from_nanos(ended));
        // A little past both ends of the write: timing varies from run to run, and kills
        // that land outside it cost only time.
        let slack = (ended - began) / 4;
        let kill_times = began.saturating_sub(slack)..ended + slack;
        let round_end = (kills + KILLS_PER_TIMING).min(MAX_KILLS);
        while cut < WANTED_CUTS && kills < round_end {
            Writer::start(&path, source).kill_after(rng.random_range(kill_times.clone()));
            match written(&path, source, &format!("kill {kills}")) {
                0 => before += 1,
                WRITE_LEN => after += 1,
                _ => cut += 1,
            }
            kills += 1;
        }
    }
    eprintln!(
        "{source:?}: {cut} of {kills} kills cut the write short, {before} landed before it, \
         {after} after it; it ran {windows:.1?} after the signal"
    );
    cut
}

#[test]
fn killed_writes_stop_on_sector_boundaries() {
    let _alone = crate::alone();
    if let Some(source) = std::env::var_os("TEAR_CHILD") {
        let source = match source.to_str() {
            Some("Zeros") => Source::Zeros,
            _ => Source::FreshBuffer,
        };
        child(Path::new(&std::env::var_os("TEAR_PATH").unwrap()), source);
        return;
    }
    let seed = rand::random();
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    for source in [Source::Zeros, Source::FreshBuffer] {
        let cut = cut_writes(dir.path(), source, &mut rng);
        // Kills that all land before or after the write would prove nothing.
        assert!(
            cut >= WANTED_CUTS,
            "{source:?}: only {cut} writes were cut short"
        );
    }
}

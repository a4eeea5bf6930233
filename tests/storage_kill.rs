//! A process killed while it writes to the image must leave each sector of the file with its
//! old or its new content, never a mix: the daemon's crash safety rests on that. Linux cuts a
//! killed write where a source page was not mapped yet, which for a fresh buffer is any byte
//! (see the `storage` module). This test kills a child in the middle of large writes from
//! never-touched buffers, at random instants, and checks where each write stopped.
//!
//! The child is this test binary run again with `TEAR_CHILD` set.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use vdisk_mount::storage::{FileStorage, Storage, write_zeros};

const WRITE_LEN: usize = 8 << 20;
/// Not a page boundary, so sector boundaries of the file and page boundaries of an
/// arbitrary buffer differ.
const FILE_OFFSET: u64 = 512 * 3;
const OLD: u8 = 0xAA;
const NEW: u8 = 0x00;
const KILLS: usize = 150;

/// The two ways drivers write: zeros from the shared zero pages, and data from a buffer of
/// their own, here a fresh allocation that starts 16 bytes into a page.
#[derive(Clone, Copy, Debug)]
enum Source {
    Zeros,
    FreshBuffer,
}

fn child(path: &Path, source: Source) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let storage = FileStorage::new(file);
    let fresh = vec![NEW; WRITE_LEN + 16];
    let buffer = &fresh[16..];
    println!("ready");
    std::io::stdout().flush().unwrap();
    match source {
        Source::Zeros => write_zeros(&storage, FILE_OFFSET, WRITE_LEN as u64).unwrap(),
        Source::FreshBuffer => storage.write_at(buffer, FILE_OFFSET).unwrap(),
    }
    println!("done");
}

/// Kills a child writing from `source` many times; returns how many writes were cut short.
fn cut_writes(dir: &Path, source: Source, rng: &mut StdRng) -> usize {
    let path = dir.join(format!("{source:?}.img"));
    let old = vec![OLD; WRITE_LEN + 2 * FILE_OFFSET as usize];
    let mut cut = 0;
    for kill in 0..KILLS {
        std::fs::write(&path, &old).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "killed_writes_stop_on_sector_boundaries",
                "--nocapture",
            ])
            .args(["--test-threads", "1"])
            .env("TEAR_CHILD", format!("{source:?}"))
            .env("TEAR_PATH", &path)
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
        std::thread::sleep(Duration::from_micros(rng.random_range(0..1500)));
        child.kill().unwrap();
        child.wait().unwrap();

        let mut now = vec![0u8; old.len()];
        std::fs::File::open(&path)
            .unwrap()
            .read_exact_at(&mut now, 0)
            .unwrap();
        let region = &now[FILE_OFFSET as usize..FILE_OFFSET as usize + WRITE_LEN];
        let written = region.iter().take_while(|&&b| b == NEW).count();
        assert!(
            region[written..].iter().all(|&b| b == OLD),
            "{source:?} kill {kill}: the write did not stop at one place"
        );
        assert_eq!(
            written % 512,
            0,
            "{source:?} kill {kill}: the write stopped {written} bytes in, inside a sector"
        );
        if written != 0 && written != WRITE_LEN {
            cut += 1;
        }
    }
    cut
}

#[test]
fn killed_writes_stop_on_sector_boundaries() {
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
        eprintln!("{source:?}: {cut} of {KILLS} writes cut short");
        // Kills that all land before or after the write would prove nothing.
        assert!(
            cut >= KILLS / 10,
            "{source:?}: only {cut} writes were cut short"
        );
    }
}

//! A daemon killed outright (SIGKILL, as by the OOM killer) at a random instant of a
//! workload that allocates blocks, punches holes and fsyncs must leave an image that mounts
//! again (replaying its log), serves every write an fsync acknowledged, holds in every other
//! sector either its old or its new content, closes clean for `qemu-img check` and for
//! `vdisk check` (leaked space aside, which its repair gives back), and reads in qemu
//! exactly as it does through our mount.
//!
//! Each image lives through many kills in a row, so every kill lands on an image that
//! already went through crashes and replays. `VDISK_CRASH_ITERATIONS` sets how many kills
//! the VHDX test makes (default 30; the VHD test makes a third of that),
//! `VDISK_CRASH_SEED` replays the run a failure printed (timing aside) and
//! `VDISK_CRASH_KEEP` keeps the images, with a copy of each as the last kill left it.

use crate::common;
use crate::common::mount::{self, Mount};
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

/// Kills land anywhere from before the first write to well after the writer got going:
/// inside block allocation, log writes, BAT and header updates, or between requests.
const MAX_KILL_DELAY_MS: u64 = 300;

/// Writes stay below the mount's 1 MiB request limit, so the kernel never splits one at a
/// byte that is not a sector boundary and a torn write is torn only between sectors.
const MAX_WRITE: u64 = 512 * KIB;

/// One kind of image the workload runs on.
struct Layout {
    label: &'static str,
    qemu_format: &'static str,
    /// `qemu-img create -o` options.
    options: &'static str,
    size: u64,
    block: u64,
}

impl Layout {
    /// Creates the image and returns its virtual size as qemu rounds it.
    fn create(&self, path: &Path) -> u64 {
        common::qemu_img(&[
            "create",
            "-q",
            "-f",
            self.qemu_format,
            "-o",
            self.options,
            path.to_str().unwrap(),
            &self.size.to_string(),
        ]);
        common::qemu_virtual_size(&format!(
            "driver={},file.filename={}",
            self.qemu_format,
            path.display()
        ))
    }

    /// Whole-block discards free blocks that later writes allocate again, so a long run
    /// keeps allocating; the file grows each time. Past this size the run starts over on
    /// a fresh image, which keeps a 1000-kill soak within disk space.
    fn file_size_limit(&self) -> u64 {
        8 * self.size
    }
}

/// One change the writer makes to the disk.
#[derive(Clone, Debug)]
enum Change {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// FALLOC_FL_PUNCH_HOLE: the range reads as zeros afterwards.
    Punch {
        offset: u64,
        len: u64,
    },
}

impl Change {
    fn range(&self) -> (u64, u64) {
        match self {
            Change::Write { offset, data } => (*offset, *offset + data.len() as u64),
            Change::Punch { offset, len } => (*offset, *offset + len),
        }
    }

    /// `disk` with this change applied over `[start, end)` of it.
    fn apply(&self, disk: &mut [u8]) {
        let (start, end) = self.range();
        let target = &mut disk[start as usize..end as usize];
        match self {
            Change::Write { data, .. } => target.copy_from_slice(data),
            Change::Punch { .. } => target.fill(0),
        }
    }
}

/// What the writer got done, as far as the main thread can know it at the kill.
#[derive(Default)]
struct Progress {
    /// Every change the writer started, in order; later ones may not have reached the disk.
    started: Mutex<Vec<Change>>,
    /// How many of `started` an fsync that returned success covered.
    acknowledged: AtomicUsize,
}

/// Random changes that never share a sector within one run of the writer, so after a
/// crash each sector has exactly one old and at most one new content.
struct Planner {
    rng: StdRng,
    size: u64,
    block: u64,
    taken: Vec<bool>,
}

impl Planner {
    fn new(seed: u64, size: u64, block: u64) -> Planner {
        Planner {
            rng: StdRng::seed_from_u64(seed),
            size,
            block,
            taken: vec![false; (size / SECTOR) as usize],
        }
    }

    /// The next change, or `None` once random picks keep colliding with earlier ones.
    fn next_change(&mut self) -> Option<Change> {
        for _ in 0..50 {
            let change = self.pick();
            let (start, end) = change.range();
            let sectors = (start / SECTOR) as usize..end.div_ceil(SECTOR) as usize;
            if self.taken[sectors.clone()].iter().all(|t| !t) {
                self.taken[sectors].fill(true);
                return Some(change);
            }
        }
        None
    }

    fn pick(&mut self) -> Change {
        let rng = &mut self.rng;
        let (offset, len) = match rng.random_range(0..10) {
            // Small and unaligned: read-modify-write of partial sectors.
            0..4 => (
                rng.random_range(0..self.size),
                rng.random_range(1..=8 * KIB),
            ),
            // Page-aligned, as filesystems write.
            4..7 => (
                rng.random_range(0..self.size / (4 * KIB)) * 4 * KIB,
                rng.random_range(1..=16) * 4 * KIB,
            ),
            // Large and unaligned, often across a block boundary.
            7..9 => (
                rng.random_range(0..self.size),
                rng.random_range(64 * KIB..=MAX_WRITE),
            ),
            // Punches: whole blocks (freeing them) or ragged ranges.
            _ if rng.random_bool(0.5) => {
                let blocks = self.size / self.block;
                let first = rng.random_range(0..blocks);
                let count = rng.random_range(1..=2).min(blocks - first);
                let punch = Change::Punch {
                    offset: first * self.block,
                    len: count * self.block,
                };
                return punch;
            }
            _ => {
                let len = rng.random_range(4 * KIB..=256 * KIB).min(self.size);
                let offset = rng.random_range(0..=self.size - len);
                return Change::Punch { offset, len };
            }
        };
        let len = len.min(self.size - offset);
        let mut data = vec![0u8; len as usize];
        rng.fill_bytes(&mut data);
        Change::Write { offset, data }
    }
}

/// Why the writer stopped.
#[derive(Debug)]
enum WriterEnd {
    /// It ran out of room for more non-overlapping changes before the kill.
    Exhausted,
    /// A request failed at the given instant; only the kill may cause that.
    Failed(std::io::Error, Instant),
}

/// Applies changes to the mounted disk, fsyncing after every few, until a request fails.
fn run_writer(disk: File, mut planner: Planner, progress: &Progress) -> WriterEnd {
    let mut since_fsync = 0;
    let mut fsync_every = 1;
    loop {
        let Some(change) = planner.next_change() else {
            return WriterEnd::Exhausted;
        };
        progress.started.lock().unwrap().push(change.clone());
        let result = match change {
            Change::Write { offset, data } => disk.write_all_at(&data, offset),
            Change::Punch { offset, len } => punch(&disk, offset, len),
        };
        if let Err(e) = result {
            return WriterEnd::Failed(e, Instant::now());
        }
        since_fsync += 1;
        if since_fsync == fsync_every {
            let covered = progress.started.lock().unwrap().len();
            if let Err(e) = disk.sync_all() {
                return WriterEnd::Failed(e, Instant::now());
            }
            progress.acknowledged.store(covered, Ordering::SeqCst);
            since_fsync = 0;
            fsync_every = planner.rng.random_range(1..=4);
        }
    }
}

fn punch(disk: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: a plain syscall on an open descriptor.
    let rc = unsafe { libc::fallocate(disk.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Checks what a remount reads (`actual`) against the disk before the writer ran
/// (`before`) and the changes it started, of which the first `acknowledged` were made
/// durable by an fsync. Returns the problems found, at most a few.
fn crash_problems(
    before: &[u8],
    actual: &[u8],
    started: &[Change],
    acknowledged: usize,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut after = before.to_vec();
    let mut acknowledged_sector = vec![false; before.len() / SECTOR as usize];
    for (i, change) in started.iter().enumerate() {
        change.apply(&mut after);
        if i < acknowledged {
            let (start, end) = change.range();
            acknowledged_sector[(start / SECTOR) as usize..end.div_ceil(SECTOR) as usize]
                .fill(true);
        }
    }
    let sectors = actual
        .chunks(SECTOR as usize)
        .zip(before.chunks(SECTOR as usize))
        .zip(after.chunks(SECTOR as usize));
    for (s, ((actual, old), new)) in sectors.enumerate() {
        let offset = s as u64 * SECTOR;
        let owner = || {
            started
                .iter()
                .position(|c| {
                    let (start, end) = c.range();
                    start < offset + SECTOR && offset < end
                })
                .map_or("no change".to_string(), |i| {
                    format!("change {i} {:?}", started[i].range())
                })
        };
        if actual == new && (actual == old || acknowledged_sector[s]) {
            continue;
        }
        if acknowledged_sector[s] {
            problems.push(format!(
                "sector at {offset:#x} lost the acknowledged {}",
                owner()
            ));
        } else if actual != old && actual != new {
            let matching = |other: &[u8]| actual.iter().zip(other).filter(|(a, b)| a == b).count();
            problems.push(format!(
                "sector at {offset:#x} holds neither its old nor its new content ({}; of its \
                 {SECTOR} bytes {} match the old, {} the new content, {} are zero)",
                owner(),
                matching(old),
                matching(new),
                actual.iter().filter(|&&b| b == 0).count()
            ));
        }
        if problems.len() == 5 {
            break;
        }
    }
    problems
}

/// How a run of kills went, for the summary line and the check that kills really landed
/// inside the workload.
#[derive(Default)]
struct Tally {
    kills: usize,
    mid_workload: usize,
    changes: usize,
    acknowledged: usize,
    /// VHDX kills that left a log for the next open to replay.
    log_pending: usize,
    /// Kills that left leaked space, repaired by `vdisk check --repair`.
    leaks_repaired: usize,
    fresh_images: usize,
}

/// One image of `layout` under attack, with what it must read as.
struct Victim<'a> {
    layout: &'a Layout,
    path: PathBuf,
    /// The disk's content as last verified: zeros when fresh.
    disk: Vec<u8>,
}

impl<'a> Victim<'a> {
    fn fresh(layout: &'a Layout, path: PathBuf) -> Victim<'a> {
        let _ = std::fs::remove_file(&path);
        let size = layout.create(&path);
        Victim {
            layout,
            path,
            disk: vec![0; size as usize],
        }
    }

    /// Runs the writer on a read/write mount, kills the daemon after a random delay, then
    /// remounts and checks everything the issue promises.
    fn kill_during_workload(&mut self, rng: &mut StdRng, tally: &mut Tally, context: &str) {
        let layout = self.layout;
        let delay = Duration::from_millis(rng.random_range(0..=MAX_KILL_DELAY_MS));
        let planner = Planner::new(rng.next_u64(), self.disk.len() as u64, layout.block);
        let progress = Progress::default();

        let vdisk = Mount::new(&self.path, &[]);
        let disk = OpenOptions::new().write(true).open(vdisk.disk()).unwrap();
        let (end, killed_at) = std::thread::scope(|scope| {
            let writer = scope.spawn(|| run_writer(disk, planner, &progress));
            std::thread::sleep(delay);
            let killed_at = Instant::now();
            vdisk.kill();
            (writer.join().unwrap(), killed_at)
        });
        let started = progress.started.into_inner().unwrap();
        let acknowledged = progress.acknowledged.load(Ordering::SeqCst);
        match &end {
            WriterEnd::Exhausted => {}
            WriterEnd::Failed(e, failed_at) => {
                assert!(
                    *failed_at >= killed_at,
                    "{context}: a request failed before the kill: {e}"
                );
                // Over FUSE over io_uring the kernel cancels (ECANCELED) what was on
                // its way to the dead daemon's rings.
                assert!(
                    matches!(
                        e.raw_os_error(),
                        Some(libc::ENOTCONN | libc::ECONNABORTED | libc::EIO | libc::ECANCELED)
                    ),
                    "{context}: the writer failed with {e}, not with a dead mount's error"
                );
                tally.mid_workload += 1;
            }
        }
        tally.kills += 1;
        tally.changes += started.len();
        tally.acknowledged += acknowledged;
        let log_pending =
            layout.qemu_format == "vhdx" && mount::vhdx_log_guid(&self.path) != [0; 16];
        tally.log_pending += usize::from(log_pending);
        let stopped_by = match &end {
            WriterEnd::Exhausted => "running out of room".to_string(),
            WriterEnd::Failed(e, _) => e.to_string(),
        };
        eprintln!(
            "{context}: killed after {delay:?}: {} changes started, {acknowledged} \
             acknowledged, writer stopped by {stopped_by}{}",
            started.len(),
            if log_pending {
                ", log left to replay"
            } else {
                ""
            }
        );

        if std::env::var_os("VDISK_CRASH_KEEP").is_some() {
            // The state the kill left, before the remount replays it: what a failure
            // report needs most.
            std::fs::copy(&self.path, self.path.with_extension("crashed")).unwrap();
        }
        let vdisk = Mount::new(&self.path, &[]);
        let actual = std::fs::read(vdisk.disk()).unwrap();
        vdisk.unmount();
        assert_eq!(actual.len(), self.disk.len(), "{context}: disk size");
        let problems = crash_problems(&self.disk, &actual, &started, acknowledged);
        assert!(problems.is_empty(), "{context}: {}", problems.join("; "));
        self.disk = actual;

        common::qemu_check_clean(layout.qemu_format, &self.path);
        // A kill may leave space written but never entered in a table, and nothing worse;
        // a repair gives it back and changes no byte of the disk (compared below).
        let (status, report) = crate::common::vdisk::check(&self.path, &[]);
        assert!(
            status == 0 || status == 3,
            "{context}: vdisk check {status}: {report}"
        );
        if status == 3 {
            let (status, report) = crate::common::vdisk::check(&self.path, &["--repair"]);
            assert_eq!(status, 0, "{context}: vdisk check --repair: {report}");
            tally.leaks_repaired += 1;
        }
        let reference = self.path.with_extension("reference.raw");
        std::fs::write(&reference, &self.disk).unwrap();
        mount::assert_qemu_identical(layout.qemu_format, &self.path, &reference);
        std::fs::remove_file(&reference).unwrap();
    }
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value}: expected a number")),
    )
}

/// `iterations` kills, taking turns over `layouts` in the order `turns` gives (indices
/// into `layouts`), each layout continuing on its own crashed image.
fn survives_kills(name: &str, layouts: &[Layout], turns: &[usize], iterations: u64) {
    let seed = env_number("VDISK_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    eprintln!("{name}: {iterations} kills, VDISK_CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut temp = Some(tempfile::tempdir().unwrap());
    let dir = temp.as_ref().unwrap().path().to_path_buf();
    if std::env::var_os("VDISK_CRASH_KEEP").is_some() {
        // Each image and its state right after the last kill stay for inspection.
        let kept = temp.take().unwrap().keep();
        eprintln!("{name}: images kept in {}", kept.display());
    }
    let mut tally = Tally::default();
    let mut victims: Vec<Victim> = layouts
        .iter()
        .enumerate()
        .map(|(i, layout)| Victim::fresh(layout, dir.join(format!("{i}.img"))))
        .collect();
    tally.fresh_images = victims.len();
    let start = Instant::now();
    for i in 0..iterations {
        let victim = &mut victims[turns[i as usize % turns.len()]];
        let context = format!("{name} seed {seed} kill {i} ({})", victim.layout.label);
        victim.kill_during_workload(&mut rng, &mut tally, &context);
        if std::fs::metadata(&victim.path).unwrap().len() > victim.layout.file_size_limit() {
            let (layout, path) = (victim.layout, victim.path.clone());
            *victim = Victim::fresh(layout, path);
            tally.fresh_images += 1;
        }
    }
    eprintln!(
        "{name}: {} kills in {:?}, {} inside the workload, {} leaving a VHDX log to \
         replay, {} leaving leaked space; {} changes, {} acknowledged; {} images",
        tally.kills,
        start.elapsed(),
        tally.mid_workload,
        tally.log_pending,
        tally.leaks_repaired,
        tally.changes,
        tally.acknowledged,
        tally.fresh_images
    );
    // A writer that always finished before the kill would prove nothing about crashes.
    assert!(
        tally.mid_workload * 2 >= tally.kills,
        "{name} seed {seed}: only {} of {} kills interrupted the writer",
        tally.mid_workload,
        tally.kills
    );
}

fn iterations() -> u64 {
    env_number("VDISK_CRASH_ITERATIONS").unwrap_or(30)
}

#[test]
fn dynamic_vhdx_survives_kills_during_writes() {
    if !mount::fuse_available() {
        return;
    }
    let layouts = [
        Layout {
            label: "vhdx, 1 MiB blocks",
            qemu_format: "vhdx",
            options: "block_size=1M",
            size: 96 * MIB,
            block: MIB,
        },
        Layout {
            label: "vhdx, 32 MiB blocks, block_state_zero=off",
            qemu_format: "vhdx",
            options: "block_size=32M,block_state_zero=off",
            size: 256 * MIB,
            block: 32 * MIB,
        },
        Layout {
            label: "vhdx, 32 MiB blocks, block_state_zero=on",
            qemu_format: "vhdx",
            options: "block_size=32M,block_state_zero=on",
            size: 256 * MIB,
            block: 32 * MIB,
        },
    ];
    survives_kills("vhdx", &layouts, &[0, 0, 0, 1, 0, 2], iterations());
}

#[test]
fn dynamic_vhd_survives_kills_during_writes() {
    if !mount::fuse_available() {
        return;
    }
    let layouts = [Layout {
        label: "vhd, 2 MiB blocks",
        qemu_format: "vpc",
        options: "subformat=dynamic",
        size: 96 * MIB,
        block: 2 * MIB,
    }];
    survives_kills("vhd", &layouts, &[0], iterations().div_ceil(3));
}

/// The check above must catch what it is there for, or a passing run proves nothing.
#[test]
fn crash_check_tells_lost_and_torn_sectors_from_old_and_new_ones() {
    let before = vec![1u8; 4 * SECTOR as usize];
    let started = [
        Change::Write {
            offset: 10,
            data: vec![2; 600],
        },
        Change::Punch {
            offset: 2 * SECTOR,
            len: SECTOR,
        },
    ];
    let mut all_new = before.clone();
    started.iter().for_each(|c| c.apply(&mut all_new));
    // Unacknowledged: old or new content, sector by sector, are both fine.
    assert!(crash_problems(&before, &before, &started, 0).is_empty());
    assert!(crash_problems(&before, &all_new, &started, 0).is_empty());
    let mut first_sector_only = before.clone();
    first_sector_only[10..512].fill(2);
    assert!(crash_problems(&before, &first_sector_only, &started, 0).is_empty());
    // Acknowledged and lost.
    let lost = crash_problems(&before, &first_sector_only, &started, 1);
    assert!(
        lost[0].contains("sector at 0x200 lost the acknowledged change 0"),
        "{lost:?}"
    );
    // Torn inside a sector, or changed where nothing was written.
    let mut torn = before.clone();
    torn[10..100].fill(2);
    assert_eq!(crash_problems(&before, &torn, &started, 0).len(), 1);
    let mut stray = all_new.clone();
    stray[3 * SECTOR as usize] = 9;
    let problems = crash_problems(&before, &stray, &started, 2);
    assert!(problems[0].contains("0x600 holds neither") && problems[0].contains("no change"));
}

//! Hostile and damaged images: counters and offsets near the integer limits, structures
//! overlapping each other, BAT entries pointing at metadata or at each other's blocks, huge
//! declared sizes on small or sparse files, VHDX logs aimed at the headers or past the end,
//! and parent locators with absurd lengths. Every case is built from a valid image by
//! patching fields (and repairing checksums, so the damage is what the reader meets) and is
//! run through `vdisk info`, a read-only mount and a read/write mount. Each run must end in
//! a clean refusal (one line naming the file, the image untouched, nothing mounted) or in
//! correct I/O, within a time and a memory limit, and never in a panic.
mod common;

use common::mount::{BIN, fuse_available, is_mounted, pattern};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vdisk_mount::Format;
use vdisk_mount::create::{CreateOptions, create};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk");
const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;
/// Longest any program may take over one image, or a mount over its I/O.
const TIME_LIMIT: Duration = Duration::from_secs(30);
/// Most memory any program may use on one image.
const MEMORY_LIMIT_KIB: u64 = 256 * 1024;
/// Disks up to this size are read whole through the mount; larger ones in samples.
const READ_WHOLE_LIMIT: u64 = 64 * MIB;

// ---------------------------------------------------------------------------------------
// Running the programs

/// How a program under the limits ended.
struct Finished {
    /// Exit code; a signal fails the case before this is built.
    code: i32,
    stderr: String,
}

/// Waits for `pid` (our child) until `deadline`, killing it and failing past it. Checks
/// that no signal ended it, that it stayed within the memory limit and did not panic.
/// The peak that wait4 reports includes this test process's own peak (exec keeps it), so
/// it bounds the program's from above: a pass is never wrong.
fn wait_limited(pid: libc::pid_t, deadline: Instant, stderr: &Path, what: &str) -> Finished {
    loop {
        let mut status = 0;
        // SAFETY: zeroed rusage is a valid value for the kernel to fill in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid out pointers; WNOHANG never blocks.
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(rc >= 0, "wait4: {}", std::io::Error::last_os_error());
        if rc == pid {
            let stderr = std::fs::read_to_string(stderr).unwrap_or_default();
            assert!(
                libc::WIFEXITED(status),
                "{what} was killed by signal {}; stderr: {stderr}",
                libc::WTERMSIG(status)
            );
            assert!(!stderr.contains("panicked"), "{what} panicked: {stderr}");
            let max_rss_kib = usage.ru_maxrss as u64;
            assert!(
                max_rss_kib <= MEMORY_LIMIT_KIB,
                "{what} used {max_rss_kib} KiB of memory"
            );
            return Finished {
                code: libc::WEXITSTATUS(status),
                stderr,
            };
        }
        if Instant::now() > deadline {
            // SAFETY: signalling our own child, then reaping it.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("{what} still running after {TIME_LIMIT:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `cmd` with its stderr going to a file in `scratch`; returns the pid and that file.
fn spawn(cmd: &mut Command, scratch: &Path) -> (libc::pid_t, PathBuf) {
    let stderr = scratch.join("stderr");
    cmd.stdout(Stdio::null())
        .stderr(File::create(&stderr).unwrap());
    // Reaped by wait_limited through its pid.
    #[allow(clippy::zombie_processes)]
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (child.id() as libc::pid_t, stderr)
}

/// A refusal: a non-zero exit with exactly one line that names the image, then the
/// structure and the problem after it.
fn assert_clean_refusal(finished: &Finished, image: &Path, mentions: &str, what: &str) {
    assert_ne!(finished.code, 0);
    let lines: Vec<&str> = finished.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: not one line: {:?}",
        finished.stderr
    );
    let named = format!("{}: ", image.display());
    let rest = lines[0]
        .split_once(named.as_str())
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("{what}: does not name the image: {}", lines[0]));
    assert!(
        rest.to_lowercase().contains(&mentions.to_lowercase()),
        "{what}: does not name the {mentions}: {}",
        lines[0]
    );
}

/// A fingerprint of a file's bytes that reads only its data, so sparse files of a TiB
/// cost no more than their allocated parts: every data extent with its offset, and the
/// length.
fn fingerprint(path: &Path) -> String {
    let file = File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    let seek = |offset: u64, whence| {
        // SAFETY: lseek on an open descriptor.
        let pos = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
        (pos >= 0).then_some(pos as u64)
    };
    let mut summary = Vec::new();
    summary.extend_from_slice(&len.to_le_bytes());
    let mut pos = 0;
    while let Some(data) = seek(pos, libc::SEEK_DATA).filter(|&d| d < len) {
        let end = seek(data, libc::SEEK_HOLE).unwrap_or(len);
        let mut buf = vec![0u8; (end - data).min(4 * MIB) as usize];
        let mut at = data;
        summary.extend_from_slice(&data.to_le_bytes());
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at).unwrap();
            summary.extend_from_slice(common::sha256_bytes(&buf[..n]).as_bytes());
            at += n as u64;
        }
        pos = end;
    }
    common::sha256_bytes(&summary)
}

/// What one program made of one image, for the printed summary.
fn refused(finished: &Finished) -> String {
    format!("refused: {}", finished.stderr.trim_end())
}

/// `vdisk info IMAGE`: a description or a clean refusal, the image untouched either way.
fn check_info(image: &Path, mentions: &str) -> String {
    let scratch = tempfile::tempdir().unwrap();
    let before = fingerprint(image);
    let (pid, stderr) = spawn(Command::new(VDISK).arg("info").arg(image), scratch.path());
    let finished = wait_limited(pid, Instant::now() + TIME_LIMIT, &stderr, "vdisk info");
    if finished.code != 0 {
        assert_clean_refusal(&finished, image, mentions, "vdisk info");
    }
    assert_eq!(fingerprint(image), before, "vdisk info changed the image");
    if finished.code == 0 {
        "served".to_string()
    } else {
        refused(&finished)
    }
}

/// What `vdisk check` must end in for each case: most are damage, reported (exit 2) with
/// a finding that names the structure; these are sound images (0), among them VHDX logs
/// whose every entry is invalid (a log the specification says to take as empty), or ones
/// past a memory limit no reader here takes on (1, could not check).
fn check_status(case: &str) -> i32 {
    match case {
        "vhd 2000 GiB disk in a sparse 1 TiB file"
        | "vhdx log entry writing the headers"
        | "vhdx log entry writing the file identifier"
        | "vhdx log entry writing near u64::MAX"
        | "vhdx log entry zeroing up to u64::MAX"
        | "vhdx log entry length near u32::MAX"
        | "vhdx log entry descriptor count u32::MAX" => 0,
        "vhd BAT of 64 million entries in a sparse 1 TiB file"
        | "vhd differencing child claiming a million blocks in a sparse 2 TiB file"
        | "vhd chain of three children each claiming 128 Ki blocks"
        | "vhdx of 64 TiB with a 513 MiB BAT in a sparse 1 TiB file" => 1,
        _ => 2,
    }
}

/// `vdisk check --json IMAGE`, within the limits: the exit status [`check_status`] names,
/// with a report whose corruption names `mentions` (2), or that holds none (0), or a
/// one-line refusal (1); the image untouched either way.
fn check_check(image: &Path, case: &Case) -> String {
    let scratch = tempfile::tempdir().unwrap();
    let before = fingerprint(image);
    let mut cmd = Command::new(VDISK);
    cmd.args(["check", "--json"]).arg(image);
    let (pid, stderr) = spawn(&mut cmd, scratch.path());
    // `spawn` sends standard output nowhere: the report is asked for again below, once the
    // run under the limits passed.
    let finished = wait_limited(pid, Instant::now() + TIME_LIMIT, &stderr, "vdisk check");
    assert_eq!(fingerprint(image), before, "vdisk check changed the image");
    let expected = check_status(case.name);
    assert_eq!(finished.code, expected, "vdisk check: {}", finished.stderr);
    if expected == 1 {
        assert_clean_refusal(&finished, image, case.mentions, "vdisk check");
        return refused(&finished);
    }
    let out = Command::new(VDISK)
        .args(["check", "--json"])
        .arg(image)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let corrupt: Vec<String> = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == "corruption")
        .map(|f| format!("{}: {}", f["structure"], f["problem"]))
        .collect();
    let named = corrupt
        .iter()
        .any(|f| f.to_lowercase().contains(&case.mentions.to_lowercase()));
    assert_eq!(
        (corrupt.is_empty(), named),
        (expected == 0, expected == 2),
        "vdisk check does not name the {}: {corrupt:?}",
        case.mentions
    );
    format!("exit {}", finished.code)
}

/// Peak memory of a live process so far, from /proc.
fn vm_hwm_kib(pid: libc::pid_t) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"))
}

/// Whether our child `pid` has exited, without reaping it.
fn exited(pid: libc::pid_t) -> bool {
    // SAFETY: zeroed siginfo is a valid value for the kernel to fill in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: a valid out pointer; WNOHANG never blocks and WNOWAIT leaves it unreaped.
    let rc = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
    assert_eq!(rc, 0, "waitid: {}", std::io::Error::last_os_error());
    // SAFETY: si_pid is set by waitid (zero when nothing has exited).
    unsafe { info.si_pid() != 0 }
}

/// A foreground daemon that is killed, and its mount detached, if the case fails while it
/// serves.
struct Daemon {
    pid: libc::pid_t,
    mountpoint: tempfile::TempDir,
    reaped: bool,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
        unmount(self.mountpoint.path(), true);
    }
}

/// Unmounts as the user would (fusermount3), or where that is not installed as root does
/// (umount); `lazy` detaches a mount whose daemon is gone. Returns whether it worked.
fn unmount(mountpoint: &Path, lazy: bool) -> bool {
    let flag = if lazy {
        ["-u", "-z"].as_slice()
    } else {
        &["-u"]
    };
    match Command::new("fusermount3")
        .args(flag)
        .arg(mountpoint)
        .status()
    {
        Ok(status) => status.success(),
        Err(_) => Command::new("umount")
            .args(lazy.then_some("-l"))
            .arg(mountpoint)
            .status()
            .is_ok_and(|s| s.success()),
    }
}

/// The offsets and lengths read through a mount of a disk of `size` bytes: all of it when
/// small, else its first and last MiB and one in the middle.
fn read_plan(size: u64) -> Vec<(u64, u64)> {
    if size <= READ_WHOLE_LIMIT {
        return (0..size.div_ceil(MIB))
            .map(|i| (i * MIB, MIB.min(size - i * MIB)))
            .collect();
    }
    [0, size / 2 / MIB * MIB, size - MIB]
        .into_iter()
        .map(|at| (at, MIB))
        .collect()
}

/// What a mount is asked to do.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Read-only: read.
    Read,
    /// Read/write: read, then write a pattern at the start, middle and end, sync and read
    /// it back.
    Write,
    /// Read-only, after a [`Mode::Write`] mount: read, and find the patterns it wrote.
    Reread,
}

/// Where [`Mode::Write`] writes its patterns on a disk of `size` bytes.
fn write_spots(size: u64) -> [u64; 3] {
    [0, size / 2 / 512 * 512 + 100, size - 5000]
}

fn find_patterns(file: &File, size: u64) -> Result<(), String> {
    let mut back = vec![0u8; 4096];
    for (i, &at) in write_spots(size).iter().enumerate() {
        file.read_exact_at(&mut back, at)
            .map_err(|e| format!("reading back 4096 bytes at {at}: {e}"))?;
        if back != pattern(i as u64 + 1, 4096) {
            return Err(format!("4096 bytes written at {at} read back differently"));
        }
    }
    Ok(())
}

/// Does what `mode` asks through the mounted `disk`. Errors are strings: this runs on a
/// thread the caller may abandon.
fn exercise(disk: &Path, mode: Mode) -> Result<(), String> {
    let file = OpenOptions::new()
        .read(true)
        .write(mode == Mode::Write)
        .open(disk)
        .map_err(|e| format!("open: {e}"))?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut buf = vec![0u8; MIB as usize];
    for (at, len) in read_plan(size) {
        file.read_exact_at(&mut buf[..len as usize], at)
            .map_err(|e| format!("reading {len} bytes at {at}: {e}"))?;
    }
    match mode {
        Mode::Read => Ok(()),
        Mode::Reread => find_patterns(&file, size),
        Mode::Write => {
            for (i, &at) in write_spots(size).iter().enumerate() {
                file.write_all_at(&pattern(i as u64 + 1, 4096), at)
                    .map_err(|e| format!("writing 4096 bytes at {at}: {e}"))?;
            }
            file.sync_all().map_err(|e| format!("fsync: {e}"))?;
            find_patterns(&file, size)
        }
    }
}

/// `vdisk-mount -f` of `image` for `mode`: either a clean refusal that leaves the image
/// untouched and nothing mounted, or a mount that does what [`exercise`] asks within the
/// limits and exits 0 once unmounted. An image written through a mount must serve again.
fn check_mount(image: &Path, mode: Mode, mentions: &str) -> String {
    let read_only = mode != Mode::Write;
    let what = match mode {
        Mode::Read => "read-only mount",
        Mode::Write => "read/write mount",
        Mode::Reread => "read-only mount after writing",
    };
    let scratch = tempfile::tempdir().unwrap();
    let before = fingerprint(image);
    let mut cmd = Command::new(BIN);
    cmd.arg("-f");
    if read_only {
        cmd.args(["-o", "ro"]);
    }
    let mountpoint = tempfile::tempdir().unwrap();
    cmd.arg(image).arg(mountpoint.path());
    let (pid, stderr) = spawn(&mut cmd, scratch.path());
    let mut daemon = Daemon {
        pid,
        mountpoint,
        reaped: false,
    };
    let deadline = Instant::now() + TIME_LIMIT;
    while !is_mounted(daemon.mountpoint.path()) {
        if exited(pid) {
            daemon.reaped = true;
            let finished = wait_limited(pid, deadline, &stderr, what);
            assert!(mode != Mode::Reread, "{what}: {}", finished.stderr);
            assert_clean_refusal(&finished, image, mentions, what);
            assert!(!is_mounted(daemon.mountpoint.path()), "{what} left a mount");
            assert_eq!(
                fingerprint(image),
                before,
                "refused {what} changed the image"
            );
            return refused(&finished);
        }
        assert!(
            Instant::now() < deadline,
            "{what} neither mounted nor exited"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let disk = daemon.mountpoint.path().join("disk.img");
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(exercise(&disk, mode));
    });
    match result.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(io) => io.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => panic!("{what}: I/O still waiting after {TIME_LIMIT:?}"),
    }
    let hwm = vm_hwm_kib(pid);
    assert!(hwm <= MEMORY_LIMIT_KIB, "{what}: daemon used {hwm} KiB");
    assert!(
        unmount(daemon.mountpoint.path(), false),
        "{what}: cannot unmount"
    );
    daemon.reaped = true;
    let finished = wait_limited(pid, Instant::now() + TIME_LIMIT, &stderr, what);
    assert_eq!(finished.code, 0, "{what}: daemon exit; {}", finished.stderr);
    if read_only {
        assert_eq!(fingerprint(image), before, "{what} changed the image");
    } else {
        check_mount(image, Mode::Reread, mentions);
    }
    format!("served (VmHWM {hwm} KiB)")
}

// ---------------------------------------------------------------------------------------
// The cases and their runner

/// One hostile image: how to make it in an empty directory, and the structure a refusal
/// must name.
struct Case {
    name: &'static str,
    build: fn(&Path) -> PathBuf,
    mentions: &'static str,
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Runs every case through `vdisk info` and, where FUSE is available, a read-only and a
/// read/write mount; prints what became of each and fails naming every case that broke
/// the rules, not just the first.
fn run_cases(cases: &[Case]) {
    let mounts = fuse_available();
    let mut failures = Vec::new();
    for case in cases {
        let dir = tempfile::tempdir().unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let image = (case.build)(dir.path());
            let mut seen = vec![
                format!("info {}", check_info(&image, case.mentions)),
                format!("check {}", check_check(&image, case)),
            ];
            if mounts {
                seen.push(format!(
                    "ro {}",
                    check_mount(&image, Mode::Read, case.mentions)
                ));
                seen.push(format!(
                    "rw {}",
                    check_mount(&image, Mode::Write, case.mentions)
                ));
            }
            seen
        }));
        match result {
            Ok(seen) => eprintln!("CASE {}: {}", case.name, seen.join(" | ")),
            Err(payload) => failures.push(format!("{}: {}", case.name, panic_text(&*payload))),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// Valid images to start from, and patching

fn read_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn be64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Makes an image with `vdisk create`'s library call, then writes a pattern at its start
/// and 4 MiB + 100 in, so blocks are allocated for BAT cases to redirect.
fn image(dir: &Path, name: &str, options: CreateOptions) -> PathBuf {
    let path = dir.join(name);
    create(&path, &options).unwrap_or_else(|e| panic!("{e}"));
    let disk = vdisk_mount::open(&path, &vdisk_mount::OpenOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    disk.write_at(&pattern(1, 4096), 0).unwrap();
    disk.write_at(&pattern(2, 4096), 4 * MIB + 100).unwrap();
    disk.close().unwrap();
    path
}

fn options(format: Format, size: u64, block_size: u32) -> CreateOptions {
    CreateOptions {
        format: Some(format),
        size: Some(size),
        block_size: Some(block_size),
        ..Default::default()
    }
}

/// A 8 MiB dynamic VHD of 2 MiB blocks, blocks 0 and 2 allocated.
fn vhd(dir: &Path) -> PathBuf {
    image(dir, "dynamic.vhd", options(Format::Vhd, 8 * MIB, 2 << 20))
}

fn vhd_fixed(dir: &Path) -> PathBuf {
    let mut fixed = options(Format::Vhd, 8 * MIB, 2 << 20);
    fixed.image_type = Some(vdisk_mount::create::ImageType::Fixed);
    fixed.block_size = None;
    // Holes, not allocated space: `fingerprint` finds data with SEEK_DATA, which reports
    // allocated but unwritten space as data or not depending on the page cache.
    fixed.sparse = true;
    image(dir, "fixed.vhd", fixed)
}

/// A differencing child (with its parent beside it) of `format`, blocks allocated in both.
fn child(dir: &Path, format: Format) -> PathBuf {
    let ext = if format == Format::Vhd { "vhd" } else { "vhdx" };
    let parent = image(
        dir,
        &format!("parent.{ext}"),
        options(format, 8 * MIB, 1 << 20),
    );
    let path = dir.join(format!("child.{ext}"));
    // 1 MiB blocks, as the parent has: cases that patch a child's BAT count on them.
    let child = CreateOptions {
        parent: Some(parent),
        block_size: Some(1 << 20),
        ..Default::default()
    };
    create(&path, &child).unwrap_or_else(|e| panic!("{e}"));
    let disk = vdisk_mount::open(&path, &vdisk_mount::OpenOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    disk.write_at(&pattern(3, 4096), 2 * MIB).unwrap();
    disk.close().unwrap();
    path
}

/// An 8 MiB dynamic VHDX of 1 MiB blocks, blocks 0 and 4 allocated.
fn vhdx(dir: &Path) -> PathBuf {
    image(dir, "dynamic.vhdx", options(Format::Vhdx, 8 * MIB, 1 << 20))
}

// ---------------------------------------------------------------------------------------
// VHD fields (big-endian; FORMATS.md §8)

/// The one's-complement byte sum of a footer or dynamic header, its own field as zero.
fn vhd_checksum(bytes: &[u8], field: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|&(i, _)| !(field..field + 4).contains(&i))
        .fold(0u32, |sum, (_, &b)| sum.wrapping_add(u32::from(b)));
    !sum
}

/// Sets a field of a checksummed VHD structure of `len` bytes at `at` and repairs the
/// checksum at `checksum_field`.
fn vhd_set(path: &Path, at: u64, len: usize, checksum_field: usize, field: usize, value: &[u8]) {
    let mut bytes = read_bytes(path, at, len);
    bytes[field..field + value.len()].copy_from_slice(value);
    let sum = vhd_checksum(&bytes, checksum_field);
    bytes[checksum_field..checksum_field + 4].copy_from_slice(&sum.to_be_bytes());
    patch(path, at, &bytes);
}

/// Sets a footer field in the trailing footer and in the copy at offset 0 when there is one.
fn vhd_footer(path: &Path, field: usize, value: &[u8]) {
    vhd_set(path, file_len(path) - 512, 512, 64, field, value);
    if read_bytes(path, 0, 8) == b"conectix" {
        vhd_set(path, 0, 512, 64, field, value);
    }
}

fn vhd_header_at(path: &Path) -> u64 {
    be64(&read_bytes(path, file_len(path) - 512, 512), 16)
}

fn vhd_header(path: &Path, field: usize, value: &[u8]) {
    vhd_set(path, vhd_header_at(path), 1024, 36, field, value);
}

fn vhd_table_at(path: &Path) -> u64 {
    be64(&read_bytes(path, vhd_header_at(path), 1024), 16)
}

fn vhd_bat_get(path: &Path, index: u64) -> u32 {
    be32(&read_bytes(path, vhd_table_at(path) + 4 * index, 4), 0)
}

fn vhd_bat_set(path: &Path, index: u64, sector: u32) {
    patch(path, vhd_table_at(path) + 4 * index, &sector.to_be_bytes());
}

/// Sets a field of the first parent locator entry in use.
fn vhd_locator(path: &Path, field: usize, value: &[u8]) {
    let header = read_bytes(path, vhd_header_at(path), 1024);
    let entry = (0..8)
        .map(|i| 576 + 24 * i)
        .find(|&at| be32(&header, at) != 0)
        .expect("a parent locator in use");
    vhd_header(path, entry + field, value);
}

/// Makes the file `len` bytes long (sparse) with its footer moved to the new end.
fn vhd_extend(path: &Path, len: u64) {
    let footer = read_bytes(path, file_len(path) - 512, 512);
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
    patch(path, len - 512, &footer);
}

// ---------------------------------------------------------------------------------------
// VHDX fields (little-endian, CRC-32C; FORMATS.md §1)

const HEADERS: [u64; 2] = [64 * 1024, 128 * 1024];
const REGION_TABLES: [u64; 2] = [192 * 1024, 256 * 1024];
const LOG_GUID: [u8; 16] = [0x42; 16];

/// Sets a field of both copies of a CRC-protected structure of `len` bytes and repairs
/// their checksums (at byte 4 of each).
fn vhdx_set(path: &Path, copies: [u64; 2], len: usize, field: usize, value: &[u8]) {
    for at in copies {
        let mut bytes = read_bytes(path, at, len);
        bytes[field..field + value.len()].copy_from_slice(value);
        bytes[4..8].fill(0);
        let crc = crc32c::crc32c(&bytes);
        bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        patch(path, at, &bytes);
    }
}

fn vhdx_header(path: &Path, field: usize, value: &[u8]) {
    vhdx_set(path, HEADERS, 4096, field, value);
}

/// (offset, length) of the log, from the first header.
fn vhdx_log(path: &Path) -> (u64, u64) {
    let header = read_bytes(path, HEADERS[0], 4096);
    (le64(&header, 72), u64::from(le32(&header, 68)))
}

/// Byte offset inside the region table of the entry for `guid`.
fn vhdx_region_entry(path: &Path, guid: uuid::Uuid) -> usize {
    let table = read_bytes(path, REGION_TABLES[0], 64 * 1024);
    (0..le32(&table, 8) as usize)
        .map(|i| 16 + 32 * i)
        .find(|&at| table[at..at + 16] == guid.to_bytes_le())
        .expect("region present")
}

/// (file offset, length) of the region `guid`.
fn vhdx_region(path: &Path, guid: uuid::Uuid) -> (u64, u64) {
    let entry = vhdx_region_entry(path, guid);
    let table = read_bytes(path, REGION_TABLES[0], 64 * 1024);
    (
        le64(&table, entry + 16),
        u64::from(le32(&table, entry + 24)),
    )
}

/// Sets the file offset (field 16) or length (field 24) of region `guid` in both tables.
fn vhdx_region_set(path: &Path, guid: uuid::Uuid, field: usize, value: &[u8]) {
    let entry = vhdx_region_entry(path, guid);
    vhdx_set(path, REGION_TABLES, 64 * 1024, entry + field, value);
}

fn bat_region() -> uuid::Uuid {
    vdisk_mount::vhdx::region_table::BAT_REGION
}

fn metadata_region() -> uuid::Uuid {
    vdisk_mount::vhdx::region_table::METADATA_REGION
}

/// File offset of the metadata table entry for item `guid`.
fn vhdx_item_entry(path: &Path, guid: uuid::Uuid) -> u64 {
    let (region, _) = vhdx_region(path, metadata_region());
    let table = read_bytes(path, region, 64 * 1024);
    let count = u16::from_le_bytes([table[10], table[11]]) as usize;
    let at = (0..count)
        .map(|i| 32 + 32 * i)
        .find(|&at| table[at..at + 16] == guid.to_bytes_le())
        .expect("metadata item present");
    region + at as u64
}

/// File offset of the value of metadata item `guid`.
fn vhdx_item(path: &Path, guid: uuid::Uuid) -> u64 {
    let (region, _) = vhdx_region(path, metadata_region());
    let entry = read_bytes(path, vhdx_item_entry(path, guid), 32);
    region + u64::from(le32(&entry, 16))
}

fn vhdx_bat_get(path: &Path, index: u64) -> u64 {
    let (bat, _) = vhdx_region(path, bat_region());
    le64(&read_bytes(path, bat + 8 * index, 8), 0)
}

fn vhdx_bat_set(path: &Path, index: u64, entry: u64) {
    let (bat, _) = vhdx_region(path, bat_region());
    patch(path, bat + 8 * index, &entry.to_le_bytes());
}

/// BAT entry state of a payload block whose data is all in the file.
const PAYLOAD_FULLY_PRESENT: u64 = 6;

// ---------------------------------------------------------------------------------------
// VHDX log entries (FORMATS.md §1.6)

enum Update {
    /// A 4 KiB page written at a file offset.
    Data(u64, Vec<u8>),
    /// Zeros over a file range.
    Zero(u64, u64),
}

/// A log entry of sequence number 1 whose tail is itself, checksum included, describing
/// `updates`, for a file of `file_len` bytes.
fn log_entry(updates: &[Update], file_len: u64) -> Vec<u8> {
    const SEQ: u64 = 1;
    let pages: Vec<&Vec<u8>> = updates
        .iter()
        .filter_map(|u| match u {
            Update::Data(_, page) => Some(page),
            Update::Zero(..) => None,
        })
        .collect();
    let descriptor_sectors = (updates.len() + 2).div_ceil(128);
    let mut entry = vec![0u8; 4096 * (descriptor_sectors + pages.len())];
    let len = entry.len() as u32;
    entry[..4].copy_from_slice(b"loge");
    entry[8..12].copy_from_slice(&len.to_le_bytes());
    entry[16..24].copy_from_slice(&SEQ.to_le_bytes());
    entry[24..28].copy_from_slice(&(updates.len() as u32).to_le_bytes());
    entry[32..48].copy_from_slice(&LOG_GUID);
    entry[48..56].copy_from_slice(&(file_len / MIB * MIB).to_le_bytes());
    entry[56..64].copy_from_slice(&file_len.next_multiple_of(MIB).to_le_bytes());
    for (i, update) in updates.iter().enumerate() {
        let d = &mut entry[64 + 32 * i..96 + 32 * i];
        match update {
            Update::Data(offset, page) => {
                d[..4].copy_from_slice(b"desc");
                d[4..8].copy_from_slice(&page[4092..]);
                d[8..16].copy_from_slice(&page[..8]);
                d[16..24].copy_from_slice(&offset.to_le_bytes());
            }
            Update::Zero(offset, len) => {
                d[..4].copy_from_slice(b"zero");
                d[8..16].copy_from_slice(&len.to_le_bytes());
                d[16..24].copy_from_slice(&offset.to_le_bytes());
            }
        }
        d[24..32].copy_from_slice(&SEQ.to_le_bytes());
    }
    for (i, page) in pages.iter().enumerate() {
        let s = &mut entry[4096 * (descriptor_sectors + i)..][..4096];
        s[..4].copy_from_slice(b"data");
        s[4..8].copy_from_slice(&((SEQ >> 32) as u32).to_le_bytes());
        s[8..4092].copy_from_slice(&page[8..4092]);
        s[4092..].copy_from_slice(&(SEQ as u32).to_le_bytes());
    }
    seal_log_entry(&mut entry);
    entry
}

fn seal_log_entry(entry: &mut [u8]) {
    entry[4..8].fill(0);
    let crc = crc32c::crc32c(entry);
    entry[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Puts `entry` at the start of the log and makes the headers ask for its replay.
fn install_log(path: &Path, entry: &[u8]) {
    patch(path, vhdx_log(path).0, entry);
    vhdx_header(path, 48, &LOG_GUID);
}

/// A VHDX whose log holds one entry of `updates`, its header fields set by `adjust`
/// (offset, bytes) and its checksum repaired after.
fn vhdx_with_log(dir: &Path, updates: &[Update], adjust: &[(usize, &[u8])]) -> PathBuf {
    let path = vhdx(dir);
    let mut entry = log_entry(updates, file_len(&path));
    for &(at, value) in adjust {
        entry[at..at + value.len()].copy_from_slice(value);
    }
    seal_log_entry(&mut entry);
    install_log(&path, &entry);
    path
}

/// The log entries built here are real ones: the driver replays a page written through
/// one into the data of block 0, so the hostile log cases below reach the reader's checks.
#[test]
fn log_entries_built_here_are_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let path = vhdx(dir.path());
    let block0 = vhdx_bat_get(&path, 0) & !(MIB - 1);
    let page = pattern(99, 4096);
    let entry = log_entry(&[Update::Data(block0, page.clone())], file_len(&path));
    install_log(&path, &entry);
    let options = vdisk_mount::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let disk = vdisk_mount::open(&path, &options).unwrap_or_else(|e| panic!("{e}"));
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, page);
}

// ---------------------------------------------------------------------------------------
// VHD cases

#[test]
fn vhd_counters_and_offsets_near_their_limits() {
    run_cases(&[
        Case {
            name: "vhd footer Data Offset near u64::MAX",
            build: |dir| {
                let path = vhd(dir);
                vhd_footer(&path, 16, &(u64::MAX - 511).to_be_bytes());
                path
            },
            mentions: "VHD footer",
        },
        Case {
            name: "vhd footer Current Size u64::MAX",
            build: |dir| {
                let path = vhd(dir);
                vhd_footer(&path, 48, &u64::MAX.to_be_bytes());
                path
            },
            mentions: "VHD footer",
        },
        Case {
            name: "vhd fixed disk claiming 2040 GiB in 8 MiB",
            build: |dir| {
                let path = vhd_fixed(dir);
                vhd_footer(&path, 48, &(0xFF00_0000u64 * 512).to_be_bytes());
                path
            },
            mentions: "VHD fixed disk data",
        },
        Case {
            name: "vhd Table Offset near u64::MAX",
            build: |dir| {
                let path = vhd(dir);
                vhd_header(&path, 16, &(u64::MAX - 511).to_be_bytes());
                path
            },
            mentions: "VHD dynamic header",
        },
        Case {
            name: "vhd Max Table Entries u32::MAX",
            build: |dir| {
                let path = vhd(dir);
                vhd_header(&path, 28, &u32::MAX.to_be_bytes());
                path
            },
            mentions: "VHD dynamic header",
        },
        Case {
            name: "vhd Block Size u32::MAX",
            build: |dir| {
                let path = vhd(dir);
                vhd_header(&path, 32, &u32::MAX.to_be_bytes());
                path
            },
            mentions: "VHD dynamic header",
        },
        Case {
            name: "vhd Block Size 2 GiB",
            build: |dir| {
                let path = vhd(dir);
                vhd_header(&path, 32, &(1u32 << 31).to_be_bytes());
                path
            },
            mentions: "BAT entry",
        },
        Case {
            name: "vhd Block Size 3000",
            build: |dir| {
                let path = vhd(dir);
                vhd_header(&path, 32, &3000u32.to_be_bytes());
                path
            },
            mentions: "VHD dynamic header",
        },
        Case {
            name: "vhd BAT entry 0xFFFFFFFE",
            build: |dir| {
                let path = vhd(dir);
                vhd_bat_set(&path, 1, 0xFFFF_FFFE);
                path
            },
            mentions: "BAT entry 1",
        },
    ]);
}

#[test]
fn vhd_overlapping_structures() {
    run_cases(&[
        Case {
            name: "vhd dynamic header over the footer copy",
            build: |dir| {
                let path = vhd(dir);
                vhd_footer(&path, 16, &0u64.to_be_bytes());
                path
            },
            mentions: "VHD footer",
        },
        Case {
            name: "vhd BAT over the dynamic header",
            build: |dir| {
                let path = vhd(dir);
                vhd_header(&path, 16, &512u64.to_be_bytes());
                path
            },
            mentions: "VHD dynamic header",
        },
        Case {
            name: "vhd BAT over the trailing footer",
            build: |dir| {
                let path = vhd(dir);
                vhd_header(&path, 16, &(file_len(&path) - 512).to_be_bytes());
                path
            },
            mentions: "VHD dynamic header",
        },
    ]);
}

#[test]
fn vhd_self_referencing_and_duplicate_bat_entries() {
    run_cases(&[
        Case {
            name: "vhd BAT entry at the footer copy",
            build: |dir| {
                let path = vhd(dir);
                vhd_bat_set(&path, 1, 0);
                path
            },
            mentions: "BAT entry 1",
        },
        Case {
            name: "vhd BAT entry at the dynamic header",
            build: |dir| {
                let path = vhd(dir);
                vhd_bat_set(&path, 1, (vhd_header_at(&path) / 512) as u32);
                path
            },
            mentions: "BAT entry 1",
        },
        Case {
            name: "vhd BAT entry at the BAT",
            build: |dir| {
                let path = vhd(dir);
                vhd_bat_set(&path, 1, (vhd_table_at(&path) / 512) as u32);
                path
            },
            mentions: "BAT entry 1",
        },
        Case {
            name: "vhd BAT entry at the trailing footer",
            build: |dir| {
                let path = vhd(dir);
                vhd_bat_set(&path, 1, ((file_len(&path) - 512) / 512) as u32);
                path
            },
            mentions: "BAT entry 1",
        },
        Case {
            name: "vhd two BAT entries for one block",
            build: |dir| {
                let path = vhd(dir);
                vhd_bat_set(&path, 1, vhd_bat_get(&path, 0));
                path
            },
            mentions: "BAT entry",
        },
    ]);
}

/// A 256 GiB disk of 4 KiB blocks: 2^26 BAT entries (256 MiB of table) in a sparse
/// 1 TiB file.
fn vhd_sparse_with_huge_bat(dir: &Path) -> PathBuf {
    let path = vhd(dir);
    let blocks: u32 = 1 << 26;
    vhd_footer(&path, 48, &(u64::from(blocks) * 4096).to_be_bytes());
    vhd_header(&path, 28, &blocks.to_be_bytes());
    vhd_header(&path, 32, &4096u32.to_be_bytes());
    vhd_extend(&path, TIB);
    path
}

/// A differencing child of the largest VHD (2040 GiB of 2 MiB blocks) whose BAT claims
/// every one of its million blocks, each in its own place in a sparse 2 TiB file: a
/// million sector bitmaps to keep in memory.
fn vhd_child_with_every_block_allocated(dir: &Path) -> PathBuf {
    let parent = dir.join("parent.vhd");
    create(&parent, &options(Format::Vhd, LARGEST_VHD, 2 << 20)).unwrap();
    vhd_child_claiming(dir, &parent, "child.vhd", LARGEST_VHD / (2 << 20))
}

const LARGEST_VHD: u64 = 0xFF00_0000 * 512;

/// A differencing child named `name` of the 2040 GiB VHD `parent`, of 2 MiB blocks, whose
/// BAT claims its first `blocks` blocks, each in its own place in a sparse file.
fn vhd_child_claiming(dir: &Path, parent: &Path, name: &str, blocks: u64) -> PathBuf {
    let path = dir.join(name);
    let child = CreateOptions {
        parent: Some(parent.to_path_buf()),
        ..Default::default()
    };
    create(&path, &child).unwrap();
    let span = ((2 << 20) + 512) / 512;
    let first = file_len(&path).div_ceil(512);
    let table: Vec<u8> = (0..blocks)
        .flat_map(|i| ((first + i * span) as u32).to_be_bytes())
        .collect();
    patch(&path, vhd_table_at(&path), &table);
    vhd_extend(&path, (first + blocks * span) * 512 + 512);
    path
}

/// Three differencing children over an empty 2040 GiB VHD, each claiming 128 Ki blocks:
/// each alone keeps 72 MiB of bitmaps, well within what one image may, but the chain as
/// a whole would hold more than its metadata may take.
fn vhd_chain_of_heavy_children(dir: &Path) -> PathBuf {
    let mut parent = dir.join("base.vhd");
    create(&parent, &options(Format::Vhd, LARGEST_VHD, 2 << 20)).unwrap();
    for level in 1..=3 {
        parent = vhd_child_claiming(dir, &parent, &format!("child{level}.vhd"), 128 << 10);
    }
    parent
}

#[test]
fn vhd_huge_declared_sizes() {
    run_cases(&[
        Case {
            name: "vhd of 1 EiB",
            build: |dir| {
                let path = vhd(dir);
                vhd_footer(&path, 48, &(1u64 << 60).to_be_bytes());
                path
            },
            mentions: "VHD footer",
        },
        Case {
            name: "vhd BAT of 16 million entries in an 8 MiB file",
            build: |dir| {
                let path = vhd(dir);
                vhd_header(&path, 28, &(1u32 << 24).to_be_bytes());
                vhd_header(&path, 32, &512u32.to_be_bytes());
                path
            },
            mentions: "VHD dynamic header",
        },
        Case {
            name: "vhd BAT of 64 million entries in a sparse 1 TiB file",
            build: vhd_sparse_with_huge_bat,
            mentions: "VHD dynamic header",
        },
        Case {
            name: "vhd differencing child claiming a million blocks in a sparse 2 TiB file",
            build: vhd_child_with_every_block_allocated,
            mentions: "VHD differencing disk",
        },
        Case {
            name: "vhd chain of three children each claiming 128 Ki blocks",
            build: vhd_chain_of_heavy_children,
            mentions: "metadata this chain keeps in memory",
        },
        Case {
            name: "vhd 2000 GiB disk in a sparse 1 TiB file",
            build: |dir| {
                let path = dir.join("big.vhd");
                create(&path, &options(Format::Vhd, 2000 << 30, 2 << 20)).unwrap();
                vhd_extend(&path, TIB);
                path
            },
            mentions: "VHD",
        },
    ]);
}

#[test]
fn vhd_parent_locators_with_absurd_fields() {
    run_cases(&[
        Case {
            name: "vhd parent locator Data Length 2^31",
            build: |dir| {
                let path = child(dir, Format::Vhd);
                vhd_locator(&path, 8, &(1u32 << 31).to_be_bytes());
                path
            },
            mentions: "VHD parent locator",
        },
        Case {
            name: "vhd parent locator Data Offset past the end",
            build: |dir| {
                let path = child(dir, Format::Vhd);
                vhd_locator(&path, 16, &(1u64 << 50).to_be_bytes());
                path
            },
            mentions: "VHD parent locator",
        },
        Case {
            name: "vhd parent locator Data Offset near u64::MAX",
            build: |dir| {
                let path = child(dir, Format::Vhd);
                vhd_locator(&path, 16, &(u64::MAX - 100).to_be_bytes());
                path
            },
            mentions: "VHD parent locator",
        },
        Case {
            name: "vhd parent locator Data Space u32::MAX, data over the BAT",
            build: |dir| {
                let path = child(dir, Format::Vhd);
                vhd_locator(&path, 4, &u32::MAX.to_be_bytes());
                vhd_locator(&path, 8, &512u32.to_be_bytes());
                vhd_locator(&path, 16, &vhd_table_at(&path).to_be_bytes());
                path
            },
            mentions: "VHD parent locator",
        },
    ]);
}

// ---------------------------------------------------------------------------------------
// VHDX cases

use vdisk_mount::vhdx::metadata::{
    FILE_PARAMETERS, LOGICAL_SECTOR_SIZE, PARENT_LOCATOR, VIRTUAL_DISK_SIZE,
};

/// A VHDX whose metadata item `guid` holds `value` at its start.
fn vhdx_item_value(dir: &Path, guid: uuid::Uuid, value: &[u8]) -> PathBuf {
    let path = vhdx(dir);
    patch(&path, vhdx_item(&path, guid), value);
    path
}

/// A VHDX whose metadata table entry for `guid` has `value` at byte `field` (16: offset,
/// 20: length).
fn vhdx_item_entry_field(dir: &Path, guid: uuid::Uuid, field: u64, value: &[u8]) -> PathBuf {
    let path = vhdx(dir);
    patch(&path, vhdx_item_entry(&path, guid) + field, value);
    path
}

/// A VHDX whose BAT entry for block 1 points at `offset` (made 1 MiB aligned), fully present.
fn vhdx_block_1_at(dir: &Path, offset: impl Fn(&Path) -> u64) -> PathBuf {
    let path = vhdx(dir);
    let at = offset(&path) & !(MIB - 1);
    vhdx_bat_set(&path, 1, at | PAYLOAD_FULLY_PRESENT);
    path
}

#[test]
fn vhdx_counters_and_offsets_near_their_limits() {
    run_cases(&[
        Case {
            name: "vhdx BAT region offset near u64::MAX",
            build: |dir| {
                let path = vhdx(dir);
                vhdx_region_set(&path, bat_region(), 16, &(!(MIB - 1)).to_le_bytes());
                path
            },
            mentions: "region",
        },
        Case {
            name: "vhdx BAT region length near u32::MAX",
            build: |dir| {
                let path = vhdx(dir);
                vhdx_region_set(&path, bat_region(), 24, &0xFFF0_0000u32.to_le_bytes());
                path
            },
            mentions: "region",
        },
        Case {
            name: "vhdx region table entry count u32::MAX",
            build: |dir| {
                let path = vhdx(dir);
                vhdx_set(&path, REGION_TABLES, 64 * 1024, 8, &u32::MAX.to_le_bytes());
                path
            },
            mentions: "region table",
        },
        Case {
            name: "vhdx metadata item offset u32::MAX",
            build: |dir| vhdx_item_entry_field(dir, VIRTUAL_DISK_SIZE, 16, &u32::MAX.to_le_bytes()),
            mentions: "metadata",
        },
        Case {
            name: "vhdx metadata item length u32::MAX",
            build: |dir| vhdx_item_entry_field(dir, VIRTUAL_DISK_SIZE, 20, &u32::MAX.to_le_bytes()),
            mentions: "metadata",
        },
        Case {
            name: "vhdx metadata entry count u16::MAX",
            build: |dir| {
                let path = vhdx(dir);
                let (region, _) = vhdx_region(&path, metadata_region());
                patch(&path, region + 10, &u16::MAX.to_le_bytes());
                path
            },
            mentions: "metadata",
        },
        Case {
            name: "vhdx virtual size near u64::MAX",
            build: |dir| vhdx_item_value(dir, VIRTUAL_DISK_SIZE, &(u64::MAX - 511).to_le_bytes()),
            mentions: "size",
        },
        Case {
            name: "vhdx block size 3 MiB",
            build: |dir| vhdx_item_value(dir, FILE_PARAMETERS, &(3u32 << 20).to_le_bytes()),
            mentions: "block size",
        },
        Case {
            name: "vhdx block size 0",
            build: |dir| vhdx_item_value(dir, FILE_PARAMETERS, &0u32.to_le_bytes()),
            mentions: "block size",
        },
        Case {
            name: "vhdx block size 2^31",
            build: |dir| vhdx_item_value(dir, FILE_PARAMETERS, &(1u32 << 31).to_le_bytes()),
            mentions: "block size",
        },
        Case {
            name: "vhdx logical sector size 520",
            build: |dir| vhdx_item_value(dir, LOGICAL_SECTOR_SIZE, &520u32.to_le_bytes()),
            mentions: "sector size",
        },
        Case {
            name: "vhdx logical sector size 0",
            build: |dir| vhdx_item_value(dir, LOGICAL_SECTOR_SIZE, &0u32.to_le_bytes()),
            mentions: "sector size",
        },
        Case {
            name: "vhdx BAT entry at 2^44 MiB - 1",
            build: |dir| vhdx_block_1_at(dir, |_| ((1u64 << 44) - 1) << 20),
            mentions: "BAT",
        },
        Case {
            name: "vhdx log offset near u64::MAX",
            build: |dir| {
                let path = vhdx(dir);
                vhdx_header(&path, 72, &(!(MIB - 1)).to_le_bytes());
                path
            },
            mentions: "log",
        },
        Case {
            name: "vhdx log length near u32::MAX",
            build: |dir| {
                let path = vhdx(dir);
                vhdx_header(&path, 68, &0xFFF0_0000u32.to_le_bytes());
                path
            },
            mentions: "log",
        },
    ]);
}

#[test]
fn vhdx_overlapping_structures() {
    run_cases(&[
        Case {
            name: "vhdx metadata region over the BAT region",
            build: |dir| {
                let path = vhdx(dir);
                let (bat, _) = vhdx_region(&path, bat_region());
                vhdx_region_set(&path, metadata_region(), 16, &bat.to_le_bytes());
                path
            },
            mentions: "region",
        },
        Case {
            name: "vhdx BAT region over the headers",
            build: |dir| {
                let path = vhdx(dir);
                vhdx_region_set(&path, bat_region(), 16, &0u64.to_le_bytes());
                path
            },
            mentions: "region",
        },
        Case {
            name: "vhdx BAT region over the log",
            build: |dir| {
                let path = vhdx(dir);
                let (log, _) = vhdx_log(&path);
                vhdx_region_set(&path, bat_region(), 16, &log.to_le_bytes());
                path
            },
            mentions: "log",
        },
        Case {
            name: "vhdx log over the metadata region",
            build: |dir| {
                let path = vhdx(dir);
                let (metadata, _) = vhdx_region(&path, metadata_region());
                vhdx_header(&path, 72, &metadata.to_le_bytes());
                path
            },
            mentions: "log",
        },
        Case {
            name: "vhdx metadata items over each other",
            build: |dir| {
                let path = vhdx(dir);
                let (region, _) = vhdx_region(&path, metadata_region());
                let parameters = vhdx_item(&path, FILE_PARAMETERS) - region;
                let size_entry = vhdx_item_entry(&path, VIRTUAL_DISK_SIZE);
                patch(
                    &path,
                    size_entry + 16,
                    &(parameters as u32 + 4).to_le_bytes(),
                );
                path
            },
            mentions: "metadata",
        },
    ]);
}

#[test]
fn vhdx_self_referencing_and_duplicate_bat_entries() {
    run_cases(&[
        Case {
            name: "vhdx BAT entry at the headers",
            build: |dir| vhdx_block_1_at(dir, |_| 0),
            mentions: "BAT",
        },
        Case {
            name: "vhdx BAT entry at the BAT",
            build: |dir| vhdx_block_1_at(dir, |path| vhdx_region(path, bat_region()).0),
            mentions: "BAT",
        },
        Case {
            name: "vhdx BAT entry at the metadata region",
            build: |dir| vhdx_block_1_at(dir, |path| vhdx_region(path, metadata_region()).0),
            mentions: "BAT",
        },
        Case {
            name: "vhdx BAT entry at the log",
            build: |dir| vhdx_block_1_at(dir, |path| vhdx_log(path).0),
            mentions: "BAT",
        },
        Case {
            name: "vhdx BAT entry past the end of the file",
            build: |dir| vhdx_block_1_at(dir, |path| file_len(path) + 64 * MIB),
            mentions: "BAT",
        },
        Case {
            name: "vhdx two BAT entries for one block",
            build: |dir| vhdx_block_1_at(dir, |path| vhdx_bat_get(path, 0)),
            mentions: "BAT",
        },
        Case {
            name: "vhdx sector bitmap entry at the BAT",
            build: |dir| {
                let path = child(dir, Format::Vhdx);
                let (bat, _) = vhdx_region(&path, bat_region());
                // 1 MiB blocks of 512-byte sectors: 4096 payload entries per chunk, then
                // the chunk's sector bitmap entry (state 6: present).
                vhdx_bat_set(&path, 4096, bat | 6);
                path
            },
            mentions: "BAT",
        },
    ]);
}

/// A 64 TiB disk of 1 MiB blocks (a 513 MiB BAT) in a sparse 1 TiB file, its BAT moved
/// to 512 GiB where the file holds only zeros: every block unallocated, a valid image.
fn vhdx_sparse_64_tib(dir: &Path) -> PathBuf {
    let path = vhdx(dir);
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(TIB)
        .unwrap();
    patch(
        &path,
        vhdx_item(&path, VIRTUAL_DISK_SIZE),
        &(64 * TIB).to_le_bytes(),
    );
    vhdx_region_set(&path, bat_region(), 16, &(512u64 << 30).to_le_bytes());
    vhdx_region_set(&path, bat_region(), 24, &(520 * MIB as u32).to_le_bytes());
    path
}

#[test]
fn vhdx_huge_declared_sizes() {
    run_cases(&[
        Case {
            name: "vhdx of 1 EiB",
            build: |dir| vhdx_item_value(dir, VIRTUAL_DISK_SIZE, &(1u64 << 60).to_le_bytes()),
            mentions: "size",
        },
        Case {
            name: "vhdx of 64 TiB in an 8 MiB file",
            build: |dir| vhdx_item_value(dir, VIRTUAL_DISK_SIZE, &(64 * TIB).to_le_bytes()),
            mentions: "BAT",
        },
        Case {
            name: "vhdx of 64 TiB with a 513 MiB BAT in a sparse 1 TiB file",
            build: vhdx_sparse_64_tib,
            mentions: "BAT",
        },
    ]);
}

#[test]
fn vhdx_logs_aimed_at_the_wrong_places() {
    run_cases(&[
        Case {
            name: "vhdx log entry writing the headers",
            build: |dir| vhdx_with_log(dir, &[Update::Data(HEADERS[0], vec![0xAB; 4096])], &[]),
            mentions: "log",
        },
        Case {
            name: "vhdx log entry writing the file identifier",
            build: |dir| vhdx_with_log(dir, &[Update::Data(0, vec![0xAB; 4096])], &[]),
            mentions: "log",
        },
        Case {
            name: "vhdx log entry writing at 2^60",
            build: |dir| vhdx_with_log(dir, &[Update::Data(1 << 60, vec![0xAB; 4096])], &[]),
            mentions: "log",
        },
        Case {
            name: "vhdx log entry writing near u64::MAX",
            build: |dir| vhdx_with_log(dir, &[Update::Data(!4095u64, vec![0xAB; 4096])], &[]),
            mentions: "log",
        },
        Case {
            name: "vhdx log entry zeroing 2^60 bytes",
            build: |dir| vhdx_with_log(dir, &[Update::Zero(4 * MIB, 1 << 60)], &[]),
            mentions: "log",
        },
        Case {
            name: "vhdx log entry zeroing up to u64::MAX",
            build: |dir| vhdx_with_log(dir, &[Update::Zero(4 * MIB, !4095u64)], &[]),
            mentions: "log",
        },
        Case {
            name: "vhdx log entry length near u32::MAX",
            build: |dir| {
                let len = 0xFFFF_F000u32.to_le_bytes();
                vhdx_with_log(dir, &[Update::Zero(4 * MIB, 4096)], &[(8, &len)])
            },
            mentions: "log",
        },
        Case {
            name: "vhdx log entry descriptor count u32::MAX",
            build: |dir| {
                let count = u32::MAX.to_le_bytes();
                vhdx_with_log(dir, &[Update::Zero(4 * MIB, 4096)], &[(24, &count)])
            },
            mentions: "log",
        },
        Case {
            name: "vhdx log entry last file offset 2^62",
            build: |dir| {
                let last = (1u64 << 62).to_le_bytes();
                vhdx_with_log(dir, &[Update::Zero(4 * MIB, 4096)], &[(56, &last)])
            },
            mentions: "log",
        },
        Case {
            name: "vhdx log entry flushed file offset near u64::MAX",
            build: |dir| {
                let flushed = (!(MIB - 1)).to_le_bytes();
                vhdx_with_log(dir, &[Update::Zero(4 * MIB, 4096)], &[(48, &flushed)])
            },
            mentions: "log",
        },
        Case {
            name: "vhdx dirty log of length near u32::MAX",
            build: |dir| {
                let path = vhdx_with_log(dir, &[Update::Zero(4 * MIB, 4096)], &[]);
                vhdx_header(&path, 68, &0xFFF0_0000u32.to_le_bytes());
                path
            },
            mentions: "log",
        },
    ]);
}

/// A VHDX child whose parent locator item has `value` at byte `field` of the item.
fn vhdx_locator(dir: &Path, field: u64, value: &[u8]) -> PathBuf {
    let path = child(dir, Format::Vhdx);
    patch(&path, vhdx_item(&path, PARENT_LOCATOR) + field, value);
    path
}

#[test]
fn vhdx_parent_locators_with_absurd_fields() {
    run_cases(&[
        Case {
            name: "vhdx parent locator key-value count u16::MAX",
            build: |dir| vhdx_locator(dir, 18, &u16::MAX.to_le_bytes()),
            mentions: "parent locator",
        },
        Case {
            name: "vhdx parent locator key offset u32::MAX",
            build: |dir| vhdx_locator(dir, 20, &u32::MAX.to_le_bytes()),
            mentions: "parent locator",
        },
        Case {
            name: "vhdx parent locator value offset u32::MAX",
            build: |dir| vhdx_locator(dir, 24, &u32::MAX.to_le_bytes()),
            mentions: "parent locator",
        },
        Case {
            name: "vhdx parent locator key length u16::MAX",
            build: |dir| vhdx_locator(dir, 28, &u16::MAX.to_le_bytes()),
            mentions: "parent locator",
        },
        Case {
            name: "vhdx parent locator value length u16::MAX",
            build: |dir| vhdx_locator(dir, 30, &u16::MAX.to_le_bytes()),
            mentions: "parent locator",
        },
        Case {
            name: "vhdx parent locator item length u32::MAX",
            build: |dir| {
                let path = child(dir, Format::Vhdx);
                let entry = vhdx_item_entry(&path, PARENT_LOCATOR);
                patch(&path, entry + 20, &u32::MAX.to_le_bytes());
                path
            },
            mentions: "metadata item",
        },
    ]);
}

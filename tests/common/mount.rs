//! The real-mount harness: runs the `vdisk-mount` binary as a user would (background mode),
//! and guards every mount, loop device and filesystem mount so a failing test still
//! cleans up after itself.

use super::run;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, Once, PoisonError};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_vdisk-mount");

/// How long a daemon may take to exit after its mount went away.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether FUSE mounts can run here. Without `/dev/fuse` the tests skip (saying why), but
/// only outside CI: under `CI` a missing device fails the test instead of hiding it.
pub fn fuse_available() -> bool {
    device_available("/dev/fuse")
}

/// Like [`fuse_available`], for tests that also attach loop devices.
pub fn loop_available() -> bool {
    fuse_available() && device_available("/dev/loop-control")
}

fn device_available(device: &str) -> bool {
    if Path::new(device).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{device} is missing; CI must run the mount tests"
    );
    eprintln!("SKIPPED: {device} is absent, so real-mount tests cannot run here");
    false
}

/// What the harness adds in front of every mount's options, per `VDISK_TEST_TRANSPORT`:
/// `io_uring` serves every mount through FUSE over io_uring (`io_uring=on`, so a kernel
/// that does not offer it fails the tests rather than letting them pass over `/dev/fuse`),
/// `dev_fuse` through `/dev/fuse`; unset, the daemon's default (`auto`) decides.
pub fn transport_options() -> &'static [&'static str] {
    match std::env::var("VDISK_TEST_TRANSPORT").as_deref() {
        Err(_) => &[],
        Ok("io_uring") => &["io_uring=on"],
        Ok("dev_fuse") => &["io_uring=off"],
        Ok(other) => panic!("VDISK_TEST_TRANSPORT={other}: expected io_uring or dev_fuse"),
    }
}

/// Whether anything is mounted at `path`, per this process's mount table.
pub fn is_mounted(path: &Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let target = path.to_str().unwrap().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(target.as_str()))
}

/// A live `vdisk-mount` mount on a fresh temporary directory.
pub struct Mount {
    mountpoint: tempfile::TempDir,
    daemon: Option<libc::pid_t>,
}

impl Mount {
    /// Mounts `image` with the given `-o` options and checks that `disk.img` is there.
    pub fn new(image: &Path, options: &[&str]) -> Mount {
        let mountpoint = tempfile::tempdir().unwrap();
        let out = Self::start(image, options, mountpoint.path());
        assert!(
            out.status.success(),
            "vdisk-mount {options:?} {} failed ({}): {}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let daemon = find_daemon(mountpoint.path());
        let mount = Mount {
            mountpoint,
            daemon: Some(daemon),
        };
        assert!(is_mounted(mount.mountpoint()), "mount is not in the table");
        if !options.iter().any(|o| o.contains("partitions=only")) {
            assert!(mount.disk().is_file(), "disk.img missing after mount");
        }
        mount
    }

    /// Mounts on a fresh directory by running the command `command_for(mountpoint)` builds
    /// (mount(8), `mount.fuse3`: whatever starts the daemon and returns once it is
    /// mounted), then takes charge of the daemon it left running.
    pub fn by_command(command_for: impl FnOnce(&Path) -> Command) -> Mount {
        let mountpoint = tempfile::tempdir().unwrap();
        become_subreaper();
        let mut command = command_for(mountpoint.path());
        let out = command.output().expect("cannot run the mount command");
        assert!(
            out.status.success(),
            "{command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let daemon = find_daemon(mountpoint.path());
        Self::adopt(mountpoint, daemon)
    }

    /// Runs `vdisk-mount -f` (after `configure` has had its say, e.g. to capture stderr or
    /// set the environment) and returns once it has mounted.
    pub fn foreground(
        image: &Path,
        options: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Mount {
        let mountpoint = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("-f");
        for o in transport_options().iter().chain(options) {
            cmd.args(["-o", o]);
        }
        cmd.arg(image).arg(mountpoint.path());
        configure(&mut cmd);
        // Reaped by pid once the mount ends, like a background daemon.
        #[allow(clippy::zombie_processes)]
        let mut child = cmd.spawn().expect("cannot run vdisk-mount");
        let start = Instant::now();
        while !is_mounted(mountpoint.path()) {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("vdisk-mount -f {} exited: {status}", image.display());
            }
            assert!(start.elapsed() < Duration::from_secs(30), "mount timed out");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self::adopt(mountpoint, child.id() as libc::pid_t)
    }

    /// Takes charge of `daemon`, a child of this process serving `mountpoint`.
    pub fn adopt(mountpoint: tempfile::TempDir, daemon: libc::pid_t) -> Mount {
        let mount = Mount {
            mountpoint,
            daemon: Some(daemon),
        };
        assert!(is_mounted(mount.mountpoint()), "mount is not in the table");
        mount
    }

    /// Runs `vdisk-mount` in background mode and returns its output, mounted or not.
    pub fn start(image: &Path, options: &[&str], mountpoint: &Path) -> Output {
        become_subreaper();
        let mut cmd = Command::new(BIN);
        for o in transport_options().iter().chain(options) {
            cmd.args(["-o", o]);
        }
        cmd.arg(image).arg(mountpoint);
        cmd.output().expect("cannot run vdisk-mount")
    }

    pub fn mountpoint(&self) -> &Path {
        self.mountpoint.path()
    }

    pub fn disk(&self) -> PathBuf {
        self.mountpoint().join("disk.img")
    }

    pub fn daemon_pid(&self) -> libc::pid_t {
        self.daemon.unwrap()
    }

    /// Unmounts as a user would and asserts that the daemon exits 0, with the image closed.
    pub fn unmount(self) {
        assert_eq!(
            self.unmount_status(),
            Some(0),
            "daemon did not exit cleanly"
        );
    }

    /// Unmounts as a user would and returns the daemon's exit code.
    pub fn unmount_status(mut self) -> Option<i32> {
        // A loop device just detached may hold disk.img open for a moment longer.
        let start = Instant::now();
        loop {
            let out = Command::new("fusermount3")
                .arg("-u")
                .arg(self.mountpoint())
                .output()
                .unwrap();
            if out.status.success() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "fusermount3 -u {}: {}",
                self.mountpoint().display(),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = wait_for_exit(self.daemon.take().unwrap());
        assert!(!is_mounted(self.mountpoint()));
        status
    }

    /// Kills the daemon the way the OOM killer would (SIGKILL: nothing flushed, nothing
    /// closed), then detaches the dead mount it leaves (lazily: files may still be open).
    pub fn kill(mut self) {
        let pid = self.daemon.take().unwrap();
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        assert_eq!(wait_for_exit(pid), None, "daemon survived SIGKILL");
        run(Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(self.mountpoint()));
        assert!(!is_mounted(self.mountpoint()));
    }

    /// Sends `signal` to the daemon and returns its exit code once it has exited (`None`
    /// if the signal killed it).
    pub fn signal(mut self, signal: libc::c_int) -> Option<i32> {
        let pid = self.daemon.take().unwrap();
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        wait_for_exit(pid)
    }

    /// Waits for the daemon to exit after something else ended the mount; returns its exit
    /// code (`None` if a signal killed it).
    pub fn wait_for_exit(mut self) -> Option<i32> {
        wait_for_exit(self.daemon.take().unwrap())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let Some(daemon) = self.daemon.take() else {
            return;
        };
        if is_mounted(self.mountpoint()) {
            let unmounted = Command::new("fusermount3")
                .arg("-u")
                .arg(self.mountpoint())
                .status()
                .is_ok_and(|s| s.success());
            if !unmounted {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(self.mountpoint())
                    .status();
            }
        }
        let status = try_wait_for_exit(daemon);
        if !std::thread::panicking() {
            assert_eq!(status, Ok(Some(0)), "daemon did not exit cleanly");
        }
    }
}

/// The background daemon outlives the `vdisk-mount` command that started it; as a
/// subreaper this test process inherits it, so it can wait for it and see its exit code.
pub fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(rc, 0, "prctl(PR_SET_CHILD_SUBREAPER)");
    });
}

/// The daemon serving `mountpoint`: our child (by inheritance) whose command line names it.
pub fn find_daemon(mountpoint: &Path) -> libc::pid_t {
    let me = std::process::id().to_string();
    let wanted = mountpoint.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, ...
        let Some(ppid) = stat.rsplit_once(')').and_then(|(_, r)| r.split(' ').nth(2)) else {
            continue;
        };
        if ppid != me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|&b| b == 0).any(|arg| arg == wanted) {
            return pid;
        }
    }
    panic!("no vdisk-mount daemon found for {}", mountpoint.display());
}

/// Reaps `pid`, returning its exit code (`None` if killed by a signal).
fn wait_for_exit(pid: libc::pid_t) -> Option<i32> {
    try_wait_for_exit(pid).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`wait_for_exit`], but reports trouble instead of panicking (for use in `Drop`,
/// where a second panic would abort the test run).
fn try_wait_for_exit(pid: libc::pid_t) -> Result<Option<i32>, String> {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer; WNOHANG never blocks.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc < 0 {
            return Err(format!(
                "waitpid({pid}): {}",
                std::io::Error::last_os_error()
            ));
        }
        if rc == pid {
            return Ok(libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)));
        }
        if start.elapsed() > EXIT_TIMEOUT {
            return Err(format!(
                "daemon {pid} still running {EXIT_TIMEOUT:?} after unmount"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where an installed vdisk-mount lives: in the shell's default search path, which is
/// what `mount.fuse3` gets when mount(8) runs it (without PATH), and where the shipped
/// systemd units expect it.
pub const INSTALLED: &str = "/usr/local/bin/vdisk-mount";

/// The binary under test at [`INSTALLED`] for as long as this lives. Tests that need it
/// skip when another vdisk-mount is installed there (never under `CI`). Tests running side
/// by side in one process take turns: the first to finish would otherwise remove the link
/// while the other still relies on it.
pub struct Installed {
    _turn: MutexGuard<'static, ()>,
}

impl Installed {
    pub fn new() -> Option<Installed> {
        static TURN: Mutex<()> = Mutex::new(());
        // A test that failed while holding its turn leaves nothing behind to protect.
        let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
        match std::fs::read_link(INSTALLED) {
            Ok(target) if target == Path::new(BIN) => return Some(Installed { _turn: turn }),
            _ if Path::new(INSTALLED).exists() => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "{INSTALLED} exists; CI must run the tests that install vdisk-mount"
                );
                eprintln!("SKIPPED: {INSTALLED} is installed already; not replacing it");
                return None;
            }
            _ => {}
        }
        // A dangling link left by an interrupted run.
        let _ = std::fs::remove_file(INSTALLED);
        std::fs::create_dir_all(Path::new(INSTALLED).parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(BIN, INSTALLED).unwrap();
        Some(Installed { _turn: turn })
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(INSTALLED);
    }
}

/// A loop device over a file, detached on drop.
pub struct LoopDevice {
    device: PathBuf,
}

impl LoopDevice {
    pub fn attach(file: &Path) -> LoopDevice {
        Self::losetup(&["-f", "--show"], file)
    }

    /// Attached with direct I/O: the loop driver then submits requests to `file`
    /// asynchronously, several at a time, as it does for most users.
    pub fn attach_direct_io(file: &Path) -> LoopDevice {
        Self::losetup(&["-f", "--show", "--direct-io=on"], file)
    }

    pub fn attach_read_only(file: &Path) -> LoopDevice {
        Self::losetup(&["-f", "--show", "-r"], file)
    }

    /// A read-only loop device over `file` from byte `offset` on (a partition inside a
    /// disk image).
    pub fn attach_read_only_at(file: &Path, offset: u64) -> LoopDevice {
        Self::losetup(&["-f", "--show", "-r", "-o", &offset.to_string()], file)
    }

    /// A loop device over `file` with logical sectors of `sector` bytes.
    pub fn attach_with_sector_size(file: &Path, sector: u32) -> LoopDevice {
        Self::losetup(
            &["-f", "--show", "--sector-size", &sector.to_string()],
            file,
        )
    }

    /// Attached with losetup's `args` (which must include `--show`).
    pub fn attach_with(args: &[&str], file: &Path) -> LoopDevice {
        Self::losetup(args, file)
    }

    fn losetup(args: &[&str], file: &Path) -> LoopDevice {
        let out = run(Command::new("losetup").args(args).arg(file));
        let device = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        LoopDevice { device }
    }

    pub fn path(&self) -> &Path {
        &self.device
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// A kernel filesystem mounted from a device, unmounted on drop.
pub struct FsMount {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl FsMount {
    pub fn new(device: &Path) -> FsMount {
        Self::mount(&[], device)
    }

    pub fn new_read_only(device: &Path) -> FsMount {
        Self::mount(&["-o", "ro"], device)
    }

    /// A tmpfs of `size` bytes: a filesystem that fills up quickly.
    pub fn tmpfs(size: u64) -> FsMount {
        let options = format!("size={size}");
        Self::mount(&["-t", "tmpfs", "-o", &options], Path::new("tmpfs"))
    }

    /// Mounts with `-o options`, e.g. `ro,norecovery`.
    pub fn with_options(device: &Path, options: &str) -> FsMount {
        Self::mount(&["-o", options], device)
    }

    fn mount(args: &[&str], device: &Path) -> FsMount {
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("mount").args(args).arg(device).arg(dir.path()));
        FsMount { dir, mounted: true }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A clean unmount (not lazy), so the filesystem is written back before it returns.
    /// Another process briefly looking inside the directory makes the kernel answer
    /// "busy"; that is retried for a few seconds before it counts as a failure.
    pub fn unmount(mut self) {
        self.mounted = false;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("umount")
                .arg(self.dir.path())
                .output()
                .unwrap();
            let busy = String::from_utf8_lossy(&out.stderr).contains("busy");
            if out.status.success() || !busy || Instant::now() > deadline {
                assert!(
                    out.status.success(),
                    "umount {} failed: {}",
                    self.dir.path().display(),
                    String::from_utf8_lossy(&out.stderr)
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `umount -l`: the filesystem leaves the namespace at once but lives on for whoever
    /// still has files open on it.
    pub fn detach(mut self) {
        self.mounted = false;
        run(Command::new("umount").arg("-l").arg(self.dir.path()));
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Runs `program` as user `uid` and group `gid` (no supplementary groups); needs root.
pub fn run_as(uid: u32, gid: u32, program: &str, args: &[&std::ffi::OsStr]) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(program)
        .args(args)
        .output()
        .unwrap()
}

/// Whether this process may act as other users (the tests that do skip otherwise, but
/// never under `CI`).
pub fn can_switch_users() -> bool {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } == 0 {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must run as root");
    eprintln!("SKIPPED: switching to another user needs root");
    false
}

/// Byte offsets of the partitions in a partitioned disk (MBR or GPT), as `sfdisk -J`
/// reads its partition table.
pub fn partition_offsets(disk: &Path) -> Vec<u64> {
    let out = run(Command::new("sfdisk").arg("-J").arg(disk));
    let json = String::from_utf8(out.stdout).unwrap();
    let number = |line: &str, key: &str| -> Option<u64> {
        let value = line.trim().strip_prefix(&format!("\"{key}\": "))?;
        Some(value.trim_end_matches(',').parse().unwrap())
    };
    let sector_size = json
        .lines()
        .find_map(|line| number(line, "sectorsize"))
        .unwrap_or_else(|| panic!("sfdisk -J gave no sector size: {json}"));
    json.lines()
        .filter_map(|line| number(line, "start"))
        .map(|start| start * sector_size)
        .collect()
}

/// sha256 of a whole file, hashed by `openssl` (fast even in unoptimised test builds, where
/// the mounted disks of multi-GiB images would take minutes to hash).
pub fn sha256_by_openssl(path: &Path) -> String {
    let out = run(Command::new("openssl")
        .args(["dgst", "-sha256", "-r"])
        .arg(path));
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// The LogGuid of the current VHDX header (the valid one with the higher sequence number),
/// read straight from the file's bytes: zero means no log is waiting for replay.
pub fn vhdx_log_guid(image: &Path) -> [u8; 16] {
    const HEADER_OFFSETS: [u64; 2] = [64 * 1024, 128 * 1024];
    const HEADER_SIZE: usize = 4096;
    let file = std::fs::File::open(image).unwrap();
    let mut current: Option<(u64, [u8; 16])> = None;
    for offset in HEADER_OFFSETS {
        let mut header = vec![0u8; HEADER_SIZE];
        file.read_exact_at(&mut header, offset).unwrap();
        // Signature "head" at 0, CRC-32C at 4 (computed with itself zeroed), sequence
        // number at 8, file and data write GUIDs at 16 and 32, LogGuid at 48.
        let checksum = u32::from_le_bytes(header[4..8].try_into().unwrap());
        header[4..8].fill(0);
        if &header[..4] != b"head" || crc32c::crc32c(&header) != checksum {
            continue;
        }
        let sequence = u64::from_le_bytes(header[8..16].try_into().unwrap());
        if current.is_none_or(|(s, _)| sequence > s) {
            current = Some((sequence, header[48..64].try_into().unwrap()));
        }
    }
    current
        .unwrap_or_else(|| panic!("{}: no valid VHDX header", image.display()))
        .1
}

/// Deterministic, position-dependent bytes, so a misplaced write shows up.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An image qemu-img creates in `qemu_format` (`vpc`, `vhdx`) with `options`, `size`
/// bytes as qemu rounds it, and qemu-io patterns near the start, across the first
/// `block` boundary, in the middle and near the end.
pub fn qemu_image_with_patterns(
    dir: &Path,
    name: &str,
    qemu_format: &str,
    options: &str,
    size: u64,
    block: u64,
) -> PathBuf {
    let image = dir.join(name);
    super::qemu_img(&[
        "create",
        "-f",
        qemu_format,
        "-o",
        options,
        image.to_str().unwrap(),
        &size.to_string(),
    ]);
    let virtual_size = super::qemu_virtual_size(&format!(
        "driver={qemu_format},file.filename={}",
        image.display()
    ));
    let last = virtual_size / 512 * 512 - 64 * 1024;
    super::qemu_io(
        qemu_format,
        &image,
        &[
            "write -P 0x11 0 64k",
            &format!("write -P 0x22 {} 4k", block - 2048),
            &format!("write -P 0x33 {} 1m", virtual_size / 2 / 512 * 512),
            &format!("write -P 0x44 {last} 64k"),
        ],
    );
    image
}

/// Writes that stress a disk of `size` bytes with `block` bytes per allocation unit:
/// unaligned, across block boundaries, a large one, and the last sector and bytes.
pub fn awkward_writes(size: u64, block: u64) -> Vec<(u64, usize)> {
    let mut writes = vec![
        (1, 100),
        (511, 2),
        (block - 1000, 3000),
        (2 * block + 12_345, (block + 7) as usize),
        (size / 2 - 1, 4099),
        (size - 512, 512),
        (size - 3, 3),
    ];
    writes.retain(|&(offset, len)| offset + len as u64 <= size);
    writes
}

/// Applies the same writes to the mounted `disk.img` and to a plain reference file, and
/// checks that a write straddling the end is cut short and one past it is refused.
pub fn write_both(disk_img: &Path, reference: &Path, writes: &[(u64, usize)]) {
    let disk = OpenOptions::new().write(true).open(disk_img).unwrap();
    let plain = OpenOptions::new().write(true).open(reference).unwrap();
    for (i, &(offset, len)) in writes.iter().enumerate() {
        let data = pattern(i as u64 + offset, len);
        disk.write_all_at(&data, offset)
            .unwrap_or_else(|e| panic!("write of {len} bytes at {offset}: {e}"));
        plain.write_all_at(&data, offset).unwrap();
    }
    let size = disk.metadata().unwrap().len();
    let tail = pattern(size, 1000);
    assert_eq!(
        disk.write_at(&tail, size - 10).unwrap(),
        10,
        "straddling write"
    );
    plain.write_all_at(&tail[..10], size - 10).unwrap();
    let past = disk.write_at(b"x", size).unwrap_err();
    assert_eq!(past.raw_os_error(), Some(libc::ENOSPC));
    disk.sync_all().unwrap();
    assert_eq!(disk.metadata().unwrap().len(), size, "size changed");
}

/// Punches the same holes into the mounted `disk.img` (FALLOC_FL_PUNCH_HOLE, which the
/// daemon turns into a discard) and zeros into a plain reference file. Ranges may run past
/// the end; only the part inside the disk changes.
pub fn punch_both(disk_img: &Path, reference: &Path, ranges: &[(u64, u64)]) {
    use std::os::fd::AsRawFd;
    let disk = OpenOptions::new().write(true).open(disk_img).unwrap();
    let plain = OpenOptions::new().write(true).open(reference).unwrap();
    let size = disk.metadata().unwrap().len();
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    for &(offset, len) in ranges {
        let (start, span) = (offset as libc::off_t, len as libc::off_t);
        // SAFETY: a plain syscall on an open descriptor.
        let rc = unsafe { libc::fallocate(disk.as_raw_fd(), mode, start, span) };
        assert_eq!(
            rc,
            0,
            "punching {len} bytes at {offset}: {}",
            std::io::Error::last_os_error()
        );
        let end = (offset + len).min(size);
        plain
            .write_all_at(&vec![0u8; (end - offset) as usize], offset)
            .unwrap();
    }
    disk.sync_all().unwrap();
    assert_eq!(disk.metadata().unwrap().len(), size, "size changed");
}

/// Byte-for-byte equality of two files (`cmp` reads both in full).
pub fn assert_same_bytes(a: &Path, b: &Path) {
    run(Command::new("cmp").arg(a).arg(b));
}

/// The raw bytes qemu sees in `image`, copied sparsely into `dst`.
pub fn reference_copy(qemu_format: &str, image: &Path, dst: &Path) {
    super::qemu_convert_to_raw(qemu_format, image, dst);
}

/// `qemu-img compare` of `image` against the raw file `reference` must find them identical.
pub fn assert_qemu_identical(qemu_format: &str, image: &Path, reference: &Path) {
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", qemu_format, "-F", "raw"])
        .arg(image)
        .arg(reference));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("identical"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The full round trip every format must pass through a real mount:
/// 1. the mounted `disk.img` equals qemu's raw conversion of the image;
/// 2. awkward writes and punched holes through the mount, unmount, and qemu finds the
///    image identical to a raw file that received the same writes and zeros;
/// 3. a read-only remount reads the same bytes back (also through a sparse copy, which
///    trusts SEEK_HOLE), refuses writes with EROFS and leaves the image file untouched.
///
/// Returns how many bytes of the disk SEEK_HOLE reported as holes.
pub fn round_trip(image: &Path, qemu_format: &str, options: &[&str], block: u64) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference.raw");
    reference_copy(qemu_format, image, &reference);

    let mount = Mount::new(image, options);
    let size = std::fs::metadata(mount.disk()).unwrap().len();
    assert_eq!(size, std::fs::metadata(&reference).unwrap().len(), "size");
    assert_same_bytes(&mount.disk(), &reference);
    write_both(&mount.disk(), &reference, &awkward_writes(size, block));
    // One hole covering a whole block with ragged ends, one running past the end.
    let holes = [(block - 700, 2 * block + 1400), (size - 1000, 2000)];
    punch_both(&mount.disk(), &reference, &holes);
    mount.unmount();
    assert_qemu_identical(qemu_format, image, &reference);
    super::qemu_check_clean(qemu_format, image);

    let mut ro = options.to_vec();
    ro.push("ro");
    let before = super::sha256_file(image);
    let mount = Mount::new(image, &ro);
    assert_same_bytes(&mount.disk(), &reference);
    let hole_bytes = assert_holes_read_as_zeros(&mount.disk(), &reference);
    assert_read_only(&mount.disk());
    mount.unmount();
    assert_eq!(
        super::sha256_file(image),
        before,
        "read-only mount changed the image"
    );
    hole_bytes
}

/// Start of the next `whence` (SEEK_DATA or SEEK_HOLE) region at or after `offset`, or
/// `None` past the last one.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor.
    let pos = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if pos < 0 {
        let err = std::io::Error::last_os_error();
        assert_eq!(err.raw_os_error(), Some(libc::ENXIO), "lseek: {err}");
        return None;
    }
    Some(pos as u64)
}

/// Walks the holes `disk_img` reports with SEEK_DATA/SEEK_HOLE (what sparse-aware copies
/// skip without reading) and checks that `reference` holds only zeros there. Returns the
/// total size of the holes.
pub fn assert_holes_read_as_zeros(disk_img: &Path, reference: &Path) -> u64 {
    let disk = File::open(disk_img).unwrap();
    let plain = File::open(reference).unwrap();
    let size = disk.metadata().unwrap().len();
    let mut total = 0;
    let mut pos = 0;
    while let Some(hole) = seek(&disk, pos, libc::SEEK_HOLE).filter(|&h| h < size) {
        let end = seek(&disk, hole, libc::SEEK_DATA).unwrap_or(size);
        assert!(end > hole, "empty hole at {hole}");
        total += end - hole;
        // Only the reference's own data inside the hole needs reading.
        let mut at = hole;
        while let Some(data) = seek(&plain, at, libc::SEEK_DATA).filter(|&d| d < end) {
            let data_end = seek(&plain, data, libc::SEEK_HOLE).unwrap_or(end).min(end);
            let mut buf = vec![0u8; (data_end - data) as usize];
            plain.read_exact_at(&mut buf, data).unwrap();
            if let Some(i) = buf.iter().position(|&b| b != 0) {
                panic!(
                    "{} reports a hole over [{hole}, {end}) but byte {} is not zero",
                    disk_img.display(),
                    data + i as u64
                );
            }
            at = data_end;
        }
        pos = end;
    }
    total
}

/// Every way of changing a read-only `disk.img` fails with EROFS.
pub fn assert_read_only(disk_img: &Path) {
    let err = OpenOptions::new().write(true).open(disk_img).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "open for writing");
    let file = File::open(disk_img).unwrap();
    assert!(file.write_at(b"x", 0).is_err(), "write on a read-only fd");
    let err = File::create(disk_img.with_file_name("new")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "create");
}

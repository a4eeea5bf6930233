//! Partition files through a real mount: the mount shows `partN.img` beside `disk.img`
//! exactly where and as numbered as libblkid finds the partitions (`partx`, the
//! independent reader; the kernels here cannot scan loop devices for partitions),
//! follows a table rewritten while mounted, and
//! writes through a partition file land at the right offset of the image (qemu-img
//! compare against a raw copy written the same way).

use crate::common;
use crate::common::mount::{self, LoopDevice, Mount};
use crate::common::partitions::{blkid_type, names_in, sfdisk};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

/// A partition as libblkid found it: number, first byte, length in bytes.
type Found = (u32, u64, u64);

/// A raw disk of `size` bytes in 512-byte sectors, partitioned by sfdisk.
fn partitioned_raw(dir: &Path, size: u64, script: &str) -> PathBuf {
    let raw = dir.join("disk.raw");
    File::create(&raw).unwrap().set_len(size).unwrap();
    sfdisk(&raw, 512, &[], &[], script);
    raw
}

/// The partitions libblkid finds on `path` (through `partx`, which lists them as Linux
/// numbers them, the extended container of an MBR included): number, first byte, bytes.
/// A disk of 4096-byte sectors is read through a loop device that has them.
fn partx(path: &Path, sector_size: u32) -> Vec<Found> {
    let device = (sector_size != 512).then(|| {
        let size = sector_size.to_string();
        LoopDevice::attach_with(&["-f", "--show", "-r", "--sector-size", &size], path)
    });
    let target = device.as_ref().map_or(path, |d| d.path());
    let out = common::run(
        Command::new("partx")
            .args(["-s", "-g", "-o", "NR,START,SECTORS"])
            .arg(target),
    );
    // partx counts in 512-byte units whatever the sector size.
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let v: Vec<u64> = line
                .split_whitespace()
                .map(|f| f.parse().unwrap())
                .collect();
            (v[0] as u32, v[1] * 512, v[2] * 512)
        })
        .collect()
}

/// A dynamic VHDX beside `raw` holding its bytes, made by qemu-img.
fn vhdx_copy(raw: &Path) -> PathBuf {
    let image = raw.with_extension("vhdx");
    common::qemu_img(&[
        "convert",
        "-O",
        "vhdx",
        raw.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    image
}

/// `len` bytes of `path` from `offset`.
fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0; len as usize];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Every partition file but the extended container's holds exactly the bytes of its
/// partition in `disk` (a raw file or the mount's disk.img) where libblkid found it.
fn assert_partition_files_match(mount: &Mount, disk: &Path, found: &[Found], numbers: &[u32]) {
    for &n in numbers {
        let &(_, start, len) = found.iter().find(|p| p.0 == n).unwrap();
        let file = mount.mountpoint().join(format!("part{n}.img"));
        assert_eq!(
            std::fs::metadata(&file).unwrap().len(),
            len,
            "part{n}.img size"
        );
        assert_eq!(
            common::sha256_file(&file),
            common::sha256_bytes(&read_range(disk, start, len)),
            "part{n}.img differs from partition {n} of {}",
            disk.display()
        );
    }
}

/// Runs `mkfs` (with `args`) over bytes `start..start + len` of `disk` through a loop
/// device of its own: the filesystem lands where libblkid says the partition is.
fn mkfs_at(disk: &Path, start: u64, len: u64, mkfs: &[&str]) {
    let (offset, limit) = (start.to_string(), len.to_string());
    let device = LoopDevice::attach_with(
        &["-f", "--show", "-o", &offset, "--sizelimit", &limit],
        disk,
    );
    common::run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(device.path()));
}

fn names_for(numbers: impl IntoIterator<Item = u32>) -> Vec<String> {
    let mut names: Vec<String> = numbers
        .into_iter()
        .map(|n| format!("part{n}.img"))
        .collect();
    names.push("disk.img".to_string());
    names.sort();
    names
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(data, offset).unwrap();
    file.sync_all().unwrap();
}

/// Primary and logical partitions of an MBR (the extended container gets no file, and
/// the first logical partition is part5), filesystems made at the partitions' offsets
/// recognised in the files, writes landing at the right offset, and the `partitions=`
/// choices.
#[test]
fn mbr_primary_and_logical_partitions_are_files_where_linux_finds_them() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = partitioned_raw(
        dir.path(),
        64 * MIB,
        "label: dos\n,8M,L\n,8M,L\n,,E\n,8M,L\n,8M,L\n",
    );
    let found = partx(&raw, 512);
    let numbers: Vec<u32> = found.iter().map(|p| p.0).collect();
    assert_eq!(numbers, [1, 2, 3, 5, 6], "libblkid's partitions");
    mkfs_at(&raw, found[0].1, found[0].2, &["mkswap"]);
    mkfs_at(&raw, found[3].1, found[3].2, &["mkfs.ext4", "-q"]);
    let image = vhdx_copy(&raw);

    let vdisk = Mount::new(&image, &[]);
    assert_eq!(names_in(vdisk.mountpoint()), names_for([1, 2, 5, 6]));
    assert_partition_files_match(&vdisk, &raw, &found, &[1, 2, 5, 6]);
    let part = |n: u32| vdisk.mountpoint().join(format!("part{n}.img"));
    assert_eq!(blkid_type(&part(1)), "swap");
    assert_eq!(blkid_type(&part(5)), "ext4");

    // Unaligned, and across the end of part6 (which takes what fits).
    let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    write_at(&part(2), 12_345, &data);
    let part6_len = std::fs::metadata(part(6)).unwrap().len();
    let file = OpenOptions::new().write(true).open(part(6)).unwrap();
    assert_eq!(file.write_at(&data, part6_len - 1000).unwrap(), 1000);
    file.sync_all().unwrap();
    drop(file);
    vdisk.unmount();

    let (_, start2, _) = found[1];
    let (_, start6, len6) = found[4];
    write_at(&raw, start2 + 12_345, &data);
    write_at(&raw, start6 + len6 - 1000, &data[..1000]);
    common::qemu_compare_with_raw("vhdx", &image, &raw);
    common::qemu_check_clean("vhdx", &image);

    let only = Mount::new(&image, &["ro", "partitions=only"]);
    let mut expected = names_for([1, 2, 5, 6]);
    expected.retain(|n| n != "disk.img");
    assert_eq!(names_in(only.mountpoint()), expected);
    only.unmount();
    let off = Mount::new(&image, &["ro", "partitions=off"]);
    assert_eq!(names_in(off.mountpoint()), ["disk.img"]);
    off.unmount();
}

/// A GPT of 128 entries on a disk of 4096-byte sectors, written with sfdisk onto the
/// mounted disk: the files appear at once where libblkid finds the partitions, and a
/// filesystem made through a partition file is what disk.img shows there, even to a
/// reader that kept disk.img open meanwhile (the two files' page caches stay coherent).
/// Deleting a partition removes its file.
#[test]
fn gpt_on_4k_sectors_written_while_mounted_gives_files_at_once() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.vhdx");
    common::vdisk::vdisk_ok(&[
        "create",
        "--size",
        "64M",
        "--logical-sector",
        "4096",
        image.to_str().unwrap(),
    ]);
    let vdisk = Mount::new(&image, &[]);
    assert_eq!(names_in(vdisk.mountpoint()), ["disk.img"]);
    sfdisk(
        &vdisk.disk(),
        4096,
        &[],
        &[],
        "label: gpt\n,8M,L\n,16M,L\n,,L\n",
    );
    assert_eq!(names_in(vdisk.mountpoint()), names_for([1, 2, 3]));
    let part2 = vdisk.mountpoint().join("part2.img");
    assert_eq!(std::fs::metadata(&part2).unwrap().len(), 16 * MIB);

    let found = partx(&vdisk.disk(), 4096);
    assert_eq!(found.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(found[1].2, 16 * MIB);
    assert_partition_files_match(&vdisk, &vdisk.disk(), &found, &[1, 2, 3]);
    // A reader of disk.img that stays open, with the partition's start in its cache.
    let reader = File::open(vdisk.disk()).unwrap();
    let mut before = vec![0; 4096];
    reader
        .read_exact_at(&mut before, found[1].1 + 1024)
        .unwrap();
    common::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-b", "4096"])
            .arg(&part2),
    );
    // The other file's stale pages are dropped just after each write returns, by a thread
    // of the daemon's own: give it until a generous deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut after = vec![0; 4096];
    loop {
        reader.read_exact_at(&mut after, found[1].1 + 1024).unwrap();
        if before != after || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_ne!(before, after, "disk.img's reader still sees the old bytes");
    assert_eq!(blkid_type(&part2), "ext4");
    assert_partition_files_match(&vdisk, &vdisk.disk(), &found, &[2]);
    drop(reader);

    sfdisk(&vdisk.disk(), 4096, &["--delete"], &["3"], "");
    assert_eq!(names_in(vdisk.mountpoint()), names_for([1, 2]));
    vdisk.unmount();
    // qemu refuses VHDX of 4096-byte sectors.
    common::vdisk::vdisk_ok(&["check", image.to_str().unwrap()]);
}

/// A GPT whose primary header is damaged: the files come from the backup, as the
/// libblkid's do, and the daemon says so.
#[test]
fn damaged_primary_gpt_is_read_from_the_backup_and_said() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = partitioned_raw(dir.path(), 32 * MIB, "label: gpt\n,4M,L\n,4M,L\n,4M,L\n");
    // The primary header's CRC field.
    write_at(&raw, 512 + 16, &[0xde, 0xad, 0xbe, 0xef]);
    let found = partx(&raw, 512);
    assert_eq!(found.len(), 3, "libblkid reads the backup");
    let image = dir.path().join("disk.vhd");
    common::qemu_img(&[
        "convert",
        "-O",
        "vpc",
        "-o",
        "subformat=dynamic,force_size=on",
        raw.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let log = dir.path().join("daemon.log");
    let stderr = File::create(&log).unwrap();
    let vdisk = Mount::foreground(&image, &["ro", "log_level=warn"], |cmd| {
        cmd.stderr(stderr);
    });
    assert_eq!(names_in(vdisk.mountpoint()), names_for([1, 2, 3]));
    assert_partition_files_match(&vdisk, &raw, &found, &[1, 2, 3]);
    vdisk.unmount();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("backup"), "no word of the backup GPT: {log}");
}

/// Entries that overlap or reach past the disk get no file, each with a log line; the
/// rest of the table and disk.img are still served. A disk with no table shows disk.img
/// alone.
#[test]
fn overlapping_and_out_of_range_entries_are_refused_one_by_one() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let sectors: u32 = 64 * 2048;
    let mut mbr = vec![0u8; 512];
    // (first sector, sectors): a good one, two overlapping each other, one past the end.
    let entries = [
        (2048, 8192),
        (20480, 8192),
        (24576, 8192),
        (sectors - 100, 8192),
    ];
    for (slot, (start, len)) in entries.into_iter().enumerate() {
        let entry = &mut mbr[446 + 16 * slot..462 + 16 * slot];
        entry[4] = 0x83;
        entry[8..12].copy_from_slice(&u32::to_le_bytes(start));
        entry[12..16].copy_from_slice(&u32::to_le_bytes(len));
    }
    mbr[510..].copy_from_slice(&[0x55, 0xaa]);
    let file = File::create(&raw).unwrap();
    file.set_len(u64::from(sectors) * 512).unwrap();
    file.write_all_at(&mbr, 0).unwrap();
    file.write_all_at(b"first partition", 2048 * 512).unwrap();
    drop(file);
    let offsets = mount::partition_offsets(&raw);
    assert_eq!(offsets.len(), 4, "sfdisk lists all four entries");

    let log = dir.path().join("daemon.log");
    let stderr = File::create(&log).unwrap();
    let vdisk = Mount::foreground(&raw, &["format=raw", "log_level=warn"], |cmd| {
        cmd.stderr(stderr);
    });
    assert_eq!(names_in(vdisk.mountpoint()), names_for([1]));
    let part1 = vdisk.mountpoint().join("part1.img");
    assert_eq!(std::fs::metadata(&part1).unwrap().len(), 8192 * 512);
    let mut head = [0u8; 15];
    File::open(&part1)
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert_eq!(&head, b"first partition");
    assert_eq!(
        std::fs::metadata(vdisk.disk()).unwrap().len(),
        u64::from(sectors) * 512
    );
    vdisk.unmount();
    let log = std::fs::read_to_string(&log).unwrap();
    for n in 2..=4 {
        assert!(
            log.lines().any(|l| l.contains(&format!("partition {n}"))),
            "no log line for partition {n}: {log}"
        );
    }

    let bare = dir.path().join("bare.raw");
    File::create(&bare).unwrap().set_len(16 * MIB).unwrap();
    common::run(Command::new("mkfs.ext4").arg("-q").arg(&bare));
    let vdisk = Mount::new(&bare, &["format=raw", "ro"]);
    assert_eq!(names_in(vdisk.mountpoint()), ["disk.img"]);
    vdisk.unmount();
}

/// A user account made for a test, removed with it.
struct TestUser(String);

impl TestUser {
    fn new() -> TestUser {
        let name = format!("vdisk-rescue-{}", std::process::id());
        common::run(
            Command::new("useradd")
                .args(["--no-create-home", "--user-group", "--shell", "/bin/sh"])
                .arg(&name),
        );
        TestUser(name)
    }

    /// Runs `program` with `args` as this user, in `dir`, and asserts it succeeds.
    fn run(&self, dir: &Path, program: &str, args: &[&str]) -> String {
        let out = common::run(
            Command::new("runuser")
                .args(["-u", &self.0, "--", program])
                .args(args)
                .current_dir(dir),
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.0).status();
    }
}

/// `/dev/fuse` open to everyone, as distributions ship it (mode 0666), for as long as
/// this lives; these machines have it 0600, where even libfuse's own tools fail for a
/// user.
struct FuseDeviceForUsers(u32);

impl FuseDeviceForUsers {
    const DEVICE: &str = "/dev/fuse";

    fn open() -> FuseDeviceForUsers {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(Self::DEVICE)
            .unwrap()
            .permissions()
            .mode();
        std::fs::set_permissions(Self::DEVICE, std::fs::Permissions::from_mode(0o666)).unwrap();
        FuseDeviceForUsers(mode & 0o7777)
    }
}

impl Drop for FuseDeviceForUsers {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(Self::DEVICE, std::fs::Permissions::from_mode(self.0));
    }
}

/// The rescue README.md describes, by a user without root and without loop devices:
/// vdisk-mount through fusermount3, then fuse2fs on the ext4 partition file, and
/// ntfsprogs on the NTFS one (Debian's ntfs-3g mounts only for root: it is not setuid);
/// a file written into each; afterwards the image holds both files.
#[test]
fn a_user_without_root_rescues_files_through_partition_files() {
    if !mount::fuse_available()
        || !common::tools_installed("the rootless rescue test", &["fuse2fs", "ntfscp"])
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = partitioned_raw(dir.path(), 64 * MIB, "label: gpt\n,8M,L\n,24M,L\n,,L\n");
    let found = partx(&raw, 512);
    mkfs_at(&raw, found[1].1, found[1].2, &["mkfs.ext4", "-q"]);
    mkfs_at(
        &raw,
        found[2].1,
        found[2].2,
        &["mkfs.ntfs", "-q", "-Q", "-F"],
    );
    let image = vhdx_copy(&raw);

    let user = TestUser::new();
    let _fuse = FuseDeviceForUsers::open();
    // The user's own copy of the program, in a directory the user owns.
    std::fs::copy(mount::BIN, dir.path().join("vdisk-mount")).unwrap();
    for sub in ["disk", "linux"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    common::run(
        Command::new("chown")
            .args(["-R", &format!("{0}:{0}", user.0)])
            .arg(dir.path()),
    );
    common::run(Command::new("chmod").arg("755").arg(dir.path()));

    let served = dir.path();
    user.run(served, "./vdisk-mount", &["disk.vhdx", "disk"]);
    let mut mounted = UserMounts {
        user: &user,
        dir: served,
        mountpoints: vec!["disk"],
    };
    let listing = user.run(served, "ls", &["disk"]);
    assert_eq!(
        listing.split_whitespace().collect::<Vec<_>>(),
        ["disk.img", "part1.img", "part2.img", "part3.img"]
    );

    user.run(
        served,
        "fuse2fs",
        &["-o", "fakeroot", "disk/part2.img", "linux"],
    );
    mounted.mountpoints.push("linux");
    user.run(
        served,
        "sh",
        &[
            "-c",
            "echo rescued > linux/rescued.txt && echo from windows > w.txt \
             && ntfscp disk/part3.img w.txt w.txt",
        ],
    );
    assert_eq!(user.run(served, "cat", &["linux/rescued.txt"]), "rescued\n");
    let listing = user.run(served, "ntfsls", &["disk/part3.img"]);
    assert_eq!(listing.trim(), "w.txt");
    drop(mounted);
    // The daemon holds the image's lock until it has closed the image.
    common::run(Command::new("flock").arg(&image).arg("true"));

    common::qemu_check_clean("vhdx", &image);
    common::qemu_convert_to_raw("vhdx", &image, &raw);
    let at = |n: usize| {
        let (offset, limit) = (found[n].1.to_string(), found[n].2.to_string());
        LoopDevice::attach_with(
            &["-f", "--show", "-r", "-o", &offset, "--sizelimit", &limit],
            &raw,
        )
    };
    let ext4 = at(1);
    let out = common::run(
        Command::new("debugfs")
            .args(["-R", "cat /rescued.txt"])
            .arg(ext4.path()),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "rescued\n");
    let ntfs = at(2);
    let out = common::run(Command::new("ntfscat").arg(ntfs.path()).arg("w.txt"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from windows\n");
}

/// The user's FUSE mounts, unmounted by the user (innermost first) however the test ends.
struct UserMounts<'a> {
    user: &'a TestUser,
    dir: &'a Path,
    mountpoints: Vec<&'static str>,
}

impl Drop for UserMounts<'_> {
    fn drop(&mut self) {
        for mountpoint in self.mountpoints.iter().rev() {
            let unmounted = Command::new("runuser")
                .args(["-u", &self.user.0, "--", "fusermount3", "-u", mountpoint])
                .current_dir(self.dir)
                .status()
                .is_ok_and(|s| s.success());
            if !unmounted {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(self.dir.join(mountpoint))
                    .status();
            }
        }
    }
}

//! Real-world VHD and VHDX images from the sample corpus, served through a real mount: the
//! bytes a program reads from `disk.img` must be the ones two independent readers agreed
//! on, and a read-only mount must not change the image, even one with a log to replay.

use crate::common;
use crate::common::mount::{self, FsMount, LoopDevice, Mount};
use crate::common::partitions::{blkid_type, names_in};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

const DIRTY_LOG_IMAGES: [&str; 2] = [
    "qemu-iotests__iotest-dirtylog-10G-4M__qemu1.6-dirtylog.vhdx",
    "discutils__vhdx-log-replay__win10-15063-dirtylog.vhdx",
];

/// A read-only mount reads the replayed disk while leaving the file untouched (log still
/// pending); a read/write mount replays the log into the file, after which the file is
/// clean for qemu and still reads the same.
#[test]
fn dirty_log_images_are_replayed_in_memory_read_only_and_on_disk_read_write() {
    if !mount::fuse_available() {
        return;
    }
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for name in DIRTY_LOG_IMAGES {
        let image = common::decompress_corpus_image(&corpus, name, dir.path());
        let expected = common::expected_sha256(&corpus, &format!("{name}.raw"));
        assert_ne!(
            mount::vhdx_log_guid(&image),
            [0; 16],
            "{name} has no log to replay"
        );
        let pristine = common::sha256_file(&image);

        let ro = Mount::new(&image, &["ro"]);
        assert_eq!(
            mount::sha256_by_openssl(&ro.disk()),
            expected,
            "{name} read-only"
        );
        ro.unmount();
        assert_eq!(
            common::sha256_file(&image),
            pristine,
            "{name} changed read-only"
        );

        Mount::new(&image, &[]).unmount();
        assert_eq!(
            mount::vhdx_log_guid(&image),
            [0; 16],
            "{name}: log left pending"
        );
        common::qemu_check_clean("vhdx", &image);
        let replayed = common::sha256_file(&image);
        let ro = Mount::new(&image, &["ro"]);
        assert_eq!(
            mount::sha256_by_openssl(&ro.disk()),
            expected,
            "{name} replayed"
        );
        ro.unmount();
        assert_eq!(
            common::sha256_file(&image),
            replayed,
            "{name} changed read-only"
        );
    }
}

/// A corpus image with one partition, mounted read-only (so nothing can touch it).
struct CorpusDisk {
    vdisk: Mount,
    _dir: tempfile::TempDir,
}

impl CorpusDisk {
    fn open(corpus: &Path, name: &str) -> CorpusDisk {
        let dir = tempfile::tempdir().unwrap();
        let image = common::decompress_corpus_image(corpus, name, dir.path());
        let vdisk = Mount::new(&image, &["ro"]);
        assert_eq!(
            names_in(vdisk.mountpoint()),
            ["disk.img", "part1.img"],
            "{name}: files of the mount"
        );
        let part1 = vdisk.mountpoint().join("part1.img");
        // sfdisk, reading the table on its own, puts the partition where part1.img is.
        let offsets = mount::partition_offsets(&vdisk.disk());
        assert_eq!(offsets, [1 << 20], "{name}: partitions");
        let head = |path: &Path, offset: u64| {
            let mut buf = vec![0; 1 << 20];
            std::fs::File::open(path)
                .unwrap()
                .read_exact_at(&mut buf, offset)
                .unwrap();
            buf
        };
        assert!(
            head(&part1, 0) == head(&vdisk.disk(), offsets[0]),
            "{name}: part1.img does not start where sfdisk puts partition 1"
        );
        CorpusDisk { vdisk, _dir: dir }
    }

    fn part1(&self) -> std::path::PathBuf {
        self.vdisk.mountpoint().join("part1.img")
    }

    fn close(self) {
        self.vdisk.unmount();
    }
}

fn assert_contains_all(names: &[String], wanted: &[&str], what: &str) {
    for w in wanted {
        assert!(names.iter().any(|n| n == w), "{what}: no {w} in {names:?}");
    }
}

#[test]
fn corpus_btrfs_filesystem_mounts_from_its_partition_file() {
    if !mount::loop_available() {
        return;
    }
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let disk = CorpusDisk::open(&corpus, "discutils__btrfs__win10-15063.vhdx");
    assert_eq!(blkid_type(&disk.part1()), "btrfs");
    // Plainly, as a user would: mount(8) sets up its own loop device over the file.
    let fs = FsMount::with_options(&disk.part1(), "loop,ro");
    assert_contains_all(
        &names_in(fs.path()),
        &["folder", "opt", "subvolume"],
        "btrfs /",
    );
    assert_contains_all(
        &names_in(&fs.path().join("folder/subfolder")),
        &["file", "sparse", "compressed", "lzo"],
        "btrfs /folder/subfolder",
    );
    fs.unmount();
    disk.close();
}

#[test]
fn corpus_xfs5_filesystem_mounts_from_its_partition_file() {
    if !mount::loop_available() {
        return;
    }
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let disk = CorpusDisk::open(&corpus, "discutils__xfs5__win10-17134.vhdx");
    assert_eq!(blkid_type(&disk.part1()), "xfs");
    // The journal cannot be replayed on a read-only device.
    let fs = FsMount::with_options(&disk.part1(), "loop,ro,norecovery");
    assert_contains_all(
        &names_in(fs.path()),
        &["DATALOSS_WARNING_README.txt", "data", "folder", "huge"],
        "xfs5 /",
    );
    let readme = std::fs::read_to_string(fs.path().join("DATALOSS_WARNING_README.txt")).unwrap();
    assert_eq!(readme.len(), 333);
    assert!(
        readme.starts_with("WARNING: THIS IS A TEMPORARY DISK."),
        "{readme}"
    );
    fs.unmount();
    disk.close();
}

/// This kernel may refuse the deprecated V4 format, so `xfs_db` (which reads the device
/// itself) lists the root; a mount must either work or fail for exactly that reason.
#[test]
fn corpus_xfs4_filesystem_reads_from_its_partition_file() {
    if !mount::loop_available() {
        return;
    }
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let disk = CorpusDisk::open(&corpus, "discutils__xfs__win10-14393.vhdx");
    let loop_device = LoopDevice::attach_read_only(&disk.part1());
    let device = loop_device.path();
    assert_eq!(blkid_type(device), "xfs");
    let out = common::run(
        Command::new("xfs_db")
            .args(["-r", "-c", "ls /"])
            .arg(device),
    );
    let listing = String::from_utf8(out.stdout).unwrap();
    for name in ["data", "folder", "huge", "DATALOSS_WARNING_README.txt"] {
        assert!(
            listing.contains(&format!(" {name} (good)")),
            "xfs_db ls / lacks {name}: {listing}"
        );
    }

    // The kernel log is a ring that a busy test run fills, so lines cannot be counted:
    // a marker shows where this attempt starts.
    let marker = format!(
        "vdisk-mount test: mounting V4 xfs, pid {}",
        std::process::id()
    );
    std::fs::write("/dev/kmsg", &marker).unwrap();
    let target = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-o", "ro,norecovery"])
        .arg(device)
        .arg(target.path())
        .output()
        .unwrap()
        .status
        .success();
    if mounted {
        let names = names_in(target.path());
        common::run(Command::new("umount").arg(target.path()));
        assert_contains_all(&names, &["data", "folder", "huge"], "xfs /");
    } else {
        let loop_name = device.file_name().unwrap().to_str().unwrap();
        let refusal = format!("XFS ({loop_name}): Deprecated V4 format");
        let log = kernel_log();
        let since_marker = log
            .rsplit_once(&marker)
            .expect("the marker is in the kernel log")
            .1;
        assert!(
            since_marker.contains(&refusal),
            "mounting the V4 xfs failed, and not because the kernel refuses V4: {since_marker}"
        );
    }
    drop(loop_device);
    disk.close();
}

fn kernel_log() -> String {
    String::from_utf8_lossy(&common::run(&mut Command::new("dmesg")).stdout).into_owned()
}

#[test]
fn corpus_swap_and_lvm2_disks_are_identified() {
    if !mount::loop_available() {
        return;
    }
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    // Swap fills the whole disk: no partition table.
    let dir = tempfile::tempdir().unwrap();
    let swap =
        common::decompress_corpus_image(&corpus, "discutils__swap__win10-14393.vhdx", dir.path());
    let vdisk = Mount::new(&swap, &["ro"]);
    assert_eq!(blkid_type(&vdisk.disk()), "swap");
    vdisk.unmount();

    let disk = CorpusDisk::open(&corpus, "discutils__lvm2__win10-14393.vhdx");
    assert_eq!(blkid_type(&disk.part1()), "LVM2_member");
    disk.close();
}

#[test]
fn corpus_images_read_as_expected_through_the_mount() {
    if !mount::fuse_available() {
        return;
    }
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "dfvfs__ext2__qemu-img.vhd",
        "qemu-iotests__d2v-zerofilled__disk2vhd.vhd",
        "qemu-iotests__iotest-dynamic-1G__hyperv-win6.2.vhdx",
        "qemu-iotests__test-disk2vhd__disk2vhd.vhdx",
        "discutils__btrfs__win10-15063.vhdx",
    ] {
        let image = common::decompress_corpus_image(&corpus, name, dir.path());
        let before = common::sha256_file(&image);
        let mount = Mount::new(&image, &["ro"]);
        assert_eq!(
            mount::sha256_by_openssl(&mount.disk()),
            common::expected_sha256(&corpus, &format!("{name}.raw")),
            "{name}"
        );
        mount.unmount();
        assert_eq!(common::sha256_file(&image), before, "{name} was modified");
    }
}

#[test]
fn corpus_ext2_filesystem_mounts_through_a_loop_device() {
    if !mount::loop_available() {
        return;
    }
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = common::decompress_corpus_image(&corpus, "dfvfs__ext2__qemu-img.vhd", dir.path());
    let vdisk = Mount::new(&image, &["ro"]);
    let device = LoopDevice::attach_read_only(&vdisk.disk());
    let fs = FsMount::new_read_only(device.path());
    let passwords = std::fs::read(fs.path().join("passwords.txt")).unwrap();
    assert_eq!(passwords.len(), 116);
    fs.unmount();
    drop(device);
    vdisk.unmount();
}

/// Size of `disk.img` when `image` is mounted with `options`.
fn mounted_size(image: &Path, options: &[&str]) -> u64 {
    let mount = Mount::new(image, options);
    let disk = std::fs::File::open(mount.disk()).unwrap();
    let size = disk.metadata().unwrap().len();
    // The disks are empty: no data anywhere, zeros at the very end.
    // SAFETY: lseek on an open descriptor.
    let data = unsafe { libc::lseek(disk.as_raw_fd(), 0, libc::SEEK_DATA) };
    assert_eq!(data, -1, "SEEK_DATA found data in an empty disk");
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENXIO)
    );
    let mut tail = vec![0xffu8; 4096];
    disk.read_exact_at(&mut tail, size - 4096).unwrap();
    assert!(tail.iter().all(|&b| b == 0));
    drop(disk);
    mount.unmount();
    size
}

#[test]
fn size_calc_option_picks_the_vhd_size_rule() {
    if !mount::fuse_available() {
        return;
    }
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    const CHS: u64 = 136_363_130_880;
    const CURRENT_SIZE: u64 = 136_365_211_648;
    let dir = tempfile::tempdir().unwrap();
    let hyperv = common::decompress_corpus_image(
        &corpus,
        "qemu-iotests__hyperv2012r2-dynamic__hyperv-win6.3.vhd",
        dir.path(),
    );
    let virtual_pc = common::decompress_corpus_image(
        &corpus,
        "qemu-iotests__virtualpc-dynamic__virtualpc.vhd",
        dir.path(),
    );
    assert_eq!(mounted_size(&hyperv, &["ro"]), CURRENT_SIZE);
    assert_eq!(mounted_size(&hyperv, &["ro,size_calc=chs"]), CHS);
    assert_eq!(mounted_size(&virtual_pc, &["ro"]), CHS);
    assert_eq!(
        mounted_size(&virtual_pc, &["ro", "size_calc=current_size"]),
        CURRENT_SIZE
    );
}

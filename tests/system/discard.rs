//! Space given back: a filesystem on a loop device over `disk.img` that deletes files and
//! runs `fstrim` gives the image file's space back to the host.

use crate::common;
use crate::common::mount::{self, FsMount, LoopDevice, Mount};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Bytes the host filesystem holds for `path`.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn sync() {
    common::run(&mut Command::new("sync"));
}

/// Trims the free space of the filesystem mounted at `dir`.
fn trim(dir: &Path) {
    sync();
    common::run(Command::new("fstrim").arg(dir));
    sync();
}

/// A filesystem made inside the disk, and how to check it.
#[derive(Clone, Copy, Debug)]
enum Fs {
    Ext4,
    Xfs,
}

impl Fs {
    fn make(self, device: &Path) {
        let (program, force) = match self {
            Fs::Ext4 => ("mkfs.ext4", "-F"),
            Fs::Xfs => ("mkfs.xfs", "-f"),
        };
        common::run(Command::new(program).args(["-q", force]).arg(device));
    }

    fn check(self, device: &Path) {
        let (program, dry_run) = match self {
            Fs::Ext4 => ("fsck.ext4", "-fn"),
            Fs::Xfs => ("xfs_repair", "-n"),
        };
        common::run(Command::new(program).arg(dry_run).arg(device));
    }
}

/// A filesystem on the image: 600 MiB of files written, deleted and trimmed must give
/// back at least 90% of their space, while a file kept beside them reads the same before
/// and after remounting.
fn fstrim_gives_space_back(image: &Path, format: &str, filesystem: Fs) {
    let kept = mount::pattern(99, 3 * MIB as usize + 123);
    {
        let vdisk = Mount::new(image, &[]);
        let device = LoopDevice::attach(&vdisk.disk());
        filesystem.make(device.path());
        let fs = FsMount::new(device.path());
        std::fs::write(fs.path().join("kept.bin"), &kept).unwrap();
        for i in 0..6 {
            let data = mount::pattern(i, 100 * MIB as usize);
            std::fs::write(fs.path().join(format!("big-{i}.bin")), data).unwrap();
        }
        sync();
        let full = allocated(image);
        for i in 0..6 {
            std::fs::remove_file(fs.path().join(format!("big-{i}.bin"))).unwrap();
        }
        // XFS skips extents whose freeing is not yet checkpointed in its log (seconds
        // later), as a weekly fstrim would never notice: trim again until they are given
        // back, or a generous while has passed.
        let goal = 600 * MIB * 9 / 10;
        let deadline = Instant::now() + Duration::from_secs(60);
        let trimmed = loop {
            trim(fs.path());
            let trimmed = allocated(image);
            if full.saturating_sub(trimmed) >= goal || Instant::now() > deadline {
                break trimmed;
            }
            std::thread::sleep(Duration::from_secs(1));
        };
        assert!(
            full.saturating_sub(trimmed) >= goal,
            "{format} {filesystem:?}: the image held {full} bytes with the files, {trimmed} after fstrim"
        );
        assert_eq!(std::fs::read(fs.path().join("kept.bin")).unwrap(), kept);
        fs.unmount();
        drop(device);
        vdisk.unmount();
    }
    common::qemu_check_clean(format, image);
    let vdisk = Mount::new(image, &["ro"]);
    let device = LoopDevice::attach_read_only(&vdisk.disk());
    filesystem.check(device.path());
    let fs = FsMount::new_read_only(device.path());
    assert_eq!(std::fs::read(fs.path().join("kept.bin")).unwrap(), kept);
    fs.unmount();
    drop(device);
    vdisk.unmount();
}

/// A 1 GiB dynamic image made by qemu-img in `dir`.
fn dynamic_image(dir: &Path, format: &str) -> std::path::PathBuf {
    let image = dir.join(format!("trim.{format}"));
    let options: &[&str] = match format {
        "vhdx" => &["-o", "block_size=1M"],
        _ => &[],
    };
    let mut args = vec!["create", "-f", format];
    args.extend(options);
    args.extend([image.to_str().unwrap(), "1G"]);
    common::qemu_img(&args);
    image
}

#[test]
fn fstrim_through_a_loop_device_gives_a_dynamic_vhdx_its_space_back() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for fs in [Fs::Ext4, Fs::Xfs] {
        fstrim_gives_space_back(&dynamic_image(dir.path(), "vhdx"), "vhdx", fs);
        std::fs::remove_file(dir.path().join("trim.vhdx")).unwrap();
    }
}

#[test]
fn fstrim_through_a_loop_device_gives_a_dynamic_vhd_its_space_back() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for fs in [Fs::Ext4, Fs::Xfs] {
        fstrim_gives_space_back(&dynamic_image(dir.path(), "vpc"), "vpc", fs);
        std::fs::remove_file(dir.path().join("trim.vpc")).unwrap();
    }
}

/// Ten rounds of "write 200 MiB, delete it, fstrim" inside the image: blocks given back
/// in one round take the next round's data, so after the first round the file grows by
/// at most one block.
fn write_trim_rounds_keep_the_file_length(image: &Path, format: &str, block_size: u64) {
    let vdisk = Mount::new(image, &[]);
    let device = LoopDevice::attach(&vdisk.disk());
    Fs::Ext4.make(device.path());
    let fs = FsMount::new(device.path());
    let data = mount::pattern(7, 200 * MIB as usize);
    let mut lengths = Vec::new();
    for _ in 0..10 {
        std::fs::write(fs.path().join("round.bin"), &data).unwrap();
        sync();
        std::fs::remove_file(fs.path().join("round.bin")).unwrap();
        trim(fs.path());
        lengths.push(std::fs::metadata(image).unwrap().len());
    }
    fs.unmount();
    drop(device);
    vdisk.unmount();
    assert!(
        lengths.iter().all(|&len| len <= lengths[0] + block_size),
        "{format}: file lengths after each round {lengths:?} grow past round one's by more \
         than a block ({block_size})"
    );
    common::qemu_check_clean(format, image);
}

#[test]
fn a_write_and_trim_loop_does_not_grow_a_vhdx() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("loop.vhdx");
    common::qemu_img(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "block_size=32M",
        image.to_str().unwrap(),
        "1G",
    ]);
    write_trim_rounds_keep_the_file_length(&image, "vhdx", 32 * MIB);
}

#[test]
fn a_write_and_trim_loop_does_not_grow_a_vhd() {
    if !mount::loop_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("loop.vhd");
    common::qemu_img(&["create", "-f", "vpc", image.to_str().unwrap(), "1G"]);
    write_trim_rounds_keep_the_file_length(&image, "vpc", 2 * MIB);
}

/// Through a mount of a differencing child, a discard over data its parent holds reads
/// as zeros, during the mount and after it, and leaves the parent's file as it was.
fn child_discard_hides_the_parent(format: &str) {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join(format!("base.{format}"));
    let child = dir.path().join(format!("child.{format}"));
    let vdisk = |args: &[&str]| crate::common::vdisk::vdisk_ok(args);
    vdisk(&[
        "create",
        "--size",
        "16M",
        "--block-size",
        "1M",
        parent.to_str().unwrap(),
    ]);
    let data = mount::pattern(3, 16 * MIB as usize);
    {
        let disk = common::chain::open(&parent, false);
        disk.write_at(&data, 0).unwrap();
        disk.close().unwrap();
    }
    vdisk(&[
        "create",
        "--block-size",
        "1M",
        "--parent",
        parent.to_str().unwrap(),
        child.to_str().unwrap(),
    ]);
    let parent_file = common::sha256_file(&parent);
    // Whole blocks and parts of blocks on both sides.
    let (start, len) = (MIB / 2 + 512, 3 * MIB + 4096);
    let mut expected = data.clone();
    expected[start as usize..(start + len) as usize].fill(0);
    {
        let mounted = Mount::new(&child, &[]);
        common::run(
            Command::new("fallocate")
                .args(["-p", "-o", &start.to_string(), "-l", &len.to_string()])
                .arg(mounted.disk()),
        );
        assert!(
            std::fs::read(mounted.disk()).unwrap() == expected,
            "{format}: while mounted"
        );
        mounted.unmount();
    }
    assert_eq!(
        common::sha256_file(&parent),
        parent_file,
        "{format}: parent changed"
    );
    let chain = common::chain::open(&child, true);
    assert!(
        common::chain::read_all(chain.as_ref()) == expected,
        "{format}: after unmount"
    );
}

#[test]
fn a_discard_in_a_vhdx_child_reads_zeros_not_the_parent() {
    child_discard_hides_the_parent("vhdx");
}

#[test]
fn a_discard_in_a_vhd_child_reads_zeros_not_the_parent() {
    child_discard_hides_the_parent("vhd");
}

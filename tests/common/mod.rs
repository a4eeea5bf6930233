//! Shared support for integration tests: the sample-image corpus, external tools
//! (qemu-img, qemu-io, zstd) and file digests. Each test binary uses a different subset.
#![allow(dead_code)]

pub mod chain;
pub mod mount;
pub mod nbd;
pub mod partitions;
pub mod vdisk;

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Whether every program of `tools` is installed, for the tests named by `what`. Outside
/// CI a missing one skips those tests (saying which); under `CI` it fails them.
pub fn tools_installed(what: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{what} need {missing:?} (scripts/install-deps.sh installs them); CI must run them"
    );
    eprintln!("SKIPPED: {what} need {missing:?} (scripts/install-deps.sh installs them)");
    false
}

/// Where the sample-image corpus lives: `$VDISK_CORPUS`, else `../shared/corpus` beside the
/// checkout. `None` (with a printed note) when it is absent, which is only allowed outside
/// CI: under `CI` a missing corpus fails the test instead of hiding it.
pub fn corpus_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("VDISK_CORPUS") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus"),
    };
    if dir.join("EXPECTED.sha256").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "sample-image corpus not found at {} (set VDISK_CORPUS); CI must run corpus tests",
        dir.display()
    );
    eprintln!(
        "SKIPPED: sample-image corpus not found at {} (set VDISK_CORPUS to run these tests)",
        dir.display()
    );
    None
}

/// Decompresses `images/<name>.zst` of the corpus into `dir` (keeping any sub-folder, so
/// differencing images still find their parents by name) and returns the new file's path.
pub fn decompress_corpus_image(corpus: &Path, name: &str, dir: &Path) -> PathBuf {
    let src = corpus.join("images").join(format!("{name}.zst"));
    let dst = dir.join(name);
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    run(Command::new("zstd")
        .args(["-q", "-f", "-d", "-o"])
        .arg(&dst)
        .arg(&src));
    dst
}

/// Expected sha256 of `<key>` from the corpus's EXPECTED.sha256 or EXPECTED-extra.sha256,
/// where keys look like `image.vhdx.raw` or `image.vhd.force_size_calc=chs.raw`.
pub fn expected_sha256(corpus: &Path, key: &str) -> String {
    for list in ["EXPECTED.sha256", "EXPECTED-extra.sha256"] {
        let text = std::fs::read_to_string(corpus.join(list)).unwrap();
        for line in text.lines() {
            if let Some((sum, name)) = line.split_once("  ")
                && name == key
            {
                return sum.to_string();
            }
        }
    }
    panic!("no expected sha256 for {key} in the corpus");
}

/// Names of corpus images (relative to `images/`, without `.zst`) ending in `suffix`.
pub fn corpus_images(corpus: &Path, suffix: &str) -> Vec<String> {
    let mut names = Vec::new();
    let images = corpus.join("images");
    let mut dirs = vec![images.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Some(rel) = path
                .strip_prefix(&images)
                .unwrap()
                .to_str()
                .and_then(|s| s.strip_suffix(".zst"))
                && rel.ends_with(suffix)
            {
                names.push(rel.to_string());
            }
        }
    }
    names.sort();
    names
}

pub fn sha256_file(path: &Path) -> String {
    let mut file = File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hex(&hasher.finalize())
}

pub fn sha256_bytes(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs a command and panics with its output unless it exits 0.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn qemu_img(args: &[&str]) -> Output {
    run(Command::new("qemu-img").args(args))
}

/// Runs qemu-io commands (`-c` each) on an image of the given format.
pub fn qemu_io(format: &str, image: &Path, commands: &[&str]) -> Output {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(image);
    let out = run(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("failed"),
        "qemu-io {commands:?} on {}: {stdout}",
        image.display()
    );
    out
}

/// `qemu-img convert -O raw` of `image` into `dst`.
pub fn qemu_convert_to_raw(format: &str, image: &Path, dst: &Path) {
    run(Command::new("qemu-img")
        .args(["convert", "-f", format, "-O", "raw"])
        .arg(image)
        .arg(dst));
}

/// qemu-img compare of `image` (in qemu's `format`) with a raw file: fails the test if
/// they differ.
pub fn qemu_compare_with_raw(format: &str, image: &Path, raw: &Path) {
    run(Command::new("qemu-img")
        .args(["compare", "-f", format, "-F", "raw"])
        .arg(image)
        .arg(raw));
}

/// qemu's name for the format of `image`, told by its extension: `vhdx`, else `vpc`.
pub fn qemu_format(image: &Path) -> &'static str {
    match image.extension().and_then(|e| e.to_str()) {
        Some("vhdx") => "vhdx",
        _ => "vpc",
    }
}

/// Copies `from` to `to` keeping its holes.
pub fn copy_sparse(from: &Path, to: &Path) {
    run(Command::new("cp").arg("--sparse=always").arg(from).arg(to));
}

/// `qemu-img check` must report no errors.
pub fn qemu_check_clean(format: &str, image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", format])
        .arg(image)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // vpc has no check support in qemu; that answer is not an error in the image.
    if text.contains("does not support checks") {
        return;
    }
    assert!(
        out.status.success(),
        "qemu-img check {} reports problems:\n{text}",
        image.display()
    );
}

/// Virtual size qemu reports for an image given as `--image-opts` (e.g.
/// `driver=vpc,force_size_calc=chs,file.filename=/tmp/x.vhd`).
pub fn qemu_virtual_size(image_opts: &str) -> u64 {
    let out = qemu_img(&["info", "--output=json", "--image-opts", image_opts]);
    let text = String::from_utf8_lossy(&out.stdout);
    // The image's own field is indented one level; nested ones describe the file node.
    text.lines()
        .find_map(|line| line.strip_prefix("    \"virtual-size\": "))
        .and_then(|n| n.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no top-level virtual-size in qemu-img info output: {text}"))
}

/// sha256 of a whole virtual disk, read through the library in 4 MiB requests and hashed
/// by `openssl` (SHA extensions; fast even in unoptimised test builds, where multi-GiB
/// disks are common).
pub fn sha256_disk(disk: &dyn vdisk_mount::VirtualDisk) -> String {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-r"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cannot run openssl");
    let mut stdin = child.stdin.take().unwrap();
    let mut buf = vec![0u8; 4 << 20];
    let mut offset = 0;
    while offset < disk.size() {
        let n = (disk.size() - offset).min(buf.len() as u64) as usize;
        disk.read_at(&mut buf[..n], offset)
            .unwrap_or_else(|e| panic!("reading {n} bytes at {offset}: {e}"));
        stdin.write_all(&buf[..n]).unwrap();
        offset += n as u64;
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// The disk libvhdi's vhdimount reads from the VHD `image` (with its parents, for a
/// differencing one): mounted at a temporary directory, read whole, unmounted.
pub fn vhdimount_read(image: &Path) -> Vec<u8> {
    vhdimount_with(image, |disk| std::fs::read(disk))
        .unwrap_or_else(|e| panic!("reading {} through vhdimount: {e}", image.display()))
}

/// Calls `read` with the file through which libvhdi's vhdimount shows the disk of the
/// VHD or VHDX `image`, mounted at a temporary directory for the call. vhdimount shows a
/// chain as `vhdi1` (the base) up to `vhdiN` (the image named), so the file with the
/// highest number is the one handed over.
pub fn vhdimount_with<T>(
    image: &Path,
    read: impl FnOnce(&Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let mountpoint = tempfile::tempdir().unwrap();
    run(Command::new("vhdimount").arg(image).arg(mountpoint.path()));
    let top = std::fs::read_dir(mountpoint.path()).map(|entries| {
        entries
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix("vhdi")?
                    .parse()
                    .ok()
            })
            .max()
            .unwrap_or(0u32)
    });
    let result = top.and_then(|n| read(&mountpoint.path().join(format!("vhdi{n}"))));
    unmount_busy_tolerant(mountpoint.path());
    result
}

/// Unmounts a FUSE mount this process no longer uses. Another test thread that forks a
/// command at the wrong moment holds every open descriptor of this process until it
/// execs, so the mount can be busy for an instant: try again before failing.
fn unmount_busy_tolerant(mountpoint: &Path) {
    for _ in 0..50 {
        let output = Command::new("fusermount3")
            .arg("-u")
            .arg(mountpoint)
            .output()
            .unwrap();
        if output.status.success() {
            return;
        }
        if !String::from_utf8_lossy(&output.stderr).contains("busy") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    run(Command::new("fusermount3").arg("-u").arg(mountpoint));
}

/// Opens a VHDX image straight through the VHDX driver (no probing), read-only or
/// read/write.
pub fn open_vhdx(path: &Path, read_only: bool) -> vdisk_mount::vhdx::VhdxDisk {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .unwrap();
    let options = vdisk_mount::OpenOptions {
        read_only,
        ..Default::default()
    };
    vdisk_mount::vhdx::VhdxDisk::open(
        Box::new(vdisk_mount::storage::FileStorage::new(file)),
        &options,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

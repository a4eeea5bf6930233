//! Differencing chains of either format: building them with random writes at every level,
//! checking every level against its model and vhdimount, and swapping unsafe files in
//! for a parent.

use super::{run, sha256_file, vhdimount_read};
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use std::fs;
use std::path::{Path, PathBuf};
use vdisk_mount::{OpenOptions, VirtualDisk};

pub const MIB: u64 = 1 << 20;

/// Writes at offsets: what a chain level receives while it is the top.
pub type Writes = [(u64, Vec<u8>)];

pub fn open(path: &Path, read_only: bool) -> Box<dyn VirtualDisk> {
    let options = OpenOptions {
        read_only,
        ..Default::default()
    };
    vdisk_mount::open(path, &options).unwrap_or_else(|e| panic!("{e}"))
}

pub fn open_error(path: &Path, options: &OpenOptions) -> String {
    match vdisk_mount::open(path, options) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

pub fn read_all(disk: &dyn VirtualDisk) -> Vec<u8> {
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

/// Makes a differencing child of `parent` at `path`, in the parent's format and size,
/// with `vdisk create --parent`. A VHDX child also gets a Windows path for its parent:
/// libvhdi 20210425 looks for a VHDX parent only by the file name in
/// `absolute_win32_path` (beside the child), never by `relative_path`.
pub fn child_of(parent: &Path, path: &Path) {
    child_of_with(parent, path, &[]);
}

/// `child_of` with more `vdisk create` options.
pub fn child_of_with(parent: &Path, path: &Path, options: &[&str]) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vdisk"));
    command
        .arg("create")
        .args(options)
        .arg("--parent")
        .arg(parent);
    if path.extension().is_some_and(|e| e == "vhdx") {
        let name = parent.file_name().unwrap().to_str().unwrap();
        command.arg(format!("--parent-win-path=C:\\images\\{name}"));
    }
    let out = command.arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "vdisk create --parent {}: {}",
        parent.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Like `assert_eq!` on disks, naming the first difference instead of printing them.
pub fn assert_same(found: &[u8], expected: &[u8], what: &str) {
    assert_eq!(found.len(), expected.len(), "{what}: sizes differ");
    if let Some(at) = found.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at}: found {:#x}, expected {:#x}",
            found[at], expected[at]
        );
    }
}

/// `count` random writes of every shape (bytes inside a sector, across sectors and
/// blocks): offset and data, applied to `model` as well.
pub fn random_writes(model: &mut [u8], rng: &mut StdRng, count: usize) -> Vec<(u64, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let len = match i % 3 {
                0 => rng.random_range(1..512),
                1 => rng.random_range(512..64 * 1024),
                _ => rng.random_range(1..3 * MIB as usize),
            }
            .min(model.len());
            let offset = rng.random_range(0..model.len() - len + 1);
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            model[offset..offset + len].copy_from_slice(&data);
            (offset as u64, data)
        })
        .collect()
}

/// Builds a chain of `levels` differencing disks over `base`, each written at random by
/// `write` while it is the top, then checks every level against its model, against
/// vhdimount, and that no parent changed. Returns each level's path and model, base first.
pub fn check_chain(
    dir: &Path,
    base: &Path,
    levels: usize,
    seed: u64,
    write: &dyn Fn(&Path, &Writes),
) -> Vec<(PathBuf, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let base_model = vhdimount_read(base);
    assert_same(
        &read_all(open(base, true).as_ref()),
        &base_model,
        "base in vhdimount",
    );
    let extension = base.extension().unwrap().to_str().unwrap();
    let mut paths = vec![base.to_path_buf()];
    let mut models = vec![base_model];
    let mut digests = vec![sha256_file(base)];
    for level in 1..=levels {
        let path = dir.join(format!("level{level}.{extension}"));
        child_of(paths.last().unwrap(), &path);
        let mut model = models.last().unwrap().clone();
        assert_same(&read_all(open(&path, true).as_ref()), &model, "new child");
        let writes = random_writes(&mut model, &mut rng, 9);
        write(&path, &writes);
        digests.push(sha256_file(&path));
        paths.push(path);
        models.push(model);
    }
    for (level, path) in paths.iter().enumerate() {
        let what = format!("level {level} of {}", base.display());
        assert_same(&read_all(open(path, true).as_ref()), &models[level], &what);
        assert_same(
            &vhdimount_read(path),
            &models[level],
            &format!("{what} in vhdimount"),
        );
        assert_eq!(sha256_file(path), digests[level], "{what} changed");
    }
    paths.into_iter().zip(models).collect()
}

/// Writes through the library: open read/write, write, close.
pub fn write_directly(path: &Path, writes: &Writes) {
    let disk = open(path, false);
    for (offset, data) in writes {
        disk.write_at(data, *offset).unwrap();
    }
    disk.close().unwrap();
}

/// Puts each kind of file a parent must never be at `base` in turn, and returns what
/// opening `child` then says: /dev/zero, /proc/self/mem, a FIFO, a directory, a text
/// file, the child itself, and an image of `other_format` made by `make_other`.
pub fn unsafe_parent_errors(
    base: &Path,
    child: &Path,
    make_other: &dyn Fn(&Path),
) -> Vec<(&'static str, String)> {
    let swap = |make: &dyn Fn(&Path)| {
        let _ = fs::remove_file(base);
        let _ = fs::remove_dir(base);
        make(base);
        open_error(child, &OpenOptions::default())
    };
    let symlink =
        |target: PathBuf| move |at: &Path| std::os::unix::fs::symlink(&target, at).unwrap();
    let itself = PathBuf::from(child.file_name().unwrap());
    vec![
        ("/dev/zero", swap(&symlink("/dev/zero".into()))),
        ("/proc/self/mem", swap(&symlink("/proc/self/mem".into()))),
        (
            "FIFO",
            swap(&|at: &Path| {
                run(std::process::Command::new("mkfifo").arg(at));
            }),
        ),
        ("directory", swap(&|at: &Path| fs::create_dir(at).unwrap())),
        (
            "text file",
            swap(&|at: &Path| fs::write(at, vec![b'x'; 4096]).unwrap()),
        ),
        ("itself", swap(&symlink(itself))),
        ("other format", swap(make_other)),
    ]
}

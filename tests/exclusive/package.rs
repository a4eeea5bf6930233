//! The Debian package, as a user gets it: `scripts/build-deb.sh` packages the binaries
//! under test, `dpkg -i` installs them, and the installed programs make an image, mount it
//! with `mount -t vdisk` (through `/sbin/mount.vdisk`) and from an fstab with a `vdisk`
//! and a `fuse.vdisk-mount` line; qemu-img reads back what was written. `dpkg -r` then
//! leaves nothing of the package behind.

use crate::alone;
use crate::common;
use crate::common::mount::{self, BIN, Mount, find_daemon};
use crate::common::{qemu_compare_with_raw, run};
use clap::CommandFactory;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const PACKAGE: &str = "vdisk-mount";
const INSTALLED_MOUNT: &str = "/usr/bin/vdisk-mount";
const INSTALLED_VDISK: &str = "/usr/bin/vdisk";
const MIB: u64 = 1 << 20;

/// Whether dpkg knows the package in any state but "not installed".
fn dpkg_knows_package() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PACKAGE])
        .output()
        .is_ok_and(|out| {
            out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("not-installed")
        })
}

/// The installed package, removed again on drop if the test did not get that far.
struct Installed {
    removed: bool,
}

impl Installed {
    fn new(deb: &Path) -> Installed {
        run(Command::new("dpkg").arg("-i").arg(deb));
        Installed { removed: false }
    }

    /// `dpkg -L`: every path the package installed.
    fn paths(&self) -> Vec<PathBuf> {
        let out = run(Command::new("dpkg").args(["-L", PACKAGE]));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with('/'))
            .map(PathBuf::from)
            .collect()
    }

    fn remove(mut self) {
        self.removed = true;
        run(Command::new("dpkg").args(["-r", PACKAGE]));
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.removed {
            let _ = Command::new("dpkg").args(["-r", PACKAGE]).status();
        }
    }
}

/// The program a daemon runs, so a mount is known to be served by the package's binary.
fn daemon_program(mount: &Mount) -> PathBuf {
    fs::read_link(format!("/proc/{}/exe", mount.daemon_pid())).unwrap()
}

/// Writes the same bytes at the same offsets into both files.
fn write_both(disk: &Path, expected: &Path) {
    let disk = fs::OpenOptions::new().write(true).open(disk).unwrap();
    let expected = fs::OpenOptions::new().write(true).open(expected).unwrap();
    for (i, offset) in [0, MIB + 7, 17 * MIB + 4096, 64 * MIB - 512]
        .into_iter()
        .enumerate()
    {
        let data: Vec<u8> = (0..512u32).map(|b| (b as u8) ^ (i as u8 * 37)).collect();
        disk.write_all_at(&data, offset).unwrap();
        expected.write_all_at(&data, offset).unwrap();
    }
    disk.sync_all().unwrap();
}

#[test]
fn the_debian_package_installs_mounts_and_removes_cleanly() {
    let _machine = alone();
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        assert!(std::env::var_os("CI").is_none(), "CI must run as root");
        eprintln!("SKIPPED: installing a package needs root");
        return;
    }
    if !mount::fuse_available() {
        return;
    }
    assert!(
        !dpkg_knows_package(),
        "the {PACKAGE} package is installed already; this test installs and removes it, \
         so remove it first (dpkg -r {PACKAGE})"
    );
    // mount.fuse3 and systemd would run that one instead of the package's.
    assert!(
        !Path::new(mount::INSTALLED).exists(),
        "{} would stand in for the package's {INSTALLED_MOUNT}; remove it first",
        mount::INSTALLED
    );

    let work = tempfile::tempdir().unwrap();
    let binaries = Path::new(BIN).parent().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-deb.sh");
    let out = run(Command::new(&script)
        .arg("--binaries")
        .arg(binaries)
        .arg("--plugin")
        .arg(common::nbd::plugin())
        .arg("--output")
        .arg(work.path()));
    let deb = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let arch =
        String::from_utf8(run(Command::new("dpkg").arg("--print-architecture")).stdout).unwrap();
    assert_eq!(
        deb,
        work.path().join(format!(
            "{PACKAGE}_{}_{}.deb",
            env!("CARGO_PKG_VERSION"),
            arch.trim()
        ))
    );
    let info =
        String::from_utf8(run(Command::new("dpkg-deb").arg("--info").arg(&deb)).stdout).unwrap();
    for field in [
        "Package: vdisk-mount",
        "Depends: fuse3, libc6",
        "Maintainer: ",
    ] {
        assert!(info.contains(field), "control lacks {field}:\n{info}");
    }

    let package = Installed::new(&deb);
    let paths = package.paths();
    let mut promised: Vec<String> = [
        INSTALLED_MOUNT,
        INSTALLED_VDISK,
        "/sbin/mount.vdisk",
        "/lib/systemd/system/vdisk-mount@.service",
        "/usr/share/doc/vdisk-mount/examples/mnt-images-a.mount",
        "/usr/share/doc/vdisk-mount/README.md.gz",
        "/usr/share/doc/vdisk-mount/copyright",
        "/usr/share/man/man8/vdisk-mount.8.gz",
        "/usr/share/man/man8/mount.vdisk.8.gz",
        "/usr/share/man/man1/vdisk.1.gz",
        "/usr/share/bash-completion/completions/vdisk",
        "/usr/share/bash-completion/completions/vdisk-mount",
        "/usr/share/zsh/vendor-completions/_vdisk",
        "/usr/share/zsh/vendor-completions/_vdisk-mount",
        "/usr/share/fish/vendor_completions.d/vdisk.fish",
        "/usr/share/fish/vendor_completions.d/vdisk-mount.fish",
    ]
    .map(String::from)
    .into();
    let plugins = run(Command::new("dpkg-architecture").arg("-qDEB_HOST_MULTIARCH")).stdout;
    let plugins = format!(
        "/usr/lib/{}/nbdkit/plugins",
        String::from_utf8(plugins).unwrap().trim()
    );
    promised.push(format!("{plugins}/nbdkit-vdisk-plugin.so"));
    let vdisk = vdisk_mount::cli::vdisk::Cli::command();
    promised.extend(
        vdisk
            .get_subcommands()
            .map(|c| format!("/usr/share/man/man1/vdisk-{}.1.gz", c.get_name())),
    );
    for path in &promised {
        assert!(
            paths.contains(&PathBuf::from(path)),
            "dpkg -L lacks {path}:\n{paths:?}"
        );
        assert!(Path::new(path).exists(), "{path} is not there");
    }
    let version = run(Command::new("/sbin/mount.vdisk").arg("--version"));
    let version = String::from_utf8(version.stdout).unwrap();
    assert!(
        version.starts_with(&format!(
            "vdisk-mount {} (commit ",
            env!("CARGO_PKG_VERSION")
        )),
        "{version}"
    );
    // The unit's unqualified ExecStart finds the package's binary. (Its man page is
    // checked above by path: verify would need man-db to look it up.)
    let units = tempfile::tempdir().unwrap();
    let instance = units.path().join("vdisk-mount@mnt-images-a.service");
    std::os::unix::fs::symlink("/lib/systemd/system/vdisk-mount@.service", &instance).unwrap();
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&instance));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.trim().is_empty(), "{stderr}");

    // mount -t vdisk, through /sbin/mount.vdisk.
    let image = work.path().join("a.vhdx");
    run(Command::new(INSTALLED_VDISK)
        .args(["create", "--size", "64M"])
        .arg(&image));
    let expected = work.path().join("expected.raw");
    fs::File::create(&expected)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let mounted = Mount::by_command(|dir| {
        let mut command = Command::new("mount");
        command.args(["-t", "vdisk"]).arg(&image).arg(dir);
        command
    });
    assert_eq!(daemon_program(&mounted), Path::new(INSTALLED_MOUNT));
    write_both(&mounted.disk(), &expected);
    mounted.unmount();
    qemu_compare_with_raw("vhdx", &image, &expected);
    // nbdkit finds the plugin by its name, and serves the image as the mount did.
    run(Command::new("nbdkit")
        .args(["-U", "-", "vdisk"])
        .arg(format!("image={}", image.display()))
        .arg("--run")
        .arg(format!(
            "qemu-img compare -f raw -F raw \"$uri\" '{}'",
            expected.display()
        )));

    // fstab: one line of each type.
    let other = work.path().join("b.vhd");
    run(Command::new(INSTALLED_VDISK)
        .args(["create", "--size", "32M"])
        .arg(&other));
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let fstab = work.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "{} {} vdisk defaults,nofail 0 0\n{} {} fuse.vdisk-mount defaults,ro 0 0\n",
            image.display(),
            a.path().display(),
            other.display(),
            b.path().display()
        ),
    )
    .unwrap();
    mount::become_subreaper();
    let out = Command::new("mount")
        .arg("-a")
        .arg("-T")
        .arg(&fstab)
        .output()
        .unwrap();
    // Whatever did mount is in a guard before anything is asserted.
    let adopt = |dir: tempfile::TempDir| {
        mount::is_mounted(dir.path()).then(|| {
            let daemon = find_daemon(dir.path());
            Mount::adopt(dir, daemon)
        })
    };
    let (a, b) = (adopt(a), adopt(b));
    assert!(
        out.status.success(),
        "mount -a -T {}: {}",
        fstab.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, b) = (
        a.expect("vdisk line not mounted"),
        b.expect("fuse line not mounted"),
    );
    for mounted in [&a, &b] {
        assert_eq!(daemon_program(mounted), Path::new(INSTALLED_MOUNT));
    }
    assert!(
        fs::read(a.disk()).unwrap() == fs::read(&expected).unwrap(),
        "the vdisk line's disk.img does not read what was written"
    );
    let b_disk = fs::read(b.disk()).unwrap();
    assert!(b_disk.len() as u64 == 32 * MIB && b_disk.iter().all(|&x| x == 0));
    assert!(
        fs::OpenOptions::new().write(true).open(b.disk()).is_err(),
        "the ro line's disk.img opens for writing"
    );
    a.unmount();
    b.unmount();

    package.remove();
    assert!(!dpkg_knows_package(), "dpkg still knows {PACKAGE}");
    for path in &paths {
        // Directories other packages share stay; nothing of this package's own does.
        let own = path.to_str().unwrap().contains("vdisk");
        let left = path.symlink_metadata().is_ok();
        assert!(
            !left || (!own && path.is_dir()),
            "{} is left after dpkg -r",
            path.display()
        );
    }
}

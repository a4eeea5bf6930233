//! systemd integration: readiness and stopping announced over `$NOTIFY_SOCKET` (as
//! `Type=notify` units need), and the shipped unit files pass `systemd-analyze verify`.

use crate::common;
use crate::common::mount::{self, BIN, Mount};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The next notification, as text; fails the test after a generous wait.
fn receive(socket: &UnixDatagram) -> String {
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("no notification arrived");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

fn fields(message: &str) -> Vec<(&str, &str)> {
    message
        .lines()
        .map(|l| l.split_once('=').expect("KEY=value"))
        .collect()
}

fn qemu_vhdx(dir: &Path) -> PathBuf {
    let image = dir.join("notify.vhdx");
    common::qemu_img(&["create", "-f", "vhdx", image.to_str().unwrap(), "64M"]);
    image
}

/// READY=1 arrives once the mount is live, from the serving process; STOPPING=1 when a
/// stop begins.
fn announces_readiness(notify_socket: &str, listener: &UnixDatagram, foreground: bool) {
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhdx(dir.path());
    let mountpoint = tempfile::tempdir().unwrap();
    let mut command = Command::new(BIN);
    if foreground {
        command.arg("-f");
    }
    command
        .arg(&image)
        .arg(mountpoint.path())
        .env("NOTIFY_SOCKET", notify_socket);
    // A foreground daemon is reaped by pid, through Mount.
    #[allow(clippy::zombie_processes)]
    let mut started = command.spawn().unwrap();

    let ready = receive(listener);
    // Checked before anything else can happen: the mount must be live already.
    assert!(
        mount::is_mounted(mountpoint.path()),
        "READY=1 before the mount"
    );
    let fields = fields(&ready);
    assert!(fields.contains(&("READY", "1")), "{ready}");
    let main_pid: libc::pid_t = fields
        .iter()
        .find(|(k, _)| *k == "MAINPID")
        .map(|(_, v)| v.parse().unwrap())
        .expect("MAINPID");
    let daemon = if foreground {
        assert_eq!(main_pid as u32, started.id(), "MAINPID is not the daemon");
        main_pid
    } else {
        // The command returns once mounted; the daemon it forked serves and is MAINPID.
        assert!(started.wait().unwrap().success());
        assert_ne!(main_pid as u32, started.id());
        main_pid
    };
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.recv(&mut [0u8; 64]).is_err(),
        "more than one notification"
    );
    listener.set_nonblocking(false).unwrap();

    // The foreground daemon is our child; the background one became our child when the
    // command that forked it exited (we are a subreaper).
    let mount = if foreground {
        Mount::adopt(mountpoint, daemon)
    } else {
        Mount::adopt(mountpoint, find_child(main_pid))
    };
    assert!(mount.disk().is_file());
    let mountpoint = mount.mountpoint().to_path_buf();
    assert_eq!(mount.signal(libc::SIGTERM), Some(0));
    let stopping = receive(listener);
    assert!(
        self::fields(&stopping).contains(&("STOPPING", "1")),
        "{stopping}"
    );
    assert!(!mount::is_mounted(&mountpoint));
}

/// `pid`, checked to be our child.
fn find_child(pid: libc::pid_t) -> libc::pid_t {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ppid = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split(' ').nth(2))
        .unwrap();
    assert_eq!(
        ppid,
        std::process::id().to_string(),
        "daemon is not our child"
    );
    pid
}

#[test]
fn a_foreground_daemon_notifies_a_path_socket() {
    if !mount::fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let listener = UnixDatagram::bind(&path).unwrap();
    announces_readiness(path.to_str().unwrap(), &listener, true);
}

#[test]
fn a_background_daemon_notifies_an_abstract_socket() {
    if !mount::fuse_available() {
        return;
    }
    mount::become_subreaper();
    let name = format!("vdisk-mount-notify-test-{}", std::process::id());
    let listener =
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    announces_readiness(&format!("@{name}"), &listener, false);
}

#[test]
fn the_shipped_units_pass_systemd_analyze_verify() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing; CI must verify the units"
        );
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    };
    assert!(out.status.success());
    // The service's ExecStart names the installed binary, which verify checks.
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        assert!(std::env::var_os("CI").is_none(), "CI must run as root");
        eprintln!("SKIPPED: installing vdisk-mount for verify needs root");
        return;
    }
    let Some(_installed) = mount::Installed::new() else {
        return;
    };
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        std::fs::copy(&path, dir.path().join(&name)).unwrap();
        // A template is verified through an instance of it.
        units.push(match name.split_once("@.") {
            Some((template, kind)) => {
                let instance = format!("{template}@mnt-images-a.{kind}");
                std::os::unix::fs::symlink(&name, dir.path().join(&instance)).unwrap();
                instance
            }
            None => name,
        });
    }
    units.sort();
    assert_eq!(
        units,
        ["mnt-images-a.mount", "vdisk-mount@mnt-images-a.service"]
    );
    // The man page the units name is installed by the package, whose test verifies the
    // installed units with it.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units.iter().map(|u| format!("./{u}")))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify reports many problems (an unknown setting, a bad value) only as warnings.
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

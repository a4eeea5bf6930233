//! Running as a daemon: the command forks, the child mounts and serves in the background,
//! and the parent exits only once the child reports the mount live or failed.

use crate::options::MountConfig;
use crate::report_failure;
use crate::service::{mount, serve};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::ExitCode;
use vdisk_mount::cli::mount::Cli;

/// What the daemon tells the waiting parent: this byte alone means mounted, anything else
/// is the one-line error to print.
const READY: u8 = 0;

/// Forks before any thread exists; the child mounts and reports through a pipe, the parent
/// waits for that report and exits with it.
pub fn mount_in_background(cli: &Cli, config: &MountConfig) -> ExitCode {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!(
            "vdisk-mount: cannot create a pipe: {}",
            std::io::Error::last_os_error()
        );
        return ExitCode::FAILURE;
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded here, so the child may keep running Rust code.
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!(
                "vdisk-mount: cannot start the daemon: {}",
                std::io::Error::last_os_error()
            );
            ExitCode::FAILURE
        }
        0 => {
            drop(read_end);
            run_daemon(cli, config, File::from(write_end))
        }
        child => {
            drop(write_end);
            wait_for_daemon(File::from(read_end), child, &cli.image)
        }
    }
}

fn run_daemon(cli: &Cli, config: &MountConfig, mut report: File) -> ExitCode {
    // SAFETY: setsid has no memory effects; it fails only for a group leader, which a
    // freshly forked child is not.
    unsafe { libc::setsid() };
    match mount(cli, config) {
        Err(message) => {
            let _ = report.write_all(message.as_bytes());
            ExitCode::FAILURE
        }
        Ok(mounted) => {
            detach_from_terminal();
            let _ = report.write_all(&[READY]);
            drop(report);
            serve(mounted)
        }
    }
}

/// Leaves the caller's working directory and standard streams, so the daemon holds no
/// directory busy and whoever captures the command's output sees it end.
fn detach_from_terminal() {
    let _ = std::env::set_current_dir("/");
    if let Ok(null) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors; `null` stays open meanwhile.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

fn wait_for_daemon(mut report: File, child: libc::pid_t, image: &Path) -> ExitCode {
    let mut message = Vec::new();
    let _ = report.read_to_end(&mut message);
    if message == [READY] {
        return ExitCode::SUCCESS;
    }
    let mut status = 0;
    // SAFETY: `child` is our own child process; `status` is a valid out pointer.
    unsafe { libc::waitpid(child, &mut status, 0) };
    if message.is_empty() {
        report_failure(&format!(
            "{}: the daemon exited before the mount was ready (wait status {status})",
            image.display()
        ));
    } else {
        report_failure(&String::from_utf8_lossy(&message));
    }
    ExitCode::FAILURE
}

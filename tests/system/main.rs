//! The system tier: tests that mount for real (FUSE, loop devices, kernel filesystems),
//! signal and kill the daemon, install it for mount(8) and systemd, check results against
//! qemu-img/qemu-io and libvhdi's vhdimount, and read the sample-image corpus. Built only
//! with the `system-tests` feature, and run as root.
//!
//! One binary, with one module per area (named after the test file it used to be), so the
//! tier is linked once. Tests run side by side here with tests of every other module:
//! nothing in them may depend on the process being theirs alone (what must, such as
//! `common::mount::Installed`, takes turns). What needs the machine to itself is in
//! `tests/exclusive/`; the hostile-image suite, whose memory limits count the peak of the
//! test process, is `tests/hostile.rs`, a binary of its own.

#[path = "../common/mod.rs"]
mod common;

mod chain_mount;
mod check;
mod cli;
mod commit;
mod compact;
mod convert;
mod corpus_probe;
mod discard;
mod mount_concurrency;
mod mount_corpus;
mod mount_crash;
mod mount_io_uring;
mod mount_loop;
mod mount_raw;
mod mount_vhd;
mod mount_vhdx;
mod nbd;
mod partition_files;
mod partition_table;
mod resize;
mod service_faults;
mod service_lock;
mod service_mount;
mod service_signals;
mod service_systemd;
mod vdisk_cli;
mod vhd_chain;
mod vhd_corpus;
mod vhd_qemu;
mod vhdx_chain;
mod vhdx_corpus;
mod vhdx_qemu;
mod windows_compat;

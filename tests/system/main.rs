//! The system tier: tests that mount for real (FUSE, loop devices, kernel filesystems),
//! signal and kill the daemon, install it for mount(8) and systemd, check results against
//! qemu-img/qemu-io and libvhdi's vhdimount, and read the sample-image corpus. Built only
//! with the `system-tests` feature, and run as root.
//!
//! One binary, one module per area, so the tests share one build and one run and keep
//! both cores busy. Tests run side by side here with tests of every other module: nothing
//! in them may depend on the process being theirs alone (what must, such as
//! `common::mount::Installed`, takes turns).

#[path = "../common/mod.rs"]
mod common;

mod chain_mount;
mod cli;
mod corpus_probe;
mod mount_concurrency;
mod mount_corpus;
mod mount_crash;
mod mount_loop;
mod mount_raw;
mod mount_vhd;
mod mount_vhdx;
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

//! The quick tier: integration tests that need nothing outside the build itself (no root,
//! no FUSE, no external tools, no sample corpus), so a bare `cargo test` runs them on any
//! machine. Everything that needs more is in the system tier (`tests/system/`, behind the
//! `system-tests` feature); modules here carry the names of their system-tier
//! counterparts.

#[path = "../common/mod.rs"]
mod common;

mod cli;
mod docs;
mod vdisk_cli;
mod vhd_chain;
mod vhdx_chain;

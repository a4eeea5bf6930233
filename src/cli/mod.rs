//! The command lines of both programs as clap parses them (`vdisk-mount`: [`mount`];
//! `vdisk`: [`vdisk`]). They live in the library, away from what the programs do with
//! them, so that [`docs`] makes the man pages and shell completions from the very
//! definitions the programs parse with.

pub mod docs;
pub mod mount;
pub mod vdisk;

/// What `--version` prints after the program's name: the crate's version and the git
/// commit it was built from (`-dirty` for a work tree with changes; `unknown` outside a
/// git checkout).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("VDISK_GIT_COMMIT"),
    ")"
);

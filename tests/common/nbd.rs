//! The nbdkit plugin (`nbdkit-vdisk/`) and the NBD tools the tests drive.

use super::run;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The plugin's shared object, built on first use by the cargo that built the tests
/// (`cargo build --release -p nbdkit-vdisk`; `cargo test` builds only this package).
pub fn plugin() -> &'static Path {
    static PLUGIN: OnceLock<PathBuf> = OnceLock::new();
    PLUGIN.get_or_init(|| {
        let out = run(Command::new(env!("CARGO"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--release", "-p", "nbdkit-vdisk"])
            .arg("--message-format=json-render-diagnostics"));
        // The cdylib's file is in the artifact message of the plugin crate.
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|message| message["target"]["name"] == "nbdkit_vdisk")
            .flat_map(|message| message["filenames"].as_array().cloned().unwrap_or_default())
            .filter_map(|name| name.as_str().map(PathBuf::from))
            .find(|name| name.extension().is_some_and(|e| e == "so"))
            .expect("cargo built no nbdkit_vdisk shared object")
    })
}

/// Whether nbdkit and libnbd's clients are installed (see [`super::tools_installed`]).
pub fn tools_available() -> bool {
    super::tools_installed("the NBD tests", &["nbdkit", "nbdinfo", "nbdcopy"])
}

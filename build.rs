//! Records the git commit the programs are built from, for `--version`: `0.1.0 (commit
//! 59ea7aa)`, with `-dirty` when tracked files had changes. Outside a git checkout (a
//! crates.io tarball, or git missing) the commit is `unknown`; the build never fails
//! over it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let commit = commit().unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=VDISK_GIT_COMMIT={commit}");
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn commit() -> Option<String> {
    // A package unpacked inside some other repository must not take that one's commit.
    let top = PathBuf::from(git(&["rev-parse", "--show-toplevel"])?);
    if top.canonicalize().ok()? != Path::new(env!("CARGO_MANIFEST_DIR")).canonicalize().ok()? {
        return None;
    }
    let short = git(&["rev-parse", "--short", "HEAD"])?;
    watch_git_state();
    // Files not yet added say nothing about what was built; `git describe --dirty`
    // ignores them too.
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty();
    Some(if dirty {
        format!("{short}-dirty")
    } else {
        short
    })
}

/// A new commit, a switched branch or a change staged: the recorded commit is stale. A
/// checkout's own `.git` may be a file naming the real one (a worktree), whose refs live
/// in the common directory.
fn watch_git_state() {
    let (Some(git_dir), Some(common_dir)) = (
        git(&["rev-parse", "--absolute-git-dir"]),
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
    ) else {
        return;
    };
    let git_dir = PathBuf::from(git_dir);
    let common_dir = PathBuf::from(common_dir);
    let mut watched = vec![git_dir.join("HEAD"), git_dir.join("index")];
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(common_dir.join(reference));
        watched.push(common_dir.join("packed-refs"));
    }
    // Sources changed without staging make the tree dirty too; the crate is rebuilt for
    // them anyway.
    watched.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src"));
    // A path that does not exist would make cargo run this script on every build.
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

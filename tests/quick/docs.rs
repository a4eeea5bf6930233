//! `vdisk docs DIR`: a man page for each program and each `vdisk` subcommand, shell
//! completions for both programs, and every option README.md shows is in the man pages.

use crate::common::vdisk::vdisk_ok;
use clap::CommandFactory;
use std::fs;
use std::path::Path;

/// A man page as text, with roff's escaped minus signs plain again.
fn man_page(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.replace("\\-", "-")
}

/// The part of README.md from the heading that starts with `heading` to the next one of
/// its level.
fn readme_section(heading: &str) -> String {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let start = readme
        .find(&format!("\n{heading}"))
        .unwrap_or_else(|| panic!("README.md has no section {heading}"));
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |at| at + 3);
    rest[..end].to_string()
}

/// The code blocks of a piece of Markdown, each as its lines.
fn code_blocks(markdown: &str) -> Vec<Vec<&str>> {
    let mut blocks = Vec::new();
    let mut block: Option<Vec<&str>> = None;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            match block.take() {
                Some(done) => blocks.push(done),
                None => block = Some(Vec::new()),
            }
        } else if let Some(block) = block.as_mut() {
            block.push(line);
        }
    }
    blocks
}

/// The `--long` flags in `text`, without any `=value`.
fn long_flags(text: &str) -> Vec<String> {
    let mut flags = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("--") {
        let before = rest[..at].chars().last();
        let name: String = rest[at + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-') && !name.is_empty() {
            flags.push(format!("--{name}"));
        }
        rest = &rest[at + 2 + name.len()..];
    }
    flags
}

#[test]
fn man_pages_and_completions_cover_both_programs() {
    let dir = tempfile::tempdir().unwrap();
    let out = vdisk_ok(&["docs", dir.path().to_str().unwrap()]);
    assert!(out.contains("man pages"), "{out}");

    let vdisk = vdisk_mount::cli::vdisk::Cli::command();
    let subcommands: Vec<&str> = vdisk.get_subcommands().map(|c| c.get_name()).collect();
    assert!(subcommands.contains(&"create") && subcommands.contains(&"docs"));
    let mut pages = vec![
        "man/man8/vdisk-mount.8".to_string(),
        "man/man1/vdisk.1".into(),
    ];
    pages.extend(subcommands.iter().map(|s| format!("man/man1/vdisk-{s}.1")));
    for page in &pages {
        let text = man_page(&dir.path().join(page));
        for section in [".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS"] {
            assert!(text.contains(section), "{page} lacks {section}:\n{text}");
        }
        assert!(text.len() > 300, "{page} is too short:\n{text}");
    }
    let mount_page = man_page(&dir.path().join("man/man8/vdisk-mount.8"));
    for section in ["\"MOUNT OPTIONS\"", "\"MOUNT HELPER\"", "mount.vdisk"] {
        assert!(
            mount_page.contains(section),
            "vdisk-mount.8 lacks {section}"
        );
    }
    let vdisk_page = man_page(&dir.path().join("man/man1/vdisk.1"));
    for subcommand in &subcommands {
        assert!(
            vdisk_page.contains(&format!("vdisk-{subcommand}(1)")),
            "vdisk.1 does not name vdisk-{subcommand}(1)"
        );
    }
    let written = walk(dir.path());
    assert_eq!(
        written.iter().filter(|p| p.starts_with("man/")).count(),
        pages.len(),
        "{written:?}"
    );

    for (program, commands) in [("vdisk", subcommands.as_slice()), ("vdisk-mount", &[])] {
        for completion in [
            format!("bash/{program}"),
            format!("zsh/_{program}"),
            format!("fish/{program}.fish"),
        ] {
            let path = dir.path().join("completions").join(&completion);
            let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{completion}: {e}"));
            assert!(text.len() > 200, "{completion} is too short:\n{text}");
            for word in [program, "help", "version"] {
                assert!(text.contains(word), "{completion} does not name {word}");
            }
            for command in commands {
                assert!(text.contains(command), "{completion} lacks {command}");
            }
        }
    }
    assert_eq!(
        written
            .iter()
            .filter(|p| p.starts_with("completions/"))
            .count(),
        6,
        "{written:?}"
    );
}

/// Every file under `dir`, relative to it.
fn walk(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(next) = dirs.pop() {
        for entry in fs::read_dir(&next).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let relative = path
                    .strip_prefix(dir)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string();
                files.push(relative);
            }
        }
    }
    files
}

#[test]
fn every_option_readme_shows_is_in_the_man_pages() {
    let dir = tempfile::tempdir().unwrap();
    vdisk_ok(&["docs", dir.path().to_str().unwrap()]);
    let man = |page: &str| man_page(&dir.path().join("man").join(page));

    // The -o table under Usage: each option as it is written there, values and all.
    let mount_page = man("man8/vdisk-mount.8");
    let usage = readme_section("## Usage");
    let mut options = Vec::new();
    for row in usage.lines().filter(|l| l.starts_with("| `")) {
        // `\|` separates values inside a cell, a bare `|` the cells.
        let row = row.replace("\\|", "\u{0}");
        let cell = row.split('|').nth(1).unwrap();
        for (i, piece) in cell.split('`').enumerate() {
            if i % 2 == 1 {
                options.push(piece.replace('\u{0}', "|"));
            }
        }
    }
    assert!(
        options.len() >= 15,
        "README's option table not found: {options:?}"
    );
    for option in &options {
        assert!(
            mount_page.contains(option.as_str()),
            "README lists -o {option}, vdisk-mount.8 does not"
        );
    }

    // The synopsis of `vdisk`'s section: each subcommand's flags in its own page, and
    // flags in the other examples in some page.
    let section = readme_section("## The image life cycle: `vdisk`");
    let blocks = code_blocks(&section);
    let mut commands: Vec<(String, String)> = Vec::new();
    for line in &blocks[0] {
        match line.strip_prefix("vdisk ") {
            Some(rest) => {
                let name = rest.split_whitespace().next().unwrap().to_string();
                commands.push((name, rest.to_string()));
            }
            None => commands.last_mut().expect("synopsis").1.push_str(line),
        }
    }
    assert!(commands.len() >= 8, "README's vdisk synopsis not found");
    let mut all_pages = String::new();
    for (name, synopsis) in &commands {
        let page = man(&format!("man1/vdisk-{name}.1"));
        for flag in long_flags(synopsis) {
            assert!(
                page.contains(&flag),
                "README shows vdisk {name} {flag}, vdisk-{name}.1 does not"
            );
        }
        all_pages.push_str(&page);
    }
    for block in &blocks[1..] {
        for flag in long_flags(&block.join("\n")) {
            assert!(
                all_pages.contains(&flag),
                "README shows {flag}, no vdisk page does"
            );
        }
    }
}

#[test]
fn long_flags_are_found_with_their_names_only() {
    assert_eq!(
        long_flags("vdisk check [--json] [--repair[=all]] a--b --x-y=1 -- -f"),
        ["--json", "--repair", "--x-y"]
    );
}

//! Man pages and shell completions for both programs, made from the clap definitions
//! they parse with, so neither can describe options the programs do not take. `vdisk
//! docs DIR` writes them; the Debian package is built with it.

use super::VERSION;
use super::mount::{self, HELPER_HELP, MOUNT_OPTIONS, UNMOUNT_HELP, generic_help};
use super::vdisk;
use crate::error::{Error, Result};
use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, roman};
use std::fmt;
use std::path::{Path, PathBuf};

/// What [`generate`] wrote.
pub struct Written {
    pub dir: PathBuf,
    pub man_pages: Vec<PathBuf>,
    pub completions: Vec<PathBuf>,
}

impl fmt::Display for Written {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} man pages, {} shell completions",
            self.dir.display(),
            self.man_pages.len(),
            self.completions.len()
        )
    }
}

/// Writes `DIR/man/man8/vdisk-mount.8`, `DIR/man/man1/vdisk.1` with a page per
/// subcommand (`vdisk-create.1`, ...), and completions for both programs in
/// `DIR/completions/bash/NAME`, `zsh/_NAME` and `fish/NAME.fish`, the names each shell
/// looks for.
pub fn generate(dir: &Path) -> Result<Written> {
    let mut written = Written {
        dir: dir.to_path_buf(),
        man_pages: Vec::new(),
        completions: Vec::new(),
    };
    let man8 = dir.join("man/man8");
    create_dir(&man8)?;
    let page = man8.join("vdisk-mount.8");
    write(&page, &mount_page()?)?;
    written.man_pages.push(page);

    let man1 = dir.join("man/man1");
    create_dir(&man1)?;
    // `vdisk help` repeats what every page says.
    let mut command = vdisk::Cli::command().disable_help_subcommand(true);
    command.build();
    let commands = std::iter::once(&command).chain(command.get_subcommands());
    for command in commands.filter(|c| !c.is_hide_set()) {
        let man = Man::new(command.clone()).source(format!("vdisk {VERSION}"));
        let page = man1.join(man.get_filename());
        let mut text = Vec::new();
        man.render(&mut text)
            .map_err(|e| Error::io(format!("{}: rendering", page.display()), e))?;
        write(&page, &text)?;
        written.man_pages.push(page);
    }

    for (shell, name) in [
        (Shell::Bash, "bash/{}"),
        (Shell::Zsh, "zsh/_{}"),
        (Shell::Fish, "fish/{}.fish"),
    ] {
        for mut command in [mount::Cli::command(), vdisk::Cli::command()] {
            let program = command.get_name().to_string();
            let path = dir.join("completions").join(name.replace("{}", &program));
            create_dir(
                path.parent()
                    .expect("a completion is inside its shell's folder"),
            )?;
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut command, &program, &mut text);
            write(&path, &text)?;
            written.completions.push(path);
        }
    }
    Ok(written)
}

/// vdisk-mount(8): what clap knows, and the mount options, mount(8)'s helper, unmounting,
/// examples.
fn mount_page() -> Result<Vec<u8>> {
    // The option table gets a section of its own below instead of --help's plain text.
    let command = mount::Cli::command().after_help(None::<&str>);
    let mut text = Vec::new();
    Man::new(command)
        .section("8")
        .source(format!("vdisk-mount {VERSION}"))
        .render(&mut text)
        .map_err(|e| Error::io("vdisk-mount.8: rendering", e))?;

    let mut roff = Roff::new();
    roff.control("SH", ["MOUNT OPTIONS"]);
    roff.text([roman(
        "Options for -o, comma-separated; -o may be given more than once, and a later \
         option overrides an earlier one.",
    )]);
    for option in MOUNT_OPTIONS {
        roff.control("TP", []);
        roff.text([bold(option.form())]);
        roff.text([roman(option.meaning)]);
    }
    roff.control("PP", []);
    roff.text([roman(generic_help())]);
    roff.control("SH", ["MOUNT HELPER"]);
    for (i, paragraph) in HELPER_HELP.iter().enumerate() {
        if i > 0 {
            roff.control("PP", []);
        }
        roff.text([roman(*paragraph)]);
    }
    roff.control("SH", ["UNMOUNTING"]);
    roff.text([roman(UNMOUNT_HELP)]);
    roff.control("SH", ["EXAMPLES"]);
    roff.control("nf", []);
    for line in [
        "vdisk-mount disk.vhdx /mnt/x",
        "vdisk-mount -o ro disk.vhd /mnt/x",
        "mount -o loop /mnt/x/disk.img /mnt/fs",
        "mount -t vdisk -o allow_other /images/a.vhdx /mnt/a",
        "",
        "# /etc/fstab",
        "/images/a.vhdx  /mnt/a  vdisk             defaults,allow_other,nofail  0 0",
        "/images/b.vhdx  /mnt/b  fuse.vdisk-mount  defaults,ro,nofail           0 0",
    ] {
        roff.text([roman(line)]);
    }
    roff.control("fi", []);
    roff.control("SH", ["SEE ALSO"]);
    let mut see_also = Vec::new();
    for (i, (page, section)) in [
        ("vdisk", "1"),
        ("mount", "8"),
        ("fstab", "5"),
        ("fusermount3", "1"),
        ("losetup", "8"),
    ]
    .into_iter()
    .enumerate()
    {
        if i > 0 {
            see_also.push(roman(", "));
        }
        see_also.push(bold(page));
        see_also.push(roman(format!("({section})")));
    }
    roff.text(see_also);
    text.extend_from_slice(roff.to_roff().as_bytes());
    Ok(text)
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("{}: creating", dir.display()), e))
}

fn write(path: &Path, text: &[u8]) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(format!("{}: writing", path.display()), e))
}

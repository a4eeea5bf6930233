//! Where Windows finds a differencing image's parent, as the user says: nothing on this
//! host tells which drive or share the parent will sit on there, and a host path is no
//! Windows path. [MS-VHDX] wants `absolute_win32_path` in extended-length form
//! (`\\?\D:\vms\base.vhdx`, `\\?\UNC\server\share\base.vhdx`) and `volume_path` as
//! `\\?\Volume{GUID}\vms\base.vhdx`; a VHD's W2ku locator holds the plain form Windows
//! writes there (`D:\vms\base.vhdx`, `\\server\share\base.vhdx`).

use crate::error::{Error, Result};
use uuid::Uuid;

/// An absolute Windows path to a file, on a drive or on a share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowsPath {
    /// `D:\vms\base.vhdx` or `\\server\share\base.vhdx`.
    plain: String,
    on_share: bool,
}

const EXTENDED: &str = r"\\?\";
const EXTENDED_UNC: &str = r"\\?\UNC\";
const VOLUME: &str = r"\\?\Volume{";

impl WindowsPath {
    /// Reads a drive path (`D:\vms\base.vhdx`) or a share path (`\\server\share\base.vhdx`),
    /// either also in extended-length form and with `/` for `\` if the user likes.
    pub fn parse(text: &str) -> Result<WindowsPath> {
        let bad = |why: &str| {
            Error::invalid_input(format!(
                "parent Windows path '{text}': {why}; give D:\\dir\\name or \\\\server\\share\\name"
            ))
        };
        let given = text.replace('/', "\\");
        let (on_share, rest) = if let Some(rest) = strip_prefix_ignoring_case(&given, EXTENDED_UNC)
        {
            (true, rest)
        } else if let Some(rest) = given.strip_prefix(EXTENDED) {
            (false, rest)
        } else if let Some(rest) = given.strip_prefix(r"\\") {
            (true, rest)
        } else {
            (false, given.as_str())
        };
        let parts: Vec<&str> = rest.split('\\').collect();
        let plain = if on_share {
            if parts.len() < 3 {
                return Err(bad("a share path needs a server, a share and a file name"));
            }
            check_components(&parts).map_err(|why| bad(&why))?;
            format!(r"\\{}", parts.join("\\"))
        } else {
            let drive = parts[0].as_bytes();
            if drive.len() != 2 || !drive[0].is_ascii_alphabetic() || drive[1] != b':' {
                return Err(bad("it starts with neither a drive letter nor \\\\"));
            }
            if parts.len() < 2 {
                return Err(bad("it names no file"));
            }
            check_components(&parts[1..]).map_err(|why| bad(&why))?;
            parts.join("\\")
        };
        Ok(WindowsPath { plain, on_share })
    }

    /// The extended-length form [MS-VHDX] requires of `absolute_win32_path`.
    pub fn extended(&self) -> String {
        match self.on_share {
            true => format!("{EXTENDED_UNC}{}", &self.plain[2..]),
            false => format!("{EXTENDED}{}", self.plain),
        }
    }

    /// The form Windows writes into a VHD's W2ku locator.
    pub fn plain(&self) -> &str {
        &self.plain
    }
}

/// Reads a volume GUID path (`\\?\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\vms\base.vhdx`,
/// as `mountvol` names volumes), returned as a VHDX `volume_path` holds it.
pub fn volume_path(text: &str) -> Result<String> {
    let bad = |why: &str| {
        Error::invalid_input(format!(
            "parent volume path '{text}': {why}; give \\\\?\\Volume{{GUID}}\\dir\\name"
        ))
    };
    let given = text.replace('/', "\\");
    let rest = strip_prefix_ignoring_case(&given, VOLUME)
        .ok_or_else(|| bad("it does not start with \\\\?\\Volume{"))?;
    let (guid, rest) = rest
        .split_once("}\\")
        .ok_or_else(|| bad("no }\\ after the volume GUID"))?;
    let guid = Uuid::try_parse(guid)
        .ok()
        .filter(|_| guid.len() == 36)
        .ok_or_else(|| bad("the volume GUID is not one"))?;
    let parts: Vec<&str> = rest.split('\\').collect();
    check_components(&parts).map_err(|why| bad(&why))?;
    Ok(format!(
        "{VOLUME}{}}}\\{}",
        guid.hyphenated(),
        parts.join("\\")
    ))
}

fn strip_prefix_ignoring_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// Each of `parts` must be a name Windows can hold as it is: extended-length paths are
/// passed to the filesystem unparsed, so `.`, `..` and the characters Win32 reserves
/// would name another file or none.
fn check_components(parts: &[&str]) -> std::result::Result<(), String> {
    for part in parts {
        if part.is_empty() {
            return Err("it has an empty component (\\\\ inside, or a trailing \\)".to_string());
        }
        if *part == "." || *part == ".." {
            return Err(format!("'{part}' cannot stand in an absolute path"));
        }
        if let Some(c) = part.chars().find(|&c| c < ' ' || "<>:\"|?*".contains(c)) {
            return Err(format!("{c:?} is not allowed in a Windows file name"));
        }
        if part.ends_with(['.', ' ']) {
            return Err(format!(
                "'{part}' ends in a dot or space, which Windows drops from names"
            ));
        }
        if part.encode_utf16().count() > 255 {
            return Err(format!("'{part}' is longer than 255 characters"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_and_share_paths_take_the_forms_each_format_wants() {
        for (given, plain, extended) in [
            (
                r"D:\vms\base.vhdx",
                r"D:\vms\base.vhdx",
                r"\\?\D:\vms\base.vhdx",
            ),
            (
                "c:/vms/base.vhdx",
                r"c:\vms\base.vhdx",
                r"\\?\c:\vms\base.vhdx",
            ),
            (r"\\?\E:\base.vhd", r"E:\base.vhd", r"\\?\E:\base.vhd"),
            (
                r"\\server\share\dir\base.vhdx",
                r"\\server\share\dir\base.vhdx",
                r"\\?\UNC\server\share\dir\base.vhdx",
            ),
            (
                r"\\?\unc\server\share\base.vhdx",
                r"\\server\share\base.vhdx",
                r"\\?\UNC\server\share\base.vhdx",
            ),
            (
                "//nas/vm images/Ünïcode base.vhdx",
                r"\\nas\vm images\Ünïcode base.vhdx",
                r"\\?\UNC\nas\vm images\Ünïcode base.vhdx",
            ),
        ] {
            let path = WindowsPath::parse(given).unwrap();
            assert_eq!(path.plain(), plain, "{given}");
            assert_eq!(path.extended(), extended, "{given}");
        }
    }

    #[test]
    fn paths_windows_would_not_resolve_to_the_file_are_refused() {
        for (given, problem) in [
            ("/srv/vm/base.vhdx", "neither a drive letter"),
            (r"\srv\vm\base.vhdx", "neither a drive letter"),
            (r"vms\base.vhdx", "neither a drive letter"),
            ("D:base.vhdx", "neither a drive letter"),
            ("1:\\base.vhdx", "neither a drive letter"),
            ("D:", "names no file"),
            (r"D:\", "empty component"),
            (r"D:\vms\\base.vhdx", "empty component"),
            (r"D:\vms\", "empty component"),
            (r"D:\vms\..\base.vhdx", "'..' cannot stand"),
            (r"D:\.\base.vhdx", "'.' cannot stand"),
            (r"D:\vms\ba*se.vhdx", "'*' is not allowed"),
            (r"D:\vms\a:b.vhdx", "':' is not allowed"),
            ("D:\\vms\\a\tb.vhdx", "'\\t' is not allowed"),
            (r"D:\vms.\base.vhdx", "ends in a dot"),
            (r"D:\vms\base.vhdx ", "ends in a dot or space"),
            (r"\\server\share", "needs a server, a share and a file name"),
            (r"\\server", "needs a server"),
            (r"\\.\PhysicalDrive0\x", "'.' cannot stand"),
            (r"\\?\GLOBALROOT\Device\x", "neither a drive letter"),
        ] {
            let err = WindowsPath::parse(given).unwrap_err().to_string();
            assert!(err.contains(problem), "{given}: {err}");
            assert!(err.contains(given), "{given}: {err}");
        }
        let long = format!(r"D:\{}.vhdx", "x".repeat(300));
        assert!(WindowsPath::parse(&long).is_err());
    }

    #[test]
    fn volume_paths_need_a_volume_guid_and_a_file() {
        assert_eq!(
            volume_path(r"\\?\Volume{26A21BDA-A627-11D7-9931-806E6F6E6963}\vms\base.vhdx").unwrap(),
            r"\\?\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\vms\base.vhdx"
        );
        assert_eq!(
            volume_path("//?/volume{26a21bda-a627-11d7-9931-806e6f6e6963}/b.vhdx").unwrap(),
            r"\\?\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\b.vhdx"
        );
        for (given, problem) in [
            (r"D:\vms\base.vhdx", r"does not start with \\?\Volume{"),
            (r"\\?\Volume{26a21bda}\base.vhdx", "GUID is not one"),
            (
                r"\\?\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}",
                "no }\\ after",
            ),
            (
                r"\\?\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\",
                "empty component",
            ),
            (
                r"\\?\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\..\b.vhdx",
                "'..' cannot stand",
            ),
        ] {
            let err = volume_path(given).unwrap_err().to_string();
            assert!(err.contains(problem), "{given}: {err}");
        }
    }
}

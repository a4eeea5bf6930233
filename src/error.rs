//! One error type for every driver operation.
//!
//! Messages are written to be printed as one line after the image path:
//! `image.vhdx: BAT entry 17: points past end of file (offset 0x1234000)`.
//! [`Error::with_file`] attaches the path once, at the boundary where it is known.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of damage a structure has; lets callers (and tests) tell corruption apart
/// without matching on message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorruptionKind {
    /// A signature or cookie is not what the format requires.
    BadSignature,
    /// A stored checksum does not match the computed one.
    BadChecksum,
    /// An offset or length points outside the file, outside its region, or overlaps
    /// another structure.
    OutOfBounds,
    /// A field holds a value the format does not allow.
    InvalidField,
    /// The file is shorter than its structures say it must be.
    Truncated,
}

#[derive(Debug)]
pub enum ErrorKind {
    /// The backing file failed; `what` says which operation on which structure.
    Io { what: String, source: io::Error },
    /// The image is damaged: `structure` names it, `problem` says what is wrong.
    Corrupt {
        kind: CorruptionKind,
        structure: String,
        problem: String,
    },
    /// A valid image using a feature this build cannot serve.
    Unsupported(String),
    /// No known signature: not a VHD or VHDX image.
    NotADiskImage,
    /// A write or discard on a disk opened read-only.
    ReadOnly,
    /// A request outside the virtual disk.
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A caller-side mistake (bad option value and the like).
    InvalidInput(String),
    /// Another program has the image open in a way that excludes this use.
    InUse(String),
}

#[derive(Debug)]
pub struct Error {
    file: Option<PathBuf>,
    kind: ErrorKind,
}

impl Error {
    pub fn new(kind: ErrorKind) -> Self {
        Error { file: None, kind }
    }

    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::new(ErrorKind::Io {
            what: what.into(),
            source,
        })
    }

    pub fn corrupt(
        kind: CorruptionKind,
        structure: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        Self::new(ErrorKind::Corrupt {
            kind,
            structure: structure.into(),
            problem: problem.into(),
        })
    }

    pub fn unsupported(what: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported(what.into()))
    }

    pub fn invalid_input(what: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput(what.into()))
    }

    /// Names the image file in the message, unless a file is already named (errors from a
    /// parent image keep the parent's name).
    pub fn with_file(mut self, path: &Path) -> Self {
        if self.file.is_none() {
            self.file = Some(path.to_path_buf());
        }
        self
    }

    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    pub fn corruption_kind(&self) -> Option<CorruptionKind> {
        match self.kind {
            ErrorKind::Corrupt { kind, .. } => Some(kind),
            _ => None,
        }
    }

    /// The errno a filesystem request that hit this error should fail with.
    pub fn errno(&self) -> i32 {
        match &self.kind {
            ErrorKind::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::OutOfRange { .. } => libc::EFBIG,
            ErrorKind::InvalidInput(_) => libc::EINVAL,
            ErrorKind::InUse(_) => libc::EBUSY,
            ErrorKind::Unsupported(_) => libc::EOPNOTSUPP,
            ErrorKind::Corrupt { .. } | ErrorKind::NotADiskImage => libc::EIO,
        }
    }
}

/// A copy for each of several callers that one failed operation served (a group commit).
/// An `io::Error` keeps its errno, or else its kind and message.
impl Clone for Error {
    fn clone(&self) -> Self {
        let kind = match &self.kind {
            ErrorKind::Io { what, source } => ErrorKind::Io {
                what: what.clone(),
                source: match source.raw_os_error() {
                    Some(errno) => io::Error::from_raw_os_error(errno),
                    None => io::Error::new(source.kind(), source.to_string()),
                },
            },
            ErrorKind::Corrupt {
                kind,
                structure,
                problem,
            } => ErrorKind::Corrupt {
                kind: *kind,
                structure: structure.clone(),
                problem: problem.clone(),
            },
            ErrorKind::Unsupported(what) => ErrorKind::Unsupported(what.clone()),
            ErrorKind::NotADiskImage => ErrorKind::NotADiskImage,
            ErrorKind::ReadOnly => ErrorKind::ReadOnly,
            &ErrorKind::OutOfRange { offset, len, size } => {
                ErrorKind::OutOfRange { offset, len, size }
            }
            ErrorKind::InvalidInput(what) => ErrorKind::InvalidInput(what.clone()),
            ErrorKind::InUse(what) => ErrorKind::InUse(what.clone()),
        };
        Error {
            file: self.file.clone(),
            kind,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        match &self.kind {
            ErrorKind::Io { what, source } => write!(f, "{what}: {source}"),
            ErrorKind::Corrupt {
                structure, problem, ..
            } => write!(f, "{structure}: {problem}"),
            ErrorKind::Unsupported(what) => write!(f, "{what}"),
            ErrorKind::NotADiskImage => write!(f, "not a VHD or VHDX disk image"),
            ErrorKind::ReadOnly => write!(f, "disk is opened read-only"),
            ErrorKind::OutOfRange { offset, len, size } => write!(
                f,
                "request at offset {offset} of {len} bytes is outside the {size}-byte disk"
            ),
            ErrorKind::InvalidInput(what) | ErrorKind::InUse(what) => write!(f, "{what}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ErrorKind::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Shorthand for mapping an `io::Result` to an [`Error`] that says what was being done.
pub trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_one_line_naming_file_structure_and_problem() {
        let e = Error::corrupt(
            CorruptionKind::OutOfBounds,
            "BAT entry 17",
            "points past end of file (offset 0x1234000)",
        )
        .with_file(Path::new("image.vhdx"));
        assert_eq!(
            e.to_string(),
            "image.vhdx: BAT entry 17: points past end of file (offset 0x1234000)"
        );
        assert_eq!(e.corruption_kind(), Some(CorruptionKind::OutOfBounds));
        assert_eq!(e.errno(), libc::EIO);
    }

    #[test]
    fn first_named_file_wins() {
        let e = Error::new(ErrorKind::NotADiskImage)
            .with_file(Path::new("parent.vhd"))
            .with_file(Path::new("child.vhd"));
        assert_eq!(e.file(), Some(Path::new("parent.vhd")));
    }

    #[test]
    fn a_copy_says_the_same_and_keeps_the_errno() {
        let errors = [
            Error::io("flushing", io::Error::from_raw_os_error(libc::ENOSPC)),
            Error::io("reading", io::Error::other("short read")),
            Error::corrupt(CorruptionKind::Truncated, "log entry 3", "file is short"),
        ];
        for e in errors {
            let e = e.with_file(Path::new("image.vhdx"));
            let copy = e.clone();
            assert_eq!(copy.to_string(), e.to_string());
            assert_eq!(copy.errno(), e.errno());
            assert_eq!(copy.corruption_kind(), e.corruption_kind());
        }
    }

    #[test]
    fn io_errors_keep_their_errno() {
        let e = Error::io(
            "writing block 3",
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert_eq!(e.errno(), libc::ENOSPC);
        assert_eq!(Error::new(ErrorKind::ReadOnly).errno(), libc::EROFS);
    }
}

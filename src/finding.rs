//! What checking an image finds, typed: the structure, where it lies in the file, the
//! problem, how serious it is and what a repair would do about it. Drivers report damage
//! they can work around through [`Problems`]: a normal open logs what it tolerates (a bad
//! copy of a structure that has a good one) and refuses the rest, while a check records
//! everything and goes on as far as the image lets it.

use crate::error::{CorruptionKind, Error, ErrorKind, Result};
use serde::Serialize;
use std::fmt;
use std::path::PathBuf;

/// How serious a finding is. The order is the order of reports: worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The image breaks its format's rules: readers may disagree or refuse it.
    Corruption,
    /// File space no structure uses still takes space on the host.
    Leak,
    /// Worth knowing, harmless to every reader.
    Info,
}

/// How far `--repair` may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RepairLevel {
    /// Only what keeps every byte of the virtual disk as it reads now.
    Safe,
    /// Also make unreadable blocks read as zeros, giving up what they held.
    All,
}

/// What a repair does about a finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Fix {
    /// Nothing can be done without guessing.
    None,
    /// A damaged or missing copy of a structure is written again from its good copy.
    RewriteCopy,
    /// The log's entries are written to their places and the log emptied.
    ReplayLog,
    /// Unused file space is given back to the host (a hole), or cut off the file's end.
    Release { start: u64, end: u64 },
    /// Sector bitmap bits of blocks that are not PARTIALLY_PRESENT are cleared.
    ClearStaleBits,
    /// The parent's paths are written as where it was found, as Hyper-V does.
    RewriteParentPaths { parent: PathBuf },
    /// A BAT entry that names no usable space is made to read as zeros; what it named
    /// (`disk_start..disk_end` of the virtual disk) is given up.
    GiveUp {
        entry: u64,
        disk_start: u64,
        disk_end: u64,
    },
}

impl Fix {
    /// The repair level that applies this fix; `None` for [`Fix::None`].
    pub fn level(&self) -> Option<RepairLevel> {
        match self {
            Fix::None => None,
            Fix::GiveUp { .. } => Some(RepairLevel::All),
            _ => Some(RepairLevel::Safe),
        }
    }
}

/// One thing a check found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// The structure, as messages name it: `BAT entry 17`, `header 2`.
    pub structure: String,
    /// Where the structure lies in the file, when it has one place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    pub problem: String,
    pub fix: Fix,
    /// For turning a finding back into the error a normal open fails with.
    #[serde(skip)]
    kind: CorruptionKind,
}

impl Finding {
    pub fn corruption(
        kind: CorruptionKind,
        structure: impl Into<String>,
        offset: Option<u64>,
        problem: impl Into<String>,
        fix: Fix,
    ) -> Finding {
        Finding {
            severity: Severity::Corruption,
            structure: structure.into(),
            offset,
            problem: problem.into(),
            fix,
            kind,
        }
    }

    /// A damaged structure, as the error a normal open would fail with says.
    pub fn from_error(error: &Error, offset: Option<u64>, fix: Fix) -> Finding {
        let (kind, structure, problem) = match error.kind() {
            ErrorKind::Corrupt {
                kind,
                structure,
                problem,
            } => (*kind, structure.clone(), problem.clone()),
            _ => (
                CorruptionKind::InvalidField,
                "image".into(),
                error.to_string(),
            ),
        };
        Finding::corruption(kind, structure, offset, problem, fix)
    }

    pub fn leak(start: u64, end: u64, problem: impl Into<String>) -> Finding {
        Finding {
            severity: Severity::Leak,
            structure: "unused space".into(),
            offset: Some(start),
            problem: problem.into(),
            fix: Fix::Release { start, end },
            kind: CorruptionKind::OutOfBounds,
        }
    }

    pub fn info(
        structure: impl Into<String>,
        offset: Option<u64>,
        problem: impl Into<String>,
        fix: Fix,
    ) -> Finding {
        Finding {
            severity: Severity::Info,
            structure: structure.into(),
            offset,
            problem: problem.into(),
            fix,
            kind: CorruptionKind::InvalidField,
        }
    }

    /// The same finding with more said about the problem.
    pub fn adding(mut self, more: &str) -> Finding {
        self.problem.push_str(more);
        self
    }

    fn into_error(self) -> Error {
        Error::corrupt(self.kind, self.structure, self.problem)
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.structure)?;
        if let Some(offset) = self.offset {
            write!(f, " at {offset:#x}")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// Where an opener sends damage it can work around.
pub enum Problems<'a> {
    /// A normal open: damage the image cannot be served with is an error, damage it can
    /// is logged as a warning.
    Refuse,
    /// A check: everything is recorded, and the opener works around what it can.
    Record(&'a mut Vec<Finding>),
}

impl Problems<'_> {
    /// Damage the image can be served with: a bad copy of a structure whose other copy
    /// is used instead.
    pub fn tolerate(&mut self, finding: Finding) {
        match self {
            Problems::Refuse => log::warn!("{finding}"),
            Problems::Record(found) => found.push(finding),
        }
    }

    /// Damage a normal open refuses. Recorded by a check, after which the opener works
    /// around it (a BAT entry is taken as naming no data).
    pub fn refuse(&mut self, finding: Finding) -> Result<()> {
        match self {
            Problems::Refuse => Err(finding.into_error()),
            Problems::Record(found) => {
                found.push(finding);
                Ok(())
            }
        }
    }

    /// A fact only a check reports.
    pub fn note(&mut self, finding: Finding) {
        if let Problems::Record(found) = self {
            found.push(finding);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_finding_is_the_error_a_normal_open_fails_with() {
        let finding = Finding::corruption(
            CorruptionKind::OutOfBounds,
            "BAT entry 17",
            Some(0x2088),
            "points past end of file (offset 0x4600000)",
            Fix::GiveUp {
                entry: 17,
                disk_start: 0,
                disk_end: 1,
            },
        );
        assert_eq!(
            finding.to_string(),
            "BAT entry 17 at 0x2088: points past end of file (offset 0x4600000)"
        );
        let err = Problems::Refuse.refuse(finding.clone()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "BAT entry 17: points past end of file (offset 0x4600000)"
        );
        assert_eq!(err.corruption_kind(), Some(CorruptionKind::OutOfBounds));
        let mut found = Vec::new();
        Problems::Record(&mut found)
            .refuse(finding.clone())
            .unwrap();
        Problems::Refuse.note(finding.clone());
        assert_eq!(found, [finding]);
    }

    #[test]
    fn fixes_name_the_repair_level_they_need() {
        assert_eq!(Fix::None.level(), None);
        assert_eq!(Fix::RewriteCopy.level(), Some(RepairLevel::Safe));
        let give_up = Fix::GiveUp {
            entry: 1,
            disk_start: 0,
            disk_end: 4096,
        };
        assert_eq!(give_up.level(), Some(RepairLevel::All));
        assert!(RepairLevel::Safe < RepairLevel::All);
        assert_eq!(
            serde_json::to_value(&give_up).unwrap(),
            serde_json::json!({"action": "give_up", "entry": 1, "disk_start": 0, "disk_end": 4096})
        );
    }
}

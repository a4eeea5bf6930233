//! The file type identifier at offset 0: signature and the creator's name.
//! Written once at creation and never rewritten.

use crate::error::{CorruptionKind, Error, Result};

/// Bytes of the identifier that carry information (signature + creator).
pub const FILE_IDENTIFIER_LEN: usize = 520;

const SIGNATURE: &[u8; 8] = b"vhdxfile";
// Offsets inside the identifier.
const SIGNATURE_OFF: usize = 0; // 8 bytes "vhdxfile"
const CREATOR_OFF: usize = 8; // 512 bytes UTF-16LE, optionally NUL-terminated

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileIdentifier {
    /// Diagnostic only: the application that created the file.
    pub creator: String,
}

impl FileIdentifier {
    pub fn parse(buf: &[u8; FILE_IDENTIFIER_LEN]) -> Result<Self> {
        if &buf[SIGNATURE_OFF..SIGNATURE_OFF + 8] != SIGNATURE {
            return Err(Error::corrupt(
                CorruptionKind::BadSignature,
                "file identifier",
                "signature is not 'vhdxfile'",
            ));
        }
        let units: Vec<u16> = buf[CREATOR_OFF..]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        Ok(FileIdentifier {
            creator: String::from_utf16_lossy(&units),
        })
    }

    pub fn to_bytes(&self) -> [u8; FILE_IDENTIFIER_LEN] {
        let mut buf = [0u8; FILE_IDENTIFIER_LEN];
        buf[..8].copy_from_slice(SIGNATURE);
        // Keep one unit free so the name stays NUL-terminated.
        for (i, unit) in self.creator.encode_utf16().take(255).enumerate() {
            let off = CREATOR_OFF + 2 * i;
            buf[off..off + 2].copy_from_slice(&unit.to_le_bytes());
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_creator() {
        let id = FileIdentifier {
            creator: "Microsoft Windows 6.2.9200.16384".to_string(),
        };
        assert_eq!(FileIdentifier::parse(&id.to_bytes()).unwrap(), id);
    }

    #[test]
    fn rejects_wrong_signature() {
        let mut buf = FileIdentifier {
            creator: String::new(),
        }
        .to_bytes();
        buf[3] = b'X';
        let err = FileIdentifier::parse(&buf).unwrap_err();
        assert_eq!(err.corruption_kind(), Some(CorruptionKind::BadSignature));
        assert!(err.to_string().starts_with("file identifier: "));
    }
}

//! The log of a background daemon: its standard streams lead nowhere once it has
//! detached, so records go to the system log through `/dev/log` (where journald or a
//! syslog daemon listens), one datagram each, in the traditional
//! `<PRIORITY>vdisk-mount[PID]: message` form.

use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

pub const SOCKET: &str = "/dev/log";

/// Facility `daemon`, in the priority's upper bits.
const FACILITY_DAEMON: u8 = 3 << 3;

/// Sends each write (one formatted record) as one datagram. A record the system log
/// does not take is dropped: logging must never stop the daemon.
pub struct SyslogWriter {
    socket: PathBuf,
    sender: Option<UnixDatagram>,
}

impl SyslogWriter {
    pub fn new(socket: impl Into<PathBuf>) -> SyslogWriter {
        SyslogWriter {
            socket: socket.into(),
            sender: UnixDatagram::unbound().ok(),
        }
    }
}

impl Write for SyslogWriter {
    fn write(&mut self, record: &[u8]) -> io::Result<usize> {
        if let Some(sender) = &self.sender {
            let line = record.strip_suffix(b"\n").unwrap_or(record);
            let _ = sender.send_to(line, &self.socket);
        }
        Ok(record.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn priority(level: log::Level) -> u8 {
    // Severities: 3 error, 4 warning, 6 informational, 7 debug.
    FACILITY_DAEMON
        | match level {
            log::Level::Error => 3,
            log::Level::Warn => 4,
            log::Level::Info => 6,
            log::Level::Debug | log::Level::Trace => 7,
        }
}

/// Formats a record for [`SyslogWriter`].
pub fn format(out: &mut impl Write, record: &log::Record) -> io::Result<()> {
    writeln!(
        out,
        "<{}>vdisk-mount[{}]: {}",
        priority(record.level()),
        std::process::id(),
        record.args()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_record_is_one_datagram_with_its_priority() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let listener = UnixDatagram::bind(&path).unwrap();
        let mut writer = SyslogWriter::new(&path);
        let mut record = Vec::new();
        format(
            &mut record,
            &log::Record::builder()
                .level(log::Level::Error)
                .args(format_args!("write of 512 bytes at offset 4096 failed"))
                .build(),
        )
        .unwrap();
        writer.write_all(&record).unwrap();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        let expected = format!(
            "<27>vdisk-mount[{}]: write of 512 bytes at offset 4096 failed",
            std::process::id()
        );
        assert_eq!(String::from_utf8_lossy(&buf[..n]), expected);
        assert_eq!(priority(log::Level::Warn), 28);
        assert_eq!(priority(log::Level::Debug), 31);
    }

    #[test]
    fn a_missing_system_log_drops_records_quietly() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = SyslogWriter::new(dir.path().join("absent"));
        assert_eq!(writer.write(b"lost\n").unwrap(), 5);
    }
}

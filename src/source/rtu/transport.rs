//! Opening the byte stream a bus speaks RTU over.
//!
//! - Serial: `tokio-serial` with the bus's line settings, opened exclusively.
//! - RTU over TCP: a serial device server or a DTU in transparent mode; the bus
//!   connects to it.
//! - DTU dial-in: the gateway listens ([`DtuListener`](super::dtu::DtuListener), see `dtu` for who may take a
//!   DTU's place); the bus waits for the connection the listener hands it.

use std::fmt;
use std::io;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use super::dtu::DtuSessions;
pub(crate) use super::link::BoxedStream;
use crate::profile::{LineSettings, Parity};

/// Where a bus's stream comes from.
pub enum Link {
    Serial {
        port: String,
        line: LineSettings,
    },
    Tcp {
        address: String,
    },
    /// Connections of one DTU, from the [`DtuListener`].
    Dtu {
        id: String,
        sessions: DtuSessions,
    },
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::Serial { port, .. } => write!(f, "serial://{port}"),
            Link::Tcp { address } => write!(f, "rtu+tcp://{address}"),
            Link::Dtu { id, .. } => write!(f, "dtu://{id}"),
        }
    }
}

impl Link {
    /// Opens (or, for a DTU, waits for) the stream.
    pub(crate) async fn open(&mut self, connect_timeout: Duration) -> io::Result<BoxedStream> {
        match self {
            Link::Serial { port, line } => open_serial(port, line).map(|s| Box::new(s) as _),
            Link::Tcp { address } => {
                let s = timeout(connect_timeout, TcpStream::connect(address.as_str()))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
                let _ = s.set_nodelay(true);
                Ok(Box::new(s))
            }
            Link::Dtu { sessions, .. } => sessions.next().await,
        }
    }

    /// A newer DTU connection, if the listener accepted one because the current one
    /// went silent (DTU links only).
    pub(crate) fn newer_session(&mut self) -> Option<BoxedStream> {
        match self {
            Link::Dtu { sessions, .. } => sessions.newer(),
            _ => None,
        }
    }

    /// Reports that the open stream received bytes at `last_rx` (a DTU's liveness).
    pub(crate) fn touch(&self, last_rx: Instant) {
        if let Link::Dtu { sessions, .. } = self {
            sessions.touch(last_rx);
        }
    }

    /// Reports that the open stream failed and was dropped: the DTU may register again.
    pub(crate) fn closed(&mut self) {
        if let Link::Dtu { sessions, .. } = self {
            sessions.closed();
        }
    }

    /// How long a DTU session may stay silent before a new registration may replace it.
    pub(crate) fn set_silence_limit(&self, limit: Duration) {
        if let Link::Dtu { sessions, .. } = self {
            sessions.set_silence_limit(limit);
        }
    }
}

/// Opens a serial port with `line`, exclusively, with errors an operator understands.
pub fn open_serial(port: &str, line: &LineSettings) -> io::Result<tokio_serial::SerialStream> {
    use tokio_serial::{DataBits, SerialPortBuilderExt, StopBits};
    let builder = tokio_serial::new(port, line.baud)
        .data_bits(if line.data_bits == 7 {
            DataBits::Seven
        } else {
            DataBits::Eight
        })
        .parity(match line.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        })
        .stop_bits(if line.stop_bits == 2 {
            StopBits::Two
        } else {
            StopBits::One
        });
    builder.open_native_async().map_err(|e| {
        let lower = e.description.to_lowercase();
        if lower.contains("lock") || lower.contains("busy") {
            // serialport reports a port another process holds as `NoDevice`.
            return io::Error::other(format!(
                "serial port {port}: port busy (another process has it open)"
            ));
        }
        let kind = match e.kind() {
            tokio_serial::ErrorKind::NoDevice => io::ErrorKind::NotFound,
            tokio_serial::ErrorKind::Io(k) => k,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, format!("serial port {port}: {}", e.description))
    })
}

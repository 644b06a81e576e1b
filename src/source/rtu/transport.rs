//! Opening the byte stream a bus speaks RTU over.
//!
//! - Serial: `tokio-serial` with the bus's line settings, opened exclusively.
//! - RTU over TCP: a serial device server or a DTU in transparent mode; the bus
//!   connects to it.
//! - DTU dial-in: the gateway listens ([`DtuListener`]); a DTU connects and first
//!   sends its registration packet (its configured identifier, e.g. an IMEI as ASCII,
//!   optionally followed by CR/LF). The listener hands the connection to the bus task
//!   registered for that identifier; a later connection of the same DTU replaces the
//!   earlier one. Unknown identifiers are logged and closed. Heartbeat packets the DTU
//!   sends later are filtered out of the input by the bus (see `link`).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::link::RtuStream;
use crate::profile::{LineSettings, Parity};

/// A boxed stream, so serial ports, TCP and DTU connections share one bus task.
pub(crate) type BoxedStream = Box<dyn RtuStream>;

/// How long a DTU has to send its registration packet after connecting.
pub(crate) const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest registration packet accepted (the config refuses longer ids).
pub(crate) use crate::config::MAX_DTU_REGISTRATION as MAX_REGISTRATION;
/// Pending DTU connections per identifier.
const DTU_SESSIONS_CAPACITY: usize = 2;

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
        sessions_rx: mpsc::Receiver<BoxedStream>,
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
            Link::Dtu { sessions_rx, .. } => sessions_rx
                .recv()
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "dtu listener stopped")),
        }
    }

    /// A newer DTU connection, if one arrived (DTU links only).
    pub(crate) fn newer_session(&mut self) -> Option<BoxedStream> {
        match self {
            Link::Dtu { sessions_rx, .. } => sessions_rx.try_recv().ok(),
            _ => None,
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

/// Accepts DTU connections on one address and routes them by registration packet.
#[derive(Debug)]
pub struct DtuListener {
    listen: String,
    routes: Arc<HashMap<Vec<u8>, mpsc::Sender<BoxedStream>>>,
    shutdown: CancellationToken,
}

impl DtuListener {
    /// A listener for `ids`; returns the receiver of each id's connections.
    pub fn new(
        listen: String,
        ids: impl IntoIterator<Item = String>,
        shutdown: CancellationToken,
    ) -> (Self, HashMap<String, mpsc::Receiver<BoxedStream>>) {
        let mut routes = HashMap::new();
        let mut receivers = HashMap::new();
        for id in ids {
            let (tx, rx) = mpsc::channel(DTU_SESSIONS_CAPACITY);
            routes.insert(id.as_bytes().to_vec(), tx);
            receivers.insert(id, rx);
        }
        (
            Self {
                listen,
                routes: Arc::new(routes),
                shutdown,
            },
            receivers,
        )
    }

    /// Binds the configured address and serves until shutdown.
    pub(crate) async fn run(self) {
        match TcpListener::bind(&self.listen).await {
            Ok(l) => self.serve(l).await,
            Err(e) => {
                tracing::error!(listen = %self.listen, error = %e, "dtu listener cannot bind; its devices are not polled")
            }
        }
    }

    /// Serves on an already bound listener (tests bind port 0).
    pub async fn serve(self, listener: TcpListener) {
        info!(listen = %self.listen, dtus = self.routes.len(), "dtu listener started");
        loop {
            let (stream, peer) = tokio::select! {
                () = self.shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "dtu accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let routes = self.routes.clone();
            let shutdown = self.shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = register(stream, peer, routes) => {}
                }
            });
        }
        info!(listen = %self.listen, "dtu listener stopped");
    }
}

/// Reads the registration packet and hands the connection to its bus.
async fn register(
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    routes: Arc<HashMap<Vec<u8>, mpsc::Sender<BoxedStream>>>,
) {
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + REGISTRATION_TIMEOUT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; MAX_REGISTRATION];
    // The packet is complete once it starts with a known id (longest match; what
    // follows, such as an early heartbeat, is dropped) or the sender pauses.
    loop {
        let longer_possible = routes
            .keys()
            .any(|id| id.len() > buf.len() && id.starts_with(&buf));
        if !longer_possible && longest_prefix(&routes, &buf).is_some() {
            break;
        }
        let wait = if buf.is_empty() {
            deadline.saturating_duration_since(Instant::now())
        } else {
            Duration::from_millis(200)
        };
        match timeout(wait, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > MAX_REGISTRATION {
                    break;
                }
            }
            Err(_) if buf.is_empty() => {
                warn!(peer = %peer, "dtu sent no registration packet; closing");
                return;
            }
            Err(_) => break,
        }
    }
    if let Some((id, tx)) = longest_prefix(&routes, &buf) {
        info!(peer = %peer, dtu = %String::from_utf8_lossy(id), "dtu registered");
        if tx.try_send(Box::new(stream)).is_err() {
            debug!(peer = %peer, "dtu bus busy with earlier connections; closing");
        }
        return;
    }
    warn!(
        peer = %peer,
        packet = %String::from_utf8_lossy(trim_packet(&buf)).escape_debug(),
        "dtu registration with an unknown identifier; closing"
    );
}

/// The longest configured id `buf` starts with, once the id is complete.
fn longest_prefix<'a, T>(routes: &'a HashMap<Vec<u8>, T>, buf: &[u8]) -> Option<(&'a [u8], &'a T)> {
    routes
        .iter()
        .filter(|(id, _)| buf.starts_with(id))
        .max_by_key(|(id, _)| id.len())
        .map(|(id, t)| (id.as_slice(), t))
}

/// A registration or heartbeat packet without trailing CR, LF or NUL.
pub(crate) fn trim_packet(p: &[u8]) -> &[u8] {
    let end = p
        .iter()
        .rposition(|b| !matches!(b, b'\r' | b'\n' | 0))
        .map_or(0, |i| i + 1);
    &p[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn packets_are_trimmed() {
        assert_eq!(trim_packet(b"865000111\r\n"), b"865000111");
        assert_eq!(trim_packet(b"\r\n"), b"");
    }

    #[tokio::test]
    async fn dtu_connections_are_routed_by_registration() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let (dtu, mut rx) = DtuListener::new(
            addr.to_string(),
            ["A1".to_string(), "B2".to_string()],
            token.clone(),
        );
        tokio::spawn(dtu.serve(listener));
        let mut unknown = TcpStream::connect(addr).await.unwrap();
        unknown.write_all(b"ZZ\r\n").await.unwrap();
        let mut b2 = TcpStream::connect(addr).await.unwrap();
        b2.write_all(b"B2\r\n").await.unwrap();
        let mut got = timeout(Duration::from_secs(5), rx.get_mut("B2").unwrap().recv())
            .await
            .unwrap()
            .unwrap();
        b2.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        got.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"x");
        assert!(rx.get_mut("A1").unwrap().try_recv().is_err());
        let mut sink = [0u8; 4];
        let closed = timeout(Duration::from_secs(5), unknown.read(&mut sink)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
        token.cancel();
    }
}

//! DTUs that dial in: the [`DtuListener`] and the sessions it hands to the buses.
//!
//! A DTU connects to the gateway's `listen` address and first sends its registration
//! packet (its configured identifier, e.g. an IMEI as ASCII, optionally followed by
//! CR/LF). The listener hands the connection to the bus registered for that id
//! ([`DtuSessions`]). Unknown identifiers are logged and closed. Heartbeat packets the
//! DTU sends later are filtered out of the input by the bus (see `link`).
//!
//! Who may take a DTU's place (issue 9 item 10): the registration id is no secret, so
//! a connection that names a live DTU's id is refused and closed
//! (`dtu_registrations_refused`, WARN with both peers); the live connection keeps
//! polling. A DTU session ends only when it has failed: the bus saw the stream close or
//! fail (it reads the stream between polls too, so a DTU that hangs up is noticed at
//! once), or nothing at all (reply, heartbeat) arrived on it for the bus's silence
//! limit (a half-open connection after a mobile network dropped it). Then the next
//! registration is accepted. A registration from another IP address than the last
//! accepted one is logged at WARN and counted (`dtu_peer_changed`): mobile networks
//! do reassign addresses, but it is also what a takeover looks like. With an `allow`
//! list, connections from any other network are closed before the id is read
//! (`dtu_peers_refused`).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::link::BoxedStream;
use crate::config::PeerNet;
use crate::source::GatewayAlarms;
use crate::telemetry::Metrics;

/// How long a DTU has to send its registration packet after connecting.
pub(crate) const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest registration packet accepted (the config refuses longer ids).
pub(crate) use crate::config::MAX_DTU_REGISTRATION as MAX_REGISTRATION;
/// Accepted DTU connections not yet taken up by their bus, per identifier.
const DTU_SESSIONS_CAPACITY: usize = 2;
/// Shortest time a live DTU session must be silent before another connection may
/// replace it (the bus raises it to a few of its poll cycles).
pub(crate) const MIN_SILENCE_LIMIT: Duration = Duration::from_secs(30);

/// The connection a DTU registered, as one session of its id.
struct Session {
    stream: BoxedStream,
    generation: u64,
}

/// The live session of one DTU id, shared by the listener and the bus.
#[derive(Debug)]
struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Debug)]
struct SlotState {
    live: Option<Live>,
    /// Address of the last accepted registration.
    last_ip: Option<IpAddr>,
    silence_limit: Duration,
    generations: u64,
}

#[derive(Debug, Clone, Copy)]
struct Live {
    peer: SocketAddr,
    generation: u64,
    last_heard: Instant,
}

/// What the slot says to a registration.
#[derive(Debug)]
enum Claim {
    /// The id has a live session from `live`, heard from `silent` ago.
    Refused { live: SocketAddr, silent: Duration },
    Accepted {
        generation: u64,
        /// The silent session this one replaces: its peer and silence.
        replaces: Option<(SocketAddr, Duration)>,
        /// The last accepted address, if it differs from this one.
        moved_from: Option<IpAddr>,
    },
}

impl Slot {
    fn new() -> Self {
        Self {
            state: Mutex::new(SlotState {
                live: None,
                last_ip: None,
                silence_limit: MIN_SILENCE_LIMIT,
                generations: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn claim(&self, peer: SocketAddr) -> Claim {
        let mut s = self.lock();
        let now = Instant::now();
        let mut replaces = None;
        if let Some(live) = s.live {
            let silent = now.saturating_duration_since(live.last_heard);
            if silent < s.silence_limit {
                return Claim::Refused {
                    live: live.peer,
                    silent,
                };
            }
            replaces = Some((live.peer, silent));
        }
        let ip = peer.ip().to_canonical();
        let moved_from = s.last_ip.replace(ip).filter(|last| *last != ip);
        s.generations += 1;
        let generation = s.generations;
        s.live = Some(Live {
            peer,
            generation,
            last_heard: now,
        });
        Claim::Accepted {
            generation,
            replaces,
            moved_from,
        }
    }

    /// Ends session `generation` if it is the live one.
    fn release(&self, generation: u64) {
        let mut s = self.lock();
        if s.live.is_some_and(|l| l.generation == generation) {
            s.live = None;
        }
    }

    fn touch(&self, generation: u64, heard: Instant) {
        let mut s = self.lock();
        if let Some(l) = s.live.as_mut().filter(|l| l.generation == generation) {
            l.last_heard = l.last_heard.max(heard);
        }
    }
}

/// The sessions of one DTU id, as its bus sees them.
#[derive(Debug)]
pub struct DtuSessions {
    sessions_rx: mpsc::Receiver<Session>,
    slot: Arc<Slot>,
    /// The generation of the session the bus uses.
    current: Option<u64>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({})", self.generation)
    }
}

impl DtuSessions {
    /// Waits for the DTU to register.
    pub async fn next(&mut self) -> io::Result<BoxedStream> {
        let s =
            self.sessions_rx.recv().await.ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotConnected, "dtu listener stopped")
            })?;
        self.current = Some(s.generation);
        Ok(s.stream)
    }

    /// A session accepted in place of the current, silent one.
    pub fn newer(&mut self) -> Option<BoxedStream> {
        let s = self.sessions_rx.try_recv().ok()?;
        self.current = Some(s.generation);
        Some(s.stream)
    }

    /// The current session received bytes at `heard`.
    pub(crate) fn touch(&self, heard: Instant) {
        if let Some(g) = self.current {
            self.slot.touch(g, heard);
        }
    }

    /// The current session failed and was dropped.
    pub(crate) fn closed(&mut self) {
        if let Some(g) = self.current.take() {
            self.slot.release(g);
        }
    }

    pub(crate) fn set_silence_limit(&self, limit: Duration) {
        self.slot.lock().silence_limit = limit.max(MIN_SILENCE_LIMIT);
    }
}

/// Where the listener sends one id's connections.
#[derive(Debug)]
struct Route {
    sessions_tx: mpsc::Sender<Session>,
    slot: Arc<Slot>,
}

/// Accepts DTU connections on one address and routes them by registration packet.
#[derive(Debug)]
pub struct DtuListener {
    listen: String,
    routes: Arc<HashMap<Vec<u8>, Route>>,
    allow: Vec<PeerNet>,
    metrics: Arc<Metrics>,
    alarms: GatewayAlarms,
    shutdown: CancellationToken,
}

impl DtuListener {
    /// A listener for `ids`, accepting any peer; returns each id's sessions.
    pub fn new(
        listen: String,
        ids: impl IntoIterator<Item = String>,
        shutdown: CancellationToken,
    ) -> (Self, HashMap<String, DtuSessions>) {
        let mut routes = HashMap::new();
        let mut sessions = HashMap::new();
        for id in ids {
            let (sessions_tx, sessions_rx) = mpsc::channel(DTU_SESSIONS_CAPACITY);
            let slot = Arc::new(Slot::new());
            routes.insert(
                id.as_bytes().to_vec(),
                Route {
                    sessions_tx,
                    slot: slot.clone(),
                },
            );
            sessions.insert(
                id,
                DtuSessions {
                    sessions_rx,
                    slot,
                    current: None,
                },
            );
        }
        let listener = Self {
            listen,
            routes: Arc::new(routes),
            allow: Vec::new(),
            metrics: Arc::new(Metrics::default()),
            alarms: GatewayAlarms::default(),
            shutdown,
        };
        (listener, sessions)
    }

    /// Accepts connections only from `allow` (empty: from anywhere).
    pub fn with_allow(mut self, allow: Vec<PeerNet>) -> Self {
        self.allow = allow;
        self
    }

    /// Counts refusals in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Raises an alarm record through `alarms` when a DTU registers from a new address.
    pub fn with_alarms(mut self, alarms: GatewayAlarms) -> Self {
        self.alarms = alarms;
        self
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
        info!(listen = %self.listen, dtus = self.routes.len(), allow = ?self.allow, "dtu listener started");
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
            if !self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(peer.ip())) {
                self.metrics.dtu_peers_refused.inc();
                warn!(peer = %peer, "dtu connection from outside the allow list; closing");
                continue;
            }
            let routes = self.routes.clone();
            let metrics = self.metrics.clone();
            let alarms = self.alarms.clone();
            let listen = self.listen.clone();
            let shutdown = self.shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = register(stream, peer, routes, metrics, (alarms, listen)) => {}
                }
            });
        }
        info!(listen = %self.listen, "dtu listener stopped");
    }
}

/// Reads the registration packet and hands the connection to its bus, unless the id
/// has a live session.
async fn register(
    mut stream: TcpStream,
    peer: SocketAddr,
    routes: Arc<HashMap<Vec<u8>, Route>>,
    metrics: Arc<Metrics>,
    (alarms, listen): (GatewayAlarms, String),
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
    let Some((id, route)) = longest_prefix(&routes, &buf) else {
        warn!(
            peer = %peer,
            packet = %String::from_utf8_lossy(trim_packet(&buf)).escape_debug(),
            "dtu registration with an unknown identifier; closing"
        );
        return;
    };
    let dtu = String::from_utf8_lossy(id);
    match route.slot.claim(peer) {
        Claim::Refused { live, silent } => {
            metrics.dtu_registrations_refused.inc();
            warn!(peer = %peer, dtu = %dtu, live_peer = %live, heard_ago = ?silent, "dtu registration refused: this id is live on another connection; closing the newcomer");
        }
        Claim::Accepted {
            generation,
            replaces,
            moved_from,
        } => {
            if let Some((old, silent)) = replaces {
                warn!(peer = %peer, dtu = %dtu, old_peer = %old, silent_for = ?silent, "dtu session silent beyond its limit; the new connection replaces it");
            }
            if let Some(last) = moved_from {
                metrics.dtu_peer_changed.inc();
                warn!(peer = %peer, dtu = %dtu, last_ip = %last, "dtu registered from another address than last time");
                // The record names the listener, not the DTU id (often the modem's IMEI)
                // nor addresses: the operator finds both in this log line.
                alarms.raise(
                    "dtu_peer_changed",
                    1,
                    vec!["dtu_peer_changed".into(), format!("listen={listen}")],
                );
            }
            let session = Session {
                stream: Box::new(stream),
                generation,
            };
            if route.sessions_tx.try_send(session).is_err() {
                route.slot.release(generation);
                debug!(peer = %peer, dtu = %dtu, "dtu bus not taking connections; closing");
                return;
            }
            info!(peer = %peer, dtu = %dtu, "dtu registered");
        }
    }
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

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

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
        let mut got = timeout(Duration::from_secs(5), rx.get_mut("B2").unwrap().next())
            .await
            .unwrap()
            .unwrap();
        b2.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        got.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"x");
        assert!(rx.get_mut("A1").unwrap().newer().is_none());
        let mut sink = [0u8; 4];
        let closed = timeout(Duration::from_secs(5), unknown.read(&mut sink)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
        token.cancel();
    }

    /// Issue 9 item 10: a DTU that registers again from another address raises an alarm
    /// record (with the WARN and the counter); it names the listener, not the DTU id.
    #[tokio::test]
    async fn a_registration_from_another_address_raises_an_alarm_record() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let (alarms_tx, mut alarms_rx) = mpsc::channel(4);
        let gw = crate::reading::GatewayId::new("gw-1").unwrap();
        let metrics = Arc::new(Metrics::default());
        let (dtu, mut rx) = DtuListener::new(addr.to_string(), ["A1".to_string()], token.clone());
        let dtu = dtu
            .with_metrics(metrics.clone())
            .with_alarms(GatewayAlarms::new(&gw, alarms_tx));
        tokio::spawn(dtu.serve(listener));
        let sessions = rx.get_mut("A1").unwrap();

        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(b"A1\r\n").await.unwrap();
        let _stream = timeout(Duration::from_secs(5), sessions.next())
            .await
            .unwrap()
            .unwrap();
        // The bus saw the session fail; the DTU comes back from another address.
        sessions.closed();
        drop(first);
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(self::addr("127.0.0.2:0")).unwrap();
        let mut moved = socket.connect(addr).await.unwrap();
        moved.write_all(b"A1\r\n").await.unwrap();
        let _stream = timeout(Duration::from_secs(5), sessions.next())
            .await
            .unwrap()
            .unwrap();
        let alarm = timeout(Duration::from_secs(5), alarms_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (alarm.subject.as_str(), alarm.field.as_str()),
            ("gateway:gw-1", "dtu_peer_changed")
        );
        assert_eq!(
            alarm.tags,
            ["dtu_peer_changed".to_string(), format!("listen={addr}")]
        );
        assert_eq!(metrics.dtu_peer_changed.get(), 1);
        assert!(alarms_rx.try_recv().is_err());
        token.cancel();
    }

    /// Issue 9 item 10: a live session is not replaced; a failed or silent one is.
    #[tokio::test(start_paused = true)]
    async fn a_live_session_keeps_its_id_until_it_fails_or_falls_silent() {
        let slot = Slot::new();
        let real = addr("10.0.0.7:4000");
        let Claim::Accepted { generation: g1, .. } = slot.claim(real) else {
            panic!("first registration refused");
        };
        let refused = slot.claim(addr("10.9.9.9:5000"));
        assert!(
            matches!(refused, Claim::Refused { live, .. } if live == real),
            "{refused:?}"
        );
        // Heard from within the limit: still live.
        tokio::time::advance(MIN_SILENCE_LIMIT - Duration::from_secs(1)).await;
        slot.touch(g1, Instant::now());
        tokio::time::advance(MIN_SILENCE_LIMIT - Duration::from_secs(1)).await;
        assert!(matches!(
            slot.claim(addr("10.9.9.9:5001")),
            Claim::Refused { .. }
        ));
        // The bus dropped it: the DTU registers again from its old address.
        slot.release(g1);
        let Claim::Accepted {
            generation: g2,
            replaces: None,
            moved_from: None,
        } = slot.claim(addr("10.0.0.7:4001"))
        else {
            panic!("re-registration after the session failed was refused");
        };
        // A release of the old session no longer ends the new one.
        slot.release(g1);
        assert!(matches!(
            slot.claim(addr("10.0.0.7:4002")),
            Claim::Refused { .. }
        ));
        // Silent beyond the limit: replaced, from another address (counted as moved).
        tokio::time::advance(MIN_SILENCE_LIMIT).await;
        let claim = slot.claim(addr("10.0.0.8:4003"));
        let Claim::Accepted {
            generation: g3,
            replaces: Some((old, _)),
            moved_from: Some(last),
        } = claim
        else {
            panic!("{claim:?}");
        };
        assert_eq!(
            (old, last),
            (addr("10.0.0.7:4001"), "10.0.0.7".parse().unwrap())
        );
        assert!(g3 > g2);
    }
}

//! The embedded broker's front end: accepts TCP itself, completes each TLS handshake in the
//! connection's own task under a deadline, binds the client id to the certificate CN,
//! enforces [`access`](super::access) rules on CONNECT (last will), PUBLISH and SUBSCRIBE,
//! and relays the MQTT stream to rumqttd's internal listener.
//!
//! Invariants:
//! - Nothing a client sends (or does not send) delays another client: there is no await
//!   between two `accept`s but the accept itself; a connection that has not completed its
//!   handshake and CONNECT within `connect_timeout` is closed; at most `max_connections`
//!   are open (an idle socket holds a slot only until that deadline).
//! - rumqttd only ever sees CONNECT packets written here, carrying the per-start secret in
//!   their password and a session name bound to the certificate CN ([`session_name`]): the
//!   CN itself, or `{CN}~{requested id}` when a client asks for another id (a gateway's MQTT
//!   meter source connects with `<gateway>-<source>` on the gateway's certificate). So a
//!   certificate can only ever take over its own sessions, never another's; plaintext
//!   clients (`danger_plaintext_listen`) get `~{id}`, apart from every TLS client.
//! - A denied PUBLISH or SUBSCRIBE closes the connection (logged at WARN, counted); nothing
//!   of it reaches rumqttd.
//! - Shared-subscription groups are made per filter (`$share/{group}/{filter}` becomes
//!   `$share/{group}.{digest of filter}/{filter}`): rumqttd 0.20 keeps one read cursor per
//!   group name, so one client subscribing several filters in one group lost messages on
//!   all but one of them. Deliveries carry the topic, never the filter, so clients do not
//!   see the rewrite.
//! - Broker → client bytes are relayed unchanged.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Login, Packet};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::access::{split_share, BrokerAccess, Role};

/// Pause after a failed `accept` (e.g. out of file descriptors) before the next one.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Initial read buffer per connection.
const READ_CHUNK: usize = 8 * 1024;
/// Separates a certificate name from the client id its holder asked for in rumqttd's
/// session names; never part of a usable certificate name.
const NAMESPACE_SEPARATOR: char = '~';
/// Characters a certificate name used as a session name may not contain: the separator and
/// those rumqttd refuses in client ids.
const RESERVED_IN_NAMES: [char; 5] = [NAMESPACE_SEPARATOR, '+', '$', '#', '/'];
/// The user name the front end logs in to rumqttd with.
pub(crate) const FRONT_USER: &str = "citygate-front";

/// What the front end refused or failed at, counted since the broker started.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    handshakes_failed: AtomicU64,
    connections_refused: AtomicU64,
    packets_denied: AtomicU64,
}

/// A snapshot of the embedded broker's front-end counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BrokerStats {
    /// TLS handshakes that failed or did not finish within the connect timeout, and
    /// connections that sent no CONNECT in time.
    pub handshakes_failed: u64,
    /// CONNECTs refused: client id other than the certificate CN, a forbidden last will,
    /// no CN, or the connection limit reached.
    pub connections_refused: u64,
    /// PUBLISH or SUBSCRIBE packets denied by the access rules (each closed its connection).
    pub packets_denied: u64,
}

/// A handle that reads a running broker's [`BrokerStats`] (for a metrics endpoint).
#[derive(Debug, Clone)]
pub struct BrokerStatsHandle(pub(crate) Arc<Counters>);

impl BrokerStatsHandle {
    pub fn get(&self) -> BrokerStats {
        self.0.snapshot()
    }
}

impl Counters {
    pub(crate) fn snapshot(&self) -> BrokerStats {
        BrokerStats {
            handshakes_failed: self.handshakes_failed.load(Ordering::Relaxed),
            connections_refused: self.connections_refused.load(Ordering::Relaxed),
            packets_denied: self.packets_denied.load(Ordering::Relaxed),
        }
    }
}

/// One listener's settings, shared by its connection tasks.
pub(crate) struct Front {
    /// `None` only on the `danger_plaintext_listen` listener.
    pub(crate) tls: Option<TlsAcceptor>,
    /// Roles for TLS clients; `None`: client-id binding only.
    pub(crate) access: Option<BrokerAccess>,
    /// rumqttd's internal listener.
    pub(crate) upstream: SocketAddr,
    /// The password rumqttd's internal listener requires.
    pub(crate) secret: String,
    pub(crate) max_packet_bytes: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) counters: Arc<Counters>,
}

/// Why one connection ended early.
#[derive(Debug, thiserror::Error)]
enum FrontError {
    #[error("tls handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("no tls handshake and connect in time")]
    ConnectTimeout,
    #[error("client certificate has no common name")]
    NoCommonName,
    #[error("first packet is not connect")]
    NotConnect,
    #[error(
        "certificate name {0:?} cannot name a session (contains one of {RESERVED_IN_NAMES:?})"
    )]
    UnusableName(String),
    #[error("{role} client {client_id:?} may not {what}")]
    Denied {
        role: &'static str,
        client_id: String,
        what: String,
    },
    #[error("mqtt: {0}")]
    Protocol(rumqttc::mqttbytes::Error),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("internal listener: {0}")]
    Upstream(std::io::Error),
}

/// Accepts connections until the task is dropped; each is served in a task of its own.
pub(crate) async fn run(listener: TcpListener, front: Arc<Front>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(error = %err, "embedded broker accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(slot) = front.slots.clone().try_acquire_owned() else {
            front.count(&front.counters.connections_refused);
            warn!(%peer, "embedded broker at max_connections; connection closed");
            continue;
        };
        let front = front.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(err) = front.serve(stream).await {
                front.report(peer, &err);
            }
        });
    }
}

impl Front {
    fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn report(&self, peer: SocketAddr, err: &FrontError) {
        let c = &self.counters;
        match err {
            FrontError::Handshake(_) | FrontError::ConnectTimeout | FrontError::NotConnect => {
                self.count(&c.handshakes_failed);
                warn!(%peer, error = %err, "embedded broker dropped a connection before connect");
            }
            FrontError::NoCommonName | FrontError::UnusableName(_) => {
                self.count(&c.connections_refused);
                warn!(%peer, error = %err, "embedded broker refused a client");
            }
            FrontError::Denied { .. } => {
                self.count(&c.packets_denied);
                warn!(%peer, error = %err, "embedded broker denied a packet; connection closed");
            }
            FrontError::Protocol(_) | FrontError::Io(_) | FrontError::Upstream(_) => {
                debug!(%peer, error = %err, "embedded broker connection ended");
            }
        }
    }

    async fn serve(&self, tcp: TcpStream) -> Result<(), FrontError> {
        let deadline = Instant::now() + self.connect_timeout;
        let _ = tcp.set_nodelay(true);
        let Some(acceptor) = &self.tls else {
            return self.relay(tcp, None, Role::Unrestricted, deadline).await;
        };
        let tls = timeout_at(deadline, acceptor.accept(tcp))
            .await
            .map_err(|_| FrontError::ConnectTimeout)?
            .map_err(FrontError::Handshake)?;
        let cn = peer_common_name(tls.get_ref().1).ok_or(FrontError::NoCommonName)?;
        let role = self
            .access
            .as_ref()
            .map_or(Role::Unrestricted, |a| a.role(&cn));
        self.relay(tls, Some(cn), role, deadline).await
    }

    async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: S,
        cn: Option<String>,
        role: Role,
        deadline: Instant,
    ) -> Result<(), FrontError> {
        let (mut rd, mut wr) = tokio::io::split(client);
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let first = timeout_at(
            deadline,
            read_packet(&mut rd, &mut buf, self.max_packet_bytes),
        )
        .await
        .map_err(|_| FrontError::ConnectTimeout)??;
        let Some(Packet::Connect(mut connect)) = first else {
            return Err(FrontError::NotConnect);
        };
        let client_id = connect.client_id.clone();
        connect.client_id = match &cn {
            Some(cn) if cn.contains(RESERVED_IN_NAMES) => {
                refuse(&mut wr, ConnectReturnCode::BadClientId).await;
                return Err(FrontError::UnusableName(cn.clone()));
            }
            Some(cn) => session_name(cn, &client_id),
            None if client_id.is_empty() => client_id.clone(),
            None => format!("{NAMESPACE_SEPARATOR}{client_id}"),
        };
        if let Some(will) = &connect.last_will {
            if !role.may_publish(&will.topic) {
                refuse(&mut wr, ConnectReturnCode::NotAuthorized).await;
                return Err(self.denied(&role, &client_id, "will", &will.topic));
            }
        }
        connect.login = Some(Login::new(FRONT_USER, self.secret.as_str()));

        let upstream = TcpStream::connect(self.upstream)
            .await
            .map_err(FrontError::Upstream)?;
        let _ = upstream.set_nodelay(true);
        let (mut up_rd, mut up_wr) = upstream.into_split();
        write_packet(&mut up_wr, &Packet::Connect(connect), self.max_packet_bytes).await?;
        let to_client = async {
            tokio::io::copy(&mut up_rd, &mut wr).await?;
            wr.shutdown().await?;
            Ok::<(), FrontError>(())
        };
        let from_client = async {
            while let Some(packet) = read_packet(&mut rd, &mut buf, self.max_packet_bytes).await? {
                let packet = self.check(&role, &client_id, packet)?;
                write_packet(&mut up_wr, &packet, self.max_packet_bytes).await?;
            }
            Ok::<(), FrontError>(())
        };
        tokio::select! {
            result = to_client => result,
            result = from_client => result,
        }
    }

    /// Applies the access rules to one packet from the client and rewrites shared
    /// subscriptions to one group per filter.
    fn check(&self, role: &Role, client_id: &str, packet: Packet) -> Result<Packet, FrontError> {
        match packet {
            Packet::Publish(publish) => {
                if role.may_publish(&publish.topic) {
                    Ok(Packet::Publish(publish))
                } else {
                    Err(self.denied(role, client_id, "publish", &publish.topic))
                }
            }
            Packet::Subscribe(mut subscribe) => {
                for filter in &mut subscribe.filters {
                    if !role.may_subscribe(&filter.path) {
                        return Err(self.denied(role, client_id, "subscribe", &filter.path));
                    }
                    filter.path = group_per_filter(&filter.path);
                }
                Ok(Packet::Subscribe(subscribe))
            }
            Packet::Unsubscribe(mut unsubscribe) => {
                for topic in &mut unsubscribe.topics {
                    *topic = group_per_filter(topic);
                }
                Ok(Packet::Unsubscribe(unsubscribe))
            }
            Packet::Connect(_) => Err(FrontError::Protocol(
                rumqttc::mqttbytes::Error::UnexpectedConnect,
            )),
            other => Ok(other),
        }
    }

    fn denied(&self, role: &Role, client_id: &str, verb: &str, topic: &str) -> FrontError {
        FrontError::Denied {
            role: role.name(),
            client_id: client_id.to_owned(),
            what: format!("{verb} {topic:?}"),
        }
    }
}

/// The session (rumqttd client id) of a client with certificate name `cn` asking for
/// `client_id`: the name itself when it asks for it (or for none), otherwise
/// `{cn}~{client_id}`. No certificate name contains `~`, so two certificates never share a
/// session and nobody can take over another's.
fn session_name(cn: &str, client_id: &str) -> String {
    if client_id.is_empty() || client_id == cn {
        cn.to_owned()
    } else {
        format!("{cn}{NAMESPACE_SEPARATOR}{client_id}")
    }
}

/// `$share/{group}/{filter}` → `$share/{group}.{12 hex digits of sha256(filter)}/{filter}`;
/// anything else unchanged. Every hub process rewrites one filter to the same group, so
/// load sharing between hubs is kept.
pub(crate) fn group_per_filter(filter: &str) -> String {
    match split_share(filter) {
        Some((group, inner)) => {
            let digest = Sha256::digest(inner.as_bytes());
            format!("$share/{group}.{}/{inner}", hex::encode(&digest[..6]))
        }
        None => filter.to_owned(),
    }
}

/// The common name of the client certificate the handshake verified.
fn peer_common_name(conn: &rustls::ServerConnection) -> Option<String> {
    common_name(conn.peer_certificates()?.first()?.as_ref())
}

/// The subject common name of a DER certificate.
pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// The next packet, or `None` at a clean end of stream.
async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max_packet_bytes: usize,
) -> Result<Option<Packet>, FrontError> {
    loop {
        match Packet::read(buf, max_packet_bytes) {
            Ok(packet) => return Ok(Some(packet)),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(more)) => buf.reserve(more),
            Err(err) => return Err(FrontError::Protocol(err)),
        }
        if rd.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

async fn write_packet<W: AsyncWrite + Unpin>(
    wr: &mut W,
    packet: &Packet,
    max_packet_bytes: usize,
) -> Result<(), FrontError> {
    let mut out = BytesMut::with_capacity(packet.size() + 8);
    packet
        .write(&mut out, max_packet_bytes)
        .map_err(FrontError::Protocol)?;
    wr.write_all(&out).await.map_err(FrontError::Upstream)
}

/// Answers a refused CONNECT; the connection closes right after, so errors do not matter.
async fn refuse<W: AsyncWrite + Unpin>(wr: &mut W, code: ConnectReturnCode) {
    let mut out = BytesMut::with_capacity(4);
    if Packet::ConnAck(ConnAck::new(code, false))
        .write(&mut out, 4)
        .is_ok()
    {
        let _ = wr.write_all(&out).await;
        let _ = wr.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_shared_filter_gets_its_own_group_and_plain_filters_stay() {
        let readings = group_per_filter("$share/hubs/citygate/v1/+/readings");
        let alarms = group_per_filter("$share/hubs/citygate/v1/+/alarms");
        assert!(readings.starts_with("$share/hubs."), "{readings}");
        assert!(readings.ends_with("/citygate/v1/+/readings"), "{readings}");
        assert_ne!(split_share(&readings), split_share(&alarms));
        assert_eq!(
            readings,
            group_per_filter("$share/hubs/citygate/v1/+/readings")
        );
        assert_eq!(
            group_per_filter("citygate/v1/gw1/ack"),
            "citygate/v1/gw1/ack"
        );
    }

    #[test]
    fn sessions_are_bound_to_the_certificate_name() {
        assert_eq!(session_name("gw1", "gw1"), "gw1");
        assert_eq!(session_name("gw1", ""), "gw1");
        assert_eq!(session_name("sim-1", "gw1"), "sim-1~gw1");
        assert_eq!(session_name("gw1", "gw1-meters"), "gw1~gw1-meters");
        assert_ne!(session_name("sim-1", "gw1"), session_name("gw1", ""));
    }
}

//! An embedded MQTT broker for one-box setups, the demo and tests: rumqttd 0.20's router
//! behind a front end of our own.
//!
//! [`EmbeddedBroker::start`] serves MQTT 3.1.1 with mutual TLS on one listener (client
//! certificates required, verified against the configured CA, TLS 1.3 only, the crate's
//! rustls 0.23) and, only if `danger_plaintext_listen` is set, on a second plaintext
//! listener. It returns once every listener is bound, with the bound addresses.
//!
//! Layout, and why:
//! - [`front`] accepts TCP itself and does each TLS handshake in the connection's own task
//!   with a deadline. rumqttd 0.20 did handshakes one at a time in its accept loop without a
//!   timeout, so one idle socket locked every new client out; rumqttd cannot take an
//!   established stream (its connection code is private), so the front end relays the
//!   decrypted MQTT stream to a rumqttd listener on an internal loopback port.
//! - That internal listener is plaintext on 127.0.0.1, so other local processes could reach
//!   it: it accepts only CONNECTs carrying a random secret made at start and known only to
//!   this process (rumqttd checks it in constant time). The front end replaces every
//!   client's login with it after its own checks, so TLS and the access rules cannot be
//!   bypassed from outside the process.
//! - The front end binds each session to the certificate CN (a client asking for another id
//!   gets a session of its own, `{CN}~{id}`, so no certificate can take over another's) and
//!   enforces [`access`] rules (the same as the mosquitto ACL): see
//!   [`BrokerOptions::access`].
//! - rumqttd 0.20 keeps one read cursor per shared-subscription *group*, not per filter:
//!   the hub's three `$share/{group}/citygate/v1/+/{stream}` filters shared one cursor and
//!   alarms and audit batches were never delivered while readings were. The front end
//!   rewrites each shared filter to a group of its own ([`front::group_per_filter`]).
//! - `Broker::start()` blocks forever and cannot be stopped, so this module uses rumqttd's
//!   public pieces: one `Router` (a std thread of its own) and one `Server` for the
//!   internal listener, polled on a std thread with a current-thread tokio runtime; each
//!   front listener runs on its own such thread. Port 0 for the internal listener: a free
//!   port is found by binding a std listener and dropping it; if rumqttd then fails to
//!   bind it the next is tried, up to [`PORT_ATTEMPTS`] times (`Server::start` binds before
//!   its first await point, so the first poll tells bound from failed).
//! - [`EmbeddedBroker::shutdown`] (or drop) stops the listener threads: their runtimes are
//!   dropped, which closes the listening sockets and every connection, so the same port can
//!   be bound again at once. rumqttd cannot stop its router: each stopped broker leaves one
//!   idle router thread until the process exits. Retained messages and sessions live in
//!   that router and are lost with the broker.
//!
//! Limits: every packet from a client is decoded and re-encoded once by the front end (a
//! copy per publish); the TLS files are read once at start (restart to rotate them).

mod access;
mod front;

pub use access::BrokerAccess;
pub use front::{BrokerStats, BrokerStatsHandle};

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener as StdTcpListener};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rumqttd::protocol::v4::V4;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use tokio::sync::{oneshot, Semaphore};
use tracing::{error, info, warn};

use super::tls::{self, TlsError, TlsServerFiles};
use front::{Counters, Front, FRONT_USER};

/// The default for [`BrokerOptions::max_packet_bytes`]: 1 MiB of payload plus room for the
/// topic and headers, so any packet a default [`LinkOptions`](super::LinkOptions) accepts fits.
pub(crate) const DEFAULT_MAX_PACKET_BYTES: usize = 1024 * 1024 + 64 * 1024;
/// How many free ports are tried for the internal listener before giving up.
pub(crate) const PORT_ATTEMPTS: usize = 8;
/// The default for [`BrokerOptions::connect_timeout`].
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time rumqttd gives the front end from TCP accept to the CONNECT packet (it is written
/// at once).
const CONNECT_TIMEOUT_MS: u16 = 10_000;
/// Unacknowledged QoS 1/2 packets per connection.
const MAX_INFLIGHT_PER_CONNECTION: usize = 100;
/// The router's per-filter in-memory log: segments of this size...
const SEGMENT_BYTES: usize = 4 * 1024 * 1024;
/// ...and this many of them (so at most 16 MiB per filter).
const SEGMENT_COUNT: usize = 4;
/// Packets queued towards one connection before the router stops reading its filters.
const MAX_OUTGOING_PACKETS_PER_CONNECTION: u64 = 200;

/// What to serve.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// The mutual-TLS listener; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Broker certificate and key, and the CA client certificates must chain to.
    pub tls: TlsServerFiles,
    /// An additional listener without TLS or client authentication, and without access
    /// rules. For development only.
    pub danger_plaintext_listen: Option<SocketAddr>,
    /// Largest MQTT packet accepted from a client (at least 1 MiB is sensible for batches).
    pub max_packet_bytes: usize,
    /// Concurrent client connections (per listener, counting ones still in their handshake).
    pub max_connections: usize,
    /// Time a client has from TCP accept to a complete TLS handshake and CONNECT packet.
    pub connect_timeout: Duration,
    /// Roles for TLS clients (hub, gateways, others) and the topic rules that follow from
    /// them. `None`: sessions are still bound to certificate names, topics are open.
    pub access: Option<BrokerAccess>,
}

impl BrokerOptions {
    /// Mutual TLS on `127.0.0.1:0`, no plaintext listener, default limits, no topic rules.
    pub fn localhost(tls: TlsServerFiles) -> BrokerOptions {
        BrokerOptions {
            listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
            tls,
            danger_plaintext_listen: None,
            max_packet_bytes: DEFAULT_MAX_PACKET_BYTES,
            max_connections: 1024,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            access: None,
        }
    }
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker TLS files: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {detail}")]
    Bind { addr: SocketAddr, detail: String },
    #[error("cannot start a broker thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("certificate {path}: no readable common name")]
    CertificateName { path: std::path::PathBuf },
}

/// The common name of the first certificate in PEM file `path` (the identity the broker's
/// access rules see for a client presenting it).
pub fn certificate_name(path: &std::path::Path) -> Result<String, BrokerError> {
    let certs = tls::load_certs(path)?;
    certs
        .first()
        .and_then(|der| front::common_name(der.as_ref()))
        .ok_or_else(|| BrokerError::CertificateName {
            path: path.to_owned(),
        })
}

/// A running broker; stopped by [`shutdown`](EmbeddedBroker::shutdown) or on drop.
#[derive(Debug)]
pub struct EmbeddedBroker {
    tls_addr: SocketAddr,
    plaintext_addr: Option<SocketAddr>,
    /// rumqttd's internal listener (loopback, secret-protected).
    internal_addr: SocketAddr,
    /// Front listeners first, the internal rumqttd listener last.
    listeners: Vec<Listener>,
    counters: Arc<Counters>,
}

#[derive(Debug)]
struct Listener {
    stop_tx: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Loads the TLS files, starts the router, the internal listener and the front
    /// listeners, and returns once they are bound. Blocks the calling thread briefly
    /// (file reads, thread spawn and bind): call it from `spawn_blocking` or before
    /// entering async code if that matters.
    pub fn start(opts: BrokerOptions) -> Result<EmbeddedBroker, BrokerError> {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&opts.tls)?);
        let router = Router::new(
            0,
            RouterConfig {
                max_connections: opts.max_connections.saturating_mul(2),
                max_outgoing_packet_count: MAX_OUTGOING_PACKETS_PER_CONNECTION,
                max_segment_size: SEGMENT_BYTES.max(opts.max_packet_bytes),
                max_segment_count: SEGMENT_COUNT,
                ..RouterConfig::default()
            },
        );
        let router_tx = router.spawn();
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let connections = ConnectionSettings {
            connection_timeout_ms: CONNECT_TIMEOUT_MS,
            max_payload_size: opts.max_packet_bytes,
            max_inflight_count: MAX_INFLIGHT_PER_CONNECTION,
            auth: Some([(FRONT_USER.to_owned(), secret.clone())].into()),
            external_auth: None,
            dynamic_filters: true,
        };
        let internal = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        let (upstream, internal_listener) = bind_listener(internal, |listen| {
            let settings = ServerSettings {
                name: "citygate-internal".to_owned(),
                listen,
                tls: None,
                next_connection_delay_ms: 0,
                connections: connections.clone(),
            };
            Server::new(settings, router_tx.clone(), V4)
        })?;

        let counters = Arc::new(Counters::default());
        let front = |tls| Front {
            tls,
            access: opts.access.clone(),
            upstream,
            secret: secret.clone(),
            max_packet_bytes: opts.max_packet_bytes,
            connect_timeout: opts.connect_timeout,
            slots: Arc::new(Semaphore::new(opts.max_connections)),
            counters: counters.clone(),
        };
        let mut broker = EmbeddedBroker {
            tls_addr: opts.listen,
            plaintext_addr: None,
            internal_addr: upstream,
            listeners: vec![internal_listener],
            counters: counters.clone(),
        };
        let (addr, listener) = spawn_front(opts.listen, front(Some(acceptor)))?;
        broker.tls_addr = addr;
        broker.listeners.insert(0, listener);
        if let Some(plain) = opts.danger_plaintext_listen {
            warn!(addr = %plain, "embedded broker serves plaintext mqtt (danger_plaintext_listen)");
            let (addr, listener) = spawn_front(plain, front(None))?;
            broker.plaintext_addr = Some(addr);
            broker.listeners.insert(0, listener);
        }
        info!(tls_addr = %broker.tls_addr, access_rules = opts.access.is_some(), "embedded broker started");
        Ok(broker)
    }

    /// The bound mutual-TLS address.
    pub fn tls_addr(&self) -> SocketAddr {
        self.tls_addr
    }

    /// The bound plaintext address, if `danger_plaintext_listen` was set.
    pub fn danger_plaintext_addr(&self) -> Option<SocketAddr> {
        self.plaintext_addr
    }

    /// What the front end refused so far.
    pub fn stats(&self) -> BrokerStats {
        self.counters.snapshot()
    }

    /// A handle that keeps reading [`stats`](Self::stats) (0 after the broker stops).
    pub fn stats_handle(&self) -> BrokerStatsHandle {
        BrokerStatsHandle(self.counters.clone())
    }

    /// Stops the listeners, closes every client connection and waits for the listener threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for listener in &mut self.listeners {
            if let Some(stop_tx) = listener.stop_tx.take() {
                let _ = stop_tx.send(());
            }
        }
        for listener in &mut self.listeners {
            if let Some(thread) = listener.thread.take() {
                if thread.join().is_err() {
                    error!("embedded broker listener thread panicked");
                }
            }
        }
        if !self.listeners.is_empty() {
            info!(tls_addr = %self.tls_addr, internal_addr = %self.internal_addr, "embedded broker stopped");
        }
        self.listeners.clear();
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds a front listener on `listen` and serves it on a thread of its own.
fn spawn_front(listen: SocketAddr, front: Front) -> Result<(SocketAddr, Listener), BrokerError> {
    let bind_err = |err: std::io::Error| BrokerError::Bind {
        addr: listen,
        detail: err.to_string(),
    };
    let std_listener = StdTcpListener::bind(listen).map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    let addr = std_listener.local_addr().map_err(bind_err)?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let front = Arc::new(front);
    let thread = thread::Builder::new()
        .name(format!("citygate-broker-{}", addr.port()))
        .spawn(move || {
            let runtime = match current_thread_runtime() {
                Ok(runtime) => runtime,
                Err(err) => {
                    error!(%addr, error = %err, "embedded broker listener has no runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(listener) => listener,
                    Err(err) => {
                        error!(%addr, error = %err, "embedded broker listener failed");
                        return;
                    }
                };
                tokio::select! {
                    () = front::run(listener, front) => {}
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime drops the listener and every connection task.
            drop(runtime);
        })
        .map_err(BrokerError::Thread)?;
    Ok((
        addr,
        Listener {
            stop_tx: Some(stop_tx),
            thread: Some(thread),
        },
    ))
}

fn current_thread_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Binds one listener, retrying other free ports when `listen` has port 0.
fn bind_listener(
    listen: SocketAddr,
    server: impl Fn(SocketAddr) -> Server<V4>,
) -> Result<(SocketAddr, Listener), BrokerError> {
    let attempts = if listen.port() == 0 { PORT_ATTEMPTS } else { 1 };
    let mut last_error = None;
    for _ in 0..attempts {
        let addr = if listen.port() == 0 {
            free_port(listen)?
        } else {
            listen
        };
        match spawn_listener(addr, server(addr))? {
            Ok(listener) => return Ok((addr, listener)),
            Err(detail) => {
                warn!(%addr, %detail, "embedded broker could not bind");
                last_error = Some(BrokerError::Bind { addr, detail });
            }
        }
    }
    Err(last_error.unwrap_or(BrokerError::Bind {
        addr: listen,
        detail: "no attempt made".to_owned(),
    }))
}

fn free_port(listen: SocketAddr) -> Result<SocketAddr, BrokerError> {
    let probe = StdTcpListener::bind(listen).map_err(|err| BrokerError::Bind {
        addr: listen,
        detail: err.to_string(),
    })?;
    probe.local_addr().map_err(|err| BrokerError::Bind {
        addr: listen,
        detail: err.to_string(),
    })
}

/// Runs one rumqttd `Server` on its own thread. Outer error: the thread could not be started;
/// inner error: the server did not bind.
fn spawn_listener(
    listen: SocketAddr,
    server: Server<V4>,
) -> Result<Result<Listener, String>, BrokerError> {
    let (ready_tx, ready_rx) = std_mpsc::sync_channel::<Result<(), String>>(1);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let thread = thread::Builder::new()
        .name(format!("citygate-broker-{}", listen.port()))
        .spawn(move || serve(listen, server, ready_tx, stop_rx))
        .map_err(BrokerError::Thread)?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(Ok(Listener {
            stop_tx: Some(stop_tx),
            thread: Some(thread),
        })),
        Ok(Err(detail)) => {
            let _ = thread.join();
            Ok(Err(detail))
        }
        Err(_) => {
            let _ = thread.join();
            Ok(Err("listener thread ended before binding".to_owned()))
        }
    }
}

fn serve(
    listen: SocketAddr,
    mut server: Server<V4>,
    ready_tx: std_mpsc::SyncSender<Result<(), String>>,
    stop_rx: oneshot::Receiver<()>,
) {
    let runtime = match current_thread_runtime() {
        Ok(runtime) => runtime,
        Err(err) => {
            let _ = ready_tx.send(Err(format!("cannot build runtime: {err}")));
            return;
        }
    };
    runtime.block_on(async move {
        let run = server.start(LinkType::Remote);
        tokio::pin!(run);
        // rumqttd binds before its first await point: after one poll it is either bound
        // (and pending in accept) or has returned the bind error.
        tokio::select! {
            biased;
            result = &mut run => {
                let detail = match result {
                    Ok(()) => "server returned before accepting".to_owned(),
                    Err(err) => err.to_string(),
                };
                let _ = ready_tx.send(Err(detail));
                return;
            }
            () = std::future::ready(()) => {}
        }
        let _ = ready_tx.send(Ok(()));
        tokio::select! {
            result = &mut run => {
                if let Err(err) = result {
                    error!(%listen, error = %err, "embedded broker listener failed");
                }
            }
            _ = stop_rx => {}
        }
    });
    // Dropping the runtime drops the listener and every connection task.
    drop(runtime);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::{CertAuthority, LinkEvent, LinkOptions, LinkTls, MqttLink};

    /// The internal listener is plaintext on loopback: a local process that connects to it
    /// directly, without the per-start secret, is refused (it cannot bypass TLS or the
    /// access rules).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_internal_listener_refuses_clients_without_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertAuthority::generate(dir.path(), "test ca").unwrap();
        let server = ca.issue_localhost_server().unwrap();
        let broker =
            EmbeddedBroker::start(BrokerOptions::localhost(ca.server_files(&server))).unwrap();
        let addr = broker.internal_addr;
        assert!(addr.ip().is_loopback());
        let mut opts = LinkOptions::new(
            format!("127.0.0.1:{}", addr.port()),
            "local-intruder",
            LinkTls::DangerPlaintext,
        );
        opts.connect_timeout = Duration::from_secs(5);
        let (link, mut events) = MqttLink::start(opts).unwrap();
        let first = tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .unwrap()
            .unwrap();
        // rumqttd closes the connection without a CONNACK.
        assert!(matches!(first, LinkEvent::Disconnected { .. }), "{first:?}");
        link.shutdown().await;
    }
}

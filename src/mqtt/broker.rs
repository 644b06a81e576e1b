//! An embedded MQTT broker (rumqttd 0.20) for one-box setups, the demo and tests.
//!
//! [`EmbeddedBroker::start`] serves MQTT 3.1.1 with mutual TLS on one listener (client
//! certificates required, verified against the configured CA) and, only if
//! `danger_plaintext_listen` is set, on a second plaintext listener. It returns once every
//! listener is bound, with the bound addresses.
//!
//! How it is built, and why not `rumqttd::Broker`:
//! - `Broker::start()` blocks forever and cannot be stopped, and rumqttd cannot report the
//!   port it bound for port 0. So this module uses rumqttd's public pieces directly: one
//!   `Router` (a std thread of its own) and one `Server` per listener, each polled on a
//!   dedicated std thread with a current-thread tokio runtime.
//! - Port 0: a free port is chosen by binding a std `TcpListener` to `127.0.0.1:0`, reading
//!   the port and dropping it; if rumqttd then fails to bind it (another process won the race)
//!   the next free port is tried, up to [`PORT_ATTEMPTS`] times. `Server::start` binds before
//!   its first await point, so the first poll of it tells bound from failed without probing.
//! - [`EmbeddedBroker::shutdown`] (or drop) stops the listener threads: their runtimes are
//!   dropped, which closes the listening sockets and every client connection, so the same
//!   port can be bound again at once. rumqttd has no way to stop its router: each stopped
//!   broker leaves one idle router thread (blocked on its channel) until the process exits.
//!   Retained messages and sessions live in that router and are lost with the broker.
//!
//! Limits to know:
//! - rumqttd performs TLS handshakes one at a time in its accept loop, without a timeout: one
//!   TCP connection that never completes its handshake keeps every other client out until it
//!   closes (pinned by an ignored test in `tests/it/uplink.rs`). Acceptable for tests and the
//!   demo on loopback; not for a broker exposed to untrusted networks.
//! - It re-reads the PEM files for every connection, with its own rustls 0.22 (ring), which
//!   also accepts TLS 1.2; citygate's clients only offer TLS 1.3.
//! - Shared subscriptions (`$share/{group}/{filter}`) are supported (round robin).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener as StdTcpListener};
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::thread;

use rumqttd::protocol::v4::V4;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::tls::{self, TlsError, TlsServerFiles};

/// The default for [`BrokerOptions::max_packet_bytes`]: 1 MiB of payload plus room for the
/// topic and headers, so any packet a default [`LinkOptions`](super::LinkOptions) accepts fits.
pub(crate) const DEFAULT_MAX_PACKET_BYTES: usize = 1024 * 1024 + 64 * 1024;
/// How many free ports are tried for port 0 before giving up.
pub(crate) const PORT_ATTEMPTS: usize = 8;
/// Time a client has from TCP accept to its CONNECT packet.
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
    /// An additional listener without TLS or client authentication. For development only.
    pub danger_plaintext_listen: Option<SocketAddr>,
    /// Largest MQTT packet accepted from a client (at least 1 MiB is sensible for batches).
    pub max_packet_bytes: usize,
    /// Concurrent client connections.
    pub max_connections: usize,
}

impl BrokerOptions {
    /// Mutual TLS on `127.0.0.1:0`, no plaintext listener, default limits.
    pub fn localhost(tls: TlsServerFiles) -> BrokerOptions {
        BrokerOptions {
            listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
            tls,
            danger_plaintext_listen: None,
            max_packet_bytes: DEFAULT_MAX_PACKET_BYTES,
            max_connections: 1024,
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
    #[error("path {0} is not valid UTF-8, which rumqttd requires")]
    NonUtf8Path(std::path::PathBuf),
}

/// A running broker; stopped by [`shutdown`](EmbeddedBroker::shutdown) or on drop.
#[derive(Debug)]
pub struct EmbeddedBroker {
    tls_addr: SocketAddr,
    plaintext_addr: Option<SocketAddr>,
    listeners: Vec<Listener>,
}

#[derive(Debug)]
struct Listener {
    stop_tx: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Checks the TLS files, starts the router and the listeners, and returns once they are
    /// bound. Blocks the calling thread briefly (thread spawn and bind): call it from
    /// `spawn_blocking` or before entering async code if that matters.
    pub fn start(opts: BrokerOptions) -> Result<EmbeddedBroker, BrokerError> {
        // Fail here with a clear error instead of in rumqttd's accept loop, per connection.
        tls::server_config(&opts.tls)?;
        let tls_config = rumqttd::TlsConfig::Rustls {
            capath: Some(utf8(&opts.tls.client_ca)?),
            certpath: utf8(&opts.tls.cert)?,
            keypath: utf8(&opts.tls.key)?,
        };

        let router = Router::new(
            0,
            RouterConfig {
                max_connections: opts.max_connections,
                max_outgoing_packet_count: MAX_OUTGOING_PACKETS_PER_CONNECTION,
                max_segment_size: SEGMENT_BYTES.max(opts.max_packet_bytes),
                max_segment_count: SEGMENT_COUNT,
                ..RouterConfig::default()
            },
        );
        let router_tx = router.spawn();
        // rumqttd does not export the router channel's type: keep it inside a closure.
        let new_server = move |settings| Server::new(settings, router_tx.clone(), V4);
        let connections = ConnectionSettings {
            connection_timeout_ms: CONNECT_TIMEOUT_MS,
            max_payload_size: opts.max_packet_bytes,
            max_inflight_count: MAX_INFLIGHT_PER_CONNECTION,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };

        let mut broker = EmbeddedBroker {
            tls_addr: opts.listen,
            plaintext_addr: None,
            listeners: Vec::new(),
        };
        let settings = |name: &str, listen, tls| ServerSettings {
            name: name.to_owned(),
            listen,
            tls,
            next_connection_delay_ms: 0,
            connections: connections.clone(),
        };
        let (addr, listener) = bind_listener(opts.listen, |listen| {
            new_server(settings("citygate-mqtts", listen, Some(tls_config.clone())))
        })?;
        broker.tls_addr = addr;
        broker.listeners.push(listener);
        if let Some(plain) = opts.danger_plaintext_listen {
            warn!(addr = %plain, "embedded broker serves plaintext mqtt (danger_plaintext_listen)");
            let (addr, listener) = bind_listener(plain, |listen| {
                new_server(settings("citygate-mqtt-plain", listen, None))
            })?;
            broker.plaintext_addr = Some(addr);
            broker.listeners.push(listener);
        }
        info!(tls_addr = %broker.tls_addr, "embedded broker started");
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
            info!(tls_addr = %self.tls_addr, "embedded broker stopped");
        }
        self.listeners.clear();
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop();
    }
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
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
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

fn utf8(path: &Path) -> Result<String, BrokerError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| BrokerError::NonUtf8Path(path.to_owned()))
}

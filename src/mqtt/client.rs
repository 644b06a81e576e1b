//! [`MqttLink`]: one MQTT connection to a broker, over mutual TLS.
//!
//! [`MqttLink::start`] builds rumqttc's `AsyncClient` and `EventLoop` from [`LinkOptions`] and
//! spawns two tasks:
//! - the driver ([`super::driver`]), which polls the event loop and does nothing else: it
//!   reports connection changes, incoming publishes, SUBACKs and PUBACKs as [`LinkEvent`]s on
//!   a bounded channel and reconnects with jittered, capped exponential backoff;
//! - the subscriber, the only task that sends SUBSCRIBE: it issues each filter added through
//!   [`MqttLink::subscribe`] once while connected, and every filter again whenever the
//!   broker answers CONNACK with `session_present = 0` (a new session has no
//!   subscriptions). So each filter is subscribed exactly once per session, however a
//!   `subscribe` call and a CONNACK interleave.
//!
//! Publishing happens from the caller's task through the `AsyncClient` (never from the
//! driver, which would deadlock once rumqttc's request channel is full).
//!
//! Delivery caveats (the uplink forwarder relies on these): a PUBACK only means the broker
//! has the message; rumqttc drops its un-acked publishes when a reconnect yields a new session,
//! so callers re-send from their own store after every `Connected { session_present: false }`.
//!
//! Backpressure: the event channel is bounded ([`EVENT_CHANNEL_CAPACITY`]); when it is full
//! the driver waits, which stops reading from the broker (TCP flow control pushes back) and
//! stops sending: the consumer must keep draining events. If the receiver is dropped, events
//! are discarded and the link keeps working.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, MqttOptions, TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info_span, warn, Instrument};

pub use rumqttc::QoS;

use super::driver::Driver;
use super::event::{LinkEvent, LinkState};
use super::tls::{self, TlsClientFiles, TlsError};
use crate::backoff::BackoffPolicy;

/// Default largest MQTT packet, both directions (rumqttc's own default is 10 KiB).
pub(crate) const DEFAULT_MAX_PACKET_BYTES: usize = 1024 * 1024;
/// Default bound on un-acknowledged outgoing QoS 1 publishes.
pub(crate) const DEFAULT_INFLIGHT: u16 = 32;
/// Capacity of the channel carrying [`LinkEvent`]s to the link's owner.
pub(crate) const EVENT_CHANNEL_CAPACITY: usize = 64;
/// Capacity of rumqttc's request channel (publish/subscribe calls waiting for the driver).
pub(crate) const REQUEST_CHANNEL_CAPACITY: usize = 64;
/// How long [`MqttLink::shutdown`] waits for the DISCONNECT to be sent.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How the link secures its connection.
#[derive(Debug, Clone)]
pub enum LinkTls {
    /// Mutual TLS from PEM files (see [`tls::client_config`]).
    Files(TlsClientFiles),
    /// A prepared rustls configuration (tests, or keys held elsewhere).
    Config(Arc<rustls::ClientConfig>),
    /// No TLS at all: no confidentiality, no server or client authentication. Development only.
    DangerPlaintext,
}

/// Everything [`MqttLink::start`] needs.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// `host:port`; `host` is also the name the server certificate must carry.
    pub broker: String,
    /// MQTT client id; must not be empty when `clean_session` is false.
    pub client_id: String,
    pub tls: LinkTls,
    /// MQTT keep-alive; zero disables it, otherwise at least one second.
    pub keep_alive: Duration,
    /// Largest packet sent or accepted; raises rumqttc's 10 KiB default.
    pub max_packet_bytes: usize,
    /// Bound on un-acknowledged outgoing QoS 1 publishes (at least 1).
    pub inflight: u16,
    pub clean_session: bool,
    /// Time allowed for TCP connect + TLS handshake + CONNACK (rounded up to whole seconds).
    pub connect_timeout: Duration,
    pub backoff: BackoffPolicy,
    /// How long a connection must stay up before the reconnect backoff starts again from
    /// `backoff.initial`. Zero: from every CONNACK. A source whose broker drops it right after
    /// each CONNACK (a retained packet above `max_packet_bytes`) then backs off to
    /// `backoff.max` instead of reconnecting in a loop.
    pub stable_after: Duration,
    /// Last will: `(topic, payload)`, published retained at QoS 1 by the broker when the
    /// connection ends without a DISCONNECT (the hub's `offline` presence).
    pub last_will: Option<(String, Bytes)>,
}

impl LinkOptions {
    /// Defaults: 30 s keep-alive, 1 MiB packets, 32 in flight, clean session, 10 s connect
    /// timeout, default backoff restarting from every CONNACK.
    pub fn new(broker: impl Into<String>, client_id: impl Into<String>, tls: LinkTls) -> Self {
        LinkOptions {
            broker: broker.into(),
            client_id: client_id.into(),
            tls,
            keep_alive: Duration::from_secs(30),
            max_packet_bytes: DEFAULT_MAX_PACKET_BYTES,
            inflight: DEFAULT_INFLIGHT,
            clean_session: true,
            connect_timeout: Duration::from_secs(10),
            backoff: BackoffPolicy::default(),
            stable_after: Duration::ZERO,
            last_will: None,
        }
    }
}

/// Why a link call failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link TLS configuration: {0}")]
    Tls(#[from] TlsError),
    #[error("invalid link option {option}: {detail}")]
    Options {
        option: &'static str,
        detail: String,
    },
    #[error("the request queue is full (policy: caller retries later)")]
    QueueFull,
    #[error("the link is stopped")]
    Stopped,
    #[error("rumqttc rejected the request: {0}")]
    Rejected(String),
}

/// A running connection; see the module docs. Dropping it aborts its tasks without a DISCONNECT.
#[derive(Debug)]
pub struct MqttLink {
    client: AsyncClient,
    subscriptions: Arc<Subscriptions>,
    driver: Option<JoinHandle<()>>,
    resubscriber: JoinHandle<()>,
}

impl MqttLink {
    /// [`MqttLink::start`] for async callers: the TLS files are read on a blocking thread,
    /// never on an async worker.
    pub(crate) async fn open(
        opts: LinkOptions,
    ) -> Result<(MqttLink, mpsc::Receiver<LinkEvent>), LinkError> {
        match tokio::task::spawn_blocking(move || MqttLink::start(opts)).await {
            Ok(started) => started,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(LinkError::Stopped),
        }
    }

    /// Validates `opts`, loads TLS files and spawns the driver; must be called within a tokio
    /// runtime (a blocking thread of it is fine). Returns the link and the receiving end of its
    /// events. Async code calls [`MqttLink::open`].
    pub fn start(opts: LinkOptions) -> Result<(MqttLink, mpsc::Receiver<LinkEvent>), LinkError> {
        let mqtt_options = mqtt_options(&opts)?;
        let (client, eventloop) = AsyncClient::new(mqtt_options, REQUEST_CHANNEL_CAPACITY);
        let (events_tx, events_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let (state_tx, state_rx) = watch::channel(LinkState::Connecting);
        let subscriptions = Arc::new(Subscriptions::default());

        let driver = Driver::new(
            eventloop,
            events_tx,
            state_tx,
            opts.backoff,
            opts.connect_timeout,
            opts.stable_after,
        );
        // Every line the link's tasks log carries which link it is.
        let span = info_span!("mqtt_link", client_id = %opts.client_id, broker = %opts.broker);
        let driver = tokio::spawn(driver.run().instrument(span.clone()));
        let resubscriber = tokio::spawn(
            resubscribe(client.clone(), state_rx.clone(), subscriptions.clone()).instrument(span),
        );
        let link = MqttLink {
            client,
            subscriptions,
            driver: Some(driver),
            resubscriber,
        };
        Ok((link, events_rx))
    }

    /// Subscribes now if connected, and after every CONNACK that starts a new session (the
    /// first one included): one SUBSCRIBE per filter and session, so a caller can count one
    /// SUBACK per filter after each `Connected { session_present: false }`.
    pub async fn subscribe(&self, filter: &str, qos: QoS) -> Result<(), LinkError> {
        if !rumqttc::valid_filter(filter) {
            return Err(LinkError::Rejected(
                "subscribe (invalid filter?)".to_owned(),
            ));
        }
        if self.driver.as_ref().map_or(true, JoinHandle::is_finished) {
            return Err(LinkError::Stopped);
        }
        {
            let mut subs = self
                .subscriptions
                .list
                .lock()
                .map_err(|_| LinkError::Rejected("subscription list poisoned".to_owned()))?;
            if !subs.iter().any(|s| s.filter == filter && s.qos == qos) {
                subs.push(Subscription {
                    filter: filter.to_owned(),
                    qos,
                    sent_in: None,
                });
            }
        }
        self.subscriptions.added.notify_one();
        Ok(())
    }

    /// Queues a publish, waiting while rumqttc's request queue is full. Never call this from a
    /// task that must keep polling the link (the driver does not).
    pub async fn publish(&self, topic: &str, qos: QoS, payload: Bytes) -> Result<(), LinkError> {
        self.client
            .publish_bytes(topic, qos, false, payload)
            .await
            .map_err(|err| self.client_error(err))
    }

    /// [`MqttLink::publish`] with the retain flag: the broker keeps the message for every
    /// later subscriber (an empty payload deletes it). The hub's presence, simulators, tests.
    pub async fn publish_retained(
        &self,
        topic: &str,
        qos: QoS,
        payload: Bytes,
    ) -> Result<(), LinkError> {
        self.client
            .publish_bytes(topic, qos, true, payload)
            .await
            .map_err(|err| self.client_error(err))
    }

    /// Queues a publish without waiting; [`LinkError::QueueFull`] when the queue is full.
    pub(crate) fn try_publish(
        &self,
        topic: &str,
        qos: QoS,
        payload: Bytes,
    ) -> Result<(), LinkError> {
        self.client
            .try_publish(topic, qos, false, payload)
            .map_err(|err| self.client_error(err))
    }

    /// Sends DISCONNECT (if connected), waits up to two seconds for it to go out, then stops
    /// both tasks.
    pub async fn shutdown(mut self) {
        if self.client.try_disconnect().is_err() {
            debug!("disconnect request not queued");
        }
        if let Some(mut driver) = self.driver.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut driver)
                .await
                .is_err()
            {
                warn!("mqtt link did not stop in time; aborting it");
                driver.abort();
            }
        }
        self.resubscriber.abort();
    }

    fn client_error(&self, err: rumqttc::ClientError) -> LinkError {
        let stopped = self.driver.as_ref().map_or(true, JoinHandle::is_finished);
        match err {
            _ if stopped => LinkError::Stopped,
            rumqttc::ClientError::TryRequest(_) => LinkError::QueueFull,
            rumqttc::ClientError::Request(request) => {
                LinkError::Rejected(format!("{:?}", request_kind(&request)))
            }
        }
    }
}

impl Drop for MqttLink {
    fn drop(&mut self) {
        if let Some(driver) = &self.driver {
            driver.abort();
        }
        self.resubscriber.abort();
    }
}

fn request_kind(request: &rumqttc::Request) -> &'static str {
    match request {
        rumqttc::Request::Publish(_) => "publish (invalid topic?)",
        rumqttc::Request::Subscribe(_) => "subscribe (invalid filter?)",
        _ => "request",
    }
}

/// The filters of a link and when each was last sent.
#[derive(Debug, Default)]
struct Subscriptions {
    list: Mutex<Vec<Subscription>>,
    /// Signalled when a filter is added.
    added: tokio::sync::Notify,
}

#[derive(Debug)]
struct Subscription {
    filter: String,
    qos: QoS,
    /// The connection epoch it was last sent in; `None`: never.
    sent_in: Option<u64>,
}

/// Sends every SUBSCRIBE of the link: new filters while connected, and all of them after
/// each connection that started a new session; see the module docs.
async fn resubscribe(
    client: AsyncClient,
    mut state_rx: watch::Receiver<LinkState>,
    subscriptions: Arc<Subscriptions>,
) {
    loop {
        let connected = match *state_rx.borrow_and_update() {
            LinkState::Connected {
                session_present,
                epoch,
            } => Some((session_present, epoch)),
            _ => None,
        };
        if let Some((session_present, epoch)) = connected {
            let due: Vec<(String, QoS)> = match subscriptions.list.lock() {
                Ok(mut subs) => subs
                    .iter_mut()
                    .filter(|s| match s.sent_in {
                        None => true,
                        Some(sent) => !session_present && sent != epoch,
                    })
                    .map(|s| {
                        s.sent_in = Some(epoch);
                        (s.filter.clone(), s.qos)
                    })
                    .collect(),
                Err(_) => return,
            };
            if !due.is_empty() {
                debug!(filters = due.len(), epoch, "subscribing");
            }
            for (filter, qos) in due {
                if client.subscribe(filter, qos).await.is_err() {
                    return; // the event loop is gone
                }
            }
        }
        tokio::select! {
            changed = state_rx.changed() => if changed.is_err() { return },
            () = subscriptions.added.notified() => {}
        }
    }
}

/// Turns [`LinkOptions`] into rumqttc's options, checking what rumqttc would panic on.
fn mqtt_options(opts: &LinkOptions) -> Result<MqttOptions, LinkError> {
    let invalid = |option, detail: &str| LinkError::Options {
        option,
        detail: detail.to_owned(),
    };
    let (host, port) = opts
        .broker
        .rsplit_once(':')
        .ok_or_else(|| invalid("broker", "expected host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port
        .parse()
        .map_err(|_| invalid("broker", "port must be 1-65535"))?;
    if host.is_empty() || port == 0 {
        return Err(invalid("broker", "expected host:port with a non-zero port"));
    }
    if !opts.clean_session && opts.client_id.is_empty() {
        return Err(invalid(
            "client_id",
            "must not be empty when clean_session is false",
        ));
    }
    if !opts.keep_alive.is_zero() && opts.keep_alive < Duration::from_secs(1) {
        return Err(invalid("keep_alive", "zero or at least 1s"));
    }
    if opts.inflight == 0 {
        return Err(invalid("inflight", "at least 1"));
    }
    if opts.max_packet_bytes < 1024 {
        return Err(invalid("max_packet_bytes", "at least 1024"));
    }

    let mut options = MqttOptions::new(opts.client_id.clone(), host, port);
    options
        .set_keep_alive(opts.keep_alive)
        .set_max_packet_size(opts.max_packet_bytes, opts.max_packet_bytes)
        .set_inflight(opts.inflight)
        .set_clean_session(opts.clean_session)
        .set_request_channel_capacity(REQUEST_CHANNEL_CAPACITY);
    if let Some((topic, payload)) = &opts.last_will {
        options.set_last_will(rumqttc::LastWill::new(
            topic.clone(),
            payload.clone(),
            QoS::AtLeastOnce,
            true,
        ));
    }
    let transport = match &opts.tls {
        LinkTls::Files(files) => {
            Transport::tls_with_config(TlsConfiguration::Rustls(tls::client_config(files)?))
        }
        LinkTls::Config(config) => {
            Transport::tls_with_config(TlsConfiguration::Rustls(Arc::clone(config)))
        }
        LinkTls::DangerPlaintext => {
            warn!(broker = %opts.broker, "mqtt link without tls (danger_plaintext)");
            Transport::tcp()
        }
    };
    options.set_transport(transport);
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(broker: &str) -> LinkOptions {
        LinkOptions::new(broker, "gw-1", LinkTls::DangerPlaintext)
    }

    #[test]
    fn options_reject_what_rumqttc_would_panic_on() {
        assert!(mqtt_options(&opts("localhost:8883")).is_ok());
        assert!(mqtt_options(&opts("[::1]:8883")).is_ok());
        for bad in ["localhost", "localhost:0", ":8883", "localhost:x"] {
            assert!(
                matches!(
                    mqtt_options(&opts(bad)),
                    Err(LinkError::Options {
                        option: "broker",
                        ..
                    })
                ),
                "{bad}"
            );
        }
        let mut o = opts("localhost:1");
        o.client_id.clear();
        o.clean_session = false;
        assert!(mqtt_options(&o).is_err());
        let mut o = opts("localhost:1");
        o.keep_alive = Duration::from_millis(500);
        assert!(mqtt_options(&o).is_err());
        let mut o = opts("localhost:1");
        o.inflight = 0;
        assert!(mqtt_options(&o).is_err());
    }

    #[test]
    fn packet_limits_are_raised_both_ways() {
        let o = mqtt_options(&opts("localhost:1")).unwrap();
        assert_eq!(o.max_packet_size(), DEFAULT_MAX_PACKET_BYTES);
        assert_eq!(o.request_channel_capacity(), REQUEST_CHANNEL_CAPACITY);
        assert_eq!(o.inflight(), DEFAULT_INFLIGHT);
    }
}

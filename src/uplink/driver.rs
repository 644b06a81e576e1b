//! The task that polls rumqttc's `EventLoop`, and the classification of its errors.
//!
//! [`Driver::run`] is the only code that touches the event loop and it does nothing else: no
//! publishing or subscribing (rumqttc #263/#1025: awaiting a request from the polling task
//! deadlocks once the request channel is full), no storage, no decoding. It turns events into
//! [`LinkEvent`]s on a bounded channel and a [`LinkState`] on a watch channel, and after an
//! error it sleeps a jittered, capped exponential delay before polling again (rumqttc itself
//! would retry immediately, in a busy loop).
//!
//! It ends when the link sends DISCONNECT or when every `AsyncClient` is gone.

use std::time::Duration;

use rumqttc::{ConnectionError, Event, EventLoop, Outgoing, Packet, StateError};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::client::{LinkEvent, LinkState};
use crate::backoff::{Backoff, BackoffPolicy};

/// Why a connection attempt failed or a connection broke, classified for policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkFailure {
    /// TLS handshake or certificate problem (untrusted server, refused client certificate,
    /// no common protocol). Retrying will not help until an operator fixes certificates.
    Tls(String),
    /// The broker answered CONNACK with a refusal code.
    Refused(String),
    /// TCP-level failure: refused, reset, unreachable, DNS, closed by peer.
    Network(String),
    /// Connect, handshake or flush took too long.
    Timeout,
    /// The broker broke the MQTT protocol or sent a packet we cannot accept (e.g. too big).
    Protocol(String),
}

impl LinkFailure {
    /// Classifies a rumqttc error.
    pub fn classify(err: &ConnectionError) -> LinkFailure {
        match err {
            ConnectionError::Tls(tls) => LinkFailure::Tls(tls.to_string()),
            ConnectionError::Io(io) => from_io(io),
            ConnectionError::MqttState(StateError::Io(io)) => from_io(io),
            // The first read after a TLS 1.3 handshake happens while decoding CONNACK.
            ConnectionError::MqttState(StateError::Deserialization(
                rumqttc::mqttbytes::Error::Io(io),
            )) => from_io(io),
            ConnectionError::MqttState(state) => LinkFailure::Protocol(state.to_string()),
            ConnectionError::NetworkTimeout | ConnectionError::FlushTimeout => LinkFailure::Timeout,
            ConnectionError::ConnectionRefused(code) => LinkFailure::Refused(format!("{code:?}")),
            ConnectionError::NotConnAck(packet) => {
                LinkFailure::Protocol(format!("expected CONNACK, got {packet:?}"))
            }
            ConnectionError::RequestsDone => LinkFailure::Network("link closed".to_owned()),
        }
    }

    /// True for certificate and handshake failures.
    pub fn is_tls(&self) -> bool {
        matches!(self, LinkFailure::Tls(_))
    }
}

impl std::fmt::Display for LinkFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkFailure::Tls(d) => write!(f, "tls: {d}"),
            LinkFailure::Refused(d) => write!(f, "refused by broker: {d}"),
            LinkFailure::Network(d) => write!(f, "network: {d}"),
            LinkFailure::Timeout => f.write_str("timeout"),
            LinkFailure::Protocol(d) => write!(f, "protocol: {d}"),
        }
    }
}

/// rustls reports alerts and certificate errors as `io::Error`s wrapping a `rustls::Error`,
/// also after the handshake (TLS 1.3 servers reject a client certificate on the first read).
fn from_io(io: &std::io::Error) -> LinkFailure {
    match io
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => LinkFailure::Tls(tls.to_string()),
        None => LinkFailure::Network(io.to_string()),
    }
}

/// Owns the event loop; see the module docs.
pub(crate) struct Driver {
    eventloop: EventLoop,
    events_tx: mpsc::Sender<LinkEvent>,
    state_tx: watch::Sender<LinkState>,
    backoff: Backoff,
    epoch: u64,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Driver {
    pub(crate) fn new(
        mut eventloop: EventLoop,
        events_tx: mpsc::Sender<LinkEvent>,
        state_tx: watch::Sender<LinkState>,
        backoff: BackoffPolicy,
        connect_timeout: Duration,
    ) -> Driver {
        let mut network = eventloop.network_options();
        // rumqttc counts whole seconds; round up so a sub-second timeout is not zero.
        let secs = connect_timeout.as_secs() + u64::from(connect_timeout.subsec_nanos() > 0);
        network.set_connection_timeout(secs.max(1));
        eventloop.set_network_options(network);
        Driver {
            eventloop,
            events_tx,
            state_tx,
            backoff: Backoff::new(backoff),
            epoch: 0,
        }
    }

    /// Polls until DISCONNECT is sent or every client handle is dropped.
    pub(crate) async fn run(mut self) {
        let client_id = self.eventloop.mqtt_options.client_id();
        loop {
            match self.eventloop.poll().await {
                Ok(Event::Incoming(packet)) => self.incoming(packet, &client_id).await,
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    info!(client_id = %client_id, "mqtt link disconnected on request");
                    break;
                }
                Ok(Event::Outgoing(_)) => {}
                Err(ConnectionError::RequestsDone) => {
                    debug!(client_id = %client_id, "all mqtt link handles dropped");
                    break;
                }
                Err(err) => {
                    let error = LinkFailure::classify(&err);
                    let retry_in = self.backoff.next_delay();
                    warn!(
                        client_id = %client_id,
                        error = %error,
                        failures = self.backoff.failures(),
                        retry_in_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
                        "mqtt link down"
                    );
                    self.state_tx.send_replace(LinkState::Disconnected {
                        error: error.clone(),
                    });
                    self.emit(LinkEvent::Disconnected { error, retry_in }).await;
                    tokio::time::sleep(retry_in).await;
                }
            }
        }
        self.state_tx.send_replace(LinkState::Stopped);
    }

    async fn incoming(&mut self, packet: Packet, client_id: &str) {
        match packet {
            Packet::ConnAck(ack) => {
                self.backoff.reset();
                self.epoch += 1;
                info!(
                    client_id = %client_id,
                    session_present = ack.session_present,
                    epoch = self.epoch,
                    "mqtt link connected"
                );
                self.state_tx.send_replace(LinkState::Connected {
                    session_present: ack.session_present,
                    epoch: self.epoch,
                });
                self.emit(LinkEvent::Connected {
                    session_present: ack.session_present,
                })
                .await;
            }
            Packet::Publish(publish) => {
                self.emit(LinkEvent::Publish {
                    topic: publish.topic,
                    payload: publish.payload,
                })
                .await;
            }
            Packet::PubAck(ack) => self.emit(LinkEvent::PubAck { pkid: ack.pkid }).await,
            Packet::SubAck(ack) => {
                let granted = ack
                    .return_codes
                    .iter()
                    .all(|code| matches!(code, rumqttc::SubscribeReasonCode::Success(_)));
                self.emit(LinkEvent::SubAck {
                    pkid: ack.pkid,
                    granted,
                })
                .await;
            }
            _ => {}
        }
    }

    /// Waits for room in the event channel (backpressure); a dropped receiver discards events.
    async fn emit(&mut self, event: LinkEvent) {
        if self.events_tx.send(event).await.is_err() {
            debug!("link event receiver gone; event discarded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_wrapping_rustls_errors_are_tls_failures() {
        let tls = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
        );
        assert!(LinkFailure::classify(&ConnectionError::Io(tls)).is_tls());
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate),
        );
        let in_decode = StateError::Deserialization(rumqttc::mqttbytes::Error::Io(alert));
        assert!(LinkFailure::classify(&ConnectionError::MqttState(in_decode)).is_tls());
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(matches!(
            LinkFailure::classify(&ConnectionError::MqttState(StateError::Io(reset))),
            LinkFailure::Network(_)
        ));
        assert_eq!(
            LinkFailure::classify(&ConnectionError::NetworkTimeout),
            LinkFailure::Timeout
        );
    }
}

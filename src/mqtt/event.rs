//! What an [`MqttLink`](super::MqttLink) reports: events in order, its current state, and
//! why a connection failed, classified for policy.

use std::time::Duration;

use bytes::Bytes;

use rumqttc::{ConnectionError, StateError};

/// What the driver reports, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// CONNACK accepted. `session_present = false`: subscriptions are being re-issued and
    /// anything not yet acknowledged end-to-end must be re-sent.
    Connected { session_present: bool },
    /// A connection attempt failed or an established connection broke; the driver retries
    /// after `retry_in`.
    Disconnected {
        error: LinkFailure,
        retry_in: Duration,
    },
    /// An incoming application message. `retain`: the broker kept it and sends it because
    /// this client (re)subscribed, i.e. it was published before that subscription.
    Publish {
        topic: String,
        payload: Bytes,
        retain: bool,
    },
    /// The broker acknowledged our QoS 1 publish with this packet id.
    PubAck { pkid: u16 },
    /// The broker answered a SUBSCRIBE; `granted` is false if it refused any filter.
    SubAck { pkid: u16, granted: bool },
}

/// The link's current connection state, always readable without waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Connecting,
    /// `epoch` counts successful connections since start (1 for the first).
    Connected {
        session_present: bool,
        epoch: u64,
    },
    Disconnected {
        error: LinkFailure,
    },
    /// The link was shut down.
    Stopped,
}

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
    /// The broker sent a packet of this many bytes (after the fixed header), above the
    /// link's `max_packet_bytes`; rumqttc drops the connection before reading it.
    TooLarge(usize),
    /// The broker broke the MQTT protocol or sent a packet we cannot accept.
    Protocol(String),
}

impl LinkFailure {
    /// Classifies a rumqttc error.
    pub(crate) fn classify(err: &ConnectionError) -> LinkFailure {
        match err {
            ConnectionError::Tls(tls) => LinkFailure::Tls(tls.to_string()),
            ConnectionError::Io(io) => from_io(io),
            ConnectionError::MqttState(StateError::Io(io)) => from_io(io),
            // The first read after a TLS 1.3 handshake happens while decoding CONNACK.
            ConnectionError::MqttState(StateError::Deserialization(
                rumqttc::mqttbytes::Error::Io(io),
            )) => from_io(io),
            ConnectionError::MqttState(StateError::Deserialization(
                rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(bytes),
            )) => LinkFailure::TooLarge(*bytes),
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
            LinkFailure::TooLarge(n) => {
                write!(
                    f,
                    "protocol: incoming packet of {n} bytes above max_packet_bytes"
                )
            }
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
        let big = StateError::Deserialization(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(
            5 << 20,
        ));
        assert_eq!(
            LinkFailure::classify(&ConnectionError::MqttState(big)),
            LinkFailure::TooLarge(5 << 20)
        );
    }
}

//! The MQTT-over-TLS transport between gateways and the hub.
//!
//! This module is the transport only: it moves bytes to and from a broker and says what
//! happened on the wire. What to send, when to re-send and when a batch may be deleted (the
//! hub's end-to-end ack, never a broker PUBACK) is the uplink's and the hub's job above it.
//!
//! - [`certs`]: a throw-away certificate authority for tests and the demo (rcgen): a CA, a
//!   server certificate for `localhost`/127.0.0.1 and one client certificate per gateway, as
//!   PEM files with private keys at mode 0600.
//! - [`tls`]: loads those files into rustls configurations: TLS 1.3 only, the `ring`
//!   provider passed explicitly (never the process-wide default), ChaCha20-Poly1305 first,
//!   client certificates required on the server side; key files with group/other permission
//!   bits are refused.
//! - [`broker`]: an embedded rumqttd broker for one-box setups and tests, mutual TLS on
//!   127.0.0.1; a plaintext listener only under `danger_plaintext_listen`.
//! - [`client`] and [`driver`]: [`MqttLink`], a rumqttc client whose event loop is polled in
//!   its own task (nothing else happens there) and which reports connection changes, incoming
//!   publishes and PUBACKs over a bounded channel; [`crate::backoff`] spaces out reconnects.
//!
//! Invariants: nothing here logs key material; nothing here panics on bytes from the broker or
//! files; plaintext only exists behind options whose names start with `danger_`.
//!
//! Known limitation: rumqttd 0.20 (the newest release) terminates TLS with its own rustls 0.22,
//! so the embedded broker builds its TLS configuration from the PEM files itself; the gateway
//! side (rumqttc 0.25) shares the crate's rustls 0.23.

pub mod broker;
pub mod certs;
pub mod client;
pub mod driver;
pub mod tls;

mod forwarder;

pub use broker::{BrokerError, BrokerOptions, EmbeddedBroker};
pub use certs::{CertAuthority, CertKeyFiles};
pub use client::{LinkError, LinkEvent, LinkOptions, LinkState, LinkTls, MqttLink, QoS};
pub use driver::LinkFailure;
pub use forwarder::{ack_topic, stream_topic, Forwarder, ForwarderOptions};
pub use tls::{TlsClientFiles, TlsError, TlsServerFiles};

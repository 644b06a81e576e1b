//! MQTT over TLS: the transport every part of citygate that speaks MQTT shares — the
//! uplink, the MQTT meter source, the hub and the simulator.
//!
//! This module moves bytes to and from a broker and says what happened on the wire. What to
//! send, when to re-send and when a batch may be deleted (the hub's end-to-end ack, never a
//! broker PUBACK) is decided above it (`uplink`, `hub`); what the topics and acks look like is
//! `wire`'s.
//!
//! - [`certs`]: a small certificate authority for tests, the demo and one-box pilots (rcgen): a
//!   CA, server certificates and one client certificate per gateway, as PEM files with private
//!   keys at mode 0600.
//! - [`acl`]: mosquitto's access rules for the certificates `certs` issued, by role
//!   (gateway, hub, other client), and the listener snippet that enforces them.
//! - [`tls`]: loads those files into rustls configurations: TLS 1.3 only, the `ring`
//!   provider passed explicitly (never the process-wide default), ChaCha20-Poly1305 first,
//!   client certificates required on the server side; key files with group/other permission
//!   bits are refused.
//! - [`broker`]: an embedded broker for one-box setups and tests: rumqttd's router behind a
//!   front end of ours that terminates mutual TLS per connection (one idle socket cannot
//!   lock it), binds client ids to certificate names and enforces the broker access rules;
//!   a plaintext listener only under `danger_plaintext_listen`.
//! - [`client`]: [`MqttLink`], a rumqttc client handle; [`driver`] polls its event loop in its
//!   own task (nothing else happens there) and reports [`event`]s — connection changes,
//!   incoming publishes, PUBACKs — over a bounded channel; reconnects are spaced by
//!   [`crate::backoff`].
//!
//! Dependencies point one way: `client` → `driver` → `event`; `broker` and `certs` → `tls`.
//!
//! Invariants: nothing here logs key material; nothing here panics on bytes from the broker or
//! files; plaintext only exists behind options whose names start with `danger_`.
//!
//! Both sides use the crate's rustls 0.23: the embedded broker terminates TLS itself
//! (tokio-rustls) and hands rumqttd 0.20 only the decrypted MQTT stream.

pub mod acl;
pub(crate) mod broker;
pub(crate) mod certs;
pub(crate) mod client;
pub(crate) mod driver;
pub(crate) mod event;
pub mod tls;

pub use broker::{
    certificate_name, BrokerAccess, BrokerError, BrokerOptions, BrokerStats, BrokerStatsHandle,
    EmbeddedBroker,
};
pub use certs::{CertAuthority, CertKeyFiles};
pub use client::{LinkError, LinkOptions, LinkTls, MqttLink, QoS};
pub use event::{LinkEvent, LinkFailure, LinkState};
pub use tls::{TlsClientFiles, TlsError, TlsServerFiles};

//! Logging set-up and the gateway's counters.
//!
//! Counters are plain atomics shared by `Arc`; per-device poll state sits behind one
//! mutex touched once per poll. They feed `citygate run`'s periodic summary and the
//! tests; the local status endpoint ([`http`]) exports the same struct as JSON and in
//! Prometheus text format ([`prometheus`]).

pub mod http;
pub(crate) mod log_limit;
pub(crate) mod prometheus;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::reading::{DeviceId, TimestampMs};

/// One monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn inc(&self) {
        self.add(1);
    }

    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Poll outcomes of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceStats {
    pub polls_ok: u64,
    pub timeouts: u64,
    pub exceptions: u64,
    pub transport_errors: u64,
    /// MQTT messages (or fields of them) that could not be used.
    pub payload_errors: u64,
    pub last_ok_ms: Option<TimestampMs>,
    pub last_error: Option<String>,
}

/// Declares [`Metrics`] with one `Counter` field per pipeline counter and
/// [`Metrics::counters`] listing them, so a counter's name, help text and field are written
/// once (the status endpoint exports each as `citygate_<name>_total`).
macro_rules! metrics {
    ($($name:ident: $help:literal,)*) => {
        /// Pipeline counters, one set per gateway process.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $(
                #[doc = $help]
                pub $name: Counter,
            )*
            devices: Mutex<BTreeMap<DeviceId, DeviceStats>>,
            link: Mutex<LinkStatus>,
            faults: Mutex<BTreeMap<String, String>>,
            emergency: Mutex<Option<EmergencyStatus>>,
            pub started: StartTime,
        }

        impl Metrics {
            /// Every pipeline counter with its exported name (without `citygate_`/`_total`)
            /// and help text, for the status endpoint.
            pub(crate) fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $help, self.$name.get()),)*]
            }
        }
    };
}

metrics! {
    samples_polled: "Polls that returned a register image.",
    samples_dropped: "Samples dropped because the pipeline was full.",
    readings_normalised: "Readings decoded from samples.",
    readings_flagged: "Readings flagged uncertain or bad by the checks.",
    readings_spike: "Readings flagged uncertain(spike): a change faster than the profile's max_rate.",
    readings_frozen: "Readings flagged uncertain(frozen): the same value frozen_after times in a row.",
    records_minimised: "Records left after purpose minimisation.",
    aggregates_emitted: "Aggregate records (per device or per area) the purpose flows closed.",
    aggregates_suppressed: "Area aggregates withheld because fewer than k devices contributed (k-anonymity).",
    samples_late: "Samples that arrived after their aggregate window had closed; not counted in any window.",
    records_sealed: "Records sealed into batches.",
    batches_sealed: "Batches sealed.",
    batches_sealed_idle: "Batches sealed because a poll round ended and nothing was queued (the rest by age or size).",
    batches_committed: "Batches durably committed to the store.",
    seal_errors: "Batches that could not be sealed.",
    store_errors: "Store writes that failed.",
    store_reopens: "Times the store was reopened in place after failing writes.",
    store_recoveries: "Damaged stores moved aside at open and replaced by a fresh one.",
    batches_lost_to_corruption: "Batches a damaged store held when it was moved aside (not delivered).",
    batches_lost: "Sealed batches lost before they were committed (held past the bound while the store failed, refused by the store, or still uncommitted at shutdown).",
    batches_evicted: "Batches dropped by the store quota.",
    batches_sent: "Batch publications to the broker (re-sends included).",
    batches_acked: "Batches acknowledged by the hub and deleted.",
    resend_rounds: "Times unacknowledged batches were sent again.",
    hub_sessions: "Hub sessions the uplink saw come online (hub presence).",
    presence_resends: "Times a hub coming online made the uplink re-send its unacknowledged batches at once.",
    acks_rejected: "Malformed or foreign acknowledgements ignored.",
    acks_unauthenticated: "Acknowledgements ignored because no valid hub signature was on them (forged, unsigned or another key).",
    alarm_repeats_held: "Unchanged alarm readings held back between periodic states.",
    modbus_stale_replies: "Modbus TCP replies discarded because they carry an earlier transaction's id (repeated or late replies).",
    mqtt_messages: "MQTT meter messages received.",
    mqtt_unknown_topic: "MQTT meter messages on a topic no device listens on.",
    mqtt_payload_errors: "MQTT meter messages rejected as a whole.",
    mqtt_field_errors: "Fields missing or mistyped in otherwise usable MQTT messages.",
    mqtt_stale_values: "MQTT values dropped as not newer than the last one used.",
    mqtt_clock_skewed: "MQTT values whose meter clock is ahead of the gateway's by more than max_clock_skew, or behind by more than max_clock_lag.",
    dtu_registrations_refused: "DTU registrations refused because the id is live on another connection.",
    dtu_peer_changed: "DTU registrations accepted from another IP address than the id's last one.",
    dtu_peers_refused: "Connections to a DTU listener closed because the peer is outside its allow list.",
    mqtt_oversized: "MQTT meter messages dropped as too large (above 64 KiB, or above max_packet_bytes, which costs the connection).",
    mqtt_source_connects: "Connections of MQTT meter sources to their brokers.",
    checkpoints_taken: "Checkpoints of the aggregate windows taken (with an aggregate batch, or on their own every checkpoint_every while samples arrive).",
    readings_checkpointed: "Readings the last checkpoint covers (readings_normalised when it was taken): what a crash now would keep.",
    emergencies_started: "Emergency collections switched on (citygate emergency start; resumed ones after a restart not counted).",
    emergencies_ended: "Emergency collections ended (expired or stopped), each with a purge and a report on the alarms stream.",
    emergency_batches_purged: "Batches of ended emergency collections destroyed on the box before they were delivered.",
    emergency_records_discarded: "Records of an ending emergency collection discarded unsealed (its open batch and windows).",
}

/// The emergency collection running now (`/status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EmergencyStatus {
    pub id: String,
    pub policy: String,
    pub reason: String,
    pub started_ms: TimestampMs,
    /// When it ends by itself (or earlier, on `citygate emergency stop`).
    pub ends_ms: TimestampMs,
}

/// When a set of counters started: the process start, in practice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartTime(pub TimestampMs);

impl Default for StartTime {
    fn default() -> Self {
        Self(crate::reading::now_ms())
    }
}

/// State of the uplink, as the forwarder last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkStatus {
    /// False when the config has no `[uplink]`: batches stay in the store.
    pub configured: bool,
    pub broker: Option<String>,
    pub connected: bool,
    /// When `connected` last changed.
    pub since_ms: Option<TimestampMs>,
    /// Why the link last went down.
    pub last_error: Option<String>,
    /// When the hub last acknowledged a batch.
    pub last_ack_ms: Option<TimestampMs>,
    /// Batches published and not yet acknowledged.
    pub in_flight: u64,
    /// Successful connections since start.
    pub connects: u64,
    /// The hubs' presence as last heard (`citygate/hub/presence/+`), by hub id.
    #[serde(default)]
    pub hubs: BTreeMap<String, HubPresence>,
}

/// What the uplink last heard from one hub's presence.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HubPresence {
    pub online: bool,
    /// The hub's last announced session (16 hex digits), online or not.
    pub session: Option<String>,
    /// When the uplink last heard a presence message of this hub.
    pub since_ms: TimestampMs,
}

/// How one poll of one device ended.
#[derive(Debug, Clone)]
pub(crate) enum PollOutcome {
    Ok,
    Timeout,
    Exception(String),
    Transport(String),
    /// A message from the device could not be (fully) used.
    PayloadError(String),
}

impl Metrics {
    pub(crate) fn record_poll(&self, device: &DeviceId, at_ms: TimestampMs, outcome: &PollOutcome) {
        let mut map = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let s = map.entry(device.clone()).or_default();
        match outcome {
            PollOutcome::Ok => {
                s.polls_ok += 1;
                s.last_ok_ms = Some(at_ms);
            }
            PollOutcome::Timeout => {
                s.timeouts += 1;
                s.last_error = Some("timeout".into());
            }
            PollOutcome::Exception(e) => {
                s.exceptions += 1;
                s.last_error = Some(e.clone());
            }
            PollOutcome::Transport(e) => {
                s.transport_errors += 1;
                s.last_error = Some(e.clone());
            }
            PollOutcome::PayloadError(e) => {
                s.payload_errors += 1;
                s.last_error = Some(e.clone());
            }
        }
    }

    pub fn device(&self, device: &DeviceId) -> DeviceStats {
        let map = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        map.get(device).cloned().unwrap_or_default()
    }

    /// Updates the uplink state under its lock.
    pub(crate) fn update_link(&self, f: impl FnOnce(&mut LinkStatus)) {
        f(&mut self.link.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn link(&self) -> LinkStatus {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn devices(&self) -> BTreeMap<DeviceId, DeviceStats> {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Marks a fault as active: until [`Metrics::clear_fault`] with the same key, `/health` is
    /// `degraded` and lists `reason`. A component uses one key per fault it can have (e.g.
    /// `store`, `mqtt_source:plant`), so raising again replaces the reason.
    pub(crate) fn raise_fault(&self, key: &str, reason: impl Into<String>) {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        faults.insert(key.to_owned(), reason.into());
    }

    /// Ends the fault `key` (no-op if it is not active).
    pub(crate) fn clear_fault(&self, key: &str) {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        faults.remove(key);
    }

    /// Whether the fault `key` is active.
    pub(crate) fn has_fault(&self, key: &str) -> bool {
        let faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        faults.contains_key(key)
    }

    /// Sets (or clears) the emergency collection `/status` reports.
    pub(crate) fn set_emergency(&self, status: Option<EmergencyStatus>) {
        *self.emergency.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }

    /// The emergency collection running now, if any.
    pub fn emergency(&self) -> Option<EmergencyStatus> {
        self.emergency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The active faults' reasons, ordered by key.
    pub fn faults(&self) -> Vec<String> {
        let faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        faults.values().cloned().collect()
    }
}

/// Installs the global log subscriber writing to stderr in `format` (see
/// [`crate::config::log`]); `RUST_LOG` overrides `default_filter`. Under systemd
/// (`JOURNAL_STREAM` set) text lines carry no colours and no timestamp: journald adds its own.
pub(crate) fn init_logging(default_filter: &str, format: crate::config::log::LogFormat) {
    use crate::config::log::LogFormat;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .finish()
            .with(QuietBrokerDisconnects)
            .try_init(),
        LogFormat::Text if journald => builder
            .with_ansi(false)
            .without_time()
            .finish()
            .with(QuietBrokerDisconnects)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .finish()
            .with(QuietBrokerDisconnects)
            .try_init(),
    };
}

/// Drops two ERROR events of rumqttd 0.20 that every client ending its connection with a
/// DISCONNECT causes (the hub's own link at a clean shutdown, every gateway that stops):
/// `router-drop` (the link task sees the router close its channel) and `no-connection id N
/// is already gone` (the DISCONNECT packet and the closed socket both reach the router,
/// as rumqttd's own comment on it says). Neither is anything an operator must act on;
/// connection ends are logged by the broker's front end (`mqtt::broker`) at DEBUG.
#[derive(Debug)]
struct QuietBrokerDisconnects;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for QuietBrokerDisconnects {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        let target = event.metadata().target();
        if !target.starts_with("rumqttd::") || *event.metadata().level() != tracing::Level::ERROR {
            return true;
        }
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        let m = message.0.as_str();
        let benign = match target {
            "rumqttd::server::broker" => m == "router-drop",
            "rumqttd::router::routing" => {
                m.starts_with("no-connection id ") && m.ends_with(" is already gone")
            }
            _ => false,
        };
        !benign
    }
}

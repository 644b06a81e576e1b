//! Logging set-up and the gateway's counters.
//!
//! Counters are plain atomics shared by `Arc`; per-device poll state sits behind one
//! mutex touched once per poll. They feed `citygate run`'s periodic summary and the
//! tests; the local status endpoint ([`http`]) exports the same struct as JSON and in
//! Prometheus text format ([`prometheus`]).

pub mod http;
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

/// Pipeline counters, one set per gateway process.
#[derive(Debug, Default)]
pub struct Metrics {
    pub samples_polled: Counter,
    pub samples_dropped: Counter,
    pub readings_normalised: Counter,
    pub readings_flagged: Counter,
    pub records_minimised: Counter,
    /// Alarm-stream readings held back because they repeat the last state sent.
    pub alarm_repeats_held: Counter,
    pub records_sealed: Counter,
    pub batches_sealed: Counter,
    pub batches_committed: Counter,
    pub seal_errors: Counter,
    pub store_errors: Counter,
    pub batches_evicted: Counter,
    pub batches_sent: Counter,
    pub batches_acked: Counter,
    pub resend_rounds: Counter,
    pub acks_rejected: Counter,
    /// MQTT meter messages received, on any topic.
    pub mqtt_messages: Counter,
    /// Messages on a topic no device listens on.
    pub mqtt_unknown_topic: Counter,
    /// Messages rejected as a whole (too large, not JSON, wrong shape, no field).
    pub mqtt_payload_errors: Counter,
    /// Fields missing from, or of the wrong type in, otherwise usable messages.
    pub mqtt_field_errors: Counter,
    /// Values dropped because the device already sent one as new or newer.
    pub mqtt_stale_values: Counter,
    devices: Mutex<BTreeMap<DeviceId, DeviceStats>>,
    link: Mutex<LinkStatus>,
    pub started: StartTime,
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

    /// Every pipeline counter with its exported name (without `citygate_`/`_total`) and
    /// help text, for the status endpoint.
    pub(crate) fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![
            (
                "samples_polled",
                "Polls that returned a register image.",
                self.samples_polled.get(),
            ),
            (
                "samples_dropped",
                "Samples dropped because the pipeline was full.",
                self.samples_dropped.get(),
            ),
            (
                "readings_normalised",
                "Readings decoded from samples.",
                self.readings_normalised.get(),
            ),
            (
                "readings_flagged",
                "Readings flagged uncertain or bad by the checks.",
                self.readings_flagged.get(),
            ),
            (
                "records_minimised",
                "Records left after purpose minimisation.",
                self.records_minimised.get(),
            ),
            (
                "records_sealed",
                "Records sealed into batches.",
                self.records_sealed.get(),
            ),
            (
                "batches_sealed",
                "Batches sealed.",
                self.batches_sealed.get(),
            ),
            (
                "batches_committed",
                "Batches durably committed to the store.",
                self.batches_committed.get(),
            ),
            (
                "seal_errors",
                "Batches that could not be sealed.",
                self.seal_errors.get(),
            ),
            (
                "store_errors",
                "Store writes that failed.",
                self.store_errors.get(),
            ),
            (
                "batches_evicted",
                "Batches dropped by the store quota.",
                self.batches_evicted.get(),
            ),
            (
                "batches_sent",
                "Batch publications to the broker (re-sends included).",
                self.batches_sent.get(),
            ),
            (
                "batches_acked",
                "Batches acknowledged by the hub and deleted.",
                self.batches_acked.get(),
            ),
            (
                "resend_rounds",
                "Times unacknowledged batches were sent again.",
                self.resend_rounds.get(),
            ),
            (
                "acks_rejected",
                "Malformed or foreign acknowledgements ignored.",
                self.acks_rejected.get(),
            ),
            (
                "alarm_repeats_held",
                "Unchanged alarm readings held back between periodic states.",
                self.alarm_repeats_held.get(),
            ),
            (
                "mqtt_messages",
                "MQTT meter messages received.",
                self.mqtt_messages.get(),
            ),
            (
                "mqtt_unknown_topic",
                "MQTT meter messages on a topic no device listens on.",
                self.mqtt_unknown_topic.get(),
            ),
            (
                "mqtt_payload_errors",
                "MQTT meter messages rejected as a whole.",
                self.mqtt_payload_errors.get(),
            ),
            (
                "mqtt_field_errors",
                "Fields missing or mistyped in otherwise usable MQTT messages.",
                self.mqtt_field_errors.get(),
            ),
            (
                "mqtt_stale_values",
                "MQTT values dropped as not newer than the last one used.",
                self.mqtt_stale_values.get(),
            ),
        ]
    }

    /// Updates the uplink state under its lock.
    pub(crate) fn update_link(&self, f: impl FnOnce(&mut LinkStatus)) {
        f(&mut self.link.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub(crate) fn link(&self) -> LinkStatus {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn devices(&self) -> BTreeMap<DeviceId, DeviceStats> {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Installs the tracing subscriber (`RUST_LOG` overrides `default_filter`).
pub(crate) fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

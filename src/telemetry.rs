//! Logging set-up and the gateway's counters.
//!
//! Counters are plain atomics shared by `Arc`; per-device poll state sits behind one
//! mutex touched once per poll. They feed `citygate run`'s periodic summary and the
//! tests; exporting them (status, Prometheus) reads the same struct.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::reading::{DeviceId, TimestampMs};

/// One monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Poll outcomes of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
}

/// How one poll of one device ended.
#[derive(Debug, Clone)]
pub enum PollOutcome {
    Ok,
    Timeout,
    Exception(String),
    Transport(String),
    /// A message from the device could not be (fully) used.
    PayloadError(String),
}

impl Metrics {
    pub fn record_poll(&self, device: &DeviceId, at_ms: TimestampMs, outcome: &PollOutcome) {
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

    pub fn devices(&self) -> BTreeMap<DeviceId, DeviceStats> {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Installs the tracing subscriber (`RUST_LOG` overrides `default_filter`).
pub fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

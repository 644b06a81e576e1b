//! What `citygate run` reports about itself on its local status endpoint.
//!
//! - `GET /status`: a JSON [`GatewayStatus`] — store depth per stream, uplink state and
//!   last ack, per-device last good poll and error counts, the pipeline counters, health.
//! - `GET /metrics`: the same in Prometheus text format.
//! - `GET /health`: `200 ok` or `503 degraded: reasons` (for systemd watchdogs, probes).
//!
//! `citygate status --config FILE` fetches `/status` and prints it as a table
//! ([`render`]). The document is built from the live counters at request time; the store's
//! come from the snapshot the [`Outbox`](crate::store::Outbox) publishes, so a request never
//! waits for a store write.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::GatewayConfig;
use crate::reading::{now_ms, Stream, TimestampMs};
use crate::store::StoreStats;
use crate::telemetry::http::{Reply, Routes};
use crate::telemetry::prometheus::{count, Exposition, Kind, CONTENT_TYPE};
use crate::telemetry::{DeviceStats, LinkStatus, Metrics};

/// Store usage above which the gateway reports itself degraded.
const STORE_FULL_RATIO: f64 = 0.9;
/// How long the uplink may be down before the gateway reports itself degraded.
const UPLINK_DOWN_GRACE_MS: i64 = 60_000;

/// One configured device and how its polls went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub name: String,
    pub profile: String,
    /// The transport, or an MQTT device's source and topic.
    pub endpoint: String,
    /// Modbus unit id; absent for MQTT devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<u8>,
    /// Absent for MQTT devices, which publish on their own schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval_ms: Option<u64>,
    /// An MQTT device's `expect_every`: it publishes at least this often.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_every_ms: Option<u64>,
    #[serde(flatten)]
    pub polls: DeviceStats,
    /// A polled device: no good poll within three intervals (plus slack) of now. An MQTT
    /// device: its source is down or reconnect-looping (fault `mqtt_source:<name>`), or no
    /// usable message within its `expect_every`.
    pub stale: bool,
}

/// Batches and bytes waiting in the store, per stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatus {
    pub batches: BTreeMap<String, u64>,
    pub bytes: u64,
    pub max_bytes: u64,
    pub evicted_batches: u64,
    /// Batches of ended emergency collections destroyed before delivery, ever.
    #[serde(default)]
    pub purged_batches: u64,
}

/// `ok`, or `degraded` with the reasons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub reasons: Vec<String>,
}

/// The `/status` document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub gateway: String,
    pub version: String,
    pub now_ms: TimestampMs,
    pub uptime_s: u64,
    pub health: Health,
    pub store: StoreStatus,
    pub link: LinkStatus,
    pub counters: BTreeMap<String, u64>,
    pub devices: Vec<DeviceStatus>,
    /// The emergency collection running now (`citygate emergency start`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emergency: Option<crate::telemetry::EmergencyStatus>,
}

#[derive(Debug, Clone)]
struct DeviceInfo {
    name: crate::reading::DeviceId,
    profile: String,
    endpoint: String,
    /// Unit id and poll interval of a polled (Modbus) device.
    schedule: Option<(u8, Duration)>,
    /// An MQTT device's source fault key and `expect_every`.
    mqtt: Option<(String, Option<Duration>)>,
}

/// The live sources of the status document.
#[derive(Debug)]
pub(crate) struct StatusSource {
    gateway: String,
    devices: Vec<DeviceInfo>,
    metrics: Arc<Metrics>,
    /// The store's counters as the outbox last published them.
    store_stats: watch::Receiver<StoreStats>,
}

impl StatusSource {
    pub(crate) fn new(
        cfg: &GatewayConfig,
        metrics: Arc<Metrics>,
        store_stats: watch::Receiver<StoreStats>,
    ) -> Self {
        let devices = cfg
            .devices
            .iter()
            .map(|d| DeviceInfo {
                name: d.id.clone(),
                profile: d.profile.name.clone(),
                endpoint: d.kind.to_string(),
                schedule: d.modbus().map(|m| (m.unit.0, m.poll_interval)),
                mqtt: d
                    .mqtt()
                    .map(|t| (format!("mqtt_source:{}", t.source), t.expect_every)),
            })
            .collect();
        Self {
            gateway: cfg.gateway_id.to_string(),
            devices,
            metrics,
            store_stats,
        }
    }

    /// The status as of now.
    pub(crate) fn snapshot(&self) -> GatewayStatus {
        self.snapshot_at(now_ms())
    }

    fn snapshot_at(&self, now: TimestampMs) -> GatewayStatus {
        let stats = self.store_stats.borrow().clone();
        let polls = self.metrics.devices();
        let started = self.metrics.started.0;
        let devices: Vec<DeviceStatus> = self
            .devices
            .iter()
            .map(|d| {
                let s = polls.get(&d.name).cloned().unwrap_or_default();
                let silent_for = |limit: i64| now - s.last_ok_ms.unwrap_or(started) > limit;
                let stale = match (&d.schedule, &d.mqtt) {
                    (Some((_, interval)), _) => {
                        silent_for(millis(*interval).saturating_mul(3).saturating_add(10_000))
                    }
                    // An MQTT meter publishes when it likes: stale when its source cannot
                    // deliver, or when it promised a message every so often.
                    (None, Some((source, expect))) => {
                        self.metrics.has_fault(source)
                            || expect.is_some_and(|e| silent_for(millis(e)))
                    }
                    (None, None) => false,
                };
                DeviceStatus {
                    name: d.name.to_string(),
                    profile: d.profile.clone(),
                    endpoint: d.endpoint.clone(),
                    unit: d.schedule.map(|(unit, _)| unit),
                    poll_interval_ms: d
                        .schedule
                        .map(|(_, i)| u64::try_from(i.as_millis()).unwrap_or(u64::MAX)),
                    expect_every_ms: d
                        .mqtt
                        .as_ref()
                        .and_then(|(_, e)| *e)
                        .map(|e| u64::try_from(e.as_millis()).unwrap_or(u64::MAX)),
                    polls: s,
                    stale,
                }
            })
            .collect();
        let link = self.metrics.link();
        let mut reasons = Vec::new();
        if stats.max_bytes > 0
            && stats.total_bytes() as f64 > STORE_FULL_RATIO * stats.max_bytes as f64
        {
            reasons.push(format!(
                "store above {:.0}% of its quota ({} of {} bytes)",
                STORE_FULL_RATIO * 100.0,
                stats.total_bytes(),
                stats.max_bytes
            ));
        }
        if link.configured && !link.connected {
            let since = link.since_ms.unwrap_or(started);
            if now - since > UPLINK_DOWN_GRACE_MS {
                reasons.push(format!("uplink down for {} s", (now - since) / 1000));
            }
        }
        let mut polled = devices
            .iter()
            .filter(|d| d.poll_interval_ms.is_some())
            .peekable();
        if polled.peek().is_some() && polled.all(|d| d.stale) {
            reasons.push("no device has answered recently".into());
        }
        let mut expected = devices
            .iter()
            .filter(|d| d.expect_every_ms.is_some())
            .peekable();
        if expected.peek().is_some() && expected.all(|d| d.stale) {
            reasons.push("no mqtt meter has published within its expect_every".into());
        }
        reasons.extend(self.metrics.faults());
        GatewayStatus {
            gateway: self.gateway.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            now_ms: now,
            uptime_s: u64::try_from((now - started) / 1000).unwrap_or(0),
            health: Health {
                status: if reasons.is_empty() { "ok" } else { "degraded" }.into(),
                reasons,
            },
            store: StoreStatus {
                batches: Stream::ALL
                    .iter()
                    .map(|s| (s.to_string(), stats.get(*s).batches))
                    .collect(),
                bytes: stats.total_bytes(),
                max_bytes: stats.max_bytes,
                evicted_batches: Stream::ALL
                    .iter()
                    .map(|s| stats.get(*s).evicted_batches)
                    .sum(),
                purged_batches: stats.get(Stream::EMERGENCY).purged_batches,
            },
            link,
            counters: self
                .metrics
                .counters()
                .into_iter()
                .map(|(name, _, v)| (name.to_string(), v))
                .collect(),
            devices,
            emergency: self.metrics.emergency(),
        }
    }

    /// The Prometheus exposition of the live counters.
    pub(crate) fn prometheus(&self) -> String {
        let st = self.snapshot();
        let mut e = Exposition::new();
        e.family("citygate_info", Kind::Gauge, "Gateway identity; always 1.")
            .labelled(
                "citygate_info",
                &[("gateway", &st.gateway), ("version", &st.version)],
                1u8,
            );
        e.single(
            "citygate_up_seconds",
            Kind::Gauge,
            "Seconds since the gateway started.",
            count(st.uptime_s),
        );
        e.single(
            "citygate_healthy",
            Kind::Gauge,
            "1 when /health answers ok, 0 when degraded.",
            u8::from(st.health.status == "ok"),
        );
        for (name, help, v) in self.metrics.counters() {
            let full = format!("citygate_{name}_total");
            e.single(&full, Kind::Counter, help, count(v));
        }
        // From the same snapshot, so the gauges agree with `/status` and `healthy`.
        e.family(
            "citygate_store_batches",
            Kind::Gauge,
            "Batches waiting in the store, per stream.",
        );
        for (stream, n) in &st.store.batches {
            e.labelled("citygate_store_batches", &[("stream", stream)], count(*n));
        }
        e.single(
            "citygate_store_bytes",
            Kind::Gauge,
            "Envelope bytes waiting in the store.",
            count(st.store.bytes),
        );
        e.single(
            "citygate_store_max_bytes",
            Kind::Gauge,
            "The store quota.",
            count(st.store.max_bytes),
        );
        let link = &st.link;
        e.single(
            "citygate_uplink_connected",
            Kind::Gauge,
            "1 while the uplink is connected to the broker.",
            u8::from(link.connected),
        );
        e.single(
            "citygate_uplink_in_flight",
            Kind::Gauge,
            "Batches published and not yet acknowledged by the hub.",
            count(link.in_flight),
        );
        e.single(
            "citygate_uplink_connects_total",
            Kind::Counter,
            "Successful connections to the broker.",
            count(link.connects),
        );
        e.family(
            "citygate_uplink_hub_online",
            Kind::Gauge,
            "1 while a hub's presence says online, by hub.",
        );
        for (hub, p) in &link.hubs {
            e.labelled(
                "citygate_uplink_hub_online",
                &[("hub", hub)],
                u8::from(p.online),
            );
        }
        if let Some(t) = link.last_ack_ms {
            e.single(
                "citygate_uplink_last_ack_timestamp_seconds",
                Kind::Gauge,
                "When the hub last acknowledged a batch (Unix time).",
                t as f64 / 1000.0,
            );
        }
        e.family(
            "citygate_device_polls_total",
            Kind::Counter,
            "Polls per device by outcome.",
        );
        for d in &st.devices {
            for (outcome, n) in [
                ("ok", d.polls.polls_ok),
                ("timeout", d.polls.timeouts),
                ("exception", d.polls.exceptions),
                ("transport_error", d.polls.transport_errors),
                ("payload_error", d.polls.payload_errors),
            ] {
                e.labelled(
                    "citygate_device_polls_total",
                    &[("device", &d.name), ("outcome", outcome)],
                    count(n),
                );
            }
        }
        e.family(
            "citygate_device_last_ok_timestamp_seconds",
            Kind::Gauge,
            "When each device last answered a poll (Unix time; 0 = never).",
        );
        for d in &st.devices {
            e.labelled(
                "citygate_device_last_ok_timestamp_seconds",
                &[("device", &d.name)],
                d.polls.last_ok_ms.map_or(0.0, |t| t as f64 / 1000.0),
            );
        }
        e.finish()
    }
}

impl Routes for StatusSource {
    fn get(&self, path: &str) -> Option<Reply> {
        match path {
            "/status" => Some(Reply::json(200, &self.snapshot())),
            "/metrics" => Some(Reply::ok(CONTENT_TYPE, self.prometheus())),
            "/health" => {
                let h = self.snapshot().health;
                Some(if h.reasons.is_empty() {
                    Reply::ok("text/plain", "ok\n".into())
                } else {
                    Reply {
                        status: 503,
                        content_type: "text/plain",
                        body: format!("degraded: {}\n", h.reasons.join("; ")),
                    }
                })
            }
            _ => None,
        }
    }
}

/// Where a running gateway records the address its status endpoint is bound to (so
/// `citygate status` finds it when the config asks for port 0): next to the store.
pub(crate) fn address_file(store_path: &Path) -> PathBuf {
    let mut name = store_path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "store".into());
    name.push(".status-addr");
    store_path.with_file_name(name)
}

/// Writes the bound address atomically.
pub(crate) fn write_address_file(store_path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    let path = address_file(store_path);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{addr}\n"))?;
    std::fs::rename(tmp, path)
}

/// Reads the address a running gateway recorded, if any.
pub fn read_address_file(store_path: &Path) -> Option<SocketAddr> {
    std::fs::read_to_string(address_file(store_path))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Binds the status endpoint configured in `cfg` and serves it until `token` is
/// cancelled. A bind failure (port taken) degrades the gateway's observability, not the
/// gateway: it is logged and `None` returned. The bound address is written next to the
/// store for `citygate status`.
pub(crate) fn start_endpoint(
    cfg: &GatewayConfig,
    metrics: Arc<Metrics>,
    store_stats: watch::Receiver<StoreStats>,
    token: tokio_util::sync::CancellationToken,
) -> Option<SocketAddr> {
    let source = Arc::new(StatusSource::new(cfg, metrics, store_stats));
    let addr = crate::telemetry::http::spawn_endpoint(cfg.status.listen?, source, token)?;
    if let Err(e) = write_address_file(&cfg.store.path, addr) {
        tracing::warn!(error = %e, "cannot record the status endpoint's address");
    }
    Some(addr)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

fn ago(now: TimestampMs, t: Option<TimestampMs>) -> String {
    match t {
        None => "never".into(),
        Some(t) => {
            let s = (now - t).max(0) / 1000;
            match s {
                0..=119 => format!("{s}s ago"),
                120..=7199 => format!("{}m ago", s / 60),
                _ => format!("{}h ago", s / 3600),
            }
        }
    }
}

/// The status as the operator reads it in a terminal.
pub(crate) fn render(st: &GatewayStatus) -> String {
    let mut o = String::new();
    let now = st.now_ms;
    let _ = writeln!(
        o,
        "gateway {}  (citygate {}, up {} s)  health: {}",
        st.gateway, st.version, st.uptime_s, st.health.status
    );
    for r in &st.health.reasons {
        let _ = writeln!(o, "  ! {r}");
    }
    let batches: Vec<String> = st
        .store
        .batches
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(
        o,
        "store   {} batches waiting ({}), {} of {} bytes, {} evicted",
        st.store.batches.values().sum::<u64>(),
        batches.join(", "),
        st.store.bytes,
        st.store.max_bytes,
        st.store.evicted_batches
    );
    let l = &st.link;
    if !l.configured {
        let _ = writeln!(o, "uplink  not configured: batches stay in the store");
    } else {
        let state = if l.connected { "connected" } else { "DOWN" };
        let _ = writeln!(
            o,
            "uplink  {} {} since {}, {} in flight, last ack {}{}",
            l.broker.as_deref().unwrap_or("?"),
            state,
            ago(now, l.since_ms),
            l.in_flight,
            ago(now, l.last_ack_ms),
            l.last_error
                .as_deref()
                .filter(|_| !l.connected)
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
        for (hub, p) in &l.hubs {
            let _ = writeln!(
                o,
                "hub     {hub} {} (session {}) since {}",
                if p.online { "online" } else { "OFFLINE" },
                p.session.as_deref().unwrap_or("-"),
                ago(now, Some(p.since_ms)),
            );
        }
    }
    let c = |k: &str| st.counters.get(k).copied().unwrap_or(0);
    let _ = writeln!(
        o,
        "counts  polled {}, sealed {} records in {} batches, committed {}, acked {}",
        c("samples_polled"),
        c("records_sealed"),
        c("batches_sealed"),
        c("batches_committed"),
        c("batches_acked")
    );
    let _ = writeln!(
        o,
        "\n{:<24} {:<16} {:<28} {:>4} {:>8} {:>8} {:>6} {:>6} {:<10} last error",
        "device", "profile", "endpoint", "unit", "interval", "ok", "tmout", "exc", "last ok"
    );
    for d in &st.devices {
        let _ = writeln!(
            o,
            "{:<24} {:<16} {:<28} {:>4} {:>8} {:>8} {:>6} {:>6} {:<10} {}{}",
            d.name,
            d.profile,
            d.endpoint,
            d.unit.map_or_else(|| "-".to_string(), |u| u.to_string()),
            d.poll_interval_ms
                .or(d.expect_every_ms)
                .map_or_else(|| "-".to_string(), |ms| format!("{}s", ms as f64 / 1000.0)),
            d.polls.polls_ok,
            d.polls.timeouts,
            d.polls.exceptions + d.polls.transport_errors + d.polls.payload_errors,
            ago(now, d.polls.last_ok_ms),
            d.polls.last_error.as_deref().unwrap_or("-"),
            if d.stale { "  (stale)" } else { "" }
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::DeviceId;
    use crate::store::{MemStore, Outbox};
    use crate::telemetry::PollOutcome;

    fn source(store_stats: watch::Receiver<StoreStats>) -> StatusSource {
        let mut devices: Vec<DeviceInfo> = ["a", "b"]
            .iter()
            .enumerate()
            .map(|(i, n)| DeviceInfo {
                name: DeviceId::new(*n).unwrap(),
                profile: "p".into(),
                endpoint: "tcp://127.0.0.1:502".into(),
                schedule: Some((u8::try_from(i + 1).unwrap(), Duration::from_secs(1))),
                mqtt: None,
            })
            .collect();
        devices.push(DeviceInfo {
            name: DeviceId::new("w").unwrap(),
            profile: "water".into(),
            endpoint: "mqtt source meters topic water/w/up".into(),
            schedule: None,
            mqtt: Some(("mqtt_source:meters".into(), None)),
        });
        StatusSource {
            gateway: "gw".into(),
            devices,
            metrics: Arc::new(Metrics::default()),
            store_stats,
        }
    }

    #[tokio::test]
    async fn health_degrades_when_every_device_is_silent_or_the_store_fills() {
        let outbox = Outbox::new(Arc::new(MemStore::new(1000)));
        let s = source(outbox.stats_rx());
        let t0 = s.metrics.started.0;
        let (a, b) = (DeviceId::new("a").unwrap(), DeviceId::new("b").unwrap());
        // Just started: nobody is stale yet.
        assert_eq!(s.snapshot_at(t0 + 1000).health.status, "ok");
        // `a` answers, `b` does not: one stale device is reported, the gateway is ok.
        s.metrics.record_poll(&a, t0 + 20_000, &PollOutcome::Ok);
        s.metrics
            .record_poll(&b, t0 + 20_000, &PollOutcome::Timeout);
        let st = s.snapshot_at(t0 + 21_000);
        assert_eq!(st.health.status, "ok");
        assert_eq!(
            st.devices.iter().map(|d| d.stale).collect::<Vec<_>>(),
            [false, true, false],
            "an MQTT device without expect_every is stale only when its source is"
        );
        // Nobody answered for longer than 3 intervals + slack: degraded.
        let st = s.snapshot_at(t0 + 40_000);
        assert_eq!(st.health.status, "degraded");
        assert_eq!(st.health.reasons, ["no device has answered recently"]);

        // A store above 90 % of its quota degrades it too.
        s.metrics.record_poll(&a, t0 + 40_000, &PollOutcome::Ok);
        outbox
            .append(Stream::Readings, 1, vec![0u8; 950])
            .await
            .unwrap();
        let st = s.snapshot_at(t0 + 40_500);
        assert_eq!(st.health.status, "degraded");
        assert!(
            st.health.reasons[0].starts_with("store above 90%"),
            "{:?}",
            st.health
        );
    }

    #[test]
    fn a_configured_uplink_down_for_a_minute_degrades_health() {
        let s = source(Outbox::new(Arc::new(MemStore::new(1 << 20))).stats_rx());
        let t0 = s.metrics.started.0;
        let a = DeviceId::new("a").unwrap();
        s.metrics.record_poll(&a, t0 + 100_000, &PollOutcome::Ok);
        s.metrics.update_link(|l| {
            l.configured = true;
            l.connected = false;
            l.since_ms = Some(t0);
        });
        assert_eq!(s.snapshot_at(t0 + 30_000).health.status, "ok");
        let st = s.snapshot_at(t0 + 100_000);
        assert_eq!(st.health.reasons, ["uplink down for 100 s"]);
        let text = s.prometheus();
        assert!(text.contains("\ncitygate_uplink_connected 0\n"), "{text}");
        let table = render(&st);
        assert!(table.contains("uplink  ? DOWN"), "{table}");
    }

    #[test]
    fn a_raised_fault_degrades_health_until_it_is_cleared() {
        let s = source(Outbox::new(Arc::new(MemStore::new(1 << 20))).stats_rx());
        let t0 = s.metrics.started.0;
        s.metrics
            .raise_fault("store", "store: commits failing (No space left on device)");
        let st = s.snapshot_at(t0 + 1000);
        assert_eq!(st.health.status, "degraded");
        assert_eq!(
            st.health.reasons,
            ["store: commits failing (No space left on device)"]
        );
        s.metrics.clear_fault("store");
        assert_eq!(s.snapshot_at(t0 + 2000).health.status, "ok");
    }

    #[tokio::test]
    async fn mqtt_devices_show_their_topic_and_no_unit_or_interval() {
        let s = source(Outbox::new(Arc::new(MemStore::new(1 << 20))).stats_rx());
        let st = s.snapshot_at(s.metrics.started.0 + 1000);
        let json = serde_json::to_value(&st).unwrap();
        let w = &json["devices"][2];
        assert_eq!(w["endpoint"], "mqtt source meters topic water/w/up");
        assert!(
            w.get("unit").is_none() && w.get("poll_interval_ms").is_none(),
            "{w}"
        );
        assert_eq!(json["devices"][0]["unit"], 1);
        assert_eq!(json["devices"][0]["poll_interval_ms"], 1000);
        let back: GatewayStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, st);
        let table = render(&st);
        let row = table.lines().find(|l| l.starts_with("w ")).unwrap();
        assert!(row.contains("water/w/up") && !row.contains("0s"), "{row}");
        let row = table.lines().find(|l| l.starts_with("a ")).unwrap();
        assert!(row.contains(" 1s "), "{row}");
    }

    /// issue 9 item 8: an MQTT meter goes stale when its source is down or looping, or
    /// when it stays silent longer than its `expect_every`.
    #[test]
    fn mqtt_devices_go_stale_with_their_source_or_their_silence() {
        let mut s = source(Outbox::new(Arc::new(MemStore::new(1 << 20))).stats_rx());
        s.devices.push(DeviceInfo {
            name: DeviceId::new("x").unwrap(),
            profile: "water".into(),
            endpoint: "mqtt source other topic x/up".into(),
            schedule: None,
            mqtt: Some(("mqtt_source:other".into(), Some(Duration::from_secs(600)))),
        });
        let t0 = s.metrics.started.0;
        let (w, x) = (DeviceId::new("w").unwrap(), DeviceId::new("x").unwrap());
        for d in ["a", "b"] {
            s.metrics
                .record_poll(&DeviceId::new(d).unwrap(), t0 + 999_000, &PollOutcome::Ok);
        }
        let stale =
            |st: &GatewayStatus| -> Vec<bool> { st.devices.iter().map(|d| d.stale).collect() };
        s.metrics.record_poll(&w, t0 + 1000, &PollOutcome::Ok);
        s.metrics.record_poll(&x, t0 + 1000, &PollOutcome::Ok);
        let st = s.snapshot_at(t0 + 600_000);
        assert_eq!(stale(&st), [false, false, false, false]);
        assert_eq!(st.health.status, "ok");
        assert_eq!(st.devices[3].expect_every_ms, Some(600_000));
        // x has been silent beyond expect_every; w has no promise to keep.
        let st = s.snapshot_at(t0 + 1_000_000);
        assert_eq!(stale(&st), [false, false, false, true]);
        assert_eq!(
            st.health.reasons,
            ["no mqtt meter has published within its expect_every"]
        );
        assert!(render(&st).contains("600s"), "{}", render(&st));
        // w's source is down: w is stale, and the source's fault is the reason.
        s.metrics.record_poll(&x, t0 + 1_000_000, &PollOutcome::Ok);
        s.metrics.raise_fault(
            "mqtt_source:meters",
            "mqtt source meters down for more than 1m",
        );
        let st = s.snapshot_at(t0 + 1_000_500);
        assert_eq!(stale(&st), [false, false, true, false]);
        assert_eq!(
            st.health.reasons,
            ["mqtt source meters down for more than 1m"]
        );
        s.metrics.clear_fault("mqtt_source:meters");
        let st = s.snapshot_at(t0 + 1_001_000);
        assert_eq!(stale(&st), [false, false, false, false]);
        assert_eq!(st.health.status, "ok");
    }

    #[test]
    fn address_file_sits_next_to_the_store() {
        assert_eq!(
            address_file(Path::new("/var/lib/citygate/store")),
            PathBuf::from("/var/lib/citygate/store.status-addr")
        );
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        assert_eq!(read_address_file(&store), None);
        let addr: SocketAddr = "127.0.0.1:4567".parse().unwrap();
        write_address_file(&store, addr).unwrap();
        assert_eq!(read_address_file(&store), Some(addr));
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(ago(100_000, None), "never");
        assert_eq!(ago(100_000, Some(95_000)), "5s ago");
        assert_eq!(ago(1_000_000, Some(0)), "16m ago");
    }
}

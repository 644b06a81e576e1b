//! [`MqttSubscriber`]: one task per `[[mqtt_source]]` broker connection.
//!
//! It owns one [`MqttLink`] (rumqttc event loop in the link's own driver task, TLS by
//! default, reconnect with backoff, re-subscription after a new session), subscribes to
//! every topic and filter its devices listen on, and turns each message into a
//! [`RawSample`] of named values:
//!
//! 1. the topic selects the device ([`Routes`]); an unknown topic is counted
//!    (`mqtt_unknown_topic`) and logged;
//! 2. the payload is decoded by the device profile's [`MqttSpec`](crate::profile::mqtt::MqttSpec)
//!    ([`decode`]); a rejected payload is counted (`mqtt_payload_errors`, and the device's
//!    `payload_errors`) and logged with its topic; missing or mistyped fields are counted
//!    (`mqtt_field_errors`) and the rest of the message is used;
//! 3. stale and duplicate values are dropped (`mqtt_stale_values`): per device and field,
//!    a value stamped by the meter is used only if its timestamp is later than the last
//!    one used, so QoS 1 redeliveries, retained messages seen again after a reconnect and
//!    out-of-order arrivals never become second readings. Values stamped with the receive
//!    time cannot be told apart and are always used (and marked `receive_time`);
//! 4. the sample goes to the transforms with `try_send`: when they fall behind, the
//!    sample is dropped and counted (`samples_dropped`), as for polled meters, so a slow
//!    pipeline never stalls the subscription.
//!
//! A message above the decoder's limit ([`MAX_PAYLOAD_BYTES`]) is dropped before decoding and
//! counted (`mqtt_oversized`, and as a payload error); the link reads packets up to the
//! source's `max_packet_bytes` (16 MiB by default), so such a message, even retained, never
//! breaks the connection. A packet above that limit does (rumqttc stops reading): it is
//! counted too, the link backs off to its capped delay unless a connection lasts
//! `down_grace`, and [`SourceHealth`] raises the fault `mqtt_source:<name>` (its devices are
//! stale, `/health` degraded) while the source is down or reconnect-looping.
//!
//! Warnings about bad messages are rate-limited per kind ([`LogLimiter`]: a burst per window,
//! then a count of what was suppressed); every bad message is counted regardless. No line
//! carries a topic or a gateway-API key as received: they hold meter keys ([`Redactor`]
//! names the device, or pseudonymises the levels that may be keys). Nothing a broker sends
//! can make this task panic or stop; it stops on cancellation.

use std::collections::HashMap;

use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::decode::{decode, Decoded, MAX_PAYLOAD_BYTES};
use super::health::SourceHealth;
use super::redact::Redactor;
use super::routes::Routes;
use crate::config::{DeviceConfig, MqttSourceConfig};
use crate::mqtt::{LinkEvent, LinkFailure, LinkOptions, MqttLink, QoS};
use crate::reading::{now_ms, DeviceId, FieldName, TimestampMs};
use crate::source::{RawSample, SampleData, SourceContext, TimeSource};
use crate::telemetry::log_limit::LogLimiter;
use crate::telemetry::PollOutcome;

/// The source task of one broker connection; see the module docs.
#[derive(Debug)]
pub(crate) struct MqttSubscriber {
    cfg: MqttSourceConfig,
    routes: Routes,
    cx: SourceContext,
    /// Per device and field: the latest meter timestamp used.
    last: HashMap<DeviceId, HashMap<FieldName, TimestampMs>>,
    log: LogLimiter,
    redact: Redactor,
    health: SourceHealth,
    /// The fault reason currently raised, if any.
    fault: Option<String>,
}

impl MqttSubscriber {
    pub(crate) fn new(
        cfg: MqttSourceConfig,
        devices: Vec<DeviceConfig>,
        cx: SourceContext,
    ) -> Self {
        let routes = Routes::new(devices);
        Self {
            health: SourceHealth::new(&cfg.name, cfg.down_grace, Instant::now()),
            fault: None,
            cfg,
            redact: Redactor::new(routes.patterns()),
            routes,
            cx,
            last: HashMap::new(),
            log: LogLimiter::default(),
        }
    }

    /// Runs until cancelled.
    pub(crate) async fn run(mut self) {
        let tls = crate::config::TlsFiles::link_tls(self.cfg.tls.as_ref());
        if self.cfg.tls.is_none() {
            warn!(broker = %self.cfg.broker, "mqtt source without TLS (danger_plaintext): meter data and the broker are not authenticated");
        }
        let mut opts = LinkOptions::new(self.cfg.broker.clone(), self.cfg.client_id.clone(), tls);
        opts.max_packet_bytes = self.cfg.max_packet_bytes;
        opts.stable_after = self.cfg.down_grace;
        let (link, mut events) = match MqttLink::open(opts).await {
            Ok(l) => l,
            Err(e) => {
                error!(broker = %self.cfg.broker, error = %e, "mqtt source cannot start");
                self.cx.metrics.raise_fault(
                    &self.health.key(),
                    format!("mqtt source {} cannot start: {e}", self.cfg.name),
                );
                let at = now_ms();
                for d in self.routes.devices() {
                    self.cx
                        .metrics
                        .record_poll(&d.id, at, &PollOutcome::Transport(e.to_string()));
                }
                return;
            }
        };
        let qos = if self.cfg.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        for filter in self.routes.filters() {
            if let Err(e) = link.subscribe(&filter, qos).await {
                error!(filter = %self.redact.topic(&filter), error = %e, "mqtt subscribe failed");
            }
        }
        info!(broker = %self.cfg.broker, devices = self.routes.devices().len(), "mqtt source started");
        loop {
            let check = self.health.next_change();
            tokio::select! {
                _ = self.cx.shutdown.cancelled() => break,
                () = sleep_until_some(check) => {}
                event = events.recv() => match event {
                    Some(LinkEvent::Publish { topic, payload, .. }) => {
                        self.on_message(&topic, &payload, now_ms());
                    }
                    Some(LinkEvent::Connected { session_present }) => {
                        self.cx.metrics.mqtt_source_connects.inc();
                        self.health.connected(Instant::now());
                        info!(session_present, "mqtt source connected");
                    }
                    Some(LinkEvent::Disconnected { error, retry_in }) => {
                        if let LinkFailure::TooLarge(bytes) = error {
                            self.cx.metrics.mqtt_oversized.inc();
                            error!(bytes, max_packet_bytes = self.cfg.max_packet_bytes, "broker sent a packet above max_packet_bytes; the connection is lost with it");
                        }
                        warn!(%error, ?retry_in, "mqtt source disconnected");
                        self.health.disconnected(Instant::now(), error.to_string());
                    }
                    Some(LinkEvent::SubAck { granted: false, .. }) => {
                        error!("broker refused a subscription");
                    }
                    Some(_) => {}
                    None => break,
                },
            }
            self.update_fault();
        }
        link.shutdown().await;
        self.log.flush();
        self.cx.metrics.clear_fault(&self.health.key());
        info!("mqtt source stopped");
    }

    /// Raises, replaces or clears this source's fault as [`SourceHealth`] says now.
    fn update_fault(&mut self) {
        let fault = self.health.fault(Instant::now());
        if fault == self.fault {
            return;
        }
        match &fault {
            Some(reason) => {
                error!(reason = %reason, "mqtt source faulty; its devices are stale");
                self.cx
                    .metrics
                    .raise_fault(&self.health.key(), reason.clone());
            }
            None => {
                info!("mqtt source healthy again");
                self.cx.metrics.clear_fault(&self.health.key());
            }
        }
        self.fault = fault;
    }

    /// Handles one message; public for tests that drive the task without a broker.
    pub(crate) fn on_message(&mut self, topic: &str, payload: &[u8], received_ms: TimestampMs) {
        self.cx.metrics.mqtt_messages.inc();
        if payload.len() > MAX_PAYLOAD_BYTES {
            return self.on_oversized(topic, payload.len(), received_ms);
        }
        if self.routes.is_gateway(topic) {
            return self.on_gateway_message(topic, payload, received_ms);
        }
        let Some(device) = self.routes.device(topic).cloned() else {
            self.cx.metrics.mqtt_unknown_topic.inc();
            if self.log.allow("unknown_topic") {
                warn!(topic = %self.redact.topic(topic), "mqtt message on a topic no device listens on");
            }
            return;
        };
        let Some(spec) = device.profile.mqtt.as_ref() else {
            return; // config validation gives every MQTT device an MQTT profile
        };
        let decoded = decode(spec, payload, received_ms);
        self.accept(&device, decoded, received_ms, payload.len());
    }

    /// Drops a message too large to decode; counted, and a payload error of its device.
    fn on_oversized(&mut self, topic: &str, bytes: usize, received_ms: TimestampMs) {
        self.cx.metrics.mqtt_oversized.inc();
        self.cx.metrics.mqtt_payload_errors.inc();
        let device = self.routes.device(topic).map(|d| d.id.clone());
        if let Some(id) = &device {
            let e = super::PayloadError::TooLarge(bytes);
            self.cx
                .metrics
                .record_poll(id, received_ms, &PollOutcome::PayloadError(e.to_string()));
        }
        if self.log.allow("oversized") {
            let topic = match &device {
                Some(_) => None,
                None => Some(self.redact.topic(topic)),
            };
            warn!(
                topic,
                device = device.as_ref().map(tracing::field::display),
                bytes,
                limit = MAX_PAYLOAD_BYTES,
                "oversized mqtt message dropped"
            );
        }
    }

    /// A ThingsBoard gateway-API message: `{"Device A": [telemetry…], "Device B": …}`.
    fn on_gateway_message(&mut self, topic: &str, payload: &[u8], received_ms: TimestampMs) {
        let root = match super::decode::parse(payload) {
            Ok(serde_json::Value::Object(root)) => root,
            other => {
                let e = match other {
                    Err(e) => e,
                    Ok(_) => super::PayloadError::Shape {
                        shape: "thingsboard gateway",
                        detail: "expected an object of device names".into(),
                    },
                };
                self.cx.metrics.mqtt_payload_errors.inc();
                if self.log.allow("payload_rejected") {
                    warn!(topic = %self.redact.topic(topic), bytes = payload.len(), error = %e, "mqtt payload rejected");
                }
                return;
            }
        };
        for (key, telemetry) in &root {
            let Some(device) = self.routes.gateway_device(topic, key).cloned() else {
                self.cx.metrics.mqtt_unknown_topic.inc();
                if self.log.allow("unknown_topic") {
                    warn!(
                        topic = %self.redact.topic(topic),
                        key = %self.redact.pseudonym(key),
                        "gateway-api message for a device not configured"
                    );
                }
                continue;
            };
            let Some(spec) = device.profile.mqtt.as_ref() else {
                continue;
            };
            let decoded = super::decode::decode_value(spec, telemetry, received_ms);
            self.accept(&device, decoded, received_ms, payload.len());
        }
    }

    /// Counts, de-duplicates and forwards what one device's message yielded.
    fn accept(
        &mut self,
        device: &DeviceConfig,
        decoded: Result<Decoded, super::PayloadError>,
        received_ms: TimestampMs,
        bytes: usize,
    ) {
        let decoded = match decoded {
            Ok(d) => d,
            Err(e) => {
                self.cx.metrics.mqtt_payload_errors.inc();
                self.cx.metrics.record_poll(
                    &device.id,
                    received_ms,
                    &PollOutcome::PayloadError(e.to_string()),
                );
                if self.log.allow("payload_rejected") {
                    warn!(device = %device.id, bytes, error = %e, "mqtt payload rejected");
                }
                return;
            }
        };
        let Decoded { values, errors } = decoded;
        if let Some(first) = errors.first() {
            self.cx.metrics.mqtt_field_errors.add(errors.len() as u64);
            self.cx.metrics.record_poll(
                &device.id,
                received_ms,
                &PollOutcome::PayloadError(first.to_string()),
            );
            if self.log.allow("field_errors") {
                warn!(device = %device.id, errors = errors.len(), first = %first, "mqtt payload fields unusable");
            }
        } else {
            self.cx
                .metrics
                .record_poll(&device.id, received_ms, &PollOutcome::Ok);
        }
        // A meter clock running ahead keeps its timestamp but is marked, and must not move
        // the staleness gate: one value from the future would drop every later real one.
        let skew_ms =
            TimestampMs::try_from(self.cfg.max_clock_skew.as_millis()).unwrap_or(TimestampMs::MAX);
        let mut values = values;
        for v in &mut values {
            if v.time == TimeSource::Device && v.at_ms > received_ms.saturating_add(skew_ms) {
                v.time = TimeSource::Skewed;
                self.cx.metrics.mqtt_clock_skewed.inc();
            }
        }
        let last = self.last.entry(device.id.clone()).or_default();
        let before = values.len();
        let values: Vec<_> = values
            .into_iter()
            .filter(|v| {
                if v.time != TimeSource::Device {
                    return true;
                }
                match last.get(&v.field) {
                    Some(prev) if *prev >= v.at_ms => false,
                    _ => {
                        last.insert(v.field.clone(), v.at_ms);
                        true
                    }
                }
            })
            .collect();
        let stale = before - values.len();
        // A meter clock running behind passed the gate on its own times (its values are
        // not from the future); its timestamps are kept and marked too.
        let lag_ms =
            TimestampMs::try_from(self.cfg.max_clock_lag.as_millis()).unwrap_or(TimestampMs::MAX);
        let mut values = values;
        for v in &mut values {
            if v.time == TimeSource::Device && v.at_ms < received_ms.saturating_sub(lag_ms) {
                v.time = TimeSource::Skewed;
                self.cx.metrics.mqtt_clock_skewed.inc();
            }
        }
        if stale > 0 {
            self.cx.metrics.mqtt_stale_values.add(stale as u64);
            debug!(device = %device.id, stale, "stale or duplicate mqtt values dropped");
        }
        if values.is_empty() {
            return;
        }
        self.cx.send(RawSample {
            device: device.id.clone(),
            profile: device.profile.clone(),
            at_ms: received_ms,
            data: SampleData::Values(values),
            ratios: device.ratios,
        });
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::mpsc;

    use super::*;
    use crate::source::mqtt::routes::tests::device;
    use crate::telemetry::Metrics;

    fn subscriber() -> (MqttSubscriber, mpsc::Receiver<RawSample>, Arc<Metrics>) {
        let (tx, rx) = mpsc::channel(4);
        let metrics = Arc::new(Metrics::default());
        let cfg = MqttSourceConfig {
            name: "s".into(),
            broker: "localhost:1".into(),
            client_id: "c".into(),
            tls: None,
            qos: 1,
            max_clock_skew: crate::config::mqtt::DEFAULT_MAX_CLOCK_SKEW,
            max_clock_lag: crate::config::mqtt::DEFAULT_MAX_CLOCK_LAG,
            max_packet_bytes: crate::config::mqtt::DEFAULT_SOURCE_MAX_PACKET_BYTES,
            down_grace: crate::config::mqtt::DEFAULT_DOWN_GRACE,
        };
        let s = MqttSubscriber::new(
            cfg,
            vec![device("w1", "w/+/up", Some("W1"))],
            SourceContext::for_test(tx, metrics.clone()),
        );
        (s, rx, metrics)
    }

    /// A ThingsBoard gateway-API source with one flow meter per name: `Meter A` is device
    /// `a`, `Meter B` device `b`.
    fn thingsboard_subscriber(
        names: &[&str],
    ) -> (MqttSubscriber, mpsc::Receiver<RawSample>, Arc<Metrics>) {
        use crate::profile::Profile;
        use std::path::Path;
        let tb = Arc::new(
            Profile::parse(
                Path::new("tb.toml"),
                "[meter]\nvendor = \"T\"\nmodel = \"T\"\nprotocol = \"mqtt\"\n[mqtt]\nshape = \"thingsboard\"\n\
                 [[field]]\nname = \"flow_rate\"\nkey = \"flow\"\nunit = \"m3/h\"\ncategory = \"measurement\"\ngrade = \"L2\"\n",
            )
            .unwrap(),
        );
        let devices = names
            .iter()
            .map(|name| {
                let id = name.trim_start_matches("Meter ").to_lowercase();
                let mut d = device(&id, "v1/gateway/telemetry", Some(name));
                d.profile = tb.clone();
                d
            })
            .collect();
        let (tx, rx) = mpsc::channel(8);
        let m = Arc::new(Metrics::default());
        let cfg = MqttSourceConfig {
            name: "tb".into(),
            broker: "localhost:1".into(),
            client_id: "c".into(),
            tls: None,
            qos: 1,
            max_clock_skew: crate::config::mqtt::DEFAULT_MAX_CLOCK_SKEW,
            max_clock_lag: crate::config::mqtt::DEFAULT_MAX_CLOCK_LAG,
            max_packet_bytes: crate::config::mqtt::DEFAULT_SOURCE_MAX_PACKET_BYTES,
            down_grace: crate::config::mqtt::DEFAULT_DOWN_GRACE,
        };
        let s = MqttSubscriber::new(cfg, devices, SourceContext::for_test(tx, m.clone()));
        (s, rx, m)
    }

    /// issue 9 item 8: a message above the decoder's limit is dropped before decoding and
    /// counted, for its device too; the next normal message is used.
    #[test]
    fn an_oversized_message_is_dropped_and_counted() {
        let (mut s, mut rx, m) = subscriber();
        let mut huge = b"{\"f\":1.5,\"pad\":\"".to_vec();
        huge.resize(MAX_PAYLOAD_BYTES + 1, b'x');
        s.on_message("w/W1/up", &huge, 1_000);
        s.on_message("other/topic", &huge, 1_000);
        assert_eq!(m.mqtt_oversized.get(), 2);
        assert_eq!(m.mqtt_payload_errors.get(), 2);
        assert_eq!(m.mqtt_unknown_topic.get(), 0, "not even routed");
        let w1 = m.device(&DeviceId::new("w1").unwrap());
        assert_eq!(w1.payload_errors, 1);
        assert!(w1.last_error.unwrap().contains("exceeds"));
        assert!(rx.try_recv().is_err());
        s.on_message("w/W1/up", br#"{"f":1.5}"#, 2_000);
        assert!(rx.try_recv().is_ok());
        assert_eq!(m.mqtt_oversized.get(), 2);
    }

    #[test]
    fn messages_become_samples_and_bad_ones_counters() {
        let (mut s, mut rx, m) = subscriber();
        let now = 1_763_906_400_000;
        s.on_message("w/W1/up", br#"{"f": 1.5}"#, now);
        let sample = rx.try_recv().unwrap();
        assert_eq!(sample.device.as_str(), "w1");
        let SampleData::Values(v) = &sample.data else {
            panic!("{:?}", sample.data)
        };
        assert_eq!((v.len(), v[0].time), (1, TimeSource::Received));
        s.on_message("w/W2/up", br#"{"f": 1.5}"#, now);
        s.on_message("w/W1/up", b"\xff", now);
        s.on_message("w/W1/up", br#"{"f": "1.5"}"#, now);
        assert_eq!(m.mqtt_messages.get(), 4);
        assert_eq!(m.mqtt_unknown_topic.get(), 1);
        assert_eq!(m.mqtt_payload_errors.get(), 1);
        assert_eq!(m.mqtt_field_errors.get(), 1);
        let stats = m.device(&DeviceId::new("w1").unwrap());
        assert_eq!((stats.polls_ok, stats.payload_errors), (1, 2));
        assert!(rx.try_recv().is_err(), "nothing usable in the bad ones");
    }

    #[test]
    fn thingsboard_gateway_messages_fan_out_by_device_name() {
        let (mut s, mut rx, m) = thingsboard_subscriber(&["Meter A", "Meter B"]);
        let now = 1_763_906_400_000;
        let payload = format!(
            r#"{{"Meter A":[{{"ts":{},"values":{{"flow":1.5}}}},{{"ts":{},"values":{{"flow":1.6}}}}],
                "Meter B":[{{"ts":{},"values":{{"flow":"x"}}}}],
                "Meter C":[{{"ts":{},"values":{{"flow":2}}}}]}}"#,
            now - 2000,
            now - 1000,
            now - 1000,
            now - 1000
        );
        s.on_message("v1/gateway/telemetry", payload.as_bytes(), now);
        let sample = rx.try_recv().unwrap();
        assert_eq!(sample.device.as_str(), "a");
        let SampleData::Values(v) = &sample.data else {
            panic!("{:?}", sample.data)
        };
        let times: Vec<i64> = v.iter().map(|v| v.at_ms).collect();
        assert_eq!(times, [now - 2000, now - 1000]);
        assert!(rx.try_recv().is_err(), "Meter B had only a bad value");
        assert_eq!(m.mqtt_field_errors.get(), 1);
        assert_eq!(m.mqtt_unknown_topic.get(), 1, "Meter C is not configured");
        s.on_message("v1/gateway/telemetry", b"[1]", now);
        assert_eq!(m.mqtt_payload_errors.get(), 1);
    }

    #[test]
    fn a_full_pipeline_drops_samples_instead_of_blocking() {
        let (mut s, _rx, m) = subscriber();
        for i in 0..10 {
            s.on_message("w/W1/up", br#"{"f": 1}"#, 1_763_906_400_000 + i);
        }
        assert_eq!(m.samples_polled.get(), 10);
        assert_eq!(m.samples_dropped.get(), 6, "channel capacity 4");
    }

    /// issue 12 item 2 and 3: warnings provoked by unknown topics, malformed and oversized
    /// payloads and unknown gateway-API keys name no meter key, and a flood of them is cut
    /// to a burst while the counters count every message.
    #[test]
    fn warnings_carry_no_meter_key_and_a_flood_is_rate_limited() {
        let (mut s, _rx, m) = subscriber();
        let (mut tb, _tb_rx, tb_m) = thingsboard_subscriber(&["Meter A"]);
        let mut huge = b"{\"f\":1.5,\"pad\":\"".to_vec();
        huge.resize(MAX_PAYLOAD_BYTES + 1, b'x');
        let ((), logs) = crate::test_fixtures::capture_warnings(|| {
            for i in 0..500 {
                s.on_message("w/W1/up", b"not json", 1_000 + i);
                s.on_message("w/W1/up", br#"{"g": 1}"#, 1_000 + i);
                s.on_message("w/W7777/up", br#"{"f": 1}"#, 1_000 + i);
                s.on_message("w/W1/up", &huge, 1_000 + i);
                s.on_message("w/W8888/up", &huge, 1_000 + i);
                tb.on_message("v1/gateway/telemetry", br#"{"Meter Q": []}"#, 1_000 + i);
                tb.on_message("v1/gateway/telemetry", b"[1]", 1_000 + i);
            }
        });
        for key in ["W1/", "W7777", "W8888", "Meter Q"] {
            assert!(!logs.contains(key), "{key} in the log:\n{logs}");
        }
        assert!(logs.contains("device=w1"), "{logs}");
        assert!(logs.contains("topic=w/~"), "{logs}");
        assert_eq!(m.mqtt_payload_errors.get(), 2000);
        assert_eq!(m.mqtt_unknown_topic.get(), 500);
        assert_eq!(tb_m.mqtt_unknown_topic.get(), 500);
        let lines = logs.lines().count();
        assert!(lines <= 6 * 10, "{lines} lines:\n{logs}");
    }

    /// One message from a meter whose clock is 12 h ahead must not blind the device: it is
    /// kept as `Skewed` (its raw time), counted, and the next real messages still pass.
    #[test]
    fn a_future_timestamp_is_marked_and_does_not_hold_back_later_values() {
        let (mut s, mut rx, m) = thingsboard_subscriber(&["Meter A"]);
        let now = 1_763_906_400_000;
        let msg = |ts: i64| format!(r#"{{"Meter A":[{{"ts":{ts},"values":{{"flow":1.5}}}}]}}"#);
        let ahead = now + 12 * 3_600_000;
        s.on_message("v1/gateway/telemetry", msg(ahead).as_bytes(), now);
        let SampleData::Values(v) = rx.try_recv().unwrap().data else {
            panic!("values expected")
        };
        assert_eq!((v[0].at_ms, v[0].time), (ahead, TimeSource::Skewed));
        assert_eq!(m.mqtt_clock_skewed.get(), 1);
        // The meter's next real readings arrive and are used.
        for k in 1..=3 {
            s.on_message(
                "v1/gateway/telemetry",
                msg(now + k * 1000).as_bytes(),
                now + k * 1000,
            );
            let SampleData::Values(v) = rx.try_recv().unwrap().data else {
                panic!("values expected")
            };
            assert_eq!(
                (v[0].at_ms, v[0].time),
                (now + k * 1000, TimeSource::Device)
            );
        }
        assert_eq!(m.mqtt_stale_values.get(), 0);
        // A skew within the allowance is the meter's time, as before.
        s.on_message(
            "v1/gateway/telemetry",
            msg(now + 60_000).as_bytes(),
            now + 4000,
        );
        let SampleData::Values(v) = rx.try_recv().unwrap().data else {
            panic!("values expected")
        };
        assert_eq!(v[0].time, TimeSource::Device);
    }

    /// Issue 11 item 6: a meter clock running behind by more than `max_clock_lag` is
    /// flagged like one running ahead, value and timestamp kept as sent; a lag within
    /// the bound is the meter's time.
    #[test]
    fn a_lagging_timestamp_is_marked_and_kept() {
        let (mut s, mut rx, m) = thingsboard_subscriber(&["Meter A"]);
        let now = 1_763_906_400_000;
        let msg = |ts: i64| format!(r#"{{"Meter A":[{{"ts":{ts},"values":{{"flow":1.5}}}}]}}"#);
        let lag = i64::try_from(crate::config::mqtt::DEFAULT_MAX_CLOCK_LAG.as_millis()).unwrap();
        let behind = now - lag - 60_000;
        s.on_message("v1/gateway/telemetry", msg(behind).as_bytes(), now);
        let SampleData::Values(v) = rx.try_recv().unwrap().data else {
            panic!("values expected")
        };
        assert_eq!((v[0].at_ms, v[0].time), (behind, TimeSource::Skewed));
        assert_eq!(
            v[0].value,
            crate::source::SourceValue::Raw(crate::profile::RawValue::Float(1.5))
        );
        assert_eq!(m.mqtt_clock_skewed.get(), 1);
        let within = now - lag + 60_000;
        s.on_message("v1/gateway/telemetry", msg(within).as_bytes(), now);
        let SampleData::Values(v) = rx.try_recv().unwrap().data else {
            panic!("values expected")
        };
        assert_eq!((v[0].at_ms, v[0].time), (within, TimeSource::Device));
        assert_eq!(m.mqtt_clock_skewed.get(), 1);
    }
}

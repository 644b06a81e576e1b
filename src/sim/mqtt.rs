//! Simulated MQTT meters: payloads for an MQTT profile, in its own shape or another.
//!
//! [`MqttSim`] keeps one value model per meter (the same `model` as the Modbus
//! simulator: counters that advance with the simulated load, gauges that random-walk
//! inside the field's range) and turns each snapshot into one message per meter:
//!
//! - shape `json`: every field written at its JSON pointer (objects and arrays created
//!   along the way), the timestamp at the profile's timestamp pointer in its format;
//! - shape `thingsboard`: `{"ts": ms, "values": {key: value, …}}`;
//! - shape `alink`: `{"id", "version": "1.0", "params": {key: {"value", "time"}}, "method":
//!   "thing.event.property.post"}`.
//!
//! Fields are located as the profile says; when the requested shape differs from the
//! profile's, keyed shapes use the field name as key and `json` puts keyed fields at
//! `/{key}`. Bit fields set their bit in the integer at their location (so an integer
//! flags field and its bits agree). Text identifiers carry the meter's key (`W0001`…).
//!
//! Each message comes with its [`Truth`]: the engineering values (profile unit) it
//! carries and its timestamp, so tests can check what a gateway made of it. With
//! `malformed_every = K`, every K-th message of a meter is followed by one malformed
//! message on the same topic, cycling through [`Malformed`] kinds; malformed messages
//! reuse the good message's timestamp, so whatever is readable in them is a duplicate.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Map, Value as Json};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::map::decode_eng;
use super::model::MeterModel;
use crate::mqtt::{LinkEvent, MqttLink, QoS};
use crate::profile::mqtt::{Locator, MqttField, MqttSpec, PayloadShape, TimeFormat, ValueKind};
use crate::profile::{Field, Profile};
use crate::reading::{now_ms, TimestampMs, UnitId};
use crate::source::mqtt::decode::{ALINK_PROPERTY_POST, MAX_PAYLOAD_BYTES};

/// Kinds of malformed message, in the order they are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Bytes that are not JSON.
    Garbage,
    /// Valid JSON of the wrong shape.
    WrongShape,
    /// A good message without its first required field.
    MissingField,
    /// A good message with a string where the first number field belongs.
    StringForNumber,
    /// A payload larger than the gateway decodes.
    Huge,
}

impl Malformed {
    pub(crate) const ALL: [Malformed; 5] = [
        Malformed::Garbage,
        Malformed::WrongShape,
        Malformed::MissingField,
        Malformed::StringForNumber,
        Malformed::Huge,
    ];
}

/// How the simulator publishes.
#[derive(Debug, Clone)]
pub struct MqttSimOptions {
    /// Payload shape; `None`: the profile's.
    pub shape: Option<PayloadShape>,
    /// Topic template; `{key}` is replaced by the meter's key.
    pub topic: String,
    /// Meter keys are this prefix and a 4-digit number from 1.
    pub key_prefix: String,
    pub count: u8,
    pub seed: u64,
    /// Follow every K-th message of a meter with a malformed one.
    pub malformed_every: Option<u32>,
}

impl MqttSimOptions {
    /// A topic template fitting `shape`.
    pub(crate) fn default_topic(shape: PayloadShape) -> &'static str {
        match shape {
            PayloadShape::Json => "meters/{key}/up",
            PayloadShape::ThingsBoard => "tb/{key}/telemetry",
            PayloadShape::Alink => "/sys/citygate-sim/{key}/thing/event/property/post",
        }
    }
}

/// A field value a message carries.
#[derive(Debug, Clone, PartialEq)]
pub enum SimValue {
    /// Engineering value in the profile's unit (flags 0/1).
    Number(f64),
    Text(String),
}

/// What a good message says.
#[derive(Debug, Clone, PartialEq)]
pub struct Truth {
    pub at_ms: TimestampMs,
    /// By field name.
    pub values: BTreeMap<String, SimValue>,
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct SimMessage {
    pub key: String,
    pub topic: String,
    pub payload: Vec<u8>,
    /// `None` for a malformed message.
    pub truth: Option<Truth>,
    pub malformed: Option<Malformed>,
}

#[derive(Debug)]
struct Meter {
    key: String,
    topic: String,
    model: MeterModel,
    sent: u32,
    last_ms: Option<TimestampMs>,
}

/// Simulated MQTT meters of one profile; see the module docs.
#[derive(Debug)]
pub struct MqttSim {
    profile: Arc<Profile>,
    shape: PayloadShape,
    /// Where each profile field goes in this shape, in profile order.
    layout: Vec<(Locator, ValueKind)>,
    meters: Vec<Meter>,
    malformed_every: Option<u32>,
    malformed_sent: usize,
}

/// Why a simulator cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MqttSimError(String);

impl MqttSim {
    pub fn new(profile: Arc<Profile>, opts: &MqttSimOptions) -> Result<MqttSim, MqttSimError> {
        let Some(spec) = profile.mqtt.as_ref() else {
            return Err(MqttSimError(format!(
                "profile {:?} describes registers, not MQTT payloads (protocol = \"mqtt\")",
                profile.name
            )));
        };
        if opts.count == 0 {
            return Err(MqttSimError("--count must be at least 1".into()));
        }
        if !opts.topic.contains("{key}") && opts.count > 1 {
            return Err(MqttSimError(format!(
                "topic {:?} has no {{key}}: all meters would publish on one topic",
                opts.topic
            )));
        }
        if opts.malformed_every == Some(0) {
            return Err(MqttSimError("--malformed-every must be at least 1".into()));
        }
        let shape = opts.shape.unwrap_or(spec.shape);
        let layout = spec
            .fields
            .iter()
            .map(|m| (locate(shape, m), m.kind))
            .collect();
        let meters = (1..=opts.count)
            .map(|n| {
                let key = format!("{}{n:04}", opts.key_prefix);
                Meter {
                    topic: opts.topic.replace("{key}", &key),
                    key,
                    model: MeterModel::new(&profile, opts.seed, UnitId(n)),
                    sent: 0,
                    last_ms: None,
                }
            })
            .collect();
        Ok(MqttSim {
            profile,
            shape,
            layout,
            meters,
            malformed_every: opts.malformed_every,
            malformed_sent: 0,
        })
    }

    pub(crate) fn shape(&self) -> PayloadShape {
        self.shape
    }

    /// The meters' (key, topic) pairs.
    pub(crate) fn topics(&self) -> Vec<(String, String)> {
        self.meters
            .iter()
            .map(|m| (m.key.clone(), m.topic.clone()))
            .collect()
    }

    /// One snapshot of every meter, stamped `at_ms` (which should increase per call).
    pub fn next_messages(&mut self, at_ms: TimestampMs) -> Vec<SimMessage> {
        let Some(spec) = self.profile.mqtt.clone() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for i in 0..self.meters.len() {
            let meter = &mut self.meters[i];
            let elapsed = meter.last_ms.map_or(Duration::ZERO, |l| {
                Duration::from_millis(u64::try_from(at_ms - l).unwrap_or(0))
            });
            meter.last_ms = Some(at_ms);
            meter.sent += 1;
            let words = meter.model.next(&self.profile, elapsed);
            let key = meter.key.clone();
            let topic = meter.topic.clone();
            let sent = meter.sent;
            let values: Vec<(&Field, SimValue)> = self
                .profile
                .fields
                .iter()
                .zip(&words)
                .zip(&self.layout)
                .map(|((f, w), (_, kind))| {
                    let v = match kind {
                        ValueKind::Text => SimValue::Text(key.clone()),
                        _ => SimValue::Number(decode_eng(f, w)),
                    };
                    (f, v)
                })
                .collect();
            let (payload, truth) = self.build(&spec, at_ms, &values);
            out.push(SimMessage {
                key: key.clone(),
                topic: topic.clone(),
                payload: payload.to_string().into_bytes(),
                truth: Some(truth),
                malformed: None,
            });
            if self.malformed_every.is_some_and(|k| sent % k == 0) {
                let kind = Malformed::ALL[self.malformed_sent % Malformed::ALL.len()];
                self.malformed_sent += 1;
                out.push(SimMessage {
                    key,
                    topic,
                    payload: self.malformed(&spec, kind, at_ms, &values),
                    truth: None,
                    malformed: Some(kind),
                });
            }
        }
        out
    }

    /// The payload for `values` and the truth it carries.
    fn build(
        &self,
        spec: &MqttSpec,
        at_ms: TimestampMs,
        values: &[(&Field, SimValue)],
    ) -> (Json, Truth) {
        let mut entries: Vec<(&Locator, Json)> = Vec::new();
        // Integers first, then bits into them, so an integer flags field and its bits agree.
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by_key(|i| matches!(self.layout[*i].1, ValueKind::Bit(_)));
        for i in order {
            let (f, v) = &values[i];
            let (loc, kind) = &self.layout[i];
            let existing = entries.iter().position(|(l, _)| *l == loc);
            let json = match (kind, v, existing) {
                (ValueKind::Bit(n), SimValue::Number(x), Some(at)) => {
                    let cur = entries[at].1.as_u64().unwrap_or(0);
                    let bit = 1u64 << n;
                    entries[at].1 = json!(if *x >= 0.5 { cur | bit } else { cur & !bit });
                    continue;
                }
                (_, _, Some(_)) => continue,
                (ValueKind::Bit(n), SimValue::Number(x), None) => {
                    json!(if *x >= 0.5 { 1u64 << n } else { 0 })
                }
                (_, SimValue::Text(s), None) => json!(s),
                (kind, SimValue::Number(x), None) => raw_json(f, *kind, *x),
            };
            entries.push((loc, json));
        }
        // The truth, read back from what is published (after bits were merged).
        let mut truth = BTreeMap::new();
        for (i, (f, v)) in values.iter().enumerate() {
            let (loc, kind) = &self.layout[i];
            let published = entries.iter().find(|(l, _)| *l == loc).map(|(_, j)| j);
            let value = match (kind, published) {
                (ValueKind::Text, _) => v.clone(),
                (ValueKind::Bit(n), Some(j)) => {
                    SimValue::Number(((j.as_u64().unwrap_or(0) >> n) & 1) as f64)
                }
                (ValueKind::Bool, Some(j)) => {
                    SimValue::Number(f64::from(u8::from(j.as_bool().unwrap_or(false))))
                }
                (_, Some(j)) => {
                    SimValue::Number(j.as_f64().unwrap_or(f64::NAN) * f.scale + f.offset)
                }
                (_, None) => v.clone(),
            };
            truth.insert(f.name.as_str().to_owned(), value);
        }
        let payload = match self.shape {
            PayloadShape::Json => {
                let mut root = Json::Object(Map::new());
                for (loc, v) in &entries {
                    if let Locator::Pointer(p) = loc {
                        set_pointer(&mut root, p, v.clone());
                    }
                }
                if let (Some(p), PayloadShape::Json) = (&spec.timestamp, spec.shape) {
                    let t = match spec.time_format {
                        TimeFormat::Millis => json!(at_ms),
                        TimeFormat::Seconds => json!(at_ms / 1000),
                        TimeFormat::Iso8601 => json!(iso8601(at_ms)),
                    };
                    set_pointer(&mut root, p, t);
                }
                root
            }
            PayloadShape::ThingsBoard => {
                let mut values = Map::new();
                for (loc, v) in &entries {
                    if let Locator::Key(k) = loc {
                        values.insert(k.clone(), v.clone());
                    }
                }
                json!({"ts": at_ms, "values": values})
            }
            PayloadShape::Alink => {
                let mut params = Map::new();
                for (loc, v) in &entries {
                    if let Locator::Key(k) = loc {
                        params.insert(k.clone(), json!({"value": v, "time": at_ms}));
                    }
                }
                json!({"id": (at_ms % 1_000_000_000).to_string(), "version": "1.0",
                       "params": params, "method": ALINK_PROPERTY_POST})
            }
        };
        // A json profile without a timestamp pointer is stamped on receipt.
        let at_ms = match (self.shape, &spec.timestamp) {
            (PayloadShape::Json, None) => 0,
            _ if spec.time_format == TimeFormat::Seconds => at_ms / 1000 * 1000,
            _ => at_ms,
        };
        (
            payload,
            Truth {
                at_ms,
                values: truth,
            },
        )
    }

    fn malformed(
        &self,
        spec: &MqttSpec,
        kind: Malformed,
        at_ms: TimestampMs,
        values: &[(&Field, SimValue)],
    ) -> Vec<u8> {
        match kind {
            Malformed::Garbage => b"\x00\xffnot json {".to_vec(),
            Malformed::WrongShape => match self.shape {
                PayloadShape::Json => b"\"a string, not an object\"".to_vec(),
                PayloadShape::ThingsBoard => b"[1, 2, 3]".to_vec(),
                PayloadShape::Alink => br#"{"id":"1","params":[1,2]}"#.to_vec(),
            },
            Malformed::MissingField | Malformed::StringForNumber => {
                let mut vals: Vec<(&Field, SimValue)> = values.to_vec();
                let target = spec.fields.iter().position(|m| {
                    !m.optional
                        && (kind == Malformed::MissingField
                            || matches!(m.kind, ValueKind::Number | ValueKind::Integer))
                });
                let target_loc = target.map(|t| self.layout[t].0.clone());
                if kind == Malformed::StringForNumber {
                    if let Some(t) = target {
                        vals[t].1 = SimValue::Text("12.5".into());
                    }
                }
                let (mut payload, _) = self.build(spec, at_ms, &vals);
                if let (Malformed::MissingField, Some(loc)) = (kind, target_loc) {
                    remove_at(&mut payload, self.shape, &loc);
                }
                payload.to_string().into_bytes()
            }
            Malformed::Huge => {
                let filler = "x".repeat(MAX_PAYLOAD_BYTES + 1024);
                json!({ "filler": filler }).to_string().into_bytes()
            }
        }
    }
}

/// Where a field goes in `shape`.
fn locate(shape: PayloadShape, m: &MqttField) -> Locator {
    match (shape, &m.locator) {
        (PayloadShape::Json, Locator::Pointer(p)) => Locator::Pointer(p.clone()),
        (PayloadShape::Json, Locator::Key(k)) => {
            Locator::Pointer(format!("/{}", k.replace('~', "~0").replace('/', "~1")))
        }
        (_, Locator::Key(k)) => Locator::Key(k.clone()),
        (_, Locator::Pointer(_)) => Locator::Key(m.name.as_str().to_owned()),
    }
}

/// The published JSON for an engineering value.
fn raw_json(f: &Field, kind: ValueKind, eng: f64) -> Json {
    let raw = (eng - f.offset) / f.scale;
    match kind {
        ValueKind::Integer => json!(raw.round() as i64),
        ValueKind::Bool => json!(raw >= 0.5),
        _ => json!(raw),
    }
}

/// Writes `v` at RFC 6901 pointer `p`, creating objects (or arrays, for numeric steps).
fn set_pointer(root: &mut Json, p: &str, v: Json) {
    let steps: Vec<String> = p
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect();
    let mut cur = root;
    for (i, step) in steps.iter().enumerate() {
        let last = i + 1 == steps.len();
        let next_is_index = steps
            .get(i + 1)
            .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
        let fresh = || {
            if next_is_index {
                Json::Array(Vec::new())
            } else {
                Json::Object(Map::new())
            }
        };
        let slot = match cur {
            Json::Array(a) => {
                let Ok(idx) = step.parse::<usize>() else {
                    return;
                };
                if a.len() <= idx {
                    a.resize(idx + 1, Json::Null);
                }
                &mut a[idx]
            }
            Json::Object(o) => o.entry(step.clone()).or_insert(Json::Null),
            _ => return,
        };
        if last {
            *slot = v;
            return;
        }
        if slot.is_null() {
            *slot = fresh();
        }
        cur = slot;
    }
    if steps.is_empty() {
        *cur = v;
    }
}

fn remove_at(payload: &mut Json, shape: PayloadShape, loc: &Locator) {
    match (shape, loc) {
        (PayloadShape::Json, Locator::Pointer(p)) => {
            if let Some((parent, last)) = p.rsplit_once('/') {
                let last = last.replace("~1", "/").replace("~0", "~");
                if let Some(Json::Object(o)) = payload.pointer_mut(parent) {
                    o.remove(&last);
                }
            }
        }
        (PayloadShape::ThingsBoard, Locator::Key(k)) => {
            if let Some(Json::Object(o)) = payload.pointer_mut("/values") {
                o.remove(k);
            }
        }
        (PayloadShape::Alink, Locator::Key(k)) => {
            if let Some(Json::Object(o)) = payload.pointer_mut("/params") {
                o.remove(k);
            }
        }
        _ => {}
    }
}

/// `at_ms` as RFC 3339 UTC with milliseconds.
pub(crate) fn iso8601(at_ms: TimestampMs) -> String {
    let secs = at_ms.div_euclid(1000);
    let ms = at_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// Publishes a snapshot of every meter each `interval` on `link` (QoS 1) until cancelled;
/// returns how many messages were queued. A publish waits while rumqttc's request queue
/// is full (so nothing is dropped silently); a late snapshot is sent late, not skipped.
/// The link's events are drained in a task of their own, as [`MqttLink`] requires.
pub(crate) async fn publish(
    mut sim: MqttSim,
    link: MqttLink,
    mut events: tokio::sync::mpsc::Receiver<LinkEvent>,
    interval: Duration,
    shutdown: CancellationToken,
) -> u64 {
    let drain = tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            match ev {
                LinkEvent::Connected { .. } => info!("sim connected to broker"),
                LinkEvent::Disconnected { error, .. } => warn!(%error, "sim disconnected"),
                _ => {}
            }
        }
    });
    let mut published = 0u64;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'run: loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        for m in sim.next_messages(now_ms()) {
            tokio::select! {
                _ = shutdown.cancelled() => break 'run,
                r = link.publish(&m.topic, QoS::AtLeastOnce, Bytes::from(m.payload)) => match r {
                    Ok(()) => published += 1,
                    Err(e) => {
                        warn!(error = %e, "sim publish failed");
                        break 'run;
                    }
                },
            }
        }
    }
    link.shutdown().await;
    drain.abort();
    published
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::DeviceId;
    use crate::source::mqtt::decode::decode;
    use crate::transform::normalise_values::normalise_values;
    use std::path::Path;

    fn shipped() -> Arc<Profile> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("firmware-profiles/oem-nbiot-water-mqtt.toml");
        Arc::new(Profile::load(&path).unwrap())
    }

    fn opts(shape: Option<PayloadShape>) -> MqttSimOptions {
        MqttSimOptions {
            shape,
            topic: "water/{key}/up".into(),
            key_prefix: "W".into(),
            count: 2,
            seed: 7,
            malformed_every: Some(1),
        }
    }

    #[test]
    fn iso8601_round_trips_through_the_gateway_parser() {
        for ms in [0, 951_782_400_123, 1_763_906_400_000, 4_102_444_799_999] {
            let s = iso8601(ms);
            assert_eq!(
                crate::source::mqtt::time::parse_iso8601(&s),
                Some(ms),
                "{s}"
            );
        }
    }

    #[test]
    fn messages_decode_to_their_truth_in_every_shape() {
        let p = shipped();
        let t0 = 1_763_906_400_000;
        for shape in [
            None,
            Some(PayloadShape::ThingsBoard),
            Some(PayloadShape::Alink),
        ] {
            let mut sim = MqttSim::new(p.clone(), &opts(shape)).unwrap();
            // Decode with a profile of the simulated shape (field names as keys).
            let gw = gateway_profile(&p, sim.shape());
            let mut volumes = Vec::new();
            for step in 0..5 {
                let at = t0 + step * 60_000;
                for m in sim.next_messages(at) {
                    let decoded = decode(gw.mqtt.as_ref().unwrap(), &m.payload, at + 5);
                    let Some(truth) = m.truth else {
                        let bad = match decoded {
                            Err(_) => true,
                            Ok(d) => !d.errors.is_empty(),
                        };
                        assert!(bad, "{:?} decoded cleanly", m.malformed);
                        continue;
                    };
                    let d = decoded.unwrap();
                    assert!(d.errors.is_empty(), "{:?}", d.errors);
                    let n = normalise_values(
                        &gw,
                        &DeviceId::new("w").unwrap(),
                        &d.values,
                        &crate::profile::Ratios::UNITY,
                    );
                    assert_eq!(n.readings.len(), p.fields.len());
                    for r in &n.readings {
                        assert_eq!(r.at_ms, truth.at_ms, "{shape:?}");
                        let f = gw.field(r.field.as_str()).unwrap();
                        match &truth.values[r.field.as_str()] {
                            SimValue::Number(x) => {
                                let got = r.value.as_f64().unwrap() / f.unit.factor;
                                assert!(
                                    (got - x).abs() < 1e-9 * x.abs().max(1.0),
                                    "{} {got} {x}",
                                    r.field
                                );
                            }
                            SimValue::Text(t) => assert_eq!(r.value.to_string(), *t),
                        }
                    }
                    if m.key == "W0001" {
                        volumes.push(truth.values["volume_forward"].clone());
                    }
                }
            }
            assert!(
                volumes.windows(2).all(|w| match (&w[0], &w[1]) {
                    (SimValue::Number(a), SimValue::Number(b)) => b > a,
                    _ => false,
                }),
                "{volumes:?}"
            );
        }
    }

    /// The shipped profile re-located for `shape` the way the simulator locates it.
    fn gateway_profile(p: &Profile, shape: PayloadShape) -> Profile {
        let mut gw = p.clone();
        if let Some(spec) = gw.mqtt.as_mut() {
            if spec.shape != shape {
                spec.shape = shape;
                spec.timestamp = None;
                for m in &mut spec.fields {
                    m.locator = locate(shape, m);
                }
            }
        }
        gw
    }
}

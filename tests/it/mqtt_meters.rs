//! MQTT meters end to end: simulated meters publish json, ThingsBoard and Alink payloads to
//! the embedded broker over mutual TLS; the gateway (`supervisor::start` with an
//! `[[mqtt_source]]`) subscribes, maps them to readings and seals them; the hub's side
//! opens the batches and every record is compared with what the simulator published.
//! Malformed payloads in between are counted and do not disturb the good ones.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use citygate::mqtt::{
    BrokerOptions, CertAuthority, EmbeddedBroker, LinkEvent, LinkTls, MqttLink, QoS,
};
use citygate::profile::mqtt::PayloadShape;
use citygate::profile::{Profile, ProfileSet};
use citygate::reading::{now_ms, DeviceId, Quality, QualityReason, Value};
use citygate::sim::mqtt::{Malformed, MqttSim, MqttSimOptions, SimMessage, SimValue, Truth};
use citygate::store::{MemStore, Store};
use citygate::supervisor::{self, KeyMaterial};
use tokio::sync::mpsc;

use crate::support::*;

const SHIPPED: &str = "oem-nbiot-water-mqtt";
const PURPOSE: &[&str] = &[
    "volume_forward",
    "flow_rate",
    "battery_voltage",
    "valve_state",
    "battery_low",
];

/// The shipped json profile rewritten for a keyed shape: every `pointer` becomes
/// `key = "<field name>"` (how `citygate sim --shape` lays such payloads out).
fn keyed_profile(shape: PayloadShape, name: &str) -> Profile {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("firmware-profiles/{SHIPPED}.toml"));
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = String::new();
    let mut field = String::new();
    for line in text.lines() {
        let l = line.trim_start();
        if let Some(v) = l.strip_prefix("name = ") {
            field = v.trim_matches('"').to_string();
        }
        if l.starts_with("timestamp") {
            continue;
        }
        if l.starts_with("pointer = ") {
            out += &format!("key = \"{field}\"\n");
        } else if l.starts_with("shape = ") {
            out += &format!("shape = \"{}\"\n", shape.as_str());
        } else {
            out += line;
            out += "\n";
        }
    }
    Profile::parse(std::path::Path::new(&format!("{name}.toml")), &out)
        .unwrap_or_else(|e| panic!("{e:?}"))
}

struct Pki {
    _dir: tempfile::TempDir,
    ca: CertAuthority,
    broker: EmbeddedBroker,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertAuthority::generate(dir.path(), "citygate test ca").unwrap();
    let server = ca.issue_localhost_server().unwrap();
    let broker = EmbeddedBroker::start(BrokerOptions::localhost(ca.server_files(&server))).unwrap();
    Pki {
        _dir: dir,
        ca,
        broker,
    }
}

/// A meter the test publishes for: its simulator and the device it is configured as.
struct Fleet {
    sim: MqttSim,
    /// Simulator key → device name.
    devices: BTreeMap<String, String>,
    profile: String,
}

fn sim(
    profile: &Arc<Profile>,
    shape: PayloadShape,
    topic: &str,
    prefix: &str,
    count: u8,
) -> MqttSim {
    MqttSim::new(
        profile.clone(),
        &MqttSimOptions {
            shape: Some(shape),
            topic: topic.into(),
            key_prefix: prefix.into(),
            count,
            seed: 11,
            malformed_every: Some(2),
        },
    )
    .unwrap()
}

async fn publish(link: &MqttLink, topic: &str, payload: Vec<u8>) {
    link.publish(topic, QoS::AtLeastOnce, Bytes::from(payload))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_meters_in_every_shape_arrive_as_sealed_readings() {
    let pki = pki();
    let port = pki.broker.tls_addr().port();
    let gw_client = TlsFiles::client(&pki.ca, "gw-test");

    let mut profiles = shipped_profiles();
    profiles.insert(keyed_profile(PayloadShape::ThingsBoard, "test-tb-water"));
    profiles.insert(keyed_profile(PayloadShape::Alink, "test-alink-water"));
    let shipped = profiles.get(SHIPPED).unwrap().clone();

    // json: two meters behind one `+` filter; ThingsBoard: one exact topic; Alink: one
    // meter behind the Alink topic filter with an explicit key.
    let mut fleets = vec![
        Fleet {
            sim: sim(&shipped, PayloadShape::Json, "water/{key}/up", "W", 2),
            devices: [("W0001", "flat-1"), ("W0002", "flat-2")]
                .map(|(k, d)| (k.to_string(), d.to_string()))
                .into(),
            profile: SHIPPED.into(),
        },
        Fleet {
            sim: sim(
                &shipped,
                PayloadShape::ThingsBoard,
                "tb/{key}/telemetry",
                "T",
                1,
            ),
            devices: [("T0001".to_string(), "tb-1".to_string())].into(),
            profile: "test-tb-water".into(),
        },
        Fleet {
            sim: sim(
                &shipped,
                PayloadShape::Alink,
                "/sys/pk1/{key}/thing/event/property/post",
                "A",
                1,
            ),
            devices: [("A0001".to_string(), "alink-1".to_string())].into(),
            profile: "test-alink-water".into(),
        },
    ];
    let devices = [
        mqtt_source_toml("meters", port, &gw_client, ""),
        mqtt_device_toml("flat-1", SHIPPED, "meters", "water/+/up", Some("W0001")),
        mqtt_device_toml("flat-2", SHIPPED, "meters", "water/+/up", Some("W0002")),
        mqtt_device_toml(
            "tb-1",
            "test-tb-water",
            "meters",
            "tb/T0001/telemetry",
            None,
        ),
        mqtt_device_toml(
            "alink-1",
            "test-alink-water",
            "meters",
            "/sys/pk1/+/thing/event/property/post",
            Some("A0001"),
        ),
    ]
    .concat();
    let dep = Deployment::new();
    let cfg = dep.config(PURPOSE, &devices, profiles.clone());
    let keys = KeyMaterial::load(&cfg.keys).unwrap();
    let policy = cfg.policies.flows[0]
        .policy
        .with_key(keys.pseudonym.clone());
    let store: Arc<dyn Store> = Arc::new(MemStore::default());
    let running = supervisor::start(&cfg, keys, store.clone());
    let metrics = running.metrics.clone();

    // The meters' side: one publishing connection with its own client certificate.
    let meter_tls = LinkTls::Files(pki.ca.client_files(&pki.ca.issue_client("meters").unwrap()));
    let (link, mut events) = MqttLink::start(test_link_options(port, "meters", meter_tls)).unwrap();
    let drain = tokio::spawn(async move { while events.recv().await.is_some() {} });

    // Rounds of one snapshot per meter. Rounds published before the gateway's
    // subscription is in place are lost (QoS 1 without a session), so the test counts
    // from the first round after the gateway received something.
    let mut published: Vec<(String, SimMessage)> = Vec::new(); // (device, message)
    let mut counted_from = None;
    let mut at = now_ms() - 60_000;
    for round in 0..200 {
        let all_heard = ["flat-1", "flat-2", "tb-1", "alink-1"].iter().all(|d| {
            let s = metrics.device(&DeviceId::new(*d).unwrap());
            s.polls_ok + s.payload_errors > 0
        });
        if counted_from.is_none() && all_heard {
            counted_from = Some(published.len());
        }
        if let Some(from) = counted_from {
            let good = published[from..]
                .iter()
                .filter(|(_, m)| m.truth.is_some())
                .count();
            if good >= 40 {
                break;
            }
        }
        at += 1000;
        for fleet in &mut fleets {
            for m in fleet.sim.next_messages(at) {
                publish(&link, &m.topic, m.payload.clone()).await;
                published.push((fleet.devices[&m.key].clone(), m));
            }
        }
        assert!(round < 199, "the gateway never received a message");
        if counted_from.is_none() {
            // Polling for the gateway's subscription: a round every 50 ms until it hears.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let from = counted_from.expect("gateway received messages");
    // A duplicate of the last good json message and a message on an unknown topic.
    let (dup_device, dup) = published
        .iter()
        .rev()
        .find(|(d, m)| d == "flat-1" && m.truth.is_some())
        .cloned()
        .unwrap();
    publish(&link, &dup.topic, dup.payload.clone()).await;
    publish(&link, "water/W9999/up", b"{}".to_vec()).await;

    let counted = &published[from..];
    let expect_payload_errors = counted
        .iter()
        .filter(|(_, m)| {
            matches!(
                m.malformed,
                Some(Malformed::Garbage | Malformed::WrongShape | Malformed::Huge)
            )
        })
        .count() as u64;
    let expect_field_errors = counted
        .iter()
        .filter(|(_, m)| {
            matches!(
                m.malformed,
                Some(Malformed::MissingField | Malformed::StringForNumber)
            )
        })
        .count() as u64;
    assert!(expect_payload_errors >= 3 && expect_field_errors >= 2);
    // Every counted good message taken in (the source has handed it on when the device's
    // poll counter moves), and the duplicate's values all found stale.
    let mut expect_ok: BTreeMap<&str, u64> = BTreeMap::new();
    for (device, _) in counted.iter().filter(|(_, m)| m.truth.is_some()) {
        *expect_ok.entry(device.as_str()).or_default() += 1;
    }
    let polls_ok = |d: &str| metrics.device(&DeviceId::new(d).unwrap()).polls_ok;
    let all_in = wait_for(Duration::from_secs(10), || {
        metrics.mqtt_unknown_topic.get() >= 1
            && metrics.mqtt_payload_errors.get() >= expect_payload_errors
            && metrics.mqtt_field_errors.get() >= expect_field_errors
            && metrics.mqtt_stale_values.get() >= PURPOSE.len() as u64
            && expect_ok.iter().all(|(d, n)| polls_ok(d) >= *n)
    })
    .await;
    assert!(
        all_in,
        "unknown {} payload {} (>= {expect_payload_errors}) field {} (>= {expect_field_errors}) stale {}; polls {:?} (>= {expect_ok:?})",
        metrics.mqtt_unknown_topic.get(),
        metrics.mqtt_payload_errors.get(),
        metrics.mqtt_field_errors.get(),
        metrics.mqtt_stale_values.get(),
        expect_ok.keys().map(|d| (*d, polls_ok(d))).collect::<Vec<_>>()
    );
    assert!(running.shutdown(Duration::from_secs(10)).await);
    link.shutdown().await;
    drain.abort();

    // Every malformed message was counted, none more than published.
    let total_payload_bad = published
        .iter()
        .filter(|(_, m)| {
            matches!(
                m.malformed,
                Some(Malformed::Garbage | Malformed::WrongShape | Malformed::Huge)
            )
        })
        .count() as u64;
    assert!(metrics.mqtt_payload_errors.get() <= total_payload_bad);
    for device in ["flat-1", "flat-2", "tb-1", "alink-1"] {
        let s = metrics.device(&DeviceId::new(device).unwrap());
        assert!(s.polls_ok > 0 && s.payload_errors > 0, "{device}: {s:?}");
    }

    // Open what was sealed and compare with the truth.
    let opener = dep.opener(&cfg.gateway_id);
    let opened = open_all(store.as_ref(), &opener);
    let subject_of: BTreeMap<String, String> = ["flat-1", "flat-2", "tb-1", "alink-1"]
        .iter()
        .map(|d| (policy.subject(&DeviceId::new(*d).unwrap()), d.to_string()))
        .collect();
    let truths: BTreeMap<(String, i64), &Truth> = published
        .iter()
        .filter_map(|(d, m)| m.truth.as_ref().map(|t| ((d.clone(), t.at_ms), t)))
        .collect();
    let mut seen = BTreeSet::new();
    let mut per_stream = BTreeMap::new();
    for batch in &opened {
        for rec in &batch.records {
            *per_stream.entry(batch.header.stream).or_insert(0) += 1;
            let device = &subject_of[&rec.subject];
            assert!(PURPOSE.contains(&rec.field.as_str()), "{}", rec.field);
            assert!(
                seen.insert((device.clone(), rec.field.clone(), rec.at_ms)),
                "{device} {} at {} delivered twice",
                rec.field,
                rec.at_ms
            );
            let truth = truths
                .get(&(device.clone(), rec.at_ms))
                .unwrap_or_else(|| panic!("{device}: no message stamped {}", rec.at_ms));
            let profile_name = &fleets
                .iter()
                .find(|f| f.devices.values().any(|d| d == device))
                .unwrap()
                .profile;
            let field = profiles
                .get(profile_name)
                .unwrap()
                .field(&rec.field)
                .unwrap();
            assert_eq!(rec.unit, field.unit.canonical);
            assert_eq!(rec.quality, Quality::Good, "{device} {}", rec.field);
            if field.class.is_identifying() {
                // valve_state is personal status data: it leaves as a keyed pseudonym.
                assert!(
                    matches!(&rec.value, Value::Text(t) if t.starts_with("p-")),
                    "{:?}",
                    rec.value
                );
                continue;
            }
            let SimValue::Number(eng) = truth.values[&rec.field] else {
                panic!("{} is not a number", rec.field)
            };
            let got = match &rec.value {
                Value::Int(i) => *i as f64,
                Value::Float(f) => *f,
                Value::Bool(b) => f64::from(u8::from(*b)),
                other => panic!("{other:?}"),
            };
            let want = eng * field.unit.factor;
            assert!(
                (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{device} {} = {got}, published {want}",
                rec.field
            );
        }
    }
    // Nothing lost after the subscription was up: every good message counted has all
    // purpose fields sealed.
    // Alarm fields go out on change (and as a periodic state), not with every message:
    // each device's alarm bit is there at least once.
    let is_alarm = |f: &str| {
        shipped
            .field(f)
            .is_some_and(|f| f.stream == citygate::reading::Stream::Alarms)
    };
    for device in ["flat-1", "flat-2", "tb-1", "alink-1"] {
        for f in PURPOSE.iter().filter(|f| is_alarm(f)) {
            assert!(
                seen.iter().any(|(d, field, _)| d == device && field == f),
                "{device} {f} never sent"
            );
        }
    }
    for (device, m) in counted.iter().filter(|(_, m)| m.truth.is_some()) {
        let at = m.truth.as_ref().unwrap().at_ms;
        for f in PURPOSE.iter().filter(|f| !is_alarm(f)) {
            assert!(
                seen.contains(&(device.clone(), f.to_string(), at)),
                "{device} {f} at {at} missing"
            );
        }
    }
    assert!(
        per_stream.contains_key(&citygate::reading::Stream::Alarms),
        "battery_low travels on alarms: {per_stream:?}"
    );
    assert!(
        metrics.mqtt_stale_values.get() >= PURPOSE.len() as u64,
        "duplicate of {dup_device} dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_meter_without_timestamps_is_stamped_on_receipt_and_marked() {
    // A json profile without `timestamp`: readings carry the receive time and say so.
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("firmware-profiles/{SHIPPED}.toml")),
    )
    .unwrap()
    .lines()
    .filter(|l| !l.starts_with("timestamp"))
    .collect::<Vec<_>>()
    .join("\n");
    let profile = Profile::parse(std::path::Path::new("no-time.toml"), &text).unwrap();
    let mut profiles = ProfileSet::default();
    profiles.insert(profile);
    let pki = pki();
    let port = pki.broker.tls_addr().port();
    let gw = TlsFiles::client(&pki.ca, "gw-test");
    let devices = mqtt_source_toml("m", port, &gw, "qos = 0")
        + &mqtt_device_toml("w1", "no-time", "m", "w/1", None);
    let dep = Deployment::new();
    let cfg = dep.config(&["flow_rate"], &devices, profiles);
    let keys = KeyMaterial::load(&cfg.keys).unwrap();
    let store: Arc<dyn Store> = Arc::new(MemStore::default());
    let running = supervisor::start(&cfg, keys, store.clone());
    let metrics = running.metrics.clone();
    let tls = LinkTls::Files(pki.ca.client_files(&pki.ca.issue_client("m").unwrap()));
    let (link, mut events): (MqttLink, mpsc::Receiver<LinkEvent>) =
        MqttLink::start(test_link_options(port, "m", tls)).unwrap();
    let drain = tokio::spawn(async move { while events.recv().await.is_some() {} });
    let before = now_ms();
    let payload = br#"{"data":[{"serviceData":{"meterId":"X1","totalFlow":12.5,"flow":0.25,"batteryVoltage":3.6,"valveStatus":0,"alarmStatus":0}}]}"#;
    let got = {
        let mut ok = false;
        for _ in 0..100 {
            link.publish("w/1", QoS::AtLeastOnce, Bytes::from_static(payload))
                .await
                .unwrap();
            if wait_for(Duration::from_millis(100), || {
                metrics.samples_polled.get() > 0
            })
            .await
            {
                ok = true;
                break;
            }
        }
        ok
    };
    assert!(got, "no sample from the meter");
    assert!(running.shutdown(Duration::from_secs(10)).await);
    link.shutdown().await;
    drain.abort();
    let after = now_ms();
    let opened = open_all(store.as_ref(), &dep.opener(&cfg.gateway_id));
    let recs: Vec<_> = opened.iter().flat_map(|b| b.records.iter()).collect();
    assert!(!recs.is_empty());
    for r in recs {
        assert_eq!(r.field, "flow_rate");
        assert_eq!(r.value, Value::Float(0.25));
        assert!(r.at_ms >= before && r.at_ms <= after, "{}", r.at_ms);
        assert_eq!(r.quality, Quality::Uncertain(QualityReason::ReceiveTime));
    }
}

#[test]
fn the_shipped_water_meter_profile_decodes_a_known_payload() {
    use citygate::source::mqtt::decode;
    use citygate::transform::normalise_values::normalise_values;
    let profiles = shipped_profiles();
    let p = profiles.get(SHIPPED).unwrap();
    // Huawei OceanConnect deviceReq layout (reference §3), alarm bits 1 and 2 set.
    let payload = br#"{"msgType":"deviceReq","data":[{"serviceId":"WaterMeter",
        "serviceData":{"meterId":"W0017","totalFlow":1234.567,"flow":0.52,"batteryVoltage":3.61,
                       "valveStatus":1,"alarmStatus":6,"temperature":12.5},
        "eventTime":"20251123T140000Z"}]}"#;
    let received = 1_763_906_460_000; // a minute later
    let d = decode(p.mqtt.as_ref().unwrap(), payload, received).unwrap();
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    let n = normalise_values(
        p,
        &DeviceId::new("w").unwrap(),
        &d.values,
        &citygate::profile::Ratios::UNITY,
    );
    let get = |f: &str| {
        n.readings
            .iter()
            .find(|r| r.field.as_str() == f)
            .unwrap_or_else(|| panic!("{f}"))
    };
    assert_eq!(n.readings.len(), p.fields.len());
    assert!(n
        .readings
        .iter()
        .all(|r| r.at_ms == 1_763_906_400_000 && r.quality == Quality::Good));
    assert_eq!(get("serial_number").value, Value::Text("W0017".into()));
    assert_eq!(get("volume_forward").value, Value::Float(1234.567));
    assert_eq!(get("volume_forward").unit.symbol(), "m3");
    assert_eq!(get("flow_rate").value, Value::Float(0.52));
    assert_eq!(get("flow_rate").unit.symbol(), "m3/h");
    assert_eq!(get("battery_voltage").value, Value::Float(3.61));
    assert_eq!(get("water_temp").value, Value::Float(12.5));
    assert_eq!(get("valve_state").value, Value::Int(1));
    assert_eq!(get("alarm_flags").value, Value::Int(6));
    assert_eq!(get("valve_abnormal").value, Value::Bool(true));
    assert_eq!(get("battery_low").value, Value::Bool(true));
    assert_eq!(
        get("battery_low").class.stream(),
        citygate::reading::Stream::Alarms
    );
}

/// `citygate sim --mqtt-broker` as a child process against the embedded broker: its
/// payloads decode with the profile, and `--malformed-every` interleaves bad ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sim_command_publishes_decodable_meters_and_malformed_payloads() {
    use citygate::source::mqtt::decode;
    let pki = pki();
    let port = pki.broker.tls_addr().port();
    let sim_client = pki.ca.issue_client("sim").unwrap();
    let tls = LinkTls::Files(
        pki.ca
            .client_files(&pki.ca.issue_client("watcher").unwrap()),
    );
    let (link, mut events) = MqttLink::start(test_link_options(port, "watcher", tls)).unwrap();
    link.subscribe("tb/#", QoS::AtLeastOnce).await.unwrap();
    // Wait for the subscription before starting the publisher.
    let subscribed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = events.recv().await {
            if matches!(e, LinkEvent::SubAck { granted: true, .. }) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(subscribed, Ok(true));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_citygate"))
        .args([
            "sim",
            "--profile",
            SHIPPED,
            "--count",
            "2",
            "--shape",
            "thingsboard",
        ])
        .args([
            "--interval",
            "100ms",
            "--malformed-every",
            "2",
            "--profiles-dir",
        ])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware-profiles"))
        .args(["--mqtt-broker", &format!("localhost:{port}"), "--ca-file"])
        .arg(pki.ca.ca_file())
        .arg("--cert-file")
        .arg(&sim_client.cert)
        .arg("--key-file")
        .arg(&sim_client.key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let gw = keyed_profile(PayloadShape::ThingsBoard, "test-tb-water");
    let spec = gw.mqtt.clone().unwrap();
    let (mut good, mut bad) = (BTreeMap::<String, Vec<f64>>::new(), 0);
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(e) = events.recv().await {
            let LinkEvent::Publish { topic, payload, .. } = e else {
                continue;
            };
            match decode(&spec, &payload, now_ms()) {
                Ok(d) if d.errors.is_empty() => {
                    let vol = d
                        .values
                        .iter()
                        .find(|v| v.field.as_str() == "volume_forward")
                        .map(|v| match &v.value {
                            citygate::source::SourceValue::Raw(r) => r.as_f64(),
                            other => panic!("{other:?}"),
                        })
                        .unwrap();
                    good.entry(topic).or_default().push(vol);
                }
                _ => bad += 1,
            }
            if good.values().all(|v| v.len() >= 6) && good.len() == 2 && bad >= 4 {
                break;
            }
        }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    link.shutdown().await;
    assert_eq!(
        good.keys().cloned().collect::<Vec<_>>(),
        ["tb/W0001/telemetry", "tb/W0002/telemetry"]
    );
    for (topic, vols) in &good {
        assert!(vols.len() >= 6, "{topic}: {vols:?}");
        assert!(
            vols.windows(2).all(|w| w[1] > w[0]),
            "{topic}: volume must increase: {vols:?}"
        );
    }
    assert!(bad >= 4, "malformed payloads seen: {bad}");
}

/// The MQTT source reconnects and subscribes again after its broker restarts; messages
/// published afterwards arrive as samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_source_resubscribes_after_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertAuthority::generate(dir.path(), "citygate test ca").unwrap();
    let server = ca.issue_localhost_server().unwrap();
    let broker = EmbeddedBroker::start(BrokerOptions::localhost(ca.server_files(&server))).unwrap();
    let addr = broker.tls_addr();
    let gw = TlsFiles::client(&ca, "gw-test");
    let devices = mqtt_source_toml("m", addr.port(), &gw, "")
        + &mqtt_device_toml("w1", SHIPPED, "m", "w/1", None);
    let dep = Deployment::new();
    let cfg = dep.config(&["flow_rate"], &devices, shipped_profiles());
    let keys = KeyMaterial::load(&cfg.keys).unwrap();
    let running = supervisor::start(&cfg, keys, Arc::new(MemStore::default()));
    let metrics = running.metrics.clone();
    let shipped = shipped_profiles().get(SHIPPED).unwrap().clone();
    let mut sim = sim(&shipped, PayloadShape::Json, "w/1", "W", 1);
    let mut at = now_ms() - 600_000;

    // Publishes fresh snapshots from a new connection until `samples` samples arrived.
    let mut deliver = |target: u64| {
        let files = ca.client_files(&ca.issue_client("meter").unwrap());
        let metrics = metrics.clone();
        let messages: Vec<SimMessage> = (0..400)
            .flat_map(|_| {
                at += 1000;
                sim.next_messages(at)
            })
            .filter(|m| m.truth.is_some())
            .collect();
        async move {
            let (link, mut events) = MqttLink::start(test_link_options(
                addr.port(),
                "meter",
                LinkTls::Files(files),
            ))
            .unwrap();
            let drain = tokio::spawn(async move { while events.recv().await.is_some() {} });
            let mut ok = false;
            for m in messages {
                publish(&link, &m.topic, m.payload).await;
                if wait_for(Duration::from_millis(50), || {
                    metrics.samples_polled.get() >= target
                })
                .await
                {
                    ok = true;
                    break;
                }
            }
            link.shutdown().await;
            drain.abort();
            ok
        }
    };
    assert!(deliver(1).await, "no sample before the restart");
    let before = metrics.samples_polled.get();
    broker.shutdown();
    let mut opts = BrokerOptions::localhost(ca.server_files(&server));
    opts.listen = addr;
    let broker = EmbeddedBroker::start(opts).unwrap();
    assert!(deliver(before + 3).await, "no samples after the restart");
    assert!(running.shutdown(Duration::from_secs(10)).await);
    broker.shutdown();
    assert_eq!(metrics.mqtt_payload_errors.get(), 0);
}

/// Mosquitto with mutual TLS and no packet limit of its own (its default: 256 MB), or
/// `None` (with a note) where it is not installed.
async fn mosquitto_with_tls(
    dir: &std::path::Path,
    ca: &CertAuthority,
) -> Option<(crate::mosquitto::Broker, u16)> {
    let Some(bin) = crate::mosquitto::mosquitto_binary() else {
        assert!(
            std::env::var("CITYGATE_REQUIRE_MOSQUITTO").is_err(),
            "CITYGATE_REQUIRE_MOSQUITTO is set but mosquitto is not installed"
        );
        eprintln!("note: mosquitto not installed; skipping");
        return None;
    };
    let server = ca.issue_localhost_server().unwrap();
    Some(
        crate::mosquitto::start_mosquitto(bin, dir, |port| {
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\ncafile {}\ncertfile {}\n\
                 keyfile {}\nrequire_certificate true\nuse_identity_as_username true\n\
                 tls_version tlsv1.3\npersistence false\nuser root\n",
                ca.ca_file().display(),
                server.cert.display(),
                server.key.display()
            )
        })
        .await,
    )
}

/// A meter's connection that can publish 5 MB, once the broker has acknowledged its
/// retained `payload` on `topic`.
async fn retain(ca: &CertAuthority, port: u16, topic: &str, payload: Vec<u8>) -> MqttLink {
    let files = ca.client_files(&ca.issue_client("meter").unwrap());
    let mut opts = test_link_options(port, "meter", LinkTls::Files(files));
    opts.max_packet_bytes = 8 << 20;
    let (link, mut events) = MqttLink::start(opts).unwrap();
    link.publish_retained(topic, QoS::AtLeastOnce, Bytes::from(payload))
        .await
        .unwrap();
    let acked = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(e) = events.recv().await {
            if matches!(e, LinkEvent::PubAck { .. }) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(acked, Ok(true), "retained message not acknowledged");
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    link
}

/// Publishes the simulator's good snapshots on `link` until `samples_polled` reaches
/// `target`; false if 100 messages were not enough.
async fn feed(
    link: &MqttLink,
    sim: &mut MqttSim,
    at: &mut i64,
    metrics: &citygate::telemetry::Metrics,
    target: u64,
) -> bool {
    for _ in 0..100 {
        *at += 1000;
        for m in sim
            .next_messages(*at)
            .into_iter()
            .filter(|m| m.truth.is_some())
        {
            publish(link, &m.topic, m.payload).await;
        }
        if wait_for(Duration::from_millis(100), || {
            metrics.samples_polled.get() >= target
        })
        .await
        {
            return true;
        }
    }
    false
}

/// issue 9 item 8: a retained 5 MB message on a meter topic (mosquitto) is dropped and
/// counted; the source keeps its one connection and the meter's normal messages arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_oversized_message_is_counted_and_does_not_break_the_source() {
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let Some((_broker, port)) = mosquitto_with_tls(dep.path(), &ca).await else {
        return;
    };
    let huge = format!("{{\"pad\":\"{}\"}}", "x".repeat(5 << 20)).into_bytes();
    let link = retain(&ca, port, "w/1", huge).await;

    let gw = TlsFiles::client(&ca, "gw-test");
    let devices =
        mqtt_source_toml("m", port, &gw, "") + &mqtt_device_toml("w1", SHIPPED, "m", "w/1", None);
    let cfg = dep.config(&["flow_rate"], &devices, shipped_profiles());
    let keys = KeyMaterial::load(&cfg.keys).unwrap();
    let running = supervisor::start(&cfg, keys, Arc::new(MemStore::default()));
    let metrics = running.metrics.clone();
    assert!(
        wait_for(Duration::from_secs(20), || metrics.mqtt_oversized.get()
            >= 1)
        .await,
        "the retained message never arrived (connects {})",
        metrics.mqtt_source_connects.get()
    );
    let shipped = shipped_profiles().get(SHIPPED).unwrap().clone();
    let mut sim = sim(&shipped, PayloadShape::Json, "w/1", "W", 1);
    let mut at = now_ms() - 600_000;
    assert!(
        feed(&link, &mut sim, &mut at, &metrics, 3).await,
        "no samples after the oversized message"
    );
    // The broker sends a retained message for every SUBSCRIBE, and the first connection
    // may carry two (the source's own and the link's re-subscription for a new session).
    let oversized = metrics.mqtt_oversized.get();
    assert!((1..=2).contains(&oversized), "{oversized}");
    assert_eq!(
        metrics.mqtt_source_connects.get(),
        1,
        "the source reconnected"
    );
    let w1 = metrics.device(&DeviceId::new("w1").unwrap());
    assert!(w1.payload_errors == oversized && w1.polls_ok >= 3, "{w1:?}");
    assert!(metrics.faults().is_empty(), "{:?}", metrics.faults());
    assert!(running.shutdown(Duration::from_secs(10)).await);
    link.shutdown().await;
}

/// issue 9 item 8: a retained packet above the source's `max_packet_bytes` costs the
/// connection each time; the source backs off instead of looping, raises the fault
/// `mqtt_source:m` ("reconnect loop"), and clears it once the message is gone and a
/// connection has lasted `down_grace`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_above_max_packet_bytes_raises_a_reconnect_loop_fault_until_it_is_gone() {
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let Some((_broker, port)) = mosquitto_with_tls(dep.path(), &ca).await else {
        return;
    };
    let link = retain(&ca, port, "w/1", vec![b'x'; 1 << 20]).await;
    let gw = TlsFiles::client(&ca, "gw-test");
    let devices = mqtt_source_toml(
        "m",
        port,
        &gw,
        "max_packet_bytes = 131072\ndown_grace = \"2s\"",
    ) + &mqtt_device_toml("w1", SHIPPED, "m", "w/1", None);
    let cfg = dep.config(&["flow_rate"], &devices, shipped_profiles());
    let keys = KeyMaterial::load(&cfg.keys).unwrap();
    let running = supervisor::start(&cfg, keys, Arc::new(MemStore::default()));
    let metrics = running.metrics.clone();
    let looping = |m: &citygate::telemetry::Metrics| {
        m.faults()
            .iter()
            .any(|f| f.starts_with("mqtt source m reconnect loop"))
    };
    assert!(
        wait_for(Duration::from_secs(30), || looping(&metrics)).await,
        "no loop fault: {:?}, connects {}",
        metrics.faults(),
        metrics.mqtt_source_connects.get()
    );
    let connects = metrics.mqtt_source_connects.get();
    assert!(metrics.mqtt_oversized.get() >= 3);
    // The broker forgets the message; the next connection lasts and ends the fault.
    link.publish_retained("w/1", QoS::AtLeastOnce, Bytes::new())
        .await
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(40), || metrics.faults().is_empty()).await,
        "{:?}",
        metrics.faults()
    );
    // Backing off: 3 drops plus the lasting connection need few attempts, not ~3 a second.
    let total = metrics.mqtt_source_connects.get();
    assert!(
        total >= connects && total <= connects + 4,
        "{connects} then {total} connections"
    );
    let shipped = shipped_profiles().get(SHIPPED).unwrap().clone();
    let mut sim = sim(&shipped, PayloadShape::Json, "w/1", "W", 1);
    let mut at = now_ms() - 600_000;
    assert!(feed(&link, &mut sim, &mut at, &metrics, 1).await);
    assert!(running.shutdown(Duration::from_secs(10)).await);
    link.shutdown().await;
}

/// `/health` and `/status` of a `citygate run` as a probe reads them.
async fn health_and_stale(addr: std::net::SocketAddr, device: &str) -> (String, bool) {
    use citygate::telemetry::http;
    let (_, health) = http::get(addr, "/health", Duration::from_secs(5))
        .await
        .unwrap();
    let (_, body) = http::get(addr, "/status", Duration::from_secs(5))
        .await
        .unwrap();
    let st: citygate::status::GatewayStatus = serde_json::from_str(&body).unwrap();
    let stale = st.devices.iter().find(|d| d.name == device).unwrap().stale;
    (health, stale)
}

/// issue 9 item 8: while its source's broker is down (beyond `down_grace`), an MQTT
/// meter is stale and `/health` is degraded naming the source; once the source is
/// connected again both recover, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_mqtt_source_makes_its_meters_stale_and_health_degraded_until_it_is_back() {
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let server = ca.issue_localhost_server().unwrap();
    let broker = EmbeddedBroker::start(BrokerOptions::localhost(ca.server_files(&server))).unwrap();
    let addr = broker.tls_addr();
    let gw = TlsFiles::client(&ca, "gw-test");
    let devices = mqtt_source_toml("plant", addr.port(), &gw, "down_grace = \"1s\"")
        + &mqtt_device_toml("w1", SHIPPED, "plant", "w/1", None);
    let config = GatewayToml::new("gw-test", &["flow_rate"])
        .shipped_profiles()
        .status()
        .devices(&devices)
        .write(dep.path());
    let mut child = spawn_run(&config);
    let store = dep.store_path();
    let status = status_address(&store).await;
    let mut last = (String::new(), true);
    for _ in 0..200 {
        last = health_and_stale(status, "w1").await;
        if last == ("ok\n".to_string(), false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last, ("ok\n".to_string(), false), "never healthy");

    broker.shutdown();
    for _ in 0..200 {
        last = health_and_stale(status, "w1").await;
        if last.1 && last.0.starts_with("degraded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(last.1, "w1 never stale: {last:?}");
    assert!(
        last.0
            .starts_with("degraded: mqtt source plant down for more than 1s"),
        "{last:?}"
    );

    let mut opts = BrokerOptions::localhost(ca.server_files(&server));
    opts.listen = addr;
    let broker = EmbeddedBroker::start(opts).unwrap();
    // `/health` and `/status` are two requests: the fault may clear between them, so
    // wait until both say so rather than stopping at the first fresh device.
    for _ in 0..300 {
        last = health_and_stale(status, "w1").await;
        if last == ("ok\n".to_string(), false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last,
        ("ok\n".to_string(), false),
        "not healthy after the broker came back"
    );
    let _ = child.kill();
    let _ = child.wait();
    broker.shutdown();
}

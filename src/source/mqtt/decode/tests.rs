use std::path::Path;

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::profile::Profile;

const NOW: TimestampMs = 1_763_906_400_000; // 2025-11-23T14:00:00Z

fn profile(shape: &str, locate: &str, extra_mqtt: &str) -> Profile {
    let loc = |name: &str, ptr: &str| match locate {
        "pointer" => format!("pointer = \"{ptr}\""),
        _ => format!("key = \"{name}\""),
    };
    let text = format!(
        r#"
[meter]
vendor = "T"
model = "W"
protocol = "mqtt"
[mqtt]
shape = "{shape}"
{extra_mqtt}
[[field]]
name = "volume_forward"
{vol}
unit = "m3"
range = [0.0, 1e9]
counter = "monotonic"
category = "measurement"
grade = "L3"
[[field]]
name = "flow_rate"
{flow}
unit = "m3/h"
range = [-100.0, 100.0]
category = "measurement"
grade = "L3"
[[field]]
name = "valve_open"
{valve}
type = "bool"
unit = "1"
category = "status"
grade = "L2"
[[field]]
name = "battery_low"
{alarm}
type = "bit"
bit = 2
unit = "1"
optional = true
category = "alarm"
grade = "L2"
[[field]]
name = "serial_number"
{serial}
type = "text"
unit = "1"
optional = true
category = "identifier"
grade = "L3"
"#,
        vol = loc("TotalVolume", "/params/TotalVolume"),
        flow = loc("Flow", "/params/Flow"),
        valve = loc("Valve", "/params/Valve"),
        alarm = loc("Alarm", "/params/Alarm"),
        serial = loc("Serial", "/params/Serial"),
    );
    Profile::parse(Path::new("t-w.toml"), &text).unwrap()
}

fn json_profile() -> Profile {
    profile(
        "json",
        "pointer",
        "timestamp = \"/time\"\ntimestamp_format = \"s\"",
    )
}

fn spec(p: &Profile) -> &MqttSpec {
    p.mqtt.as_ref().unwrap()
}

fn value<'a>(d: &'a Decoded, field: &str) -> Vec<&'a NamedValue> {
    d.values
        .iter()
        .filter(|v| v.field.as_str() == field)
        .collect()
}

fn raw(d: &Decoded, field: &str) -> RawValue {
    match &value(d, field)[0].value {
        SourceValue::Raw(r) => *r,
        other => panic!("{other:?}"),
    }
}

#[test]
fn json_shape_reads_pointers_and_the_timestamp() {
    let p = json_profile();
    let payload = json!({
        "time": (NOW / 1000) - 60,
        "params": {"TotalVolume": 1234.5, "Flow": 0.75, "Valve": 1, "Alarm": 4, "Serial": 17}
    });
    let d = decode(spec(&p), payload.to_string().as_bytes(), NOW).unwrap();
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(d.values.len(), 5);
    assert!(d
        .values
        .iter()
        .all(|v| v.at_ms == NOW - 60_000 && v.time == TimeSource::Device));
    assert_eq!(raw(&d, "volume_forward"), RawValue::Float(1234.5));
    assert_eq!(raw(&d, "valve_open"), RawValue::Bit(true));
    assert_eq!(raw(&d, "battery_low"), RawValue::Bit(true));
    assert_eq!(
        value(&d, "serial_number")[0].value,
        SourceValue::Text("17".into())
    );
}

#[test]
fn json_without_timestamp_uses_receive_time() {
    let p = json_profile();
    for payload in [
        json!({"params": {"TotalVolume": 1, "Flow": 0, "Valve": false}}),
        json!({"time": 0, "params": {"TotalVolume": 1, "Flow": 0, "Valve": false}}),
        json!({"time": "soon", "params": {"TotalVolume": 1, "Flow": 0, "Valve": false}}),
    ] {
        let d = decode(spec(&p), payload.to_string().as_bytes(), NOW).unwrap();
        assert!(
            d.values
                .iter()
                .all(|v| v.at_ms == NOW && v.time == TimeSource::Received),
            "{payload}"
        );
    }
}

#[test]
fn thingsboard_shapes() {
    let p = profile("thingsboard", "key", "");
    let s = spec(&p);
    let flat = json!({"TotalVolume": 10, "Flow": 1.5, "Valve": true});
    let d = decode(s, flat.to_string().as_bytes(), NOW).unwrap();
    assert_eq!(d.values.len(), 3);
    assert!(d.values.iter().all(|v| v.time == TimeSource::Received));

    let timed =
        json!({"ts": NOW - 1000, "values": {"TotalVolume": 10, "Flow": 1.5, "Valve": true}});
    let d = decode(s, timed.to_string().as_bytes(), NOW).unwrap();
    assert!(d.values.iter().all(|v| v.at_ms == NOW - 1000));

    let array = json!([
        {"ts": NOW - 2000, "values": {"TotalVolume": 11, "Flow": 1.0, "Valve": true}},
        {"ts": NOW - 3000, "values": {"TotalVolume": 10, "Flow": 2.0, "Valve": true}}
    ]);
    let d = decode(s, array.to_string().as_bytes(), NOW).unwrap();
    assert!(d.errors.is_empty());
    let vols = value(&d, "volume_forward");
    assert_eq!(vols.len(), 2);
    assert_eq!(vols[0].at_ms, NOW - 3000, "sorted by time");
    assert_eq!(vols[0].value, SourceValue::Raw(RawValue::Signed(10)));

    for bad in [
        json!([]),
        json!([1, 2]),
        json!("text"),
        json!({"ts": "x", "values": {"Flow": 1}}),
        json!({"ts": 1, "values": 3}),
    ] {
        assert!(
            matches!(
                decode(s, bad.to_string().as_bytes(), NOW),
                Err(PayloadError::Shape { .. })
            ),
            "{bad}"
        );
    }
}

#[test]
fn alink_structured_and_flat_params() {
    let p = profile("alink", "key", "");
    let s = spec(&p);
    let post = json!({
        "id": "123", "version": "1.0", "sys": {"ack": 0},
        "params": {
            "TotalVolume": {"value": 1234.5, "time": NOW - 5000},
            "Flow": {"value": 0.5, "time": NOW - 4000},
            "Valve": {"value": 0},
        },
        "method": "thing.event.property.post"
    });
    let d = decode(s, post.to_string().as_bytes(), NOW).unwrap();
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(value(&d, "volume_forward")[0].at_ms, NOW - 5000);
    assert_eq!(value(&d, "flow_rate")[0].at_ms, NOW - 4000);
    let valve = value(&d, "valve_open")[0];
    assert_eq!(
        (valve.at_ms, valve.time),
        (NOW, TimeSource::Received),
        "no time: receive time"
    );
    assert_eq!(valve.value, SourceValue::Raw(RawValue::Bit(false)));

    let flat = json!({"id": "1", "params": {"TotalVolume": 3.0, "Flow": 0.1, "Valve": 1}});
    let d = decode(s, flat.to_string().as_bytes(), NOW).unwrap();
    assert_eq!(d.values.len(), 3);

    let wrong_method = json!({"method": "thing.service.property.set", "params": {"Flow": 1}});
    assert!(matches!(
        decode(s, wrong_method.to_string().as_bytes(), NOW),
        Err(PayloadError::Shape { .. })
    ));
    let no_params = json!({"method": ALINK_PROPERTY_POST});
    assert!(matches!(
        decode(s, no_params.to_string().as_bytes(), NOW),
        Err(PayloadError::Shape { .. })
    ));
}

#[test]
fn malformed_payloads_are_typed_errors() {
    let p = json_profile();
    let s = spec(&p);
    assert!(matches!(
        decode(s, b"\xff\x00garbage", NOW),
        Err(PayloadError::NotJson(_))
    ));
    assert!(matches!(
        decode(s, b"42", NOW),
        Err(PayloadError::Shape { .. })
    ));
    assert_eq!(
        decode(s, br#"{"other": 1}"#, NOW),
        Err(PayloadError::NoField)
    );
    let huge = vec![b' '; MAX_PAYLOAD_BYTES + 1];
    assert_eq!(
        decode(s, &huge, NOW),
        Err(PayloadError::TooLarge(MAX_PAYLOAD_BYTES + 1))
    );
    let deep = "[".repeat(10_000);
    assert!(matches!(
        decode(s, deep.as_bytes(), NOW),
        Err(PayloadError::NotJson(_))
    ));
}

#[test]
fn field_errors_keep_the_other_fields() {
    let p = json_profile();
    let payload = json!({"params": {"TotalVolume": "12.5", "Flow": 0.5, "Valve": 7}});
    let d = decode(spec(&p), payload.to_string().as_bytes(), NOW).unwrap();
    assert_eq!(d.values.len(), 1, "{:?}", d.values);
    assert_eq!(raw(&d, "flow_rate"), RawValue::Float(0.5));
    assert_eq!(d.errors.len(), 2, "{:?}", d.errors);
    let msg = d.errors[0].to_string();
    assert!(
        msg.contains("volume_forward") && msg.contains("a string"),
        "{msg}"
    );

    let payload = json!({"params": {"Flow": 0.5}});
    let d = decode(spec(&p), payload.to_string().as_bytes(), NOW).unwrap();
    let missing: Vec<String> = d.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        missing.len(),
        2,
        "optional fields are not missing: {missing:?}"
    );
    assert!(missing[0].contains("/params/TotalVolume"), "{missing:?}");
}

#[test]
fn kinds_accept_exactly_their_json_types() {
    use ValueKind as K;
    let t = |k, v: Json| typed(k, &v);
    assert_eq!(
        t(K::Integer, json!(5.0)),
        Some(SourceValue::Raw(RawValue::Signed(5)))
    );
    assert_eq!(t(K::Integer, json!(5.5)), None);
    assert_eq!(
        t(K::Integer, json!(u64::MAX)),
        Some(SourceValue::Raw(RawValue::Unsigned(u64::MAX)))
    );
    assert_eq!(t(K::Number, json!("5")), None);
    assert_eq!(t(K::Number, json!(true)), None);
    assert_eq!(t(K::Bool, json!(2)), None);
    assert_eq!(
        t(K::Bit(63), json!(-1)),
        Some(SourceValue::Raw(RawValue::Bit(true)))
    );
    assert_eq!(t(K::Bit(0), json!(0.5)), None);
    assert_eq!(t(K::Text, json!([1])), None);
}

fn arb_json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<u64>().prop_map(|u| json!(u)),
        any::<f64>().prop_map(|f| json!(f)),
        "[a-zA-Z0-9 :.+-]{0,24}".prop_map(Json::String),
    ];
    let keys = prop_oneof![
        Just("ts".to_string()),
        Just("values".to_string()),
        Just("params".to_string()),
        Just("value".to_string()),
        Just("time".to_string()),
        Just("method".to_string()),
        Just("TotalVolume".to_string()),
        Just("Flow".to_string()),
        Just("Valve".to_string()),
        Just("Alarm".to_string()),
        "[a-z]{1,6}",
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
            prop::collection::btree_map(keys.clone(), inner, 0..6)
                .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn arbitrary_json_never_panics_and_stays_consistent(doc in arb_json(), now in 0i64..4_000_000_000_000) {
        let bytes = doc.to_string();
        for p in [json_profile(), profile("thingsboard", "key", ""), profile("alink", "key", "")] {
            if let Ok(d) = decode(spec(&p), bytes.as_bytes(), now) {
                for v in &d.values {
                    prop_assert!(p.field(v.field.as_str()).is_some());
                    prop_assert!(v.time == TimeSource::Received || time::plausible(v.at_ms, now));
                }
                prop_assert!(d.values.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for p in [json_profile(), profile("thingsboard", "key", ""), profile("alink", "key", "")] {
            let _ = decode(spec(&p), &bytes, NOW);
        }
    }
}

#[test]
fn onenet_and_iotda_layouts_are_json_pointers() {
    let text = r#"
[meter]
vendor = "T"
model = "W"
protocol = "mqtt"
[mqtt]
shape = "json"
timestamp = "/dp/flow/0/t"
timestamp_format = "s"
[[field]]
name = "flow_rate"
pointer = "/dp/flow/0/v"
unit = "m3/h"
category = "measurement"
grade = "L2"
"#;
    let p = Profile::parse(Path::new("onenet.toml"), text).unwrap();
    let payload = br#"{"id":123,"dp":{"flow":[{"v":0.5,"t":1763906340}]}}"#;
    let d = decode(spec(&p), payload, NOW).unwrap();
    assert_eq!(d.values[0].at_ms, NOW - 60_000);
    assert_eq!(d.values[0].value, SourceValue::Raw(RawValue::Float(0.5)));

    let iotda = text
        .replace("/dp/flow/0/t", "/services/0/event_time")
        .replace("\"s\"", "\"iso8601\"")
        .replace("/dp/flow/0/v", "/services/0/properties/flow");
    let p = Profile::parse(Path::new("iotda.toml"), &iotda).unwrap();
    let payload = br#"{"services":[{"service_id":"Water","properties":{"flow":0.5},"event_time":"20251123T135900Z"}]}"#;
    let d = decode(spec(&p), payload, NOW).unwrap();
    assert_eq!(
        (d.values[0].at_ms, d.values[0].time),
        (NOW - 60_000, TimeSource::Device)
    );
}

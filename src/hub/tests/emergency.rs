//! The hub's side of emergency collection (issue 11 item 7): the sink marks emergency records,
//! the hub logs the gateways' reports.

use super::*;

fn record(subject: &str, field: &str, value: Value, tags: &[&str]) -> Record {
    Record {
        subject: subject.into(),
        field: field.into(),
        value,
        unit: Unit::One,
        at_ms: 1_700_000_000_000,
        quality: Quality::Good,
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        window: None,
        epoch: 0,
    }
}

/// Issue 11 item 7: a sink line whose record carries `emergency_id=ID` gets a top-level
/// `"emergency_id":"ID"` as its last member; every other member is as before, and records
/// without a valid such tag get no such member.
#[test]
fn the_sink_marks_records_tagged_with_an_emergency_id() {
    let f = Fixture::new();
    let hub = f.hub();
    let records = [
        record(
            "p-0123456789abcdef0123456789abcdef",
            "active_power",
            Value::Int(1200),
            &["emergency", "emergency_id=em-20261130T233000Z-1a2b"],
        ),
        record("p-01", "active_power", Value::Int(5), &["emergency"]),
        record("p-02", "active_power", Value::Int(5), &["emergency_id=a b"]),
    ];
    let payload = f
        .sealer
        .seal(
            Stream::from_name("readings-7").unwrap(),
            1,
            0,
            &stamp(),
            &records,
        )
        .unwrap()
        .bytes;
    assert!(matches!(
        hub.ingest(&gw(), &payload),
        Ingest::Accepted { .. }
    ));
    let text = std::fs::read_to_string(f.sink_path()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].ends_with(
            r#""tags":["emergency","emergency_id=em-20261130T233000Z-1a2b"],"emergency_id":"em-20261130T233000Z-1a2b"}"#
        ),
        "{}",
        lines[0]
    );
    let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(first["stream"], "readings-7");
    assert_eq!(first["field"], "active_power");
    assert_eq!(first["value"], 1200);
    for line in &lines[1..] {
        assert!(!line.contains("\"emergency_id\":"), "{line}");
    }
}

/// Issue 11 item 7: the hub logs one WARN line per emergency report it writes, naming the
/// gateway, the id and the report's numbers; the end report's line gives the command that
/// exports or destroys the hub's copy. Other records log nothing.
#[test]
fn the_hub_logs_one_warning_per_emergency_report() {
    let f = Fixture::new();
    let hub = f.hub();
    let tags_started = [
        "emergency",
        "emergency_id=em-1",
        "policy=grid-emergency",
        "reason=feeder 7 fault",
        "expires=2026-12-01T05:30:00Z",
    ];
    let tags_ended = [
        "emergency",
        "emergency_id=em-1",
        "policy=grid-emergency",
        "end=stopped",
        "produced_batches=12",
        "delivered_batches=11",
        "purged_batches=1",
        "evicted_batches=0",
        "seqs=4..15",
    ];
    let records = [
        record(
            "gateway:gw-1",
            "emergency_started",
            Value::Int(1),
            &tags_started,
        ),
        record("gateway:gw-1", "tamper", Value::Bool(true), &[]),
        record(
            "gateway:gw-1",
            "emergency_ended",
            Value::Int(1),
            &tags_ended,
        ),
    ];
    let payload = f
        .sealer
        .seal(Stream::Alarms, 1, 0, &stamp(), &records)
        .unwrap()
        .bytes;
    let (outcome, logs) = capture_warnings(|| hub.ingest(&gw(), &payload));
    assert!(matches!(outcome, Ingest::Accepted { records: 3, .. }));
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines.len(), 2, "{logs}");
    let started = lines[0];
    for part in [
        "WARN",
        "emergency collection started at a gateway",
        "gateway=gw-1",
        "emergency_id=\"em-1\"",
        "policy=\"grid-emergency\"",
        "reason=\"feeder 7 fault\"",
        "expires=\"2026-12-01T05:30:00Z\"",
    ] {
        assert!(started.contains(part), "{part} not in {started}");
    }
    let ended = lines[1];
    for part in [
        "WARN",
        "emergency collection ended at a gateway: export or destroy the hub's copy",
        "gateway=gw-1",
        "emergency_id=\"em-1\"",
        "end=\"stopped\"",
        "produced_batches=\"12\"",
        "delivered_batches=\"11\"",
        "purged_batches=\"1\"",
        "evicted_batches=\"0\"",
        "seqs=\"4..15\"",
        "citygate hub-emergency --config HUB.toml --id em-1 --export FILE|--destroy",
    ] {
        assert!(ended.contains(part), "{part} not in {ended}");
    }

    // The same reports as data of a purpose flow, or from a device subject, log nothing.
    let payload = f
        .sealer
        .seal(Stream::Readings, 1, 0, &stamp(), &records)
        .unwrap()
        .bytes;
    let (outcome, logs) = capture_warnings(|| hub.ingest(&gw(), &payload));
    assert!(matches!(outcome, Ingest::Accepted { .. }));
    assert_eq!(logs, "");
}

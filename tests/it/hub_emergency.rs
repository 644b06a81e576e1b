//! `citygate hub-emergency` (issue 11 item 7) on a sink the hub wrote itself: a hub (embedded
//! broker, mutual TLS) receives a gateway's emergency data (`readings-7`, tagged
//! `emergency_id=…`) and its start and end reports over MQTT; the real binary then lists,
//! exports and destroys them, and refuses to destroy while the hub runs.

use std::path::Path;
use std::process::Output;

use citygate::mqtt::CertAuthority;
use citygate::reading::{GatewayId, Quality, Record, Stream, Unit, Value};
use citygate::seal::{keys, Sealer};

use crate::hub_wire::{stamp, start_hub, until_subscribed, write_hub_config, Publisher};
use crate::support::*;

const ID: &str = "em-20261130T233000Z-1a2b";
const T0: i64 = 1_796_081_400_000; // 2026-11-30T23:30:00Z

fn record(subject: &str, field: &str, value: Value, at_ms: i64, tags: &[&str]) -> Record {
    Record {
        subject: subject.into(),
        field: field.into(),
        value,
        unit: Unit::One,
        at_ms,
        quality: Quality::Good,
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        window: None,
        epoch: 0,
    }
}

/// `n` emergency readings from `at_ms` on, a second apart.
fn emergency_data(n: usize, at_ms: i64) -> Vec<Record> {
    let id_tag = format!("emergency_id={ID}");
    (0..n)
        .map(|i| {
            let mut r = record(
                "p-0123456789abcdef0123456789abcdef",
                "active_power",
                Value::Int(1000 + i as i64),
                at_ms + 1000 * i as i64,
                &["emergency", &id_tag],
            );
            r.unit = Unit::Watt;
            r
        })
        .collect()
}

/// The gateway's start report and an ordinary alarm, or its end report.
fn report(started: bool) -> Vec<Record> {
    let id_tag = format!("emergency_id={ID}");
    if started {
        vec![
            record(
                "gateway:gw-test",
                "emergency_started",
                Value::Int(T0 + 6 * 3_600_000),
                T0,
                &[
                    "emergency",
                    &id_tag,
                    "policy=grid-emergency",
                    "reason=feeder 7 fault",
                    "expires=2026-12-01T05:30:00Z",
                ],
            ),
            record("gateway:gw-test", "tamper", Value::Bool(false), T0, &[]),
        ]
    } else {
        vec![record(
            "gateway:gw-test",
            "emergency_ended",
            Value::Int(0),
            T0 + 3_600_000,
            &[
                "emergency",
                &id_tag,
                "policy=grid-emergency",
                "end=stopped",
                "produced_batches=2",
                "delivered_batches=2",
                "purged_batches=0",
                "evicted_batches=0",
                "seqs=1..2",
            ],
        )]
    }
}

/// gw-test's sealer with the deployment's keys (incarnation 0x77).
fn gw_sealer(dep: &Deployment) -> Sealer {
    let gateway = GatewayId::new("gw-test").unwrap();
    let hub_pub = keys::load_hub_public_key(&dep.path().join("keys/hub.hpke.pub")).unwrap();
    let signing = keys::load_signing_key(&dep.path().join("keys/gateway.sign.key")).unwrap();
    Sealer::new(gateway, signing, hub_pub, 0x77)
}

/// Runs `citygate hub-emergency --config CONFIG ARGS…` on a blocking thread.
async fn hub_emergency(config: &Path, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_citygate"));
    cmd.arg("hub-emergency")
        .arg("--config")
        .arg(config)
        .args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// Issue 11 item 7: the hub marks what a gateway sent under an emergency, and the operator
/// lists, exports and destroys the hub's copy by emergency id with the real binary: export
/// writes the emergency's lines to a new 0600 file; destroy is refused while the hub runs
/// (exit 1), and once it is stopped removes the data records only, keeping the reports and
/// every other line byte for byte; list then shows the copy destroyed; an unknown id exits
/// 64 naming the ids there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_emergency_lists_exports_and_destroys_what_the_hub_wrote() {
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let config = write_hub_config(&dep, &ca, "127.0.0.1:0");
    let hub = start_hub(&config).await;
    let port = hub.broker_addr().unwrap().port();
    let mut gw = Publisher::connect(&ca, port, &dep).await;
    until_subscribed(&hub).await;

    let sealer = gw_sealer(&dep);
    let flow = Stream::from_name("readings-7").unwrap();
    let ordinary = vec![record("p-01", "energy_import", Value::Int(7), T0, &[])];
    for (stream, seq, records) in [
        (Stream::Readings, 1, ordinary.clone()),
        (Stream::Alarms, 1, report(true)),
        (flow, 1, emergency_data(3, T0)),
        (Stream::Readings, 2, ordinary),
        (flow, 2, emergency_data(2, T0 + 10_000)),
        (Stream::Alarms, 2, report(false)),
    ] {
        let payload = sealer.seal(stream, seq, T0, &stamp(), &records).unwrap();
        gw.publish(stream, payload.bytes).await;
        assert_eq!(gw.next_acks(1).await, [seq]);
    }
    let sink = dep.path().join("records.jsonl");
    let written = std::fs::read_to_string(&sink).unwrap();
    let marked = format!("\"emergency_id\":\"{ID}\"}}");
    assert_eq!(written.lines().filter(|l| l.ends_with(&marked)).count(), 7);

    // While the hub runs: listing reads, destroying is refused and changes nothing.
    let out = hub_emergency(&config, &["--list"]).await;
    assert!(out.status.success(), "{out:?}");
    let out = hub_emergency(&config, &["--id", ID, "--destroy"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("is a hub running on it?"),
        "{out:?}"
    );
    assert_eq!(std::fs::read_to_string(&sink).unwrap(), written);
    hub.shutdown().await;

    let out = hub_emergency(&config, &["--list", "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let em = &list[0];
    assert_eq!(em["id"], ID);
    assert_eq!(em["gateways"], serde_json::json!(["gw-test"]));
    assert_eq!(em["policies"], serde_json::json!(["grid-emergency"]));
    assert_eq!(em["records"], 5);
    assert_eq!(em["reports"], 2);
    assert_eq!(em["first_ms"], T0);
    assert_eq!(em["last_ms"], T0 + 11_000);
    assert_eq!(em["started"]["reason"], "feeder 7 fault");
    assert_eq!(em["ended"]["end"], "stopped");
    assert_eq!(em["ended"]["delivered_batches"], 2);
    assert_eq!(em["destroyed"], serde_json::Value::Null);
    assert_eq!(list.as_array().unwrap().len(), 1);

    let exported = dep.path().join("export.jsonl");
    let out = hub_emergency(
        &config,
        &["--id", ID, "--export", exported.to_str().unwrap()],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("exported 7 lines"), "{out:?}");
    let expected: String = written
        .split_inclusive('\n')
        .filter(|l| l.contains(&marked))
        .collect();
    assert_eq!(std::fs::read_to_string(&exported).unwrap(), expected);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&exported).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let out = hub_emergency(
        &config,
        &["--id", ID, "--export", exported.to_str().unwrap()],
    )
    .await;
    assert_eq!(out.status.code(), Some(64), "{out:?}");

    let out = hub_emergency(&config, &["--id", ID, "--destroy"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        text(&out.stdout).contains("destroyed 5 data records"),
        "{out:?}"
    );
    let after = std::fs::read_to_string(&sink).unwrap();
    let kept: String = written
        .split_inclusive('\n')
        .filter(|l| !(l.contains(&marked) && l.contains("\"stream\":\"readings-7\"")))
        .collect();
    assert_eq!(
        kept.lines().count(),
        2 + 1 + 2,
        "ordinary, tamper, start and end"
    );
    let (head, event) = after.split_at(kept.len());
    assert_eq!(head, kept);
    let event: serde_json::Value = serde_json::from_str(event.trim_end()).unwrap();
    assert_eq!(event["hub_event"], "emergency_destroyed");
    assert_eq!(event["emergency_id"], ID);
    assert_eq!(event["records"], 5);

    let out = hub_emergency(&config, &["--list"]).await;
    assert!(out.status.success(), "{out:?}");
    let table = text(&out.stdout);
    let row = table.lines().nth(1).unwrap();
    assert!(row.starts_with(ID), "{table}");
    for cell in [
        " gw-test ",
        " grid-emergency ",
        " 0 ",
        " stopped ",
        " destroyed ",
    ] {
        assert!(row.contains(cell), "{cell:?} not in {table}");
    }

    let out = hub_emergency(&config, &["--id", "em-nope", "--export", "x.jsonl"]).await;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        text(&out.stderr).contains(&format!("ids found: {ID}")),
        "{out:?}"
    );

    // The hub starts again over the rewritten sink (recovery reads the event line) and
    // keeps what is there.
    let hub = start_hub(&config).await;
    assert_eq!(hub.hub().stats().recovered_batches, 0);
    hub.shutdown().await;
    assert_eq!(std::fs::read_to_string(&sink).unwrap(), after);
}

/// `hub-emergency` on the postgres sink: the same emergency, sent to a hub writing to a
/// private PostgreSQL, is listed from the database, exported (one JSON object per row, mode
/// 0600) and destroyed while the hub runs: the data records go, the reports and every other
/// record stay, the destruction is a `hub_events` row, and a re-sent batch of the emergency
/// is a duplicate that brings nothing back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_emergency_lists_exports_and_destroys_in_the_database() {
    let Some(crate::hub_pg::PgHub {
        pg,
        dep,
        config,
        hub,
        mut gw,
    }) = crate::hub_pg::PgHub::start("").await
    else {
        return;
    };
    let sealer = gw_sealer(&dep);
    let flow = Stream::from_name("readings-7").unwrap();
    let ordinary = vec![record("p-01", "energy_import", Value::Int(7), T0, &[])];
    let first_flow = sealer
        .seal(flow, 1, T0, &stamp(), &emergency_data(3, T0))
        .unwrap()
        .bytes;
    for (stream, seq, payload) in [
        (
            Stream::Readings,
            1,
            sealer.seal(Stream::Readings, 1, T0, &stamp(), &ordinary),
        ),
        (
            Stream::Alarms,
            1,
            sealer.seal(Stream::Alarms, 1, T0, &stamp(), &report(true)),
        ),
        (
            flow,
            2,
            sealer.seal(flow, 2, T0, &stamp(), &emergency_data(2, T0 + 10_000)),
        ),
        (
            Stream::Alarms,
            2,
            sealer.seal(Stream::Alarms, 2, T0, &stamp(), &report(false)),
        ),
    ] {
        gw.publish(stream, payload.unwrap().bytes).await;
        assert_eq!(gw.next_acks(1).await, [seq]);
    }
    gw.publish(flow, first_flow.clone()).await;
    assert_eq!(gw.next_acks(1).await, [1]);
    let marked = format!("SELECT count(*) FROM records WHERE emergency_id = '{ID}'");
    assert_eq!(pg.count(&marked), 7);

    let out = hub_emergency(&config, &["--list", "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let em = &list[0];
    assert_eq!(em["id"], ID);
    assert_eq!(em["records"], 5);
    assert_eq!(em["reports"], 2);
    assert_eq!(em["first_ms"], T0);
    assert_eq!(em["last_ms"], T0 + 11_000);
    assert_eq!(em["policies"], serde_json::json!(["grid-emergency"]));
    assert_eq!(em["started"]["reason"], "feeder 7 fault");
    assert_eq!(em["ended"]["delivered_batches"], 2);
    assert_eq!(em["destroyed"], serde_json::Value::Null);

    let exported = dep.path().join("export.jsonl");
    let out = hub_emergency(
        &config,
        &["--id", ID, "--export", exported.to_str().unwrap()],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("exported 7 lines"), "{out:?}");
    let lines = std::fs::read_to_string(&exported).unwrap();
    for line in lines.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(row["emergency_id"], ID, "{line}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&exported).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // Beside the running hub: one transaction in the database.
    let out = hub_emergency(&config, &["--id", ID, "--destroy"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        text(&out.stdout).contains("destroyed 5 data records"),
        "{out:?}"
    );
    assert_eq!(pg.count(&marked), 2, "the reports stay");
    assert_eq!(
        pg.count("SELECT count(*) FROM records"),
        4,
        "ordinary, tamper, start and end"
    );
    assert_eq!(
        pg.count(&format!(
            "SELECT records FROM hub_events WHERE event = 'emergency_destroyed' \
             AND emergency_id = '{ID}'"
        )),
        5
    );
    // A gateway re-sending a batch of the emergency gets its ack; nothing comes back.
    gw.publish(flow, first_flow).await;
    assert_eq!(gw.next_acks(1).await, [1]);
    assert_eq!(pg.count(&marked), 2);

    let out = hub_emergency(&config, &["--list", "--json"]).await;
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["records"], 0);
    assert_eq!(list[0]["destroyed"]["records"], 5);
    let out = hub_emergency(&config, &["--id", ID, "--destroy"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        text(&out.stdout).contains("holds no data records; nothing destroyed (destroyed 5"),
        "{out:?}"
    );
    let out = hub_emergency(&config, &["--id", "em-nope", "--destroy"]).await;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        text(&out.stderr).contains(&format!("ids found: {ID}")),
        "{out:?}"
    );
    hub.shutdown().await;
}

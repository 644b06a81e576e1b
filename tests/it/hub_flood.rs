//! Hubs flooded: with batches faster than it commits, a hub keeps acknowledging (its MQTT
//! client stops taking publishes, the acks, while the link's events wait unread, so the hub
//! must keep reading them while it commits and publishes: issue 13 item 3, found by
//! `citygate loadtest hub`, where 1,000 gateways stopped a hub within seconds, for good);
//! with garbage, its log stays short and its counters count everything (issue 12 item 3).

use std::time::Duration;

use bytes::Bytes;
use citygate::mqtt::{CertAuthority, LinkEvent, LinkTls, MqttLink, QoS};
use citygate::reading::{GatewayId, Quality, Record, Stream, Unit, Value};
use citygate::seal::{keys, Sealer};
use citygate::wire::{ack_topic, stream_topic, AckVerifier};

use crate::hub_wire::{stamp, start_hub, until_subscribed, write_hub_config, Publisher};
use crate::support::*;

/// Batches published as fast as the broker takes them.
const BATCHES: u64 = 1000;
/// Records per batch: a county gateway's second (100 meters × 6 fields) is 600.
const RECORDS: usize = 100;

fn records(seq: u64) -> Vec<Record> {
    (0..RECORDS)
        .map(|i| Record {
            subject: format!("p-{:032x}", i),
            field: "active_power".into(),
            value: Value::Float(1000.0 + i as f64),
            unit: Unit::Watt,
            at_ms: 1_700_000_000_000 + seq as i64 * 1000,
            quality: Quality::Good,
            tags: vec![],
            window: None,
            epoch: 0,
        })
        .collect()
}

/// issue 13 item 3: every one of 1,000 batches published at once is acknowledged; before
/// the fix the hub stopped acking after a few hundred and never resumed (its commit waited
/// for the MQTT client's request queue while the client waited for the hub to read its
/// events).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_hub_keeps_reading_and_acknowledges_everything() {
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let config = write_hub_config(&dep, &ca, "127.0.0.1:0");
    let hub = start_hub(&config).await;
    let port = hub.broker_addr().unwrap().port();

    let gateway = GatewayId::new("gw-test").unwrap();
    let tls = LinkTls::Files(ca.client_files(&ca.issue_client("gw-test").unwrap()));
    let mut options = test_link_options(port, "gw-test", tls);
    options.inflight = 200;
    let (link, mut events) = MqttLink::start(options).unwrap();
    // The acks are read on their own task, so this client never stops its own link.
    let verifier = AckVerifier::new(
        keys::load_hub_ack_verifying_key(&dep.path().join("keys/hub.ack.pub")).unwrap(),
    );
    let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0u64);
    let reader = tokio::spawn(async move {
        let mut connected_tx = Some(connected_tx);
        let mut seen = std::collections::BTreeSet::new();
        while let Some(e) = events.recv().await {
            match e {
                LinkEvent::SubAck { granted, .. } => {
                    if let Some(tx) = connected_tx.take() {
                        let _ = tx.send(granted);
                    }
                }
                LinkEvent::Publish { payload, .. } => {
                    seen.insert(verifier.verify(&payload).unwrap().seq);
                    acked_tx.send_replace(seen.len() as u64);
                }
                _ => {}
            }
        }
    });
    link.subscribe(&ack_topic(&gateway), QoS::AtLeastOnce)
        .await
        .unwrap();
    let granted = tokio::time::timeout(Duration::from_secs(10), connected_rx).await;
    assert!(
        matches!(granted, Ok(Ok(true))),
        "ack subscription: {granted:?}"
    );
    until_subscribed(&hub).await;

    let hub_pub = keys::load_hub_public_key(&dep.path().join("keys/hub.hpke.pub")).unwrap();
    let signing = keys::load_signing_key(&dep.path().join("keys/gateway.sign.key")).unwrap();
    let sealer = Sealer::new(gateway.clone(), signing, hub_pub, 0x77);
    let payloads: Vec<Bytes> = (0..BATCHES)
        .map(|seq| {
            let sealed = sealer
                .seal(Stream::Readings, seq, 1, &stamp(), &records(seq))
                .unwrap();
            Bytes::from(sealed.bytes)
        })
        .collect();
    let topic = stream_topic(&gateway, Stream::Readings);
    for p in payloads {
        link.publish(&topic, QoS::AtLeastOnce, p).await.unwrap();
    }

    let all = tokio::time::timeout(
        Duration::from_secs(90),
        acked_rx.wait_for(|n| *n == BATCHES),
    )
    .await
    .is_ok();
    let acked = *acked_rx.borrow();
    assert!(all, "only {acked} of {BATCHES} batches acknowledged");
    let stats = hub.hub().stats();
    assert_eq!(stats.accepted_batches, BATCHES, "{stats:?}");
    link.shutdown().await;
    reader.abort();
    hub.shutdown().await;
}

/// issue 12 item 3: `citygate hub` fed 5,000 garbage payloads over MQTT logs a bounded
/// number of lines (a burst per reason, then one summary at shutdown with the count
/// suppressed), and the summary and the logged lines together account for all 5,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_flooded_with_garbage_keeps_its_log_short_and_counts_everything() {
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let config = write_hub_config(&dep, &ca, "127.0.0.1:0");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_citygate"));
    cmd.args(["hub", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG");
    let (mut child, mut log) = spawn_logged_command(cmd);
    assert!(
        log.wait_for("hub subscribed", Duration::from_secs(20))
            .await,
        "{}",
        log.text
    );
    let port: u16 = log
        .text
        .lines()
        .find(|l| l.contains("embedded broker listening"))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no broker address in:\n{}", log.text));
    let mut gw = Publisher::connect(&ca, port, &dep).await;
    const GARBAGE: u64 = 5_000;
    for i in 0..GARBAGE {
        gw.publish(Stream::Readings, format!("garbage {i}").into_bytes())
            .await;
        // PUBACKs must be taken off the link's event channel, or it stops reading.
        while gw.events.try_recv().is_ok() {}
    }
    // The hub takes payloads in order: once this batch is acked, the garbage is handled.
    let gateway = GatewayId::new("gw-test").unwrap();
    let hub_pub = keys::load_hub_public_key(&dep.path().join("keys/hub.hpke.pub")).unwrap();
    let signing = keys::load_signing_key(&dep.path().join("keys/gateway.sign.key")).unwrap();
    let good = Sealer::new(gateway, signing, hub_pub, 0x77)
        .seal(Stream::Readings, 1, 1, &stamp(), &records(1))
        .unwrap()
        .bytes;
    gw.publish(Stream::Readings, good).await;
    assert_eq!(gw.next_acks(1).await, [1]);
    signal(&child, "-TERM");
    wait_exit(&mut child, Duration::from_secs(20)).await;
    let text = log.finish().await;
    let logged = text
        .lines()
        .filter(|l| l.contains("batch rejected"))
        .count() as u64;
    let suppressed: u64 = text
        .lines()
        .filter(|l| l.contains("repeated warnings not logged"))
        .filter_map(|l| l.split("suppressed=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(logged + suppressed, GARBAGE, "{text}");
    let lines = text.lines().count();
    assert!(lines <= 60, "{lines} log lines:\n{text}");
}

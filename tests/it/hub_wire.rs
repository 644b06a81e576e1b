//! The hub as `citygate hub` runs it — its own embedded broker with mutual TLS — fed
//! over MQTT by a client holding a gateway's certificate: good batches are written and
//! acknowledged, forged, tampered and replayed ones are turned away with their reason,
//! and a restarted hub still knows what it has written.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use citygate::hub::{HubConfig, HubProcess};
use citygate::mqtt::{CertAuthority, LinkEvent, LinkTls, MqttLink, QoS};
use citygate::reading::{GatewayId, PurposeName, Quality, Record, Stream, Unit, Value};
use citygate::seal::{keys, PolicyStamp, Sealer};
use citygate::wire::{ack_topic, stream_topic};
use tokio::sync::mpsc;

use crate::support::*;

/// The purpose and policy hash the hand-sealed batches of these tests carry.
pub(crate) fn stamp() -> PolicyStamp {
    PolicyStamp::new(PurposeName::new("test-purpose").unwrap(), [7; 32])
}

fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            subject: "p-0123456789abcdef0123456789abcdef".into(),
            field: "energy_import".into(),
            value: Value::Int(1000 + i as i64),
            unit: Unit::WattHour,
            at_ms: 1_700_000_000_000 + i as i64,
            quality: Quality::Good,
            tags: vec![],
            window: None,
            epoch: 0,
        })
        .collect()
}

/// A hub config with an embedded broker on `listen`, the hub's client certificate, and
/// one registered gateway, `gw-test`, approved for [`stamp`].
pub(crate) fn write_hub_config(dep: &Deployment, ca: &CertAuthority, listen: &str) -> PathBuf {
    HubToml::embedded_broker(
        listen,
        &TlsFiles::client(ca, "hub-1"),
        &TlsFiles::localhost_server(ca),
    )
    .status()
    .approve(&stamp())
    .write(dep.path())
}

pub(crate) async fn start_hub(config: &Path) -> HubProcess {
    try_start_hub(config).await.unwrap()
}

/// [`start_hub`], returning why the hub did not start.
pub(crate) async fn try_start_hub(config: &Path) -> Result<HubProcess, String> {
    let cfg = HubConfig::load(config).unwrap();
    HubProcess::start_with(&cfg, |mut o| {
        o.keep_alive = Duration::from_secs(5);
        o.backoff = citygate::backoff::BackoffPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        };
        o
    })
    .await
    .map_err(|e| e.to_string())
}

/// Waits (bounded) until the broker has granted the hub's subscriptions: a batch
/// published before that reaches no hub.
pub(crate) async fn until_subscribed(hub: &HubProcess) {
    let mut subscribed = hub.subscribed();
    tokio::time::timeout(Duration::from_secs(10), subscribed.wait_for(|s| *s))
        .await
        .expect("the hub never subscribed")
        .unwrap();
}

/// A client holding gw-test's certificate, subscribed to gw-test's acks.
pub(crate) struct Publisher {
    link: MqttLink,
    pub(crate) events: mpsc::Receiver<LinkEvent>,
    /// The hub's ack key, as the gateway would hold it: every ack must verify.
    verifier: citygate::wire::AckVerifier,
}

impl Publisher {
    pub(crate) async fn connect(ca: &CertAuthority, port: u16, dep: &Deployment) -> Publisher {
        let tls = LinkTls::Files(ca.client_files(&ca.issue_client("gw-test").unwrap()));
        Publisher::connect_with(tls, port, dep).await
    }

    /// [`Publisher::connect`] over `tls` (e.g. plaintext to a test broker).
    pub(crate) async fn connect_with(tls: LinkTls, port: u16, dep: &Deployment) -> Publisher {
        let verifier = citygate::wire::AckVerifier::new(
            keys::load_hub_ack_verifying_key(&dep.path().join("keys/hub.ack.pub")).unwrap(),
        );
        let (link, mut events) = MqttLink::start(test_link_options(port, "gw-test", tls)).unwrap();
        let connected = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(e) = events.recv().await {
                if matches!(e, LinkEvent::Connected { .. }) {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(connected.ok(), Some(true), "the publisher never connected");
        let gw = GatewayId::new("gw-test").unwrap();
        link.subscribe(&ack_topic(&gw), QoS::AtLeastOnce)
            .await
            .unwrap();
        let granted = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(e) = events.recv().await {
                if let LinkEvent::SubAck { granted, .. } = e {
                    return granted;
                }
            }
            false
        })
        .await;
        assert_eq!(granted.ok(), Some(true), "the ack subscription was refused");
        Publisher {
            link,
            events,
            verifier,
        }
    }

    pub(crate) async fn publish(&self, stream: Stream, payload: Vec<u8>) {
        let gw = GatewayId::new("gw-test").unwrap();
        self.link
            .publish(
                &stream_topic(&gw, stream),
                QoS::AtLeastOnce,
                Bytes::from(payload),
            )
            .await
            .unwrap();
    }

    /// The sequence numbers of the next `n` acks, in arrival order (bounded wait). The
    /// hub handles payloads in order and acks arrive in order, so an ack for anything
    /// published before the last acked payload would be among them.
    pub(crate) async fn next_acks(&mut self, n: usize) -> Vec<u64> {
        let seqs = self.acks_within(n, Duration::from_secs(10)).await;
        assert!(seqs.len() == n, "only acks {seqs:?} of {n} arrived");
        seqs
    }

    /// Up to `n` acks' sequence numbers, as many as arrive within `limit`.
    pub(crate) async fn acks_within(&mut self, n: usize, limit: Duration) -> Vec<u64> {
        let mut seqs = Vec::new();
        let _ = tokio::time::timeout(limit, async {
            while seqs.len() < n {
                match self.events.recv().await {
                    Some(LinkEvent::Publish { payload, .. }) => {
                        seqs.push(self.verifier.verify(&payload).unwrap().seq);
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        })
        .await;
        seqs
    }
}

fn sink_seqs(dep: &Deployment) -> Vec<u64> {
    std::fs::read_to_string(dep.path().join("records.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tampered_and_replayed_batches_are_refused_over_mqtt_even_after_a_hub_restart() {
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let config = write_hub_config(&dep, &ca, "127.0.0.1:0");
    let hub = start_hub(&config).await;
    let port = hub.broker_addr().unwrap().port();
    let mut gw = Publisher::connect(&ca, port, &dep).await;
    until_subscribed(&hub).await;
    let (code, body) = citygate::telemetry::http::get(
        hub.status_addr().unwrap(),
        "/status",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["subscribed"], true, "{body}");

    let gateway = GatewayId::new("gw-test").unwrap();
    let hub_pub = keys::load_hub_public_key(&dep.path().join("keys/hub.hpke.pub")).unwrap();
    let signing = keys::load_signing_key(&dep.path().join("keys/gateway.sign.key")).unwrap();
    let sealer = Sealer::new(gateway.clone(), signing, hub_pub.clone(), 0x77);
    let seal = |seq: u64, n: usize| {
        sealer
            .seal(Stream::Readings, seq, 1, &stamp(), &records(n))
            .unwrap()
            .bytes
    };

    // A good batch: written and acknowledged.
    let good = seal(100, 3);
    gw.publish(Stream::Readings, good.clone()).await;
    assert_eq!(gw.next_acks(1).await, [100]);
    assert_eq!(sink_seqs(&dep), [100, 100, 100]);

    // Tampered: one byte of the ciphertext flipped. Signed by a key the hub does not know
    // for gw-test. Sealed by a gateway the hub does not know, on gw-test's topic.
    let mut tampered = seal(101, 3);
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x01;
    let rogue = Sealer::new(
        gateway.clone(),
        ed25519_dalek::SigningKey::from_bytes(&[9; 32]),
        hub_pub.clone(),
        0x77,
    );
    let forged = rogue
        .seal(Stream::Readings, 102, 1, &stamp(), &records(3))
        .unwrap()
        .bytes;
    let stranger = Sealer::new(
        GatewayId::new("gw-stranger").unwrap(),
        ed25519_dalek::SigningKey::from_bytes(&[9; 32]),
        hub_pub.clone(),
        0x77,
    )
    .seal(Stream::Readings, 103, 1, &stamp(), &records(3))
    .unwrap()
    .bytes;
    gw.publish(Stream::Readings, tampered).await;
    gw.publish(Stream::Readings, forged).await;
    gw.publish(Stream::Readings, stranger).await;
    gw.publish(Stream::Readings, b"not an envelope".to_vec())
        .await;
    // A replay of the good batch: acknowledged again (the gateway may have missed the
    // ack), written nothing.
    gw.publish(Stream::Readings, good.clone()).await;
    assert_eq!(
        gw.next_acks(1).await,
        [100],
        "only the replay (published last) is acked"
    );
    let stats = hub.hub().stats();
    assert_eq!(stats.duplicates, 1, "{stats:?}");
    assert_eq!(stats.accepted_batches, 1, "{stats:?}");
    let rejected: Vec<(&str, u64)> = stats.rejected.iter().map(|(k, v)| (*k, *v)).collect();
    assert_eq!(
        rejected,
        [
            ("bad_magic", 1),
            ("bad_signature", 1),
            ("unknown_gateway", 1),
            ("unknown_signer_key", 1)
        ],
        "{stats:?}"
    );
    assert_eq!(
        sink_seqs(&dep),
        [100, 100, 100],
        "nothing but the good batch was written"
    );

    // The hub restarts on the same port with the same state: the replay stays a replay.
    drop(gw);
    hub.shutdown().await;
    let config = write_hub_config(&dep, &ca, &format!("127.0.0.1:{port}"));
    let hub = start_hub(&config).await;
    let mut gw = Publisher::connect(&ca, port, &dep).await;
    until_subscribed(&hub).await;
    gw.publish(Stream::Readings, good).await;
    gw.publish(Stream::Readings, seal(101, 2)).await;
    let mut acks = gw.next_acks(2).await;
    acks.sort_unstable();
    assert_eq!(acks, [100, 101]);
    let stats = hub.hub().stats();
    assert_eq!(
        (stats.duplicates, stats.accepted_batches),
        (1, 1),
        "{stats:?}"
    );
    assert_eq!(
        sink_seqs(&dep),
        [100, 100, 100, 101, 101],
        "no duplicate after the restart"
    );
    hub.shutdown().await;
}

/// `citygate keys tls` makes the files a one-box hub needs; `citygate hub` starts its
/// embedded broker from them and stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn citygate_hub_runs_its_embedded_broker_from_keys_tls_output() {
    let dep = Deployment::new();
    let pki = dep.path().join("pki");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_citygate"))
        .args(["keys", "tls", "--dir"])
        .arg(&pki)
        .args([
            "--server",
            "localhost",
            "--server",
            "127.0.0.1",
            "--client",
            "hub-1",
            "--client",
            "gw-test",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let files = |cert: &str, key: &str| TlsFiles {
        ca: pki.join("ca.pem"),
        cert: pki.join(cert),
        key: pki.join(key),
    };
    let config = HubToml::embedded_broker(
        "127.0.0.1:0",
        &files("client-hub-1.pem", "client-hub-1.key"),
        &files("broker.pem", "broker.key"),
    )
    .status()
    .approve(&stamp())
    .write(dep.path());
    let (mut child, mut log) =
        spawn_logged(&["hub".as_ref(), "--config".as_ref(), config.as_ref()]);
    // The hub says in its log when its subscriptions are granted.
    if !log
        .wait_for("hub subscribed", Duration::from_secs(15))
        .await
    {
        let _ = child.kill();
        panic!("the hub never subscribed\n{}", log.finish().await);
    }
    assert!(child.try_wait().unwrap().is_none(), "the hub exited early");
    // logrotate's `postrotate kill -HUP`: the hub reopens its sink and keeps running.
    signal(&child, "-HUP");
    if !log
        .wait_for("sighup: sink reopened", Duration::from_secs(15))
        .await
    {
        let _ = child.kill();
        panic!(
            "the hub did not reopen its sink on SIGHUP\n{}",
            log.finish().await
        );
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the hub\n{}",
        log.text
    );
    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(15)).await;
    let log = log.finish().await;
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("embedded broker listening"), "{log}");
    assert!(log.contains("hub serving"), "{log}");
}

/// issue 9 item 9: on the embedded broker, the hub's shared subscriptions deliver every
/// stream. rumqttd 0.20 keeps one read cursor per share *group*, not per filter, so the
/// hub's three `$share/{group}/…` filters used to share one cursor and alarms batches
/// (published after readings) were skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_and_alarms_both_reach_the_sink_through_the_embedded_broker() {
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let config = write_hub_config(&dep, &ca, "127.0.0.1:0");
    let hub = start_hub(&config).await;
    let port = hub.broker_addr().unwrap().port();
    let mut gw = Publisher::connect(&ca, port, &dep).await;
    until_subscribed(&hub).await;

    let gateway = GatewayId::new("gw-test").unwrap();
    let hub_pub = keys::load_hub_public_key(&dep.path().join("keys/hub.hpke.pub")).unwrap();
    let signing = keys::load_signing_key(&dep.path().join("keys/gateway.sign.key")).unwrap();
    let sealer = Sealer::new(gateway, signing, hub_pub, 0x77);
    let seal = |stream: Stream, seq: u64| {
        sealer
            .seal(stream, seq, 1, &stamp(), &records(2))
            .unwrap()
            .bytes
    };
    for (stream, seq) in [
        (Stream::Readings, 100),
        (Stream::Readings, 101),
        (Stream::Alarms, 200),
        (Stream::Readings, 102),
        (Stream::Alarms, 201),
        (Stream::Audit, 300),
    ] {
        gw.publish(stream, seal(stream, seq)).await;
    }
    let mut acks = gw.next_acks(6).await;
    acks.sort_unstable();
    assert_eq!(acks, [100, 101, 102, 200, 201, 300]);
    let mut written = sink_seqs(&dep);
    written.sort_unstable();
    written.dedup();
    assert_eq!(written, [100, 101, 102, 200, 201, 300]);
    hub.shutdown().await;
}

/// issue 9 items 1 and 9: the hub's embedded broker applies the access rules — a
/// certificate that is neither the hub's nor a registered gateway's cannot publish an ack
/// for gw-test (its connection is closed, the gateway receives nothing and keeps its
/// session), and the hub's `/metrics` counts it. The hub's certificate name differs from
/// its id: the broker knows its own hub by the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hubs_embedded_broker_refuses_a_forged_ack_and_counts_it() {
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let config = HubToml::embedded_broker(
        "127.0.0.1:0",
        &TlsFiles::client(&ca, "county-hub-cert"),
        &TlsFiles::localhost_server(&ca),
    )
    .status()
    .approve(&stamp())
    .write(dep.path());
    let hub = start_hub(&config).await;
    let port = hub.broker_addr().unwrap().port();
    let mut gw = Publisher::connect(&ca, port, &dep).await;
    until_subscribed(&hub).await;

    let tls = LinkTls::Files(ca.client_files(&ca.issue_client("sim-1").unwrap()));
    // It asks for gw-test's client id: it gets a session of its own.
    let (rogue, mut rogue_rx) = MqttLink::start(test_link_options(port, "gw-test", tls)).unwrap();
    let gateway = GatewayId::new("gw-test").unwrap();
    let disconnected = tokio::time::timeout(Duration::from_secs(10), async {
        let mut published = false;
        while let Some(e) = rogue_rx.recv().await {
            match e {
                LinkEvent::Connected { .. } if !published => {
                    published = true;
                    rogue
                        .publish(
                            &ack_topic(&gateway),
                            QoS::AtMostOnce,
                            Bytes::from_static(b"{}"),
                        )
                        .await
                        .unwrap();
                }
                LinkEvent::Disconnected { .. } if published => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(disconnected.is_ok(), "the forger was not disconnected");
    rogue.shutdown().await;

    let metric = "citygate_hub_broker_refused_total{what=\"packet\"} 1";
    let mut body = String::new();
    for _ in 0..200 {
        body = citygate::telemetry::http::get(
            hub.status_addr().unwrap(),
            "/metrics",
            Duration::from_secs(5),
        )
        .await
        .unwrap()
        .1;
        if body.contains(metric) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(body.contains(metric), "{body}");

    // gw-test is still connected and got nothing but the hub's ack for a real batch.
    let hub_pub = keys::load_hub_public_key(&dep.path().join("keys/hub.hpke.pub")).unwrap();
    let signing = keys::load_signing_key(&dep.path().join("keys/gateway.sign.key")).unwrap();
    let batch = Sealer::new(gateway, signing, hub_pub, 0x77)
        .seal(Stream::Alarms, 7, 1, &stamp(), &records(1))
        .unwrap()
        .bytes;
    gw.publish(Stream::Alarms, batch).await;
    assert_eq!(
        gw.next_acks(1).await,
        [7],
        "the forged ack reached the gateway"
    );
    hub.shutdown().await;
}

/// Issue 11 item 3, end to end: a real gateway whose policy hash differs from the one the hub
/// approved for its purpose (a changed policy) has its batches refused as `unapproved_policy`,
/// counted, never acknowledged — the gateway keeps them — and, once the hub is restarted with
/// the gateway's actual policy approved, they are delivered and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_under_an_unapproved_policy_are_kept_until_the_hub_approves_it() {
    use citygate::mqtt::{BrokerOptions, EmbeddedBroker};
    let profiles = shipped_profiles();
    let token = tokio_util::sync::CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 1, 17, &token).await;
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let server = ca.issue_localhost_server().unwrap();
    let broker = EmbeddedBroker::start(BrokerOptions::localhost(ca.server_files(&server))).unwrap();
    let port = broker.tls_addr().port();
    let devices = device_toml("m1", "chint-ddsu666", &sim.address, 1, "200ms");
    let cfg = dep.config(&["active_power", "energy_import"], &devices, profiles);
    let actual = policy_stamp(&cfg);
    let changed = PolicyStamp::new(actual.purpose.clone(), [0x5a; 32]);

    let hub = start_hub_approving(dep.path(), &ca, port, &[changed]).await;
    let (store, running) = start_gateway(&cfg);
    let metrics = running.metrics.clone();
    let uplink = start_uplink(&cfg, &running, &ca, port, 8, Duration::from_secs(1)).await;
    let unapproved = || {
        hub.hub()
            .stats()
            .rejected
            .get("unapproved_policy")
            .copied()
            .unwrap_or(0)
    };
    assert!(
        wait_for(Duration::from_secs(20), || unapproved() >= 3).await,
        "no unapproved_policy rejections: {:?}",
        hub.hub().stats()
    );
    assert_eq!(hub.hub().stats().accepted_batches, 0);
    assert_eq!(
        metrics.batches_acked.get(),
        0,
        "an unapproved batch was acked"
    );
    assert!(
        store.stats().total_batches() > 0,
        "the gateway dropped its batches"
    );
    hub.shutdown().await;

    let hub = start_hub_approving(dep.path(), &ca, port, &[actual]).await;
    assert!(running.shutdown(Duration::from_secs(10)).await);
    assert!(
        wait_for(Duration::from_secs(30), || store.stats().total_batches()
            == 0)
        .await,
        "store did not drain once approved: {:?} hub {:?}",
        store.stats(),
        hub.hub().stats()
    );
    uplink.finish(Duration::ZERO).await;
    token.cancel();
    let stats = hub.hub().stats();
    hub.shutdown().await;
    broker.shutdown();
    assert_eq!(stats.accepted_batches, metrics.batches_sealed.get());
    assert_eq!(stats.records_written, metrics.records_sealed.get());
    assert_eq!(stats.rejected.get("unapproved_policy"), None);
}

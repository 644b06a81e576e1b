//! The hub as `citygate hub` runs it — its own embedded broker with mutual TLS — fed
//! over MQTT by a client holding a gateway's certificate: good batches are written and
//! acknowledged, forged, tampered and replayed ones are turned away with their reason,
//! and a restarted hub still knows what it has written.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use citygate::hub::{HubConfig, HubProcess};
use citygate::reading::{GatewayId, Quality, Record, Stream, Unit, Value};
use citygate::seal::{keys, Sealer};
use citygate::uplink::{ack_topic, stream_topic, CertAuthority, LinkEvent, LinkTls, MqttLink, QoS};
use tokio::sync::mpsc;

use crate::support::*;

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
        })
        .collect()
}

/// A hub config with an embedded broker on `listen`, the hub's client certificate, and
/// one registered gateway, `gw-test`.
fn write_hub_config(dep: &Deployment, ca: &CertAuthority, listen: &str) -> PathBuf {
    let server = ca.issue_localhost_server().unwrap();
    let hub = ca.issue_client("hub-1").unwrap();
    let text = format!(
        "[hub]\nid = \"hub-1\"\nhpke_secret_key = \"keys/hub.hpke.key\"\nstate_path = \"hub-state\"\n\n\
         [sink]\ntype = \"jsonl\"\npath = \"records.jsonl\"\n\n\
         [mqtt]\nca_file = {ca:?}\ncert_file = {hc:?}\nkey_file = {hk:?}\n\
         embedded_broker = {{ listen = \"{listen}\", cert_file = {sc:?}, key_file = {sk:?}, client_ca_file = {ca:?} }}\n\n\
         [status]\nlisten = \"127.0.0.1:0\"\n\n\
         [[gateway]]\nid = \"gw-test\"\nverifying_key = \"keys/gateway.sign.pub\"\n",
        ca = ca.ca_file().display().to_string(),
        hc = hub.cert.display().to_string(),
        hk = hub.key.display().to_string(),
        sc = server.cert.display().to_string(),
        sk = server.key.display().to_string(),
    );
    let path = dep.path().join("hub.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn start_hub(config: &Path) -> HubProcess {
    let cfg = HubConfig::load(config).unwrap();
    HubProcess::start_with(&cfg, |mut o| {
        o.keep_alive = Duration::from_secs(5);
        o.backoff = citygate::backoff::BackoffPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        };
        o
    })
    .unwrap()
}

/// A client holding gw-test's certificate, subscribed to gw-test's acks.
struct Publisher {
    link: MqttLink,
    events: mpsc::Receiver<LinkEvent>,
}

impl Publisher {
    async fn connect(ca: &CertAuthority, port: u16) -> Publisher {
        let tls = LinkTls::Files(ca.client_files(&ca.issue_client("gw-test").unwrap()));
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
        Publisher { link, events }
    }

    async fn publish(&self, stream: Stream, payload: Vec<u8>) {
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

    /// The sequence numbers acknowledged within `limit`.
    async fn acks_within(&mut self, limit: Duration) -> Vec<u64> {
        let mut seqs = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        while let Ok(Some(e)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            if let LinkEvent::Publish { payload, .. } = e {
                seqs.push(citygate::hub::Ack::decode(&payload).unwrap().seq);
            }
        }
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
    let hub = start_hub(&config);
    let port = hub.broker_addr().unwrap().port();
    let mut gw = Publisher::connect(&ca, port).await;
    // The hub subscribes right after connecting; give its subscription a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let gateway = GatewayId::new("gw-test").unwrap();
    let hub_pub = keys::load_hub_public_key(&dep.path().join("keys/hub.hpke.pub")).unwrap();
    let signing = keys::load_signing_key(&dep.path().join("keys/gateway.sign.key")).unwrap();
    let sealer = Sealer::new(gateway.clone(), signing, hub_pub.clone(), [7; 32]);
    let seal = |seq: u64, n: usize| {
        sealer
            .seal(Stream::Readings, seq, 1, &records(n))
            .unwrap()
            .bytes
    };

    // A good batch: written and acknowledged.
    let good = seal(100, 3);
    gw.publish(Stream::Readings, good.clone()).await;
    assert_eq!(gw.acks_within(Duration::from_secs(5)).await, [100]);
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
        [7; 32],
    );
    let forged = rogue
        .seal(Stream::Readings, 102, 1, &records(3))
        .unwrap()
        .bytes;
    let stranger = Sealer::new(
        GatewayId::new("gw-stranger").unwrap(),
        ed25519_dalek::SigningKey::from_bytes(&[9; 32]),
        hub_pub.clone(),
        [7; 32],
    )
    .seal(Stream::Readings, 103, 1, &records(3))
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
        gw.acks_within(Duration::from_secs(3)).await,
        [100],
        "only the replay is acked"
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
    let hub = start_hub(&config);
    let mut gw = Publisher::connect(&ca, port).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.publish(Stream::Readings, good).await;
    gw.publish(Stream::Readings, seal(101, 2)).await;
    let mut acks = gw.acks_within(Duration::from_secs(5)).await;
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
    let p = |f: &str| pki.join(f).display().to_string();
    let text = format!(
        "[hub]\nid = \"hub-1\"\nhpke_secret_key = \"keys/hub.hpke.key\"\nstate_path = \"hub-state\"\n\n\
         [sink]\ntype = \"jsonl\"\npath = \"records.jsonl\"\n\n\
         [mqtt]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n\
         embedded_broker = {{ listen = \"127.0.0.1:0\", cert_file = {:?}, key_file = {:?}, client_ca_file = {:?} }}\n\n\
         [status]\nlisten = \"127.0.0.1:0\"\n\n\
         [[gateway]]\nid = \"gw-test\"\nverifying_key = \"keys/gateway.sign.pub\"\n",
        p("ca.pem"),
        p("client-hub-1.pem"),
        p("client-hub-1.key"),
        p("broker.pem"),
        p("broker.key"),
        p("ca.pem"),
    );
    let config = dep.path().join("hub.toml");
    std::fs::write(&config, text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_citygate"))
        .args(["hub", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(child.try_wait().unwrap().is_none(), "the hub exited early");
    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(15)).await;
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("embedded broker listening"), "{log}");
    assert!(log.contains("hub serving"), "{log}");
}

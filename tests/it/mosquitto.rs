//! The end-to-end path against a real, external broker: Debian's mosquitto with mutual
//! TLS. Skipped (with a note on stderr) where mosquitto is not installed, unless
//! `CITYGATE_REQUIRE_MOSQUITTO=1` (CI sets it), which turns a missing broker into a failure.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use citygate::mqtt::CertAuthority;
use tokio_util::sync::CancellationToken;

use crate::support::*;

pub(crate) fn mosquitto_binary() -> Option<&'static str> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// Kills the broker this test started, by its id, when the test ends.
pub(crate) struct Broker(pub(crate) std::process::Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts mosquitto with the config `conf(port)` writes, on a loopback port nobody uses.
/// Mosquitto cannot listen on port 0 and report the port, so a free port is picked; if
/// another process takes it first, mosquitto exits with "Address already in use" and a
/// fresh port is tried. Ready once mosquitto logs that it is running.
pub(crate) async fn start_mosquitto(
    bin: &str,
    dir: &Path,
    conf: impl Fn(u16) -> String,
) -> (Broker, u16) {
    for attempt in 0..5 {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(&conf_path, conf(port)).unwrap();
        let log_path = dir.join(format!("mosquitto-{attempt}.log"));
        let mut broker = Broker(
            Command::new(bin)
                .arg("-c")
                .arg(&conf_path)
                .stdout(Stdio::null())
                .stderr(Stdio::from(std::fs::File::create(&log_path).unwrap()))
                .spawn()
                .unwrap(),
        );
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let mut exited = false;
        let settled = wait_for(Duration::from_secs(10), || {
            exited = broker.0.try_wait().unwrap().is_some();
            exited || log().contains(" running")
        })
        .await;
        assert!(settled, "mosquitto neither ran nor exited: {}", log());
        if !exited {
            return (broker, port);
        }
        assert!(
            log().contains("Address already in use"),
            "mosquitto did not start: {}",
            log()
        );
    }
    panic!("mosquitto found no free port in 5 attempts");
}

/// Events of `link` until `limit` passes or `until` returns true for one.
async fn collect(
    events: &mut tokio::sync::mpsc::Receiver<citygate::mqtt::LinkEvent>,
    limit: Duration,
    mut until: impl FnMut(&citygate::mqtt::LinkEvent) -> bool,
) -> Vec<citygate::mqtt::LinkEvent> {
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        while let Some(e) = events.recv().await {
            let stop = until(&e);
            seen.push(e);
            if stop {
                break;
            }
        }
    })
    .await;
    seen
}

fn published(events: &[citygate::mqtt::LinkEvent]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match e {
            citygate::mqtt::LinkEvent::Publish { topic, .. } => Some(topic.as_str()),
            _ => None,
        })
        .collect()
}

/// Meters to hub through mosquitto with mutual TLS and the access rules and listener that
/// `citygate keys tls` writes. Issue 9 item 1 (broker layer): (a) an ack another
/// certificate publishes on a gateway's ack topic never reaches the gateway's
/// certificate; (b) a client connecting with the gateway's client id does not take the
/// gateway's session; (c) the gateway's batches and the hub's acks flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meters_to_hub_through_mosquitto_with_mutual_tls() {
    use bytes::Bytes;
    use citygate::mqtt::acl::{mosquitto_acl, mosquitto_conf, BrokerRoles};
    use citygate::mqtt::{LinkEvent, LinkTls, MqttLink, QoS};

    let Some(bin) = mosquitto_binary() else {
        assert!(
            std::env::var("CITYGATE_REQUIRE_MOSQUITTO").is_err(),
            "CITYGATE_REQUIRE_MOSQUITTO is set but mosquitto is not installed"
        );
        eprintln!("note: mosquitto not installed; skipping the external-broker test");
        return;
    };
    let dep = Deployment::new();
    let pki = dep.path().join("pki");
    let ca = CertAuthority::generate(&pki, "citygate test ca").unwrap();
    let server = ca.issue_localhost_server().unwrap();
    // The names `citygate keys tls` gives the broker's files.
    std::fs::copy(&server.cert, pki.join("broker.pem")).unwrap();
    std::fs::copy(&server.key, pki.join("broker.key")).unwrap();
    let roles = BrokerRoles {
        gateways: vec![citygate::reading::GatewayId::new("gw-test").unwrap()],
        hubs: vec!["hub-1".into()],
        clients: vec!["meter1".into()],
        meter_topics: vec!["meters/#".into()],
    };
    std::fs::write(pki.join("mosquitto-acl.conf"), mosquitto_acl(&roles)).unwrap();
    let (_broker, port) = start_mosquitto(bin, dep.path(), |port| {
        // The generated listener on a test port, loopback only; the test runs as root,
        // which mosquitto would otherwise leave for user `mosquitto`.
        mosquitto_conf(&pki, 8883, None).replace(
            "\nlistener 8883\n",
            &format!("\nlistener {port} 127.0.0.1\npersistence false\nuser root\n"),
        )
    })
    .await;
    let link = |name: &str, id: &str| {
        let tls = LinkTls::Files(ca.client_files(&ca.issue_client(name).unwrap()));
        MqttLink::start(test_link_options(port, id, tls)).unwrap()
    };
    let connected = |e: &LinkEvent| matches!(e, LinkEvent::Connected { .. });
    let suback = |e: &LinkEvent| matches!(e, LinkEvent::SubAck { .. });

    // (a) The gateway's certificate does not receive an ack the meter's certificate
    // forges, though it does receive the meter topics it may read.
    let (watch, mut watch_events) = link("gw-test", "gw-test");
    collect(&mut watch_events, Duration::from_secs(10), connected).await;
    watch
        .subscribe("citygate/v1/gw-test/ack", QoS::AtLeastOnce)
        .await
        .unwrap();
    watch.subscribe("meters/#", QoS::AtLeastOnce).await.unwrap();
    collect(&mut watch_events, Duration::from_secs(10), suback).await;
    collect(&mut watch_events, Duration::from_secs(10), suback).await;
    let (meter, mut meter_events) = link("meter1", "meter1");
    collect(&mut meter_events, Duration::from_secs(10), connected).await;
    let forged = r#"{"v":1,"gateway":"gw-test","stream":"readings","seq":1}"#;
    meter
        .publish(
            "citygate/v1/gw-test/ack",
            QoS::AtLeastOnce,
            Bytes::from(forged),
        )
        .await
        .unwrap();
    meter
        .publish("meters/m1", QoS::AtLeastOnce, Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let seen = collect(
        &mut watch_events,
        Duration::from_secs(10),
        |e| matches!(e, LinkEvent::Publish { topic, .. } if topic == "meters/m1"),
    )
    .await;
    assert_eq!(published(&seen), ["meters/m1"], "{seen:?}");
    // Issue 10 item 2: a gateway's certificate may not announce a hub (mosquitto drops the
    // retained presence; checked below, where the gateway would have received it).
    let fake = citygate::wire::Presence {
        hub: "hub-x".into(),
        online: Some(1),
    };
    watch
        .publish_retained(
            &citygate::wire::presence_topic("hub-x"),
            QoS::AtLeastOnce,
            Bytes::from(fake.encode()),
        )
        .await
        .unwrap();
    watch.shutdown().await;
    meter.shutdown().await;

    let token = CancellationToken::new();
    let profiles = shipped_profiles();
    let sim = start_sim(&profiles, "eastron-sdm120", 2, 21, &token).await;

    let devices: String = (1..=2u8)
        .map(|u| device_toml(&format!("m{u}"), "eastron-sdm120", &sim.address, u, "200ms"))
        .collect();
    let cfg = dep.config(
        &["active_power", "energy_import", "voltage_l1"],
        &devices,
        profiles,
    );
    let hub = start_hub(dep.path(), &ca, port, &cfg).await;
    let (store, running) = start_gateway(&cfg);
    let metrics = running.metrics.clone();
    let uplink = start_uplink(&cfg, &running, &ca, port, 8, Duration::from_secs(2)).await;
    assert!(
        wait_for(Duration::from_secs(20), || metrics.batches_acked.get() >= 1).await,
        "hub {:?}",
        hub.hub().stats()
    );
    // (d) Issue 10 item 2: under the generated rules the hub connects with its last will,
    // its retained presence reaches the gateway, and the one a gateway tried to publish
    // did not.
    assert!(
        wait_for(Duration::from_secs(20), || metrics
            .link()
            .hubs
            .get("hub-1")
            .is_some_and(|h| h.online))
        .await,
        "{:?}",
        metrics.link()
    );
    assert!(
        !metrics.link().hubs.contains_key("hub-x"),
        "{:?}",
        metrics.link()
    );

    // (b) Another certificate asking for the gateway's client id gets its own (its CN):
    // it neither takes the gateway's session (which would then take it back, ping-pong)
    // nor reads any batch.
    let (impostor, mut impostor_events) = link("meter1", "gw-test");
    collect(&mut impostor_events, Duration::from_secs(10), connected).await;
    impostor
        .subscribe("citygate/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let acked = metrics.batches_acked.get();
    assert!(
        wait_for(Duration::from_secs(20), || metrics.batches_acked.get()
            >= acked + 4)
        .await,
        "hub {:?}",
        hub.hub().stats()
    );
    let seen = collect(&mut impostor_events, Duration::from_millis(200), |_| false).await;
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, LinkEvent::Disconnected { .. })),
        "the impostor's session was taken back: {seen:?}"
    );
    assert!(published(&seen).is_empty(), "{seen:?}");
    impostor.shutdown().await;

    // (c) Everything sealed reaches the hub, and every batch is acknowledged.
    assert!(running.shutdown(Duration::from_secs(10)).await);
    assert!(
        wait_for(Duration::from_secs(20), || store.stats().total_batches()
            == 0)
        .await
    );
    uplink.finish(Duration::ZERO).await;
    token.cancel();
    let stats = hub.hub().stats();
    hub.shutdown().await;
    assert_eq!(stats.records_written, metrics.records_sealed.get());
    assert!(stats.rejected.values().all(|n| *n == 0), "{stats:?}");
}

/// `citygate keys tls` with roles writes the access rules and the listener next to the
/// certificates, gives the broker's user its files (issue 12 item 4), and refuses a meter
/// topic that reaches into citygate/# (exit 64).
#[test]
fn keys_tls_writes_the_mosquitto_access_rules_per_role() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("tls");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_citygate"))
            .args(["keys", "tls", "--force", "--dir"])
            .arg(&pki)
            .args(["--server", "broker.example", "--port", "8884"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[
        "--gateway",
        "gw1",
        "gw2",
        "--hub",
        "hub-1",
        "--client",
        "meter1",
        "--meter-topic",
        "meters/#",
    ]);
    assert!(out.status.success(), "{out:?}");
    for f in [
        "client-gw1.pem",
        "client-gw2.key",
        "client-hub-1.pem",
        "client-meter1.pem",
    ] {
        assert!(pki.join(f).exists(), "{f}");
    }
    let acl = std::fs::read_to_string(pki.join("mosquitto-acl.conf")).unwrap();
    assert!(
        acl.contains("user gw2\ntopic write citygate/v1/gw2/readings\n"),
        "{acl}"
    );
    assert!(
        acl.contains("user hub-1\ntopic read citygate/v1/+/readings\n"),
        "{acl}"
    );
    assert!(
        acl.contains("user meter1\ntopic deny citygate/#\n"),
        "{acl}"
    );
    let conf = std::fs::read_to_string(pki.join("mosquitto.conf")).unwrap();
    assert!(conf.contains("\nlistener 8884\n"), "{conf}");
    let acl_line = format!("\nacl_file {}\n", pki.join("mosquitto-acl.conf").display());
    assert!(conf.contains(&acl_line), "{conf}");

    // Issue 12 item 4: the broker's user can read its key and config files; where this
    // runs as root with that user, they are its, otherwise the commands are printed.
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let broker_user = nix::unistd::User::from_name("mosquitto").ok().flatten();
    match broker_user {
        Some(user) if nix::unistd::geteuid().is_root() => {
            use std::os::unix::fs::MetadataExt;
            let key = std::fs::metadata(pki.join("broker.key")).unwrap();
            assert_eq!((key.uid(), key.mode() & 0o777), (user.uid.as_raw(), 0o600));
            for f in ["mosquitto-acl.conf", "mosquitto.conf"] {
                let m = std::fs::metadata(pki.join(f)).unwrap();
                assert_eq!(
                    (m.gid(), m.mode() & 0o777),
                    (user.gid.as_raw(), 0o640),
                    "{f}"
                );
            }
            assert!(stdout.contains("is owned by mosquitto (0600)"), "{stdout}");
        }
        _ => assert!(
            stdout.contains(&format!(
                "chown mosquitto:mosquitto {}",
                std::path::absolute(pki.join("broker.key"))
                    .unwrap()
                    .display()
            )),
            "{stdout}"
        ),
    }
    let out = run(&["--gateway", "gw1", "--broker-user", "no-such-user-here"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("chown no-such-user-here:no-such-user-here"),
        "{stdout}"
    );

    let out = run(&["--gateway", "gw1", "--meter-topic", "#"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let out = run(&["--gateway", "gw1", "--client", "gw1"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
}

/// Issue 12 item 4: `keys tls` that fails (a bad `--client`, or a server name no certificate
/// can carry, found only while issuing) exits 64 and leaves no file behind, neither in a new
/// folder nor in an existing one.
#[test]
fn keys_tls_failure_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let run = |pki: &std::path::Path, extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_citygate"))
            .args(["keys", "tls", "--dir"])
            .arg(pki)
            .args(["--gateway", "gw1", "--hub", "hub-1"])
            .args(extra)
            .output()
            .unwrap()
    };
    let listing = |d: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let fresh = dir.path().join("tls");
    let existing = dir.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("notes.txt"), "mine").unwrap();
    for pki in [&fresh, &existing] {
        for bad in [
            &["--server", "localhost", "--client", "../meter1"][..],
            &["--server", "localhost", "--client", "meter/1"],
            &["--server", "bröker.example", "--client", "meter1"],
        ] {
            let out = run(pki, bad);
            assert_eq!(out.status.code(), Some(64), "{bad:?}: {out:?}");
            assert_eq!(listing(dir.path()), ["existing"], "{bad:?}");
            assert_eq!(listing(&existing), ["notes.txt"], "{bad:?}");
        }
    }
    let out = run(&existing, &["--server", "localhost"]);
    assert!(out.status.success(), "{out:?}");
    assert!(existing.join("ca.pem").exists() && existing.join("notes.txt").exists());
    assert!(!listing(&existing).iter().any(|n| n.starts_with('.')));
}

//! The MQTT-over-TLS transport against the embedded broker, over loopback only: mutual TLS,
//! refused identities, large payloads, broker restarts and shared subscriptions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use citygate::backoff::BackoffPolicy;
use citygate::mqtt::{
    tls, BrokerAccess, BrokerError, BrokerOptions, CertAuthority, CertKeyFiles, EmbeddedBroker,
    LinkEvent, LinkFailure, LinkOptions, LinkTls, MqttLink, QoS, TlsClientFiles, TlsError,
};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(20);
const READINGS_FILTER: &str = "citygate/v1/+/readings";

struct Pki {
    _dir: TempDir,
    ca: CertAuthority,
    server: CertKeyFiles,
    /// A second, unrelated CA in its own directory.
    other_ca: CertAuthority,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertAuthority::generate(dir.path(), "citygate test ca").unwrap();
    let server = ca.issue_localhost_server().unwrap();
    let other_ca = CertAuthority::generate(&dir.path().join("other"), "rogue ca").unwrap();
    Pki {
        _dir: dir,
        ca,
        server,
        other_ca,
    }
}

impl Pki {
    fn client(&self, id: &str) -> TlsClientFiles {
        self.ca.client_files(&self.ca.issue_client(id).unwrap())
    }

    fn broker(&self) -> EmbeddedBroker {
        EmbeddedBroker::start(BrokerOptions::localhost(self.ca.server_files(&self.server))).unwrap()
    }
}

fn options(addr: SocketAddr, id: &str, tls: LinkTls) -> LinkOptions {
    let mut opts = LinkOptions::new(format!("localhost:{}", addr.port()), id, tls);
    opts.keep_alive = Duration::from_secs(5);
    opts.connect_timeout = Duration::from_secs(5);
    opts.backoff = BackoffPolicy {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(400),
    };
    opts
}

fn link(addr: SocketAddr, id: &str, tls: LinkTls) -> (MqttLink, mpsc::Receiver<LinkEvent>) {
    MqttLink::start(options(addr, id, tls)).unwrap()
}

/// Waits for the first event matching `pred`, skipping others.
async fn wait_for(
    rx: &mut mpsc::Receiver<LinkEvent>,
    what: &str,
    pred: impl Fn(&LinkEvent) -> bool,
) -> LinkEvent {
    timeout(WAIT, async {
        loop {
            let event = rx.recv().await.expect("link event channel closed");
            if pred(&event) {
                return event;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn connected(rx: &mut mpsc::Receiver<LinkEvent>) {
    wait_for(rx, "connected", |e| {
        matches!(e, LinkEvent::Connected { .. })
    })
    .await;
}

async fn subscribed(rx: &mut mpsc::Receiver<LinkEvent>) {
    let ack = wait_for(rx, "suback", |e| matches!(e, LinkEvent::SubAck { .. })).await;
    assert!(
        matches!(ack, LinkEvent::SubAck { granted: true, .. }),
        "{ack:?}"
    );
}

async fn received(rx: &mut mpsc::Receiver<LinkEvent>) -> (String, Bytes) {
    match wait_for(rx, "publish", |e| matches!(e, LinkEvent::Publish { .. })).await {
        LinkEvent::Publish { topic, payload, .. } => (topic, payload),
        _ => unreachable!(),
    }
}

/// The first event of a link that must not get in: a failure, never `Connected`.
async fn refused(rx: &mut mpsc::Receiver<LinkEvent>) -> LinkFailure {
    let event = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    match event {
        LinkEvent::Disconnected { error, .. } => error,
        other => panic!("expected a refused connection, got {other:?}"),
    }
}

fn batch(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<_>>()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_carries_a_200_kib_batch_to_a_wildcard_subscriber() {
    let pki = pki();
    let broker = pki.broker();
    let addr = broker.tls_addr();
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    assert_eq!(broker.danger_plaintext_addr(), None);

    let (hub, mut hub_rx) = link(addr, "hub-1", LinkTls::Files(pki.client("hub-1")));
    hub.subscribe(READINGS_FILTER, QoS::AtLeastOnce)
        .await
        .unwrap();
    connected(&mut hub_rx).await;
    subscribed(&mut hub_rx).await;

    let (gw, mut gw_rx) = link(addr, "gw-0001", LinkTls::Files(pki.client("gw-0001")));
    connected(&mut gw_rx).await;
    let payload = batch(200 * 1024, 7);
    gw.publish(
        "citygate/v1/gw-0001/readings",
        QoS::AtLeastOnce,
        payload.clone(),
    )
    .await
    .unwrap();
    wait_for(&mut gw_rx, "puback", |e| {
        matches!(e, LinkEvent::PubAck { .. })
    })
    .await;

    let (topic, got) = received(&mut hub_rx).await;
    assert_eq!(topic, "citygate/v1/gw-0001/readings");
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "payload differs");

    gw.shutdown().await;
    hub.shutdown().await;
    broker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_an_acceptable_certificate_are_refused() {
    let pki = pki();
    let broker = pki.broker();
    let addr = broker.tls_addr();

    // Trusts the broker but presents no certificate.
    let roots = tls::load_roots(pki.ca.ca_file()).unwrap();
    let no_cert = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (anon, mut anon_rx) = link(addr, "anon", LinkTls::Config(Arc::new(no_cert)));
    let failure = refused(&mut anon_rx).await;
    assert!(failure.is_tls(), "{failure}");

    // Trusts the broker, presents a certificate from another CA.
    let rogue = pki.other_ca.issue_client("gw-rogue").unwrap();
    let files = TlsClientFiles {
        ca: pki.ca.ca_file().to_owned(),
        cert: rogue.cert,
        key: rogue.key,
    };
    let (rogue, mut rogue_rx) = link(addr, "gw-rogue", LinkTls::Files(files));
    let failure = refused(&mut rogue_rx).await;
    assert!(failure.is_tls(), "{failure}");

    // The broker still serves good clients afterwards.
    let (good, mut good_rx) = link(addr, "gw-good", LinkTls::Files(pki.client("gw-good")));
    connected(&mut good_rx).await;

    drop((anon, rogue));
    good.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_broker_ca_fails_with_a_tls_error() {
    let pki = pki();
    let broker = pki.broker();
    let mut files = pki.client("gw-0002");
    files.ca = pki.other_ca.ca_file().to_owned();
    let (_gw, mut gw_rx) = link(broker.tls_addr(), "gw-0002", LinkTls::Files(files));
    let failure = refused(&mut gw_rx).await;
    match &failure {
        LinkFailure::Tls(detail) => assert!(detail.contains("UnknownIssuer"), "{detail}"),
        other => panic!("expected a TLS failure, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_reconnect_resubscribe_and_publish_after_a_broker_restart() {
    let pki = pki();
    let broker = pki.broker();
    let addr = broker.tls_addr();
    let (hub, mut hub_rx) = link(addr, "hub-1", LinkTls::Files(pki.client("hub-1")));
    hub.subscribe(READINGS_FILTER, QoS::AtLeastOnce)
        .await
        .unwrap();
    connected(&mut hub_rx).await;
    subscribed(&mut hub_rx).await;
    let (gw, mut gw_rx) = link(addr, "gw-0003", LinkTls::Files(pki.client("gw-0003")));
    connected(&mut gw_rx).await;
    gw.publish(
        "citygate/v1/gw-0003/readings",
        QoS::AtLeastOnce,
        batch(1000, 1),
    )
    .await
    .unwrap();
    assert_eq!(received(&mut hub_rx).await.1, batch(1000, 1));

    broker.shutdown();
    for rx in [&mut hub_rx, &mut gw_rx] {
        wait_for(rx, "disconnected", |e| {
            matches!(e, LinkEvent::Disconnected { .. })
        })
        .await;
    }

    // Same port, a new broker process-wide state: no sessions survive.
    let mut opts = BrokerOptions::localhost(pki.ca.server_files(&pki.server));
    opts.listen = addr;
    let broker = EmbeddedBroker::start(opts).unwrap();
    assert_eq!(broker.tls_addr(), addr);

    for rx in [&mut hub_rx, &mut gw_rx] {
        let event = wait_for(rx, "reconnected", |e| {
            matches!(e, LinkEvent::Connected { .. })
        })
        .await;
        assert_eq!(
            event,
            LinkEvent::Connected {
                session_present: false
            }
        );
    }
    subscribed(&mut hub_rx).await; // re-issued by the link, not by the test
    gw.publish(
        "citygate/v1/gw-0003/readings",
        QoS::AtLeastOnce,
        batch(2000, 2),
    )
    .await
    .unwrap();
    assert_eq!(received(&mut hub_rx).await.1, batch(2000, 2));

    gw.shutdown().await;
    hub.shutdown().await;
    broker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_delivers_each_batch_to_one_hub() {
    const SHARED: &str = "$share/hubs/citygate/v1/+/readings";
    const BATCHES: u8 = 6;
    let pki = pki();
    let broker = pki.broker();
    let addr = broker.tls_addr();
    let (hub_a, mut a_rx) = link(addr, "hub-a", LinkTls::Files(pki.client("hub-a")));
    let (hub_b, mut b_rx) = link(addr, "hub-b", LinkTls::Files(pki.client("hub-b")));
    for (hub, rx) in [(&hub_a, &mut a_rx), (&hub_b, &mut b_rx)] {
        hub.subscribe(SHARED, QoS::AtLeastOnce).await.unwrap();
        connected(rx).await;
        subscribed(rx).await;
    }
    let (gw, mut gw_rx) = link(addr, "gw-0004", LinkTls::Files(pki.client("gw-0004")));
    connected(&mut gw_rx).await;
    for seq in 0..BATCHES {
        gw.publish(
            "citygate/v1/gw-0004/readings",
            QoS::AtLeastOnce,
            batch(64, seq),
        )
        .await
        .unwrap();
    }

    let mut seen = Vec::new();
    let (mut to_a, mut to_b) = (0, 0);
    timeout(WAIT, async {
        while seen.len() < usize::from(BATCHES) {
            let (event, from_a) = tokio::select! {
                event = a_rx.recv() => (event, true),
                event = b_rx.recv() => (event, false),
            };
            // Other events (e.g. the SUBACK of the link's own re-subscription) are skipped.
            let Some(LinkEvent::Publish { payload, .. }) = event else {
                continue;
            };
            if from_a {
                to_a += 1;
            } else {
                to_b += 1;
            }
            assert!(!seen.contains(&payload), "a batch was delivered twice");
            seen.push(payload);
        }
    })
    .await
    .expect("timed out waiting for shared-subscription deliveries");
    assert!(to_a > 0 && to_b > 0, "round robin: a={to_a} b={to_b}");

    gw.shutdown().await;
    hub_a.shutdown().await;
    hub_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_exists_only_under_danger_plaintext() {
    let pki = pki();
    let mut opts = BrokerOptions::localhost(pki.ca.server_files(&pki.server));
    opts.danger_plaintext_listen = Some("127.0.0.1:0".parse().unwrap());
    let broker = EmbeddedBroker::start(opts).unwrap();
    let plain = broker.danger_plaintext_addr().unwrap();
    assert_ne!(plain, broker.tls_addr());
    let (dev, mut dev_rx) = link(plain, "dev", LinkTls::DangerPlaintext);
    connected(&mut dev_rx).await;
    dev.shutdown().await;

    // A plaintext client on the TLS port gets nowhere.
    let (_dev, mut dev_rx) = link(broker.tls_addr(), "dev2", LinkTls::DangerPlaintext);
    refused(&mut dev_rx).await;
}

#[cfg(unix)]
#[test]
fn a_broker_key_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let pki = pki();
    std::fs::set_permissions(&pki.server.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = EmbeddedBroker::start(BrokerOptions::localhost(pki.ca.server_files(&pki.server)))
        .unwrap_err();
    assert!(
        matches!(
            err,
            BrokerError::Tls(TlsError::KeyPermissions { mode: 0o644, .. })
        ),
        "{err}"
    );
}

#[test]
fn a_taken_fixed_port_is_a_bind_error() {
    let pki = pki();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut opts = BrokerOptions::localhost(pki.ca.server_files(&pki.server));
    opts.listen = taken.local_addr().unwrap();
    let err = EmbeddedBroker::start(opts).unwrap_err();
    assert!(matches!(err, BrokerError::Bind { .. }), "{err}");
}

/// The rustls 0.23 configurations on both ends of a plain TLS connection: TLS 1.3,
/// ChaCha20-Poly1305 negotiated, client certificate required.
#[tokio::test]
async fn server_config_requires_client_certificates_and_prefers_chacha20() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    let pki = pki();
    let server = tls::server_config(&pki.ca.server_files(&pki.server)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server);
    let server_task = tokio::spawn(async move {
        let mut results = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.unwrap();
            let result = async {
                let mut stream = acceptor.accept(tcp).await?;
                let mut buf = [0u8; 4];
                stream.read_exact(&mut buf).await?;
                stream.write_all(&buf).await?;
                stream.shutdown().await?;
                Ok::<_, std::io::Error>(stream.get_ref().1.negotiated_cipher_suite())
            }
            .await;
            results.push(result.map(|suite| suite.map(|s| s.suite())));
        }
        results
    });

    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let client = tls::client_config(&pki.client("gw-0005")).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut stream = TlsConnector::from(client)
        .connect(name.clone(), tcp)
        .await
        .unwrap();
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    stream.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");

    let roots = tls::load_roots(pki.ca.ca_file()).unwrap();
    let anonymous = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    // TLS 1.3: the client finishes its handshake before the server judges its certificate;
    // the refusal arrives on the first read.
    if let Ok(mut stream) = TlsConnector::from(Arc::new(anonymous))
        .connect(name, tcp)
        .await
    {
        let _ = stream.write_all(b"ping").await;
        let mut buf = [0u8; 4];
        assert!(stream.read_exact(&mut buf).await.is_err());
    }

    let results = timeout(WAIT, server_task).await.unwrap().unwrap();
    assert_eq!(
        results[0].as_ref().unwrap(),
        &Some(rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256)
    );
    assert!(results[1].is_err(), "anonymous client accepted");
}

/// issue 9 item 9: an idle TCP connection, a half-sent ClientHello and a finished TLS
/// handshake without CONNECT do not keep a new client out (rumqttd 0.20 did handshakes one at
/// a time in its accept loop, without a timeout), and the broker closes them after its
/// connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_and_half_handshakes_do_not_block_the_embedded_broker() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let pki = pki();
    let mut opts = BrokerOptions::localhost(pki.ca.server_files(&pki.server));
    opts.connect_timeout = Duration::from_secs(3);
    let broker = EmbeddedBroker::start(opts).unwrap();
    let addr = broker.tls_addr();
    let idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    // A TLS record header announcing a 512-byte ClientHello, then only its first bytes.
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let client = tls::client_config(&pki.client("gw-0007")).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut silent = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await
        .unwrap();

    let (gw, mut gw_rx) = link(addr, "gw-0006", LinkTls::Files(pki.client("gw-0006")));
    connected(&mut gw_rx).await;
    // The client got in while all three were still open.
    let mut probe = [0u8; 1];
    assert!(
        matches!(idle.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    );
    assert!(
        matches!(half.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    );
    gw.shutdown().await;

    // After the connect timeout the broker closes them.
    let closed = |n: std::io::Result<usize>| matches!(n, Ok(0) | Err(_));
    let mut idle = idle;
    assert!(closed(timeout(WAIT, idle.read(&mut probe)).await.unwrap()));
    assert!(closed(timeout(WAIT, half.read(&mut probe)).await.unwrap()));
    assert!(closed(
        timeout(WAIT, silent.read(&mut probe)).await.unwrap()
    ));
    // Counted just after the socket closes: poll, bounded.
    let counted = timeout(WAIT, async {
        while broker.stats().handshakes_failed < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(counted.is_ok(), "{:?}", broker.stats());
}

/// A broker with access rules: hub `hub-1`, gateways `gw1` and `gw2`.
fn ruled_broker(pki: &Pki) -> EmbeddedBroker {
    let mut opts = BrokerOptions::localhost(pki.ca.server_files(&pki.server));
    opts.access = Some(BrokerAccess {
        hubs: ["hub-1".to_owned()].into(),
        gateways: ["gw1".to_owned(), "gw2".to_owned()].into(),
    });
    EmbeddedBroker::start(opts).unwrap()
}

/// issue 9 item 1 (the embedded broker's part): a certificate that is not the hub's cannot
/// publish an ack for gw1 (its connection is closed, nothing reaches gw1), nor read gw1's
/// batches; the hub's ack does reach gw1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_ack_through_the_embedded_broker_never_reaches_the_gateway() {
    let pki = pki();
    let broker = ruled_broker(&pki);
    let addr = broker.tls_addr();
    let ack = "citygate/v1/gw1/ack";
    let (gw, mut gw_rx) = link(addr, "gw1", LinkTls::Files(pki.client("gw1")));
    connected(&mut gw_rx).await;
    gw.subscribe(ack, QoS::AtLeastOnce).await.unwrap();
    subscribed(&mut gw_rx).await;

    for forger in ["sim-1", "gw2"] {
        let (rogue, mut rogue_rx) = link(addr, forger, LinkTls::Files(pki.client(forger)));
        connected(&mut rogue_rx).await;
        rogue
            .publish(ack, QoS::AtMostOnce, Bytes::from_static(b"forged"))
            .await
            .unwrap();
        wait_for(&mut rogue_rx, "the forger's disconnection", |e| {
            matches!(e, LinkEvent::Disconnected { .. })
        })
        .await;
        rogue.shutdown().await;
    }
    let (spy, mut spy_rx) = link(addr, "sim-2", LinkTls::Files(pki.client("sim-2")));
    connected(&mut spy_rx).await;
    spy.subscribe("citygate/v1/gw1/readings", QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_for(&mut spy_rx, "the spy's disconnection", |e| {
        matches!(e, LinkEvent::Disconnected { .. })
    })
    .await;
    spy.shutdown().await;
    // (At least: a link may repeat its subscription when it reconnects.)
    assert!(broker.stats().packets_denied >= 3, "{:?}", broker.stats());

    let (hub, mut hub_rx) = link(addr, "hub-1", LinkTls::Files(pki.client("hub-1")));
    connected(&mut hub_rx).await;
    hub.publish(ack, QoS::AtLeastOnce, Bytes::from_static(b"genuine"))
        .await
        .unwrap();
    let (topic, payload) = received(&mut gw_rx).await;
    assert_eq!((topic.as_str(), &payload[..]), (ack, &b"genuine"[..]));
    hub.shutdown().await;
    gw.shutdown().await;
}

/// issue 9 item 1 (the embedded broker's part): a client whose certificate is not gw1's
/// connecting as `gw1` gets a session of its own: the real gateway stays connected and
/// subscribed, and the impostor cannot read gw1's acks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_certificate_cannot_take_over_a_gateways_client_id() {
    let pki = pki();
    let broker = ruled_broker(&pki);
    let addr = broker.tls_addr();
    let (gw, mut gw_rx) = link(addr, "gw1", LinkTls::Files(pki.client("gw1")));
    connected(&mut gw_rx).await;
    gw.subscribe("citygate/v1/gw1/ack", QoS::AtLeastOnce)
        .await
        .unwrap();
    subscribed(&mut gw_rx).await;

    let (thief, mut thief_rx) = link(addr, "gw1", LinkTls::Files(pki.client("sim-1")));
    connected(&mut thief_rx).await;
    thief
        .subscribe("citygate/v1/gw1/ack", QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_for(&mut thief_rx, "the impostor's disconnection", |e| {
        matches!(e, LinkEvent::Disconnected { .. })
    })
    .await;
    thief.shutdown().await;
    assert!(broker.stats().packets_denied >= 1, "{:?}", broker.stats());

    // The real gw1 is still connected and subscribed: the hub's ack reaches it.
    let (hub, mut hub_rx) = link(addr, "hub-1", LinkTls::Files(pki.client("hub-1")));
    connected(&mut hub_rx).await;
    hub.publish(
        "citygate/v1/gw1/ack",
        QoS::AtLeastOnce,
        Bytes::from_static(b"a"),
    )
    .await
    .unwrap();
    let event = wait_for(&mut gw_rx, "the ack or a disconnection", |e| {
        matches!(
            e,
            LinkEvent::Publish { .. } | LinkEvent::Disconnected { .. }
        )
    })
    .await;
    assert!(
        matches!(&event, LinkEvent::Publish { payload, .. } if &payload[..] == b"a"),
        "gw1 lost its session: {event:?}"
    );
    hub.shutdown().await;
    gw.shutdown().await;
}

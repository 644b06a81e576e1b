//! Issue 10 item 2, fast recovery: a hub announces itself (retained presence with a last
//! will) once its subscriptions are granted, and gateways re-send their unacknowledged
//! batches the moment a hub comes online instead of after `ack_timeout`; both ends
//! reconnect after a broker restart and deliver everything once. Every gateway here has an
//! `ack_timeout` of an hour, so only a reconnect or a hub's presence can make it re-send.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use citygate::mqtt::{
    BrokerAccess, BrokerOptions, CertAuthority, CertKeyFiles, EmbeddedBroker, LinkEvent, LinkTls,
    MqttLink, QoS,
};
use citygate::store::Store;
use citygate::supervisor::{self, Running};
use citygate::wire::{presence_filter, presence_topic, Presence};
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(30);
/// Long enough that no test here can see a timer-driven re-send.
const NO_ACK_TIMEOUT: Duration = Duration::from_secs(3600);

/// A broker with the deployment's access rules: hub `hub-1`, gateway `gw-test`.
fn ruled_broker(
    ca: &CertAuthority,
    server: &CertKeyFiles,
    listen: Option<SocketAddr>,
) -> EmbeddedBroker {
    let mut opts = BrokerOptions::localhost(ca.server_files(server));
    if let Some(addr) = listen {
        opts.listen = addr;
    }
    opts.access = Some(BrokerAccess {
        hubs: ["hub-1".to_owned()].into(),
        gateways: ["gw-test".to_owned()].into(),
    });
    EmbeddedBroker::start(opts).unwrap()
}

/// A gateway polling two simulated meters every 100 ms into a sled store.
struct Gateway {
    running: Running,
    store: Arc<dyn Store>,
    token: CancellationToken,
}

async fn gateway(dep: &Deployment) -> (Gateway, citygate::config::GatewayConfig) {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 2, 47, &token).await;
    let devices: String = (1..=2u8)
        .map(|u| device_toml(&format!("m{u}"), "chint-ddsu666", &sim.address, u, "100ms"))
        .collect();
    let cfg = dep.config(&["active_power", "energy_import"], &devices, profiles);
    let (store, running) = start_gateway(&cfg);
    (
        Gateway {
            running,
            store,
            token,
        },
        cfg,
    )
}

/// Stops polling (the open batch is sealed and committed), waits for the store to drain
/// and checks the hub wrote every sealed batch and record exactly once.
async fn drain_and_check(
    gw: Gateway,
    uplink: supervisor::UplinkHandle,
    hub: &citygate::hub::HubProcess,
) {
    let metrics = gw.running.metrics.clone();
    assert!(gw.running.shutdown(Duration::from_secs(10)).await);
    let drained = wait_for(WAIT, || gw.store.stats().total_batches() == 0).await;
    assert!(
        drained,
        "store did not drain: {:?}, link {:?}, hub {:?}",
        gw.store.stats(),
        metrics.link(),
        hub.hub().stats()
    );
    uplink.finish(Duration::ZERO).await;
    gw.token.cancel();
    let stats = hub.hub().stats();
    assert_eq!(
        stats.accepted_batches,
        metrics.batches_sealed.get(),
        "{stats:?}"
    );
    assert_eq!(
        stats.records_written,
        metrics.records_sealed.get(),
        "{stats:?}"
    );
}

/// issue 10 item 2: batches published while no hub was subscribed (the broker dropped
/// them) are all delivered once the hub starts, although the gateway's ack timeout is an
/// hour: the hub's presence triggers the re-send. Fails without presence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_sent_before_any_hub_subscribed_are_delivered_when_a_hub_comes_online() {
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let server = ca.issue_localhost_server().unwrap();
    let broker = ruled_broker(&ca, &server, None);
    let port = broker.tls_addr().port();
    let (gw, cfg) = gateway(&dep).await;
    let metrics = gw.running.metrics.clone();
    let uplink = start_uplink(&cfg, &gw.running, &ca, port, 16, NO_ACK_TIMEOUT).await;
    assert!(
        wait_for(WAIT, || metrics.batches_sent.get() >= 4).await,
        "the gateway published nothing"
    );
    assert_eq!(metrics.batches_acked.get(), 0, "acked without a hub");
    assert!(metrics.link().hubs.is_empty(), "{:?}", metrics.link());

    let hub = start_hub(dep.path(), &ca, port, &cfg).await;
    let online = wait_for(WAIT, || {
        metrics.link().hubs.get("hub-1").is_some_and(|h| h.online)
    })
    .await;
    assert!(
        online,
        "the gateway never saw the hub online: {:?}",
        metrics.link()
    );
    drain_and_check(gw, uplink, &hub).await;
    assert!(metrics.presence_resends.get() >= 1);
    assert!(metrics.hub_sessions.get() >= 1);
    hub.shutdown().await;
    broker.shutdown();
}

/// issue 10 item 2: the broker stops while gateway and hub are connected, the gateway
/// keeps committing, the broker comes back on the same port (with no sessions and no
/// retained messages): both reconnect, the hub announces a new session, and every batch
/// is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_both_ends_reconnect_and_everything_arrives_once() {
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let server = ca.issue_localhost_server().unwrap();
    let broker = ruled_broker(&ca, &server, None);
    let addr = broker.tls_addr();
    let (gw, cfg) = gateway(&dep).await;
    let hub = start_hub(dep.path(), &ca, addr.port(), &cfg).await;
    let metrics = gw.running.metrics.clone();
    let uplink = start_uplink(&cfg, &gw.running, &ca, addr.port(), 16, NO_ACK_TIMEOUT).await;
    assert!(
        wait_for(WAIT, || metrics.batches_acked.get() >= 3).await,
        "nothing acknowledged before the outage: {:?}",
        metrics.link()
    );
    let first_session = metrics.link().hubs["hub-1"].session.clone();

    broker.shutdown();
    let mut subscribed = hub.subscribed();
    let down = wait_for(WAIT, || !metrics.link().connected && !*subscribed.borrow()).await;
    assert!(down, "the links did not notice the outage");
    // A backlog builds up while the broker is away.
    let backlog = metrics.batches_committed.get() + 5;
    assert!(
        wait_for(WAIT, || metrics.batches_committed.get() >= backlog).await,
        "nothing committed during the outage"
    );

    let broker = ruled_broker(&ca, &server, Some(addr));
    tokio::time::timeout(WAIT, subscribed.wait_for(|s| *s))
        .await
        .expect("hub subscribed again")
        .unwrap();
    let new_session = wait_for(WAIT, || {
        let link = metrics.link();
        link.connected
            && link
                .hubs
                .get("hub-1")
                .is_some_and(|h| h.online && h.session != first_session)
    })
    .await;
    assert!(
        new_session,
        "the gateway never saw the hub's new session: {:?}",
        metrics.link()
    );
    drain_and_check(gw, uplink, &hub).await;
    assert!(metrics.link().connects >= 2);
    hub.shutdown().await;
    broker.shutdown();
}

/// issue 10 item 2, access: on the embedded broker with the deployment's rules a gateway
/// certificate cannot publish presence (its connection is closed, nothing reaches the other
/// gateway), while the hub's presence, retained, reaches a gateway that subscribes later,
/// and its last will says `offline` when its connection breaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_hub_may_publish_presence_and_its_last_will_says_offline() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertAuthority::generate(dir.path(), "citygate test ca").unwrap();
    let server = ca.issue_localhost_server().unwrap();
    let mut opts = BrokerOptions::localhost(ca.server_files(&server));
    opts.access = Some(BrokerAccess {
        hubs: ["hub-1".to_owned()].into(),
        gateways: ["gw1".to_owned(), "gw2".to_owned()].into(),
    });
    let broker = EmbeddedBroker::start(opts).unwrap();
    let port = broker.tls_addr().port();
    let tls = |name: &str| LinkTls::Files(ca.client_files(&ca.issue_client(name).unwrap()));
    let topic = presence_topic("hub-1");
    let online = Presence {
        hub: "hub-1".into(),
        online: Some(7),
    };

    // gw1 listens; gw2 tries to announce a hub.
    let (gw1, mut gw1_rx) = MqttLink::start(test_link_options(port, "gw1", tls("gw1"))).unwrap();
    gw1.subscribe(&presence_filter(), QoS::AtLeastOnce)
        .await
        .unwrap();
    next_event(&mut gw1_rx, |e| {
        matches!(e, LinkEvent::SubAck { granted: true, .. })
    })
    .await;
    let (gw2, mut gw2_rx) = MqttLink::start(test_link_options(port, "gw2", tls("gw2"))).unwrap();
    next_event(&mut gw2_rx, |e| matches!(e, LinkEvent::Connected { .. })).await;
    gw2.publish_retained(&topic, QoS::AtLeastOnce, Bytes::from(online.encode()))
        .await
        .unwrap();
    next_event(&mut gw2_rx, |e| matches!(e, LinkEvent::Disconnected { .. })).await;
    gw2.shutdown().await;
    assert!(broker.stats().packets_denied >= 1, "{:?}", broker.stats());

    // The hub announces itself with a last will, then its connection breaks.
    let mut hub_opts = test_link_options(port, "hub-1", tls("hub-1"));
    let offline = Presence {
        hub: "hub-1".into(),
        online: None,
    };
    hub_opts.last_will = Some((topic.clone(), Bytes::from(offline.encode())));
    let (hub, mut hub_rx) = MqttLink::start(hub_opts).unwrap();
    next_event(&mut hub_rx, |e| matches!(e, LinkEvent::Connected { .. })).await;
    hub.publish_retained(&topic, QoS::AtLeastOnce, Bytes::from(online.encode()))
        .await
        .unwrap();
    let (got, payload, retain) = next_publish(&mut gw1_rx).await;
    assert_eq!((got.as_str(), retain), (topic.as_str(), false));
    assert_eq!(
        Presence::decode("hub-1", &payload).unwrap(),
        online,
        "gw2's presence reached gw1"
    );

    // A gateway subscribing later gets it retained.
    let (late, mut late_rx) = MqttLink::start(test_link_options(port, "gw2", tls("gw2"))).unwrap();
    late.subscribe(&presence_filter(), QoS::AtLeastOnce)
        .await
        .unwrap();
    let (_, payload, retain) = next_publish(&mut late_rx).await;
    assert!(
        retain,
        "a presence delivered on subscription is marked retained"
    );
    assert_eq!(Presence::decode("hub-1", &payload).unwrap(), online);

    drop(hub); // aborts the link: no DISCONNECT, so the broker publishes the will
    let (_, payload, _) = next_publish(&mut gw1_rx).await;
    assert_eq!(Presence::decode("hub-1", &payload).unwrap(), offline);
    gw1.shutdown().await;
    late.shutdown().await;
    broker.shutdown();
}

async fn next_event(
    rx: &mut tokio::sync::mpsc::Receiver<LinkEvent>,
    want: impl Fn(&LinkEvent) -> bool,
) -> LinkEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            let e = rx.recv().await.expect("link running");
            if want(&e) {
                return e;
            }
        }
    })
    .await
    .expect("event within the wait")
}

async fn next_publish(rx: &mut tokio::sync::mpsc::Receiver<LinkEvent>) -> (String, Bytes, bool) {
    match next_event(rx, |e| matches!(e, LinkEvent::Publish { .. })).await {
        LinkEvent::Publish {
            topic,
            payload,
            retain,
        } => (topic, payload, retain),
        _ => unreachable!(),
    }
}

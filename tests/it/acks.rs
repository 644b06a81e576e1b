//! Issue 9 item 1: only acks the hub signed delete anything. Forged acks published through a
//! real broker (mutual TLS, a certificate from the deployment's CA) for every batch the gateway
//! has sent — unsigned version 1 acks, and version 2 acks signed with a key that is not the
//! hub's — delete nothing; once the real hub is up, every record arrives exactly once.

use std::time::Duration;

use bytes::Bytes;
use citygate::mqtt::{BrokerOptions, CertAuthority, EmbeddedBroker, LinkEvent, LinkTls, MqttLink};
use citygate::reading::{GatewayId, Stream};
use citygate::wire::{ack_topic, Ack, AckSigner};
use rumqttc::QoS;
use tokio_util::sync::CancellationToken;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_acks_through_the_broker_delete_nothing_and_the_hub_gets_everything() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 2, 31, &token).await;
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let server = ca.issue_localhost_server().unwrap();
    let broker = EmbeddedBroker::start(BrokerOptions::localhost(ca.server_files(&server))).unwrap();
    let port = broker.tls_addr().port();

    // The gateway runs; no hub yet.
    let devices: String = (1..=2u8)
        .map(|u| device_toml(&format!("m{u}"), "chint-ddsu666", &sim.address, u, "100ms"))
        .collect();
    let cfg = dep.config(&["active_power", "energy_import"], &devices, profiles);
    let (store, running) = start_gateway(&cfg);
    let metrics = running.metrics.clone();
    let incarnation = store.incarnation();
    let uplink = start_uplink(&cfg, &running, &ca, port, 8, Duration::from_secs(2)).await;
    assert!(
        wait_for(Duration::from_secs(20), || metrics.batches_sent.get() >= 4).await,
        "the gateway published nothing"
    );

    // A certificate holder the broker lets publish acks (here: one with the hub's client
    // name, as a second hub box or a stolen hub certificate would be) forges acks for every
    // sequence number sent so far, in both forms.
    let tls = LinkTls::Files(ca.client_files(&ca.issue_client("hub-1").unwrap()));
    let (forger, mut events) = MqttLink::start(test_link_options(port, "forger", tls)).unwrap();
    let connected = wait_for_event(&mut events, |e| matches!(e, LinkEvent::Connected { .. })).await;
    assert!(connected, "the forger never connected");
    let gw = GatewayId::new("gw-test").unwrap();
    let rogue = AckSigner::new(ed25519_dalek::SigningKey::from_bytes(&[0x66; 32]));
    let last_sent = store.stats().get(Stream::Readings).batches + 8;
    let forged_count = 2 * last_sent;
    for seq in 1..=last_sent {
        let v1 = format!(r#"{{"v":1,"gateway":"gw-test","stream":"readings","seq":{seq}}}"#);
        let v2 = rogue.encode(&Ack {
            gateway: gw.clone(),
            stream: Stream::Readings,
            incarnation,
            seq,
        });
        for payload in [v1.into_bytes(), v2] {
            forger
                .publish(&ack_topic(&gw), QoS::AtLeastOnce, Bytes::from(payload))
                .await
                .unwrap();
        }
    }
    assert!(
        wait_for(Duration::from_secs(20), || metrics
            .acks_unauthenticated
            .get()
            >= forged_count)
        .await,
        "the gateway saw {} of {forged_count} forged acks",
        metrics.acks_unauthenticated.get()
    );
    assert_eq!(
        metrics.batches_acked.get(),
        0,
        "a forged ack deleted a batch"
    );
    forger.shutdown().await;

    // The real hub comes up: everything the gateway sealed arrives, once.
    let hub = start_hub(dep.path(), &ca, port, &cfg).await;
    assert!(running.shutdown(Duration::from_secs(10)).await);
    assert!(
        wait_for(Duration::from_secs(30), || store.stats().total_batches()
            == 0)
        .await,
        "store did not drain: {:?} hub {:?}",
        store.stats(),
        hub.hub().stats()
    );
    uplink.finish(Duration::ZERO).await;
    token.cancel();
    let stats = hub.hub().stats();
    hub.shutdown().await;
    broker.shutdown();
    assert_eq!(stats.records_written, metrics.records_sealed.get());
    assert_eq!(stats.accepted_batches, metrics.batches_sealed.get());
    assert_eq!(metrics.acks_unauthenticated.get(), forged_count);
}

async fn wait_for_event(
    events: &mut tokio::sync::mpsc::Receiver<LinkEvent>,
    want: impl Fn(&LinkEvent) -> bool,
) -> bool {
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = events.recv().await {
            if want(&e) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}

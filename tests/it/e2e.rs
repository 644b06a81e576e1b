//! End to end over real TLS on loopback: simulated meters → gateway → MQTT (embedded
//! broker, mutual TLS) → hub (verify, decrypt, de-duplicate, JSON Lines) → acks → the
//! gateway's store drains. Includes a broker outage in the middle.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use citygate::mqtt::{BrokerOptions, CertAuthority, EmbeddedBroker};
use citygate::reading::Stream;
use citygate::store::{SledStore, Store, StoreOptions};
use tokio_util::sync::CancellationToken;

use crate::support::*;

fn sink_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meters_to_hub_sink_over_tls_with_a_broker_outage() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 3, 11, &token).await;
    let dep = Deployment::new();
    let pki_dir = dep.path().join("pki");
    let ca = CertAuthority::generate(&pki_dir, "citygate test ca").unwrap();
    let server = ca.issue_localhost_server().unwrap();
    let broker = EmbeddedBroker::start(BrokerOptions::localhost(ca.server_files(&server))).unwrap();
    let port = broker.tls_addr().port();

    // Gateway config, and the hub approving its policy.
    let devices: String = (1..=3u8)
        .map(|u| device_toml(&format!("m{u}"), "chint-ddsu666", &sim.address, u, "200ms"))
        .collect();
    let cfg = dep.config(&["active_power", "energy_import"], &devices, profiles);
    let hub = start_hub(dep.path(), &ca, port, &cfg).await;
    let (store, running) = start_gateway(&cfg);
    let metrics = running.metrics.clone();
    let uplink = start_uplink(&cfg, &running, &ca, port, 8, Duration::from_secs(3)).await;

    assert!(
        wait_for(Duration::from_secs(20), || metrics.batches_acked.get() >= 3).await,
        "no acks before the outage: {:?}",
        hub.hub().stats()
    );
    // Outage: the broker goes away, batches pile up in the store, then it comes back.
    broker.shutdown();
    let acked_before = metrics.batches_acked.get();
    assert!(
        wait_for(Duration::from_secs(10), || store
            .stats()
            .get(Stream::Readings)
            .batches
            >= 4)
        .await,
        "batches did not pile up in the store during the outage"
    );
    let buffered = store.stats().get(Stream::Readings).batches;
    let mut opts = BrokerOptions::localhost(ca.server_files(&server));
    opts.listen.set_port(port);
    let broker = EmbeddedBroker::start(opts).unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || metrics.batches_acked.get()
            >= acked_before + buffered)
        .await,
        "backlog of {buffered} did not drain: acked {} → {}",
        acked_before,
        metrics.batches_acked.get()
    );

    // Stop polling; let the uplink deliver the last batches, then stop everything.
    assert!(running.shutdown(Duration::from_secs(10)).await);
    assert!(
        wait_for(Duration::from_secs(20), || store.stats().total_batches()
            == 0)
        .await,
        "store did not drain: {:?}",
        store.stats()
    );
    uplink.finish(Duration::ZERO).await;
    token.cancel();
    let stats = hub.hub().stats();
    hub.shutdown().await;
    broker.shutdown();

    let lines = sink_lines(&dep.path().join("records.jsonl"));
    assert_eq!(
        lines.len() as u64,
        metrics.records_sealed.get(),
        "every sealed record written exactly once"
    );
    let mut seen = HashSet::new();
    for l in &lines {
        let key = (
            l["stream"].to_string(),
            l["seq"].to_string(),
            l["subject"].to_string(),
            l["field"].to_string(),
            l["at_ms"].to_string(),
        );
        assert!(seen.insert(key), "duplicate record in the sink: {l}");
        assert_eq!(l["gateway"], "gw-test");
        assert!(l["field"] == "active_power" || l["field"] == "energy_import");
    }
    assert_eq!(stats.records_written, metrics.records_sealed.get());
    assert!(stats.rejected.values().all(|n| *n == 0), "{stats:?}");
}

/// The real `citygate run` forwards over TLS; SIGKILLed while batches are in flight and
/// restarted, nothing committed is lost and nothing is written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_process_killed_mid_flight_loses_and_duplicates_nothing() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 3, 12, &token).await;
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let server = ca.issue_localhost_server().unwrap();
    let broker = EmbeddedBroker::start(BrokerOptions::localhost(ca.server_files(&server))).unwrap();
    let port = broker.tls_addr().port();
    let devices: String = (1..=3u8)
        .map(|u| device_toml(&format!("m{u}"), "chint-ddsu666", &sim.address, u, "200ms"))
        .collect();
    let config = GatewayToml::new("gw-test", &["active_power", "energy_import"])
        .shipped_profiles()
        .uplink(
            port,
            &TlsFiles::client(&ca, "gw-test"),
            "ack_timeout = \"2s\"",
        )
        .status()
        .devices(&devices)
        .write(dep.path());
    let hub = start_hub(
        dep.path(),
        &ca,
        port,
        &citygate::config::GatewayConfig::load(&config).unwrap(),
    )
    .await;

    let mut first = spawn_run(&config);
    assert!(
        wait_for(Duration::from_secs(20), || hub
            .hub()
            .stats()
            .accepted_batches
            >= 3)
        .await,
        "{:?}",
        hub.hub().stats()
    );
    signal(&first, "-KILL");
    assert!(!wait_exit(&mut first, Duration::from_secs(10))
        .await
        .success());
    let after_kill = hub.hub().stats().accepted_batches;

    let mut second = spawn_run(&config);
    assert!(
        wait_for(Duration::from_secs(20), || hub
            .hub()
            .stats()
            .accepted_batches
            >= after_kill + 3)
        .await,
        "{:?}",
        hub.hub().stats()
    );
    // The operator sees the link up and acks arriving on the status endpoint.
    let addr = citygate::status::read_address_file(&dep.path().join("store")).unwrap();
    let (code, body) = citygate::telemetry::http::get(addr, "/status", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(code, 200);
    let st: citygate::status::GatewayStatus = serde_json::from_str(&body).unwrap();
    assert!(st.link.configured && st.link.connected, "{:?}", st.link);
    assert_eq!(
        st.link.broker.as_deref(),
        Some(format!("localhost:{port}").as_str())
    );
    assert!(
        st.link.last_ack_ms.is_some() && st.link.connects >= 1,
        "{:?}",
        st.link
    );
    assert!(st.counters["batches_acked"] >= 1, "{:?}", st.counters);

    signal(&second, "-TERM");
    let status = wait_exit(&mut second, Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    token.cancel();
    let hub_stats = hub.hub().stats();
    hub.shutdown().await;
    broker.shutdown();

    // Everything the gateway committed was acknowledged (the store is empty) ...
    let store = SledStore::open(&dep.path().join("store"), StoreOptions::default()).unwrap();
    assert_eq!(store.stats().total_batches(), 0, "{:?}", store.stats());
    // ... written once, and no committed batch is missing from the hub's sink.
    let lines = sink_lines(&dep.path().join("records.jsonl"));
    let mut records = HashSet::new();
    let mut seqs = std::collections::BTreeSet::new();
    for l in &lines {
        let key = (
            l["seq"].to_string(),
            l["subject"].to_string(),
            l["field"].to_string(),
            l["at_ms"].to_string(),
        );
        assert!(records.insert(key), "duplicate record in the sink: {l}");
        seqs.insert(l["seq"].as_u64().unwrap());
    }
    let seqs: Vec<u64> = seqs.into_iter().collect();
    for pair in seqs.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "a committed batch never reached the hub: {seqs:?}"
        );
    }
    assert_eq!(
        store.next_seq(citygate::reading::Stream::Readings),
        seqs.last().unwrap() + 1
    );
    assert!(
        hub_stats.rejected.values().all(|n| *n == 0),
        "{:?}",
        hub_stats
    );
}

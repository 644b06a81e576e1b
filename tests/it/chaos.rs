//! Issue 9 acceptance: a CI-sized random-kill run. 50 SIGKILLs of the gateway (`citygate run`)
//! and the hub (`citygate hub`) as separate processes, picked by a seeded generator, with a
//! broker outage every fifth round, while simulated meters are polled. Each round waits (bounded)
//! until the hub's sink has grown, so every fault lands on live traffic. At the end the
//! accounting is total: the gateway's store is empty, the sink holds every readings batch the
//! store ever numbered (seqs 1..next_seq, none missing) and no record twice.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use citygate::mqtt::{BrokerOptions, CertAuthority, EmbeddedBroker};
use citygate::reading::Stream;
use citygate::store::{SledStore, Store, StoreOptions};
use tokio_util::sync::CancellationToken;

use crate::support::*;

const KILLS: usize = 50;
const SEED: u64 = 0x5eed_0009;

/// xorshift64*: reproducible choices without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn sink_len(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("records.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn spawn_hub(config: &Path) -> (Child, LogLines) {
    spawn_logged(&["hub".as_ref(), "--config".as_ref(), config.as_os_str()])
}

fn start_broker(server: &citygate::mqtt::TlsServerFiles, port: u16) -> EmbeddedBroker {
    let mut opts = BrokerOptions::localhost(server.clone());
    opts.listen.set_port(port);
    EmbeddedBroker::start(opts).unwrap()
}

/// The running gateway's `/status`, if it answers.
async fn gateway_status(store_path: &Path) -> Option<citygate::status::GatewayStatus> {
    let addr = citygate::status::read_address_file(store_path)?;
    let (_, body) = citygate::telemetry::http::get(addr, "/status", Duration::from_secs(2))
        .await
        .ok()?;
    serde_json::from_str(&body).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sigkills_of_gateway_and_hub_with_broker_outages_lose_and_duplicate_nothing() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 2, 41, &token).await;
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let server = ca.server_files(&ca.issue_localhost_server().unwrap());
    let mut broker = Some(EmbeddedBroker::start(BrokerOptions::localhost(server.clone())).unwrap());
    let port = broker.as_ref().unwrap().tls_addr().port();

    let devices: String = (1..=2u8)
        .map(|u| device_toml(&format!("m{u}"), "chint-ddsu666", &sim.address, u, "100ms"))
        .collect();
    let gw_config = GatewayToml::new("gw-test", &["active_power", "energy_import"])
        .shipped_profiles()
        .batch("max_age = \"200ms\"")
        .uplink(
            port,
            &TlsFiles::client(&ca, "gw-test"),
            "ack_timeout = \"1s\"",
        )
        .status()
        .devices(&devices)
        .write(dep.path());
    let gw_cfg = citygate::config::GatewayConfig::load(&gw_config).unwrap();
    let hub_config = HubToml::client(port, &TlsFiles::client(&ca, "hub-1"))
        .approve(&policy_stamp(&gw_cfg))
        .write(dep.path());

    let mut hub = spawn_hub(&hub_config);
    let mut gateway = spawn_run(&gw_config);
    let mut rng = Rng(SEED);
    let (mut gateway_kills, mut hub_kills, mut outages) = (0, 0, 0);
    for round in 0..KILLS {
        let before = sink_len(dep.path());
        if round % 5 == 4 {
            // Broker outage: every connection drops; the store buffers.
            broker.take().unwrap().shutdown();
            outages += 1;
            tokio::time::sleep(Duration::from_millis(100 + rng.next() % 400)).await;
            broker = Some(start_broker(&server, port));
        }
        if rng.next() % 2 == 0 {
            signal(&gateway, "-KILL");
            assert!(!wait_exit(&mut gateway, Duration::from_secs(10))
                .await
                .success());
            gateway = spawn_run(&gw_config);
            gateway_kills += 1;
        } else {
            signal(&hub.0, "-KILL");
            assert!(!wait_exit(&mut hub.0, Duration::from_secs(10))
                .await
                .success());
            hub = spawn_hub(&hub_config);
            hub_kills += 1;
        }
        // Traffic flows again before the next fault.
        assert!(
            wait_for(Duration::from_secs(30), || sink_len(dep.path()) > before).await,
            "round {round} (seed {SEED:#x}): the sink stopped growing at {before} lines"
        );
        // Let the next kill land at a random point of the flow.
        tokio::time::sleep(Duration::from_millis(rng.next() % 300)).await;
    }
    assert_eq!(gateway_kills + hub_kills, KILLS);
    assert!(
        gateway_kills >= 10 && hub_kills >= 10,
        "{gateway_kills} / {hub_kills}"
    );

    // Drain: the meters stop, the gateway delivers its backlog and stops cleanly.
    token.cancel();
    let store_path = dep.path().join("store");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let drained = loop {
        if let Some(st) = gateway_status(&store_path).await {
            if st.store.batches.values().all(|n| *n == 0) && st.link.in_flight == 0 {
                break true;
            }
        }
        if tokio::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(drained, "the gateway's backlog did not drain");
    signal(&gateway, "-TERM");
    assert!(wait_exit(&mut gateway, Duration::from_secs(30))
        .await
        .success());
    signal(&hub.0, "-TERM");
    assert!(wait_exit(&mut hub.0, Duration::from_secs(30))
        .await
        .success());
    broker.take().unwrap().shutdown();

    let store = SledStore::open(&store_path, StoreOptions::default()).unwrap();
    assert_eq!(store.stats().total_batches(), 0, "{:?}", store.stats());
    let text = std::fs::read_to_string(dep.path().join("records.jsonl")).unwrap();
    let mut records = HashSet::new();
    let mut seqs = BTreeSet::new();
    let mut incarnations = BTreeSet::new();
    for line in text.lines() {
        let l: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = (
            l["stream"].to_string(),
            l["seq"].to_string(),
            l["subject"].to_string(),
            l["field"].to_string(),
            l["at_ms"].to_string(),
        );
        assert!(records.insert(key), "record written twice: {l}");
        incarnations.insert(l["incarnation"].as_str().unwrap().to_owned());
        if l["stream"] == "readings" {
            seqs.insert(l["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(
        incarnations.len(),
        1,
        "one store, one incarnation: {incarnations:?}"
    );
    let next = store.next_seq(Stream::Readings);
    let expected: BTreeSet<u64> = (1..next).collect();
    let missing: Vec<u64> = expected.difference(&seqs).copied().collect();
    assert!(
        missing.is_empty(),
        "committed readings batches missing from the sink: {missing:?} (of 1..{next}; \
         {gateway_kills} gateway kills, {hub_kills} hub kills, {outages} outages)"
    );
    assert_eq!(seqs, expected);
    eprintln!(
        "chaos: {gateway_kills} gateway kills, {hub_kills} hub kills, {outages} broker outages, \
         {} readings batches, {} records, each once",
        seqs.len(),
        records.len()
    );
}

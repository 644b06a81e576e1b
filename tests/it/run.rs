//! `citygate run` as an operator runs it: a child process polling simulated meters,
//! stopped by SIGTERM (clean: the open batch is sealed and committed) or SIGKILL
//! (restarted: the store opens and the sequence continues).

use std::path::PathBuf;
use std::time::Duration;

use citygate::reading::{Stream, UnitId};
use citygate::store::{SledStore, Store, StoreOptions};
use tokio_util::sync::CancellationToken;

use crate::support::*;

fn write_config(dep: &Deployment, address: &str, max_age: &str) -> PathBuf {
    let devices: String = (1..=2u8)
        .map(|u| device_toml(&format!("m{u}"), "chint-ddsu666", address, u, "200ms"))
        .collect();
    GatewayToml::new("gw-run", &["active_power", "energy_import"])
        .shipped_profiles()
        // min_interval = max_age: batches leave by age only, not at the end of poll rounds.
        .batch(&format!(
            "max_age = \"{max_age}\"\nmin_interval = \"{max_age}\"\nmax_records = 50000"
        ))
        .devices(&devices)
        .write(dep.path())
}

/// Waits until the simulator has answered `n` more requests for unit 1.
async fn polled(sim: &SimEndpoint, n: u64) {
    let start = sim.meters.requests_served(UnitId(1));
    let ok = wait_for(Duration::from_secs(15), || {
        sim.meters.requests_served(UnitId(1)) >= start + n
    })
    .await;
    assert!(ok, "the gateway did not poll the simulator");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_seals_and_commits_the_open_batch_then_exits_zero() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 2, 5, &token).await;
    let dep = Deployment::new();
    // A batch would only close after 60 s: whatever is stored was sealed by the shutdown.
    let config = write_config(&dep, &sim.address, "60s");
    let mut child = spawn_run(&config);
    polled(&sim, 6).await;
    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(20)).await;
    token.cancel();
    assert!(status.success(), "{status}");

    let store = SledStore::open(&dep.store_path(), StoreOptions::default()).unwrap();
    let batches = store.peek(Stream::Readings, 0, 100).unwrap();
    assert_eq!(
        batches.len(),
        1,
        "exactly the open batch was sealed at shutdown"
    );
    let opened = dep
        .opener(&citygate::reading::GatewayId::new("gw-run").unwrap())
        .open(&batches[0].bytes)
        .unwrap();
    assert!(
        opened.records.len() >= 4,
        "{} records",
        opened.records.len()
    );
    assert!(opened
        .records
        .iter()
        .all(|r| r.field == "active_power" || r.field == "energy_import"));
}

/// logrotate's `postrotate kill -HUP` must not stop the gateway: SIGHUP is logged and
/// ignored, and a SIGTERM after it still seals and commits the open batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_is_harmless_and_a_later_sigterm_still_seals_the_open_batch() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 2, 6, &token).await;
    let dep = Deployment::new();
    let config = write_config(&dep, &sim.address, "60s");
    let (mut child, mut log) =
        spawn_logged(&["run".as_ref(), "--config".as_ref(), config.as_ref()]);
    assert!(
        log.wait_for("gateway started", Duration::from_secs(15))
            .await,
        "{}",
        log.text
    );
    polled(&sim, 4).await;
    signal(&child, "-HUP");
    let survived = log.wait_for("sighup", Duration::from_secs(15)).await;
    if !survived {
        let status = wait_exit(&mut child, Duration::from_secs(5)).await;
        panic!(
            "SIGHUP ended the gateway ({status})\n{}",
            log.finish().await
        );
    }
    assert!(child.try_wait().unwrap().is_none(), "{}", log.text);
    // Still polling after the signal.
    polled(&sim, 4).await;
    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(20)).await;
    token.cancel();
    let text = log.finish().await;
    assert!(status.success(), "{status}\n{text}");
    assert!(text.contains("clean=true"), "{text}");

    let store = SledStore::open(&dep.store_path(), StoreOptions::default()).unwrap();
    let batches = store.peek(Stream::Readings, 0, 100).unwrap();
    assert_eq!(batches.len(), 1, "the open batch, sealed at SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_the_gateway_restarts_and_continues_its_sequence() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 2, 6, &token).await;
    let dep = Deployment::new();
    let config = write_config(&dep, &sim.address, "200ms");

    let mut first = spawn_run(&config);
    polled(&sim, 10).await;
    signal(&first, "-KILL");
    let status = wait_exit(&mut first, Duration::from_secs(10)).await;
    assert!(!status.success());

    let mut second = spawn_run(&config);
    polled(&sim, 10).await;
    signal(&second, "-TERM");
    let status = wait_exit(&mut second, Duration::from_secs(20)).await;
    token.cancel();
    assert!(status.success(), "{status}");

    let store = SledStore::open(&dep.store_path(), StoreOptions::default()).unwrap();
    let opener = dep.opener(&citygate::reading::GatewayId::new("gw-run").unwrap());
    let batches = store.peek(Stream::Readings, 0, 10_000).unwrap();
    assert!(batches.len() >= 2, "{} batches", batches.len());
    let seqs: Vec<u64> = batches.iter().map(|b| b.seq).collect();
    for pair in seqs.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "sequence continues without holes: {seqs:?}"
        );
    }
    for b in &batches {
        let opened = opener
            .open(&b.bytes)
            .unwrap_or_else(|e| panic!("batch {} rejected: {e}", b.seq));
        assert_eq!(opened.header.seq, b.seq);
    }
    assert!(store.next_seq(Stream::Readings) > *seqs.last().unwrap());
}

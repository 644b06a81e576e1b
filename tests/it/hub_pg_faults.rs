//! The hub's database sink under faults: the database stopped mid-run, and a database that
//! holds every commit (issue 13 item 3).

use std::time::Duration;

use citygate::mqtt::CertAuthority;
use citygate::reading::Stream;

use crate::hub_pg::{get, pg_hub_config, records, seal, sealer, PgHub, DUPLICATE_RECORDS};
use crate::hub_wire::{try_start_hub, until_subscribed, Publisher};
use crate::support::*;

/// Issue 13 item 3 (failure): with the database stopped for 10 s, batches are not
/// acknowledged and `/health` is degraded; once it is back, re-sent batches are written and
/// acknowledged, none lost and none twice, and `/health` is ok again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_loses_nothing_and_degrades_health_meanwhile() {
    let Some(PgHub {
        mut pg,
        dep,
        hub,
        mut gw,
        ..
    }) = PgHub::start("").await
    else {
        return;
    };
    let s = sealer(&dep);
    let day = 1_764_547_200_000;
    let batch = |seq: u64| seal(&s, seq, &records(4, day + seq as i64 * 1000));

    gw.publish(Stream::Readings, batch(1)).await;
    assert_eq!(gw.next_acks(1).await, [1]);

    pg.stop().await;
    for seq in 2..=4 {
        gw.publish(Stream::Readings, batch(seq)).await;
    }
    let degraded = wait_for_async(Duration::from_secs(20), || async {
        get(&hub, "/health").await.0 == 503
    })
    .await;
    assert!(degraded, "/health never became degraded");
    let (code, body) = get(&hub, "/health").await;
    assert_eq!(code, 503);
    assert!(body.starts_with("degraded: sink: database"), "{body}");
    // The outage: ten seconds without a database, batches re-sent meanwhile and never acked.
    let outage_end = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < outage_end {
        for seq in 2..=4 {
            gw.publish(Stream::Readings, batch(seq)).await;
        }
        let acks = gw.acks_within(1, Duration::from_secs(1)).await;
        assert!(acks.is_empty(), "acked without a database: {acks:?}");
    }

    pg.start_again().await;
    // As a gateway does: re-send what is unacknowledged until it is acknowledged.
    let mut unacked: Vec<u64> = vec![2, 3, 4];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !unacked.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never acknowledged after the outage: {unacked:?}"
        );
        for seq in &unacked {
            gw.publish(Stream::Readings, batch(*seq)).await;
        }
        for seq in gw.acks_within(unacked.len(), Duration::from_secs(1)).await {
            unacked.retain(|s| *s != seq);
        }
    }
    assert_eq!(pg.count("SELECT count(*) FROM batches"), 4);
    assert_eq!(pg.count("SELECT count(*) FROM records"), 16, "none lost");
    assert!(pg.query(DUPLICATE_RECORDS).is_empty(), "none twice");
    assert_eq!(get(&hub, "/health").await, (200, "ok\n".to_string()));
    let (_, metrics) = get(&hub, "/metrics").await;
    assert!(
        !metrics.contains("citygate_hub_sink_commit_failures_total{sink=\"postgres\"} 0"),
        "the failed commits are counted:\n{metrics}"
    );
    hub.shutdown().await;
}

/// Polls `cond` (an async check) until it holds or `limit` passes.
async fn wait_for_async<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The value of an unlabelled-but-for-`sink` sample in a metrics text.
fn sample(metrics: &str, name: &str) -> Option<u64> {
    metrics
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{sink=\"postgres\"}} ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Issue 13 item 3 (back-pressure): while the database holds every commit (a lock on
/// `batches`), the hub holds at most `max_in_flight` batches and reads no further; once the
/// lock goes, every batch is written once and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_database_bounds_what_the_hub_holds() {
    let Some(PgHub {
        pg,
        dep,
        hub,
        mut gw,
        ..
    }) = PgHub::start("max_in_flight = 4\n").await
    else {
        return;
    };

    // Another session locks `batches` until told to let go: every commit waits.
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let url = pg.url();
    let holder = std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let mut tx = c.transaction().unwrap();
        tx.batch_execute("LOCK TABLE batches IN ACCESS EXCLUSIVE MODE")
            .unwrap();
        locked_tx.send(()).unwrap();
        let _ = release_rx.recv();
        tx.commit().unwrap();
    });
    locked_rx.recv().unwrap();

    let s = sealer(&dep);
    let n = 20u64;
    for seq in 1..=n {
        gw.publish(
            Stream::Readings,
            seal(&s, seq, &records(2, 1_764_547_200_000)),
        )
        .await;
    }
    let mut held = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while held < Some(4) && tokio::time::Instant::now() < deadline {
        held = sample(
            &get(&hub, "/metrics").await.1,
            "citygate_hub_sink_in_flight",
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reached = held >= Some(4);
    assert!(reached, "the hub never held 4 batches: {held:?}");
    assert_eq!(held, Some(4), "the hub held more than max_in_flight");
    assert!(gw
        .acks_within(1, Duration::from_millis(500))
        .await
        .is_empty());
    assert_eq!(hub.hub().stats().accepted_batches, 0);

    release_tx.send(()).unwrap();
    holder.join().unwrap();
    let mut acked = gw.acks_within(n as usize, Duration::from_secs(30)).await;
    acked.sort_unstable();
    assert_eq!(acked, (1..=n).collect::<Vec<_>>());
    assert_eq!(pg.count("SELECT count(*) FROM batches"), n as i64);
    assert_eq!(pg.count("SELECT count(*) FROM records"), 2 * n as i64);
    assert!(pg.query(DUPLICATE_RECORDS).is_empty());
    hub.shutdown().await;
}

/// Issue 13 (throughput of the database path): with `connections = 2`, a commit stuck behind
/// another session's lock holds one connection, not the hub: a later batch is committed and
/// acknowledged on the other connection meanwhile, and the stuck one follows once the lock
/// goes. With one connection (the hub before `connections`) the later batch waits too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_commit_holds_one_connection_not_the_hub() {
    let Some(PgHub {
        pg,
        dep,
        hub,
        mut gw,
        ..
    }) = PgHub::start("connections = 2\n").await
    else {
        return;
    };
    let s = sealer(&dep);
    let day = 1_764_547_200_000;
    // The partition exists before the lock is taken, so only the batch row is contended.
    gw.publish(Stream::Readings, seal(&s, 1, &records(2, day)))
        .await;
    assert_eq!(gw.next_acks(1).await, [1]);

    // Another session inserts seq 2's batch row and keeps its transaction open: the hub's
    // insert of that key waits for it.
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let url = pg.url();
    let holder = std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let mut tx = c.transaction().unwrap();
        tx.batch_execute(
            "INSERT INTO batches (gateway, stream, incarnation, seq, policy_hash, signer_key_id, \
                 recipient_key_id, created_at, record_count) \
             VALUES ('gw-test', 'readings', '0000000000005eed', 2, '\\x00', '\\x00', '\\x00', \
                 now(), 0)",
        )
        .unwrap();
        locked_tx.send(()).unwrap();
        let _ = release_rx.recv();
        tx.rollback().unwrap();
    });
    locked_rx.recv().unwrap();

    gw.publish(Stream::Readings, seal(&s, 2, &records(2, day)))
        .await;
    let waiting = wait_for_async(Duration::from_secs(20), || async {
        pg.count("SELECT count(*) FROM pg_locks WHERE NOT granted") > 0
    })
    .await;
    assert!(
        waiting,
        "the hub's commit of seq 2 never waited for the lock"
    );

    gw.publish(Stream::Readings, seal(&s, 3, &records(2, day)))
        .await;
    assert_eq!(
        gw.acks_within(1, Duration::from_secs(15)).await,
        [3],
        "seq 3 waited behind the stuck commit of seq 2"
    );

    // The other session rolls back: seq 2 is the hub's to write after all.
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    assert_eq!(gw.acks_within(1, Duration::from_secs(15)).await, [2]);
    assert_eq!(pg.count("SELECT count(*) FROM batches"), 3);
    assert_eq!(pg.count("SELECT count(*) FROM records"), 6);
    assert!(pg.query(DUPLICATE_RECORDS).is_empty());
    hub.shutdown().await;
}

/// A hub whose database is down when it starts starts anyway: degraded on `/health`,
/// acknowledging nothing; once the database is back, `/health` says ok with no batch needed
/// (the hub probes it), the schema is applied at the first connection (`migrate = true`)
/// and the batch the gateway re-sends is written and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_started_without_its_database_waits_for_it_degraded() {
    let Some(mut pg) = PgServer::start().await else {
        return;
    };
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let config = pg_hub_config(&dep, &ca, &pg.url(), "migrate = true\n");
    pg.stop().await;
    let hub = try_start_hub(&config).await.unwrap();
    let port = hub.broker_addr().unwrap().port();
    let mut gw = Publisher::connect(&ca, port, &dep).await;
    until_subscribed(&hub).await;
    let degraded = wait_for_async(Duration::from_secs(20), || async {
        get(&hub, "/health").await.0 == 503
    })
    .await;
    assert!(degraded, "/health never said degraded without a database");
    let (_, body) = get(&hub, "/health").await;
    assert!(body.starts_with("degraded: sink: database"), "{body}");
    let batch = seal(&sealer(&dep), 1, &records(2, 1_764_547_200_000));
    gw.publish(Stream::Readings, batch.clone()).await;
    assert!(gw.acks_within(1, Duration::from_secs(1)).await.is_empty());

    pg.start_again().await;
    let healthy = wait_for_async(Duration::from_secs(30), || async {
        get(&hub, "/health").await.0 == 200
    })
    .await;
    assert!(
        healthy,
        "/health stayed degraded with the database back and idle"
    );
    gw.publish(Stream::Readings, batch).await;
    assert_eq!(gw.acks_within(1, Duration::from_secs(15)).await, [1]);
    assert_eq!(pg.count("SELECT count(*) FROM records"), 2);
    assert_eq!(
        pg.count("SELECT max(version)::bigint FROM schema_migrations"),
        2
    );
    hub.shutdown().await;
}

//! The hub with the PostgreSQL sink (issue 13) against a private PostgreSQL server
//! (`support::PgServer`): migrations, exactly-once in the database, quarantine, two
//! `citygate hub` processes on one shared subscription through mosquitto, TLS to the
//! database. Its faults (an outage, a stalled database) are in `hub_pg_faults`.
//! Skipped (with a notice) where PostgreSQL is not installed, unless
//! `CITYGATE_REQUIRE_POSTGRES=1`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use citygate::hub::HubProcess;
use citygate::mqtt::{CertAuthority, LinkTls};
use citygate::reading::{GatewayId, Quality, Record, Stream, Unit, Value};
use citygate::seal::{keys, Sealer};

use crate::hub_wire::{stamp, try_start_hub, until_subscribed, Publisher};
use crate::support::*;

/// Rows that share a natural key: must be none.
pub(crate) const DUPLICATE_RECORDS: &str =
    "SELECT gateway, stream, incarnation, seq, subject, field, at \
     FROM records GROUP BY gateway, stream, incarnation, seq, subject, field, at \
     HAVING count(*) > 1";

/// `n` readings of one meter, a minute apart from `at_ms`.
pub(crate) fn records(n: usize, at_ms: i64) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            subject: "p-0123456789abcdef0123456789abcdef".into(),
            field: "energy_import".into(),
            value: Value::Int(1000 + i as i64),
            unit: Unit::WattHour,
            at_ms: at_ms + 60_000 * i as i64,
            quality: Quality::Good,
            tags: vec![],
            window: None,
            epoch: 0,
        })
        .collect()
}

/// A sealer for gw-test with the deployment's keys.
pub(crate) fn sealer(dep: &Deployment) -> Sealer {
    Sealer::new(
        GatewayId::new("gw-test").unwrap(),
        keys::load_signing_key(&dep.path().join("keys/gateway.sign.key")).unwrap(),
        keys::load_hub_public_key(&dep.path().join("keys/hub.hpke.pub")).unwrap(),
        0x5eed,
    )
}

pub(crate) fn seal(sealer: &Sealer, seq: u64, records: &[Record]) -> Vec<u8> {
    sealer
        .seal(Stream::Readings, seq, 1_764_547_200_000, &stamp(), records)
        .unwrap()
        .bytes
}

/// `hub` (a [`HubToml`] text) with the postgres sink at `url` instead of the jsonl one.
pub(crate) fn postgres_hub_toml(hub: &HubToml, url: &str, extra: &str) -> String {
    let text = hub.text();
    let text = text.replace("state_path = \"hub-state\"\n", "");
    let text = text.replace(
        "[sink]\ntype = \"jsonl\"\npath = \"records.jsonl\"\n",
        &format!("[sink]\ntype = \"postgres\"\nurl = \"{url}\"\n{extra}"),
    );
    assert!(text.contains("type = \"postgres\""), "{text}");
    text
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A hub config in `dep` with its embedded broker, gw-test approved for [`stamp`], its
/// status endpoint, and the postgres sink at `url` with the `extra` sink keys.
pub(crate) fn pg_hub_config(
    dep: &Deployment,
    ca: &CertAuthority,
    url: &str,
    extra: &str,
) -> PathBuf {
    let hub_toml = HubToml::embedded_broker(
        "127.0.0.1:0",
        &TlsFiles::client(ca, "hub-1"),
        &TlsFiles::localhost_server(ca),
    )
    .status()
    .approve(&stamp());
    write(
        dep.path(),
        "hub.toml",
        &postgres_hub_toml(&hub_toml, url, extra),
    )
}

/// A hub on a private PostgreSQL (`migrate = true` and the `extra` sink keys), with its
/// embedded broker and gw-test's publisher connected, the hub subscribed.
pub(crate) struct PgHub {
    pub pg: PgServer,
    pub dep: Deployment,
    pub config: PathBuf,
    pub hub: HubProcess,
    pub gw: Publisher,
}

impl PgHub {
    /// `None` where PostgreSQL is not installed (and not required).
    pub(crate) async fn start(extra: &str) -> Option<PgHub> {
        let pg = PgServer::start().await?;
        let dep = Deployment::new();
        let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
        let extra = format!("migrate = true\n{extra}");
        let config = pg_hub_config(&dep, &ca, &pg.url(), &extra);
        let hub = try_start_hub(&config).await.unwrap();
        let port = hub.broker_addr().unwrap().port();
        let gw = Publisher::connect(&ca, port, &dep).await;
        until_subscribed(&hub).await;
        Some(PgHub {
            pg,
            dep,
            config,
            hub,
            gw,
        })
    }
}

/// `citygate hub-migrate --config CONFIG`: (exit code, stdout + stderr).
async fn hub_migrate(config: &Path) -> (i32, String) {
    let config = config.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_citygate"))
            .arg("hub-migrate")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

pub(crate) async fn get(hub: &HubProcess, path: &str) -> (u16, String) {
    citygate::telemetry::http::get(hub.status_addr().unwrap(), path, Duration::from_secs(5))
        .await
        .unwrap()
}

/// Issue 13 items 1, 2, 3 and 5: a hub on an unmigrated database refuses to start and names
/// `citygate hub-migrate`; `hub-migrate` is idempotent; batches sent over MQTT become rows;
/// a batch re-sent after a withheld ack is acknowledged again and written once; a poison
/// batch (text with a NUL byte, refused by the database) is quarantined and acknowledged
/// while the good batch of its group is written; `/metrics` shows the postgres sink's
/// figures; `hub-prune` drops a daily partition only past the approved retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_become_rows_once_and_a_poison_batch_is_quarantined() {
    let Some(pg) = PgServer::start().await else {
        return;
    };
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let config = pg_hub_config(&dep, &ca, &pg.url(), "");

    let refused = try_start_hub(&config).await.unwrap_err();
    assert!(
        refused.contains("citygate hub-migrate") && refused.contains("version 0"),
        "{refused}"
    );
    let (code, out) = hub_migrate(&config).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("applied migration(s) 1, 2"), "{out}");
    let (code, out) = hub_migrate(&config).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("already at version 2"), "{out}");
    assert_eq!(pg.count("SELECT count(*) FROM schema_migrations"), 2);

    let hub = try_start_hub(&config).await.unwrap();
    let port = hub.broker_addr().unwrap().port();
    let mut gw = Publisher::connect(&ca, port, &dep).await;
    until_subscribed(&hub).await;
    let s = sealer(&dep);
    let day = 1_764_547_200_000; // 2025-12-01
    let batches: Vec<Vec<u8>> = (1..=4)
        .map(|seq| seal(&s, seq, &records(3, day + seq as i64 * 3_600_000)))
        .collect();
    for b in &batches {
        gw.publish(Stream::Readings, b.clone()).await;
    }
    let mut acked = gw.next_acks(4).await;
    acked.sort_unstable();
    assert_eq!(acked, [1, 2, 3, 4]);
    assert_eq!(pg.count("SELECT count(*) FROM batches"), 4);
    assert_eq!(pg.count("SELECT count(*) FROM records"), 12);
    assert_eq!(
        pg.count("SELECT count(*) FROM records_20251201"),
        12,
        "the day's partition was made and holds the rows"
    );
    let row = &pg.query(
        "SELECT incarnation, seq::text, purpose, encode(policy_hash, 'hex'), record_count, \
         created_at = '2025-12-01 00:00:00+00' FROM batches WHERE seq = 2",
    )[0];
    assert_eq!(row.get::<_, String>(0), "0000000000005eed");
    assert_eq!(row.get::<_, String>(1), "2");
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("test-purpose")
    );
    assert_eq!(row.get::<_, String>(3), "07".repeat(32));
    assert_eq!(row.get::<_, i32>(4), 3);
    assert!(row.get::<_, bool>(5));

    // The gateway missed the ack of batch 3 and sends it again: acknowledged, not written.
    gw.publish(Stream::Readings, batches[2].clone()).await;
    assert_eq!(gw.next_acks(1).await, [3]);
    assert_eq!(pg.count("SELECT count(*) FROM records"), 12);
    assert!(pg.query(DUPLICATE_RECORDS).is_empty());

    // A poison batch and a good one, back to back (one group or two: the same outcome).
    let mut poison = records(2, day);
    poison[1].value = Value::Text("nul \0 byte".into());
    gw.publish(Stream::Readings, seal(&s, 5, &poison)).await;
    gw.publish(Stream::Readings, seal(&s, 6, &records(2, day)))
        .await;
    let mut acked = gw.next_acks(2).await;
    acked.sort_unstable();
    assert_eq!(acked, [5, 6], "the quarantined batch is acknowledged too");
    let q = pg.query("SELECT seq::text, sqlstate, reason, record_count FROM quarantine");
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].get::<_, String>(0), "5");
    assert!(q[0].get::<_, String>(1).starts_with("22"), "{:?}", q[0]);
    assert!(q[0].get::<_, String>(2).contains("SQLSTATE"), "{:?}", q[0]);
    assert_eq!(q[0].get::<_, i32>(3), 2);
    assert_eq!(pg.count("SELECT count(*) FROM records WHERE seq = 5"), 0);
    assert_eq!(pg.count("SELECT count(*) FROM records WHERE seq = 6"), 2);
    // Sent again, the poison batch is acknowledged again and recorded once.
    gw.publish(Stream::Readings, seal(&s, 5, &poison)).await;
    assert_eq!(gw.next_acks(1).await, [5]);
    assert_eq!(pg.count("SELECT count(*) FROM quarantine"), 1);

    let stats = hub.hub().stats();
    assert_eq!(
        (stats.accepted_batches, stats.duplicates, stats.quarantined),
        (5, 1, 2),
        "{stats:?}"
    );
    let (code, metrics) = get(&hub, "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "citygate_hub_sink_batches_written_total{sink=\"postgres\"} 5",
        "citygate_hub_sink_records_written_total{sink=\"postgres\"} 14",
        "citygate_hub_sink_duplicates_total{sink=\"postgres\"} 1",
        "citygate_hub_sink_quarantined_total{sink=\"postgres\"} 2",
        "citygate_hub_sink_in_flight{sink=\"postgres\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} missing in\n{metrics}");
    }
    assert!(
        metrics.contains("citygate_hub_sink_commit_seconds_count{sink=\"postgres\"}"),
        "{metrics}"
    );
    assert_eq!(get(&hub, "/health").await, (200, "ok\n".to_string()));
    hub.shutdown().await;

    // Issue 13 item 5: the README's query examples run against this schema.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let queries: Vec<&str> = readme
        .split("```sql\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap())
        .collect();
    assert_eq!(queries.len(), 2, "the README's sql examples");
    for q in queries {
        pg.query(q);
    }

    // Issue 13 item 5 (retention): with 30 days approved for the only purpose, hub-prune
    // keeps the 2025-12-01 partition on 2025-12-20 and drops it on 2026-01-15.
    let text = std::fs::read_to_string(&config).unwrap();
    let with_retention = text.replace(
        &format!("hash = \"{}\" }}", stamp().hash_hex()),
        &format!("hash = \"{}\", retention = \"30d\" }}", stamp().hash_hex()),
    );
    assert_ne!(text, with_retention);
    std::fs::write(&config, with_retention).unwrap();
    let prune = |now: &'static str| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_citygate"))
                .args(["hub-prune", "--now", now, "--config"])
                .arg(&config)
                .output()
                .unwrap()
        })
    };
    let out = prune("2025-12-20T00:00:00Z").await.unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(pg.count("SELECT count(*) FROM records"), 14);
    let out = prune("2026-01-15T00:00:00Z").await.unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("dropped partitions records_20251201"),
        "{text}"
    );
    assert!(
        text.contains("test-purpose=30days"),
        "the log names the retentions: {text}"
    );
    assert_eq!(pg.count("SELECT count(*) FROM records"), 0);
    assert_eq!(
        pg.count("SELECT count(*) FROM pg_class WHERE relname = 'records_20251201'"),
        0
    );
    assert_eq!(
        pg.count("SELECT count(*) FROM batches"),
        5,
        "batch rows stay"
    );
}

/// Issue 13 item 2 (several hubs): two `citygate hub` processes share one subscription
/// through mosquitto; every batch is published twice (a re-send after a withheld ack), so
/// the two copies may reach different hubs: each copy is acknowledged, each batch's records
/// are in the database once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hub_processes_on_one_shared_subscription_write_each_batch_once() {
    let Some(bin) = crate::mosquitto::mosquitto_binary() else {
        assert!(
            std::env::var("CITYGATE_REQUIRE_MOSQUITTO").is_err(),
            "CITYGATE_REQUIRE_MOSQUITTO is set but mosquitto is not installed"
        );
        eprintln!("note: mosquitto not installed; test skipped");
        return;
    };
    let Some(pg) = PgServer::start().await else {
        return;
    };
    let dep = Deployment::new();
    let (_broker, port) = crate::mosquitto::start_mosquitto(bin, dep.path(), |port| {
        format!("listener {port} 127.0.0.1\nallow_anonymous true\n")
    })
    .await;
    let mut hubs = Vec::new();
    for name in ["hub-a", "hub-b"] {
        let text = postgres_hub_toml(
            &HubToml::plaintext(port).approve(&stamp()),
            &pg.url(),
            "migrate = true\n",
        )
        .replace("id = \"hub-1\"", &format!("id = \"{name}\""));
        let config = write(dep.path(), &format!("{name}.toml"), &text);
        let (child, log) = spawn_logged(&["hub".as_ref(), "--config".as_ref(), config.as_os_str()]);
        hubs.push((child, log));
    }
    for (_, log) in &mut hubs {
        assert!(
            log.wait_for("hub subscribed", Duration::from_secs(30))
                .await,
            "a hub never subscribed:\n{}",
            log.text
        );
    }
    let mut gw = Publisher::connect_with(LinkTls::DangerPlaintext, port, &dep).await;
    let s = sealer(&dep);
    let day = 1_764_547_200_000;
    let n = 40u64;
    for seq in 1..=n {
        let b = seal(&s, seq, &records(3, day + seq as i64 * 1000));
        gw.publish(Stream::Readings, b.clone()).await;
        gw.publish(Stream::Readings, b).await;
    }
    let mut acked = gw
        .acks_within(2 * n as usize, Duration::from_secs(30))
        .await;
    assert_eq!(
        acked.len(),
        2 * n as usize,
        "each copy is acknowledged: {acked:?}"
    );
    acked.sort_unstable();
    acked.dedup();
    assert_eq!(acked, (1..=n).collect::<Vec<_>>());
    assert_eq!(pg.count("SELECT count(*) FROM batches"), n as i64);
    assert_eq!(pg.count("SELECT count(*) FROM records"), 3 * n as i64);
    assert!(pg.query(DUPLICATE_RECORDS).is_empty());
    for (mut child, mut log) in hubs {
        signal(&child, "-TERM");
        let status = wait_exit(&mut child, Duration::from_secs(20)).await;
        assert!(status.success(), "{}", log.finish().await);
    }
}

/// Issue 13 item 2: `citygate check` shows the postgres sink as configured (URL, TLS,
/// in-flight bound) and no local state.
#[test]
fn check_shows_the_postgres_sink() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hub.postgres.example.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_citygate"))
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(
            "sink      postgres postgresql://citygate@db.city-brain.example:5432/citygate \
             (TLS verified against /etc/citygate/tls/db-ca.pem), 2 connection(s), up to 256 batches \
             in flight"
        ),
        "{text}"
    );
    assert!(!text.contains("state "), "{text}");
}

/// Issue 13 item 2 (TLS): with `ca_file`, the hub reaches the database over TLS, the server
/// verified against that CA and the URL's host name; a server certificate from another CA
/// is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_connection_is_tls_verified_against_ca_file() {
    let dep = Deployment::new();
    let db_ca = CertAuthority::generate(&dep.path().join("db-pki"), "database ca").unwrap();
    let server = TlsFiles::localhost_server(&db_ca);
    let Some(pg) = PgServer::start_with_tls(Some((&server.cert, &server.key))).await else {
        return;
    };
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let hub_toml = HubToml::embedded_broker(
        "127.0.0.1:0",
        &TlsFiles::client(&ca, "hub-1"),
        &TlsFiles::localhost_server(&ca),
    )
    .approve(&stamp());
    let url = format!("postgresql://citygate@localhost:{}/citygate", pg.port());
    let with_ca = |ca_file: &Path| {
        postgres_hub_toml(
            &hub_toml,
            &url,
            &format!(
                "ca_file = {:?}\nmigrate = true\n",
                ca_file.display().to_string()
            ),
        )
    };
    // The broker's CA did not sign the database's certificate: refused.
    let config = write(dep.path(), "hub.toml", &with_ca(ca.ca_file()));
    let refused = try_start_hub(&config).await.unwrap_err();
    assert!(refused.contains("connecting"), "{refused}");

    let config = write(dep.path(), "hub.toml", &with_ca(db_ca.ca_file()));
    let hub = try_start_hub(&config).await.unwrap();
    let port = hub.broker_addr().unwrap().port();
    let mut gw = Publisher::connect(&ca, port, &dep).await;
    until_subscribed(&hub).await;
    gw.publish(
        Stream::Readings,
        seal(&sealer(&dep), 1, &records(2, 1_764_547_200_000)),
    )
    .await;
    assert_eq!(gw.next_acks(1).await, [1]);
    assert_eq!(pg.count("SELECT count(*) FROM records"), 2);
    let sessions = |encrypted: bool| {
        pg.count(&format!(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE application_name = 'citygate-hub' AND ssl = {encrypted}"
        ))
    };
    assert!(sessions(true) >= 1, "the hub has an encrypted session");
    assert_eq!(sessions(false), 0, "every session of the hub is encrypted");
    hub.shutdown().await;
}

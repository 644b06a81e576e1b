//! The store under faults, with the real `citygate run`: a store whose file cannot grow
//! (a soft `RLIMIT_FSIZE` on the gateway process, set and lifted with `prlimit(1)`, SIGXFSZ
//! ignored so writes fail with EFBIG as on a full disk) degrades `/health`, and recovers by
//! itself once the limit is lifted, delivering every committed record exactly once.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use citygate::mqtt::{BrokerOptions, CertAuthority, EmbeddedBroker};
use citygate::reading::Stream;
use citygate::store::{SledStore, Store, StoreOptions};
use citygate::telemetry::http;
use tokio_util::sync::CancellationToken;

use crate::support::*;

fn sink_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Sets the soft file-size limit of process `pid` (`unlimited` or bytes).
fn set_fsize(pid: u32, soft: &str) {
    let status = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--fsize={soft}:"))
        .status()
        .unwrap();
    assert!(status.success(), "prlimit failed: {status}");
}

async fn health(addr: SocketAddr) -> (u16, String) {
    http::get(addr, "/health", Duration::from_secs(5))
        .await
        .unwrap()
}

/// Polls `/health` (bounded) until `want(code, body)`.
async fn health_until(addr: SocketAddr, want: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let mut last = (0, String::new());
    for _ in 0..300 {
        last = health(addr).await;
        if want(last.0, &last.1) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/health never matched; last {last:?}");
}

/// issue 9 item 2 (acceptance): the store's file cannot grow (EFBIG, like ENOSPC), commits
/// fail, `/health` is `degraded: store: …`; once it can grow again the gateway recovers
/// without a restart (reopening sled in place), the backlog drains, SIGTERM stops it clean
/// with exit 0, and the hub's sink has every committed record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_grow_degrades_then_recovers_and_delivers_everything_once() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 3, 31, &token).await;
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
    // `trap '' XFSZ` is inherited through exec as "ignored": a write past the limit fails
    // with EFBIG instead of killing the process.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("trap '' XFSZ; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_citygate"))
        .args(["run", "--config"])
        .arg(&config);
    let (mut child, mut log) = spawn_logged_command(cmd);
    let pid = child.id();
    let store_path = dep.path().join("store");
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
    let addr = citygate::status::read_address_file(&store_path).unwrap();
    assert_eq!(health(addr).await.0, 200);

    // The store's log file may not grow past its current size: the disk is "full".
    let db_len = std::fs::metadata(store_path.join("db")).unwrap().len();
    set_fsize(pid, &db_len.to_string());
    assert!(
        log.wait_for("store commit failed", Duration::from_secs(20))
            .await,
        "{}",
        log.text
    );
    let (code, body) = health_until(addr, |c, _| c == 503).await;
    assert!(
        body.contains("degraded") && body.contains("store: commits failing"),
        "{code} {body}"
    );
    let accepted_during = hub.hub().stats().accepted_batches;

    // Space returns: the gateway recovers by itself.
    set_fsize(pid, "unlimited");
    assert!(
        log.wait_for("store commits again", Duration::from_secs(30))
            .await,
        "{}",
        log.text
    );
    health_until(addr, |c, _| c == 200).await;
    assert!(log.text.contains("store reopened"), "{}", log.text);
    assert!(
        wait_for(Duration::from_secs(30), || hub
            .hub()
            .stats()
            .accepted_batches
            >= accepted_during + 5)
        .await,
        "{:?}",
        hub.hub().stats()
    );

    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(30)).await;
    let text = log.finish().await.to_owned();
    assert!(status.success(), "{status}\n{text}");
    assert!(text.contains("gateway stopped clean=true"), "{text}");
    token.cancel();
    // Let the hub take what the last chance delivered, then stop it.
    let hub_stats = hub.hub().stats();
    hub.shutdown().await;
    broker.shutdown();

    let store = SledStore::open(&store_path, StoreOptions::default()).unwrap();
    let left: BTreeSet<u64> = store
        .peek(Stream::Readings, 0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|b| b.seq)
        .collect();
    let lines = sink_lines(&dep.path().join("records.jsonl"));
    let mut records = HashSet::new();
    let mut seqs = BTreeSet::new();
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
    // Every committed readings batch is in the sink or still in the store (sent after the
    // next start; one whose delete was lost in the failure may be in both, and the hub
    // de-duplicates it): none is missing.
    let all: Vec<u64> = seqs.union(&left).copied().collect();
    for pair in all.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "a committed batch never reached the hub: {all:?}"
        );
    }
    assert_eq!(store.next_seq(Stream::Readings), all.last().unwrap() + 1);
    assert!(
        hub_stats.rejected.values().all(|n| *n == 0),
        "{hub_stats:?}"
    );
}

/// issue 9 item 3: a store that lost entries while stopped is detected at start, moved
/// aside, counted, and the loss goes out as an alarm record on the alarms stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_replaced_counted_and_alarmed() {
    use citygate::supervisor::{self, KeyMaterial};
    use std::sync::Arc;

    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 1, 41, &token).await;
    let dep = Deployment::new();
    let cfg = dep.config(
        &["active_power"],
        &device_toml("m1", "chint-ddsu666", &sim.address, 1, "200ms"),
        profiles,
    );
    {
        let store = SledStore::open(&cfg.store.path, StoreOptions::default()).unwrap();
        for seq in 1..=6 {
            store.append(Stream::Readings, seq, &[7; 300]).unwrap();
        }
        store.flush().unwrap();
    }
    std::fs::write(cfg.store.path.join("db"), b"").unwrap();

    let store = Arc::new(SledStore::open(&cfg.store.path, StoreOptions::default()).unwrap());
    let moved = store.recovered_from().unwrap().to_path_buf();
    assert!(moved.join("db").exists(), "the damaged store is kept");
    let running = supervisor::start(&cfg, KeyMaterial::load(&cfg.keys).unwrap(), store.clone());
    let metrics = running.metrics.clone();
    assert_eq!(metrics.store_recoveries.get(), 1);
    assert_eq!(metrics.batches_lost_to_corruption.get(), 6);
    assert!(running.shutdown(Duration::from_secs(10)).await);
    token.cancel();

    let opener = dep.opener(&cfg.gateway_id);
    let alarms = store.peek(Stream::Alarms, 0, usize::MAX).unwrap();
    assert_eq!(alarms.len(), 1, "one alarm batch");
    let opened = opener.open(&alarms[0].bytes).unwrap();
    let alarm = &opened.records[0];
    assert_eq!(alarm.field, "store_recovered");
    assert_eq!(alarm.subject, "gateway:gw-test");
    assert_eq!(alarm.value, citygate::reading::Value::Int(6));
    assert!(
        alarm.tags.iter().any(|t| t == "store_corruption"),
        "{alarm:?}"
    );
}

/// issue 9 item 3: `citygate store check` verifies a stopped store offline: 0 when sound,
/// 2 when entries were lost, and it changes nothing.
#[test]
fn store_check_tells_a_sound_store_from_a_damaged_one_without_touching_it() {
    let dep = Deployment::new();
    let config = GatewayToml::new("gw-test", &["active_power"])
        .shipped_profiles()
        .devices(&device_toml("m1", "chint-ddsu666", "127.0.0.1:1", 1, "1s"))
        .write(dep.path());
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_citygate"))
            .args(["store", "check", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    {
        let store = SledStore::open(&dep.store_path(), StoreOptions::default()).unwrap();
        for seq in 1..=6 {
            store.append(Stream::Audit, seq, &[3; 100]).unwrap();
        }
        store.flush().unwrap();
    }
    let out = check();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("audit     6 batches"), "{stdout}");
    assert!(stdout.contains("store ok"), "{stdout}");

    std::fs::write(dep.store_path().join("db"), b"").unwrap();
    let out = check();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("entries lost"), "{stdout}");
    assert!(stdout.contains("store DAMAGED"), "{stdout}");
    assert_eq!(
        std::fs::metadata(dep.store_path().join("db"))
            .unwrap()
            .len(),
        0,
        "the check left the store as it was"
    );
    assert_eq!(
        std::fs::read_dir(dep.path())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("corrupt"))
            .count(),
        0,
        "nothing moved aside"
    );
}

/// issue 9 items 2 and 6: a gateway stopped while its store cannot take the open batches
/// loses them, and says so: `gateway stopped clean=false` with the count, exit 1 (it used
/// to log `clean=true` and exit 0 after losing data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_that_loses_sealed_batches_is_not_clean_and_exits_non_zero() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 2, 43, &token).await;
    let dep = Deployment::new();
    let devices: String = (1..=2u8)
        .map(|u| device_toml(&format!("m{u}"), "chint-ddsu666", &sim.address, u, "200ms"))
        .collect();
    let config = GatewayToml::new("gw-test", &["active_power", "energy_import"])
        .shipped_profiles()
        .devices(&devices)
        .write(dep.path());
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("trap '' XFSZ; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_citygate"))
        .args(["run", "--config"])
        .arg(&config);
    let (mut child, mut log) = spawn_logged_command(cmd);
    assert!(
        log.wait_for("gateway started", Duration::from_secs(20))
            .await,
        "{}",
        log.text
    );
    let db = dep.store_path().join("db");
    set_fsize(
        child.id(),
        &std::fs::metadata(&db).unwrap().len().to_string(),
    );
    assert!(
        log.wait_for("store commit failed", Duration::from_secs(20))
            .await,
        "{}",
        log.text
    );
    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(30)).await;
    let text = log.finish().await.to_owned();
    token.cancel();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("gateway stopped clean=false"), "{text}");
    assert!(!text.contains("lost=0"), "{text}");
    assert!(text.contains("giving up on uncommitted batches"), "{text}");
}

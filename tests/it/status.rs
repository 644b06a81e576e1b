//! The status endpoint of a running `citygate run`: `citygate status` as the operator
//! types it, `/metrics` as Prometheus scrapes it, `/health` as a probe reads it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use citygate::reading::UnitId;
use citygate::sim::Fault;
use citygate::status::{read_address_file, GatewayStatus};
use citygate::telemetry::http;
use tokio_util::sync::CancellationToken;

use crate::support::*;

fn write_config(dep: &Deployment, address: &str) -> PathBuf {
    let devices: String = (1..=2u8)
        .map(|u| device_toml(&format!("meter-{u}"), "chint-ddsu666", address, u, "200ms"))
        .collect();
    GatewayToml::new("gw-status", &["active_power"])
        .shipped_profiles()
        .batch("max_age = \"60s\"")
        .modbus("200ms", "1s")
        .status()
        .devices(&devices)
        .write(dep.path())
}

fn citygate_status(config: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_citygate"))
        .args(["status", "--config"])
        .arg(config)
        .args(extra)
        .output()
        .unwrap()
}

async fn fetch(addr: SocketAddr, path: &str) -> (u16, String) {
    http::get(addr, path, Duration::from_secs(5)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_metrics_and_health_of_a_running_gateway() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 2, 9, &token).await;
    sim.meters.set_fault(UnitId(2), Fault::Silent);
    let dep = Deployment::new();
    let config = write_config(&dep, &sim.address);
    let mut child = spawn_run(&config);

    // The gateway listens on a port of its choosing and records it next to the store.
    let store = dep.store_path();
    let addr = status_address(&store).await;
    assert!(addr.ip().is_loopback());

    // Let meter-1 answer a few polls and meter-2 time out at least once.
    let mut st: Option<GatewayStatus> = None;
    for _ in 0..100 {
        let (code, body) = fetch(addr, "/status").await;
        assert_eq!(code, 200, "{body}");
        let s: GatewayStatus = serde_json::from_str(&body).unwrap();
        let done = s
            .devices
            .iter()
            .any(|d| d.name == "meter-1" && d.polls.polls_ok >= 3)
            && s.devices
                .iter()
                .any(|d| d.name == "meter-2" && d.polls.timeouts >= 1);
        st = Some(s);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let st = st.unwrap();
    assert_eq!(st.gateway, "gw-status");
    let m1 = st.devices.iter().find(|d| d.name == "meter-1").unwrap();
    let m2 = st.devices.iter().find(|d| d.name == "meter-2").unwrap();
    assert!(
        m1.polls.polls_ok >= 3 && m1.polls.last_ok_ms.is_some(),
        "{m1:?}"
    );
    assert!(m2.polls.timeouts >= 1 && m2.polls.polls_ok == 0, "{m2:?}");
    assert_eq!(m2.polls.last_error.as_deref(), Some("timeout"));
    assert_eq!(m1.endpoint, format!("tcp://{}", sim.address));
    assert!(!st.link.configured, "no [uplink] in this config");
    assert!(st.counters["samples_polled"] >= 3, "{:?}", st.counters);
    assert_eq!(st.health.status, "ok", "{:?}", st.health);

    // The operator's view.
    let out = citygate_status(&config, &[]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("gateway gw-status"), "{text}");
    assert!(text.contains("uplink  not configured"), "{text}");
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{text}"))
            .to_string()
    };
    assert!(line("meter-2").contains("timeout"), "{text}");
    assert!(line("meter-1").contains("s ago"), "{text}");
    let out = citygate_status(&config, &["--json"]);
    assert!(out.status.success());
    let again: GatewayStatus = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again.devices.len(), 2);

    // Prometheus text: every sample line is `name{labels} value`, families declared first.
    let (code, metrics) = fetch(addr, "/metrics").await;
    assert_eq!(code, 200);
    let mut declared = std::collections::HashSet::new();
    for l in metrics.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            declared.insert(it.next().unwrap().to_string());
            assert!(matches!(it.next(), Some("counter" | "gauge")), "{l}");
            continue;
        }
        if l.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = l.rsplit_once(' ').unwrap();
        let name = series.split('{').next().unwrap();
        assert!(declared.contains(name), "sample before its TYPE: {l}");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value: {l}"));
    }
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    assert!(value("citygate_samples_polled_total") >= 3.0);
    assert!(value("citygate_device_polls_total{device=\"meter-2\",outcome=\"timeout\"}") >= 1.0);
    assert!(value("citygate_device_polls_total{device=\"meter-1\",outcome=\"ok\"}") >= 3.0);
    assert_eq!(value("citygate_uplink_connected"), 0.0);
    assert_eq!(value("citygate_healthy"), 1.0);

    let (code, body) = fetch(addr, "/health").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    assert_eq!(fetch(addr, "/nothing").await.0, 404);

    // Stopped: the address file goes, and `status` says so in one line with exit 1.
    signal(&child, "-TERM");
    assert!(wait_exit(&mut child, Duration::from_secs(20))
        .await
        .success());
    token.cancel();
    assert_eq!(read_address_file(&store), None);
    let out = citygate_status(&config, &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("is it running?"), "{err}");
}

/// issue 10 item 1: with `max_age = 60s`, batches are sealed and committed at the end of
/// every poll round (two meters every 200 ms), each holding the whole round; a SIGKILL then
/// costs at most the round in progress, not up to a minute of readings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_leave_at_the_end_of_each_poll_round_long_before_max_age() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 2, 9, &token).await;
    let dep = Deployment::new();
    let config = write_config(&dep, &sim.address);
    let mut child = spawn_run(&config);
    let store = dep.store_path();
    let addr = status_address(&store).await;
    let mut counters = Default::default();
    for _ in 0..100 {
        let (_, body) = fetch(addr, "/status").await;
        let s: GatewayStatus = serde_json::from_str(&body).unwrap();
        counters = s.counters;
        if counters["batches_committed"] >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(counters["batches_committed"] >= 3, "{counters:?}");
    assert!(counters["batches_sealed_idle"] >= 3, "{counters:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    token.cancel();

    let store = citygate::store::SledStore::open(&store, Default::default()).unwrap();
    let batches =
        citygate::store::Store::peek(&store, citygate::reading::Stream::Readings, 0, 1000).unwrap();
    assert!(batches.len() >= 3, "{} batches", batches.len());
    let opener = dep.opener(&citygate::reading::GatewayId::new("gw-status").unwrap());
    for b in &batches {
        let records = opener.open(&b.bytes).unwrap().records;
        let subjects: std::collections::HashSet<_> = records.iter().map(|r| &r.subject).collect();
        assert_eq!(
            subjects.len(),
            2,
            "a batch holds the whole round: {records:?}"
        );
    }
}

/// issue 10 item 3: `run` limits glibc to one malloc arena by starting itself again with
/// `MALLOC_ARENA_MAX=1` (same pid, so the status endpoint is up under the pid we started),
/// and keeps an operator's own setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_limits_malloc_arenas_unless_the_operator_chose() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 2, 9, &token).await;
    for (given, expected) in [(None, "1"), (Some("4"), "4")] {
        let dep = Deployment::new();
        let config = write_config(&dep, &sim.address);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_citygate"));
        cmd.args(["run", "--config"])
            .arg(&config)
            .env_remove("MALLOC_ARENA_MAX")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(v) = given {
            cmd.env("MALLOC_ARENA_MAX", v);
        }
        let mut child = cmd.spawn().unwrap();
        let store = dep.store_path();
        status_address(&store).await;
        let environ = std::fs::read(format!("/proc/{}/environ", child.id())).unwrap();
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        let setting = format!("MALLOC_ARENA_MAX={expected}");
        if cfg!(target_env = "gnu") {
            assert!(
                vars.contains(&setting.as_bytes()),
                "{given:?}: {}",
                String::from_utf8_lossy(&environ)
            );
        }
        signal(&child, "-TERM");
        let status = wait_exit(&mut child, Duration::from_secs(20)).await;
        assert!(status.success(), "{status}");
    }
    token.cancel();
}

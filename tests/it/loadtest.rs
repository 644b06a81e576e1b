//! `citygate loadtest` end to end: the real binary starts simulators, broker, hub and
//! gateway as processes and accounts for every poll the simulators served. Timings are
//! reported, not asserted.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::{shipped_profiles_dir, wait_exit};

/// Runs a short load test (20 meters on endpoints of 8, 200 ms polls, a 4 s window) with
/// `extra` arguments; returns its JSON report.
async fn loadtest(dir: &Path, extra: &[&str]) -> serde_json::Value {
    let json = dir.join("loadtest.json");
    let out = dir.join("loadtest.out");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_citygate"));
    cmd.args([
        "loadtest",
        "--meters",
        "20",
        "--per-endpoint",
        "8",
        "--interval",
        "200ms",
        "--duration",
        "4s",
        "--warmup",
        "1s",
    ])
    .arg("--profiles-dir")
    .arg(shipped_profiles_dir())
    .arg("--json")
    .arg(&json)
    .args(extra)
    .stdout(std::fs::File::create(&out).unwrap())
    .stderr(std::fs::File::create(dir.join("loadtest.err")).unwrap());
    let mut child = cmd.spawn().unwrap();
    // A bound on a hung run, not a timing check.
    let status = wait_exit(&mut child, Duration::from_secs(150)).await;
    let said = || {
        format!(
            "{}\n{}",
            std::fs::read_to_string(&out).unwrap_or_default(),
            std::fs::read_to_string(dir.join("loadtest.err")).unwrap_or_default()
        )
    };
    assert!(status.success(), "loadtest failed ({status}):\n{}", said());
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("{e}\n{}", said()));
    serde_json::from_str(&text).unwrap()
}

/// Every poll served was delivered once: nothing lost, nothing extra, no duplicate value.
fn assert_exact(r: &serde_json::Value) {
    assert_eq!(r["lost"], 0, "{r:#}");
    assert_eq!(r["extra"], 0, "{r:#}");
    assert_eq!(r["duplicated"], 0, "{r:#}");
    assert!(r["values"].as_u64().unwrap() > 0, "{r:#}");
    assert!(r["served_polls"].as_u64().unwrap() > 0, "{r:#}");
    assert_eq!(r["served_polls"], r["delivered_polls"], "{r:#}");
    assert_eq!(r["gateway_exit_code"], 0, "{r:#}");
    for key in [
        "values_per_s",
        "gateway_cpu_s_per_1k_values",
        "hub_cpu_s_per_1k_values",
        "gateway_rss_mb_median",
        "gateway_rss_mb_peak",
        "hub_rss_mb_median",
        "hub_rss_mb_peak",
    ] {
        assert!(r[key].is_number(), "{key} missing: {r:#}");
    }
}

/// Issue 10 item 4: a short run over Modbus TCP accounts for every served poll.
#[tokio::test]
async fn loadtest_delivers_every_served_poll_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let r = loadtest(dir.path(), &[]).await;
    assert_exact(&r);
    assert!(r["latency_p50_s"].is_number(), "{r:#}");
    assert!(r["latency_p99_s"].is_number(), "{r:#}");
    assert!(r["drain_s"].is_null(), "{r:#}");
    assert_eq!(r["endpoints"], 3);
    assert_eq!(r["transport"], "tcp");
}

/// Issue 10 item 4: with the broker stopped for 2 s the backlog still arrives, exactly
/// once, and the drain time is reported.
#[tokio::test]
async fn loadtest_with_a_broker_outage_reports_the_drain_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = loadtest(dir.path(), &["--outage", "2s@1s"]).await;
    assert_exact(&r);
    assert!(r["drain_s"].as_f64().is_some_and(|d| d >= 0.0), "{r:#}");
    assert_eq!(r["outage"], "2s@1s");
}

/// Issue 10 item 4: meters of another profile behind RTU over TCP are accounted for too.
#[tokio::test]
async fn loadtest_over_rtu_over_tcp_with_another_profile() {
    let dir = tempfile::tempdir().unwrap();
    let r = loadtest(
        dir.path(),
        &["--transport", "rtu-tcp", "--profile", "eastron-sdm630"],
    )
    .await;
    assert_exact(&r);
    assert_eq!(r["transport"], "rtu-tcp");
    assert_eq!(r["profile"], "eastron-sdm630");
}

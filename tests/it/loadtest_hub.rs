//! `citygate loadtest hub` end to end: the real binary runs simulated gateways in its own
//! process against a broker (mosquitto when installed, else `citygate broker`) and hub
//! processes it starts, then accounts for every record in the sinks. Timings are reported,
//! not asserted.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::wait_exit;

/// Runs `citygate loadtest hub` with `args`; returns its exit status, JSON report and output.
pub(crate) async fn loadtest_hub(dir: &Path, args: &[&str]) -> (bool, serde_json::Value, String) {
    let json = dir.join("report.json");
    let out = dir.join("loadtest.out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_citygate"))
        .args(["loadtest", "hub"])
        .args(args)
        .arg("--json")
        .arg(&json)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(dir.join("loadtest.err")).unwrap())
        .spawn()
        .unwrap();
    // A bound on a hung run, not a timing check.
    let status = wait_exit(&mut child, Duration::from_secs(240)).await;
    let said = format!(
        "{}\n{}",
        std::fs::read_to_string(&out).unwrap_or_default(),
        std::fs::read_to_string(dir.join("loadtest.err")).unwrap_or_default()
    );
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("{e}\n{said}"));
    (status.success(), serde_json::from_str(&text).unwrap(), said)
}

/// Issue 13 item 4: 20 gateways for a 10 s window against one JSONL hub that is SIGKILLed
/// once and started again, with 10 % of acks withheld (so batches are re-sent), garbage and
/// forged batches: no record is written twice, every acked batch is in the sink whole,
/// garbage and forged payloads are rejected (counted by the hub) and never acked, re-sent
/// batches are acked again, and the run drains.
#[tokio::test]
async fn fleet_against_a_killed_hub_writes_every_acked_batch_once() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, r, said) = loadtest_hub(
        dir.path(),
        &[
            "--gateways",
            "20",
            "--per-connection",
            "8",
            "--meters",
            "5",
            "--duration",
            "10s",
            "--ack-timeout",
            "1s",
            "--withhold-acks",
            "0.1",
            "--garbage",
            "0.05",
            "--forged",
            "0.05",
            "--kill-hubs",
            "1",
            "--seed",
            "13",
        ],
    )
    .await;
    assert!(ok, "loadtest hub failed:\n{said}\n{r:#}");
    assert_eq!(r["sink"], "jsonl");
    assert_eq!(r["hubs"], 1);
    assert_eq!(r["hub"][0]["restarts"], 1, "{r:#}");
    assert_eq!(r["duplicates_written"], 0, "{r:#}");
    assert_eq!(r["missing_batches"], 0, "{r:#}");
    assert_eq!(r["unexpected_records"], 0, "{r:#}");
    assert_eq!(r["forged_acked"], 0, "{r:#}");
    assert_eq!(r["drained"], true, "{r:#}");
    assert_eq!(r["unacked_batches"], 0, "{r:#}");
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k}: {r:#}"));
    assert!(n("acked_batches") > 100, "{r:#}");
    assert_eq!(n("acked_batches"), n("sealed_batches"), "{r:#}");
    // 5 meters × 6 fields × 1 reading per batch.
    assert_eq!(n("sink_records"), n("acked_batches") * 30, "{r:#}");
    assert!(n("acks_withheld") > 0 && n("acks_for_resends") > 0, "{r:#}");
    // The restarted hub's live `online` reaches every fleet connection, which re-sends its
    // unacked batches at once instead of after the ack timeout (as the uplink does).
    assert!(n("presence_resends") >= n("connections"), "{r:#}");
    assert!(
        n("rejected_garbage") > 0 && n("rejected_forged") > 0,
        "{r:#}"
    );
    for key in [
        "measured_s",
        "acked_in_window_per_s",
        "accepted_batches_per_s",
        "records_per_s",
        "latency_p50_s",
        "latency_p99_s",
        "latency_max_s",
        "hub_cpu_s",
        "records_per_hub_cpu_s",
    ] {
        assert!(r[key].is_number(), "{key} missing: {r:#}");
    }
    assert!(r["hub"][0]["rss_mb_peak"].is_number(), "{r:#}");
    assert!(r["broker"]["rss_mb_peak"].is_number(), "{r:#}");
    assert!(said.contains("duplicates written 0"), "{said}");
}

/// Issue 13 item 4: several hub processes share the load behind the embedded broker (one
/// connection per gateway): each hub writes batches into its own sink, and with no ack
/// withheld every record is written once across them.
#[tokio::test]
async fn three_hubs_behind_the_embedded_broker_share_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, r, said) = loadtest_hub(
        dir.path(),
        &[
            "--broker",
            "embedded",
            "--hubs",
            "3",
            "--gateways",
            "12",
            "--meters",
            "2",
            "--duration",
            "5s",
        ],
    )
    .await;
    assert!(ok, "loadtest hub failed:\n{said}\n{r:#}");
    assert_eq!(r["broker"]["kind"], "citygate broker", "{r:#}");
    assert_eq!(r["connections"], 12, "{r:#}");
    assert_eq!(r["duplicates_written"], 0, "{r:#}");
    assert_eq!(r["missing_batches"], 0, "{r:#}");
    let hubs = r["hub"].as_array().unwrap();
    assert_eq!(hubs.len(), 3);
    for h in hubs {
        assert!(
            h["accepted_batches"].as_u64().unwrap() > 0,
            "a hub took no batch: {r:#}"
        );
    }
}

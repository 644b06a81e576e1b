//! Issue 12: what an operator keeps and checks: log formats, hub configs under `check`.

use std::time::Duration;

use crate::support::*;

/// Starts `citygate hub` on `dir`'s config (a broker nobody listens on, so it logs
/// reconnect warnings), with `env` set, until it has said it serves; then stops it and
/// returns its log.
async fn hub_log(extra_toml: &str, env: &[(&str, &str)]) -> String {
    let dep = Deployment::new();
    let (socket, addr) = reserve_port();
    drop(socket); // nothing listens there
    let path = HubToml::plaintext(addr.port()).write(dep.path());
    let text = std::fs::read_to_string(&path).unwrap() + extra_toml;
    std::fs::write(&path, text).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_citygate"));
    cmd.args(["hub", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (mut child, mut log) = spawn_logged_command(cmd);
    assert!(
        log.wait_for("hub serving", Duration::from_secs(20)).await,
        "{}",
        log.text
    );
    signal(&child, "-TERM");
    wait_exit(&mut child, Duration::from_secs(20)).await;
    log.finish().await.to_owned()
}

/// issue 12 item 1: `[log] format = "json"` makes every log line one JSON object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_with_json_logs_writes_one_object_per_line() {
    let log = hub_log("\n[log]\nformat = \"json\"\n", &[]).await;
    let lines: Vec<&str> = log.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.len() >= 2, "{log}");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
}

/// issue 12 item 1: text logs under systemd (`JOURNAL_STREAM` set) carry no colours and no
/// timestamp of their own (journald stamps each line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_under_systemd_are_plain_lines_without_timestamps() {
    let log = hub_log("", &[("JOURNAL_STREAM", "8:12345")]).await;
    assert!(!log.contains('\u{1b}'), "{log}");
    for line in log.lines().filter(|l| !l.is_empty()) {
        let level = line.trim_start().split(' ').next().unwrap();
        assert!(
            ["INFO", "WARN", "ERROR", "DEBUG", "TRACE"].contains(&level),
            "{line}"
        );
    }
}

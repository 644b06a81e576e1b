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

/// issue 12 item 2: `citygate run` with MQTT meters from `citygate sim` (two meters
/// configured, two unknown, malformed and oversized payloads in between, debug logging of
/// citygate on) logs the warnings, and no line of its log carries a simulated meter's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_logs_name_no_meter_key() {
    use citygate::mqtt::{BrokerOptions, CertAuthority, EmbeddedBroker};
    let pki_dir = tempfile::tempdir().unwrap();
    let ca = CertAuthority::generate(pki_dir.path(), "citygate test ca").unwrap();
    let server = ca.issue_localhost_server().unwrap();
    let broker = EmbeddedBroker::start(BrokerOptions::localhost(ca.server_files(&server))).unwrap();
    let port = broker.tls_addr().port();

    let profile = "oem-nbiot-water-mqtt";
    let dep = Deployment::new();
    let devices = [
        mqtt_source_toml("meters", port, &TlsFiles::client(&ca, "gw-test"), ""),
        mqtt_device_toml("flat-1", profile, "meters", "water/+/up", Some("W0001")),
        mqtt_device_toml("flat-2", profile, "meters", "water/+/up", Some("W0002")),
    ]
    .concat();
    let config = GatewayToml::new("gw-test", &["volume_forward", "flow_rate"])
        .shipped_profiles()
        .devices(&devices)
        .write(dep.path());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_citygate"));
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info,citygate=debug");
    let (mut gateway, mut log) = spawn_logged_command(cmd);
    assert!(
        log.wait_for("mqtt source connected", Duration::from_secs(20))
            .await,
        "{}",
        log.text
    );

    let sim_client = ca.issue_client("sim").unwrap();
    let sim = std::process::Command::new(env!("CARGO_BIN_EXE_citygate"))
        .args(["sim", "--profile", profile, "--count", "4"])
        .args(["--interval", "50ms", "--malformed-every", "1"])
        .args(["--topic", "water/{key}/up", "--profiles-dir"])
        .arg(shipped_profiles_dir())
        .args(["--mqtt-broker", &format!("localhost:{port}"), "--ca-file"])
        .arg(ca.ca_file())
        .arg("--cert-file")
        .arg(&sim_client.cert)
        .arg("--key-file")
        .arg(&sim_client.key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sim = KillOnDrop(sim);
    for needle in [
        "oversized mqtt message dropped",
        "no device listens on",
        "mqtt payload rejected",
        "mqtt payload fields unusable",
    ] {
        let seen = log.text.contains(needle) || log.wait_for(needle, Duration::from_secs(30)).await;
        assert!(seen, "no {needle:?} in:\n{}", log.text);
    }
    drop(sim);
    signal(&gateway, "-TERM");
    wait_exit(&mut gateway, Duration::from_secs(30)).await;
    let text = log.finish().await;
    for key in ["W0001", "W0002", "W0003", "W0004"] {
        assert!(!text.contains(key), "{key} in the gateway's log:\n{text}");
    }
    assert!(text.contains("device=flat-1"), "{text}");
}

fn citygate(args: &[&std::ffi::OsStr]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_citygate"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// issue 12 item 5: `check` validates a hub config: the shipped example passes and shows
/// the registry; an error is located by file:line and key (exit 64).
#[test]
fn check_validates_a_hub_config() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hub.example.toml");
    let (code, out, err) = citygate(&["check".as_ref(), "--config".as_ref(), example.as_os_str()]);
    assert_eq!(code, Some(0), "{err}");
    for needle in [
        "(hub)",
        "hub       city-hub-01",
        "approves billing",
        "hpke_secret_key",
    ] {
        assert!(out.contains(needle), "{needle:?} missing in:\n{out}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = HubToml::plaintext(1883).write(dir.path());
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("state_path = ", "state_paht = ")).unwrap();
    let (code, _, err) = citygate(&["check".as_ref(), "--config".as_ref(), path.as_os_str()]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("hub.toml:5:"), "{err}");
    assert!(err.contains("state_paht"), "{err}");
    assert!(!err.contains("expected one of `gateway`"), "{err}");
}

/// issue 12 item 5: a gateway config without `profiles_dir` finds `firmware-profiles`
/// beside it; without one there, the error names the key and the places looked in.
#[test]
fn profiles_dir_defaults_beside_the_config_and_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = GatewayToml::new("gw-test", &["voltage_l1"])
        .devices(&device_toml(
            "m1",
            "chint-ddsu666",
            "127.0.0.1:1502",
            1,
            "1s",
        ))
        .write(dir.path());
    let (code, _, err) = citygate(&["check".as_ref(), "--config".as_ref(), path.as_os_str()]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("gateway.profiles_dir"), "{err}");
    let beside = dir.path().join("firmware-profiles");
    assert!(err.contains(&beside.display().to_string()), "{err}");
    assert!(
        err.contains("/usr/share/citygate/firmware-profiles"),
        "{err}"
    );
    std::fs::create_dir(&beside).unwrap();
    let shipped = shipped_profiles_dir().join("chint-ddsu666.toml");
    std::fs::copy(shipped, beside.join("chint-ddsu666.toml")).unwrap();
    let (code, out, err) = citygate(&["check".as_ref(), "--config".as_ref(), path.as_os_str()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&format!("profiles  {}", beside.display())),
        "{out}"
    );
}

/// issue 12 item 5: a hub running its own broker starts, subscribes each filter once and
/// stops cleanly on SIGTERM without an ERROR line (rumqttd reported the hub's own clean
/// DISCONNECT as `ERROR router-drop`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_hub_shutdown_with_its_own_broker_logs_no_error() {
    use citygate::mqtt::CertAuthority;
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let path = HubToml::embedded_broker(
        "127.0.0.1:0",
        &TlsFiles::client(&ca, "hub-1"),
        &TlsFiles::localhost_server(&ca),
    )
    .write(dep.path());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_citygate"));
    cmd.args(["hub", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG");
    let (mut child, mut log) = spawn_logged_command(cmd);
    assert!(
        log.wait_for("hub presence: online", Duration::from_secs(20))
            .await,
        "{}",
        log.text
    );
    signal(&child, "-TERM");
    let status = wait_exit(&mut child, Duration::from_secs(20)).await;
    let text = log.finish().await;
    assert!(status.success(), "{text}");
    assert!(text.contains("hub stopped"), "{text}");
    let errors: Vec<&str> = text.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let mut added: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split("Adding subscription on topic ").nth(1))
        .collect();
    assert!(!added.is_empty(), "{text}");
    let n = added.len();
    added.sort_unstable();
    added.dedup();
    assert_eq!(added.len(), n, "a filter subscribed twice:\n{text}");
}

/// A child process killed (and reaped) when the test ends, panicking or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

//! `citygate probe` and `citygate scan` against `citygate sim`, and their one-line
//! errors.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn citygate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_citygate"))
}

fn profiles_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("firmware-profiles")
}

/// `citygate sim` serving Modbus TCP and RTU over TCP; killed on drop.
struct Sim {
    child: Child,
    tcp: String,
    rtu_tcp: String,
}

impl Sim {
    fn start() -> Sim {
        let mut child = citygate()
            .args(["sim", "--profile", "chint-ddsu666", "--count", "2"])
            .args(["--listen", "127.0.0.1:0", "--rtu-listen", "127.0.0.1:0"])
            .arg("--profiles-dir")
            .arg(profiles_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut tcp, mut rtu_tcp) = (None, None);
        while tcp.is_none() || rtu_tcp.is_none() {
            let line = lines.next().expect("sim prints its endpoints").unwrap();
            let addr = |l: &str| {
                l.split_whitespace()
                    .find(|w| w.starts_with("127.0.0.1:"))
                    .map(str::to_string)
            };
            if line.contains("rtu over tcp") {
                rtu_tcp = addr(&line);
            } else if line.starts_with("serving 2 x") {
                tcp = addr(&line);
            }
        }
        Sim {
            child,
            tcp: tcp.unwrap(),
            rtu_tcp: rtu_tcp.unwrap(),
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = citygate()
        .args(args)
        .arg("--profiles-dir")
        .arg(profiles_dir())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run_scan(args: &[&str]) -> (Option<i32>, String, String) {
    let out = citygate().args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn probe_prints_the_decoded_table_over_rtu_and_tcp() {
    let sim = Sim::start();
    for flag in ["--rtu-tcp", "--tcp"] {
        let addr = if flag == "--tcp" {
            &sim.tcp
        } else {
            &sim.rtu_tcp
        };
        let (code, out, err) = run(&[
            "probe",
            "--profile",
            "chint-ddsu666",
            flag,
            addr,
            "--unit",
            "2",
        ]);
        assert_eq!(code, Some(0), "{flag}: {err}");
        for needle in ["voltage", "active_power", "good", "register", "quality"] {
            assert!(out.contains(needle), "{flag}: missing {needle:?} in\n{out}");
        }
        // Raw registers are shown as hex words.
        assert!(
            out.lines().any(|l| l.contains("voltage")
                && l.split_whitespace()
                    .any(|w| w.len() == 4 && w.chars().all(|c| c.is_ascii_hexdigit()))),
            "{out}"
        );
    }
    let (code, out, err) = run(&[
        "probe",
        "--profile",
        "chint-ddsu666",
        "--rtu-tcp",
        &sim.rtu_tcp,
        "--unit",
        "1",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let fields = doc["fields"].as_array().unwrap();
    assert!(fields.len() >= 5);
    assert!(fields.iter().all(|f| f["quality"] == "good"), "{out}");
    assert!(fields
        .iter()
        .all(|f| !f["raw"].as_array().unwrap().is_empty()));

    let (code, out, err) = run_scan(&[
        "scan",
        "--rtu-tcp",
        &sim.rtu_tcp,
        "--units",
        "1-4",
        "--timeout",
        "200ms",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let units: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(units, ["1", "2"], "{out}");
}

#[test]
fn probe_errors_are_one_line_with_a_nonzero_exit() {
    // A port held bound but not listening: connecting is refused, and no other process
    // can take the port while the test runs.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = held.local_addr().unwrap().to_string();
    let cases: [(&[&str], i32, &str); 4] = [
        (&["--tcp", &closed, "--unit", "1"], 1, "connection refused"),
        (
            &["--rtu-tcp", &closed, "--unit", "1"],
            1,
            "connection refused",
        ),
        (
            &[
                "--serial",
                "/dev/citygate-no-such-port",
                "--baud",
                "9600",
                "--unit",
                "1",
            ],
            1,
            "no such device",
        ),
        (&["--tcp", &closed, "--unit", "0"], 64, "--unit"),
    ];
    for (args, want, needle) in cases {
        let mut all = vec!["probe", "--profile", "chint-ddsu666"];
        all.extend_from_slice(args);
        let (code, out, err) = run(&all);
        assert_eq!(code, Some(want), "{args:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let sim = Sim::start();
    let (code, _, err) = run(&[
        "probe",
        "--profile",
        "chint-ddsu666",
        "--rtu-tcp",
        &sim.rtu_tcp,
        "--unit",
        "9",
        "--timeout",
        "200ms",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no answer"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[tokio::test]
async fn probe_on_a_port_held_by_another_process_says_busy() {
    use tokio_serial::SerialPort;
    let (_master, slave) = tokio_serial::SerialStream::pair().unwrap();
    let path = slave.name().unwrap();
    let line = citygate::source::rtu::DEFAULT_LINE;
    // Held exclusively, as a running gateway holds its bus.
    let _held = citygate::source::rtu::transport::open_serial(&path, &line).unwrap();
    let (code, out, err) = run(&[
        "probe",
        "--profile",
        "chint-ddsu666",
        "--serial",
        &path,
        "--unit",
        "1",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("port busy"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn check_prints_rtu_buses_with_cycle_time_and_warns_when_overloaded() {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/gateway.rtu.example.toml");
    let out = citygate()
        .args(["check", "--config"])
        .arg(&example)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bus = stdout
        .lines()
        .find(|l| l.contains("serial:///dev/ttyUSB0") && l.contains("request(s)/cycle"))
        .unwrap_or_else(|| panic!("no bus line in\n{stdout}"));
    assert!(
        bus.contains("9600 8N1") && bus.contains("3 device(s)") && bus.contains("ms on the wire"),
        "{bus}"
    );
    assert!(!stdout.contains("WARNING"), "{stdout}");

    // The same bus polled every 100 ms cannot be carried at 9600 baud.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&example)
        .unwrap()
        .replace(
            "profiles_dir = \"../firmware-profiles\"",
            &format!("profiles_dir = {:?}", profiles_dir().display().to_string()),
        )
        .replace("poll_interval = \"5s\"", "poll_interval = \"100ms\"")
        .replace(
            "\nflows = [",
            &format!(
                "\ndir = {:?}\nflows = [",
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("config/policies")
                    .display()
                    .to_string()
            ),
        );
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, text).unwrap();
    let out = citygate()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bus = stdout
        .lines()
        .find(|l| l.contains("serial:///dev/ttyUSB0"))
        .unwrap();
    assert!(bus.contains("WARNING"), "{bus}");
}

/// issue 12 item 5: `scan` reports progress on stderr and stops when its `--budget` is
/// spent, saying what it covered and how to scan the rest.
#[test]
fn scan_reports_progress_and_stops_at_its_budget() {
    let sim = Sim::start();
    let (code, out, err) = run_scan(&[
        "scan",
        "--tcp",
        &sim.tcp,
        "--units",
        "1-247",
        "--timeout",
        "50ms",
        "--budget",
        "1s",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("unit   1  answers"), "{out}");
    assert!(err.contains("unit ids tried"), "{err}");
    let stopped = out
        .lines()
        .find(|l| l.starts_with("stopped: the --budget of 1s ran out after"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(stopped.contains("scan the rest with --units "), "{stopped}");
    assert!(!stopped.contains("after 247 of"), "{stopped}");
}

/// issue 12 item 5: `probe` with an MQTT profile says so instead of polling; `probe` and
/// `sim` with a missing profile directory say that (exit 64), not "invalid configuration".
#[test]
fn probe_refuses_mqtt_profiles_and_missing_profile_dirs_are_named() {
    let (code, _, err) = run(&[
        "probe",
        "--profile",
        "oem-nbiot-water-mqtt",
        "--tcp",
        "127.0.0.1:9",
        "--unit",
        "1",
    ]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("profile oem-nbiot-water-mqtt is an MQTT profile; probe reads Modbus meters"),
        "{err}"
    );
    let empty = tempfile::tempdir().unwrap();
    for args in [
        &[
            "probe",
            "--profile",
            "x",
            "--tcp",
            "127.0.0.1:9",
            "--unit",
            "1",
        ][..],
        &["sim", "--profile", "x", "--listen", "127.0.0.1:0"][..],
    ] {
        let out = citygate()
            .args(args)
            .current_dir(empty.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert!(err.contains("no profile directory"), "{err}");
        assert!(err.contains("firmware-profiles"), "{err}");
        assert!(!err.contains("invalid configuration"), "{err}");
        let missing = empty.path().join("nope");
        let out = citygate()
            .args(args)
            .arg("--profiles-dir")
            .arg(&missing)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert!(
            err.contains("no such directory of device profiles"),
            "{err}"
        );
    }
}

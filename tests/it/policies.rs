//! The shipped purpose policies end to end (issue 11 acceptance, first bullet): simulated
//! meters → gateway running billing, grid-operation, leak-detection and open-data side by
//! side → embedded broker with mutual TLS → hub approving every flow → JSON Lines. What the
//! sink holds is checked against what the simulator served.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use citygate::mqtt::{BrokerOptions, CertAuthority, EmbeddedBroker};
use citygate::reading::{DeviceId, UnitId};
use citygate::sim::SimMeters;
use citygate::supervisor::KeyMaterial;
use tokio_util::sync::CancellationToken;

use crate::mqtt_rig::{publish, water_payload, MqttRig};
use crate::support::*;

/// The shipped `config/policies/` directory.
fn shipped_policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies")
}

/// A Modbus TCP meter in `area`.
fn area_device(name: &str, profile: &str, address: &str, unit: u8, area: &str) -> String {
    let d = device_toml(name, profile, address, unit, "250ms");
    format!("{}\narea = \"{area}\"\n\n", d.trim_end())
}

/// A served engineering value as the gateway forwards it: an f32 as its shortest decimal,
/// then the unit factor (kWh → Wh).
fn canonical(v: f64, factor: f64) -> f64 {
    let f = v as f32;
    let v = if f64::from(f) == v {
        f.to_string().parse::<f64>().unwrap()
    } else {
        v
    };
    v * factor
}

fn close(got: f64, want: f64, scale: f64) -> bool {
    (got - want).abs() <= 1e-9 * scale.abs().max(want.abs()).max(1.0)
}

/// One simulated meter the gateway polls.
struct Meter {
    sim: SimMeters,
    unit: UnitId,
    profile: String,
    area: &'static str,
}

impl Meter {
    /// The first `n` values of `field` the simulator served, as the gateway forwards them.
    fn served(&self, profiles: &citygate::profile::ProfileSet, field: &str, n: usize) -> Vec<f64> {
        let f = profiles.get(&self.profile).unwrap().field(field).unwrap();
        let h = self.sim.history(self.unit);
        assert!(h.len() >= n, "{n} samples covered, {} served", h.len());
        h[..n]
            .iter()
            .map(|s| canonical(s.values[&f.name], f.unit.factor))
            .collect()
    }
}

/// A per-device function over served values (the reference).
fn reference(function: &str, xs: &[f64]) -> f64 {
    match function {
        "delta" => xs.last().unwrap() - xs.first().unwrap(),
        "mean" => xs.iter().sum::<f64>() / xs.len() as f64,
        "min" => xs.iter().copied().fold(f64::INFINITY, f64::min),
        "max" => xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        "sum" => xs.iter().sum(),
        "last" => *xs.last().unwrap(),
        other => panic!("unexpected function {other}"),
    }
}

/// Window records of one series combined: (value, samples, windows). Deltas and sums add,
/// minima and maxima combine, means are weighted by their samples.
fn combine(function: &str, windows: &[&serde_json::Value]) -> (f64, u64) {
    let samples: u64 = windows
        .iter()
        .map(|l| l["window"]["samples"].as_u64().unwrap())
        .sum();
    let vals = windows.iter().map(|l| l["value"].as_f64().unwrap());
    let value = match function {
        "delta" | "sum" => vals.sum(),
        "min" => vals.fold(f64::INFINITY, f64::min),
        "max" => vals.fold(f64::NEG_INFINITY, f64::max),
        "mean" => {
            windows
                .iter()
                .map(|l| {
                    l["value"].as_f64().unwrap() * l["window"]["samples"].as_u64().unwrap() as f64
                })
                .sum::<f64>()
                / samples as f64
        }
        other => panic!("unexpected function {other}"),
    };
    (value, samples)
}

/// Issue 11 acceptance, first bullet (items 1, 2, 3, 4, 5, 9): 17 simulated DDSU666 meters
/// (10 in area `north`, 5 in `mid`, 2 in `south`) and 2 TUF-2000M water meters (`south`)
/// under the four shipped policies. In the hub's sink: no field outside the policies, no
/// device name, subjects are per-purpose pseudonyms or `area:<name>`, every record carries
/// its stream's purpose, a window and the key epoch; every per-meter and area aggregate
/// equals the reference computed from the simulator's served history; areas under k
/// (grid-operation k=5: `south`; open-data k=10: `mid`, `south`) produce no aggregate and
/// are counted in `aggregates_suppressed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_policies_end_to_end_match_what_the_meters_served() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let elec = start_sim(&profiles, "chint-ddsu666", 17, 31, &token).await;
    let water = start_sim(&profiles, "oem-tuf-2000m", 2, 32, &token).await;
    let dep = Deployment::new();
    let ca = CertAuthority::generate(&dep.path().join("pki"), "citygate test ca").unwrap();
    let server = ca.issue_localhost_server().unwrap();
    let broker = EmbeddedBroker::start(BrokerOptions::localhost(ca.server_files(&server))).unwrap();
    let port = broker.tls_addr().port();

    let mut meters: BTreeMap<String, Meter> = BTreeMap::new();
    let mut devices = String::new();
    for u in 1..=17u8 {
        let area = match u {
            1..=10 => "north",
            11..=15 => "mid",
            _ => "south",
        };
        let name = format!("dev-e{u:02}");
        devices += &area_device(&name, "chint-ddsu666", &elec.address, u, area);
        let m = Meter {
            sim: elec.meters.clone(),
            unit: UnitId(u),
            profile: "chint-ddsu666".into(),
            area,
        };
        meters.insert(name, m);
    }
    for u in 1..=2u8 {
        let name = format!("dev-w{u:02}");
        devices += &area_device(&name, "oem-tuf-2000m", &water.address, u, "south");
        let m = Meter {
            sim: water.meters.clone(),
            unit: UnitId(u),
            profile: "oem-tuf-2000m".into(),
            area: "south",
        };
        meters.insert(name, m);
    }
    let flows = ["billing", "grid-operation", "leak-detection", "open-data"];
    let toml = GatewayToml::new("gw-test", &[])
        .policies(&shipped_policies_dir(), &flows, Some("alarms"))
        // A generous timeout: a poll the simulator served must reach the gateway.
        .modbus("2s", "2s")
        .devices(&devices);
    let cfg = dep.load_config(&toml, profiles.clone());
    let stamps: Vec<_> = citygate::supervisor::policy_stamps(&cfg);
    assert_eq!(stamps.len(), 5, "four flows and alarms");
    let approved: Vec<_> = stamps.iter().map(|(_, s)| s.clone()).collect();
    let hub = start_hub_approving(dep.path(), &ca, port, &approved).await;
    let (store, running) = start_gateway(&cfg);
    let metrics = running.metrics.clone();
    let uplink = start_uplink(&cfg, &running, &ca, port, 8, Duration::from_secs(3)).await;

    // A few seconds of polling: every meter polled about 15 times.
    assert!(
        wait_for(Duration::from_secs(60), || metrics.samples_polled.get()
            >= 19 * 15)
        .await,
        "polls: {}",
        metrics.samples_polled.get()
    );
    elec.meters.stop_answering();
    water.meters.stop_answering();
    assert!(running.shutdown(Duration::from_secs(10)).await);
    assert!(
        wait_for(Duration::from_secs(30), || store.stats().total_batches()
            == 0)
        .await,
        "store did not drain: {:?}",
        store.stats()
    );
    uplink.finish(Duration::ZERO).await;
    token.cancel();
    let hub_stats = hub.hub().stats();
    hub.shutdown().await;
    broker.shutdown();
    assert!(
        hub_stats.rejected.values().all(|n| *n == 0),
        "{hub_stats:?}"
    );

    let text = std::fs::read_to_string(dep.path().join("records.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as u64, metrics.records_sealed.get());

    // No field a policy does not name; no device name anywhere.
    for never in [
        "current_l1",
        "apparent_power",
        "meter_address",
        "volume_net",
    ] {
        assert!(
            !text.contains(&format!("\"field\":\"{never}\"")),
            "{never} left the box"
        );
    }
    for name in meters.keys() {
        assert!(
            !text.contains(name.as_str()),
            "device name {name} in the sink"
        );
    }

    // Subjects: per-purpose pseudonyms, stable, different between purposes.
    let keys = KeyMaterial::load(&cfg.keys).unwrap();
    let epoch = keys.pseudonym.epoch();
    let purpose_of: HashMap<String, String> = stamps
        .iter()
        .map(|(stream, s)| (stream.to_string(), s.purpose.to_string()))
        .collect();
    let mut subject_of: HashMap<(String, String), String> = HashMap::new();
    let mut seen_subjects: BTreeMap<String, String> = BTreeMap::new();
    for f in cfg.policies.flows.iter().chain(&cfg.policies.alarms) {
        let policy = f.policy.with_key(keys.pseudonym.clone());
        for name in meters.keys() {
            let s = policy.subject(&DeviceId::new(name.clone()).unwrap());
            assert!(
                s.len() == 34
                    && s.starts_with("p-")
                    && s[2..].chars().all(|c| c.is_ascii_hexdigit()),
                "{s}"
            );
            if let Some(other) = seen_subjects.insert(s.clone(), policy.name().to_string()) {
                panic!("{name}: one subject under {other} and {}", policy.name());
            }
            subject_of.insert((policy.name().to_string(), s), name.clone());
        }
    }

    // Group the aggregates: per meter by (purpose, device, field, function); per area by
    // (purpose, area, field, function).
    let mut per_meter: BTreeMap<(String, String, String, String), Vec<&serde_json::Value>> =
        BTreeMap::new();
    let mut per_area: BTreeMap<(String, String, String, String), Vec<&serde_json::Value>> =
        BTreeMap::new();
    for l in &lines {
        let stream = l["stream"].as_str().unwrap();
        let purpose = l["purpose"].as_str().unwrap().to_string();
        assert_eq!(purpose_of[stream], purpose, "{l}");
        match epoch {
            0 => assert!(l.get("epoch").is_none(), "{l}"),
            e => assert_eq!(l["epoch"].as_u64(), Some(u64::from(e)), "{l}"),
        }
        if purpose == "alarms" {
            continue;
        }
        let w = &l["window"];
        assert!(
            w.is_object(),
            "every record of these policies is an aggregate: {l}"
        );
        let function = w["function"].as_str().unwrap().to_string();
        let field = l["field"].as_str().unwrap().to_string();
        let subject = l["subject"].as_str().unwrap();
        if let Some(area) = subject.strip_prefix("area:") {
            per_area
                .entry((purpose, area.to_string(), field, function))
                .or_default()
                .push(l);
        } else {
            let device = subject_of
                .get(&(purpose.clone(), subject.to_string()))
                .unwrap_or_else(|| panic!("subject of no device under {purpose}: {l}"));
            per_meter
                .entry((purpose, device.clone(), field, function))
                .or_default()
                .push(l);
        }
    }

    // Per-meter aggregates equal the reference over the samples they cover.
    let mut polls: HashMap<String, usize> = HashMap::new();
    for ((purpose, device, field, function), windows) in &per_meter {
        let (value, samples) = combine(function, windows);
        let served = meters[device].served(&profiles, field, samples as usize);
        let want = reference(function, &served);
        let scale = served.iter().fold(0.0f64, |a, b| a.max(b.abs()));
        assert!(
            close(value, want, scale),
            "{purpose} {device} {field} {function}: sink {value}, served {want}"
        );
        if purpose == "billing" && field == "energy_import" || field == "volume_forward" {
            polls.insert(device.clone(), samples as usize);
        }
    }
    let expect_series = |purpose: &str, field: &str, function: &str, profile: &str| {
        for (name, m) in &meters {
            if m.profile == profile {
                let key = (purpose.into(), name.clone(), field.into(), function.into());
                assert!(per_meter.contains_key(&key), "no {key:?}");
            }
        }
    };
    expect_series("billing", "energy_import", "delta", "chint-ddsu666");
    expect_series("billing", "volume_forward", "delta", "oem-tuf-2000m");
    expect_series("leak-detection", "volume_forward", "delta", "oem-tuf-2000m");
    for f in ["min", "mean", "max"] {
        expect_series("grid-operation", "voltage_l1", f, "chint-ddsu666");
    }
    for m in meters.values() {
        assert!(m.sim.history(m.unit).len() >= 10, "too few polls");
    }

    // Area aggregates: the across-function over each device's own window value.
    let area_devices = |area: &str, profile: &str| -> Vec<&String> {
        meters
            .iter()
            .filter(|(_, m)| m.area == area && m.profile == profile)
            .map(|(n, _)| n)
            .collect()
    };
    let mut area_checked = 0;
    for ((purpose, area, field, function), windows) in &per_area {
        let devs = area_devices(area, "chint-ddsu666");
        let across = windows[0]["tags"][0].as_str().unwrap().to_string();
        let samples: u64 = windows
            .iter()
            .map(|l| l["window"]["samples"].as_u64().unwrap())
            .sum();
        let total_polls: usize = devs.iter().map(|d| polls[*d]).sum();
        assert_eq!(samples as usize, total_polls, "{purpose} {area} {field}");
        for w in windows {
            assert_eq!(
                w["window"]["devices"].as_u64(),
                Some(devs.len() as u64),
                "{w}"
            );
        }
        // Across several windows only deltas combine exactly (the run crossed a boundary).
        if windows.len() > 1 && function != "delta" {
            continue;
        }
        let per_device: Vec<f64> = devs
            .iter()
            .map(|d| reference(function, &meters[*d].served(&profiles, field, polls[*d])))
            .collect();
        let want = match across.as_str() {
            "across=sum" => per_device.iter().sum::<f64>(),
            "across=mean" => per_device.iter().sum::<f64>() / per_device.len() as f64,
            other => panic!("unexpected {other}"),
        };
        let got: f64 = windows.iter().map(|l| l["value"].as_f64().unwrap()).sum();
        let scale = devs
            .iter()
            .flat_map(|d| meters[*d].served(&profiles, field, polls[*d]))
            .fold(0.0f64, |a, b| a.max(b.abs()))
            * devs.len() as f64;
        assert!(
            close(got, want, scale),
            "{purpose} {area} {field} {function} {across}: sink {got}, served {want}"
        );
        area_checked += 1;
    }
    assert!(area_checked >= 4, "{area_checked} area aggregates checked");

    // k-anonymity: grid-operation (k=5) for north and mid, not south; open-data (k=10)
    // for north only.
    let areas_of = |purpose: &str, field: &str| -> BTreeSet<&str> {
        per_area
            .keys()
            .filter(|(p, _, f, _)| p == purpose && f == field)
            .map(|(_, a, _, _)| a.as_str())
            .collect()
    };
    for field in [
        "active_power",
        "reactive_power",
        "energy_import",
        "frequency",
    ] {
        assert_eq!(
            areas_of("grid-operation", field),
            BTreeSet::from(["mid", "north"]),
            "{field}"
        );
    }
    assert_eq!(
        areas_of("open-data", "energy_import"),
        BTreeSet::from(["north"])
    );
    assert!(areas_of("open-data", "volume_forward").is_empty());
    // grid-operation: south × 4 fields; open-data: mid and south energy, south water.
    assert!(
        metrics.aggregates_suppressed.get() >= 7,
        "suppressed: {}",
        metrics.aggregates_suppressed.get()
    );
}

/// Issue 11 acceptance, first bullet ("counter reset and rollover cases included"; item 1
/// `delta`): two MQTT water meters under the shipped billing policy, one whose counter is
/// reset (meter replaced: 100 → 101 → 3 → 3.5 m³) and one that rolls over at its
/// profile's 10⁸ m³ (99 999 990 → 99 999 995 → 2 → 4). The hub's sink holds the day's
/// delta per meter as the reference computes it: the reset counts from zero (4.5, marked
/// `counter_backwards`), the rollover as `r - prev + v` (14), never negative.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_reset_and_rollover_reach_the_sink_as_reference_deltas() {
    let rig = MqttRig::new();
    let series: [(&str, [f64; 5]); 2] = [
        ("W0001", [100.0, 100.5, 101.0, 3.0, 3.5]),
        ("W0002", [99_999_990.0, 99_999_995.0, 2.0, 4.0, 4.0]),
    ];
    let cfg = rig.config(&shipped_policies_dir(), &["billing"], &["W0001", "W0002"]);
    let approved: Vec<_> = citygate::supervisor::policy_stamps(&cfg)
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    let hub = start_hub_approving(rig.dep.path(), &rig.ca, rig.port, &approved).await;
    let (store, running) = start_gateway(&cfg);
    let metrics = running.metrics.clone();
    let uplink = start_uplink(&cfg, &running, &rig.ca, rig.port, 8, Duration::from_secs(3)).await;
    let link = rig.meters_link(&metrics).await;
    let received = metrics.mqtt_messages.get();
    // One second apart, inside the last minute (one UTC day unless it just turned).
    let t0 = (citygate::reading::now_ms() / 1000 - 30) * 1000;
    for (i, step) in (0..5).zip(0i64..) {
        for (key, values) in &series {
            let topic = format!("water/{key}/up");
            publish(
                &link,
                &topic,
                water_payload(key, values[i], 0.1, t0 + step * 1000),
            )
            .await;
        }
    }
    assert!(
        wait_for(Duration::from_secs(20), || metrics.mqtt_messages.get()
            >= received + 10)
        .await,
        "messages: {}",
        metrics.mqtt_messages.get()
    );
    assert!(running.shutdown(Duration::from_secs(10)).await);
    assert!(
        wait_for(Duration::from_secs(30), || store.stats().total_batches()
            == 0)
        .await,
        "store did not drain: {:?}",
        store.stats()
    );
    uplink.finish(Duration::ZERO).await;
    hub.shutdown().await;
    let lines = rig.sink();
    rig.broker.shutdown();

    let keys = KeyMaterial::load(&cfg.keys).unwrap();
    let policy = cfg.policies.flows[0]
        .policy
        .with_key(keys.pseudonym.clone());
    for (key, want, quality) in [
        ("W0001", 1.0 + 3.0 + 0.5, "uncertain:counter_backwards"),
        (
            "W0002",
            5.0 + (100_000_000.0 - 99_999_995.0 + 2.0) + 2.0,
            "",
        ),
    ] {
        let subject = policy.subject(&DeviceId::new(crate::mqtt_rig::device_name(key)).unwrap());
        let windows: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| l["subject"] == subject.as_str() && l["field"] == "volume_forward")
            .collect();
        assert!(!windows.is_empty(), "no delta for {key}: {lines:?}");
        for w in &windows {
            assert_eq!(w["window"]["function"], "delta", "{w}");
            assert!(w["value"].as_f64().unwrap() >= 0.0, "negative delta: {w}");
        }
        let (got, samples) = combine("delta", &windows);
        assert_eq!(samples, 5, "{key}: {windows:?}");
        assert!(
            (got - want).abs() < 1e-6,
            "{key}: sink {got}, reference {want}"
        );
        if !quality.is_empty() {
            assert!(
                windows.iter().any(|w| w["quality"] == quality),
                "{key}: {windows:?}"
            );
        }
    }
}

/// Issue 11 acceptance, first bullet (item 1, windows close on the clock): a policy with a
/// 1-minute window, written by the test. A meter's only sample falls in a window that ended
/// more than the engine's lateness ago (the meter uploads late), so no later sample closes
/// it: the running gateway closes it on its own, and a complete (`partial: false`)
/// aggregate reaches the hub's sink while the gateway still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_window_closes_on_its_own_while_the_gateway_runs() {
    let rig = MqttRig::new();
    let dir = rig.dep.path().join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("minute.toml"),
        "[purpose]\nname = \"minute\"\ndescription = \"one-minute mean flow\"\n\
         legal_basis = \"test\"\nowner = \"test\"\nretention = \"1d\"\n\n\
         [[rule]]\nfield = \"flow_rate\"\naction = \"aggregate\"\nfunction = \"mean\"\nwindow = \"1m\"\n",
    )
    .unwrap();
    let cfg = rig.config(&dir, &["minute"], &["W0001"]);
    let approved: Vec<_> = citygate::supervisor::policy_stamps(&cfg)
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    let hub = start_hub_approving(rig.dep.path(), &rig.ca, rig.port, &approved).await;
    let (_store, running) = start_gateway(&cfg);
    let metrics = running.metrics.clone();
    let uplink = start_uplink(&cfg, &running, &rig.ca, rig.port, 8, Duration::from_secs(3)).await;
    let link = rig.meters_link(&metrics).await;
    // At the start of the minute that started three minutes ago (a first reading later in
    // its window would make the window partial: the meter was not followed from its start).
    let minute = (citygate::reading::now_ms() / 60_000 - 3) * 60_000;
    publish(
        &link,
        "water/W0001/up",
        water_payload("W0001", 5.0, 1.25, minute),
    )
    .await;

    let keys = KeyMaterial::load(&cfg.keys).unwrap();
    let subject = cfg.policies.flows[0]
        .policy
        .with_key(keys.pseudonym.clone())
        .subject(&DeviceId::new(crate::mqtt_rig::device_name("W0001")).unwrap());
    let closed =
        |l: &serde_json::Value| l["subject"] == subject.as_str() && l["field"] == "flow_rate";
    assert!(
        wait_for(Duration::from_secs(30), || rig.sink().iter().any(closed)).await,
        "no aggregate reached the sink while running; hub {:?}",
        hub.hub().stats()
    );
    let lines = rig.sink();
    let rec = lines.iter().find(|l| closed(l)).unwrap();
    assert_eq!(rec["window"]["partial"], false, "{rec}");
    assert_eq!(rec["window"]["function"], "mean", "{rec}");
    assert_eq!(rec["window"]["start_ms"], minute, "{rec}");
    assert_eq!(rec["window"]["end_ms"], minute + 60_000, "{rec}");
    assert_eq!(rec["window"]["samples"], 1, "{rec}");
    assert_eq!(rec["value"].as_f64(), Some(1.25), "{rec}");
    assert_eq!(rec["purpose"], "minute", "{rec}");

    assert!(running.shutdown(Duration::from_secs(10)).await);
    uplink.finish(Duration::from_secs(5)).await;
    hub.shutdown().await;
    rig.broker.shutdown();
}

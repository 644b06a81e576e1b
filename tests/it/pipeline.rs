//! The gateway end to end: simulated meters over Modbus TCP on loopback → poll →
//! normalise → check → minimise → seal → commit, then the hub's side opens the batches.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use citygate::reading::{DeviceId, UnitId, Value};
use citygate::sim::{Fault, SimMeters};
use citygate::store::{SledStore, Store, StoreOptions};
use citygate::supervisor::{self, KeyMaterial};
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// Purpose for these tests: some measurements, one identifier; everything else dropped.
const PURPOSE: &[&str] = &[
    "active_power",
    "energy_import",
    "voltage_l1",
    "meter_address",
    "volume_forward",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_batches_decrypt_to_what_the_meters_served() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let elec = start_sim(&profiles, "chint-ddsu666", 3, 1, &token).await;
    let water_name = "oem-tuf-2000m".to_string();
    let water = start_sim(&profiles, &water_name, 2, 2, &token).await;
    let dep = Deployment::new();
    let mut devices = String::new();
    let mut units: HashMap<String, (SimMeters, UnitId, String)> = HashMap::new();
    for u in 1..=3u8 {
        let name = format!("house-{u}");
        devices += &device_toml(&name, "chint-ddsu666", &elec.address, u, "300ms");
        units.insert(
            name,
            (elec.meters.clone(), UnitId(u), "chint-ddsu666".into()),
        );
    }
    for u in 1..=2u8 {
        let name = format!("water-{u}");
        devices += &device_toml(&name, &water_name, &water.address, u, "300ms");
        units.insert(name, (water.meters.clone(), UnitId(u), water_name.clone()));
    }
    let cfg = dep.config(
        &PURPOSE
            .iter()
            .copied()
            .filter(|f| profiles.iter().any(|p| p.field(f).is_some()))
            .collect::<Vec<_>>(),
        &devices,
        profiles.clone(),
    );
    let keys = KeyMaterial::load(&cfg.keys).unwrap();
    let policy = supervisor::policy(&cfg, keys.pseudonym.clone());
    let store: Arc<dyn Store> =
        Arc::new(SledStore::open(&cfg.store.path, StoreOptions::default()).unwrap());
    let running = supervisor::start(&cfg, keys, store.clone());
    let metrics = running.metrics.clone();
    let enough = wait_for(Duration::from_secs(20), || {
        metrics.batches_committed.get() >= 6
    })
    .await;
    assert!(
        enough,
        "only {} batches committed",
        metrics.batches_committed.get()
    );
    assert!(running.shutdown(Duration::from_secs(10)).await);
    token.cancel();

    let opener = dep.opener(&cfg.gateway_id);
    let opened = open_all(store.as_ref(), &opener);
    let records: usize = opened.iter().map(|b| b.records.len()).sum();
    assert_eq!(
        records as u64,
        metrics.records_sealed.get(),
        "every sealed record is committed and opens"
    );
    assert!(records > 0);
    // Issue 11 item 2: every batch names its purpose beside the policy hash.
    let stamp = supervisor::policy_stamp(&cfg, &policy).unwrap();
    assert!(opened
        .iter()
        .all(|b| b.header.policy_hash == stamp.hash
            && b.header.purpose.as_ref() == Some(&stamp.purpose)));

    let by_subject: BTreeMap<String, &String> = units
        .keys()
        .map(|n| (policy.subject(&DeviceId::new(n.clone()).unwrap()), n))
        .collect();
    let mut checked = 0;
    for batch in &opened {
        for rec in &batch.records {
            assert!(
                PURPOSE.contains(&rec.field.as_str()),
                "field {} should have been dropped",
                rec.field
            );
            let device = by_subject
                .get(&rec.subject)
                .unwrap_or_else(|| panic!("unknown subject {}", rec.subject));
            let (meters, unit, profile_name) = &units[*device];
            let field = profiles
                .get(profile_name)
                .unwrap()
                .field(&rec.field)
                .unwrap();
            assert_eq!(rec.unit, field.unit.canonical, "{}", rec.field);
            if field.class.is_identifying() {
                match &rec.value {
                    Value::Text(t) => assert!(t.starts_with("p-"), "{t}"),
                    other => panic!("identifier {} left in clear: {other:?}", rec.field),
                }
                continue;
            }
            let v = rec.value.as_f64().unwrap();
            let served = meters
                .history(*unit)
                .iter()
                .filter_map(|s| s.values.get(&field.name).copied())
                .any(|eng| (eng * field.unit.factor - v).abs() <= 1e-9 * v.abs().max(1.0));
            assert!(
                served,
                "{device} {} = {v} was never served by the simulator",
                rec.field
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
    let dropped = profiles
        .get("chint-ddsu666")
        .unwrap()
        .fields
        .iter()
        .filter(|f| !PURPOSE.contains(&f.name.as_str()))
        .count();
    assert!(dropped > 0, "the test must exercise dropped fields");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_meter_does_not_delay_the_others() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 3, 3, &token).await;
    sim.meters.set_fault(UnitId(2), Fault::Silent);
    let dep = Deployment::new();
    let devices: String = (1..=3u8)
        .map(|u| device_toml(&format!("m{u}"), "chint-ddsu666", &sim.address, u, "200ms"))
        .collect();
    let cfg = dep.config(&["active_power"], &devices, profiles);
    let keys = KeyMaterial::load(&cfg.keys).unwrap();
    let store: Arc<dyn Store> = Arc::new(citygate::store::MemStore::default());
    let running = supervisor::start(&cfg, keys, store);
    let metrics = running.metrics.clone();
    // Fifteen polls of each healthy meter (about 3 s at 200 ms); the silent one costs one
    // 300 ms timeout per backoff period (200 ms, 400 ms, 800 ms, … capped at 2 s).
    let m1 = DeviceId::new("m1").unwrap();
    let m3 = DeviceId::new("m3").unwrap();
    let cycles = 15;
    assert!(
        wait_for(Duration::from_secs(30), || [&m1, &m3]
            .iter()
            .all(|m| metrics.device(m).polls_ok >= cycles))
        .await,
        "{:?} {:?}",
        metrics.device(&m1),
        metrics.device(&m3)
    );
    assert!(running.shutdown(Duration::from_secs(5)).await);
    token.cancel();
    let (s1, s2, s3) = (
        metrics.device(&m1),
        metrics.device(&DeviceId::new("m2").unwrap()),
        metrics.device(&m3),
    );
    assert_eq!(s2.polls_ok, 0);
    assert!(
        s2.timeouts >= 1 && s2.timeouts <= 6,
        "silent meter polled {} times in {cycles} cycles",
        s2.timeouts
    );
    // The healthy meters keep in step: neither waits on the other or on the silent one.
    assert!(
        s1.polls_ok.abs_diff(s3.polls_ok) <= 1 && s1.timeouts + s3.timeouts == 0,
        "{s1:?} {s3:?}"
    );
}

/// A meter that rejects the profile's registers as an illegal data address is asked once
/// per planned read, not on every poll; its neighbour on the endpoint keeps its schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_illegal_address_is_reported_once_not_hammered() {
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let sim = start_sim(&profiles, "chint-ddsu666", 2, 4, &token).await;
    sim.meters.set_fault(
        UnitId(1),
        Fault::Exception(tokio_modbus::ExceptionCode::IllegalDataAddress),
    );
    let planned = citygate::source::modbus::plan(profiles.get("chint-ddsu666").unwrap()).len();
    let dep = Deployment::new();
    let devices: String = (1..=2u8)
        .map(|u| device_toml(&format!("m{u}"), "chint-ddsu666", &sim.address, u, "100ms"))
        .collect();
    let cfg = dep.config(&["active_power"], &devices, profiles);
    let keys = KeyMaterial::load(&cfg.keys).unwrap();
    let store: Arc<dyn Store> = Arc::new(citygate::store::MemStore::default());
    let running = supervisor::start(&cfg, keys, store);
    let metrics = running.metrics.clone();
    let m2 = DeviceId::new("m2").unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || metrics.device(&m2).polls_ok
            >= 10)
        .await
    );
    assert!(running.shutdown(Duration::from_secs(5)).await);
    token.cancel();
    let s1 = metrics.device(&DeviceId::new("m1").unwrap());
    assert_eq!(
        sim.meters.requests_served(UnitId(1)),
        planned as u64,
        "each rejected read was sent once"
    );
    assert_eq!(s1.polls_ok, 0);
    assert!(s1.exceptions >= 5, "every poll still reports why: {s1:?}");
    assert!(
        s1.last_error
            .as_deref()
            .is_some_and(|e| e.contains("Illegal data address")),
        "{s1:?}"
    );
}

/// Alarm bits of a water meter are sealed into the `alarms` stream (first state, then only
/// changes until the standing-state period), measurements into `readings`; a secondary-side
/// meter's currents arrive multiplied by its configured CT ratio.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarm_bits_travel_on_the_alarms_stream_and_ratios_apply() {
    use citygate::reading::Stream;
    let profiles = shipped_profiles();
    let token = CancellationToken::new();
    let water = start_sim(&profiles, "xintai-water-meter", 2, 5, &token).await;
    let feeder = start_sim(&profiles, "acrel-adl400", 1, 6, &token).await;
    let dep = Deployment::new();
    let mut devices: String = (1..=2u8)
        .map(|u| {
            device_toml(
                &format!("tap-{u}"),
                "xintai-water-meter",
                &water.address,
                u,
                "100ms",
            )
        })
        .collect();
    devices += &device_toml("feeder-1", "acrel-adl400", &feeder.address, 1, "200ms").replace(
        "poll_interval = \"200ms\"",
        "poll_interval = \"200ms\"\nct_ratio = 40",
    );
    let alarm_fields = ["valve_fault", "battery_low"];
    let purpose = [
        "volume_forward",
        "valve_open",
        "valve_fault",
        "battery_low",
        "current_l1",
    ];
    let cfg = dep.config(&purpose, &devices, profiles.clone());
    assert_eq!(cfg.devices[2].ratios.ct, 40.0);
    let keys = KeyMaterial::load(&cfg.keys).unwrap();
    let policy = supervisor::policy(&cfg, keys.pseudonym.clone());
    let store: Arc<dyn Store> = Arc::new(citygate::store::MemStore::default());
    let running = supervisor::start(&cfg, keys, store.clone());
    let metrics = running.metrics.clone();
    // 2 water meters × 2 alarm bits: at least 4 alarm records (the first state of each).
    let enough = wait_for(Duration::from_secs(20), || {
        metrics.alarm_repeats_held.get() >= 40 && metrics.batches_committed.get() >= 4
    })
    .await;
    assert!(
        enough,
        "held {} alarm repeats, committed {} batches",
        metrics.alarm_repeats_held.get(),
        metrics.batches_committed.get()
    );
    assert!(running.shutdown(Duration::from_secs(10)).await);
    token.cancel();

    let opened = open_all(store.as_ref(), &dep.opener(&cfg.gateway_id));
    let subject = |name: &str| policy.subject(&DeviceId::new(name).unwrap());
    let taps: BTreeMap<String, UnitId> = (1..=2u8)
        .map(|u| (subject(&format!("tap-{u}")), UnitId(u)))
        .collect();
    let mut last_alarm: HashMap<(String, String), Value> = HashMap::new();
    let (mut alarms, mut volumes, mut currents) = (0, 0, 0);
    for batch in &opened {
        for rec in &batch.records {
            let is_alarm = alarm_fields.contains(&rec.field.as_str());
            assert_eq!(
                batch.header.stream == Stream::Alarms,
                is_alarm,
                "{} sealed into {}",
                rec.field,
                batch.header.stream
            );
            if is_alarm {
                alarms += 1;
                let unit = taps[&rec.subject];
                let Value::Bool(on) = rec.value else {
                    panic!("alarm bit {} is {:?}", rec.field, rec.value)
                };
                let served = water.meters.history(unit).iter().any(|s| {
                    s.values[&citygate::reading::FieldName::new(rec.field.clone()).unwrap()]
                        == f64::from(u8::from(on))
                });
                assert!(served, "{} = {on} never served", rec.field);
                // On change only (the standing-state period, 15 min, is not reached).
                let key = (rec.subject.clone(), rec.field.clone());
                if let Some(prev) = last_alarm.insert(key, rec.value.clone()) {
                    assert_ne!(prev, rec.value, "{} repeated without a change", rec.field);
                }
            }
            if rec.field == "volume_forward" {
                volumes += 1;
            }
            if rec.field == "current_l1" {
                assert_eq!(rec.subject, subject("feeder-1"));
                let field = profiles
                    .get("acrel-adl400")
                    .unwrap()
                    .field("current_l1")
                    .unwrap();
                let v = rec.value.as_f64().unwrap();
                let primary = feeder
                    .meters
                    .history(UnitId(1))
                    .iter()
                    .any(|s| (s.values[&field.name] * 40.0 - v).abs() < 1e-9 * v.max(1.0));
                assert!(
                    primary,
                    "current_l1 {v} A is not 40 × a served secondary value"
                );
                currents += 1;
            }
        }
    }
    assert!(alarms >= 4, "{alarms} alarm records");
    assert_eq!(
        last_alarm.len(),
        4,
        "every alarm bit of every tap sent its state"
    );
    assert!(
        volumes > alarms,
        "measurements go out every poll ({volumes}), alarms on change ({alarms})"
    );
    assert!(currents > 0);
}

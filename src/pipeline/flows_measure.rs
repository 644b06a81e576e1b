//! Measurement (ignored test): the sealed bytes that leave the box per meter per day under
//! each shipped policy, against no minimisation (every field at full resolution). A day of
//! synthetic readings (every 5 s, realistic values) of 10 electricity and 10 water meters in
//! one area goes through the real flows and the real sealer, in batches of up to 5000
//! records. Run with:
//!
//! ```text
//! cargo test --release --lib measure_bytes_per_meter_per_day -- --ignored --nocapture
//! ```

use std::path::Path;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Flow, Flows};
use crate::policy::CompiledPolicy;
use crate::profile::{Counter, Profile, ProfileSet, Ratios};
use crate::reading::{AreaId, DeviceId, GatewayId, Quality, Reading, Record, Stream, Value};
use crate::seal::{HubSecretKey, PseudonymKey, Sealer};

const METERS: usize = 10;
const POLL_MS: i64 = 5_000;
const DAY_MS: i64 = 86_400_000;
/// 2026-11-30T00:00:00+08:00: a civil day in Asia/Shanghai.
const START_MS: i64 = 1_764_432_000_000;

fn profile(name: &str) -> Arc<Profile> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware-profiles");
    ProfileSet::load_dir(&dir)
        .unwrap()
        .get(name)
        .unwrap()
        .clone()
}

fn policy(text: &str, file: &str) -> Arc<CompiledPolicy> {
    Arc::new(
        CompiledPolicy::parse(
            Path::new(file),
            text,
            jiff::tz::TimeZone::get("Asia/Shanghai").unwrap(),
            PseudonymKey::from_bytes([7; 32]),
        )
        .unwrap(),
    )
}

fn shipped(name: &str) -> Arc<CompiledPolicy> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("config/policies/{name}.toml"));
    policy(&std::fs::read_to_string(&path).unwrap(), name)
}

/// Every field of `p` at full resolution (identifiers as pseudonyms): no minimisation.
fn everything(p: &[&Profile]) -> Arc<CompiledPolicy> {
    let mut text = String::from(
        "[purpose]\nname = \"everything\"\ndescription = \"-\"\nlegal_basis = \"-\"\nowner = \"-\"\nretention = \"1d\"\n",
    );
    for f in p.iter().flat_map(|p| &p.fields) {
        let action = if f.class.is_identifying() {
            "pseudonymise"
        } else {
            "pass"
        };
        text.push_str(&format!(
            "[[rule]]\nfield = \"{}\"\naction = \"{action}\"\n",
            f.name
        ));
    }
    policy(&text, "everything")
}

/// A plausible value for field `name` of meter `m` at poll `i`, as a real meter shows it.
fn value(
    name: &str,
    m: usize,
    i: i64,
    counter: Counter,
    rng: &mut ChaCha8Rng,
    state: &mut f64,
) -> Value {
    let round = |x: f64, places: i32| (x * 10f64.powi(places)).round() / 10f64.powi(places);
    if matches!(counter, Counter::Monotonic { .. }) {
        *state += rng.gen_range(0.0..0.5);
        return Value::Float(round(*state, 2));
    }
    let v = match name {
        n if n.starts_with("voltage") => 220.0 + rng.gen_range(-6.0..6.0),
        n if n.contains("current") => rng.gen_range(0.0..12.0),
        n if n.contains("power_factor") => rng.gen_range(0.85..1.0),
        n if n.contains("power") => rng.gen_range(0.0..3000.0),
        "frequency" => 50.0 + rng.gen_range(-0.05..0.05),
        "flow_rate" => rng.gen_range(0.0..1.2),
        "pressure" => rng.gen_range(200_000.0..400_000.0),
        n if n.contains("temp") => rng.gen_range(8.0..14.0),
        n if n.contains("battery") => 3.6,
        _ => return Value::Int(((m as i64) << 8) + (i % 2)),
    };
    Value::Float(round(v, 2))
}

/// Sealed bytes per meter per day of `policies` (each its own flow) over a synthetic day.
fn bytes_per_meter_day(policies: &[Arc<CompiledPolicy>], profiles: &[Arc<Profile>]) -> (f64, f64) {
    let flows: Vec<Flow> = policies
        .iter()
        .enumerate()
        .map(|(i, p)| Flow::new(Stream::flow(i).unwrap(), p.clone(), &[]))
        .collect();
    let devices: Vec<(DeviceId, Arc<Profile>)> = profiles
        .iter()
        .flat_map(|p| {
            (0..METERS).map(move |m| (DeviceId::new(format!("{}-{m}", p.name)).unwrap(), p.clone()))
        })
        .collect();
    let area = AreaId::new("feeder-7").unwrap();
    let mut flows = Flows::new(flows, None).with_areas(
        devices
            .iter()
            .map(|(d, _)| (d.clone(), area.clone()))
            .collect(),
    );
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut counters = vec![0.0f64; devices.len() * 64];
    let mut out: Vec<(Stream, Record)> = Vec::new();
    let mut records = 0usize;
    let mut bytes = 0usize;
    let sealer = Sealer::new(
        GatewayId::new("gw-measure").unwrap(),
        ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
        HubSecretKey::from_bytes(&[2; 32]).public_key(),
        1,
    );
    let stamp = crate::seal::PolicyStamp::gateway();
    let mut open: Vec<Vec<Record>> = vec![Vec::new(); Stream::COUNT];
    let seal = |batch: &mut Vec<Record>, bytes: &mut usize| {
        if !batch.is_empty() {
            *bytes += sealer
                .seal(Stream::Readings, 1, 0, &stamp, batch)
                .unwrap()
                .bytes
                .len();
            batch.clear();
        }
    };
    for i in 0..DAY_MS / POLL_MS {
        let at = START_MS + i * POLL_MS;
        for (k, (device, p)) in devices.iter().enumerate() {
            for (j, f) in p.fields.iter().enumerate() {
                let reading = Reading {
                    device: device.clone(),
                    field: f.name.clone(),
                    value: value(
                        f.name.as_str(),
                        k,
                        i,
                        f.counter,
                        &mut rng,
                        &mut counters[k * 64 + j],
                    ),
                    unit: f.unit.canonical,
                    at_ms: at,
                    quality: Quality::Good,
                    class: f.class,
                };
                if f.stream == Stream::Readings {
                    flows.apply(&reading, f, Ratios::default(), &mut out);
                }
            }
        }
        flows.close_due(at, &mut out);
        for (s, r) in out.drain(..) {
            records += 1;
            open[s.index()].push(r);
            if open[s.index()].len() >= 5000 {
                seal(&mut open[s.index()], &mut bytes);
            }
        }
        if i % 12 == 0 {
            // A batch leaves at least every minute.
            for b in &mut open {
                seal(b, &mut bytes);
            }
        }
    }
    flows.close_due(START_MS + DAY_MS + 3_600_000, &mut out);
    for (s, r) in out.drain(..) {
        records += 1;
        open[s.index()].push(r);
    }
    for b in &mut open {
        seal(b, &mut bytes);
    }
    let meters = devices.len() as f64;
    (bytes as f64 / meters, records as f64 / meters)
}

#[test]
#[ignore = "measurement; prints numbers"]
fn measure_bytes_per_meter_per_day() {
    let elec = profile("chint-ddsu666");
    let water = profile("xintai-water-meter");
    for (label, profiles) in [
        ("electricity (chint-ddsu666)", vec![elec.clone()]),
        ("water (xintai-water-meter)", vec![water.clone()]),
    ] {
        let plain: Vec<&Profile> = profiles.iter().map(|p| p.as_ref()).collect();
        println!(
            "\n{label}, {METERS} meters in one area, polled every {} s:",
            POLL_MS / 1000
        );
        println!("| policy | records/meter/day | sealed bytes/meter/day |");
        println!("|---|---|---|");
        let mut rows: Vec<(String, Vec<Arc<CompiledPolicy>>)> = vec![(
            "no minimisation (every field, full resolution)".into(),
            vec![everything(&plain)],
        )];
        for name in ["billing", "grid-operation", "leak-detection", "open-data"] {
            rows.push((name.into(), vec![shipped(name)]));
        }
        rows.push((
            "all four side by side".into(),
            ["billing", "grid-operation", "leak-detection", "open-data"]
                .map(shipped)
                .to_vec(),
        ));
        for (name, policies) in rows {
            let (bytes, records) = bytes_per_meter_day(&policies, &profiles);
            println!("| {name} | {records:.1} | {bytes:.0} |");
        }
    }
}

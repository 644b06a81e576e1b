//! Per-reading cost of the gateway's hot path: normalise → check → minimise → seal →
//! commit (sled append + flush), measured per batch of readings from real profiles.
//!
//! `cargo bench --bench pipeline`; criterion reports time per batch and, through
//! `Throughput::Elements`, readings per second. Stages are also measured alone so a
//! regression can be located. `policy/aggregate` runs normalise → check → the purpose
//! policy engine with aggregation on (per-device 15-min means and daily counter deltas, an
//! area aggregate with k-anonymity), one round of samples a second, closing windows as
//! they fall due; `policy/end_to_end` adds sealing and committing what it emits. `batcher` runs the async batcher task (transforms, then sealing
//! on a blocking thread) on a two-worker runtime, samples in, sealed batches out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use citygate::config::BatchConfig;
use citygate::pipeline::{Batcher, Flow, Flows, SAMPLES_CHANNEL_CAPACITY, SEALED_CHANNEL_CAPACITY};
use citygate::policy::{CompiledPolicy, DeviceCtx, Engine};
use citygate::profile::Ratios;
use citygate::profile::{decode, Profile, ProfileSet, RawValue};
use citygate::reading::{AreaId, DeviceId, FieldName, GatewayId, Quality, Record, Stream};
use citygate::seal::PseudonymKey;
use citygate::seal::Sealer;
use citygate::source::{RawSample, RegisterImage, SampleData};
use citygate::store::{SledStore, Store, StoreOptions};
use citygate::transform::check::Checker;
use citygate::transform::normalise::normalise;

const DEVICES: usize = 100;

fn profile() -> Arc<Profile> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware-profiles");
    ProfileSet::load_dir(&dir)
        .unwrap()
        .get("chint-dtsu666")
        .unwrap()
        .clone()
}

/// A plausible register image for every field of `p`.
fn image(p: &Profile) -> RegisterImage {
    let mut img = RegisterImage::new();
    for f in &p.fields {
        let eng = f.range.map_or(1.0, |(lo, hi)| (lo + hi) / 2.0);
        let raw = (eng - f.offset) / f.scale;
        img.insert(
            f.address,
            decode::encode(f.ty, f.order, RawValue::Float(raw)),
        );
    }
    img
}

/// A policy passing two thirds of the profile's fields at full resolution (identifying ones
/// as pseudonyms), the rest denied: the pass-through path of the policy engine.
fn policy(p: &Profile) -> Arc<CompiledPolicy> {
    let mut text = String::from(
        "[purpose]\nname = \"bench\"\ndescription = \"-\"\nlegal_basis = \"-\"\nowner = \"-\"\nretention = \"1d\"\n",
    );
    for f in p.fields.iter().take(p.fields.len() * 2 / 3) {
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
    Arc::new(
        CompiledPolicy::parse(
            Path::new("bench.toml"),
            &text,
            jiff::tz::TimeZone::UTC,
            PseudonymKey::from_bytes([7; 32]),
        )
        .unwrap(),
    )
}

fn records(
    p: &Profile,
    img: &RegisterImage,
    engine: &mut Engine,
    checker: &mut Checker,
    devices: &[DeviceId],
) -> (usize, Vec<Record>) {
    let mut readings = 0;
    let mut out = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let subject = engine.policy().subject(d);
        let ctx = DeviceCtx {
            device: d,
            subject: &subject,
            area: None,
            ratios: Ratios::UNITY,
        };
        let n = normalise(p, d, 1_700_000_000_000 + i as i64, img);
        readings += n.readings.len();
        for mut r in n.readings {
            let field = p.field(r.field.as_str()).unwrap();
            if checker.check(field, &mut r) != Quality::Good {
                black_box(&r);
            }
            engine.accept(&r, field, &ctx, &mut out);
        }
    }
    (readings, out)
}

fn bench(c: &mut Criterion) {
    let p = profile();
    let img = image(&p);
    let pol = policy(&p);
    let devices: Vec<DeviceId> = (0..DEVICES)
        .map(|i| DeviceId::new(format!("meter-{i}")).unwrap())
        .collect();
    let mut checker = Checker::new();
    let (readings, recs) = records(
        &p,
        &img,
        &mut Engine::new(pol.clone()),
        &mut checker,
        &devices,
    );
    let new_sealer = || {
        Sealer::new(
            GatewayId::new("bench-gw").unwrap(),
            ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
            citygate::seal::HubSecretKey::from_bytes(&[2; 32]).public_key(),
            0x5eed,
        )
    };
    let stamp = citygate::seal::PolicyStamp::new(
        citygate::reading::PurposeName::new("bench").unwrap(),
        pol.hash(&[]),
    );
    let sealer = new_sealer();
    let _ = FieldName::new("x");

    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(readings as u64));
    let mut engine = Engine::new(pol.clone());
    g.bench_function("normalise_check_minimise", |b| {
        b.iter(|| black_box(records(&p, &img, &mut engine, &mut checker, &devices)))
    });
    g.bench_function("seal", |b| {
        b.iter(|| black_box(sealer.seal(Stream::Readings, 1, 0, &stamp, &recs).unwrap()))
    });

    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("store"), StoreOptions::default()).unwrap();
    let mut seq = 1u64;
    g.bench_function("commit", |b| {
        let bytes = sealer
            .seal(Stream::Readings, 1, 0, &stamp, &recs)
            .unwrap()
            .bytes;
        b.iter(|| {
            store.append(Stream::Readings, seq, &bytes).unwrap();
            store.flush().unwrap();
            store.ack(Stream::Readings, seq).unwrap();
            seq += 1;
        })
    });
    g.bench_function("end_to_end", |b| {
        b.iter_batched(
            || (),
            |_| {
                let (_, recs) = records(&p, &img, &mut engine, &mut checker, &devices);
                let sealed = sealer
                    .seal(Stream::Readings, seq, 0, &stamp, &recs)
                    .unwrap();
                store.append(Stream::Readings, seq, &sealed.bytes).unwrap();
                store.flush().unwrap();
                store.ack(Stream::Readings, seq).unwrap();
                seq += 1;
            },
            BatchSize::SmallInput,
        )
    });

    // Four full batches per round of samples, and the rest sealed when the input closes.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let metrics = Arc::new(citygate::telemetry::Metrics::default());
    let cfg = BatchConfig {
        max_age: std::time::Duration::from_secs(3600),
        min_interval: std::time::Duration::ZERO,
        max_records: recs.len() / 4,
        alarm_state_every: std::time::Duration::from_secs(3600),
        checkpoint_every: std::time::Duration::from_secs(30),
    };
    g.bench_function("batcher", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (samples_tx, samples_rx) = tokio::sync::mpsc::channel(SAMPLES_CHANNEL_CAPACITY);
                let (sealed_tx, mut sealed_rx) =
                    tokio::sync::mpsc::channel(SEALED_CHANNEL_CAPACITY);
                let batcher = Batcher::new(
                    samples_rx,
                    sealed_tx,
                    new_sealer(),
                    Flows::new(vec![Flow::new(Stream::Readings, pol.clone(), &[])], None),
                    cfg,
                    |_| 1,
                    metrics.clone(),
                );
                let task = tokio::spawn(batcher.run());
                for (i, d) in devices.iter().enumerate() {
                    let sample = RawSample {
                        device: d.clone(),
                        profile: p.clone(),
                        at_ms: 1_700_000_000_000 + i as i64,
                        data: SampleData::Registers(img.clone()),
                        ratios: Ratios::UNITY,
                    };
                    samples_tx.send(sample).await.unwrap();
                }
                drop(samples_tx);
                let mut sealed = 0;
                while let Some(batch) = sealed_rx.recv().await {
                    sealed += 1;
                    black_box(batch);
                }
                task.await.unwrap();
                sealed
            })
        })
    });
    g.finish();
    println!(
        "batch: {DEVICES} devices x {} fields = {readings} readings -> {} records, envelope {} bytes",
        p.fields.len(),
        recs.len(),
        sealer.seal(Stream::Readings, 1, 0, &stamp, &recs).unwrap().bytes.len()
    );
}

/// A policy with aggregation on every measurement the bench profile has.
const AGGREGATE_POLICY: &str = r#"
[purpose]
name = "bench-grid-operation"
description = "bench"
legal_basis = "bench"
owner = "bench"
retention = "30d"

[[rule]]
field = "energy_import"
action = "aggregate"
function = "delta"
window = "1d"

[[rule]]
field = "energy_export"
action = "aggregate"
function = "delta"
window = "1d"

[[rule]]
field = "active_power"
action = "aggregate"
function = "mean"
window = "15m"
over = "area"

[[rule]]
field = "active_power"
action = "aggregate"
function = "max"
window = "15m"

[[rule]]
category = "measurement"
action = "aggregate"
function = "mean"
window = "15m"
"#;

struct PolicyFlow {
    engine: Engine,
    checker: Checker,
    subjects: Vec<String>,
    areas: Vec<AreaId>,
    now_ms: i64,
}

impl PolicyFlow {
    fn new() -> Self {
        let policy = CompiledPolicy::parse(
            Path::new("bench.toml"),
            AGGREGATE_POLICY,
            jiff::tz::TimeZone::get("Asia/Shanghai").unwrap(),
            PseudonymKey::from_bytes([7; 32]).with_epoch(1),
        )
        .unwrap();
        let subjects = (0..DEVICES)
            .map(|i| policy.subject(&DeviceId::new(format!("meter-{i}")).unwrap()))
            .collect();
        Self {
            engine: Engine::new(Arc::new(policy)),
            checker: Checker::new(),
            subjects,
            areas: (0..DEVICES)
                .map(|i| AreaId::new(format!("feeder-{}", i % 10)).unwrap())
                .collect(),
            now_ms: 1_700_000_000_000,
        }
    }

    /// One round: every device's readings, one second after the last round.
    fn round(&mut self, p: &Profile, img: &RegisterImage, devices: &[DeviceId]) -> Vec<Record> {
        self.now_ms += 1_000;
        let mut out = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            let n = normalise(p, d, self.now_ms + i as i64, img);
            let ctx = DeviceCtx {
                device: d,
                subject: &self.subjects[i],
                area: Some(&self.areas[i]),
                ratios: Ratios::UNITY,
            };
            for mut r in n.readings {
                let field = p.field(r.field.as_str()).unwrap();
                self.checker.check(field, &mut r);
                self.engine.accept(&r, field, &ctx, &mut out);
            }
        }
        self.engine.close_due(self.now_ms, &mut out);
        out
    }
}

fn bench_policy(c: &mut Criterion) {
    let p = profile();
    let img = image(&p);
    let devices: Vec<DeviceId> = (0..DEVICES)
        .map(|i| DeviceId::new(format!("meter-{i}")).unwrap())
        .collect();
    let readings = normalise(&p, &devices[0], 0, &img).readings.len() * DEVICES;
    let sealer = Sealer::new(
        GatewayId::new("bench-gw").unwrap(),
        ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
        citygate::seal::HubSecretKey::from_bytes(&[2; 32]).public_key(),
        0x5eed,
    );
    let policy = PolicyFlow::new().engine.policy().clone();
    let stamp = citygate::seal::PolicyStamp::new(
        citygate::reading::PurposeName::new(policy.name()).unwrap(),
        policy.hash(&[]),
    );
    let mut g = c.benchmark_group("policy");
    g.throughput(Throughput::Elements(readings as u64));
    let mut flow = PolicyFlow::new();
    g.bench_function("aggregate", |b| {
        b.iter(|| black_box(flow.round(&p, &img, &devices)))
    });
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("store"), StoreOptions::default()).unwrap();
    let mut flow = PolicyFlow::new();
    let mut seq = 1u64;
    g.bench_function("end_to_end", |b| {
        b.iter(|| {
            let recs = flow.round(&p, &img, &devices);
            if !recs.is_empty() {
                let sealed = sealer
                    .seal(Stream::Readings, seq, 0, &stamp, &recs)
                    .unwrap();
                store.append(Stream::Readings, seq, &sealed.bytes).unwrap();
                store.flush().unwrap();
                store.ack(Stream::Readings, seq).unwrap();
                seq += 1;
            }
        })
    });
    // A checkpoint of the flow's open windows (what goes with every aggregate batch and
    // every checkpoint_every): the engine's snapshot, its encoding and zstd, as
    // `pipeline::checkpoint` does (encryption adds a ChaCha20-Poly1305 pass over the result).
    let mut size = 0;
    let mut windows = PolicyFlow::new();
    windows.round(&p, &img, &devices);
    let open = windows.engine.snapshot().open_windows();
    assert!(open >= DEVICES, "every device has open windows");
    g.throughput(Throughput::Elements(DEVICES as u64));
    g.bench_function("checkpoint", |b| {
        b.iter(|| {
            let state = windows.engine.snapshot();
            let bytes = bincode::serde::encode_to_vec(&state, bincode::config::standard()).unwrap();
            let bytes = zstd::bulk::compress(&bytes, 3).unwrap();
            size = bytes.len();
            black_box(bytes)
        })
    });
    g.finish();
    println!(
        "policy: checkpoint of {DEVICES} devices' open windows: {size} bytes ({open} windows)"
    );
    println!(
        "policy: {DEVICES} devices x {} fields = {readings} readings a round; engine {:?}",
        p.fields.len(),
        flow.engine.stats()
    );
}

criterion_group!(benches, bench, bench_policy);
criterion_main!(benches);

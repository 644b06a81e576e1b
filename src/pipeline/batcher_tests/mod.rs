//! The batcher's tests: shared fixtures and sealing by size, sequence and stream stamp here;
//! poll rounds in `rounds.rs`; emergency flows and checkpoints in `flows.rs`.

use std::path::Path;
use std::time::Duration;

use super::*;
use crate::pipeline::Flow;
use crate::policy::CompiledPolicy;
use crate::profile::{decode, Field, Profile, ProfileSet, Ratios, RawValue};
use crate::reading::{DeviceId, GatewayId, Value};
use crate::seal::{HubSecretKey, PseudonymKey};
use crate::source::RegisterImage;

fn profile() -> Arc<Profile> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware-profiles");
    ProfileSet::load_dir(&dir)
        .unwrap()
        .get("chint-dtsu666")
        .unwrap()
        .clone()
}

fn image(p: &Profile) -> RegisterImage {
    let mut img = RegisterImage::new();
    for f in &p.fields {
        let eng = f.range.map_or(1.0, |(lo, hi)| (lo + hi) / 2.0);
        img.insert(
            f.address,
            decode::encode(f.ty, f.order, RawValue::Float((eng - f.offset) / f.scale)),
        );
    }
    img
}

fn sealer() -> Sealer {
    Sealer::new(
        GatewayId::new("gw-batcher").unwrap(),
        ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
        HubSecretKey::from_bytes(&[2; 32]).public_key(),
        1,
    )
}

/// A policy that passes `fields` as they are (pseudonymising identifiers).
fn passing(fields: &[&Field]) -> Arc<CompiledPolicy> {
    let mut text = String::from(
        "[purpose]\nname = \"test\"\ndescription = \"t\"\nlegal_basis = \"t\"\nowner = \"t\"\nretention = \"1d\"\n",
    );
    for f in fields {
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
            Path::new("test.toml"),
            &text,
            jiff::tz::TimeZone::UTC,
            PseudonymKey::from_bytes([7; 32]),
        )
        .unwrap(),
    )
}

/// Flows passing every field of `p`: its readings on `readings`, its alarms on `alarms`.
fn flows_passing(p: &Profile) -> Flows {
    let fields: Vec<&Field> = p.fields.iter().collect();
    let policy = passing(&fields);
    Flows::new(
        vec![Flow::new(Stream::Readings, policy.clone(), &[])],
        Some(Flow::new(Stream::Alarms, policy, &[])),
    )
}

/// The stamp of [`flows_passing`]'s readings flow.
fn stamp() -> PolicyStamp {
    Flow::new(Stream::Readings, passing(&[]), &[])
        .stamp()
        .clone()
}

/// A batcher whose purpose takes every field of [`profile`], sealing by `max_age` of one
/// hour, no record limit, and `min_interval`; sequences start at `first_seq`.
fn test_batcher(
    first_seq: u64,
    min_interval: Duration,
    samples_rx: mpsc::Receiver<RawSample>,
    sealed_tx: mpsc::Sender<SealedBatch>,
    metrics: Arc<Metrics>,
) -> Batcher {
    let cfg = BatchConfig {
        max_age: Duration::from_secs(3600),
        min_interval,
        max_records: usize::MAX,
        alarm_state_every: Duration::from_secs(3600),
        checkpoint_every: Duration::from_secs(30),
    };
    Batcher::new(
        samples_rx,
        sealed_tx,
        sealer(),
        flows_passing(&profile()),
        cfg,
        move |_| first_seq,
        metrics,
    )
}

/// Runs a batcher starting at `first_seq` over `samples` samples of distinct devices and
/// returns the sealed batches and the metrics.
async fn run(first_seq: u64, samples: usize) -> (Vec<SealedBatch>, Arc<Metrics>) {
    let p = profile();
    let metrics = Arc::new(Metrics::default());
    let (samples_tx, samples_rx) = mpsc::channel(16);
    let (sealed_tx, mut sealed_rx) = mpsc::channel(1024);
    let batcher = test_batcher(
        first_seq,
        Duration::ZERO,
        samples_rx,
        sealed_tx,
        metrics.clone(),
    );
    let task = tokio::spawn(batcher.run());
    let img = image(&p);
    for i in 0..samples {
        let sample = RawSample {
            device: DeviceId::new(format!("meter-{i}")).unwrap(),
            profile: p.clone(),
            at_ms: 1_700_000_000_000 + i as i64,
            data: SampleData::Registers(img.clone()),
            ratios: Ratios::UNITY,
        };
        samples_tx.send(sample).await.unwrap();
    }
    drop(samples_tx);
    let mut sealed = Vec::new();
    while let Some(b) = sealed_rx.recv().await {
        sealed.push(b);
    }
    task.await.unwrap();
    (sealed, metrics)
}

/// An opener for what [`sealer`] seals.
fn opener() -> crate::seal::Opener {
    let mut opener = crate::seal::Opener::new(HubSecretKey::from_bytes(&[2; 32]));
    opener.register(
        GatewayId::new("gw-batcher").unwrap(),
        ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key(),
    );
    opener
}

fn sample_of(p: &Arc<Profile>, device: &str) -> RawSample {
    RawSample {
        device: DeviceId::new(device).unwrap(),
        profile: p.clone(),
        at_ms: 1_700_000_000_000,
        data: SampleData::Registers(image(p)),
        ratios: Ratios::UNITY,
    }
}

mod flows;
mod rounds;

/// Issue 11 item 6: a meter whose voltages repeat exactly is flagged frozen from the
/// profile's `frozen_after`-th poll on, and counted apart; distinct meters are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_values_are_counted() {
    let p = profile();
    let metrics = Arc::new(Metrics::default());
    let (samples_tx, samples_rx) = mpsc::channel(16);
    let (sealed_tx, mut sealed_rx) = mpsc::channel(1024);
    let batcher = test_batcher(1, Duration::ZERO, samples_rx, sealed_tx, metrics.clone());
    let task = tokio::spawn(batcher.run());
    let img = image(&p);
    let frozen_fields = p
        .fields
        .iter()
        .filter(|f| f.frozen_after == Some(10))
        .count() as u64;
    assert!(
        frozen_fields > 0,
        "the profile sets frozen_after on its voltages"
    );
    for poll in 0..12 {
        samples_tx
            .send(RawSample {
                device: DeviceId::new("stuck").unwrap(),
                profile: p.clone(),
                at_ms: 1_700_000_000_000 + poll * 1000,
                data: SampleData::Registers(img.clone()),
                ratios: Ratios::UNITY,
            })
            .await
            .unwrap();
    }
    drop(samples_tx);
    while sealed_rx.recv().await.is_some() {}
    task.await.unwrap();
    // Polls 10, 11 and 12 of each such field.
    assert_eq!(metrics.readings_frozen.get(), 3 * frozen_fields);
    assert!(metrics.readings_flagged.get() >= metrics.readings_frozen.get());
}

/// issue 9 item 6: a batch is sealed early once its sealed size could pass
/// `MAX_BATCH_BYTES`, whatever `max_records` allows, so the smallest allowed quota holds
/// every batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_sealed_before_they_outgrow_the_byte_cap() {
    let (sealed, metrics) = run(1, 1500).await;
    assert!(
        sealed.len() >= 2,
        "one batch of {} records",
        metrics.records_sealed.get()
    );
    for b in &sealed {
        assert!(b.bytes.len() <= MAX_BATCH_BYTES, "{} bytes", b.bytes.len());
    }
    let seqs: Vec<u64> = sealed.iter().map(|b| b.seq).collect();
    assert_eq!(seqs, (1..=sealed.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        metrics.records_sealed.get(),
        metrics.records_minimised.get()
    );
}

/// The size bound holds for incompressible records too (random text, long tags).
#[test]
fn the_sealed_size_bound_holds_for_incompressible_records() {
    use rand::Rng;
    let sealer = sealer();
    let mut rng = rand::thread_rng();
    let records: Vec<Record> = (0..300)
        .map(|i| {
            let text: String = (0..rng.gen_range(0..400))
                .map(|_| rng.gen_range(b'!'..=b'~') as char)
                .collect();
            Record {
                subject: format!("p-{:032x}", rng.gen::<u128>()),
                field: format!("field_{i}"),
                value: Value::Text(text.clone()),
                unit: crate::reading::Unit::One,
                at_ms: rng.gen(),
                quality: crate::reading::Quality::Good,
                tags: vec![text],
                window: Some(crate::reading::Window {
                    function: crate::reading::AggFn::Delta,
                    start_ms: rng.gen(),
                    end_ms: rng.gen(),
                    samples: rng.gen(),
                    devices: rng.gen(),
                    partial: true,
                }),
                epoch: rng.gen(),
            }
        })
        .collect();
    let bound: usize = records.iter().map(record_bytes_bound).sum();
    let sealed = sealer
        .seal(Stream::Readings, 1, 0, &stamp(), &records)
        .unwrap();
    assert!(
        sealed.bytes.len() <= sealed_bytes_bound(bound),
        "{} > {}",
        sealed.bytes.len(),
        sealed_bytes_bound(bound)
    );
}

/// issue 9 item 14: a sequence state at the end of the range loses the batch loudly
/// instead of overflowing (a panic in debug, a wrap to 0 in release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealing_at_the_last_sequence_number_does_not_overflow() {
    let (sealed, metrics) = run(u64::MAX, 2).await;
    assert!(sealed.is_empty());
    assert_eq!(metrics.seal_errors.get(), 1);
}

/// A gateway alarm raised while the batcher runs leaves in an alarms batch, as raised
/// (not minimised: it names no meter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_alarms_raised_at_run_time_leave_on_the_alarms_stream() {
    let p = profile();
    let (samples_tx, samples_rx) = mpsc::channel(16);
    let (sealed_tx, mut sealed_rx) = mpsc::channel(16);
    let (alarms_tx, alarms_rx) = mpsc::channel(4);
    let cfg = BatchConfig {
        max_age: Duration::from_secs(3600),
        min_interval: Duration::ZERO,
        max_records: 100,
        alarm_state_every: Duration::from_secs(3600),
        checkpoint_every: Duration::from_secs(30),
    };
    let batcher = Batcher::new(
        samples_rx,
        sealed_tx,
        sealer(),
        flows_passing(&profile()),
        cfg,
        |_| 1,
        Arc::new(Metrics::default()),
    )
    .with_gateway_alarms(alarms_rx);
    let task = tokio::spawn(batcher.run());
    let alarms = crate::source::GatewayAlarms::new(&GatewayId::new("gw-1").unwrap(), alarms_tx);
    assert!(alarms.raise("dtu_peer_changed", 1, vec!["listen=0.0.0.0:9000".into()]));
    drop(alarms);
    // The batcher keeps running on samples after the alarm sender is gone.
    samples_tx
        .send(RawSample {
            device: DeviceId::new("m1").unwrap(),
            profile: p.clone(),
            at_ms: 1_700_000_000_000,
            data: SampleData::Registers(image(&p)),
            ratios: Ratios::UNITY,
        })
        .await
        .unwrap();
    drop(samples_tx);
    let mut sealed = Vec::new();
    while let Some(b) = sealed_rx.recv().await {
        sealed.push(b);
    }
    task.await.unwrap();
    let opener = opener();
    let alarms: Vec<Record> = sealed
        .iter()
        .filter(|b| b.stream == Stream::Alarms)
        .flat_map(|b| opener.open(&b.bytes).unwrap().records)
        .collect();
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert_eq!(
        (alarms[0].subject.as_str(), alarms[0].field.as_str()),
        ("gateway:gw-1", "dtu_peer_changed")
    );
    assert_eq!(alarms[0].value, Value::Int(1));
}

/// Issue 11 item 2: each batch names the policy it was made under; gateway-raised records
/// on the audit stream go out under the built-in gateway stamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_stream_is_sealed_under_the_gateway_stamp_the_rest_under_the_purpose() {
    let metrics = Arc::new(Metrics::default());
    let (samples_tx, samples_rx) = mpsc::channel(16);
    let (sealed_tx, mut sealed_rx) = mpsc::channel(16);
    let mut batcher = test_batcher(1, Duration::ZERO, samples_rx, sealed_tx, metrics);
    let record = |field: &str| {
        store_recovery_alarm(
            &GatewayId::new("gw-1").unwrap(),
            &crate::store::Recovery {
                moved_to: "old".into(),
                batches_lost: 0,
                reason: field.to_owned(),
            },
        )
    };
    batcher.push_gateway_record(Stream::Audit, record("audit"));
    batcher.push_gateway_record(Stream::Alarms, record("alarm"));
    let expected = batcher.stamps[Stream::Readings.index()].clone();
    drop(samples_tx);
    tokio::spawn(batcher.run()).await.unwrap();
    let opener = opener();
    let mut stamps = Vec::new();
    while let Some(b) = sealed_rx.recv().await {
        let h = opener.open(&b.bytes).unwrap().header;
        let stamp = PolicyStamp::new(h.purpose.unwrap(), h.policy_hash);
        stamps.push((b.stream, stamp));
    }
    stamps.sort_by_key(|(s, _)| *s);
    assert_eq!(
        stamps,
        [
            (Stream::Alarms, expected),
            (Stream::Audit, PolicyStamp::gateway())
        ]
    );
}

//! Normalise → check → minimise → batch → seal.
//!
//! # When a batch leaves
//!
//! A stream's open batch is sealed at the first of:
//! - **the end of a poll round** — no poller is in the middle of a round and no sample is
//!   queued ([`Rounds`]), so every reading of the round is in: the batch leaves at once,
//!   unless the stream sealed less than `batch.min_interval` ago (then at that point, if the
//!   gateway is still idle). Under load, rounds are long and batches large; when idle, a
//!   reading waits only for its round's last poll. MQTT-only gateways have no rounds: their
//!   messages leave when the sample queue runs empty, at most once per `min_interval`.
//!   `min_interval = max_age` turns this off (batches leave by age and size only).
//! - **`batch.max_age`** after its first record — the bound when pollers overlap without
//!   pause and the gateway is never idle;
//! - **`batch.max_records`** records, or the largest envelope the hub takes.
//!
//! What a SIGKILL can cost is the open batches: at most one round's readings (and at most
//! `max_age` of them).
//!
//! Sealing (zstd, HPKE, Ed25519 over a whole batch) is CPU work of up to milliseconds, so it
//! runs on a blocking thread. The batcher waits for each seal before it continues, so batches
//! leave in sealing order and sequence numbers stay gap-free per stream; samples meanwhile
//! queue in the bounded sample channel.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tracing::{error, info};

use crate::config::{BatchConfig, MAX_BATCH_BYTES};
use crate::reading::{now_ms, Record, Stream};
use crate::seal::{PolicyStamp, SealedBatch, Sealer};
use crate::source::{RawSample, Rounds, SampleData};

use super::flows::Flows;
use crate::telemetry::Metrics;
use crate::transform::alarm::AlarmGate;
use crate::transform::check::Checker;
use crate::transform::normalise::normalise_with;
use crate::transform::normalise_values::normalise_values;

#[path = "batcher_checkpoint.rs"]
mod checkpoints;
#[path = "batcher_emergency.rs"]
mod emergency;

pub use emergency::{EmergencyCommand, Ended as EmergencyEnded};

#[derive(Debug, Default)]
struct OpenBatch {
    records: Vec<Record>,
    /// Sum of [`record_bytes_bound`] over `records`.
    bytes_bound: usize,
    deadline: Option<Instant>,
    /// When the gateway went idle too soon after the last seal: seal then, if still idle.
    idle_at: Option<Instant>,
}

impl OpenBatch {
    /// The earlier of the batch's two timers.
    fn wake_at(&self) -> Option<Instant> {
        match (self.deadline, self.idle_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// An upper bound of everything in a sealed envelope but the records: header (gateway id,
/// stream, seq, times, policy hash, key ids), HPKE encapsulated key, AEAD tag, signature and
/// the codec's and zstd's framing.
const ENVELOPE_OVERHEAD_BOUND: usize = 1024;

/// An upper bound of one record's encoded size (strings with their length prefixes, the
/// fixed-size fields with room to spare: value, unit, time, quality and the tag count take at
/// most 64 bytes, an aggregate's window 32 and the key epoch 5).
fn record_bytes_bound(r: &Record) -> usize {
    let text = match &r.value {
        crate::reading::Value::Text(t) => t.len(),
        _ => 0,
    };
    let tags: usize = r.tags.iter().map(|t| t.len() + 10).sum();
    r.subject.len() + r.field.len() + text + tags + 64 + 32 + 5
}

/// The sealed size `records_bound` bytes of records can reach at most: zstd may expand
/// incompressible input by a little (well under 1/128).
fn sealed_bytes_bound(records_bound: usize) -> usize {
    ENVELOPE_OVERHEAD_BOUND + records_bound + records_bound / 128
}

/// Turns raw samples into sealed batches, one open batch per stream.
#[derive(Debug)]
pub struct Batcher {
    samples_rx: mpsc::Receiver<RawSample>,
    sealed_tx: mpsc::Sender<SealedBatch>,
    /// Shared with the blocking thread that seals.
    sealer: Arc<Sealer>,
    /// The purpose flows readings run through.
    flows: Flows,
    /// What each stream's batches are sealed under (by [`Stream::index`]; see
    /// [`Flows::stamps`]).
    stamps: Vec<PolicyStamp>,
    /// Records the flows let out of the current sample or window close, by stream.
    outgoing: Vec<(Stream, Record)>,
    /// Records on their way into the open batches (a checkpoint taken meanwhile counts the
    /// aggregates among them as pending).
    queue: std::collections::VecDeque<(Stream, Record)>,
    /// Checkpoints of the flows' windows ([`checkpoints::Checkpoints`]); `None`: not kept.
    checkpoints: Option<checkpoints::Checkpoints>,
    checker: Checker,
    /// Alarm-stream readings go out on change and as periodic standing state.
    alarms: AlarmGate,
    cfg: BatchConfig,
    open: [OpenBatch; Stream::COUNT],
    next_seq: [u64; Stream::COUNT],
    metrics: Arc<Metrics>,
    /// Alarm records the gateway raises about itself while running ([`GatewayAlarms`]).
    ///
    /// [`GatewayAlarms`]: crate::source::GatewayAlarms
    gateway_rx: Option<mpsc::Receiver<Record>>,
    /// The pollers' rounds; `None`: seal by age and size only.
    rounds: Option<Rounds>,
    /// Emergency collections switched on and off ([`EmergencyCommand`]).
    emergency_rx: Option<mpsc::Receiver<EmergencyCommand>>,
    /// When each stream last sealed (the batcher's start before its first seal, so
    /// `min_interval = max_age` turns round-end sealing off).
    last_seal: [Option<Instant>; Stream::COUNT],
}

impl Batcher {
    /// `next_seq` is the first unused sequence number per stream (from the store). Each flow's
    /// batches are sealed under its policy stamp.
    pub fn new(
        samples_rx: mpsc::Receiver<RawSample>,
        sealed_tx: mpsc::Sender<SealedBatch>,
        sealer: Sealer,
        flows: Flows,
        cfg: BatchConfig,
        next_seq: impl Fn(Stream) -> u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            samples_rx,
            sealed_tx,
            sealer: Arc::new(sealer),
            stamps: flows.stamps(),
            flows,
            outgoing: Vec::new(),
            queue: std::collections::VecDeque::new(),
            checkpoints: None,
            checker: Checker::new(),
            alarms: AlarmGate::new(cfg.alarm_state_every),
            cfg,
            open: Default::default(),
            next_seq: Stream::ALL.map(next_seq),
            metrics,
            gateway_rx: None,
            rounds: None,
            emergency_rx: None,
            last_seal: [Some(Instant::now()); Stream::COUNT],
        }
    }

    /// Seals at the end of the pollers' rounds (see the module docs), not only by age and
    /// size.
    pub(crate) fn with_rounds(mut self, rounds: Rounds) -> Self {
        self.rounds = Some(rounds);
        self
    }

    /// Also takes the gateway's own alarm records from `rx` (the receiving end of
    /// [`GatewayAlarms`](crate::source::GatewayAlarms)) into the alarms stream.
    pub(crate) fn with_gateway_alarms(mut self, rx: mpsc::Receiver<Record>) -> Self {
        self.gateway_rx = Some(rx);
        self
    }

    /// Takes emergency collections' flows from `rx` (see [`EmergencyCommand`]).
    pub(crate) fn with_emergency(mut self, rx: mpsc::Receiver<EmergencyCommand>) -> Self {
        self.emergency_rx = Some(rx);
        self
    }

    /// Puts a record the gateway itself raised (not from a meter, so not minimised) into
    /// the open batch of its stream; it leaves with that batch.
    pub(crate) fn push_gateway_record(&mut self, stream: Stream, record: Record) {
        let batch = &mut self.open[stream.index()];
        if batch.records.is_empty() {
            batch.deadline = Some(Instant::now() + self.cfg.max_age);
        }
        batch.bytes_bound += record_bytes_bound(&record);
        batch.records.push(record);
    }

    /// Runs until the sample channel closes, then seals what is open.
    pub async fn run(mut self) {
        loop {
            let deadline = self.open.iter().filter_map(OpenBatch::wake_at).min();
            let close_at = self.flows.next_close_ms().map(|ms| {
                let wait = u64::try_from(ms.saturating_sub(now_ms())).unwrap_or(0);
                Instant::now() + std::time::Duration::from_millis(wait)
            });
            let rounds = self.rounds.clone();
            let checkpoint_at = self.checkpoint_due_at();
            tokio::select! {
                sample = self.samples_rx.recv() => match sample {
                    Some(s) => self.accept(s).await,
                    None => break,
                },
                record = recv_some(&mut self.gateway_rx), if self.gateway_rx.is_some() => match record {
                    Some(r) => self.push_gateway_record(Stream::Alarms, r),
                    None => self.gateway_rx = None,
                },
                command = recv_some(&mut self.emergency_rx), if self.emergency_rx.is_some() => match command {
                    Some(c) => self.on_emergency(c),
                    None => self.emergency_rx = None,
                },
                () = rounds_ended(rounds.as_ref()), if rounds.is_some() => {}
                _ = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                    self.seal_expired().await;
                }
                _ = sleep_until(close_at.unwrap_or_else(far_future)), if close_at.is_some() => {
                    self.flows.close_due(now_ms(), &mut self.outgoing);
                    self.mark_dirty();
                    self.flush_outgoing().await;
                }
                _ = sleep_until(checkpoint_at.unwrap_or_else(far_future)), if checkpoint_at.is_some() => {
                    self.checkpoint_alone().await;
                }
            }
            self.seal_if_idle().await;
        }
        // Aggregate windows still open leave as partial windows.
        self.flows.flush_partial(&mut self.outgoing);
        self.flush_outgoing().await;
        // Alarms raised before the sources stopped leave with the last batch.
        if let Some(mut rx) = self.gateway_rx.take() {
            while let Ok(r) = rx.try_recv() {
                self.push_gateway_record(Stream::Alarms, r);
            }
        }
        for stream in Stream::ALL {
            self.seal(stream).await;
        }
        info!(
            sealed = self.metrics.batches_sealed.get(),
            "batcher stopped"
        );
    }

    /// Runs one sample through the transforms into the open batches. A reading goes
    /// to its profile field's stream; an alarm-stream reading only when the alarm gate
    /// passes it (changed, or due as standing state). The purpose must list a field
    /// for it to leave, alarms included.
    pub(crate) async fn accept(&mut self, sample: RawSample) {
        let normalised = match &sample.data {
            SampleData::Registers(image) => normalise_with(
                &sample.profile,
                &sample.device,
                sample.at_ms,
                image,
                &sample.ratios,
            ),
            SampleData::Values(values) => {
                normalise_values(&sample.profile, &sample.device, values, &sample.ratios)
            }
        };
        self.metrics
            .readings_normalised
            .add(normalised.readings.len() as u64);
        for mut reading in normalised.readings {
            let Some(field) = sample.profile.field(reading.field.as_str()) else {
                continue;
            };
            let multiplier = sample.ratios.multiplier(field.ratio);
            let quality = self.checker.check_scaled(field, &mut reading, multiplier);
            if quality != crate::reading::Quality::Good {
                self.metrics.readings_flagged.inc();
                match quality {
                    crate::reading::Quality::Uncertain(crate::reading::QualityReason::Spike) => {
                        self.metrics.readings_spike.inc()
                    }
                    crate::reading::Quality::Uncertain(crate::reading::QualityReason::Frozen) => {
                        self.metrics.readings_frozen.inc()
                    }
                    _ => {}
                }
            }
            if field.stream == Stream::Alarms
                && self.flows.alarm_leaves(&reading)
                && !self.alarms.pass(&reading)
            {
                self.metrics.alarm_repeats_held.inc();
                continue;
            }
            self.flows
                .apply(&reading, field, sample.ratios, &mut self.outgoing);
        }
        self.mark_dirty();
        self.flush_outgoing().await;
    }

    /// Puts the records the flows let out into the open batches of their streams.
    async fn flush_outgoing(&mut self) {
        self.flows.report(&self.metrics);
        self.queue.extend(self.outgoing.drain(..));
        while let Some((stream, record)) = self.queue.pop_front() {
            self.metrics.records_minimised.inc();
            self.push(stream, record).await;
        }
    }

    /// Adds `record` to `stream`'s open batch, sealing first or after as the limits say.
    async fn push(&mut self, stream: Stream, record: Record) {
        let size = record_bytes_bound(&record);
        let i = stream.index();
        if !self.open[i].records.is_empty()
            && sealed_bytes_bound(self.open[i].bytes_bound + size) > MAX_BATCH_BYTES
        {
            // Full by size before it is full by count: the quota and the link take it.
            self.seal(stream).await;
        }
        let batch = &mut self.open[i];
        if batch.records.is_empty() {
            batch.deadline = Some(Instant::now() + self.cfg.max_age);
        }
        batch.bytes_bound += size;
        batch.records.push(record);
        if batch.records.len() >= self.cfg.max_records {
            self.seal(stream).await;
        }
    }

    async fn seal_expired(&mut self) {
        let now = Instant::now();
        for stream in Stream::ALL {
            let batch = &mut self.open[stream.index()];
            if batch.idle_at.is_some_and(|t| t <= now) {
                // Re-checked by `seal_if_idle` right after.
                batch.idle_at = None;
            }
            if batch.deadline.is_some_and(|d| d <= now) {
                self.seal(stream).await;
            }
        }
    }

    /// Seals the open batches if no poll round is in progress and no sample is queued: the
    /// round's readings are all in. A stream that sealed less than `min_interval` ago waits
    /// until then (and seals only if still idle).
    async fn seal_if_idle(&mut self) {
        let Some(rounds) = &self.rounds else { return };
        if !rounds.is_idle() || !self.samples_rx.is_empty() {
            return;
        }
        let now = Instant::now();
        for stream in Stream::ALL {
            let i = stream.index();
            if self.open[i].records.is_empty() {
                continue;
            }
            let earliest = self.last_seal[i].map(|t| t + self.cfg.min_interval);
            match earliest {
                Some(t) if t > now => {
                    self.open[i].idle_at.get_or_insert(t);
                }
                _ => {
                    self.metrics.batches_sealed_idle.inc();
                    self.seal(stream).await;
                }
            }
        }
    }

    async fn seal(&mut self, stream: Stream) {
        let i = stream.index();
        let records = std::mem::take(&mut self.open[i].records);
        self.open[i].deadline = None;
        self.open[i].idle_at = None;
        self.open[i].bytes_bound = 0;
        if records.is_empty() {
            return;
        }
        self.last_seal[i] = Some(Instant::now());
        let seq = self.next_seq[i];
        let n = records.len();
        let Some(after) = seq.checked_add(1) else {
            // Only a store whose sequence state was absurd gets here (the store treats such
            // state as corruption at open); never wrap around to sequence numbers in use.
            self.metrics.seal_errors.inc();
            error!(%stream, seq, records = n, "sequence numbers exhausted; records lost");
            return;
        };
        let sealer = self.sealer.clone();
        let stamp = self.stamps[i].clone();
        // A batch with aggregates carries the checkpoint in which their windows are closed.
        let checkpoint = self.checkpoint_for(&records);
        let sealed = tokio::task::spawn_blocking(move || {
            sealer
                .seal(stream, seq, now_ms(), &stamp, &records)
                .map(|mut batch| {
                    batch.checkpoint = checkpoint.map(|(key, cp)| key.seal(&cp));
                    batch
                })
        })
        .await;
        let sealed = match sealed {
            Ok(s) => s,
            Err(e) => {
                self.metrics.seal_errors.inc();
                error!(%stream, seq, records = n, error = %e, "sealing task failed; records lost");
                return;
            }
        };
        match sealed {
            Ok(batch) => {
                self.next_seq[i] = after;
                self.metrics.batches_sealed.inc();
                self.metrics.records_sealed.add(n as u64);
                if self.sealed_tx.send(batch).await.is_err() {
                    error!(%stream, seq, "committer gone; sealed batch lost");
                }
            }
            Err(e) => {
                self.metrics.seal_errors.inc();
                error!(%stream, seq, records = n, error = %e, "sealing failed; records lost");
            }
        }
    }
}

/// The alarm record a store recovery raises on the alarms stream: subject `gateway:<id>`,
/// field `store_recovered`, value the batches lost, tagged `store_corruption`.
pub(crate) fn store_recovery_alarm(
    gateway: &crate::reading::GatewayId,
    recovery: &crate::store::Recovery,
) -> Record {
    let moved = recovery
        .moved_to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Record {
        subject: format!("gateway:{}", gateway.as_str()),
        field: "store_recovered".into(),
        value: crate::reading::Value::Int(i64::try_from(recovery.batches_lost).unwrap_or(i64::MAX)),
        unit: crate::reading::Unit::One,
        at_ms: now_ms(),
        quality: crate::reading::Quality::Good,
        tags: vec!["store_corruption".into(), format!("moved_to={moved}")],
        window: None,
        epoch: 0,
    }
}

/// Resolves when the last poll round in progress ends; never without rounds.
async fn rounds_ended(rounds: Option<&Rounds>) {
    match rounds {
        Some(r) => r.ended().await,
        None => std::future::pending().await,
    }
}

/// The next item from `rx`, if it is open.
async fn recv_some<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => None,
    }
}

fn far_future() -> Instant {
    Instant::now() + std::time::Duration::from_secs(86_400)
}

#[cfg(test)]
mod tests {
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
        let mut opener = crate::seal::Opener::new(HubSecretKey::from_bytes(&[2; 32]));
        opener.register(
            GatewayId::new("gw-batcher").unwrap(),
            ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key(),
        );
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
        let mut opener = crate::seal::Opener::new(HubSecretKey::from_bytes(&[2; 32]));
        opener.register(
            GatewayId::new("gw-batcher").unwrap(),
            ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key(),
        );
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

    /// issue 11 item 7: while an emergency flow runs, readings also go to the emergency
    /// stream under its stamp, tagged; at its end the unsealed records are dropped and
    /// counted, the reply names the stream's next sequence number, and later readings no
    /// longer reach the stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_emergency_flow_runs_tagged_until_ended_and_drops_what_it_has_not_sealed() {
        let p = profile();
        let metrics = Arc::new(Metrics::default());
        let (_samples_tx, samples_rx) = mpsc::channel(16);
        let (sealed_tx, mut sealed_rx) = mpsc::channel(16);
        let mut batcher = test_batcher(5, Duration::ZERO, samples_rx, sealed_tx, metrics.clone());
        let fields: Vec<&Field> = p.fields.iter().collect();
        let flow = Flow::new(Stream::EMERGENCY, passing(&fields), &["x@1".into()])
            .with_tags(vec!["emergency".into(), "emergency_id=em-1".into()]);
        let stamp = flow.stamp().clone();
        let (reply, first) = tokio::sync::oneshot::channel();
        batcher.on_emergency(EmergencyCommand::Start {
            flow: Box::new(flow),
            reply,
        });
        assert_eq!(first.await.unwrap(), 5);
        batcher.accept(sample_of(&p, "m1")).await;
        let i = Stream::EMERGENCY.index();
        let n = batcher.open[i].records.len();
        assert!(n > 0);
        assert!(batcher.open[i]
            .records
            .iter()
            .all(|r| r.tags == ["emergency".to_string(), "emergency_id=em-1".to_string()]));
        assert!(batcher.open[Stream::Readings.index()]
            .records
            .iter()
            .all(|r| r.tags.is_empty()));
        batcher.seal(Stream::EMERGENCY).await;
        let sealed = sealed_rx.recv().await.unwrap();
        assert_eq!((sealed.stream, sealed.seq), (Stream::EMERGENCY, 5));
        let mut opener = crate::seal::Opener::new(HubSecretKey::from_bytes(&[2; 32]));
        opener.register(
            GatewayId::new("gw-batcher").unwrap(),
            ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key(),
        );
        let h = opener.open(&sealed.bytes).unwrap().header;
        assert_eq!(PolicyStamp::new(h.purpose.unwrap(), h.policy_hash), stamp);

        batcher.accept(sample_of(&p, "m2")).await;
        let open = batcher.open[i].records.len() as u64;
        assert!(open > 0);
        let (reply, ended) = tokio::sync::oneshot::channel();
        batcher.on_emergency(EmergencyCommand::End { reply });
        let ended = ended.await.unwrap();
        assert_eq!(ended.end_seq, 6);
        assert_eq!(ended.discarded_records, open);
        assert_eq!(metrics.emergency_records_discarded.get(), open);
        batcher.accept(sample_of(&p, "m3")).await;
        assert!(batcher.open[i].records.is_empty(), "the flow is off");
        assert!(!batcher.open[Stream::Readings.index()].records.is_empty());
    }

    /// issue 11 (windows survive a crash): a batch holding an aggregate carries the
    /// checkpoint in which its window is closed; while samples arrive a lone checkpoint
    /// follows every `checkpoint_every`; a batcher resumed from it continues the window.
    #[tokio::test(start_paused = true)]
    async fn checkpoints_go_with_aggregate_batches_and_alone_and_resume_the_windows() {
        use crate::pipeline::checkpoint::CheckpointKey;
        let p = profile();
        let key = CheckpointKey::derive(&PseudonymKey::from_bytes([7; 32]));
        let mean = |seq: u64| {
            let policy = Arc::new(
                CompiledPolicy::parse(
                    Path::new("mean.toml"),
                    "[purpose]\nname = \"m\"\ndescription = \"d\"\nlegal_basis = \"b\"\nowner = \"o\"\nretention = \"1d\"\n\n\
                     [[rule]]\nfield = \"voltage_l1\"\naction = \"aggregate\"\nfunction = \"mean\"\nwindow = \"1d\"\n",
                    jiff::tz::TimeZone::UTC,
                    PseudonymKey::from_bytes([7; 32]),
                )
                .unwrap(),
            );
            let (samples_tx, samples_rx) = mpsc::channel(16);
            let (sealed_tx, sealed_rx) = mpsc::channel(16);
            let cfg = BatchConfig {
                max_age: Duration::from_secs(3600),
                min_interval: Duration::ZERO,
                max_records: usize::MAX,
                alarm_state_every: Duration::from_secs(3600),
                checkpoint_every: Duration::from_secs(30),
            };
            let flows = Flows::new(vec![Flow::new(Stream::Readings, policy, &[])], None);
            let batcher = Batcher::new(
                samples_rx,
                sealed_tx,
                sealer(),
                flows,
                cfg,
                move |_| seq,
                Arc::new(Metrics::default()),
            );
            (batcher, samples_tx, sealed_rx)
        };
        let (batcher, samples_tx, mut sealed_rx) = mean(1);
        let task = tokio::spawn(batcher.with_checkpoints(key.clone(), None).run());
        // Today's window (windows close on the wall clock).
        let mut first = sample_of(&p, "m1");
        first.at_ms = now_ms();
        samples_tx.send(first).await.unwrap();
        // Nothing leaves (a daily window); the lone checkpoint comes after checkpoint_every.
        let lone = sealed_rx.recv().await.unwrap();
        assert!(lone.is_checkpoint_only());
        let cp = key.open(lone.checkpoint.as_ref().unwrap()).unwrap();
        assert_eq!(cp.flows.len(), 1);
        assert_eq!(cp.flows[0].state.open_windows(), 1);
        // Quiet: no further checkpoint while nothing changes.
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(sealed_rx.try_recv().is_err());
        drop(samples_tx);
        let last = sealed_rx.recv().await.unwrap();
        assert!(!last.is_checkpoint_only(), "the partial window at shutdown");
        let after = key.open(last.checkpoint.as_ref().unwrap()).unwrap();
        assert_eq!(
            after.flows[0].state.open_windows(),
            0,
            "closed with its aggregate"
        );
        task.await.unwrap();

        // A batcher resumed from the lone checkpoint continues the window: its partial
        // aggregate covers the sample of before and the one after.
        let (batcher, samples_tx, mut sealed_rx) = mean(2);
        let task = tokio::spawn(batcher.with_checkpoints(key.clone(), Some(cp)).run());
        let mut later = sample_of(&p, "m1");
        later.at_ms = now_ms() + 1;
        samples_tx.send(later).await.unwrap();
        drop(samples_tx);
        let mut opener = crate::seal::Opener::new(HubSecretKey::from_bytes(&[2; 32]));
        opener.register(
            GatewayId::new("gw-batcher").unwrap(),
            ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key(),
        );
        let mut windows = Vec::new();
        while let Some(b) = sealed_rx.recv().await {
            if !b.is_checkpoint_only() {
                let opened = opener.open(&b.bytes).unwrap();
                windows.extend(opened.records.into_iter().filter_map(|r| r.window));
            }
        }
        task.await.unwrap();
        assert_eq!(windows.len(), 1);
        assert_eq!(windows[0].samples, 2);
    }

    /// A batcher with rounds, `max_age` one hour, and a sample sender.
    fn round_batcher(
        min_interval: Duration,
    ) -> (
        mpsc::Sender<RawSample>,
        mpsc::Receiver<SealedBatch>,
        crate::source::Rounds,
        Arc<Metrics>,
    ) {
        let (samples_tx, samples_rx) = mpsc::channel(64);
        let (sealed_tx, sealed_rx) = mpsc::channel(64);
        let rounds = crate::source::Rounds::default();
        let metrics = Arc::new(Metrics::default());
        let batcher = test_batcher(1, min_interval, samples_rx, sealed_tx, metrics.clone())
            .with_rounds(rounds.clone());
        tokio::spawn(batcher.run());
        (samples_tx, sealed_rx, rounds, metrics)
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

    /// issue 10 item 1: a batch is sealed when the poll round ends (all its samples in),
    /// not when `max_age` (here an hour) runs out; samples of a round in progress wait.
    #[tokio::test(start_paused = true)]
    async fn a_batch_seals_at_the_end_of_a_poll_round_not_at_max_age() {
        let p = profile();
        let fields_per_sample = p.fields.len();
        let (tx, mut sealed_rx, rounds, metrics) = round_batcher(Duration::from_millis(100));
        // Past the first min_interval after start.
        tokio::time::sleep(Duration::from_secs(1)).await;

        let round = rounds.begin();
        for d in ["m1", "m2", "m3"] {
            tx.send(sample_of(&p, d)).await.unwrap();
        }
        let early = tokio::time::timeout(Duration::from_secs(60), sealed_rx.recv()).await;
        assert!(early.is_err(), "sealed while the round was in progress");
        assert_eq!(
            metrics.records_minimised.get(),
            3 * fields_per_sample as u64
        );

        drop(round);
        let batch = tokio::time::timeout(Duration::from_secs(60), sealed_rx.recv())
            .await
            .expect("sealed when the round ended")
            .unwrap();
        assert_eq!(batch.stream, Stream::Readings);
        assert_eq!(metrics.records_sealed.get(), 3 * fields_per_sample as u64);
        assert_eq!(metrics.batches_sealed_idle.get(), 1);

        // The next round ends right away: this batch waits for min_interval after the last
        // seal, and no longer.
        let sealed_at = Instant::now();
        let round = rounds.begin();
        tx.send(sample_of(&p, "m1")).await.unwrap();
        drop(round);
        tokio::time::timeout(Duration::from_secs(60), sealed_rx.recv())
            .await
            .expect("sealed after min_interval")
            .unwrap();
        let waited = Instant::now() - sealed_at;
        assert!(
            waited >= Duration::from_millis(100) && waited < Duration::from_secs(1),
            "{waited:?}"
        );
        assert_eq!(metrics.batches_sealed.get(), 2);
    }

    /// Without pollers (MQTT meters), a sample leaves once the sample queue is empty.
    #[tokio::test(start_paused = true)]
    async fn without_rounds_in_progress_a_sample_leaves_when_the_queue_runs_empty() {
        let p = profile();
        let (tx, mut sealed_rx, _rounds, _) = round_batcher(Duration::from_millis(100));
        tx.send(sample_of(&p, "m1")).await.unwrap();
        tokio::time::timeout(Duration::from_secs(60), sealed_rx.recv())
            .await
            .expect("sealed without waiting for max_age")
            .unwrap();
    }

    /// `min_interval = max_age` turns round-end sealing off: the batch waits for its age.
    #[tokio::test(start_paused = true)]
    async fn min_interval_equal_to_max_age_seals_by_age_only() {
        let p = profile();
        let (tx, mut sealed_rx, _rounds, metrics) = round_batcher(Duration::from_secs(3600));
        tx.send(sample_of(&p, "m1")).await.unwrap();
        let early = tokio::time::timeout(Duration::from_secs(600), sealed_rx.recv()).await;
        assert!(early.is_err(), "sealed before max_age");
        tokio::time::timeout(Duration::from_secs(3600), sealed_rx.recv())
            .await
            .expect("sealed at max_age")
            .unwrap();
        assert_eq!(metrics.batches_sealed_idle.get(), 0);
    }
}

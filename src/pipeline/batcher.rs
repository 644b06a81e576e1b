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
#[path = "batcher_tests/mod.rs"]
mod tests;

//! Normalise → check → minimise → batch → seal.
//!
//! Sealing (zstd, HPKE, Ed25519 over a whole batch) is CPU work of up to milliseconds, so it
//! runs on a blocking thread. The batcher waits for each seal before it continues, so batches
//! leave in sealing order and sequence numbers stay gap-free per stream; samples meanwhile
//! queue in the bounded sample channel.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tracing::{error, info};

use crate::config::BatchConfig;
use crate::reading::{now_ms, DeviceId, Record, Stream};
use crate::seal::{SealedBatch, Sealer};
use crate::source::{RawSample, SampleData};
use crate::telemetry::Metrics;
use crate::transform::alarm::AlarmGate;
use crate::transform::check::Checker;
use crate::transform::minimise::{minimise_as, Policy};
use crate::transform::normalise::normalise_with;
use crate::transform::normalise_values::normalise_values;

#[derive(Debug, Default)]
struct OpenBatch {
    records: Vec<Record>,
    deadline: Option<Instant>,
}

/// Turns raw samples into sealed batches, one open batch per stream.
#[derive(Debug)]
pub struct Batcher {
    samples_rx: mpsc::Receiver<RawSample>,
    sealed_tx: mpsc::Sender<SealedBatch>,
    /// Shared with the blocking thread that seals.
    sealer: Arc<Sealer>,
    policy: Policy,
    checker: Checker,
    /// Alarm-stream readings go out on change and as periodic standing state.
    alarms: AlarmGate,
    /// Device pseudonyms, computed once per device.
    subjects: HashMap<DeviceId, String>,
    cfg: BatchConfig,
    open: [OpenBatch; 3],
    next_seq: [u64; 3],
    metrics: Arc<Metrics>,
}

impl Batcher {
    /// `next_seq` is the first unused sequence number per stream (from the store).
    pub fn new(
        samples_rx: mpsc::Receiver<RawSample>,
        sealed_tx: mpsc::Sender<SealedBatch>,
        sealer: Sealer,
        policy: Policy,
        cfg: BatchConfig,
        next_seq: impl Fn(Stream) -> u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            samples_rx,
            sealed_tx,
            sealer: Arc::new(sealer),
            policy,
            checker: Checker::new(),
            alarms: AlarmGate::new(cfg.alarm_state_every),
            subjects: HashMap::new(),
            cfg,
            open: Default::default(),
            next_seq: Stream::ALL.map(next_seq),
            metrics,
        }
    }

    /// Runs until the sample channel closes, then seals what is open.
    pub async fn run(mut self) {
        loop {
            let deadline = self.open.iter().filter_map(|b| b.deadline).min();
            tokio::select! {
                sample = self.samples_rx.recv() => match sample {
                    Some(s) => self.accept(s).await,
                    None => break,
                },
                _ = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                    self.seal_expired().await;
                }
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
        let policy = &self.policy;
        let subject = self
            .subjects
            .entry(sample.device.clone())
            .or_insert_with(|| policy.subject(&sample.device))
            .clone();
        for mut reading in normalised.readings {
            let Some(field) = sample.profile.field(reading.field.as_str()) else {
                continue;
            };
            let multiplier = sample.ratios.multiplier(field.ratio);
            if self.checker.check_scaled(field, &mut reading, multiplier)
                != crate::reading::Quality::Good
            {
                self.metrics.readings_flagged.inc();
            }
            let stream = field.stream;
            if stream == Stream::Alarms
                && self.policy.fields().contains(&reading.field)
                && !self.alarms.pass(&reading)
            {
                self.metrics.alarm_repeats_held.inc();
                continue;
            }
            let Some(record) = minimise_as(&self.policy, &reading, &subject) else {
                continue;
            };
            self.metrics.records_minimised.inc();
            let batch = &mut self.open[usize::from(stream.code())];
            if batch.records.is_empty() {
                batch.deadline = Some(Instant::now() + self.cfg.max_age);
            }
            batch.records.push(record);
            if batch.records.len() >= self.cfg.max_records {
                self.seal(stream).await;
            }
        }
    }

    async fn seal_expired(&mut self) {
        let now = Instant::now();
        for stream in Stream::ALL {
            if self.open[usize::from(stream.code())]
                .deadline
                .is_some_and(|d| d <= now)
            {
                self.seal(stream).await;
            }
        }
    }

    async fn seal(&mut self, stream: Stream) {
        let i = usize::from(stream.code());
        let records = std::mem::take(&mut self.open[i].records);
        self.open[i].deadline = None;
        if records.is_empty() {
            return;
        }
        let seq = self.next_seq[i];
        let n = records.len();
        let sealer = self.sealer.clone();
        let sealed =
            tokio::task::spawn_blocking(move || sealer.seal(stream, seq, now_ms(), &records)).await;
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
                self.next_seq[i] += 1;
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

fn far_future() -> Instant {
    Instant::now() + std::time::Duration::from_secs(86_400)
}

//! The batcher's side of checkpoints (see `pipeline::checkpoint`): which batches carry one,
//! when one is written on its own, and resuming from one at start.

use tokio::time::Instant;
use tracing::{info, warn};

use super::Batcher;
use crate::pipeline::checkpoint::{Checkpoint, CheckpointKey};
use crate::reading::{now_ms, Record, Stream};
use crate::seal::SealedBatch;

/// The batcher's checkpoint state.
#[derive(Debug)]
pub(super) struct Checkpoints {
    key: CheckpointKey,
    /// Samples or closes since the last checkpoint.
    dirty: bool,
    last: Instant,
}

impl Batcher {
    /// Keeps checkpoints sealed under `key`, and resumes from `restored` (the store's last
    /// checkpoint, if it opened): each flow whose stream and policy hash match gets its
    /// windows back; its pending aggregates go back into the open batches.
    pub(crate) fn with_checkpoints(
        mut self,
        key: CheckpointKey,
        restored: Option<Checkpoint>,
    ) -> Self {
        if let Some(cp) = restored {
            let (resumed, dropped) = self.flows.restore(&cp.flows);
            let mut pending = 0;
            for (stream, record) in cp.pending {
                let known = self.flows.stamps_of(stream);
                if known {
                    pending += 1;
                    self.push_gateway_record(stream, record);
                }
            }
            info!(
                resumed,
                dropped,
                pending,
                age_ms = now_ms() - cp.taken_ms,
                "aggregate windows resumed from the last checkpoint"
            );
            if dropped > 0 {
                warn!(
                    dropped,
                    "flows whose policy changed start with fresh windows"
                );
            }
        }
        self.checkpoints = Some(Checkpoints {
            key,
            dirty: false,
            last: Instant::now(),
        });
        self
    }

    pub(super) fn mark_dirty(&mut self) {
        if let Some(c) = &mut self.checkpoints {
            c.dirty = true;
        }
    }

    /// When the next lone checkpoint is due, if one is.
    pub(super) fn checkpoint_due_at(&self) -> Option<Instant> {
        self.checkpoints
            .as_ref()
            .filter(|c| c.dirty)
            .map(|c| c.last + self.cfg.checkpoint_every)
    }

    /// The checkpoint a batch of `records` (just taken out of its open batch) carries: one
    /// if it holds an aggregate, with the key to seal it.
    pub(super) fn checkpoint_for(
        &mut self,
        records: &[Record],
    ) -> Option<(CheckpointKey, Checkpoint)> {
        if !records.iter().any(|r| r.window.is_some()) {
            return None;
        }
        self.take_checkpoint()
    }

    /// Sends a checkpoint on its own (after every batch sealed before it).
    pub(super) async fn checkpoint_alone(&mut self) {
        let Some((key, cp)) = self.take_checkpoint() else {
            return;
        };
        let sealed = tokio::task::spawn_blocking(move || key.seal(&cp)).await;
        match sealed {
            Ok(bytes) => {
                if self
                    .sealed_tx
                    .send(SealedBatch::checkpoint_only(bytes))
                    .await
                    .is_err()
                {
                    warn!("committer gone; checkpoint not stored");
                }
            }
            Err(e) => warn!(error = %e, "checkpoint task failed"),
        }
    }

    /// The flows' state now, with every aggregate not yet sealed as pending.
    fn take_checkpoint(&mut self) -> Option<(CheckpointKey, Checkpoint)> {
        let c = self.checkpoints.as_mut()?;
        c.dirty = false;
        c.last = Instant::now();
        let key = c.key.clone();
        let kept = |s: &Stream| *s != Stream::EMERGENCY;
        let mut pending: Vec<(Stream, Record)> = Vec::new();
        for stream in Stream::ALL.into_iter().filter(kept) {
            pending.extend(
                self.open[stream.index()]
                    .records
                    .iter()
                    .filter(|r| r.window.is_some())
                    .map(|r| (stream, r.clone())),
            );
        }
        pending.extend(
            self.queue
                .iter()
                .filter(|(s, r)| kept(s) && r.window.is_some())
                .cloned(),
        );
        self.metrics.checkpoints_taken.inc();
        let covered = self.metrics.readings_normalised.get();
        let before = self.metrics.readings_checkpointed.get();
        self.metrics
            .readings_checkpointed
            .add(covered.saturating_sub(before));
        Some((
            key,
            Checkpoint {
                taken_ms: now_ms(),
                flows: self.flows.snapshot(),
                pending,
            },
        ))
    }
}

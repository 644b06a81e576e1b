//! Group commit of sealed batches into the store.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{error, warn};

use crate::reading::Stream;
use crate::seal::SealedBatch;
use crate::store::{Outbox, StoreError, StoredBatch};
use crate::telemetry::Metrics;

/// Highest committed sequence number per stream, indexed by `Stream::code`.
pub(crate) type CommittedMarks = [u64; 3];

/// Most batches held in memory while the store refuses writes (disk full, I/O error).
/// Beyond it the oldest is dropped and counted: the gateway degrades, it does not die.
pub(crate) const PENDING_LIMIT: usize = 256;
/// Most batches appended before one flush.
const GROUP_MAX: usize = 64;

/// Appends sealed batches and flushes them in groups.
#[derive(Debug)]
pub(crate) struct Committer {
    sealed_rx: mpsc::Receiver<SealedBatch>,
    outbox: Outbox,
    metrics: Arc<Metrics>,
    /// Highest committed sequence number per stream (by `Stream::code`), raised after
    /// every successful flush: the uplink sends nothing above it.
    committed_tx: watch::Sender<CommittedMarks>,
    pending: VecDeque<SealedBatch>,
}

impl Committer {
    pub(crate) fn new(
        sealed_rx: mpsc::Receiver<SealedBatch>,
        outbox: Outbox,
        metrics: Arc<Metrics>,
        committed_tx: watch::Sender<CommittedMarks>,
    ) -> Self {
        Self {
            sealed_rx,
            outbox,
            metrics,
            committed_tx,
            pending: VecDeque::new(),
        }
    }

    /// Runs until the sealed channel closes and everything received is committed (or
    /// the store keeps failing past a last retry).
    pub(crate) async fn run(mut self) {
        let mut closed = false;
        let mut retries_after_close = 0;
        loop {
            if self.pending.is_empty() {
                match self.sealed_rx.recv().await {
                    Some(b) => self.pending.push_back(b),
                    None => break,
                }
            }
            while self.pending.len() < GROUP_MAX {
                match self.sealed_rx.try_recv() {
                    Ok(b) => self.push(b),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            if let Err(e) = self.commit_pending().await {
                self.metrics.store_errors.inc();
                let full = e.is_disk_full();
                error!(error = %e, disk_full = full, pending = self.pending.len(), "store commit failed; retrying");
                if closed {
                    retries_after_close += 1;
                    if retries_after_close > 3 {
                        error!(
                            lost = self.pending.len(),
                            "giving up on uncommitted batches at shutdown"
                        );
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            } else if closed {
                break;
            }
        }
        // Input closed: commit whatever is still pending.
        if !self.pending.is_empty() {
            if let Err(e) = self.commit_pending().await {
                error!(error = %e, lost = self.pending.len(), "final commit failed");
            }
        }
    }

    fn push(&mut self, batch: SealedBatch) {
        if self.pending.len() >= PENDING_LIMIT {
            // Drop the oldest readings batch first; priority streams last.
            let idx = self
                .pending
                .iter()
                .position(|b| b.stream == Stream::Readings)
                .unwrap_or(0);
            if let Some(lost) = self.pending.remove(idx) {
                self.metrics.batches_evicted.inc();
                warn!(stream = %lost.stream, seq = lost.seq, "store unavailable; pending batch dropped");
            }
        }
        self.pending.push_back(batch);
    }

    /// Appends every pending batch and flushes once, on a blocking thread.
    async fn commit_pending(&mut self) -> Result<(), StoreError> {
        let batches: Vec<StoredBatch> = self
            .pending
            .iter()
            .map(|b| StoredBatch {
                stream: b.stream,
                seq: b.seq,
                bytes: b.bytes.clone(),
            })
            .collect();
        let mut marks = *self.committed_tx.borrow();
        for b in &batches {
            let m = &mut marks[usize::from(b.stream.code())];
            *m = (*m).max(b.seq);
        }
        let n = batches.len();
        let outcome = self.outbox.commit(batches).await?;
        self.pending.drain(..n);
        self.metrics.batches_committed.add(n as u64);
        let evicted = outcome.evicted.len() as u64;
        if evicted > 0 {
            self.metrics.batches_evicted.add(evicted);
            warn!(evicted, "store quota reached; oldest batches evicted");
        }
        self.committed_tx.send_replace(marks);
        Ok(())
    }
}
